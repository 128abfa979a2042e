"""The BatchNorm prior: how far the dummy batch's per-layer statistics lie from a reference (the
model's running statistics, those the client revealed, or those derived from its uploaded buffers)."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from pipeline.nets import batchnorm_layers, input_shapes, running_statistics


class BatchNormPrior:
    """Sum over BatchNorm layers of ||mu_ref - mu(x)|| + ||var_ref - var(x)||, averaged over the
    dummy batch's `shards` (each forwarded on its own): mu and var the biased statistics of the
    layer's input over a shard. The references are the model's running statistics as they were
    at the start, or, given `statistics` (an upload's, see pipeline.uploads), those the client
    normalised with, pooled to the attacker's shards: exact for one local step; with several,
    each step's were taken at other weights and their pool is an approximation."""

    def __init__(self, model: nn.Module, shards: int, statistics: dict[str, torch.Tensor] | None = None):
        layers = batchnorm_layers(model)
        if statistics is None:
            layers = [(n, m) for n, m in layers if m.running_mean is not None]
            self.reference = [
                (mean.clone().expand(shards, -1), var.clone().expand(shards, -1))
                for mean, var in (running_statistics(m) for _, m in layers)
            ]
        else:
            self.reference = [pooled_statistics(statistics, n, m.num_features, shards) for n, m in layers]
        self.terms: list[torch.Tensor] = []
        self.calls = [0] * len(layers)  # forwards through each layer since the last take: the shard
        self.shards = shards
        self.handles = [m.register_forward_pre_hook(self._hook(i)) for i, (_, m) in enumerate(layers)]

    def _hook(self, i: int):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            dims = [0, *range(2, x.dim())]
            mean, var = (r[self.calls[i] % self.shards] for r in self.reference[i])  # the step's shard
            self.calls[i] += 1
            self.terms.append((mean - x.mean(dims)).norm() + (var - x.var(dims, unbiased=False)).norm())

        return record

    def take(self) -> torch.Tensor:
        """The prior of the forward passes since the last call."""
        # averaged over the shards of every local step the attacker modelled
        total = torch.stack(self.terms).sum() / self.calls[0] if self.terms else torch.zeros(())
        self.terms, self.calls = [], [0] * len(self.calls)
        return total

    def __len__(self) -> int:
        return len(self.reference)


def pooled_statistics(
    statistics: dict[str, torch.Tensor], layer: str, channels: int, shards: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's revealed (mean, biased variance), [steps, groups, C], pooled over the steps and
    over runs of consecutive groups into `shards` rows, as if each run had been one batch (the
    groups are equal in size)."""
    if f"{layer}.mean" not in statistics or f"{layer}.var" not in statistics:
        raise ValueError(f"the upload reveals no statistics for BatchNorm layer {layer!r}")
    mean, var = statistics[f"{layer}.mean"].double(), statistics[f"{layer}.var"].double()
    if mean.dim() != 3 or mean.shape != var.shape or mean.shape[2] != channels or mean.shape[1] % shards:
        raise ValueError(
            f"the statistics of BatchNorm layer {layer!r} have shape {tuple(mean.shape)}: "
            f"expected [steps, groups, {channels}] with groups a multiple of {shards} shards"
        )
    steps, groups, _ = mean.shape
    mean = mean.reshape(steps, shards, groups // shards, channels)
    square = var.reshape_as(mean) + mean * mean
    pooled_mean = mean.mean((0, 2))
    return pooled_mean.float(), (square.mean((0, 2)) - pooled_mean * pooled_mean).clamp_min(0).float()


def statistics_from_buffers(
    model: nn.Module,
    buffers: dict[str, torch.Tensor],
    momentum: float,
    steps: int,
    step_images: int,
    image_shape: tuple[int, ...],
) -> dict[str, torch.Tensor]:
    """What each BatchNorm layer normalised with, derived from its running statistics before the
    client's update (`model`'s) and after it (`buffers`, uploaded), in the format of revealed
    statistics ([1 step, 1 group, C]).

    One train-mode step moves r to (1 - m) r + m s, with s the step's batch mean and unbiased
    variance over its n values per channel; so s = (r_after - (1 - m) r_before) / m, and the
    biased variance the layer normalised with is (n - 1) / n of it. After E steps the same rule
    with k = (1 - m)^E, s = (r_after - k r_before) / (1 - k), is the steps' statistics averaged
    with weights (1 - m)^(E - 1 - e): exact for one step; for several, a weighted mean of
    statistics each taken at other weights (as the revealed ones pooled over steps are)."""
    shapes = input_shapes(model, nn.modules.batchnorm._BatchNorm, image_shape)
    kept = (1 - momentum) ** steps
    out = {}
    for name, m in batchnorm_layers(model):
        if m.running_mean is None:
            continue
        before = running_statistics(m)
        after = [buffers.get(f"{name}.{kind}") for kind in ("running_mean", "running_var")]
        if not all(b is not None and b.shape == before[0].shape for b in after):
            raise ValueError(f"the upload carries no running statistics of BatchNorm layer {name!r} of its shape")
        mean, unbiased = (
            (cast(torch.Tensor, b).double() - kept * r.double()) / (1 - kept) for b, r in zip(after, before)
        )
        n = step_images * shapes[name][1:].numel()
        out[f"{name}.mean"] = mean.float().view(1, 1, -1)
        out[f"{name}.var"] = (unbiased * (n - 1) / n).clamp_min(0).float().view(1, 1, -1)
    return out
