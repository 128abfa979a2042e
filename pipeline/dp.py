"""Differentially private SGD: per-sample clipping, Gaussian noise, Poisson sampling, accounting.

`dp_gradient` is one DP-SGD step's gradient (Abadi et al. 2016): each sample's gradient is
clipped to norm C, the clipped gradients are summed, N(0, (sigma*C)^2) noise is added and
the sum is divided by the expected batch size. Batches are Poisson samples (every example
joins a step with probability q), which is what the RDP accountant's guarantee assumes;
epsilon comes from Opacus' accountants (RDP, and PRV, the tighter here), not from our own arithmetic.

`batch_clip_noise_gradient` is what the original called DP-SGD: the batch gradient clipped
to C as a whole and noise added. It carries no privacy guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from pipeline.seeds import Draw, generator

PER_SAMPLE_METHODS = ("loop", "vmap")


def per_sample_method(choice: str, arch: str) -> str:
    """`auto`: torch.func's vmap on the small ConvNet, a loop of backward passes on the large
    models, where vmap's per-sample copies of the weights make it the slower (bench/per_sample.py;
    its figures in docs/benchmarks.md)."""
    if choice != "auto":
        return choice
    return "vmap" if arch == "convnet" else "loop"


def per_sample_gradients(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, method: str = "loop"
) -> dict[str, torch.Tensor]:
    """Gradient of each sample's loss, stacked on a leading batch axis, by parameter name.

    The model must not couple samples (no train-mode BatchNorm). `vmap` (torch.func) is the
    faster on small models, `loop` on ResNet-18 (bench/per_sample.py; docs/benchmarks.md).
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if method == "vmap":
        buffers = dict(model.named_buffers())

        def loss(p, x, y):
            return F.cross_entropy(functional_call(model, (p, buffers), (x[None],)), y[None])

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, images, labels)
    if method != "loop":
        raise ValueError(f"unknown per-sample method {method!r}")
    live = [p for n, p in model.named_parameters() if p.requires_grad]
    rows = [torch.autograd.grad(F.cross_entropy(model(x[None]), y[None]), live) for x, y in zip(images, labels)]
    return {n: torch.stack([row[i] for row in rows]) for i, n in enumerate(names)}


def clip_factors(norms: torch.Tensor, clip: float) -> torch.Tensor:
    """min(1, clip / norm) for each norm, differentiably: the scale that brings it to at most `clip`."""
    return (clip / (norms + 1e-6)).clamp(max=1.0)


def clip_and_sum(per_sample: dict[str, torch.Tensor], clip: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Sum over samples of each sample's gradient scaled to norm at most `clip`; also the norms."""
    norms = torch.sqrt(cast(torch.Tensor, sum(g.flatten(1).pow(2).sum(1) for g in per_sample.values())))
    factors = clip_factors(norms, clip)
    return {n: torch.einsum("b,b...->...", factors, g) for n, g in per_sample.items()}, norms


def add_noise(summed: dict[str, torch.Tensor], std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    # drawn on the CPU generator, then moved: the same noise whatever device trains
    return {
        n: g + std * torch.randn(g.shape, generator=generator, dtype=g.dtype).to(g.device) for n, g in summed.items()
    }


def dp_gradient(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    clip: float,
    sigma: float,
    expected_batch: float,
    generator: torch.Generator,
    method: str = "loop",
    noise_share: float = 1.0,
) -> dict[str, torch.Tensor]:
    """One DP-SGD gradient: (sum of clipped per-sample gradients + noise) / expected batch size.

    `noise_share` is this process's share of the noise variance when W processes each add
    their own and the results are averaged (1/W each: the sum carries the full sigma*C).
    """
    if len(labels):
        summed, _ = clip_and_sum(per_sample_gradients(model, images, labels, method), clip)
    else:  # an empty Poisson batch still takes a (pure-noise) step
        summed = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    noisy = add_noise(summed, sigma * clip * math.sqrt(noise_share), generator)
    return {n: g / expected_batch for n, g in noisy.items()}


def clip_whole(grads: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """The gradient of all parameters together scaled to L2 norm at most `clip`."""
    norm = torch.sqrt(cast(torch.Tensor, sum(g.pow(2).sum() for g in grads.values())))
    scale = min(1.0, clip / (float(norm) + 1e-6))
    return {n: g * scale for n, g in grads.items()}


def batch_clip_noise_gradient(
    grads: dict[str, torch.Tensor], clip: float, sigma: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The original's "DP-SGD": the whole batch gradient clipped to `clip`, N(0, (sigma*clip)^2) added."""
    return add_noise(clip_whole(grads, clip), sigma * clip, generator)


class PoissonBatches(torch.utils.data.Sampler[list[int]]):
    """Batches in which each of this process's examples appears independently with probability q.

    Examples are split over `world` processes (every `world`-th one); a step's batch is the
    union over processes, so every example joins a step with probability q. Each epoch has
    round(1/q) steps and its draws depend only on (seed, epoch, rank).
    """

    def __init__(self, size: int, rate: float, seed: int, rank: int = 0, world: int = 1):
        self.indices = torch.arange(rank, size, world)
        self.rate, self.seed, self.rank, self.world = rate, seed, rank, world
        self.steps = max(1, round(1 / rate))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        gen = generator(Draw.POISSON_BATCHES, self.seed, self.epoch, self.rank)
        for _ in range(self.steps):
            yield self.indices[torch.rand(len(self.indices), generator=gen) < self.rate].tolist()


ACCOUNTANTS = ("rdp", "prv")


def epsilon(sigma: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """epsilon of (epsilon, delta)-DP after `steps` Poisson-sampled steps, by Opacus' RDP
    accountant, or by its PRV accountant (Gopi et al. 2021): numerical composition of the privacy
    loss distributions, tighter; Opacus returns the upper end of its estimate (error 0.01 in epsilon)."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant {accountant!r}: one of {', '.join(ACCOUNTANTS)}")
    if steps == 0:
        return 0.0
    from opacus.accountants import PRVAccountant, RDPAccountant

    counter = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    counter.history = [(sigma, sample_rate, steps)]
    with np.errstate(divide="ignore"):  # PRV's log(1 - q) at q = 1 (one release, no subsampling) is -inf, as meant
        return float(counter.get_epsilon(delta))


def epsilons(sigma: float, sample_rate: float, steps: int, delta: float) -> dict[str, float]:
    """epsilon by every accountant (ACCOUNTANTS), each an upper bound for the same mechanism."""
    return {name: epsilon(sigma, sample_rate, steps, delta, name) for name in ACCOUNTANTS}


def tightest(found: dict[str, float]) -> tuple[float, str]:
    """(epsilon, accountant): of upper bounds for one mechanism, the smallest is the guarantee."""
    best = min(found, key=found.__getitem__)
    return found[best], best


def client_epsilon(sigma: float, delta: float) -> tuple[float, str]:
    """A per-sample DP client's (epsilon, accountant): each of its samples joins exactly one local
    step (the steps take disjoint parts), one Gaussian mechanism of noise multiplier sigma without
    subsampling."""
    return tightest(epsilons(sigma, 1.0, 1, delta)) if sigma > 0 else (float("inf"), "none")
