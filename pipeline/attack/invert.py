"""Gradient matching: optimise dummy images until their gradient points like the upload's.

The original's attack made whole: N(0,1) start in normalised space, 1 - cosine (or squared
L2) over all parameters, optionally weighted per layer, + total variation, + an optional
BatchNorm-statistics prior; the sign of the image gradient into Adam with a cosine-decayed
step, pixels boxed to the valid range after every step, K restarts, the iterate with the
lowest gradient loss kept, and an optional early stop once that iterate is as smooth as a
target TV. The dummy batch can also be split over the processes of a torch.distributed
group, the dummy gradients all-reduced, as the original did for large batches.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from pipeline.config import AttackParams
from pipeline.errors import PipelineError
from pipeline.metrics import pair_by_hungarian
from pipeline.nets import batchnorm_layers, crop_dead_taps, input_shapes, running_statistics
from pipeline.seeds import Draw, generator, mix

Tensors = list[torch.Tensor] | tuple[torch.Tensor, ...]  # what torch._foreach_* take and give
LOG_EVERY = 25  # how often (iterations) the loss curve is sampled


@dataclass
class Reconstruction:
    images: torch.Tensor  # normalised space, [B, C, H, W]
    labels: torch.Tensor
    grad_loss: float  # the lowest gradient term reached (1 - cosine or L2, without TV)
    restart: int
    curve: list[tuple[int, float]] = field(default_factory=list)  # (iteration, loss) of the kept restart
    note: str | None = None  # why the attack could not run, when it could not
    iterations_run: int | None = None  # fewer than asked when the TV target stopped it
    seconds: float | None = None  # wall time of the job (kept out of the stage's outputs: it varies)
    # the gradient loss at the first iteration, its lowest in the 10 % of iterations before the
    # last 10 %, and its lowest in the last 10 %
    tail: tuple[float, float, float] | None = None
    converged: bool | None = None  # see still_falling; None: too few iterations to tell, or not run
    sources: list[int] | None = None  # combined restarts (min_loss_combination): the restart of each image


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


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV: mean absolute difference of horizontal and of vertical neighbours."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


def pixel_box(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of the [0, 1] pixel range in normalised space, shaped [1, C, 1, 1]."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (0 - m) / s, (1 - m) / s


def dummy_gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, shards: int = 1) -> list[torch.Tensor]:
    """The batch gradient of `images`, one tensor per trainable parameter, differentiable with
    respect to them.

    With `shards` > 1 the batch is forwarded in that many contiguous shards, each normalised by
    its own statistics: the client's asynchronous BatchNorm over W participants, modelled.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    logits = torch.cat([model(part) for part in images.chunk(shards)])
    return list(torch.autograd.grad(F.cross_entropy(logits, labels), params, create_graph=True))


@dataclass(frozen=True)
class LocalSteps:
    """The client's E local steps as the attacker models them: which dummy positions each step
    trains on, per participant (pipeline.client.step_parts), whether each participant's part is
    normalised on its own (asynchronous BatchNorm in train mode), and the step size."""

    parts: list[list[torch.Tensor]]
    separate: bool
    lr: float


def unrolled_update(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: LocalSteps
) -> list[torch.Tensor]:
    """(theta_0 - theta_E) / (lr * E) of the dummy batch, differentiable with respect to it: the
    client's E SGD steps taken through torch.func.functional_call at the weights each step
    reached, step e's loss the mean over the images it trains on (DDP's average of the
    participants' means), computed as the mean of the step gradients as the client does."""
    from torch.func import functional_call

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    current: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    fixed = {**{n: p for n, p in model.named_parameters() if not p.requires_grad}, **dict(model.named_buffers())}
    taken: list[tuple[torch.Tensor, ...]] = []
    for parts in steps.parts:
        groups = parts if steps.separate else [torch.cat(parts)]
        state = {**fixed, **dict(zip(names, current))}
        summed = sum(
            F.cross_entropy(functional_call(model, state, (images[g],)), labels[g], reduction="sum") for g in groups
        )
        loss = cast(torch.Tensor, summed) / sum(len(g) for g in groups)
        grads = torch.autograd.grad(loss, current, create_graph=True)
        taken.append(grads)
        current = [p - steps.lr * g for p, g in zip(current, grads)]
    return [torch.stack(per_step).mean(0) for per_step in zip(*taken)]


