"""How much the attacker recovered: images paired one-to-one with the truth, then scored.

The original compared reconstruction j with target j; LLG returns labels sorted by class,
so good reconstructions were scored against the wrong images. Here every reconstruction is
paired with one true image by the Hungarian method on per-pair MSE before any metric.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from pipeline.errors import PipelineError


def pair_by_hungarian(
    reconstructions: torch.Tensor, truth: torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """order such that reconstructions[order[i]] is paired with truth[i] (minimal total MSE);
    with `labels` (one per position, the same for both batches), only positions of one label pair."""
    from scipy.optimize import linear_sum_assignment

    cost = ((truth[:, None] - reconstructions[None]) ** 2).flatten(2).mean(2)  # [truth, recon]
    if labels is not None:
        cost = cost.masked_fill(labels[:, None] != labels[None], float("inf"))
    rows, cols = linear_sum_assignment(cost.double().numpy())
    return torch.as_tensor(cols[rows.argsort()], dtype=torch.long)


def image_metrics(reconstructions: torch.Tensor, truth: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image MSE, PSNR (dB) and SSIM (Wang's, 11-px Gaussian window, sigma 1.5) in [0, 1] space.

    Both inputs are [B, C, H, W] in [0, 1] and already paired image by image.
    """
    # torchmetrics imports torchvision, seconds at every stage's start: only where scored
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    recon, truth = reconstructions.double(), truth.double()
    mse = ((recon - truth) ** 2).flatten(1).mean(1)
    psnr = peak_signal_noise_ratio(recon, truth, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(recon, truth, data_range=1.0, reduction="none")
    assert isinstance(ssim, torch.Tensor)  # a tensor, not the (ssim, image) pair it returns when asked
    return {"mse": mse, "psnr": psnr, "ssim": ssim}


def paired_scores(reconstructions: torch.Tensor, truth: torch.Tensor) -> dict[str, torch.Tensor]:
    """image_metrics of a batch's reconstructions, each paired with its truth by pair_by_hungarian."""
    return image_metrics(reconstructions[pair_by_hungarian(reconstructions, truth)], truth)


def identified(reconstructions: torch.Tensor, own: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Image identifiability: for each reconstruction (paired, [B, C, H, W] in [0, 1]), whether its
    nearest candidate by MSE is its own true image; `own[i]` is that image's row of `candidates`
    ([N, C, H, W] in [0, 1]). A success rate without a PSNR threshold ("Robbing the Fed",
    breaching's IIP); ties go to the lower row, so a candidate equal to the truth does not count."""
    distance = ((reconstructions.double()[:, None] - candidates.double()[None]) ** 2).flatten(2).mean(2)
    return distance.argmin(dim=1) == own


def label_accuracy(predicted: torch.Tensor, true: torch.Tensor) -> float:
    """Multiset overlap of two label lists over the batch size: the order does not matter."""
    n = max(int(true.max()), int(predicted.max())) + 1
    overlap = torch.minimum(torch.bincount(predicted, minlength=n), torch.bincount(true, minlength=n))
    return float(overlap.sum()) / len(true)


def gradient_heterogeneity(upload: dict[str, torch.Tensor], modelled: dict[str, torch.Tensor]) -> float | None:
    """GH = 1 - cos(upload, g_sim) over all parameters, g_sim the gradient the attacker models
    (one step, the whole batch, synchronous BatchNorm, at theta_0). None when either is zero."""
    a = torch.cat([upload[n].double().flatten() for n in sorted(modelled)])
    b = torch.cat([modelled[n].double().flatten() for n in sorted(modelled)])
    norms = a.norm() * b.norm()
    return None if norms == 0 else float(1 - a @ b / norms)


def gradient_information_ratio(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """GIR per sample (%): <g_i, g>, g_i sample i's loss gradient in one batch forward and g the
    batch's mean, shifted non-negative and normalised to sum 100 (the original's "leaker" score).

    `model` is used as given (mode included); pass a copy if its running statistics matter.
    """
    from torch.nn import functional as F

    params = [p for p in model.parameters() if p.requires_grad]
    losses = F.cross_entropy(model(images), labels, reduction="none")
    rows = [torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)]) for loss in losses]
    per_sample = torch.stack(rows).double()
    info = per_sample @ per_sample.mean(0)
    shift = max(0.0, -float(info.min()))
    return 100 * (info + shift) / (info.sum() + len(info) * shift)


class Lpips:
    """LPIPS (torchmetrics, AlexNet backbone) when the backbone's ImageNet weights are on this
    machine: torchvision's cache (`torch.hub.get_dir()/checkpoints`) or an explicit file. The
    linear heads ship with torchmetrics. Without the weights `available` is False and `reason`
    says why: a randomly initialised backbone's number would look like a result and mean nothing.
    """

    def __init__(self, backbone: Path | str | None = None):
        from torchvision.models import AlexNet_Weights

        file_name = Path(AlexNet_Weights.DEFAULT.url).name
        cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
        self.metric, self.reason = None, None
        if backbone is not None and not Path(backbone).is_file():
            raise PipelineError(f"evaluate.lpips_backbone: {backbone} is not a file")
        source = Path(backbone) if backbone is not None else cached
        if not source.is_file():
            self.reason = (
                f"LPIPS n/a: the AlexNet ImageNet weights are not on this machine ({cached}); "
                f"put {file_name} there or set evaluate.lpips_backbone"
            )
            return
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        with tempfile.TemporaryDirectory() as hub:  # torchvision reads the backbone from <hub>/checkpoints
            (Path(hub) / "checkpoints").mkdir()
            (Path(hub) / "checkpoints" / file_name).symlink_to(source.resolve())
            previous = torch.hub.get_dir()
            torch.hub.set_dir(hub)
            try:
                self.metric = LearnedPerceptualImagePatchSimilarity("alex", reduction="none", normalize=True)
            finally:
                torch.hub.set_dir(previous)

    @property
    def available(self) -> bool:
        return self.metric is not None

    def __call__(self, reconstructions: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS of paired [B, C, H, W] images in [0, 1]; grey images are repeated to RGB."""
        if reconstructions.shape[1] == 1:
            reconstructions, truth = reconstructions.expand(-1, 3, -1, -1), truth.expand(-1, 3, -1, -1)
        if self.metric is None:
            raise RuntimeError("LPIPS is not available: check .available first")
        with torch.no_grad():
            return self.metric.net(reconstructions.float(), truth.float(), normalize=True).flatten().double()
