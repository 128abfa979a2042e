"""Typed parameters: `params.yaml` parsed and validated in one place.

Unknown keys and out-of-range values are refused with one line naming the key and what is
allowed, before any stage does work.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import PipelineError


class _Section(BaseModel):
    # No defaults: params.yaml is the one source of every value, and a missing key is an error.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    source: Literal["fashion-mnist", "imagefolder"]
    # fashion-mnist: the folder holding the four *-ubyte.gz files; imagefolder: a folder of
    # class sub-folders.
    root: str
    image_size: int = Field(ge=8, le=1024)
    # Deterministic subsets of the splits (null: all of it), to size runs to the machine.
    train_size: int | None = Field(ge=1)
    test_size: int | None = Field(ge=1)
    # Share of an image folder held out for testing (Fashion-MNIST has its own test split).
    test_fraction: float = Field(gt=0, lt=1)
    victims_per_class: int = Field(ge=1)


class ModelParams(_Section):
    arch: Literal["resnet18", "vgg11", "convnet"]


class TrainParams(_Section):
    """What all schemes share."""

    epochs: int = Field(ge=0)
    batch_size: int = Field(ge=1)  # the global batch (over all processes) before a scheme's multiplier
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    lr_milestones: list[int]
    lr_gamma: float = Field(gt=0, le=1)
    accelerator: Literal["cpu", "gpu", "auto"]
    devices: int = Field(ge=1)  # data-parallel processes per node
    num_nodes: int = Field(ge=1)
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "64-true"]


class DPParams(_Section):
    # per-sample: DP-SGD (clip each sample's gradient, Poisson batches, epsilon from the RDP
    # accountant). batch: the original's "DP-SGD", the batch gradient clipped: no guarantee.
    kind: Literal["per-sample", "batch"]
    clip: float = Field(gt=0)
    sigma: float = Field(ge=0)  # noise standard deviation is sigma * clip
    delta: float | None = Field(gt=0, lt=1)  # per-sample only
    # how per-sample gradients are computed: auto takes the faster here (bench/per_sample.py)
    per_sample: Literal["auto", "loop", "vmap"] | None

    @model_validator(mode="after")
    def _kind(self) -> "DPParams":
        if self.kind == "per-sample" and (self.delta is None or self.per_sample is None):
            raise ValueError("per-sample DP needs delta and per_sample (auto, loop or vmap)")
        if self.kind == "batch" and (self.delta is not None or self.per_sample is not None):
            raise ValueError("batch clipping has no delta and no per_sample: it gives no guarantee to account")
        return self


class SchemeParams(_Section):
    """One defense scheme: how its model is normalised and trained."""

    # batch-sync: BatchNorm over the global batch; batch-async: each process its own shard;
    # group: GroupNorm (no batch statistics, as per-sample clipping needs).
    norm: Literal["batch-sync", "batch-async", "group"]
    batch_multiplier: int = Field(ge=1)  # the scheme's global batch is train.batch_size times this
    maxpool_kernel: Annotated[int, Field(ge=2)] | Literal["auto"] | None  # ResNet-18's stem maxpool (RA defense)
    dp: DPParams | None

    @model_validator(mode="after")
    def _dp_needs_group_norm(self) -> "SchemeParams":
        if self.dp is not None and self.dp.kind == "per-sample" and self.norm != "group":
            raise ValueError("per-sample DP needs norm: group (BatchNorm ties the samples of a batch together)")
        return self


class ExtractParams(_Section):
    epochs: list[int] = Field(min_length=1)
    batch_size: int = Field(ge=1)
    # The client's mode: "train" normalises with the batch's own statistics, "eval" with the
    # running ones (and turns dropout off).
    mode: Literal["train", "eval"]
    # Put the true labels into the threat model (the attacker's "known labels" oracle).
    reveal_labels: bool


class AttackParams(_Section):
    labels: Literal["known", "llg", "llg-original", "idlg"]
    iterations: int = Field(ge=1)
    restarts: int = Field(ge=1)
    lr: float = Field(gt=0)
    lr_min: float = Field(ge=0)
    tv_weight: float = Field(ge=0)


class Params(_Section):
    seed: int = Field(ge=0)
    data: DataParams
    model: ModelParams
    train: TrainParams
    schemes: dict[str, SchemeParams] = Field(min_length=1)
    extract: ExtractParams
    attack: AttackParams

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        for epoch in self.extract.epochs:
            if epoch > self.train.epochs:
                raise ValueError(
                    f"extract.epochs: checkpoint epoch {epoch} is past the last one trained "
                    f"(train.epochs is {self.train.epochs})"
                )
        for name, scheme in self.schemes.items():
            if scheme.maxpool_kernel is not None and self.model.arch not in ("resnet18", "convnet"):
                raise ValueError(f"schemes.{name}.maxpool_kernel: {self.model.arch} has no stem maxpool to enlarge "
                                 "(resnet18 and convnet have)")
            processes = self.train.devices * self.train.num_nodes
            if (self.train.batch_size * scheme.batch_multiplier) % processes:
                raise ValueError(
                    f"schemes.{name}: the global batch {self.train.batch_size * scheme.batch_multiplier} "
                    f"does not split evenly over {processes} processes"
                )
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
                raise ValueError(f"schemes: {name!r} is not a usable scheme name (lower-case letters, digits, - and _)")
        if len(set(self.extract.epochs)) != len(self.extract.epochs):
            raise ValueError("extract.epochs: an epoch is listed twice")
        if self.attack.lr_min > self.attack.lr:
            raise ValueError("attack.lr_min: must not exceed attack.lr")
        if self.attack.labels == "known" and not self.extract.reveal_labels:
            raise ValueError("attack.labels: 'known' needs extract.reveal_labels: true")
        if self.attack.labels == "idlg" and self.extract.batch_size != 1:
            raise ValueError("attack.labels: 'idlg' needs extract.batch_size: 1")
        return self

    def scheme(self, name: str) -> SchemeParams:
        if name not in self.schemes:
            raise PipelineError(f"unknown scheme {name!r}; params.yaml defines {', '.join(self.schemes)}")
        return self.schemes[name]


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key {key!r}"
    if first["type"] == "missing":
        return f"{source}: missing key {key!r}"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":  # our own checks; those across sections name their keys already
        return f"{source}: {key}: {message}" if first["loc"] else f"{source}: {message}"
    return f"{source}: {key}: {message} (got {first['input']!r})"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed parameter mapping; a bad one raises PipelineError with one line."""
    if not isinstance(raw, dict):
        raise PipelineError(f"{source}: expected a mapping of parameter sections")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise PipelineError(_one_line(err, source)) from None


def load_params(path: str | Path) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: parameter file not found") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_params(raw, str(path))
