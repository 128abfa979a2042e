"""The field's post-processing defenses of an upload, and each as the attacker who knows it
applies it to its dummy upload (docs/defenses.md).

The client applies a defense to the update it would otherwise send: magnitude pruning, norm
clipping (no noise), sign quantisation, or Soteria's pruning of the classifier's weight gradient.
The adaptive attacker applies the same deterministic transform to its dummy upload, differentiably:
magnitude pruning at the stated ratio (or, GIFD's model, the upload's own mask of zeros), Soteria's
mask as the upload's zeros (its sensitivities depend on the client's images), the clip bound
(stated, or estimated from the upload as GGL does), and sign through a stated relaxation, tanh(g / tau).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from pipeline.dp import clip_factors
from pipeline.nets import classifier_weight_name
from pipeline.sections import ClippingParams, DefenseParams, PruningParams, SignParams, SoteriaParams

Grads = dict[str, torch.Tensor]

# Soteria's ratio divides by r + this: its reference code's guard for ReLU features, which are 0
SOTERIA_OFFSET = 0.1


def kept_entries(numel: int, ratio: float) -> int:
    """How many of a tensor's `numel` entries magnitude pruning at `ratio` keeps."""
    return numel - math.floor(ratio * numel + 1e-9)  # 0.29 * 100 is 28.999... in floats: 29 pruned


def largest_mask(tensor: torch.Tensor, kept: int) -> torch.Tensor:
    """True at the `kept` largest |entries| (ties broken by position, so the mask is the same on
    every machine)."""
    flat = tensor.detach().reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[flat.abs().argsort(stable=True)[: max(flat.numel() - kept, 0)]] = False
    return keep.view_as(tensor)


def pruning_mask(tensor: torch.Tensor, ratio: float) -> torch.Tensor:
    """True where magnitude pruning keeps an entry: all but the floor(ratio * n) smallest |entries|."""
    return largest_mask(tensor, kept_entries(tensor.numel(), ratio))


def clipped(gradients: list[torch.Tensor], bound: float, scope: str) -> list[torch.Tensor]:
    """The tensors scaled to a norm of at most `bound`: together (global) or each (per-tensor).
    Differentiable, so the attacker's dummy upload goes through the same function."""
    norms = torch.stack([g.norm() for g in gradients])
    if scope == "global":
        factor = clip_factors(norms.norm(), bound)  # the rule of DP's clipping, without its noise
        return [g * factor for g in gradients]
    return [g * f for g, f in zip(gradients, clip_factors(norms, bound))]


