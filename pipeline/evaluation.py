"""Scoring one reconstruction against its truth: each reconstructed image paired with a true one
(Hungarian on MSE), PSNR, SSIM, MSE, LPIPS and identifiability (IIP: whether its nearest image
by MSE, among the victim pool and as many of the attacker's own images, is its own), and the
label accuracy; and chance: the PSNR of the truth against as many of the attacker's own images,
paired the same way, what an attack that learnt nothing of the batch would score. Only evaluation
reads the truth."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from pipeline.data import in_memory, load_split
from pipeline.errors import PipelineError
from pipeline.files import load_tensors
from pipeline.metrics import Lpips, identified, image_metrics, label_accuracy, pair_by_hungarian
from pipeline.uploads import ADAPTIVE, load_truth

SCORES = ("psnr", "ssim", "mse", "lpips", "iip")


def score_summary(values) -> dict[str, float] | None:
    if values.isna().all():  # LPIPS without its backbone weights
        return None
    return {"mean": round(float(values.mean()), 6), "std": round(float(values.std(ddof=0)), 6)}


def identification_pool(data: Path) -> tuple[torch.Tensor, int]:
    """The images a reconstruction is identified among ([0, 1]): the victim pool's, in its order
    (row = victim position), then as many of the attacker's own; and the victim count."""
    victims = in_memory(load_split(data, "victims")[0], data / "victims.safetensors").images
    own, _ = load_split(data, "attacker")
    count = min(len(victims), len(own.labels))
    others = own.images_at(torch.arange(count))
    return torch.cat([victims, others]).float() / 255, len(victims)


def chance_psnr(truth: torch.Tensor, own: torch.Tensor, trial: int) -> torch.Tensor:
    """Per true image, the PSNR of the attacker's own image it is paired with (Hungarian, as a
    reconstruction is), from the batch of `len(truth)` own images the trial's position picks:
    what an attack that recovered nothing of the batch, but draws real images of the data,
    scores."""
    picked = own[(trial * len(truth) + torch.arange(len(truth))) % len(own)]
    return image_metrics(picked[pair_by_hungarian(picked, truth)], truth)["psnr"]


def evaluate_upload(
    path: Path, truths: Path, lpips: Lpips, pool: tuple[torch.Tensor, int], attacker: str = ADAPTIVE
) -> tuple[list[dict], dict]:
    """Per-image rows and the upload's summary for one reconstruction file, scored against its
    truth in `truths`/<setting>/; `pool`: the identification candidates (identification_pool)."""
    rec, meta = load_tensors(path, expected={"images", "labels"})
    setting = meta["setting"]
    truth_u8, truth_labels, truth_meta = load_truth(truths / setting / path.name)
    truth = truth_u8.float() / 255
    if rec["images"].shape != truth.shape:
        raise PipelineError(f"{path}: reconstruction shape {tuple(rec['images'].shape)} != truth {tuple(truth.shape)}")
    order = pair_by_hungarian(rec["images"], truth)
    paired = rec["images"][order]
    scores = image_metrics(paired, truth)
    scores["lpips"] = lpips(paired, truth) if lpips.available else torch.full((len(truth),), float("nan"))
    images, victims = pool
    scores["iip"] = identified(paired, torch.as_tensor(truth_meta["victim_positions"]), images).double()
    scores["chance_psnr"] = chance_psnr(truth, images[victims:], meta["trial"])
    rows = [
        {
            "setting": setting,
            "attacker": attacker,
            "scheme": meta["scheme"],
            "upload": path.stem,
            "checkpoint": meta["checkpoint"],
            "step": meta["step"],
            "trial": meta["trial"],
            "image": i,
            "victim": truth_meta["victim_positions"][i],
            "true_label": int(truth_labels[i]),
            "gir": truth_meta["gir"][i],
            "reconstruction": int(order[i]),
            "converged": meta["converged"],
            **{k: round(float(v[i]), 6) for k, v in scores.items()},
        }
        for i in range(len(truth))
    ]
    frame = pd.DataFrame(rows)
    summary = {
        "setting": setting,
        "scheme": meta["scheme"],
        "checkpoint": meta["checkpoint"],
        "step": meta["step"],
        "trial": meta["trial"],
        "converged": meta["converged"],
        "label_accuracy": label_accuracy(rec["labels"], truth_labels),
        **{k: score_summary(frame[k]) for k in SCORES},
    }
    return rows, summary
