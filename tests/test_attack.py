import copy
import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from pipeline.attack import invert, recover_labels
from pipeline.attack.bn_prior import BatchNormPrior, pooled_statistics
from pipeline.attack.client_model import LocalSteps, dummy_gradient, unrolled_update
from pipeline.attack.compiled import check_compiled
from pipeline.attack.labels import mean_prediction
from pipeline.attack.objective import GradientMatch, gradient_loss, total_variation
from pipeline.attack.restarts import Reconstruction, best_of, min_loss_combination
from pipeline.attack.target import pixel_box
from pipeline.client import batch_gradient, simulate_client, step_parts
from pipeline.data import to_unit_range
from pipeline.errors import PipelineError
from pipeline.metrics import image_metrics, label_accuracy, pair_by_hungarian
from pipeline.nets import build_model, classifier_weight_name, crop_dead_taps
from pipeline.sections import ClientParams
from tests.conftest import REPO, inversion_params
from tests.helpers import plain_client, target_of


def _fc_grad(model, images, labels, mode="eval"):
    return batch_gradient(model, images, labels, mode)[classifier_weight_name(model)]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_llg_recovers_distinct_labels_exactly_on_untrained_resnet18(mode):
    model = build_model("resnet18", 3, 10, 32)
    one = recover_labels("llg", _fc_grad(model, torch.randn(1, 3, 32, 32), torch.tensor([4]), "eval"), 1)
    assert one.tolist() == [4]
    original = []
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        images, labels = torch.randn(8, 3, 32, 32, generator=gen), torch.randperm(10, generator=gen)[:8]
        grad = _fc_grad(model, images, labels, mode)
        got = recover_labels("llg", grad, 8)
        assert got.tolist() == sorted(labels.tolist())  # exact, and in class order
        original.append(label_accuracy(recover_labels("llg-original", grad, 8), labels))
    # The original's row-sum rule misses classes the model already favours (10 classes, p ~ 0.1).
    assert sum(original) / len(original) < 1.0


def test_llg_with_repeated_labels_returns_a_full_batch():
    model = build_model("resnet18", 3, 10, 32)
    labels = torch.tensor([2, 2, 2, 5, 5, 7, 7, 7])
    got = recover_labels("llg", _fc_grad(model, torch.randn(8, 3, 32, 32), labels, "train"), 8)
    assert len(got) == 8 and set(got.tolist()) == {2, 5, 7}


