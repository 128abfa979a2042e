"""Label recovery from the classifier's gradient without the images: iDLG and LLG (weight rows),
and class counts from the bias gradient."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pipeline.errors import PipelineError

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
    mean_i (p_i - y_i), so the count of class c is B * (pbar_c - g_c): exact when the model's
    mean prediction pbar on the batch is known. The attacker estimates it from inputs of its own
    (`mean_probs`); on an untrained model predictions hardly depend on the input, so the counts
    come out exact, repeated classes included, where LLG's rule, made for distinct labels, is
    not. On a trained model pbar depends on the images and the estimate is what it is. The real
    counts are rounded to B by largest remainders (after clipping at 0).
    """
    estimate = (batch_size * (mean_probs.double() - fc_bias_grad.double())).clamp(min=0)
    if float(estimate.sum()) == 0:
        estimate = torch.ones_like(estimate)
    estimate = estimate * (batch_size / estimate.sum())
    whole = estimate.floor()
    left = batch_size - int(whole.sum())
    # The classes with the largest remainders take the images still to give (ties: lower class first).
    order = sorted(range(len(estimate)), key=lambda c: (-float(estimate[c] - whole[c]), c))
    for c in order[:left]:
        whole[c] += 1
    return torch.repeat_interleave(torch.arange(len(whole)), whole.long())


def mean_prediction(model: nn.Module, image_shape: tuple[int, ...], low: torch.Tensor, high: torch.Tensor,
                    probes: int = 256, seed: int = 0) -> torch.Tensor:
    """The model's mean softmax over `probes` inputs of the attacker's own: Gaussian noise in the
    pixel box, as the attack's starts are, through the model in its own mode (a copy, so that
    BatchNorm's running statistics stay the checkpoint's, and the global RNG is left alone)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn((probes, *image_shape), generator=generator).clamp_(low, high)
    probe = copy.deepcopy(model)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        return probe(inputs).double().softmax(dim=1).mean(dim=0)


def recover_labels(
    method: str, fc_weight_grad: torch.Tensor, batch_size: int, known: torch.Tensor | None = None,
    fc_bias_grad: torch.Tensor | None = None, mean_probs: torch.Tensor | None = None,
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
            raise PipelineError("attack.labels 'counts' reads the classifier's bias gradient, and the model's "
                                "classifier has no bias")
        return counts(fc_bias_grad, batch_size, mean_probs)
    raise PipelineError(f"unknown label method {method!r}; choose one of {', '.join(LABEL_METHODS)}")

