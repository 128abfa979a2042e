"""How much the attacker recovered: images paired one-to-one with the truth, then scored.

The original compared reconstruction j with target j; LLG returns labels sorted by class,
so good reconstructions were scored against the wrong images. Here every reconstruction is
paired with one true image by the Hungarian method on per-pair MSE before any metric.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def pair_by_hungarian(reconstructions: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """order such that reconstructions[order[i]] is paired with truth[i] (minimal total MSE)."""
    cost = ((truth[:, None] - reconstructions[None]) ** 2).flatten(2).mean(2)  # [truth, recon]
    rows, cols = linear_sum_assignment(cost.double().numpy())
    return torch.as_tensor(cols[rows.argsort()], dtype=torch.long)


def image_metrics(reconstructions: torch.Tensor, truth: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image MSE, PSNR (dB) and SSIM (Wang's, 11-px Gaussian window, sigma 1.5) in [0, 1] space.

    Both inputs are [B, C, H, W] in [0, 1] and already paired image by image.
    """
    recon, truth = reconstructions.double(), truth.double()
    mse = ((recon - truth) ** 2).flatten(1).mean(1)
    psnr = peak_signal_noise_ratio(recon, truth, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(recon, truth, data_range=1.0, reduction="none")
    return {"mse": mse, "psnr": psnr, "ssim": ssim}


def label_accuracy(predicted: torch.Tensor, true: torch.Tensor) -> float:
    """Multiset overlap of two label lists over the batch size: the order does not matter."""
    n = max(int(true.max()), int(predicted.max())) + 1
    overlap = torch.minimum(torch.bincount(predicted, minlength=n), torch.bincount(true, minlength=n))
    return float(overlap.sum()) / len(true)
