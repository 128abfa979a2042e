import pytest
import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from pipeline.errors import PipelineError
from pipeline.metrics import Lpips, image_metrics, label_accuracy, pair_by_hungarian


def _pairs(n=6):
    truth = torch.rand(n, 1, 32, 32)
    recon = (truth + 0.1 * torch.randn_like(truth)).clamp(0, 1)
    return recon, truth


def test_psnr_and_ssim_equal_torchmetrics_per_image():
    recon, truth = _pairs()
    ours = image_metrics(recon, truth)
    for i in range(len(truth)):
        psnr = PeakSignalNoiseRatio(data_range=1.0)(recon[i : i + 1], truth[i : i + 1])
        ssim = StructuralSimilarityIndexMeasure(data_range=1.0)(recon[i : i + 1], truth[i : i + 1])
        assert abs(float(ours["psnr"][i]) - float(psnr)) < 1e-4
        assert abs(float(ours["ssim"][i]) - float(ssim)) < 1e-5
        mse = float(((recon[i] - truth[i]) ** 2).mean())
        assert abs(float(ours["psnr"][i]) - 10 * torch.log10(torch.tensor(1 / mse))) < 1e-4


def test_hungarian_pairing_makes_a_shuffle_score_like_the_ordered_batch():
    recon, truth = _pairs(8)
    shuffle = torch.randperm(8)
    shuffled = recon[shuffle]
    order = pair_by_hungarian(shuffled, truth)
    assert torch.equal(shuffle[order], torch.arange(8))
    ordered, paired = image_metrics(recon, truth), image_metrics(shuffled[order], truth)
    for key in ordered:
        assert torch.equal(ordered[key], paired[key])
    # index pairing, as the original did, would score the same images far worse
    assert image_metrics(shuffled, truth)["psnr"].mean() < ordered["psnr"].mean() - 3


def test_label_accuracy_is_a_multiset_overlap():
    true = torch.tensor([3, 3, 1, 7])
    assert label_accuracy(true[torch.tensor([2, 0, 3, 1])], true) == 1.0
    for _ in range(5):  # any permutation of the true multiset
        labels = torch.randint(0, 10, (8,))
        assert label_accuracy(labels[torch.randperm(8)], labels) == 1.0
    assert label_accuracy(torch.tensor([3, 1, 7, 7]), true) == 0.75
    assert label_accuracy(torch.tensor([0, 0, 0, 0]), true) == 0.0


def test_lpips_without_backbone_weights_is_not_a_number_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty torchvision cache
    lpips = Lpips()
    assert not lpips.available and "LPIPS n/a" in lpips.reason and "alexnet-owt-7be5be79.pth" in lpips.reason
    with pytest.raises(PipelineError, match="lpips_backbone: .* is not a file"):
        Lpips(tmp_path / "missing.pth")


def test_lpips_runs_on_the_backbone_file_given():
    """The wiring, on a stand-in AlexNet (no ImageNet weights offline): the file's weights are the
    ones used, identical images score 0 and different ones more."""
    import tempfile

    from torchvision.models import alexnet

    torch.manual_seed(0)
    backbone = alexnet().state_dict()
    with tempfile.TemporaryDirectory() as folder:
        torch.save(backbone, f"{folder}/alexnet.pth")
        lpips = Lpips(f"{folder}/alexnet.pth")
    assert torch.equal(lpips.metric.net.net.slice1[0].weight, backbone["features.0.weight"])
    recon, truth = _pairs(3)
    assert torch.equal(lpips(truth, truth), torch.zeros(3, dtype=torch.float64))
    scores = lpips(recon, truth)
    assert scores.shape == (3,) and (scores > 0).all()
    assert torch.allclose(scores[1:2], lpips(recon[1:2], truth[1:2]))  # per image, whatever the batch


def test_identifiability_finds_each_reconstruction_among_candidates_by_its_nearest_image():
    from pipeline.metrics import identified

    g = torch.Generator().manual_seed(0)
    candidates = torch.rand(10, 1, 8, 8, generator=g)
    own = torch.tensor([2, 5, 7])
    near = candidates[own] + 0.01 * torch.randn(3, 1, 8, 8, generator=g)  # a close copy of its own image
    near[2] = candidates[4] + 0.01 * torch.randn(1, 8, 8, generator=g)  # the third is nearest another image
    assert identified(near, own, candidates).tolist() == [True, True, False]
    assert identified(candidates[own], own, candidates).all()  # exact reconstructions: all identified
