"""What crosses from the client to the attacker, and the ground truth kept apart from it.

An upload is the gradient by parameter name plus the threat model (what the server knows),
and, when the threat model reveals them, the statistics the client's BatchNorm layers
normalised with, and, when the client sends its whole state, its BatchNorm running statistics
after the update; the truth file holds the client's images and labels and is read only by the
evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.checkpoints import ARCH_KEYS
from pipeline.errors import PipelineError
from pipeline.files import load_tensors, save_tensors

THREAT_MODEL_KEYS = (
    *ARCH_KEYS, "mean", "std", "checkpoint", "checkpoint_sha256", "epoch", "trial", "scheme", "setting",
    "batch_size", "participants", "bn", "local_steps", "lr", "mode", "dp", "label_repetition",
)


def upload_name(epoch: int, trial: int) -> str:
    """The file name of one client upload (and of its truth, reconstruction and figure)."""
    return f"epoch-{epoch:03d}-trial-{trial:02d}.safetensors"


# The two attackers of every upload: the adaptive one models what the threat model says of the
# client, the classic one a single full-batch gradient (per_image.csv's attacker column; the
# classic's reconstructions go to attacks/<setting>/<CLASSIC>/, where it differs at all).
ADAPTIVE, CLASSIC = "adaptive", "classic"


# the prefixes of their names beside the gradients' (no parameter name has a /)
STATISTICS, BUFFERS = "bn_statistics/", "bn_buffers/"


@dataclass
class Upload:
    gradients: dict[str, torch.Tensor]
    threat_model: dict[str, Any]
    # "<layer>.mean" / "<layer>.var", [local steps, normalisation groups, channels]; empty: not revealed
    bn_statistics: dict[str, torch.Tensor] = field(default_factory=dict)
    # "<layer>.running_mean" / "<layer>.running_var" after the client's update; empty: not uploaded
    bn_buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def labels(self) -> torch.Tensor | None:
        revealed = self.threat_model.get("labels")
        return None if revealed is None else torch.tensor(revealed, dtype=torch.long)


def joined(gradients: dict[str, torch.Tensor], statistics: dict[str, torch.Tensor],
           buffers: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Gradients, BatchNorm statistics and buffers as one flat mapping of tensors (for one file)."""
    return {**gradients, **{STATISTICS + n: s for n, s in statistics.items()},
            **{BUFFERS + n: b for n, b in (buffers or {}).items()}}


def split(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ...]:
    """The inverse of `joined`: (gradients, BatchNorm statistics, BatchNorm buffers)."""
    def under(prefix: str) -> dict[str, torch.Tensor]:
        return {n.removeprefix(prefix): t for n, t in tensors.items() if n.startswith(prefix)}

    gradients = {n: t for n, t in tensors.items() if not n.startswith((STATISTICS, BUFFERS))}
    return gradients, under(STATISTICS), under(BUFFERS)


def save_upload(path: Path, upload: Upload) -> None:
    save_tensors(path, joined(upload.gradients, upload.bn_statistics, upload.bn_buffers),
                 {"kind": "upload", **upload.threat_model})


def load_upload(path: Path) -> Upload:
    tensors, meta = load_tensors(path)
    if meta.get("kind") != "upload":
        raise PipelineError(f"{path}: not an upload (kind is {meta.get('kind')!r})")
    missing = [k for k in THREAT_MODEL_KEYS if k not in meta]
    if missing:
        raise PipelineError(f"{path}: upload metadata lacks {missing[0]!r}")
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise PipelineError(f"{path}: {name!r} is not a finite float tensor")
    gradients, statistics, buffers = split(tensors)
    return Upload(gradients, meta, statistics, buffers)


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
