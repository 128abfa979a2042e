"""Label recovery from the classifier's gradient without the images: iDLG and LLG (weight rows),
and class counts from the bias gradient."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.seeds import Draw, generator, mix

LABEL_METHODS = ("known", "llg", "llg-original", "idlg", "counts")


def _class_scores(fc_weight_grad: torch.Tensor) -> torch.Tensor:
    # Row c of dL/dW is (p_c - y_c) * features summed over the batch; with non-negative
    # features (after ReLU) the rows of present classes are pulled negative.
    return fc_weight_grad.double().sum(dim=1)


def idlg(fc_weight_grad: torch.Tensor) -> torch.Tensor:
    """iDLG for one image: the only class whose weight-gradient row is negative."""
    return _class_scores(fc_weight_grad).argmin().reshape(1)


def llg(fc_weight_grad: torch.Tensor, batch_size: int, present_by: str = "row-min") -> torch.Tensor:
    """The original's LLG variant, sorted by class index.

    Every present class is taken once; then the class with the lowest row sum is taken
    repeatedly, its sum raised by the estimated impact of one sample each time.

    `present_by="row-sum"` is the original's rule: a class is present when its row sum is
    negative. The sum is (sum_i p_ic |h_i|) - |h_j|, so with few classes (p_c ~ 1/10) a
    present class the model already favours is missed. `"row-min"` (the default) takes a
    class as present when any entry of its row is negative, which with non-negative features
    happens only for present classes (Yin et al., GradInversion). Neither rule crashes on an
    empty set or on more present classes than images, as the original did.
    """
    scores = _class_scores(fc_weight_grad)
    row = fc_weight_grad.min(dim=1).values if present_by == "row-min" else scores
    present = torch.nonzero(row < 0).flatten()
    if present.numel() == 0:
        present = scores.argmin().reshape(1)
    if present.numel() > batch_size:
        present = present[scores[present].argsort()[:batch_size]].sort().values
    impact = scores[present].sum() / batch_size * (1 + 1 / present.numel())
    labels = present.tolist()
    scores[present] -= impact
    while len(labels) < batch_size:
        c = int(scores.argmin())
        labels.append(c)
        scores[c] -= impact
    return torch.tensor(sorted(labels), dtype=torch.long)


def counts(fc_bias_grad: torch.Tensor, batch_size: int, mean_probs: torch.Tensor) -> torch.Tensor:
    """How many images of each class the batch holds, sorted by class index.

    Under softmax cross-entropy averaged over the batch, the classifier's bias gradient is
    g = mean_i (p_i - y_i), so class c holds B * (pbar_c - g_c) images, pbar the model's mean
    prediction on the batch. Two facts are used. A class with g_c < 0 is certainly in the
    batch (pbar_c >= 0, so n_c > 0): those classes get one image each. The images left go to
    them in proportion to B * (pbar_c - g_c) - 1, with pbar estimated on inputs of the
    attacker's own (`mean_probs`), rounded by largest remainders. On an untrained model,
    whose predictions hardly depend on the input, the estimate is exact and so are the counts,
    repeated classes included, where LLG's rule, made for distinct labels, is not. On a
    trained model pbar depends on the images; the present classes are still the certain ones
    and the shares are an estimate (a class the model over-predicts can be missed).
    """
    g = fc_bias_grad.double()
    present = torch.nonzero(g < 0).flatten()
    if present.numel() == 0:
        present = g.argmin().reshape(1)
    if present.numel() > batch_size:  # more certain classes than images: only with noise in the upload
        present = present[g[present].argsort()[:batch_size]].sort().values
    whole = torch.zeros_like(g)
    whole[present] = 1
    left = batch_size - present.numel()
    weight = (batch_size * (mean_probs.double() - g) - 1).clamp(min=0)[present]
    if float(weight.sum()) == 0:
        weight = torch.ones_like(weight)
    share = weight * (left / weight.sum())
    whole[present] += share.floor()
    remainder = share - share.floor()
    missing = batch_size - int(whole.sum())
    # the classes with the largest remainders take the images still to give (ties: lower class first)
    order = sorted(range(present.numel()), key=lambda i: (-float(remainder[i]), int(present[i])))
    for i in order[:missing]:
        whole[present[i]] += 1
    return torch.repeat_interleave(torch.arange(len(whole)), whole.long())


def mean_prediction(
    model: nn.Module,
    image_shape: tuple[int, ...],
    low: torch.Tensor,
    high: torch.Tensor,
    probes: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    """The model's mean softmax over `probes` inputs of the attacker's own: Gaussian noise in the
    pixel box, as the attack's starts are, through the model in its own mode (a copy, so that
    BatchNorm's running statistics stay the checkpoint's, and the global RNG is left alone)."""
    inputs = torch.randn((probes, *image_shape), generator=generator(Draw.LABEL_PROBES, seed)).clamp_(low, high)
    probe = copy.deepcopy(model)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(mix(Draw.LABEL_PROBES, seed))
        return probe(inputs).double().softmax(dim=1).mean(dim=0)


def recover_labels(
    method: str,
    fc_weight_grad: torch.Tensor,
    batch_size: int,
    known: torch.Tensor | None = None,
    fc_bias_grad: torch.Tensor | None = None,
    mean_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Labels for the dummy batch by `method`: known (from the threat model), llg, llg-original,
    idlg, or counts (needs the bias gradient and the model's estimated mean prediction)."""
    if method == "known":
        if known is None:
            raise PipelineError(
                "attack.labels is 'known' but the upload does not reveal its labels "
                "(set extract.reveal_labels: true, or use attack.labels: llg)"
            )
        return known.clone()
    if method in ("llg", "llg-original"):
        return llg(fc_weight_grad, batch_size, present_by="row-sum" if method == "llg-original" else "row-min")
    if method == "idlg":
        if batch_size != 1:
            raise PipelineError(f"attack.labels 'idlg' needs a batch of 1 image, the upload has {batch_size}")
        return idlg(fc_weight_grad)
    if method == "counts":
        if fc_bias_grad is None or mean_probs is None:
            raise PipelineError(
                "attack.labels 'counts' reads the classifier's bias gradient, and the model's classifier has no bias"
            )
        return counts(fc_bias_grad, batch_size, mean_probs)
    raise PipelineError(f"unknown label method {method!r}; choose one of {', '.join(LABEL_METHODS)}")
