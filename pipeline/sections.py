"""The parameter sections of params.yaml, each a typed, validated record: the data, the model,
training and its defense schemes, the client and its settings, the attack and its tuning,
evaluation and the report. Rules across sections are pipeline.config's."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    # optimizer steps after which a checkpoint is written besides every epoch's: where the leak dies
    checkpoint_steps: list[Annotated[int, Field(ge=1)]]

    @model_validator(mode="after")
    def _steps(self) -> TrainParams:
        if len(set(self.checkpoint_steps)) != len(self.checkpoint_steps):
            raise ValueError("checkpoint_steps: a step is listed twice")
        return self


class DPParams(_Section):
    # per-sample: DP-SGD (clip each sample's gradient, Poisson batches, epsilon by the tighter of
    # the RDP and PRV accountants). batch: the original's "DP-SGD", the batch gradient clipped: no guarantee.
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


class PruningParams(_Section):
    """Magnitude pruning: the `ratio` smallest entries (by absolute value) of every tensor of the
    upload zeroed (GradAttack's p = 0.9, Plato's 80 %)."""

    kind: Literal["prune"]
    ratio: float = Field(gt=0, lt=1)


class ClippingParams(_Section):
    """Norm clipping without noise: the whole upload (global) or each of its parameter tensors
    (per-tensor) scaled to a norm of at most `bound` (GGL's and GIFD's C = 4, global)."""

    kind: Literal["clip"]
    bound: float = Field(gt=0)
    scope: Literal["global", "per-tensor"]


class SignParams(_Section):
    """Sign quantisation: every entry of the upload replaced by its sign (signSGD)."""

    kind: Literal["sign"]


class SoteriaParams(_Section):
    """Soteria (Sun et al., CVPR'21): the classifier's weight gradient pruned, column by column, for
    the `percentile` % of representation entries with the smallest summed ||dr/dx|| / (r + 0.1)."""

    kind: Literal["soteria"]
    percentile: float = Field(gt=0, lt=100)


# what a client does to its upload before sending it (pipeline.defenses)
DefenseParams = Annotated[PruningParams | ClippingParams | SignParams | SoteriaParams, Field(discriminator="kind")]


class BottleneckParams(_Section):
    """PRECODE (Scheliga et al., WACV'22): a variational bottleneck of `size` Gaussian codes before
    the classifier, trained with `beta` times its KL divergence from N(0, 1) added to the loss."""

    size: int = Field(ge=1)
    beta: float = Field(ge=0)


class SchemeParams(_Section):
    """One defense scheme: how its model is normalised and trained."""

    # batch-sync: BatchNorm over the global batch; batch-async: each process its own shard;
    # group: GroupNorm (no batch statistics, as per-sample clipping needs).
    norm: Literal["batch-sync", "batch-async", "group"]
    batch_multiplier: int = Field(ge=1)  # the scheme's global batch is train.batch_size times this
    maxpool_kernel: Annotated[int, Field(ge=2)] | Literal["auto"] | None  # ResNet-18's stem maxpool (RA defense)
    dp: DPParams | None
    # applied to every step's gradient, averaged over the processes, before the optimizer takes it:
    # every client of the federation defends every round, so its accuracy cost is trained in
    defense: DefenseParams | None
    # Optional, so the schemes written before them keep their parameters, and their outputs their bytes:
    bottleneck: BottleneckParams | None = None  # PRECODE's block before the classifier (a model variant)
    lr: float | None = Field(default=None, gt=0)  # this scheme's SGD step size in place of train.lr

    @model_validator(mode="after")
    def _consistent(self) -> SchemeParams:
        if self.dp is not None and self.dp.kind == "per-sample" and self.norm != "group":
            raise ValueError("per-sample DP needs norm: group (BatchNorm ties the samples of a batch together)")
        if self.defense is not None and self.dp is not None:
            raise ValueError("defense and dp: one post-processing of the gradient at a time (DP clips already)")
        if self.bottleneck is not None and self.dp is not None and self.dp.kind == "per-sample":
            raise ValueError("bottleneck and per-sample dp: DP-SGD's per-sample gradients leave out the KL term")
        if isinstance(self.defense, SoteriaParams):
            raise ValueError(
                "defense soteria trains no scheme: its mask takes one backward per representation entry at "
                "every step (docs/defenses.md); use it as a client setting's defense"
            )
        return self


class ExtractParams(_Section):
    # checkpoints every setting's client uploads from: after these epochs, and after these
    # optimizer steps (each one of train.checkpoint_steps)
    epochs: list[Annotated[int, Field(ge=0)]]
    steps: list[Annotated[int, Field(ge=1)]]
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


class ClientProtocol(_Section):
    """What a federated client does with its batch before uploading, as it states it to the
    server: the protocol part of every upload's threat model (docs/schemes-and-settings.md)."""

    batch_size: int = Field(ge=1)
    participants: int = Field(ge=1)  # W: the batch is split into W contiguous shards
    bn: Literal["sync", "async"]  # BatchNorm statistics of the whole batch, or of each shard
    local_steps: int = Field(ge=1)  # E: the upload is (theta_0 - theta_E) / (lr * E)
    lr: float = Field(gt=0)  # the local SGD step size
    mode: Literal["train", "eval"]  # train: batch statistics and dropout on; eval: running statistics
    dp: ClientDPParams | None
    label_repetition: Annotated[int, Field(ge=1)] | None  # k: the batch holds k classes x B/k images each
    # the upload carries the BatchNorm running statistics after the update, as FedAvg sends the whole state
    upload_buffers: bool
    # what the client does to its update before sending it (pipeline.defenses); None: nothing
    defense: DefenseParams | None = None


class ClientParams(ClientProtocol):
    """A client setting: its protocol, and how its participants run here."""

    participants_as: Literal["simulated", "processes"]  # one process, or W real (Lightning Fabric) ones

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
        if self.defense is not None and self.dp is not None:
            raise ValueError("defense and dp: one post-processing of the update at a time (DP clips already)")
        if isinstance(self.defense, SoteriaParams) and (w > 1 or e > 1):
            raise ValueError(
                "defense soteria: its mask is of one gradient of the whole batch (participants: 1, local_steps: 1)"
            )
        return self

    @classmethod
    def plain(cls, batch_size: int, mode: Literal["train", "eval"] = "train", lr: float = 1.0) -> ClientParams:
        """The plain client, the one the classic attacker models: one participant, one local
        step, BatchNorm over the whole batch, no DP, the gradient alone uploaded."""
        return cls(
            batch_size=batch_size,
            participants=1,
            bn="sync",
            local_steps=1,
            lr=lr,
            mode=mode,
            dp=None,
            label_repetition=None,
            participants_as="simulated",
            upload_buffers=False,
        )


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
    # how the adaptive attacker models E > 1 local steps: unrolled (the client's steps taken on the
    # dummy batch) | sme (SME's surrogate, Li et al. ICML'23: one full-batch gradient at
    # theta_0 + alpha (theta_E - theta_0), alpha learned with the images)
    local_steps_model: Literal["unrolled", "sme"]
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
    # mlco: E2EGI's image-by-image combination of them (pipeline.attack.restarts.min_loss_combination)
    combine: Literal["best", "mlco"]
    # fixed: these values; tuned: lr, tv_weight, ... as tune@<setting> chose them on the attacker's
    # own surrogate uploads (tuning/<setting>.json; the classic attacker keeps the fixed ones)
    hyperparameters: Literal["fixed", "tuned"]
    # a signed upload (defense sign) as the adaptive attacker models it: tanh(g / tau), tau this
    # times each tensor's RMS (pipeline.defenses.relaxed_sign)
    sign_temperature: float = Field(gt=0)
    # a clipped upload's bound: stated (the threat model's) | estimated (from the upload, as GGL does)
    clip_bound: Literal["stated", "estimated"]
    # a pruned upload as the adaptive attacker models it: magnitude (the client's pruning applied to
    # its dummy upload at the stated ratio) | mask (GIFD's: the upload's zeros kept out of the match)
    pruning_model: Literal["magnitude", "mask"]


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
    batches: int = Field(ge=1)  # surrogate client batches, attacked at every extracted checkpoint
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

    @model_validator(mode="after")
    def _levels(self) -> ReportParams:
        if self.power <= self.alpha:
            raise ValueError(f"power {self.power} at level alpha {self.alpha}: a test's power exceeds its level")
        return self


def pairs_with(client: ClientParams, baseline_client: ClientParams) -> bool:
    """Whether a setting's trials draw the baseline's images: same batch size, no label repetition
    (a repeated-label batch is chosen class by class, other images by construction)."""
    return (
        client.batch_size == baseline_client.batch_size
        and client.label_repetition is None
        and baseline_client.label_repetition is None
    )


def trains_like(client: ClientParams, baseline_client: ClientParams) -> bool:
    """Whether a setting's client trains as the baseline's does: the same protocol but for what only
    the upload carries (its BatchNorm buffers) and how its participants run here. A setting on the
    baseline's scheme whose client does not was never trained under: its accuracy cost is not
    measured (in federated learning every client applies the defense at every round)."""
    upload_only = {"upload_buffers", "participants_as"}
    return client.model_dump(exclude=upload_only) == baseline_client.model_dump(exclude=upload_only)
