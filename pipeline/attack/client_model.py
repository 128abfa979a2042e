"""The client as the attacker models it: the dummy batch's gradient, forwarded in the client's
normalisation shards, the client's E local steps unrolled, or SME's surrogate of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.nets import take_penalty


def dummy_gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, shards: int = 1) -> list[torch.Tensor]:
    """The batch gradient of `images`, one tensor per trainable parameter, differentiable with
    respect to them.

    With `shards` > 1 the batch is forwarded in that many contiguous shards, each normalised by
    its own statistics: the client's asynchronous BatchNorm over W participants, modelled.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    logits: list[torch.Tensor] = []
    penalty: torch.Tensor | float = 0.0
    for part in images.chunk(shards):  # a bottleneck's KL term (PRECODE) is a mean per image, as the client's
        logits.append(model(part))
        penalty = penalty + len(part) / len(images) * take_penalty(model)
    loss = F.cross_entropy(torch.cat(logits), labels) + penalty
    return list(torch.autograd.grad(loss, params, create_graph=True))


def _summed_loss(logits: torch.Tensor, labels: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The client's loss of one forward, summed over its images: the cross-entropy and a
    bottleneck's KL term (PRECODE), each a mean per image."""
    return F.cross_entropy(logits, labels, reduction="sum") + len(labels) * take_penalty(model)


def step_groups(parts: list[torch.Tensor], separate: bool) -> list[torch.Tensor]:
    """The groups of positions one local step's BatchNorm normalised together, from the step's
    participant `parts`: each part alone (`separate`: asynchronous BatchNorm), or all of them."""
    return parts if separate else [torch.cat(parts)]


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
        groups = step_groups(parts, steps.separate)
        state = {**fixed, **dict(zip(names, current))}
        summed = sum(_summed_loss(functional_call(model, state, (images[g],)), labels[g], model) for g in groups)
        loss = cast(torch.Tensor, summed) / sum(len(g) for g in groups)
        grads = torch.autograd.grad(loss, current, create_graph=True)
        taken.append(grads)
        current = [p - steps.lr * g for p, g in zip(current, grads)]
    return [torch.stack(per_step).mean(0) for per_step in zip(*taken)]


# SME's alpha at the start of every restart: the midpoint of the line from theta_0 to theta_E
SME_ALPHA_START = 0.5


@dataclass(frozen=True)
class Surrogate:
    """The client's E local steps of size lr as SME models them (surrogate_point), and the groups
    of dummy positions the client's BatchNorm normalised together (each step's batch, or each
    participant's part of it: LocalSteps'), which the surrogate's one gradient forwards apart."""

    lr: float
    steps: int
    groups: list[torch.Tensor]


def surrogate_point(
    start: list[torch.Tensor], upload: list[torch.Tensor], lr: float, steps: int, alpha: torch.Tensor | float
) -> list[torch.Tensor]:
    """SME's surrogate weights (Li et al., ICML'23): theta_0 + alpha (theta_E - theta_0) on the line
    from the client's start to where its E local steps ended, theta_E = theta_0 - lr * E * upload
    (the upload's definition, pipeline.client). Differentiable in alpha, which SME learns."""
    return [p - alpha * (lr * steps) * u for p, u in zip(start, upload)]


def surrogate_gradient(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    point: list[torch.Tensor],
    groups: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The dummy batch's gradient (one full-batch step, the mean loss over every image) at the
    weights `point` (one per trainable parameter of `model`), each of `groups` (positions; None:
    the whole batch) forwarded apart, as the client's BatchNorm normalised them; differentiable
    with respect to the images and the point: SME matches it to the upload in place of the E
    unrolled steps."""
    from torch.func import functional_call

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # train-mode BatchNorm moves them: not the caller's
    state = {**{n: p for n, p in model.named_parameters() if not p.requires_grad}, **buffers, **dict(zip(names, point))}
    summed = sum(
        _summed_loss(functional_call(model, state, (images[g],)), labels[g], model)
        for g in (groups if groups is not None else [torch.arange(len(labels))])
    )
    return list(torch.autograd.grad(cast(torch.Tensor, summed) / len(labels), point, create_graph=True))
