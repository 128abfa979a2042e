"""Gradient matching: optimise dummy images until their gradient points like the upload's.

The original's attack made whole: N(0,1) start in normalised space, 1 - cosine over all
parameters + total variation, the sign of the image gradient into Adam with a cosine-decayed
step, pixels boxed to the valid range after every step, K restarts, and the iterate with the
lowest gradient loss kept.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class AttackSettings:
    iterations: int
    lr: float
    lr_min: float
    tv_weight: float
    restarts: int
    seed: int
    log_every: int = 25  # how often the loss curve is sampled


@dataclass
class Reconstruction:
    images: torch.Tensor  # normalised space, [B, C, H, W]
    labels: torch.Tensor
    grad_loss: float  # the lowest 1 - cosine reached (without TV)
    restart: int
    curve: list[tuple[int, float]] = field(default_factory=list)  # (iteration, loss) of the kept restart
    note: str | None = None  # why the attack could not run, when it could not


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV: mean absolute difference of horizontal and of vertical neighbours."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


def pixel_box(mean: list[float], std: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of the [0, 1] pixel range in normalised space, shaped [1, C, 1, 1]."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (0 - m) / s, (1 - m) / s


def gradient_loss(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, target_unit: torch.Tensor, shards: int = 1
) -> torch.Tensor:
    """1 - cosine between the batch gradient of `images` and the (unit-norm, flat) target.

    With `shards` > 1 the batch is forwarded in that many contiguous shards, each normalised by
    its own statistics: the client's asynchronous BatchNorm over W participants, modelled.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    logits = torch.cat([model(part) for part in images.chunk(shards)])
    grads = torch.autograd.grad(F.cross_entropy(logits, labels), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    return 1 - flat @ target_unit / flat.norm().clamp_min(1e-12)


def best_of(reconstructions: list[Reconstruction]) -> Reconstruction:
    """The restart with the lowest gradient loss (the earliest on a tie)."""
    return min(reconstructions, key=lambda r: (r.grad_loss, r.restart))


def invert(
    model: nn.Module,
    target: dict[str, torch.Tensor],
    labels: torch.Tensor,
    image_shape: tuple[int, int, int],
    mean: list[float],
    std: list[float],
    settings: AttackSettings,
    progress: bool = True,
    restarts: list[int] | None = None,
    shards: int = 1,
) -> Reconstruction:
    """Reconstruct a batch of len(labels) images whose gradient at `model` matches `target`.

    `model` must be in the client's mode (train or eval); it is copied, never modified.
    `target` maps parameter names to the uploaded gradient. `restarts` picks which of the
    settings' restarts to run (all by default): each depends only on (seed, restart), so
    restarts split over processes give what one process gives.
    """
    model = copy.deepcopy(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = sorted(set(names) - set(target))
    if missing:
        raise ValueError(f"the upload has no gradient for {missing[0]} (and {len(missing) - 1} more)")
    if len(labels) % shards:
        raise ValueError(f"a batch of {len(labels)} does not split into {shards} shards")
    target_flat = torch.cat([target[n].reshape(-1).float() for n in names])
    low, high = pixel_box(mean, std)
    batch = (len(labels), *image_shape)
    restarts = list(range(settings.restarts)) if restarts is None else restarts

    def start(restart: int) -> torch.Tensor:
        return torch.randn(batch, generator=torch.Generator().manual_seed(settings.seed * 1000 + restart)).clamp_(low, high)

    if target_flat.norm() == 0:
        # A batch the model fits exactly (softmax saturated in float32) uploads a zero gradient:
        # it has no direction to match, so the attacker is left with its starting guess.
        return best_of([Reconstruction(start(r), labels, 1.0, r, note="the upload is all zeros: nothing to invert")
                        for r in restarts])
    target_unit = target_flat / target_flat.norm()

    found = []
    bar = tqdm(total=settings.iterations * len(restarts), desc="attack", disable=not progress,
               mininterval=1.0 if sys.stderr.isatty() else 15.0)
    for restart in restarts:
        x = start(restart).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=settings.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.iterations, eta_min=settings.lr_min)
        kept = Reconstruction(x.detach().clone(), labels, float("inf"), restart)
        for it in range(settings.iterations):
            g_loss = gradient_loss(model, x, labels, target_unit, shards)
            loss = g_loss + settings.tv_weight * total_variation(x) if settings.tv_weight else g_loss
            (x.grad,) = torch.autograd.grad(loss, x)
            g_value = float(g_loss.detach())
            # The loss is that of the current x, before this step moves it: keep x as it is now.
            if g_value < kept.grad_loss:  # (a NaN loss is never kept)
                kept.grad_loss = g_value
                kept.images = x.detach().clone()
            x.grad.sign_()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(low, high)
            if it % settings.log_every == 0 or it == settings.iterations - 1:
                kept.curve.append((it, g_value))
                bar.set_postfix(restart=restart, grad_loss=f"{g_value:.4f}", refresh=False)
            bar.update(1)
        found.append(kept)
    bar.close()
    return best_of(found)
