"""Label recovery from the classifier's weight gradient (iDLG, LLG) without the images."""

from __future__ import annotations

import torch

from pipeline.errors import PipelineError

LABEL_METHODS = ("known", "llg", "llg-original", "idlg")


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


def recover_labels(
    method: str, fc_weight_grad: torch.Tensor, batch_size: int, known: torch.Tensor | None = None
) -> torch.Tensor:
    """Labels for the dummy batch by `method`: known (from the threat model), llg, llg-original or idlg."""
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
    raise PipelineError(f"unknown label method {method!r}; choose one of {', '.join(LABEL_METHODS)}")

