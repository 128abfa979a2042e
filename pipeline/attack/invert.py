"""Gradient matching: optimise dummy images until their gradient points like the upload's.

The original's attack made whole: N(0,1) start in normalised space, the objective
(pipeline.attack.objective: 1 - cosine or squared L2 over all parameters, + TV, + an optional
BatchNorm prior); the sign of the image gradient into Adam with a cosine-decayed step, pixels
boxed to the valid range after every step, K restarts, the iterate with the lowest gradient
loss kept, and an optional early stop once that iterate is as smooth as a target TV. The dummy
batch can also be split over the processes of a torch.distributed group (attack.split: batch),
the dummy gradients all-reduced, as the original did for large batches.
"""

from __future__ import annotations

import sys

import torch
from torch import distributed as dist
from tqdm.auto import tqdm

from pipeline.attack.compiled import compiled_step
from pipeline.attack.objective import Objective, total_variation
from pipeline.attack.restarts import Reconstruction, best_of
from pipeline.attack.target import Target
from pipeline.sections import AttackParams
from pipeline.seeds import Draw, generator, mix

LOG_EVERY = 25  # how often (iterations) the loss curve is sampled

# A restart that made more than this share of its whole decrease of the loss in its last tenth
# of iterations had not converged: its number says what the budget allowed, not what the attack can do.
CONVERGENCE_TOLERANCE = 0.01


def still_falling(first: float, before: float, last: float, tolerance: float = CONVERGENCE_TOLERANCE) -> bool:
    """Whether the best loss of the last 10 % of iterations (`last`) is below the best of the
    10 % before them (`before`) by more than `tolerance` of the run's whole decrease from its
    first loss (`first`): the attack was cut short. (Relative to the loss itself, a cosine-decayed
    attack still falls 10-15 % in its last tenth at 300-500 iterations, long after its images have
    stopped changing much: that rule would flag every run.)"""
    return before - last > tolerance * max(first - last, 0.0)


def invert(
    target: Target, a: AttackParams, seed: int, restarts: list[int] | None = None, progress: bool = True
) -> Reconstruction:
    """Reconstruct the target's batch of len(target.labels) images: the best of `restarts` (all
    of the attack's by default), each depending only on (seed, restart), so that restarts split
    over processes give what one process gives. The target (model, gradient, statistics) is on
    the device the attack runs on; the result comes back on the CPU.

    With `a.split` batch, every process of the default torch.distributed group calls this with
    the same arguments; each optimises its contiguous part of the dummy batch, the dummy
    gradients are all-reduced, and every process returns the whole batch."""
    split = a.split == "batch" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if split else (0, 1)
    target.check(a, world)
    objective = Objective(target, a, rank, world)
    labels, device = target.labels, target.labels.device
    box = target.box
    low, high = (bound.to(device) for bound in box)
    batch = (len(labels), *target.image_shape)
    restarts = list(range(a.restarts)) if restarts is None else restarts

    def start(restart: int) -> torch.Tensor:  # drawn on the CPU: the same start on every device
        return torch.randn(batch, generator=generator(Draw.ATTACK_START, seed, restart)).clamp_(*box).to(device)

    if objective.match.is_zero:
        # A batch the model fits exactly (softmax saturated in float32) uploads a zero gradient:
        # it has no direction to match, so the attacker is left with its starting guess.
        return best_of(
            [
                Reconstruction(start(r).cpu(), labels.cpu(), 1.0, r, note="the upload is all zeros: nothing to invert")
                for r in restarts
            ]
        )
    image_gradient = compiled_step(objective) if a.compile else objective.image_gradient
    all_mean = objective.mean_over_processes

    def run(restart: int) -> Reconstruction:
        # the attacker's own dropout (a train-mode VGG) draws from (seed, restart) alone
        torch.manual_seed(mix(Draw.ATTACK_DROPOUT, seed, restart))
        x = start(restart).chunk(world)[rank].clone().requires_grad_(True)
        learned = objective.restart_parameters()  # SME's alpha, or none
        opt = torch.optim.Adam([x, *learned], lr=a.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=a.iterations, eta_min=a.lr_min)
        kept = Reconstruction(x.detach().clone(), labels, float("inf"), restart, iterations_run=a.iterations)
        tenth = a.iterations // 10
        tail = [float("inf"), float("inf")]
        first = float("nan")  # the loss at the first iteration, set there
        for it in range(a.iterations):
            x.grad, g_value = image_gradient(x)
            first = g_value if it == 0 else first
            if tenth and it >= a.iterations - 2 * tenth:
                window = int(it >= a.iterations - tenth)
                tail[window] = min(tail[window], g_value) if g_value == g_value else tail[window]
            # The loss is that of the current x, before this step moves it: keep x as it is now.
            if g_value < kept.grad_loss:  # (a NaN loss is never kept)
                kept.grad_loss = g_value
                kept.images = x.detach().clone()
            x.grad.sign_()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(low, high)
                for weight in learned:  # alpha on the segment from theta_0 to theta_E
                    weight.clamp_(0, 1)
            if it % LOG_EVERY == 0 or it == a.iterations - 1:
                kept.curve.append((it, g_value))
                bar.set_postfix(restart=restart, grad_loss=f"{g_value:.4f}", refresh=False)
            bar.update(1)
            if a.tv_target is not None and float(all_mean(total_variation(kept.images))) < a.tv_target:
                kept.iterations_run = it + 1
                kept.curve.append((it, g_value))
                bar.update(a.iterations - it - 1)
                break
        if kept.iterations_run != a.iterations:
            kept.converged = True  # it stopped at its own TV target
        elif a.iterations >= 20:
            kept.tail = (first, tail[0], tail[1])
            kept.converged = not still_falling(*kept.tail)
        if world > 1:
            parts = [torch.empty_like(kept.images) for _ in range(world)]
            dist.all_gather(parts, kept.images)
            kept.images = torch.cat(parts)
        return kept

    bar = tqdm(
        total=a.iterations * len(restarts),
        desc="attack",
        disable=not progress or rank != 0,
        mininterval=1.0 if sys.stderr.isatty() else 15.0,
    )
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        found = [run(restart) for restart in restarts]
    bar.close()
    best = best_of(found)
    best.images, best.labels = best.images.cpu(), best.labels.cpu()
    return best