@pytest.mark.parametrize("arch,channels", [("convnet", 1), ("resnet18", 3)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_counts_recover_repeated_labels_exactly_on_untrained_models(arch, channels, mode):
    """B = 8, 4 classes x 2 (label repetition): the bias gradient counts every class, with the mean
    prediction estimated on the attacker's own noise; with the batch's true mean prediction the
    formula B * (pbar - g) gives the integer counts themselves."""
    model = build_model(arch, channels, 10, 32).train(mode == "train")
    mean, std = [0.286] * channels, [0.353] * channels
    estimated = mean_prediction(model, (channels, 32, 32), *pixel_box(mean, std))
    weight = classifier_weight_name(model)
    llg = []
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        labels = torch.randperm(10, generator=gen)[:4].repeat_interleave(2)
        images = torch.randn(8, channels, 32, 32, generator=gen)
        grads = batch_gradient(model, images, labels, mode)
        bias = grads[weight.removesuffix("weight") + "bias"]
        got = recover_labels("counts", grads[weight], 8, fc_bias_grad=bias, mean_probs=estimated)
        assert got.tolist() == sorted(labels.tolist()), seed
        with torch.no_grad():
            true_mean = copy.deepcopy(model)(images).double().softmax(dim=1).mean(dim=0)
        real = 8 * (true_mean - bias.double())
        assert torch.allclose(real, F.one_hot(labels, 10).sum(dim=0).double(), atol=1e-4)
        llg.append(label_accuracy(recover_labels("llg", grads[weight], 8), labels))
    # LLG's rule, made for distinct labels: exact on the ConvNet here; on ResNet-18 in train mode
    # 4 of the 6 batches exact, label accuracy 0.96 (counts: 6 of 6)
    if (arch, mode) == ("resnet18", "train"):
        assert sum(x == 1.0 for x in llg) < len(llg), llg


def test_counts_need_a_bias_gradient():
    with pytest.raises(PipelineError, match="bias"):
        recover_labels("counts", torch.zeros(10, 4), 4)


def test_idlg_exact_for_one_image():
    model = build_model("resnet18", 1, 10, 32)
    for label in range(10):
        got = recover_labels("idlg", _fc_grad(model, torch.randn(1, 1, 32, 32), torch.tensor([label])), 1)
        assert got.tolist() == [label]


def test_known_labels_need_the_threat_model_to_reveal_them():
    with pytest.raises(PipelineError, match="does not reveal its labels"):
        recover_labels("known", torch.zeros(10, 4), 1, known=None)


def test_convnet_single_image_reconstruction_reaches_25db(fashion_images):
    """Untrained small ConvNet, B = 1, known labels, 300 iterations: a real Fashion-MNIST image comes back."""
    images, labels, mean, std = fashion_images
    x, y = images[:1], labels[:1]
    model = build_model("convnet", 1, 10, 32).train()
    target = batch_gradient(model, x, y, "train")
    settings = inversion_params(iterations=300, lr=0.1, lr_min=1e-3, tv_weight=1e-2, restarts=1)
    rec = invert(target_of(model, target, y, mean, std), settings, 0, progress=False)
    got, truth = to_unit_range(rec.images, mean, std), to_unit_range(x, mean, std)
    psnr = float(image_metrics(got[pair_by_hungarian(got, truth)], truth)["psnr"][0])
    assert psnr >= 25.0, psnr
    assert rec.grad_loss < 0.05
    assert rec.converged  # its loss had flattened: 0.0112 -> 0.0100 in the last tenth, of 0.74 -> 0.01 in all


def test_an_attack_cut_short_is_flagged_as_not_converged(fashion_images):
    """40 iterations at a constant step: the last tenth still brings 3 % of the whole decrease."""
    images, labels, mean, std = fashion_images
    model = build_model("convnet", 1, 10, 32).train()
    target = batch_gradient(model, images[:1], labels[:1], "train")
    settings = inversion_params(iterations=40, lr=0.1, lr_min=0.1, tv_weight=1e-2, restarts=1)
    rec = invert(target_of(model, target, labels[:1], mean, std), settings, 0, progress=False)
    first, before, last = rec.tail
    assert rec.converged is False and before - last > 0.01 * (first - last)
    assert rec.grad_loss == last


def test_attack_is_deterministic_for_a_seed(fashion_images):
    images, labels, mean, std = fashion_images
    model = build_model("convnet", 1, 10, 32).train()
    target = batch_gradient(model, images[:2], labels[:2], "train")
    settings = inversion_params(iterations=20, lr=0.1, lr_min=1e-3, tv_weight=1e-2, restarts=2)
    a = invert(target_of(model, target, labels[:2], mean, std), settings, 3, progress=False)
    b = invert(target_of(model, target, labels[:2], mean, std), settings, 3, progress=False)
    assert torch.equal(a.images, b.images) and a.grad_loss == b.grad_loss
    # the kept iterate is the one with the lowest gradient loss over the whole run
    assert a.grad_loss <= min(loss for _, loss in a.curve)


def test_reconstruction_stays_in_the_pixel_box(fashion_images):
    images, labels, mean, std = fashion_images
    model = build_model("convnet", 1, 10, 32).eval()
    target = {n: g for n, g in batch_gradient(model, images[:1], labels[:1], "eval").items()}
    settings = inversion_params(iterations=10, lr=0.5, lr_min=1e-3, tv_weight=0, restarts=1)
    rec = invert(target_of(model, target, labels[:1], mean, std), settings, 0, progress=False)
    pixels = rec.images * std[0] + mean[0]
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert F.cosine_similarity(rec.images.flatten(), images[:1].flatten(), dim=0) > -1  # a number, not NaN


def test_a_zero_upload_leaves_the_attacker_its_starting_guess():
    """A batch fit exactly (softmax saturated in float32) uploads zeros: no direction, no reconstruction."""
    model = build_model("convnet", 1, 10, 32).eval()
    zeros = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    settings = inversion_params(iterations=50, lr=0.1, lr_min=1e-3, tv_weight=1e-2, restarts=1)
    rec = invert(target_of(model, zeros, torch.tensor([1]), [0.3], [0.3]), settings, 0, progress=False)
    assert rec.note == "the upload is all zeros: nothing to invert"
    assert rec.grad_loss == 1.0 and torch.isfinite(rec.images).all()


def _by_hand(names, grads, target, objective, weights):
    """The objective computed the long way: a loop over the parameters, layer by layer."""
    layers = list(dict.fromkeys(n.rpartition(".")[0] for n in names))
    w = {
        n: (len(layers) - layers.index(n.rpartition(".")[0])) / len(layers) if weights == "linear" else 1.0
        for n in names
    }
    if objective == "l2":
        return sum(w[n] * ((g - target[n]) ** 2).sum() for n, g in zip(names, grads))
    dot = sum(w[n] * (g * target[n]).sum() for n, g in zip(names, grads))
    gg = sum(w[n] * (g * g).sum() for n, g in zip(names, grads))
    tt = sum(w[n] * (target[n] * target[n]).sum() for n in names)
    return 1 - dot / (gg.sqrt() * tt.sqrt())


def _image_gradient(model, match, x, labels):
    x = x.detach().requires_grad_(True)
    grads = dummy_gradient(model, x, labels)
    value, directions = match(grads)
    return float(value), torch.autograd.grad(grads, x, directions)[0]


@pytest.mark.parametrize("objective", ["cosine", "l2"])
def test_the_model_cut_to_its_live_kernel_taps_gives_the_full_models_objective(objective):
    torch.manual_seed(0)
    full = build_model("resnet18", 1, 10, 32).train()
    cut = copy.deepcopy(full)
    crops = crop_dead_taps(cut, (1, 32, 32))
    # layer4 sees 1 x 1 maps at 32 px (2 x 2 into its first, strided, convolution)
    assert sorted(crops) == [
        "layer4.0.conv1.weight",
        "layer4.0.conv2.weight",
        "layer4.1.conv1.weight",
        "layer4.1.conv2.weight",
    ]
    count = sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in cut.parameters())
    assert count == 3 * 512 * 512 * 8 + 512 * 256 * 5
    images, labels = torch.randn(8, 1, 32, 32), torch.arange(8)
    target = batch_gradient(full, images, labels, "train")
    for name, index in crops.items():  # the dead taps' gradient is zero by construction...
        dead = target[name].clone()
        dead[index] = 0
        assert not dead.any()
    # ... but not in an upload with noise (DP-SGD): L2 keeps them as a constant
    noisy = {n: g + 1e-3 * torch.randn_like(g) for n, g in target.items()}
    x = torch.randn(8, 1, 32, 32)
    want = _image_gradient(full, GradientMatch(full, noisy, objective, "linear"), x, labels)
    got = _image_gradient(cut, GradientMatch(cut, noisy, objective, "linear", crops), x, labels)
    names = [n for n, _ in full.named_parameters()]
    exact = _by_hand(
        names,
        [g.detach().double() for g in dummy_gradient(full, x, labels)],
        {n: t.double() for n, t in noisy.items()},
        objective,
        "linear",
    )
    assert got[0] == pytest.approx(float(exact), rel=1e-5)  # float32 sums over 11 M entries: want[0] is 2e-5 off
    assert want[0] == pytest.approx(float(exact), rel=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4 * float(want[1].abs().max()))
    for arch in ("convnet", "vgg11"):  # nothing to cut: every tap reads an image pixel somewhere
        assert crop_dead_taps(build_model(arch, 1, 10, 32), (1, 32, 32)) == {}
    assert crop_dead_taps(build_model("resnet18", 1, 10, 64), (1, 64, 64)) == {}
    # dilated and rectangular kernels on a 1 x 1 map: cut where the cut is exact, same outputs
    nn = torch.nn
    odd = nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(1, 4, 3, padding=2, dilation=2),
        nn.Conv2d(4, 4, (3, 1), padding=(1, 0)),
        nn.Conv2d(4, 4, 2, padding=1, dilation=2),
    )
    cut = copy.deepcopy(odd)
    assert [tuple(p.shape) for p in cut.parameters() if p.dim() == 4] == [(4, 1, 3, 3), (4, 4, 3, 1), (4, 4, 2, 2)]
    assert sorted(crop_dead_taps(cut, (1, 8, 8))) == ["1.weight", "2.weight"]  # the last reads no pixel: kept
    assert [tuple(p.shape) for p in cut.parameters() if p.dim() == 4] == [(4, 1, 1, 1), (4, 4, 1, 1), (4, 4, 2, 2)]
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(cut(x), odd(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "objective, weights", [("cosine", "equal"), ("cosine", "linear"), ("l2", "equal"), ("l2", "linear")]
)
def test_each_objective_and_its_gradient_equal_their_definition_and_vanish_at_the_truth(
    objective, weights, fashion_images
):
    images, labels, _, _ = fashion_images
    model = build_model("convnet", 1, 10, 32).eval()
    names = [n for n, _ in model.named_parameters()]
    x, y = images[:2], labels[:2]
    target = batch_gradient(model, x, y, "eval")
    match = GradientMatch(model, target, objective, weights)
    grads = [g.detach().requires_grad_(True) for g in dummy_gradient(model, torch.randn_like(x), y)]
    value, direction = match(grads)
    expected = _by_hand(names, grads, target, objective, weights)
    assert float(value) == pytest.approx(float(expected.detach()), rel=1e-4)
    # the written-out gradient of the term = autograd's gradient of the definition
    for got, want in zip(direction, torch.autograd.grad(expected, grads)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    assert float(match(dummy_gradient(model, x, y))[0]) == pytest.approx(0.0, abs=1e-5)
    assert float(value) > 1e-3


def test_the_l2_objective_also_brings_an_image_back(fashion_images):
    images, labels, mean, std = fashion_images
    model = build_model("convnet", 1, 10, 32).train()
    target = batch_gradient(model, images[:1], labels[:1], "train")
    settings = inversion_params(iterations=300, lr=0.1, lr_min=1e-3, tv_weight=1e-2, restarts=1, objective="l2")
    rec = invert(target_of(model, target, labels[:1], mean, std), settings, 0, progress=False)
    got, truth = to_unit_range(rec.images, mean, std), to_unit_range(images[:1], mean, std)
    assert float(image_metrics(got, truth)["psnr"][0]) >= 25.0


def test_the_batchnorm_prior_is_small_for_images_like_the_running_statistics(fashion_images):
    images, labels, mean, std = fashion_images
    model = build_model("convnet", 1, 10, 32).train()
    for m in model.modules():  # running statistics = those of these 32 real images
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model(images[:32])
    prior = BatchNormPrior(model, shards=1)
    with torch.no_grad():
        model(images[32:48])
        real = float(prior.take())
        model(torch.randn(16, 1, 32, 32))
        noise = float(prior.take())
    assert len(prior) == 3 and real < noise / 5, (real, noise)
    for handle in prior.handles:
        handle.remove()
    # the attack with the prior on leaves the caller's model alone
    target = batch_gradient(model.eval(), images[:1], labels[:1], "eval")
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    settings = inversion_params(iterations=20, lr=0.1, lr_min=1e-3, tv_weight=1e-2, restarts=1, bn_prior=0.1)
    rec = invert(target_of(model.train(), target, labels[:1], mean, std), settings, 0, progress=False)
    assert torch.isfinite(rec.images).all()
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())


def test_the_tv_target_stops_a_restart_once_its_best_iterate_is_smooth_enough(fashion_images):
    images, labels, mean, std = fashion_images
    model = build_model("convnet", 1, 10, 32).train()
    target = batch_gradient(model, images[:1], labels[:1], "train")

    def run(tv_target):
        settings = inversion_params(
            iterations=300, lr=0.1, lr_min=1e-3, tv_weight=1e-2, restarts=1, tv_target=tv_target
        )
        return invert(target_of(model, target, labels[:1], mean, std), settings, 0, progress=False)

    assert run(100.0).iterations_run == 1  # boxed noise (TV about 1.8) is under 100 at once
    rec = run(0.3)  # a real image's TV is about 0.22
    assert 1 < rec.iterations_run < 300 and float(total_variation(rec.images)) < 0.3
    assert run(None).iterations_run == 300


def test_a_prior_without_batchnorm_layers_and_no_tv_leaves_the_gradient_term_alone(fashion_images):
    images, labels, mean, std = fashion_images
    model = build_model("convnet", 1, 10, 32, norm="group").train()
    target = batch_gradient(model, images[:1], labels[:1], "train")
    plain = inversion_params(iterations=10, lr=0.1, lr_min=1e-3, tv_weight=0.0, restarts=1)
    with_prior = inversion_params(iterations=10, lr=0.1, lr_min=1e-3, tv_weight=0.0, restarts=1, bn_prior=0.1)
    a = invert(target_of(model, target, labels[:1], mean, std), plain, 0, progress=False)
    b = invert(target_of(model, target, labels[:1], mean, std), with_prior, 0, progress=False)
    assert torch.equal(a.images, b.images) and a.grad_loss == b.grad_loss < 1.0


def async_client(batch_size: int, participants: int) -> ClientParams:
    return plain_client(batch_size, lr=0.01, participants=participants, bn="async" if participants > 1 else "sync")


def test_pooled_statistics_are_those_of_the_pooled_activations():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 5, generator=gen) * torch.arange(1.0, 6.0) + 2  # [steps, groups, samples, C]
    stats = {"bn.mean": x.mean(2), "bn.var": x.var(2, unbiased=False)}
    mean, var = pooled_statistics(stats, "bn", 5, shards=2)  # shard s: groups 2s and 2s+1 of both steps
    for shard in range(2):
        pooled = x[:, 2 * shard : 2 * shard + 2].reshape(-1, 5)
        torch.testing.assert_close(mean[shard], pooled.mean(0))
        torch.testing.assert_close(var[shard], pooled.var(0, unbiased=False))
    with pytest.raises(ValueError, match="no statistics for BatchNorm layer 'other'"):
        pooled_statistics(stats, "other", 5, shards=2)
    with pytest.raises(ValueError, match=r"shape \(2, 4, 5\)"):
        pooled_statistics(stats, "bn", 5, shards=3)


