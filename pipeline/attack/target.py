"""What one attacker has against one upload, built once, and every reason it cannot attack it.

A `Victim` is an upload with the client's model rebuilt from its checkpoint: read and
hash-checked once per upload, whichever attackers (adaptive, classic) and however many
restarts then attack it. A `Target` is that victim as one attacker sees it: the gradient, the
labels it recovers, and the client it models (its BatchNorm shards, its local steps, the
statistics of its prior). `Target.check` holds the refusals of a run: what the attack's
compiled step, its process split and its client model cannot do together.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.attack.bn_prior import statistics_from_buffers
from pipeline.attack.client_model import LocalSteps, Surrogate, step_groups
from pipeline.attack.labels import mean_prediction, recover_labels
from pipeline.checkpoints import load_checkpoint
from pipeline.client import step_parts
from pipeline.defenses import ModelledDefense
from pipeline.errors import PipelineError
from pipeline.nets import batchnorm_layers, bottleneck_left_out, bottlenecks, classifier_weight_name
from pipeline.sections import AttackParams
from pipeline.uploads import ThreatModel, Upload, check_fits, load_upload


@dataclass
class Victim:
    """One upload, and the client's model rebuilt from the checkpoint it names (its exact
    architecture: maxpool kernel, GroupNorm, dropout), in the client's mode (train or eval)."""

    path: Path
    upload: Upload
    model: nn.Module

    @property
    def threat_model(self) -> ThreatModel:
        return self.upload.threat_model

    @classmethod
    def load(cls, path: Path) -> Victim:
        upload = load_upload(path)
        tm = upload.threat_model
        model, _ = load_checkpoint(Path(tm.checkpoint), expect={"sha256": tm.checkpoint_sha256, **tm.arch_meta})
        check_fits(path, upload, model)
        return cls(path, upload, model.train(tm.mode == "train"))