class GradientMatch:
    """The gradient term against one upload: 1 - cosine or the squared L2 distance over all
    parameters, each layer's entries weighted (equal weights: the plain global cosine).

    Called on the dummy gradient (one tensor per parameter), it returns the term's value and its
    gradient with respect to each of those tensors, written out rather than left to autograd:
    on ResNet-18 (11 M parameters) autograd's copies, norms and divisions of the whole gradient
    vector took half of each attack step (bench/attack.py).

    `crops` (from pipeline.nets.crop_dead_taps) names the weights of `model` cut to their live
    taps: the full model's gradient is zero on the others, so the term is the full one.
    """

    def __init__(
        self,
        model: nn.Module,
        target: dict[str, torch.Tensor],
        objective: str,
        layer_weights: str,
        crops: dict[str, tuple[slice, ...]] | None = None,
    ):
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        missing = sorted(set(names) - set(target))
        if missing:
            raise ValueError(f"the upload has no gradient for {missing[0]} (and {len(missing) - 1} more)")
        layers = list(dict.fromkeys(n.rpartition(".")[0] for n in names))
        # a layer is a module: its weight and bias weigh the same (linear: layer l of L weighs (L - l) / L)
        depth = [layers.index(n.rpartition(".")[0]) for n in names]
        self.weights = [1.0 if layer_weights == "equal" else (len(layers) - d) / len(layers) for d in depth]
        self.objective, self.uniform = objective, layer_weights == "equal"
        targets = [target[n].float() for n in names]
        self.weight_vector = torch.tensor(self.weights, device=targets[0].device)
        self.is_zero = all(not t.any() for t in targets)
        if objective == "cosine":  # the weighted unit target: w t / sqrt(sum w t^2)
            scale = float(self._weighted_sq_norm(targets).sqrt().clamp_min(1e-30))
            targets = list(torch._foreach_mul(targets, [w / scale for w in self.weights]))
        # The dead taps' target enters as a constant: none for the cosine (its scale above counts
        # them), their weighted squares for L2 (non-zero where the client added noise, DP-SGD).
        crops = crops or {}
        self.dead_l2 = 0.0
        for i, name in enumerate(names):
            if name in crops:
                if objective == "l2":
                    dead = targets[i].double()
                    dead[crops[name]] = 0
                    self.dead_l2 += self.weights[i] * float(dead.pow(2).sum())
                targets[i] = targets[i][crops[name]].contiguous()
        self.targets = targets

    def _weighted_sq_norm(self, tensors: Tensors) -> torch.Tensor:
        norms = torch.stack(torch._foreach_norm(tensors))
        return (self.weight_vector * norms * norms).sum()

    def differentiable(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The term alone, as torch operations autograd (and torch.compile) can differentiate."""
        weights = self.weight_vector.to(grads[0].dtype)
        if self.objective == "l2":
            return sum(w * (g - t).pow(2).sum() for w, g, t in zip(weights, grads, self.targets)) + self.dead_l2
        dot = sum((g * t).sum() for g, t in zip(grads, self.targets))
        norm = sum(w * g.pow(2).sum() for w, g in zip(weights, grads)).sqrt().clamp_min(1e-12)
        return 1 - dot / norm

    @torch.no_grad()
    def __call__(self, grads: Tensors) -> tuple[torch.Tensor, Tensors]:
        """(the term, its gradient with respect to each tensor of `grads`)."""
        if self.objective == "l2":  # sum w |g - t|^2, gradient 2 w (g - t)
            diffs = torch._foreach_sub(grads, self.targets)
            value = self._weighted_sq_norm(diffs) + self.dead_l2
            return value, torch._foreach_mul(diffs, [2 * w for w in self.weights])
        # 1 - <g, T> / n with n = sqrt(sum w |g|^2); gradient -T / n + <g, T> w g / n^3
        dot = torch.stack([torch.dot(g.reshape(-1), t.reshape(-1)) for g, t in zip(grads, self.targets)]).sum()
        norm = self._weighted_sq_norm(grads).sqrt()
        clamped = float(norm) < 1e-12  # the norm is floored there: no gradient through it
        norm = norm.clamp_min(1e-12)
        direction = torch._foreach_mul(self.targets, float(-1 / norm))
        if not clamped:
            weighted = grads if self.uniform else torch._foreach_mul(grads, self.weights)
            torch._foreach_add_(direction, weighted, alpha=float(dot / norm**3))
        return 1 - dot / norm, direction


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


def compiled_step(
    model: nn.Module,
    match: GradientMatch,
    labels: torch.Tensor,
    shards: int,
    tv_weight: float,
    eager: Callable[[torch.Tensor], tuple[torch.Tensor, float]],
):
    """x -> (the objective's gradient with respect to x, the gradient term), as one compiled
    function: torch.func's grad of (the gradient term of torch.func's grad of the batch loss +
    TV), handed to torch.compile, which fuses the double backward's elementwise work (on the
    ConvNet most of a step: the BatchNorm double backward alone is a third). The first compile
    of a model takes tens of seconds, later ones read inductor's cache.

    Train-mode BatchNorm normalises with batch statistics only: its running statistics are
    dropped from `model` (a copy), as torch.func cannot update them inside a transform. The
    first call is checked against `eager`, the same step uncompiled (see check_compiled)."""
    from torch.func import functional_call, grad, replace_all_batch_norm_modules_

    if model.training:
        replace_all_batch_norm_modules_(model)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    fixed = {**{n: p for n, p in model.named_parameters() if not p.requires_grad}, **dict(model.named_buffers())}

    def batch_loss(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        state = {**params, **fixed}
        logits = torch.cat([functional_call(model, state, (part,)) for part in x.chunk(shards)])
        return F.cross_entropy(logits, labels)

    def objective(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grads = grad(batch_loss)(params, x)
        term = match.differentiable([grads[n] for n in names])
        return term + tv_weight * total_variation(x), term

    _per_isa_inductor_cache()
    torch.compiler.reset()  # a fresh trace for this model: dynamo would otherwise pile up guards per job
    step = torch.compile(grad(objective, has_aux=True))
    checked = False

    def image_gradient(x: torch.Tensor) -> tuple[torch.Tensor, float]:
        nonlocal checked
        gradient, term = step(x.detach())
        if not checked:  # the compiler's kernels are new code: held once against the eager step
            check_compiled(gradient, eager(x)[0])
            checked = True
        return gradient, float(term)

    return image_gradient


_USER_INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # before inductor writes its default there


def _per_isa_inductor_cache() -> None:
    """Point inductor at a cache folder of its own for the vector instruction set it compiles
    for. Its cache does not tell kernels built for AVX2 from AVX-512 ones apart (torch 2.14), and
    the stages pin ATEN_CPU_CAPABILITY=avx2 where a plain Python process does not: kernels
    reused across the two gave NaN and segmentation faults here."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    base = _USER_INDUCTOR_CACHE or default_cache_dir()
    isa = str(pick_vec_isa()).replace(" ", "+") or "none"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, f"isa-{isa}")