@pytest.mark.parametrize("participants", [1, 2])
def test_the_exact_batchnorm_prior_vanishes_at_the_truth_and_the_running_one_does_not(fashion_images, participants):
    images, labels, _, _ = fashion_images
    model = build_model("convnet", 1, 10, 32).train()
    upload = simulate_client(model, images[:8], labels[:8], async_client(8, participants), seed=0)
    exact = BatchNormPrior(model, participants, upload.bn_statistics)
    running = BatchNormPrior(model, participants)
    with torch.no_grad():
        for shard in images[:8].chunk(participants):  # the attacker forwards the true shards as the client did
            model(shard)
    assert len(exact) == 3 and float(exact.take()) < 1e-4
    assert float(running.take()) > 1.0  # the untrained model's running statistics are 0 and 1


def test_the_exact_batchnorm_prior_brings_back_more_than_no_prior(fashion_images):
    # Untrained ConvNet, 4 images over 2 participants with asynchronous BatchNorm, known labels,
    # 300 iterations: measured 23.1 dB without a prior, 32.0 dB with the exact prior at 0.01
    # (and 10.7 dB with the running prior at 0.1: this model's running statistics are 0 and 1).
    images, labels, mean, std = fashion_images
    model = build_model("convnet", 1, 10, 32).train()
    upload = simulate_client(model, images[:4], labels[:4], async_client(4, 2), seed=0)

    def psnr(bn_prior: float) -> float:
        settings = inversion_params(iterations=300, lr=0.1, lr_min=1e-3, tv_weight=1e-2, restarts=1, bn_prior=bn_prior)
        target = target_of(model, upload.gradients, labels[:4], mean, std, shards=2, bn_statistics=upload.bn_statistics)
        rec = invert(target, settings, 0, progress=False)
        got, truth = to_unit_range(rec.images, mean, std), to_unit_range(images[:4], mean, std)
        return float(image_metrics(got[pair_by_hungarian(got, truth)], truth)["psnr"].mean())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # beside the other test process, two threads each slowed this test tenfold
    try:
        without, exact = psnr(0.0), psnr(0.01)
    finally:
        torch.set_num_threads(threads)
    assert exact > without + 3.0, (without, exact)


