"""The client's batch in each trial: which victims it holds, the same at every checkpoint and, by
trial, in every setting that draws its batch the same way (the pairing the report's tests rest
on); and how much its labels repeat."""

from __future__ import annotations

import torch

from pipeline.errors import PipelineError
from pipeline.seeds import Draw, generator


def choose_batches(
    pool_labels: torch.Tensor, batch_size: int, trials: int, seed: int, label_repetition: int | None = None
) -> list[torch.Tensor]:
    """Positions in the victim pool of the client's batch in each trial, the same at every
    checkpoint. The trials' batches are disjoint, drawn from one seeded order of the pool, so
    trial t holds the same images in every setting of the same batch size without repetition.
    With k = `label_repetition`, trial t holds k classes x B/k images that truly belong to them,
    class by class (other images by construction: such batches pair only with themselves)."""
    pool = len(pool_labels)
    order = torch.randperm(pool, generator=generator(Draw.VICTIM_ORDER, seed))
    if label_repetition is None:
        if trials * batch_size > pool:
            raise PipelineError(
                f"extract.trials {trials} x batch_size {batch_size} needs {trials * batch_size} distinct "
                f"victims, but the pool holds {pool} (raise data.victims_per_class)"
            )
        return [order[t * batch_size : (t + 1) * batch_size] for t in range(trials)]
    present = torch.unique(pool_labels)
    k, per_class = label_repetition, batch_size // label_repetition
    if k > len(present):
        raise PipelineError(f"label_repetition {k}: the victim pool holds only {len(present)} classes")
    unused = {int(c): [int(i) for i in order if pool_labels[i] == c] for c in present}
    gen = generator(Draw.REPEATED_LABELS, seed)
    batches = []
    for t in range(trials):
        eligible = [c for c in unused if len(unused[c]) >= per_class]
        if len(eligible) < k:
            raise PipelineError(
                f"extract.trials {trials} with label_repetition {k}: trial {t} finds only "
                f"{len(eligible)} classes with {per_class} unused victims left, {k} needed "
                "(raise data.victims_per_class)"
            )
        chosen = [eligible[i] for i in torch.randperm(len(eligible), generator=gen)[:k].tolist()]
        batches.append(torch.tensor([unused[c].pop(0) for c in chosen for _ in range(per_class)]))
    return batches


def repetition_rate(labels: torch.Tensor) -> float:
    """Share of the batch whose label repeats one already in it: 1 - distinct labels / B."""
    return 1.0 - len(torch.unique(labels)) / len(labels)
