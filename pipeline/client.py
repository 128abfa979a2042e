"""The federated client: which images it holds and the update it uploads (docs/schemes-and-settings.md).

A client holds B images, split into W contiguous participant shards (data-parallel
workers). It takes E local SGD steps, step e on the e-th 1/E of every shard; each step's
gradient is what DDP computes: the average over participants of their mean losses, with
BatchNorm statistics of the whole step batch (`sync`) or of each shard (`async`). The upload
is (theta_0 - theta_E) / (lr * E), the average of the E step gradients; it is computed as that
average, which is the same number without the cancellation of subtracting nearly equal
weights. Optional DP: per-sample clipping and noise on every step (a real guarantee), or the
original's clipping of each step's batch gradient with noise added once to the upload; or a
defense of the field applied to the upload (pipeline.defenses).
The client also records the statistics each BatchNorm layer normalised with, per step and
normalisation group: what an attacker's "exact" BatchNorm prior is given when the threat model
reveals them.

Participants run simulated in one process or as W real processes (Lightning Fabric, gloo on
CPU); both give the same upload. Dropout masks depend only on (seed, step, sample), so they
agree however the batch is split.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from pipeline.defenses import defended
from pipeline.dp import add_noise, client_epsilon, clip_and_sum, clip_whole
from pipeline.errors import PipelineError
from pipeline.nets import (
    VariationalBottleneck,
    batchnorm_layers,
    bottlenecks,
    running_statistics,
    smallest_batchnorm_input,
    take_penalty,
)
from pipeline.parallel import worker_fabric
from pipeline.sections import ClientParams, SoteriaParams
from pipeline.seeds import Draw, generator
from pipeline.uploads import ClientUpdate, joined, split


def step_parts(batch_size: int, participants: int, local_steps: int) -> list[list[torch.Tensor]]:
    """parts[e][w]: the batch positions participant w trains on at local step e."""
    shard = batch_size // participants
    chunk = shard // local_steps
    if participants * shard != batch_size or local_steps * chunk != shard:
        raise PipelineError(f"batch of {batch_size} does not split into {participants} shards x {local_steps} steps")
    return [
        [torch.arange(w * shard + e * chunk, w * shard + (e + 1) * chunk) for w in range(participants)]
        for e in range(local_steps)
    ]


def check_batchnorm_batch(model: nn.Module, c: ClientParams, in_channels: int, image_size: int) -> None:
    """Refuse a train-mode step that some BatchNorm would normalise from one value per channel."""
    if c.mode != "train":
        return
    group = c.batch_size // c.local_steps // (c.participants if c.bn == "async" else 1)
    if smallest_batchnorm_input(model, in_channels, image_size) * group == 1:
        raise PipelineError(
            f"mode 'train' normalises groups of {group} image(s): a BatchNorm layer of this model sees one value "
            f"per channel at {image_size} px; use mode: eval, a larger batch or a larger data.image_size"
        )


class SeededDropout(nn.Module):
    """Dropout whose mask for each sample is drawn from (seed, step, sample position, layer)."""

    def __init__(self, p: float, layer: int):
        super().__init__()
        self.p, self.layer = p, layer
        self.key: tuple[int, int] = (0, 0)
        self.positions: torch.Tensor | None = None  # batch positions of the rows being forwarded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.positions is None or len(self.positions) != len(x):
            raise RuntimeError("SeededDropout needs the batch positions of its input")
        keep = torch.stack(
            [
                torch.rand(x.shape[1:], generator=generator(Draw.CLIENT_DROPOUT, *self.key, int(i), self.layer))
                >= self.p
                for i in self.positions
            ]
        )
        return x * keep / (1 - self.p)


def client_model(model: nn.Module, mode: str) -> nn.Module:
    """A copy of `model` in the client's mode, its dropout seeded per sample; the caller's model
    (and its BatchNorm running statistics) is never touched."""
    model = copy.deepcopy(model)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Dropout)]
    for index, (name, m) in enumerate(layers):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, SeededDropout(m.p, index))
    return model.train(mode == "train")


@contextmanager
def _feeding(model: nn.Module, positions: torch.Tensor, key: tuple[int, int]) -> Iterator[None]:
    """The draws of a forward of the batch `positions` at local step key[1], each sample's from
    (seed, step, its position): dropout's masks and a bottleneck's noise, so that a sample draws
    alike in whichever group or process forwards it."""
    for m in model.modules():
        if isinstance(m, SeededDropout):
            m.positions, m.key = positions, key
        elif isinstance(m, VariationalBottleneck):
            m.row_generators = [generator(Draw.CLIENT_BOTTLENECK, *key, int(i)) for i in positions]
    try:
        yield
    finally:
        for m in model.modules():
            if isinstance(m, SeededDropout):
                m.positions = None
            elif isinstance(m, VariationalBottleneck):
                m.row_generators = None


def _has_train_batchnorm(model: nn.Module) -> bool:
    return any(m.training for _, m in batchnorm_layers(model))


Grads = dict[str, torch.Tensor]


class NormalisationStatistics:
    """Per BatchNorm layer, the statistics it normalised with on each local step and group: in
    train mode the mean and biased variance of its input over the group, in eval mode its
    running statistics. Kept as float64 sums (count, sum, sum of squares) until `finish`, so
    that the parts of one group forwarded by several processes add up."""

    def __init__(self, model: nn.Module, steps: int, groups: int):
        self.shape, self.at = (steps, groups), (0, 0)  # `at`: (step, group) being forwarded
        self.sums: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in batchnorm_layers(model)]

    def _hook(self, name: str):
        def add(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().double()
            channels = x.shape[1]
            assert isinstance(module, nn.modules.batchnorm._BatchNorm)
            if module.training or module.running_mean is None:
                count = torch.full((channels,), x.numel() / channels, dtype=torch.float64)
                dims = [0, *range(2, x.dim())]
                sums = torch.stack([count, x.sum(dims), (x * x).sum(dims)])
            else:  # one "sample" of the running statistics per forward: they come back as they are
                mean, var = (s.double() for s in running_statistics(module))
                sums = torch.stack([torch.ones_like(mean), mean, var + mean * mean])
            if name not in self.sums:
                self.sums[name] = torch.zeros(*self.shape, 3, channels, dtype=torch.float64)
            self.sums[name][self.at] += sums

        return add

    def finish(self, reduce: Callable[[Grads], Grads]) -> dict[str, torch.Tensor]:
        """Mean and biased variance per layer, [steps, groups, C], summed over processes by `reduce`."""
        for handle in self.handles:
            handle.remove()
        out = {}
        for name, sums in reduce(self.sums).items():
            mean = sums[:, :, 1] / sums[:, :, 0]
            out[f"{name}.mean"] = mean.float()
            out[f"{name}.var"] = (sums[:, :, 2] / sums[:, :, 0] - mean * mean).clamp_min(0).float()
        return out


def normalisation_groups(c: ClientParams) -> int:
    """How many sets of BatchNorm statistics normalise one local step: one for synchronous BN
    (and for eval mode, whose running statistics serve every sample), W for asynchronous."""
    return 1 if c.bn == "sync" or c.mode == "eval" else c.participants


def _run_client(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    c: ClientParams,
    seed: int,
    my_groups: Callable[[list[torch.Tensor]], list[tuple[int, torch.Tensor]]],
    reduce: Callable[[Grads], Grads],
) -> tuple[Grads, dict[str, torch.Tensor]]:
    """The E local steps of the client, seen from one process: (upload, BatchNorm statistics).

    `my_groups` maps a step's participant parts to the (group, positions) this process
    forwards, each group normalised on its own (group 0 alone when BatchNorm is synchronous);
    `reduce` sums tensors over processes.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if c.dp is not None and c.dp.kind == "per-sample" and _has_train_batchnorm(model):
        raise PipelineError("per-sample DP cannot run through train-mode BatchNorm, which ties the samples together")
    if c.dp is not None and c.dp.kind == "per-sample" and bottlenecks(model):
        raise PipelineError("per-sample DP leaves out a bottleneck's KL term (PRECODE): use a model without one")
    # Soteria's mask is taken at theta_0; copied before the statistics' hooks, which it must not feed
    start = copy.deepcopy(model) if isinstance(c.defense, SoteriaParams) else None
    statistics = NormalisationStatistics(model, c.local_steps, normalisation_groups(c))
    steps: list[Grads] = []
    for e, parts in enumerate(step_parts(c.batch_size, c.participants, c.local_steps)):
        n_step = sum(len(p) for p in parts)
        key = (seed, e)
        if c.dp is not None and c.dp.kind == "per-sample":
            rows = []
            for g, group in my_groups(parts):
                statistics.at = (e, g)
                for i in group.tolist():
                    with _feeding(model, torch.tensor([i]), key):
                        loss = F.cross_entropy(model(images[i : i + 1]), labels[i : i + 1])
                    rows.append(torch.autograd.grad(loss, params))
            per_sample = {n: torch.stack([r[k] for r in rows]) for k, (n, _) in enumerate(named)}
            summed = reduce(clip_and_sum(per_sample, c.dp.clip)[0])
            noise = generator(Draw.CLIENT_DP_NOISE, seed, e)
            grads = {n: g / n_step for n, g in add_noise(summed, c.dp.sigma * c.dp.clip, noise).items()}
        else:
            loss = torch.zeros(())
            for g, group in my_groups(parts):
                statistics.at = (e, g)
                with _feeding(model, group, key):
                    loss = loss + F.cross_entropy(model(images[group]), labels[group], reduction="sum")
                    loss = loss + len(group) * take_penalty(model)  # PRECODE's KL term, a mean per image
            local = torch.autograd.grad(loss / n_step, params)
            grads = reduce({n: g for (n, _), g in zip(named, local)})
            if c.dp is not None:  # the original's: each step's batch gradient clipped as a whole
                grads = clip_whole(grads, c.dp.clip)
        steps.append(grads)
        with torch.no_grad():
            for n, p in named:
                p.sub_(c.lr * grads[n])
    upload = {n: torch.stack([s[n] for s in steps]).mean(0) for n, _ in named}
    if c.dp is not None and c.dp.kind == "batch":  # ... and noise added once, to the upload
        upload = add_noise(upload, c.dp.sigma * c.dp.clip, generator(Draw.UPLOAD_NOISE, seed))
    if c.defense is not None:  # on the reduced upload, alike in every process
        if start is None:
            upload = defended(upload, c.defense)
        else:  # one participant, one step (config): the step's forward, its dropout drawn alike
            with _feeding(start, torch.arange(len(images)), (seed, 0)):
                upload = defended(upload, c.defense, start, images)
    return upload, statistics.finish(reduce)


