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
    source: Literal["fashion-mnist", "cifar10", "cifar100", "imagefolder"]
    # fashion-mnist: the folder holding the four *-ubyte.gz files; cifar10 / cifar100: the
    # extracted binary version (cifar-10-batches-bin/, cifar-100-binary/); imagefolder: a folder
    # of class sub-folders.
    root: str
    image_size: int = Field(ge=8, le=1024)
    # Deterministic subsets of the splits (null: all of it), to size runs to the machine.
    train_size: int | None = Field(ge=1)
    test_size: int | None = Field(ge=1)
    # Share of an image folder held out for testing (Fashion-MNIST has its own test split).
    test_fraction: float = Field(gt=0, lt=1)
    victims_per_class: int = Field(ge=1)
    # an image folder's images read as 1 (grey) or 3 (RGB) channels; null: RGB when most are colour
    channels: Literal[1, 3] | None
    # an image folder of more images than this is streamed (prepare writes an index, training
    # decodes it in DataLoader workers); 0: always; null: never
    stream_above: int | None = Field(ge=0)


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
    loader_workers: int = Field(ge=0)  # DataLoader processes decoding a streamed image folder (0: the trainer's)


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
    def _kind(self) -> DPParams:
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
    def _dp_needs_group_norm(self) -> SchemeParams:
        if self.dp is not None and self.dp.kind == "per-sample" and self.norm != "group":
            raise ValueError("per-sample DP needs norm: group (BatchNorm ties the samples of a batch together)")
        return self


class ExtractParams(_Section):
    epochs: list[int] = Field(min_length=1)  # checkpoints every setting's client uploads from
    # client batches per setting and epoch, disjoint, drawn from the victim pool by trial: trial t
    # holds the same images in every setting that draws its batch the same way (the pairing)
    trials: int = Field(ge=1)
    # Put the true labels into the threat model (the attacker's "known labels" oracle).
    reveal_labels: bool
    # Put into the upload the statistics the client's BatchNorm layers normalised with (per
    # local step and shard), as a client that shares its BatchNorm state does.
    reveal_bn_statistics: bool


class ClientDPParams(_Section):
    # per-sample: each sample's gradient clipped to C, noise sigma*C on every local step
    # (epsilon reported); batch: the original's, each step's batch gradient clipped to C and
    # noise sigma*C added once to the upload: no guarantee.
    kind: Literal["per-sample", "batch"]
    clip: float = Field(gt=0)
    sigma: float = Field(ge=0)
    delta: float | None = Field(gt=0, lt=1)  # per-sample only

    @model_validator(mode="after")
    def _kind(self) -> ClientDPParams:
        if (self.kind == "per-sample") != (self.delta is not None):
            raise ValueError("delta is needed by per-sample DP and meaningless for batch clipping (no guarantee)")
        return self