def _cosine(a: dict[str, torch.Tensor], b: list[torch.Tensor], names: list[str]) -> float:
    flat_a = torch.cat([a[n].reshape(-1).double() for n in names])
    flat_b = torch.cat([t.detach().reshape(-1).double() for t in b])
    return float(F.cosine_similarity(flat_a, flat_b, dim=0))


@pytest.mark.parametrize("local_steps", [2, 3])
@pytest.mark.parametrize("participants, bn", [(1, "sync"), (2, "sync"), (2, "async")])
def test_the_unrolled_client_model_at_the_truth_gives_the_clients_upload(fashion_images, local_steps, participants, bn):
    """The adaptive attacker's update of the true batch (E steps on the client's parts of it, at
    its step size, each participant's part normalised apart under async BN) is the upload; the
    classic attacker's one gradient of the whole batch is not."""
    images, labels, _, _ = fashion_images
    batch = 12  # 2 participants x 3 steps x 2 images
    model = build_model("convnet", 1, 10, 32).train()
    client = plain_client(batch, lr=0.05, participants=participants, bn=bn, local_steps=local_steps)
    upload = simulate_client(model, images[:batch], labels[:batch], client, seed=0).gradients
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    steps = LocalSteps(step_parts(batch, participants, local_steps), separate=bn == "async", lr=0.05)
    unrolled = unrolled_update(model, images[:batch], labels[:batch], steps)
    for name, got in zip(names, unrolled):
        torch.testing.assert_close(got.detach(), upload[name], rtol=1e-4, atol=1e-6)
    assert _cosine(upload, unrolled, names) == pytest.approx(1.0, abs=1e-6)
    classic = dummy_gradient(model, images[:batch], labels[:batch], participants if bn == "async" else 1)
    assert _cosine(upload, classic, names) < 0.99


