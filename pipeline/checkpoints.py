"""Model checkpoints: weights and buffers as safetensors, the architecture in the JSON beside.

Weights only and byte-stable (no optimiser state, paths or times), so DVC hashes match
across clones; the JSON says everything needed to rebuild the exact architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pipeline.errors import PipelineError
from pipeline.files import load_tensors, read_json, save_tensors
from pipeline.nets import build_model
from pipeline.sections import BottleneckParams


class Architecture(BaseModel):
    """What rebuilds a model (pipeline.nets.build_model): the keys every checkpoint's metadata holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str
    in_channels: int = Field(ge=1)
    num_classes: int = Field(ge=2)
    image_size: int = Field(ge=1)
    norm: str
    maxpool_kernel: int | None
    # PRECODE's block; only a checkpoint that has one names it, so the others' bytes are unchanged
    bottleneck: BottleneckParams | None = None


ARCH_KEYS = tuple(Architecture.model_fields)
REQUIRED_ARCH_KEYS = tuple(k for k, f in Architecture.model_fields.items() if f.is_required())


def epoch_checkpoint(epoch: int) -> str:
    """The checkpoint written after `epoch` epochs (0: before training): its name, the key that
    pairs settings at it, and the stem of its files."""
    return f"epoch-{epoch:03d}"


def step_checkpoint(step: int) -> str:
    """The checkpoint written after `step` optimizer steps (train.checkpoint_steps)."""
    return f"step-{step:06d}"


def checkpoint_name(checkpoint: str) -> str:
    return f"{checkpoint}.safetensors"


def checkpoint_label(checkpoint: str) -> str:
    """How tables name a checkpoint: "epoch 3", "step 16"."""
    kind, number = checkpoint.split("-")
    return f"{kind} {int(number)}"


def extracted(epochs: list[int], steps: list[int]) -> list[str]:
    """The checkpoints extract.epochs and extract.steps name, epochs first."""
    return [epoch_checkpoint(e) for e in epochs] + [step_checkpoint(s) for s in steps]


def written_checkpoints(folder: Path) -> list[dict[str, Any]]:
    """The metadata of every checkpoint train wrote in `folder`, in training order (by step; at
    one step the epoch checkpoint before the step one)."""
    written = [read_json(p) for pattern in ("epoch-*.json", "step-*.json") for p in Path(folder).glob(pattern)]
    return sorted(written, key=lambda meta: (meta["step"], meta["checkpoint"]))


def training_order(table) -> list[str]:
    """The checkpoints a table (columns checkpoint and step) names, in training order."""
    return list(table.groupby("checkpoint").step.min().sort_values(kind="stable").index)


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED_ARCH_KEYS if k not in meta]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    save_tensors(path, model.state_dict(), meta)


def model_from_meta(meta: dict[str, Any]) -> nn.Module:
    return build_model(**{k: meta[k] for k in ARCH_KEYS if k in meta})


def load_checkpoint(path: Path, expect: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights.

    `expect` maps metadata keys to required values (e.g. the architecture an upload names);
    a checkpoint of another architecture is refused rather than loaded loosely.
    """
    path = Path(path)
    state, meta = load_tensors(path)
    missing = [k for k in REQUIRED_ARCH_KEYS if k not in meta]
    if missing:
        raise PipelineError(f"{path}: not a model checkpoint (metadata lacks {missing[0]!r})")
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            raise PipelineError(f"{path}: checkpoint has {key}={meta.get(key)!r}, expected {value!r}")
    model = model_from_meta(meta)
    if set(state) != set(model.state_dict()):
        odd = sorted(set(state) ^ set(model.state_dict()))[0]
        raise PipelineError(f"{path}: weights do not fit a {meta['arch']} ({odd!r} missing or unexpected)")
    for name, ref in model.state_dict().items():
        if state[name].shape != ref.shape:
            raise PipelineError(
                f"{path}: {name} has shape {tuple(state[name].shape)}, the architecture needs {tuple(ref.shape)}"
            )
    model.load_state_dict(state)
    return model, meta
