"""What crosses from the client to the attacker, and the ground truth kept apart from it.

An upload is the gradient by parameter name plus the threat model (what the server knows);
the truth file holds the client's images and labels and is read only by the evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.checkpoints import ARCH_KEYS
from pipeline.errors import PipelineError
from pipeline.files import load_tensors, save_tensors

THREAT_MODEL_KEYS = (
    *ARCH_KEYS, "mean", "std", "checkpoint", "checkpoint_sha256", "epoch", "scheme", "setting",
    "batch_size", "participants", "bn", "local_steps", "lr", "mode", "dp", "label_repetition",
)


@dataclass
class Upload:
    gradients: dict[str, torch.Tensor]
    threat_model: dict[str, Any]

    @property
    def labels(self) -> torch.Tensor | None:
        revealed = self.threat_model.get("labels")
        return None if revealed is None else torch.tensor(revealed, dtype=torch.long)


def save_upload(path: Path, upload: Upload) -> None:
    save_tensors(path, upload.gradients, {"kind": "upload", **upload.threat_model})


def load_upload(path: Path) -> Upload:
    gradients, meta = load_tensors(path)
    if meta.get("kind") != "upload":
        raise PipelineError(f"{path}: not an upload (kind is {meta.get('kind')!r})")
    missing = [k for k in THREAT_MODEL_KEYS if k not in meta]
    if missing:
        raise PipelineError(f"{path}: upload metadata lacks {missing[0]!r}")
    for name, grad in gradients.items():
        if not grad.is_floating_point() or not torch.isfinite(grad).all():
            raise PipelineError(f"{path}: gradient {name!r} is not a finite float tensor")
    return Upload(gradients, meta)


def check_fits(path: Path, upload: Upload, model: nn.Module) -> None:
    """Refuse an upload whose tensors are not one gradient per trainable parameter of `model`."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    odd = sorted(set(shapes) ^ set(upload.gradients))
    if odd:
        raise PipelineError(f"{path}: gradient {odd[0]!r} missing or not a parameter of the {upload.threat_model['arch']}")
    for name, shape in shapes.items():
        if tuple(upload.gradients[name].shape) != shape:
            raise PipelineError(f"{path}: gradient {name!r} has shape {tuple(upload.gradients[name].shape)}, "
                                f"the architecture needs {shape}")


def save_truth(path: Path, images: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any]) -> None:
    save_tensors(path, {"images": images, "labels": labels}, {"kind": "truth", **meta})


def load_truth(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    tensors, meta = load_tensors(path, expected={"images", "labels"})
    if meta.get("kind") != "truth":
        raise PipelineError(f"{path}: not a ground-truth file (kind is {meta.get('kind')!r})")
    return tensors["images"], tensors["labels"], meta