def test_the_unrolled_update_is_differentiable_in_the_images(fashion_images):
    """Its gradient with respect to the dummy batch is autograd's through the E steps: checked
    against a central finite difference along a random direction (float64; a step small enough
    that no ReLU or max-pool switches within it)."""
    images, labels, _, _ = fashion_images
    model = build_model("convnet", 1, 10, 32).double().train()
    steps = LocalSteps(step_parts(4, 1, 2), separate=False, lr=0.1)
    x = images[:4].double().clone().requires_grad_(True)
    direction = torch.randn_like(x)
    weights = [torch.randn_like(p) for p in model.parameters() if p.requires_grad]

    def value(batch: torch.Tensor) -> torch.Tensor:
        return sum((w * g).sum() for w, g in zip(weights, unrolled_update(model, batch, labels[:4], steps)))

    (analytic,) = torch.autograd.grad(value(x), x)
    h = 1e-7
    numeric = (value(x.detach() + h * direction) - value(x.detach() - h * direction)) / (2 * h)
    assert float((analytic * direction).sum()) == pytest.approx(float(numeric.detach()), rel=1e-5)


def test_a_restart_through_dropout_depends_on_the_seed_and_restart_alone(fashion_images):
    """A train-mode VGG-11 attacker drops units at random: the masks come from (seed, restart), not from
    whatever the process drew before, so a job gives the same bytes on any process; the caller's
    random state is left as it was."""
    images, labels, mean, std = fashion_images
    vgg = build_model("vgg11", 1, 10, 32).train()
    target = batch_gradient(vgg, images[:1], labels[:1], "train")
    settings = inversion_params(iterations=3, lr=0.1, lr_min=1e-3, tv_weight=1e-2, restarts=2)
    runs = []
    for history in (1, 2):
        torch.manual_seed(history)
        before = torch.get_rng_state()
        runs.append(invert(target_of(vgg, target, labels[:1], mean, std), settings, 0, restarts=[1], progress=False))
        assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(runs[0].images, runs[1].images) and runs[0].grad_loss == runs[1].grad_loss


