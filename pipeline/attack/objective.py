"""What the attack minimises: the gradient term against the upload (1 - cosine or squared L2,
layers weighted), total variation and the BatchNorm prior, its image gradient computed on one
process or over the processes that split the dummy batch."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import distributed as dist
from torch import nn

from pipeline.attack.bn_prior import BatchNormPrior
from pipeline.attack.client_model import (
    SME_ALPHA_START,
    dummy_gradient,
    surrogate_gradient,
    surrogate_point,
    unrolled_update,
)
from pipeline.nets import crop_dead_taps
from pipeline.sections import AttackParams
from pipeline.seeds import Draw, mix

if TYPE_CHECKING:
    from pipeline.attack.target import Target

Tensors = list[torch.Tensor] | tuple[torch.Tensor, ...]  # what torch._foreach_* take and give


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV: mean absolute difference of horizontal and of vertical neighbours."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


class GradientMatch:
    """The gradient term against one upload: 1 - cosine or the squared L2 distance over all
    parameters, each layer's entries weighted (equal weights: the plain global cosine).

    Called on the dummy gradient (one tensor per parameter), it returns the term's value and its
    gradient with respect to each of those tensors, written out rather than left to autograd,
    whose copies, norms and divisions of the whole gradient vector cost a large share of each
    step on a large model (docs/benchmarks.md).

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


class Objective:
    """The attack's objective against one target, on this process's part of the dummy batch:
    the gradient term of the whole batch (the parts' dummy gradients all-reduced when the batch
    is split over `world` processes), TV and the BatchNorm prior, and its image gradient.

    It works on a copy of the target's model (the prior hooks its BatchNorm layers)."""

    def __init__(self, target: Target, a: AttackParams, rank: int = 0, world: int = 1):
        self.model = copy.deepcopy(target.model)
        crops = crop_dead_taps(self.model, target.image_shape)  # ResNet-18 at 32 px: layer4's 3 x 3 kernels at 1 x 1
        self.match = GradientMatch(self.model, target.gradients, a.objective, a.layer_weights, crops)
        self.defense = None if target.defense is None else target.defense.cropped(crops)
        self.target, self.a, self.world = target, a, world
        self.alpha: torch.Tensor | None = None  # SME's, learned in each restart (restart_parameters)
        if target.surrogate is not None:  # the line from theta_0 along the upload, cut as the weights are
            names = [n for n, p in self.model.named_parameters() if p.requires_grad]
            self.start = [p.detach() for p in self.model.parameters() if p.requires_grad]
            self.direction = [target.gradients[n][crops[n]] if n in crops else target.gradients[n] for n in names]
        self.labels = target.labels.chunk(world)[rank]  # this process's part (all of it without a split)
        prior = BatchNormPrior(self.model, target.shards, target.bn_statistics) if a.bn_prior else None
        self.prior = prior if prior is not None and len(prior) else None  # GroupNorm: the prior is a constant 0

    def mean_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over the processes of a per-part quantity (parts are equal in size)."""
        if self.world == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world

    def restart_parameters(self) -> list[torch.Tensor]:
        """What a restart learns besides the images, fresh: SME's alpha at its start, or nothing."""
        if self.target.surrogate is None:
            return []
        self.alpha = torch.tensor(SME_ALPHA_START, device=self.start[0].device, requires_grad=True)
        return [self.alpha]

    def dummy_upload(self, x: torch.Tensor) -> list[torch.Tensor]:
        """What the modelled client uploads for the dummy part `x`: its gradient, its unrolled
        steps or SME's surrogate of them, through its defense where the attacker models one."""
        t = self.target
        if t.local_steps is not None:
            upload = unrolled_update(self.model, x, self.labels, t.local_steps)
        elif t.surrogate is not None:
            alpha = SME_ALPHA_START if self.alpha is None else self.alpha
            point = surrogate_point(self.start, self.direction, t.surrogate.lr, t.surrogate.steps, alpha)
            upload = surrogate_gradient(self.model, x, self.labels, point, t.surrogate.groups)
        else:
            upload = dummy_gradient(self.model, x, self.labels, max(t.shards // self.world, 1))
        return upload if self.defense is None else self.defense(upload)

    def image_gradient(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(the objective's gradient with respect to x, the gradient term of the whole batch)."""
        a, world = self.a, self.world
        grads = self.dummy_upload(x)
        extra = a.tv_weight * total_variation(x) if a.tv_weight else None
        if self.prior is not None:
            extra = a.bn_prior * self.prior.take() + (0 if extra is None else extra)
        if world == 1:
            g_loss, directions = self.match(grads)
        else:
            # The whole batch's gradient is the mean of the parts'; the chain rule through that mean
            # sends each part 1/world of the objective's gradient, as TV's mean over images does.
            whole = self.mean_over_processes(torch.cat([g.detach().reshape(-1) for g in grads]))
            g_loss, directions = self.match(
                [w.view_as(g) for w, g in zip(whole.split([g.numel() for g in grads]), grads)]
            )
            directions = torch._foreach_div(directions, world)
            extra = None if extra is None else extra / world
        outputs, seeds = grads, directions
        if extra is not None:
            outputs, seeds = [*grads, extra], [*directions, torch.ones((), device=x.device)]
        if self.alpha is None:
            (grad,) = torch.autograd.grad(outputs, x, grad_outputs=seeds)
        else:  # alpha's gradient for its own step (invert's optimiser holds it)
            grad, self.alpha.grad = torch.autograd.grad(outputs, [x, self.alpha], grad_outputs=seeds)
        return grad, float(g_loss)


def gradient_loss(target: Target, a: AttackParams, seed: int) -> Callable[[torch.Tensor], float]:
    """images -> the attack's gradient term (no TV, no prior) of that dummy batch against
    `target`, as `invert` computes it; the attacker's own dropout drawn from `seed` alone, so that
    every batch compared with it sees the same masks. One objective (one copy of the model) serves
    every batch: MLCO asks for one loss per candidate image."""
    objective = Objective(target, a.model_copy(update={"bn_prior": 0.0}))

    def loss(images: torch.Tensor) -> float:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix(Draw.LOSS_DROPOUT, seed))
            return float(objective.match(objective.dummy_upload(images.detach().clone().requires_grad_(True)))[0])

    return loss
