"""One attack's restarts and what is made of them: the reconstruction a restart returns (and its
job's result file), the best restart, and MLCO's image-by-image combination."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.files import load_tensors, save_tensors
from pipeline.metrics import pair_by_hungarian


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


def best_of(reconstructions: list[Reconstruction]) -> Reconstruction:
    """The restart with the lowest gradient loss (the earliest on a tie)."""
    return min(reconstructions, key=lambda r: (r.grad_loss, r.restart))


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


def save_reconstruction(path: Path, rec: Reconstruction) -> None:
    """A restart's reconstruction as one file (a job's result)."""
    tensors = {"images": rec.images, "labels": rec.labels}
    meta = {f.name: getattr(rec, f.name) for f in dataclasses.fields(rec) if f.name not in tensors}
    save_tensors(path, tensors, {**meta, "tail": None if rec.tail is None else list(rec.tail)})


def load_reconstruction(path: Path) -> Reconstruction:
    tensors, meta = load_tensors(path, expected={"images", "labels"})
    return Reconstruction(
        tensors["images"],
        tensors["labels"],
        meta["grad_loss"],
        meta["restart"],
        [tuple(point) for point in meta["curve"]],
        meta["note"],
        meta["iterations_run"],
        meta["seconds"],
        None if meta["tail"] is None else tuple(meta["tail"]),
        meta["converged"],
        meta.get("sources"),  # absent from files written before it was kept
    )