def check_compiled(compiled: torch.Tensor, eager: torch.Tensor, rtol: float = 1e-3) -> None:
    """Refuse a compiled image gradient that is not the eager one (seen before each instruction
    set had its own cache folder: NaN from kernels inductor reused across AVX2 and AVX-512)."""
    scale = float(eager.abs().max())
    difference = float((compiled - eager).abs().max()) if torch.isfinite(compiled).all() else float("inf")
    if not difference <= rtol * scale:
        raise PipelineError(
            f"attack.compile: the compiled step's image gradient is not the eager one (largest "
            f"difference {difference:.3g}, scale {scale:.3g}) for this model on this machine; "
            "run without attack.compile"
        )


def best_of(reconstructions: list[Reconstruction]) -> Reconstruction:
    """The restart with the lowest gradient loss (the earliest on a tie)."""
    return min(reconstructions, key=lambda r: (r.grad_loss, r.restart))


def invert(
    model: nn.Module,
    target: dict[str, torch.Tensor],
    labels: torch.Tensor,
    image_shape: tuple[int, int, int],
    mean: Sequence[float],
    std: Sequence[float],
    a: AttackParams,
    seed: int,
    progress: bool = True,
    restarts: list[int] | None = None,
    shards: int = 1,
    split_batch: bool = False,
    bn_statistics: dict[str, torch.Tensor] | None = None,
    local_steps: LocalSteps | None = None,
) -> Reconstruction:
    """Reconstruct a batch of len(labels) images whose gradient at `model` matches `target`.

    `model` must be in the client's mode (train or eval); it is copied, never modified. `a`
    gives the budget, step, objective and priors (the attack's parameters: labels, client model
    and processes are the caller's), `seed` the starts.
    `target` maps parameter names to the uploaded gradient. `restarts` picks which of the
    attack's restarts to run (all by default): each depends only on (seed, restart), so
    restarts split over processes give what one process gives.

    With `split_batch`, every process of the default torch.distributed group calls this with
    the same arguments; each optimises its contiguous part of the dummy batch, the dummy
    gradients are all-reduced, and every process returns the whole batch.

    `bn_statistics`, the client's revealed BatchNorm statistics, replace the model's running
    statistics as the prior's reference.

    With `local_steps`, the dummy upload is the client's E local steps unrolled (see
    unrolled_update) rather than one gradient; `shards` is then the groups each step
    normalises apart (W under asynchronous BatchNorm, else 1).
    """
    model = copy.deepcopy(model)
    device = next(model.parameters()).device  # the caller's: the upload and statistics are on it too
    labels = labels.to(device)
    crops = crop_dead_taps(model, image_shape)  # ResNet-18 at 32 px: layer4 at 1 x 1, 3 x 3 kernels used at the centre
    match = GradientMatch(model, target, a.objective, a.layer_weights, crops)
    rank, world = (dist.get_rank(), dist.get_world_size()) if split_batch else (0, 1)
    check_split(model, len(labels), shards, world, a.bn_prior)
    if a.compile and (a.bn_prior or world > 1 or local_steps is not None):
        raise ValueError(
            "the compiled step takes neither the BatchNorm prior, nor a dummy batch split over processes, "
            "nor unrolled local steps"
        )
    if local_steps is not None and world > 1:
        raise ValueError("unrolled local steps train on parts of the whole dummy batch: it cannot split over processes")
    box = pixel_box(mean, std)
    low, high = (bound.to(device) for bound in box)
    batch = (len(labels), *image_shape)
    restarts = list(range(a.restarts)) if restarts is None else restarts

    def start(restart: int) -> torch.Tensor:  # drawn on the CPU: the same start on every device
        return torch.randn(batch, generator=generator(Draw.ATTACK_START, seed, restart)).clamp_(*box).to(device)

    if match.is_zero:
        # A batch the model fits exactly (softmax saturated in float32) uploads a zero gradient:
        # it has no direction to match, so the attacker is left with its starting guess.
        return best_of(
            [
                Reconstruction(start(r).cpu(), labels.cpu(), 1.0, r, note="the upload is all zeros: nothing to invert")
                for r in restarts
            ]
        )
    prior = BatchNormPrior(model, shards, bn_statistics) if a.bn_prior else None
    if prior is not None and not len(prior):  # no BatchNorm layer (GroupNorm): the prior is a constant 0
        prior = None
    own = labels.chunk(world)[rank]  # this process's part of the batch (all of it without a split)

    def all_mean(value: torch.Tensor) -> torch.Tensor:
        """The mean over the processes of a per-part quantity (parts are equal in size)."""
        if world == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / world

    def eager_gradient(x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(the objective's gradient with respect to x, the gradient term of the whole batch)."""
        grads = (
            dummy_gradient(model, x, own, max(shards // world, 1))
            if local_steps is None
            else unrolled_update(model, x, own, local_steps)
        )
        extra = a.tv_weight * total_variation(x) if a.tv_weight else None
        if prior is not None:
            extra = a.bn_prior * prior.take() + (0 if extra is None else extra)
        if world == 1:
            g_loss, directions = match(grads)
        else:
            # The whole batch's gradient is the mean of the parts'; the chain rule through that mean
            # sends each part 1/world of the objective's gradient, as TV's mean over images does.
            whole = all_mean(torch.cat([g.detach().reshape(-1) for g in grads]))
            g_loss, directions = match([w.view_as(g) for w, g in zip(whole.split([g.numel() for g in grads]), grads)])
            directions = torch._foreach_div(directions, world)
            extra = None if extra is None else extra / world
        outputs, seeds = grads, directions
        if extra is not None:
            outputs, seeds = [*grads, extra], [*directions, torch.ones((), device=device)]
        (grad,) = torch.autograd.grad(outputs, x, grad_outputs=seeds)
        return grad, float(g_loss)

    image_gradient = eager_gradient
    if a.compile:
        image_gradient = compiled_step(copy.deepcopy(model), match, own, shards, a.tv_weight, eager_gradient)

    def run(restart: int) -> Reconstruction:
        # the attacker's own dropout (a train-mode VGG) draws from (seed, restart) alone
        torch.manual_seed(mix(Draw.ATTACK_DROPOUT, seed, restart))
        x = start(restart).chunk(world)[rank].clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=a.lr)
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


def gradient_loss(
    model: nn.Module,
    target: dict[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    a: AttackParams,
    seed: int,
    shards: int = 1,
    local_steps: LocalSteps | None = None,
) -> float:
    """The attack's gradient term (no TV, no prior) of the dummy batch `images`, as `invert`
    computes it for the same model, upload and client model; the attacker's own dropout drawn
    from `seed` alone, so that every batch compared with it sees the same masks."""
    model = copy.deepcopy(model)
    crops = crop_dead_taps(model, tuple(images.shape[1:]))
    match = GradientMatch(model, target, a.objective, a.layer_weights, crops)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix(Draw.LOSS_DROPOUT, seed))
        x = images.detach().clone().requires_grad_(True)
        grads = (
            dummy_gradient(model, x, labels, shards)
            if local_steps is None
            else unrolled_update(model, x, labels, local_steps)
        )
        return float(match(grads)[0])


def min_loss_combination(found: list[Reconstruction], batch_loss: Callable[[torch.Tensor], float]) -> Reconstruction:
    """The restarts of one upload combined image by image: E2EGI's combining step of MLCO (see
    ../shared/reference/original-system.md, 4.7), without its group-regularised rounds.

    Start from the restart with the lowest gradient loss. Align every other restart's images to
    it one-to-one, only between positions of the same label (Hungarian on MSE: within a label
    the dummy positions are interchangeable). Then, position by position and restart by
    restart, put that restart's image in and keep the swap when `batch_loss` of the whole batch
    falls. The result's loss is never above the best restart's (as `batch_loss` measures it)."""
    best = best_of(found)
    images, loss = best.images.clone(), batch_loss(best.images)
    sources = [best.restart] * len(images)
    others = sorted((r for r in found if r is not best and r.note is None), key=lambda r: r.restart)
    aligned = [(r.restart, r.images[pair_by_hungarian(r.images, best.images, best.labels)]) for r in others]
    for i in range(len(images)):
        for restart, candidates in aligned:
            trial = images.clone()
            trial[i] = candidates[i]
            value = batch_loss(trial)
            if value < loss:
                images, loss, sources[i] = trial, value, restart
    return dataclasses.replace(best, images=images, grad_loss=loss, sources=sources)


def check_split(model: nn.Module, batch: int, shards: int, world: int, bn_prior: float) -> None:
    """Refuse a split of the dummy batch that would not compute the one-process objective."""
    if batch % shards:
        raise ValueError(f"a batch of {batch} does not split into {shards} shards")
    if world == 1:
        return
    if batch % world:
        raise ValueError(f"a dummy batch of {batch} does not split over {world} processes")
    if bn_prior:
        raise ValueError("the BatchNorm prior needs the whole dummy batch's statistics: it cannot split over processes")
    batchnorm_in_train = any(m.training for _, m in batchnorm_layers(model))
    if batchnorm_in_train and shards % world:
        raise ValueError(
            f"train-mode BatchNorm normalises {shards} shard(s) of the batch together: "
            f"the batch cannot split over {world} processes"
        )