COMPILED_GRADIENT = """
import torch
from pipeline.attack.compiled import compiled_step
from pipeline.attack.objective import Objective, total_variation
from pipeline.client import batch_gradient
from pipeline.nets import build_model
from tests.conftest import inversion_params
from tests.helpers import target_of
torch.manual_seed(0)
model = build_model("convnet", 1, 10, 32).train()
images, labels = torch.randn(1, 1, 32, 32), torch.tensor([3])
target = target_of(model, batch_gradient(model, images, labels, "train"), labels)
objective = Objective(target, inversion_params(iterations=1, lr=0.1, lr_min=0.0, tv_weight=1e-2, restarts=1))
x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
term = objective.match.differentiable(objective.dummy_upload(x))
(eager,) = torch.autograd.grad(term + 1e-2 * total_variation(x), x)
objective.image_gradient = lambda _: (eager, float(term))  # the compiled step is held against this, not checked
compiled, _ = compiled_step(objective)(x)
print(float((compiled - eager).abs().max() / eager.abs().max()))
"""


@pytest.mark.slow  # two compiles from scratch, ~20 s each
def test_the_compiled_gradient_is_the_eager_one_whichever_instruction_set_compiled_first(tmp_path):
    """A one-image train-mode ConvNet step compiled in a process pinned to AVX2 (as the stages
    are), then in an unpinned one, sharing inductor's cache: before each instruction set had a
    cache folder of its own, the second reused the first's kernels and crashed here (and the
    other way round gave NaN). The compiled gradient is checked against the eager one without
    check_compiled, which would stop it."""
    for isa in ("avx2", None):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        env.update(TORCHINDUCTOR_CACHE_DIR=str(tmp_path), **({"ATEN_CPU_CAPABILITY": isa} if isa else {}))
        done = subprocess.run(
            [sys.executable, "-c", COMPILED_GRADIENT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, (isa, done.returncode, done.stderr[-2000:])
        assert float(done.stdout.split()[-1]) < 1e-4, (isa, done.stdout)


def test_a_compiled_gradient_unlike_the_eager_one_is_refused():
    eager = torch.tensor([1.0, -2.0, 0.5])
    check_compiled(eager + 1e-5, eager)  # float noise passes
    for wrong in (torch.tensor([1.0, float("nan"), 0.5]), torch.tensor([1.0, -2.0, 0.6])):
        with pytest.raises(
            PipelineError,
            match=r"^attack.compile: the compiled step's image gradient is not the "
            r"eager one \(largest difference (inf|0.1), scale 2\)",
        ):
            check_compiled(wrong, eager)


@pytest.mark.slow  # a first compile takes ~20 s
def test_the_compiled_attack_brings_an_image_back_with_the_same_bytes_for_a_seed(fashion_images):
    images, labels, mean, std = fashion_images
    model = build_model("convnet", 1, 10, 32).train()
    target = batch_gradient(model, images[:1], labels[:1], "train")
    settings = inversion_params(iterations=300, lr=0.1, lr_min=1e-3, tv_weight=1e-2, restarts=1, compile=True)
    runs = [invert(target_of(model, target, labels[:1], mean, std), settings, 0, progress=False) for _ in range(2)]
    assert torch.equal(runs[0].images, runs[1].images)  # the same seed, the same bytes
    got, truth = to_unit_range(runs[0].images, mean, std), to_unit_range(images[:1], mean, std)
    assert float(image_metrics(got, truth)["psnr"][0]) >= 25.0  # measured 29.5-29.9 dB (eager: 31.6)
    with pytest.raises(PipelineError, match="the compiled step takes neither the BatchNorm prior"):
        invert(target_of(model, target, labels[:1], mean, std), settings.model_copy(update={"bn_prior": 0.1}), 0)


def test_mlco_puts_the_truth_together_from_restarts_that_each_hold_part_of_it(fashion_images):
    """Three "restarts" of a B = 4 batch (labels 3, 3, 5, 8): the truth with noise on image 0; the
    truth with noise on image 1 and its two label-3 images in swapped positions; pure noise.
    Combined image by image they give the truth itself back (aligned within label 3), with a
    gradient loss of zero to float precision: the target is the truth's gradient."""
    images, _, mean, std = fashion_images
    x, y = images[:4], torch.tensor([3, 3, 5, 8])
    model = build_model("convnet", 1, 10, 32).train()
    target = batch_gradient(model, x, y, "train")
    a = inversion_params(iterations=1, lr=0.1, lr_min=1e-3, tv_weight=0.0, restarts=3)
    loss = gradient_loss(target_of(model, target, y, mean, std), a, 0)
    noise = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    first, second = x.clone(), x.clone()
    first[0] += 0.5 * noise[0]
    second[1] += 0.5 * noise[1]
    second = second[[1, 0, 2, 3]]
    found = [Reconstruction(batch, y, loss(batch), r) for r, batch in enumerate([first, second, noise])]
    combined = min_loss_combination(found, loss)
    assert torch.equal(combined.images, x)
    assert combined.grad_loss < 1e-5 < min(r.grad_loss for r in found)
    assert sorted(set(combined.sources)) == [0, 1]  # nothing from the noise


def test_mlco_of_real_restarts_is_never_worse_than_the_best_one(fashion_images):
    """K = 4 restarts of 60 iterations on B = 4: the combined batch's gradient loss, recomputed, is
    at most the best restart's, and the loss `gradient_loss` gives each kept iterate is the one
    the attack recorded (two computations of one term)."""
    images, labels, mean, std = fashion_images
    x, y = images[:4], torch.tensor([3, 3, 5, 8])
    model = build_model("convnet", 1, 10, 32).train()
    target = batch_gradient(model, x, y, "train")
    a = inversion_params(iterations=60, lr=0.1, lr_min=1e-3, tv_weight=1e-2, restarts=4)
    found = [invert(target_of(model, target, y, mean, std), a, 0, restarts=[r], progress=False) for r in range(4)]
    loss = gradient_loss(target_of(model, target, y, mean, std), a, 0)
    for rec in found:
        assert loss(rec.images) == pytest.approx(rec.grad_loss, rel=1e-4)
    combined = min_loss_combination(found, loss)
    assert combined.grad_loss == pytest.approx(loss(combined.images), rel=1e-6)
    assert combined.grad_loss <= loss(best_of(found).images)
    assert torch.equal(combined.labels, y) and len(combined.sources) == 4


def test_restarts_align_only_within_a_label():
    """The image nearest to the reference's first one carries another label: it is not paired there."""
    reference = torch.zeros(3, 1, 2, 2)
    reference[1] += 1
    other = torch.stack([reference[1], reference[0], reference[2] + 0.1])  # the near copies swapped
    labels = torch.tensor([0, 0, 1])
    assert pair_by_hungarian(other, reference).tolist() == [1, 0, 2]  # unconstrained: by distance
    assert pair_by_hungarian(other, reference, labels).tolist() == [1, 0, 2]  # same labels: still
    labels = torch.tensor([0, 1, 2])  # now every position is its own label
    assert pair_by_hungarian(other, reference, labels).tolist() == [0, 1, 2]
