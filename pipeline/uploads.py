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
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from pipeline.checkpoints import ARCH_KEYS
from pipeline.config import ClientDPParams, one_line
from pipeline.errors import PipelineError
from pipeline.files import load_tensors, save_tensors


class ThreatModel(BaseModel):
    """What the server knows of one upload: the client's exact model (architecture, checkpoint,
    normalisation) and its protocol, as the client states it; written beside the upload's tensors
    and refused whole when a key is missing, unknown or of the wrong type."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # the client's model: ARCH_KEYS, the checkpoint it started from, the data's normalisation
    arch: str
    in_channels: int = Field(ge=1)
    num_classes: int = Field(ge=2)
    image_size: int = Field(ge=1)
    norm: str
    maxpool_kernel: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    checkpoint: str
    checkpoint_sha256: str
    scheme: str
    epoch: int = Field(ge=0)
    # which upload of which setting
    setting: str
    trial: int = Field(ge=0)
    # the client's protocol (ClientParams, less how its participants run)
    batch_size: int = Field(ge=1)
    participants: int = Field(ge=1)
    bn: Literal["sync", "async"]
    local_steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    mode: Literal["train", "eval"]
    dp: ClientDPParams | None
    label_repetition: int | None
    upload_buffers: bool
    bn_momentum: float | None = Field(gt=0, le=1)  # with upload_buffers and BatchNorm layers
    labels: tuple[int, ...] | None  # revealed (extract.reveal_labels), else None

    @property
    def arch_meta(self) -> dict[str, Any]:
        """The checkpoint metadata that rebuilds the client's architecture."""
        return {k: getattr(self, k) for k in ARCH_KEYS}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the client's images."""
        return self.in_channels, self.image_size, self.image_size

    @property
    def step_images(self) -> int:
        """How many images of the batch each local step trains on."""
        return self.batch_size // self.local_steps


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
    threat_model: ThreatModel
    # "<layer>.mean" / "<layer>.var", [local steps, normalisation groups, channels]; empty: not revealed
    bn_statistics: dict[str, torch.Tensor] = field(default_factory=dict)
    # "<layer>.running_mean" / "<layer>.running_var" after the client's update; empty: not uploaded
    bn_buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def labels(self) -> torch.Tensor | None:
        revealed = self.threat_model.labels
        return None if revealed is None else torch.tensor(revealed, dtype=torch.long)


def joined(
    gradients: dict[str, torch.Tensor],
    statistics: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Gradients, BatchNorm statistics and buffers as one flat mapping of tensors (for one file)."""
    return {
        **gradients,
        **{STATISTICS + n: s for n, s in statistics.items()},
        **{BUFFERS + n: b for n, b in (buffers or {}).items()},
    }


def split(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ...]:
    """The inverse of `joined`: (gradients, BatchNorm statistics, BatchNorm buffers)."""

    def under(prefix: str) -> dict[str, torch.Tensor]:
        return {n.removeprefix(prefix): t for n, t in tensors.items() if n.startswith(prefix)}

    gradients = {n: t for n, t in tensors.items() if not n.startswith((STATISTICS, BUFFERS))}
    return gradients, under(STATISTICS), under(BUFFERS)


def save_upload(path: Path, upload: Upload) -> None:
    save_tensors(
        path,
        joined(upload.gradients, upload.bn_statistics, upload.bn_buffers),
        {"kind": "upload", **upload.threat_model.model_dump()},
    )


def load_upload(path: Path) -> Upload:
    tensors, meta = load_tensors(path)
    if meta.get("kind") != "upload":
        raise PipelineError(f"{path}: not an upload (kind is {meta.get('kind')!r})")
    meta = {k: v for k, v in meta.items() if k not in ("kind", "sha256")}
    try:
        threat_model = ThreatModel.model_validate(meta)
    except ValidationError as err:
        raise PipelineError(one_line(err, f"{path}: threat model")) from None
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise PipelineError(f"{path}: {name!r} is not a finite float tensor")
    gradients, statistics, buffers = split(tensors)
    return Upload(gradients, threat_model, statistics, buffers)


def check_fits(path: Path, upload: Upload, model: nn.Module) -> None:
    """Refuse an upload whose tensors are not one gradient per trainable parameter of `model`."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    odd = sorted(set(shapes) ^ set(upload.gradients))
    if odd:
        raise PipelineError(f"{path}: gradient {odd[0]!r} missing or not a parameter of the {upload.threat_model.arch}")
    for name, shape in shapes.items():
        if tuple(upload.gradients[name].shape) != shape:
            raise PipelineError(
                f"{path}: gradient {name!r} has shape {tuple(upload.gradients[name].shape)}, "
                f"the architecture needs {shape}"
            )


def save_truth(path: Path, images: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any]) -> None:
    save_tensors(path, {"images": images, "labels": labels}, {"kind": "truth", **meta})


def load_truth(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    tensors, meta = load_tensors(path, expected={"images", "labels"})
    if meta.get("kind") != "truth":
        raise PipelineError(f"{path}: not a ground-truth file (kind is {meta.get('kind')!r})")
    return tensors["images"], tensors["labels"], meta