def classifier_input(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """r: what the model's last linear layer takes, [B, F], differentiable with respect to `images`."""
    linear = model.get_submodule(classifier_weight_name(model).rpartition(".")[0])
    seen: list[torch.Tensor] = []
    handle = linear.register_forward_pre_hook(lambda _module, inputs: seen.append(inputs[0]))
    try:
        model(images)
    finally:
        handle.remove()
    return seen[0].flatten(1)


def soteria_mask(model: nn.Module, images: torch.Tensor, percentile: float) -> torch.Tensor:
    """Soteria's kept representation entries, [F] booleans: entry f is pruned when its sum over
    the batch of ||d r_f / d x_b|| / (r_bf + 0.1), in absolute value, is under the `percentile`-th
    percentile of the entries' signed sums (linear interpolation), as the reference code compares
    them (the same thing for ReLU features, r >= 0). d r_f / d x_b is the image
    gradient of the whole batch's entry f, one backward per entry as the reference code takes it
    (in train-mode BatchNorm the samples' representations depend on one another); batching the
    backwards through vmap was slower here (docs/defenses.md)."""
    x = images.detach().clone().requires_grad_(True)
    r = classifier_input(copy.deepcopy(model), x)  # a train-mode forward moves running statistics: not the client's
    sensitivity = torch.empty(r.shape[1], r.shape[0], dtype=r.dtype)
    seed = torch.zeros_like(r)
    for f in range(r.shape[1]):
        seed[:, f] = 1
        (dx,) = torch.autograd.grad(r, x, seed, retain_graph=True)
        sensitivity[f] = dx.flatten(1).norm(dim=1).cpu()
        seed[:, f] = 0
    ratio = (sensitivity.T / (r.detach().cpu() + SOTERIA_OFFSET)).sum(0)
    return ratio.abs().double() >= torch.quantile(ratio.double(), percentile / 100)


def defended(
    gradients: Grads, defense: DefenseParams, model: nn.Module | None = None, images: torch.Tensor | None = None
) -> Grads:
    """The upload after the client's defense. Soteria also needs the client's model at the weights
    its update started from, in its mode, and its images."""
    names = list(gradients)
    if isinstance(defense, PruningParams):
        return {n: g * pruning_mask(g, defense.ratio) for n, g in gradients.items()}
    if isinstance(defense, ClippingParams):
        return dict(zip(names, clipped([gradients[n] for n in names], defense.bound, defense.scope)))
    if isinstance(defense, SignParams):
        return {n: g.sign() for n, g in gradients.items()}
    assert isinstance(defense, SoteriaParams)
    if model is None or images is None:
        raise ValueError("Soteria needs the client's model and images")
    classifier = classifier_weight_name(model)
    keep = soteria_mask(model, images, defense.percentile).to(gradients[classifier])
    return {**gradients, classifier: gradients[classifier] * keep}


def relaxed_sign(g: torch.Tensor, temperature: float) -> torch.Tensor:
    """tanh(g / tau), tau = temperature times g's RMS, held constant (detached)."""
    tau = (temperature * g.detach().pow(2).mean().sqrt()).clamp_min(torch.finfo(g.dtype).tiny)
    return torch.tanh(g / tau)


def estimated_bound(upload: list[torch.Tensor], scope: str) -> float:
    """The clip bound as GGL reads it off the upload: its norm (global), or its largest tensor's
    norm (per-tensor). Where the clip acted, that is the bound; where it did not, clipping the
    true gradient at it changes nothing: at the truth the estimate gives the upload either way."""
    norms = torch.stack([u.double().norm() for u in upload])
    return float(norms.norm() if scope == "global" else norms.max())


class ModelledDefense:
    """A defense as the adaptive attacker applies it to its dummy upload (one tensor per trainable
    parameter of the client's `model`, in the model's order), differentiably:

    - pruning, `pruning` "magnitude": the client's transform on the dummy upload, each tensor's
      smallest entries zeroed, as many as the stated ratio prunes of the upload's (the mask moves
      with the dummy; the kept entries carry the gradient); "mask": the upload's zeros kept as
      zeros on every tensor (GIFD's comparison on the kept entries; no ratio needed);
    - Soteria: the upload's zeros of the classifier's weight gradient (only that layer is pruned);
    - clipping: the same clip at the stated bound, or at the one estimated from the upload (GGL);
    - sign: tanh(g / tau), tau = `temperature` times the tensor's RMS (held constant through the
      step): it tends to sign(g) as the temperature falls, and unlike sign its gradient is not zero
      almost everywhere.
    """

    def __init__(
        self,
        defense: DefenseParams,
        upload: Grads,
        model: nn.Module,
        temperature: float = 0.1,
        bound_known: bool = True,
        pruning: str = "magnitude",
    ):
        self.defense, self.temperature = defense, temperature
        names, classifier = [n for n, p in model.named_parameters() if p.requires_grad], classifier_weight_name(model)
        self.names = names
        self.masks: list[torch.Tensor | None] = [None] * len(names)
        # magnitude pruning on the dummy: entries kept per tensor, counted on the whole tensor (a
        # cropped one's dead taps, whose gradient is 0, are among the pruned)
        self.kept: list[int] | None = None
        if isinstance(defense, PruningParams) and pruning == "magnitude":
            self.kept = [kept_entries(upload[n].numel(), defense.ratio) for n in names]
        elif isinstance(defense, PruningParams):
            self.masks = [upload[n] != 0 for n in names]
        elif isinstance(defense, SoteriaParams):
            self.masks = [upload[n] != 0 if n == classifier else None for n in names]
        self.bound = None
        if isinstance(defense, ClippingParams):
            self.bound = defense.bound if bound_known else estimated_bound([upload[n] for n in names], defense.scope)

    def cropped(self, crops: dict[str, tuple[slice, ...]]) -> ModelledDefense:
        """This transform for a model whose weights named in `crops` are cut to their live taps
        (pipeline.nets.crop_dead_taps): its masks cut the same way. (The dead taps' gradient is 0:
        clipping norms are the same; sign's RMS is then over the live taps.)"""
        cut = copy.copy(self)
        cut.masks = [m if m is None or n not in crops else m[crops[n]] for n, m in zip(self.names, self.masks)]
        return cut

    def to(self, device: torch.device) -> ModelledDefense:
        """This transform with its masks on `device` (itself where they are already there)."""
        moved = copy.copy(self)
        moved.masks = [None if m is None else m.to(device) for m in self.masks]
        return moved

    def __call__(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        d = self.defense
        if isinstance(d, ClippingParams):
            assert self.bound is not None
            return clipped(grads, self.bound, d.scope)
        if isinstance(d, SignParams):
            return [relaxed_sign(g, self.temperature) for g in grads]
        if self.kept is not None:
            return [g * largest_mask(g, k) for g, k in zip(grads, self.kept)]
        return [g if m is None else g * m for g, m in zip(grads, self.masks)]