def pixel_box(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of the [0, 1] pixel range in normalised space, shaped [1, C, 1, 1]."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (0 - m) / s, (1 - m) / s


@dataclass
class Target:
    """What the attacker inverts: the gradient of a batch of len(labels) images of
    `image_shape` (normalised by mean and std) at `model`, as the client it models computed it."""

    model: nn.Module  # in the client's mode; invert works on a copy
    gradients: dict[str, torch.Tensor]
    labels: torch.Tensor
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    shards: int = 1  # groups the modelled client normalises apart (asynchronous BatchNorm: W)
    bn_statistics: dict[str, torch.Tensor] | None = None  # the prior's reference; None: running statistics
    local_steps: LocalSteps | None = None  # the client's E > 1 steps, unrolled
    source: str = "the upload"  # what refusals name
    defense: ModelledDefense | None = None  # the client's post-processing, applied to the dummy upload
    surrogate: Surrogate | None = None  # the client's E > 1 steps as SME's surrogate, in place of local_steps

    @property
    def box(self) -> tuple[torch.Tensor, torch.Tensor]:
        return pixel_box(self.mean, self.std)

    @classmethod
    def of(cls, victim: Victim, a: AttackParams) -> Target:
        """The victim as attacker `a` sees it. An attacker who knows the protocol
        (client_model: exact) normalises its dummy shards as the client's asynchronous BatchNorm
        did, and takes the client's local steps on the same parts of its dummy batch (or, with
        local_steps_model: sme, matches SME's surrogate gradient in their place)."""
        tm, where = victim.threat_model, str(victim.path)
        try:
            shards, parts = modelled_client(tm, a)
        except PipelineError as err:
            raise PipelineError(f"{where}: {err}") from None
        local_steps, surrogate = None, None
        if parts is not None and a.local_steps_model == "sme":
            surrogate = Surrogate(tm.lr, tm.local_steps, [g for step in parts for g in step_groups(step, shards > 1)])
        elif parts is not None:
            local_steps = LocalSteps(parts, separate=shards > 1, lr=tm.lr)
        model = bottleneck_left_out(victim.model) if a.client_model == "exact" else victim.model
        return cls(
            model,
            victim.upload.gradients,
            _labels(a, victim),
            tm.image_shape,
            tm.mean,
            tm.std,
            shards,
            _statistics(a, victim),
            local_steps,
            where,
            modelled_defense(tm, a, victim.upload.gradients, model),
            surrogate,
        )

    def to(self, device: torch.device) -> Target:
        """This target with its model, gradient, labels and statistics on `device` (a copy where it moves)."""

        def there(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.to(device) for k, v in tensors.items()}

        here = next(self.model.parameters()).device == device
        return dataclasses.replace(
            self,
            model=self.model if here else copy.deepcopy(self.model).to(device),  # the victim's stays where it is
            gradients=there(self.gradients),
            labels=self.labels.to(device),
            bn_statistics=None if self.bn_statistics is None else there(self.bn_statistics),
            defense=None if self.defense is None else self.defense.to(device),
        )

    def check(self, a: AttackParams, processes: int = 1) -> None:
        """Refuse an attack `a` cannot run on this target: the compiled step with what it does not
        take, or a dummy batch split over `processes` (split: batch) that would not compute the
        one-process objective."""
        # params.yaml's attack is refused these at parsing; an AttackParams made in code is refused here
        if a.compile and (a.bn_prior or self.local_steps is not None or self.surrogate is not None):
            raise PipelineError(
                f"{self.source}: attack.compile: the compiled step takes neither the BatchNorm prior nor "
                "the client's modelled local steps (compile: false, or client_model: plain)"
            )
        if a.compile and bottlenecks(self.model):
            raise PipelineError(
                f"{self.source}: attack.compile: the compiled step leaves out a bottleneck's KL term (PRECODE); "
                "use compile: false"
            )
        if a.compile and self.defense is not None:
            raise PipelineError(
                f"{self.source}: attack.compile: the compiled step does not apply the client's defense to "
                "its dummy upload (compile: false, or client_model: plain)"
            )
        batch = len(self.labels)
        if batch % self.shards:
            raise PipelineError(f"{self.source}: a batch of {batch} does not split into {self.shards} shards")
        if a.split != "batch" or processes == 1:
            return
        problem = None
        if self.local_steps is not None:
            problem = (
                "unrolled local steps train on parts of the whole dummy batch (use split: jobs, or client_model: plain)"
            )
        elif self.surrogate is not None:
            problem = "SME's surrogate is the gradient of the whole dummy batch (use split: jobs)"
        elif self.defense is not None:
            problem = "the client's defense acts on the whole batch's upload (use split: jobs, or client_model: plain)"
        elif batch % processes:
            problem = f"a dummy batch of {batch} does not split over {processes} processes"
        elif a.bn_prior:
            problem = "the BatchNorm prior needs the whole dummy batch's statistics: it cannot split over processes"
        elif any(m.training for _, m in batchnorm_layers(self.model)) and self.shards % processes:
            problem = (
                f"train-mode BatchNorm normalises {self.shards} shard(s) of the batch together: "
                f"the batch cannot split over {processes} processes"
            )
        if problem:
            raise PipelineError(f"{self.source}: attack.split batch: {problem}")


def modelled_client(tm: ThreatModel, a: AttackParams) -> tuple[int, list[list[torch.Tensor]] | None]:
    """The client attacker `a` models: the shards its BatchNorm normalises apart, and the dummy
    positions each of its local steps trains on (None: one step). The classic attacker (plain)
    models one full-batch gradient; the adaptive one (exact), what the threat model states."""
    if a.client_model != "exact":
        return 1, None
    shards = tm.participants if tm.bn == "async" and tm.mode == "train" else 1
    if tm.local_steps == 1:
        return shards, None
    try:
        return shards, step_parts(tm.batch_size, tm.participants, tm.local_steps)
    except PipelineError as err:
        raise PipelineError(f"the threat model's local steps: {err}") from None


def applies_defense(tm: ThreatModel, a: AttackParams) -> bool:
    """Whether attacker `a` applies the client's defense: the adaptive one (exact) applies the one
    the threat model states; the classic one ignores it."""
    return a.client_model == "exact" and tm.defense is not None


def leaves_bottleneck_out(tm: ThreatModel, a: AttackParams) -> bool:
    """Whether attacker `a` leaves a PRECODE block, and what follows it, out of the match
    (pipeline.nets.bottleneck_left_out): the adaptive one does; the classic one attacks the whole
    model, its noise drawn by itself."""
    return a.client_model == "exact" and tm.bottleneck is not None


def modelled_defense(
    tm: ThreatModel, a: AttackParams, upload: dict[str, torch.Tensor], model: nn.Module
) -> ModelledDefense | None:
    """The client's defense as attacker `a` applies it to its dummy upload of `model`'s trainable
    parameters (None: it does not)."""
    if not applies_defense(tm, a) or tm.defense is None:
        return None
    return ModelledDefense(
        tm.defense,
        upload,
        model,
        a.sign_temperature,
        bound_known=a.clip_bound == "stated",
        pruning=a.pruning_model,
    )


def adapts(tm: ThreatModel, a: AttackParams) -> bool:
    """Whether attacker `a` models this upload's client otherwise than the classic attacker."""
    shards, parts = modelled_client(tm, a)
    return shards > 1 or parts is not None or applies_defense(tm, a) or leaves_bottleneck_out(tm, a)


def _labels(a: AttackParams, victim: Victim) -> torch.Tensor:
    upload, model = victim.upload, victim.model
    tm, weight = upload.threat_model, classifier_weight_name(model)
    bias, mean_probs = None, None
    if a.labels == "counts":
        bias = upload.gradients.get(weight.removesuffix("weight") + "bias")
        mean_probs = mean_prediction(model, tm.image_shape, *pixel_box(tm.mean, tm.std))
    return recover_labels(a.labels, upload.gradients[weight], tm.batch_size, upload.labels, bias, mean_probs)


def _statistics(a: AttackParams, victim: Victim) -> dict[str, torch.Tensor] | None:
    """The BatchNorm prior's reference: None for the model's running statistics."""
    upload, model, tm = victim.upload, victim.model, victim.threat_model
    if not a.bn_prior or not batchnorm_layers(model) or a.bn_statistics == "running":
        return None
    if a.bn_statistics == "exact":
        if not upload.bn_statistics:
            raise PipelineError(
                f"{victim.path}: attack.bn_statistics 'exact', but the upload reveals no BatchNorm "
                "statistics (extract it again with extract.reveal_bn_statistics: true)"
            )
        return upload.bn_statistics
    if not upload.bn_buffers or tm.bn_momentum is None:
        raise PipelineError(
            f"{victim.path}: attack.bn_statistics 'from-buffers', but the upload carries no BatchNorm "
            "buffers and momentum (extract it again with client.upload_buffers: true)"
        )
    try:
        return statistics_from_buffers(
            model, upload.bn_buffers, tm.bn_momentum, tm.local_steps, tm.step_images, tm.image_shape
        )
    except ValueError as err:
        raise PipelineError(f"{victim.path}: attack.bn_statistics 'from-buffers': {err}") from None