def _client_epsilon(c: ClientParams) -> float | None:
    if c.dp is None or c.dp.kind != "per-sample":
        return None
    assert c.dp.delta is not None  # per-sample DP has one (pipeline.config)
    return client_epsilon(c.dp.sigma, c.dp.delta)[0]


def simulate_client(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, c: ClientParams, seed: int
) -> ClientUpdate:
    """The client's upload with all W participants simulated in this process."""
    model = client_model(model, c.mode)

    def my_groups(parts: list[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
        return [(0, torch.cat(parts))] if normalisation_groups(c) == 1 else list(enumerate(parts))

    upload, statistics = _run_client(model, images, labels, c, seed, my_groups, lambda g: g)
    return ClientUpdate(upload, _client_epsilon(c), statistics, running_buffers(model) if c.upload_buffers else {})


def running_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each BatchNorm layer's running statistics as they stand: after the client's steps, what a
    FedAvg client sends beside its weights. (Its train-mode forwards updated them by PyTorch's
    rule: r <- (1 - m) r + m s, s the batch mean and unbiased variance of the step.)"""
    return {
        f"{name}.{kind}": getattr(m, kind).detach().clone()
        for name, m in batchnorm_layers(model)
        if m.running_mean is not None
        for kind in ("running_mean", "running_var")
    }


def _participant(
    fabric, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, c: ClientParams, seed: int, out: str
) -> None:
    """One participant process: its own parts, BatchNorm synced across processes when `sync`."""
    from pipeline.bn import CrossProcessSyncBatchNorm

    model = client_model(model, c.mode)
    if c.bn == "sync":
        model = CrossProcessSyncBatchNorm().apply(model)
    rank = fabric.global_rank

    def reduce(grads: Grads) -> Grads:
        return {n: fabric.all_reduce(g, reduce_op="sum") for n, g in grads.items()}

    def my_groups(parts: list[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
        return [(0 if normalisation_groups(c) == 1 else rank, parts[rank])]

    grads, statistics = _run_client(model, images, labels, c, seed, my_groups, reduce)
    # Handed back as a file: Lightning joins the processes before it reads their results, so a
    # large result in its queue would block, and tensors in it would share memory with a
    # process that has exited.
    if rank == 0:
        save_file(joined({n: g.contiguous() for n, g in grads.items()}, statistics), out)


def client_upload(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, c: ClientParams, seed: int
) -> ClientUpdate:
    """The client's upload, its participants simulated or run as real processes as `c` says."""
    if c.participants_as == "simulated" or c.participants == 1:
        return simulate_client(model, images, labels, c, seed)
    fabric = worker_fabric(c.participants, "spawn")
    with tempfile.TemporaryDirectory() as folder:
        out = f"{folder}/upload.safetensors"
        fabric.launch(_participant, model, images, labels, c, seed, out)  # type: ignore[arg-type]  # *args are passed on
        gradients, statistics, _ = split(load_file(out))
    return ClientUpdate(gradients, _client_epsilon(c), statistics, {})  # upload_buffers: simulated only (config)


def plain(c: ClientParams) -> ClientParams:
    """The client an attacker models by default: `c`'s batch, mode, step size and label
    repetition, as the plain client (ClientParams.plain) runs them."""
    return ClientParams.plain(c.batch_size, c.mode, c.lr).model_copy(update={"label_repetition": c.label_repetition})


def information_ratio(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mode: str, seed: int
) -> torch.Tensor:
    """GIR (%) of each of the client's samples at the checkpoint, in the client's mode, with the
    dropout masks of its first step; computed on a copy, so running statistics stay as they were."""
    from pipeline.metrics import gradient_information_ratio

    model = client_model(model, mode)
    with _feeding(model, torch.arange(len(labels)), (seed, 0)):
        return gradient_information_ratio(model, images, labels)


def batch_gradient(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mode: Literal["train", "eval"], seed: int = 0
) -> Grads:
    """The plain client's upload: the gradient of the batch's mean loss at the model's weights."""
    c = ClientParams.plain(len(labels), mode)
    return simulate_client(model, images, labels, c, seed).gradients
