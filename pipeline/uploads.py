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
from pydantic import ConfigDict, Field, ValidationError
from torch import nn

from pipeline.checkpoints import ARCH_KEYS, Architecture
from pipeline.config import one_line
from pipeline.errors import PipelineError
from pipeline.files import load_tensors, save_tensors
from pipeline.nets import batchnorm_layers
from pipeline.sections import ClientParams, ClientProtocol, ExtractParams


class ThreatModel(Architecture, ClientProtocol):
    """What the server knows of one upload: the client's exact model (its architecture, the
    checkpoint it started from, the data's normalisation) and its protocol, as the client states
    it; written beside the upload's tensors (flat, one key each) and refused whole when a key is
    missing, unknown or of the wrong type."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: tuple[float, ...]
    std: tuple[float, ...]
    checkpoint: str
    checkpoint_sha256: str
    scheme: str
    step: int = Field(ge=0)  # optimizer steps the checkpoint was trained for
    epoch: int | None = Field(ge=0)  # epochs, where the checkpoint is an epoch's (else None)
    # which upload of which setting
    setting: str
    trial: int = Field(ge=0)
    bn_momentum: float | None = Field(gt=0, le=1)  # with upload_buffers and BatchNorm layers
    labels: tuple[int, ...] | None  # revealed (extract.reveal_labels), else None

    @property
    def at(self) -> str:
        """The checkpoint's name ("epoch-003", "step-000016"): the key that pairs settings."""
        return Path(self.checkpoint).stem

    @property
    def arch_meta(self) -> dict[str, Any]:
        """The checkpoint metadata that rebuilds the client's architecture."""
        return self.model_dump(include=set(ARCH_KEYS), exclude={"bottleneck"} if self.bottleneck is None else None)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the client's images."""
        return self.in_channels, self.image_size, self.image_size

    @property
    def step_images(self) -> int:
        """How many images of the batch each local step trains on."""
        return self.batch_size // self.local_steps


def upload_name(checkpoint: str, trial: int) -> str:
    """The file name of one client upload (and of its truth, reconstruction and figure) from the
    checkpoint named `checkpoint` (pipeline.checkpoints)."""
    return f"{checkpoint}-trial-{trial:02d}.safetensors"


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
    tm = upload.threat_model
    # an undefended client of a model without a bottleneck names neither: its bytes are those of the
    # uploads before defenses
    stated = tm.model_dump(exclude={k for k in ("defense", "bottleneck") if getattr(tm, k) is None})
    save_tensors(path, joined(upload.gradients, upload.bn_statistics, upload.bn_buffers), {"kind": "upload", **stated})


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


@dataclass
class ClientUpdate:
    """What the client's run produced: the upload's gradient, what BatchNorm normalised with and
    its buffers after the update (what reaches the server is `upload_of`'s choice), and its DP guarantee."""

    gradients: dict[str, torch.Tensor]  # the upload, by parameter name
    epsilon: float | None  # per-sample DP at the client: the guarantee for each of its samples
    # "<layer>.mean" / "<layer>.var": what each BatchNorm normalised with, [E steps, groups, C]
    bn_statistics: dict[str, torch.Tensor]
    # "<layer>.running_mean" / "<layer>.running_var" after the update (client.upload_buffers); else empty
    bn_buffers: dict[str, torch.Tensor]


def batchnorm_momentum(model: nn.Module) -> float | None:
    """The momentum all of the model's BatchNorm layers share (None without BatchNorm)."""
    momenta = {m.momentum for _, m in batchnorm_layers(model) if m.running_mean is not None}
    if len(momenta) > 1 or None in momenta:
        raise PipelineError(
            f"the model's BatchNorm layers update their running statistics by momenta {sorted(map(str, momenta))}: "
            "uploaded buffers need one momentum"
        )
    return momenta.pop() if momenta else None


def threat_model(
    model: nn.Module,
    checkpoint: Path,
    ckpt: dict[str, Any],
    c: ClientParams,
    setting: str,
    trial: int,
    revealed_labels: torch.Tensor | None = None,
) -> ThreatModel:
    """What the server knows of the upload of client `c` starting from `model`, the checkpoint
    at `checkpoint` (whose metadata is `ckpt`): the exact model and the client's protocol."""
    return ThreatModel(
        **{k: ckpt[k] for k in (*ARCH_KEYS, "mean", "std", "scheme", "step", "epoch") if k in ckpt},
        setting=setting,
        trial=trial,
        checkpoint=checkpoint.as_posix(),
        checkpoint_sha256=ckpt["sha256"],
        **c.model_dump(exclude={"participants_as"}),
        bn_momentum=batchnorm_momentum(model) if c.upload_buffers else None,
        labels=None if revealed_labels is None else tuple(revealed_labels.tolist()),
    )


def upload_of(
    update: ClientUpdate,
    model: nn.Module,
    checkpoint: tuple[Path, dict[str, Any]],
    c: ClientParams,
    setting: str,
    trial: int,
    labels: torch.Tensor,
    reveal: ExtractParams,
) -> Upload:
    """What client `c` uploads after `update` from `model` (the checkpoint at its path, with its
    metadata): the gradient, the threat model, and what `reveal` says the server learns."""
    path, ckpt = checkpoint
    threat = threat_model(model, path, ckpt, c, setting, trial, labels if reveal.reveal_labels else None)
    statistics = update.bn_statistics if reveal.reveal_bn_statistics else {}
    return Upload(update.gradients, threat, statistics, update.bn_buffers)