class ClientParams(_Section):
    """What one federated client does with its batch before uploading (docs/schemes-and-settings.md)."""

    batch_size: int = Field(ge=1)
    participants: int = Field(ge=1)  # W: the batch is split into W contiguous shards
    bn: Literal["sync", "async"]  # BatchNorm statistics of the whole batch, or of each shard
    local_steps: int = Field(ge=1)  # E: the upload is (theta_0 - theta_E) / (lr * E)
    lr: float = Field(gt=0)  # the local SGD step size
    mode: Literal["train", "eval"]  # train: batch statistics and dropout on; eval: running statistics
    dp: ClientDPParams | None
    label_repetition: Annotated[int, Field(ge=1)] | None  # k: the batch holds k classes x B/k images each
    participants_as: Literal["simulated", "processes"]  # one process, or W real (Lightning Fabric) ones
    # the upload carries the BatchNorm running statistics after the update, as FedAvg sends the whole state
    upload_buffers: bool

    @model_validator(mode="after")
    def _splits(self) -> ClientParams:
        b, w, e = self.batch_size, self.participants, self.local_steps
        if b % w:
            raise ValueError(f"batch_size {b} does not split into {w} equal participant shards")
        if (b // w) % e:
            raise ValueError(f"a shard of {b // w} images does not split into {e} equal local steps")
        if self.label_repetition is not None and b % self.label_repetition:
            raise ValueError(f"batch_size {b} does not split into {self.label_repetition} classes of equal size")
        if self.upload_buffers and w > 1 and (self.bn == "async" or self.participants_as == "processes"):
            raise ValueError(
                "upload_buffers: the buffers of one client model are uploaded; W participants with "
                "bn: async, or run as processes, each hold their own (use participants: 1 or bn: sync, "
                "simulated)"
            )
        return self


class SettingParams(BaseModel):
    """A named client setting: the scheme whose checkpoints it uploads from, what it changes
    from the `client` section (any of its keys), and from the `attack` section (under `attack:`)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    scheme: str
    attack: dict[str, Any] = Field(default_factory=dict)


class AttackParams(_Section):
    labels: Literal["known", "llg", "llg-original", "idlg", "counts"]
    iterations: int = Field(ge=1)
    restarts: int = Field(ge=1)
    lr: float = Field(gt=0)
    lr_min: float = Field(ge=0)
    tv_weight: float = Field(ge=0)
    # exact: the adaptive attacker, modelling what the threat model says of the client: its
    # async BatchNorm over W shards, its E local steps at its step size, unrolled; plain: one
    # full-batch gradient with common statistics, the classic attacker.
    client_model: Literal["exact", "plain"]
    # with exact: attack each upload the exact model treats otherwise a second time, with plain,
    # so the table shows both attackers (attacks/<setting>/classic/)
    classic: bool
    objective: Literal["cosine", "l2"]  # 1 - cosine, or squared L2, over all parameters
    layer_weights: Literal["equal", "linear"]  # linear: layer l of L weighs (L - l) / L
    bn_prior: float = Field(ge=0)  # weight of the BatchNorm-statistics prior (0: off)
    # the prior's reference: running: the model's running statistics; exact: those the client
    # normalised with, from the upload (needs extract.reveal_bn_statistics); from-buffers: derived
    # from the running statistics the client uploaded after its update (needs client.upload_buffers)
    bn_statistics: Literal["running", "exact", "from-buffers"]
    tv_target: float | None = Field(gt=0)  # stop a restart once its best iterate's TV is under this
    # cpu; gpu: one process per CUDA device (processes of them; NCCL between them); auto: gpu
    # where torch sees enough CUDA devices, else cpu
    accelerator: Literal["cpu", "gpu", "auto"]
    processes: int = Field(ge=1)
    # jobs: the jobs (upload x restart) sharded over the processes; batch: every process on
    # every job, each with its part of the dummy batch, the dummy gradients all-reduced.
    split: Literal["jobs", "batch"]
    threads: int = Field(ge=1)  # torch threads in each process
    # the attack step as one torch.compile'd function: faster per step on the ConvNet, a compile
    # of tens of seconds first (inductor's cache after); no BatchNorm prior, no batch split
    compile: bool
    # the restarts of an upload made one reconstruction: best: the restart of lowest gradient loss;
    # mlco: E2EGI's image-by-image combination of them (pipeline.attack.invert.min_loss_combination)
    combine: Literal["best", "mlco"]
    # fixed: these values; tuned: lr, tv_weight, ... as tune@<setting> chose them on the attacker's
    # own surrogate uploads (tuning/<setting>.json; the classic attacker keeps the fixed ones)
    hyperparameters: Literal["fixed", "tuned"]


# The attack's keys a study may search: numbers between low and high, or one of some choices.
TUNABLE_NUMBERS = ("lr", "lr_min", "tv_weight", "bn_prior", "iterations")
TUNABLE_CHOICES = ("objective", "layer_weights")


class SearchRange(BaseModel):
    """One key's range in tune.space: {low, high, log} for a number, {choices} for a choice."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    low: float | None = None
    high: float | None = None
    log: bool = False  # sample on a log scale (low > 0)
    choices: list[str] | None = None

    @model_validator(mode="after")
    def _shape(self) -> SearchRange:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log:
                raise ValueError("takes choices, or low and high, not both")
            if not self.choices:
                raise ValueError("choices is empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (or choices)")
        if self.low > self.high:
            raise ValueError(f"low {self.low:g} is above high {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"log needs low > 0 (has {self.low:g})")
        return self


class TuneParams(_Section):
    """The study tune@<setting> runs for each setting whose attack has hyperparameters: tuned."""

    trials: int = Field(ge=1)  # finished trials per study (pruned ones count), the fixed attack the first
    batches: int = Field(ge=1)  # surrogate client batches, attacked at every extract epoch
    objective: Literal["psnr", "grad_loss"]  # surrogate images' mean PSNR, or the mean gradient loss
    startup_trials: int = Field(ge=0)  # random trials before TPE models the history; none pruned before
    space: dict[str, SearchRange] = Field(min_length=1)


class EvaluateParams(_Section):
    # AlexNet ImageNet weights for LPIPS (torchvision's alexnet-owt-7be5be79.pth); null: torchvision's
    # cache if the file is there, else the LPIPS column says n/a
    lpips_backbone: str | None


class ReportParams(_Section):
    # the setting every other is paired with, batch by batch (null: no paired columns)
    baseline: str | None
    # the baseline's client attacked at a larger budget (null: none): how far from its plateau the
    # attacker stopped, shown beside the verdicts and never one of them
    budget: str | None
    confidence: float = Field(gt=0, lt=1)  # of the t intervals over batches
    alpha: float = Field(gt=0, lt=1)  # the family's level, on Holm-adjusted p
    power: float = Field(gt=0, lt=1)  # of the smallest detectable difference
    effect: float = Field(gt=0)  # dB: the paired difference the trials are sized for (underpowered above)


def pairs_with(client: ClientParams, baseline_client: ClientParams) -> bool:
    """Whether a setting's trials draw the baseline's images: same batch size, no label repetition
    (a repeated-label batch is chosen class by class, other images by construction)."""
    return (
        client.batch_size == baseline_client.batch_size
        and client.label_repetition is None
        and baseline_client.label_repetition is None
    )


class Params(_Section):
    seed: int = Field(ge=0)
    data: DataParams
    model: ModelParams
    train: TrainParams
    schemes: dict[str, SchemeParams] = Field(min_length=1)
    extract: ExtractParams
    client: ClientParams
    settings: dict[str, SettingParams] = Field(min_length=1)
    attack: AttackParams
    tune: TuneParams
    evaluate: EvaluateParams
    report: ReportParams

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        for epoch in self.extract.epochs:
            if epoch > self.train.epochs:
                raise ValueError(
                    f"extract.epochs: checkpoint epoch {epoch} is past the last one trained "
                    f"(train.epochs is {self.train.epochs})"
                )
        for name, scheme in self.schemes.items():
            if scheme.maxpool_kernel is not None and self.model.arch not in ("resnet18", "convnet"):
                raise ValueError(
                    f"schemes.{name}.maxpool_kernel: {self.model.arch} has no stem maxpool to enlarge "
                    "(resnet18 and convnet have)"
                )
            processes = self.train.devices * self.train.num_nodes
            if (self.train.batch_size * scheme.batch_multiplier) % processes:
                raise ValueError(
                    f"schemes.{name}: the global batch {self.train.batch_size * scheme.batch_multiplier} "
                    f"does not split evenly over {processes} processes"
                )
            _check_name("schemes", name)
        self._check_attack(self.attack, "attack")
        for name, setting in self.settings.items():
            _check_name("settings", name)
            if setting.scheme not in self.schemes:
                raise ValueError(
                    f"settings.{name}.scheme: {setting.scheme!r} is not a scheme; "
                    f"params.yaml defines {', '.join(self.schemes)}"
                )
            client = self._resolve(name)
            if (
                client.dp is not None
                and client.dp.kind == "per-sample"
                and client.mode == "train"
                and self.schemes[setting.scheme].norm != "group"
            ):
                raise ValueError(
                    f"settings.{name}: per-sample DP cannot run through train-mode BatchNorm, which "
                    "ties the samples together (use mode: eval or a scheme with norm: group)"
                )
            attack, where = self._attack(name), f"settings.{name}.attack" if setting.attack else "attack"
            if attack.labels == "idlg" and client.batch_size != 1:
                raise ValueError(f"{where}.labels: 'idlg' needs batch_size 1 (settings.{name} has {client.batch_size})")
            if setting.attack:
                self._check_attack(attack, where)
            if attack.hyperparameters == "tuned":
                self._check_space(attack, where)
            if attack.bn_statistics == "from-buffers" and not client.upload_buffers:
                raise ValueError(
                    f"{where}.bn_statistics: 'from-buffers' needs the client to upload its buffers "
                    f"(settings.{name} has upload_buffers: false)"
                )
        baseline = self.report.baseline
        if baseline is not None:
            if baseline not in self.settings:
                raise ValueError(
                    f"report.baseline: {baseline!r} is not a setting, so nothing can be paired with it; "
                    f"params.yaml defines {', '.join(self.settings)} (null: a table without paired columns)"
                )
            if self._resolve(baseline).label_repetition is not None:
                raise ValueError(
                    f"report.baseline: {baseline!r} repeats labels, so its batches pair with no other setting's"
                )
            self._check_budget(baseline, self.report.budget)
            base_client = self._resolve(baseline)
            if not any(
                pairs_with(self._resolve(name), base_client)
                for name in self.settings
                if name not in (baseline, self.report.budget)
            ):
                raise ValueError(
                    f"report.baseline: no other setting pairs with {baseline!r} (the same batch size, no label "
                    "repetition), so the table has no verdict to make (null: a table without paired columns)"
                )
        elif self.report.budget is not None:
            raise ValueError("report.budget: needs report.baseline (the budget is measured against it)")
        if self.extract.trials < 2:
            raise ValueError(
                f"extract.trials: {self.extract.trials} client batch per cell leaves no spread between batches "
                "to test or to make an interval from (the batch is the unit): 2 or more"
            )
        if len(set(self.extract.epochs)) != len(self.extract.epochs):
            raise ValueError("extract.epochs: an epoch is listed twice")
        return self

    def _check_budget(self, baseline: str, budget: str | None) -> None:
        """The budget setting must be the baseline's client on its scheme, attacked with more
        iterations and nothing else changed."""
        if budget is None:
            return
        if budget not in self.settings:
            raise ValueError(
                f"report.budget: {budget!r} is not a setting; params.yaml defines {', '.join(self.settings)}"
            )
        ours, theirs = self._attack(budget).model_dump(), self._attack(baseline).model_dump()
        if (
            self.settings[budget].scheme != self.settings[baseline].scheme
            or self._resolve(budget) != self._resolve(baseline)
            or {k for k in ours if ours[k] != theirs[k]} != {"iterations"}
            or ours["iterations"] <= theirs["iterations"]
        ):
            raise ValueError(
                f"report.budget: {budget!r} must be {baseline!r}'s scheme and client attacked with more "
                "iterations and nothing else changed (settings.<name>.attack: {iterations: N})"
            )

    def _check_attack(self, a: AttackParams, where: str) -> None:
        if a.lr_min > a.lr:
            raise ValueError(f"{where}.lr_min: must not exceed attack.lr")
        if a.labels == "known" and not self.extract.reveal_labels:
            raise ValueError(f"{where}.labels: 'known' needs extract.reveal_labels: true")
        if a.compile and (a.bn_prior or a.split == "batch"):
            raise ValueError(f"{where}.compile: the compiled step takes neither bn_prior nor split: batch")
        if a.bn_statistics == "exact" and not self.extract.reveal_bn_statistics:
            raise ValueError(f"{where}.bn_statistics: 'exact' needs extract.reveal_bn_statistics: true")
        if a.combine == "mlco" and a.restarts < 2:
            raise ValueError(
                f"{where}.combine: 'mlco' combines restarts: it needs restarts: 2 or more (has {a.restarts})"
            )

    def _check_space(self, a: AttackParams, where: str) -> None:
        """Every value tune.space can give must make an attack params.yaml would accept."""
        space = self.tune.space
        for key, r in space.items():
            if key not in TUNABLE_NUMBERS + TUNABLE_CHOICES:
                raise ValueError(
                    f"tune.space: {key!r} is not a key the study can tune "
                    f"(numbers: {', '.join(TUNABLE_NUMBERS)}; choices: {', '.join(TUNABLE_CHOICES)})"
                )
            if (key in TUNABLE_CHOICES) != (r.choices is not None):
                raise ValueError(
                    f"tune.space.{key}: " + ("takes choices" if key in TUNABLE_CHOICES else "takes low and high")
                )
            if key == "iterations" and not (float(r.low or 0).is_integer() and float(r.high or 0).is_integer()):
                raise ValueError("tune.space.iterations: low and high must be whole numbers")
            values: list[Any] = list(r.choices) if r.choices is not None else [r.low, r.high]
            for value in values:
                value = int(value) if key == "iterations" else value
                self._check_attack(_changed(a, {key: value}, f"tune.space.{key}", ""), f"tune.space.{key} ({where})")
        if "lr" in space and "lr_min" in space and space["lr_min"].high > space["lr"].low:  # type: ignore[operator]
            raise ValueError("tune.space.lr_min: its high must not exceed lr's low (lr_min <= lr)")
        if self.tune.objective == "grad_loss" and {"objective", "layer_weights"} & set(space):
            raise ValueError(
                "tune.objective: grad_loss is not comparable across trials that change the attack's "
                "objective or layer_weights (use psnr)"
            )

    def _attack(self, name: str) -> AttackParams:
        overrides = self.settings[name].attack
        if not overrides:
            return self.attack
        return _changed(self.attack, overrides, f"settings.{name}.attack", "it changes keys of attack")

    def attack_for(self, name: str) -> AttackParams:
        """The attack parameters a named setting is attacked with: `attack`, changed by its own `attack:` keys."""
        if name not in self.settings:
            raise PipelineError(f"unknown setting {name!r}; params.yaml defines {', '.join(self.settings)}")
        return self._attack(name)

    def _resolve(self, name: str) -> ClientParams:
        return _changed(
            self.client,
            dict(self.settings[name].model_extra or {}),
            f"settings.{name}",
            "a setting changes keys of client, and of attack under attack:",
        )

    def setting(self, name: str) -> tuple[str, ClientParams]:
        """The scheme a named setting uploads from and its complete client parameters."""
        if name not in self.settings:
            raise PipelineError(f"unknown setting {name!r}; params.yaml defines {', '.join(self.settings)}")
        return self.settings[name].scheme, self._resolve(name)

    def scheme(self, name: str) -> SchemeParams:
        if name not in self.schemes:
            raise PipelineError(f"unknown scheme {name!r}; params.yaml defines {', '.join(self.schemes)}")
        return self.schemes[name]


def _changed(section: _Section, overrides: dict[str, Any], where: str, about: str) -> Any:
    """`section` with `overrides` applied, validated; a bad key or value raises one ValueError
    naming `where`.<key> (`about`: what the overrides may change, for an unknown key)."""
    unknown = sorted(set(overrides) - set(type(section).model_fields))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} ({about})")
    try:
        return type(section).model_validate({**section.model_dump(), **overrides})
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        got = "" if first["type"] == "value_error" else f" (got {first['input']!r})"
        raise ValueError(
            f"{where}" + (f".{key}" if key else "") + f": {first['msg'].removeprefix('Value error, ')}{got}"
        ) from None


def _check_name(section: str, name: str) -> None:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
        raise ValueError(f"{section}: {name!r} is not a usable name (lower-case letters, digits, - and _)")


def one_line(err: ValidationError, source: str) -> str:
    """The first problem of a failed validation as one line about `source`."""
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
        raise PipelineError(one_line(err, source)) from None


def load_params(path: str | Path) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: parameter file not found") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_params(raw, str(path))
