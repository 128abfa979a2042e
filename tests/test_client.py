"""The client simulator: each setting's upload checked against the gradient computed by hand."""

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from pipeline.client import (
    batch_gradient,
    check_batchnorm_batch,
    client_upload,
    information_ratio,
    plain,
    simulate_client,
    step_parts,
)
from pipeline.dp import epsilon
from pipeline.errors import PipelineError
from pipeline.metrics import gradient_heterogeneity
from pipeline.nets import build_model
from pipeline.sections import ClientParams
from pipeline.trials import choose_batches, repetition_rate
from tests.conftest import make_params
from tests.helpers import plain_client


def client(**changes) -> ClientParams:
    """The plain client of eight images at step 0.05, with `changes`."""
    return plain_client(**{"batch_size": 8, "lr": 0.05, **changes})


def batch(n=8, seed=1, size=16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def convnet(size=16):
    torch.manual_seed(0)
    return build_model("convnet", 1, 10, size)


def by_hand(model, images, labels):
    """torch.autograd.grad of the batch's mean cross-entropy, in the model's current mode."""
    params = list(model.parameters())
    return dict(
        zip(
            [n for n, _ in model.named_parameters()],
            torch.autograd.grad(F.cross_entropy(model(images), labels), params),
        )
    )


def assert_same(got, want, rtol=1e-5, atol=1e-7):
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_plain_upload_is_autograd_of_the_batch_loss(mode):
    model, (images, labels) = convnet(), batch()
    got = simulate_client(model, images, labels, client(mode=mode), seed=0).gradients
    assert_same(got, by_hand(model.train(mode == "train"), images, labels))


def test_three_local_steps_upload_the_average_of_the_step_gradients():
    model, (images, labels) = convnet(), batch(n=6)
    c = client(batch_size=6, local_steps=3, lr=0.1)
    got = simulate_client(model, images, labels, c, seed=0).gradients
    # by hand: three plain SGD steps, each on the next two images
    work, steps = convnet().train(), []
    for e in range(3):
        g = by_hand(work, images[2 * e : 2 * e + 2], labels[2 * e : 2 * e + 2])
        steps.append(g)
        with torch.no_grad():
            for n, p in work.named_parameters():
                p -= 0.1 * g[n]
    assert_same(got, {n: sum(s[n] for s in steps) / 3 for n in steps[0]})
    # and the upload is the weight change over lr * E, as the server would compute it
    start = dict(convnet().named_parameters())
    assert_same(got, {n: (start[n] - p).detach() / (0.1 * 3) for n, p in work.named_parameters()}, rtol=1e-3, atol=1e-5)
    assert gradient_heterogeneity(got, by_hand(convnet().train(), images, labels)) > 1e-4


def test_async_batchnorm_normalises_each_shard_on_its_own():
    model, (images, labels) = convnet(), batch()
    got = simulate_client(model, images, labels, client(participants=2, bn="async"), seed=0).gradients
    m = convnet().train()
    loss = (F.cross_entropy(m(images[:4]), labels[:4]) + F.cross_entropy(m(images[4:]), labels[4:])) / 2
    assert_same(got, dict(zip([n for n, _ in m.named_parameters()], torch.autograd.grad(loss, list(m.parameters())))))
    sync = simulate_client(model, images, labels, client(participants=2, bn="sync"), seed=0).gradients
    assert_same(sync, by_hand(convnet().train(), images, labels))  # sync over shards = one big batch


@pytest.mark.parametrize("bn", ["async", "sync"])
def test_two_fabric_processes_upload_what_the_simulation_does(bn):
    model, (images, labels) = convnet(), batch()
    c = client(participants=2, bn=bn, local_steps=2)
    simulated = simulate_client(model, images, labels, c, seed=3).gradients
    processes = client_upload(model, images, labels, c.model_copy(update={"participants_as": "processes"}), seed=3)
    assert_same(processes.gradients, simulated, rtol=1e-4, atol=1e-6)
    # ... and the statistics its BatchNorm layers normalised with, [2 steps, 1 or 2 groups, C]
    statistics = simulate_client(model, images, labels, c, seed=3).bn_statistics
    assert statistics["features.1.mean"].shape == (2, 2 if bn == "async" else 1, 32)
    assert_same(processes.bn_statistics, statistics, rtol=1e-4, atol=1e-6)
    other = simulate_client(
        model, images, labels, c.model_copy(update={"bn": "sync" if bn == "async" else "async"}), seed=3
    )
    difference = max(float((other.gradients[n] - simulated[n]).abs().max()) for n in simulated)
    assert difference > 1e-3  # async and sync BN give different uploads


def running_update_statistics(model, images):
    """What a train-mode forward of `images` normalised each BatchNorm layer with, read back from
    torch's own update of the running statistics: r1 = (1 - m) r0 + m s (the variance unbiased)."""
    model = copy.deepcopy(model).train()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    before = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in layers.items()}
    with torch.no_grad():
        model(images)
    out = {}
    for n, m in layers.items():
        (mean0, var0), momentum = before[n], m.momentum
        out[n] = (
            (m.running_mean - (1 - momentum) * mean0) / momentum,
            (m.running_var - (1 - momentum) * var0) / momentum,
        )
    return out


@pytest.mark.parametrize("bn", ["sync", "async"])
def test_the_recorded_batchnorm_statistics_are_those_torch_normalised_with(bn):
    model, (images, labels) = convnet(), batch()
    statistics = simulate_client(model, images, labels, client(participants=2, bn=bn), seed=0).bn_statistics
    groups = [images] if bn == "sync" else [images[:4], images[4:]]
    for g, group in enumerate(groups):
        by_torch = running_update_statistics(model, group)
        for layer, (mean, unbiased_var) in by_torch.items():
            pixels = len(group) * {"features.1": 16 * 16, "features.4": 8 * 8, "features.7": 4 * 4}[layer]
            torch.testing.assert_close(statistics[f"{layer}.mean"][0, g], mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(
                statistics[f"{layer}.var"][0, g], unbiased_var * (pixels - 1) / pixels, rtol=1e-4, atol=1e-5
            )
    # eval mode normalises with the running statistics, and those are what it records
    with torch.no_grad():
        model.train()(3 + 2 * images)  # running statistics other than the initial 0 and 1
    evaluated = simulate_client(model, images, labels, client(participants=2, bn=bn, mode="eval"), seed=0).bn_statistics
    bn1 = model.get_submodule("features.1")
    assert evaluated["features.1.mean"].shape == (1, 1, 32)
    assert torch.equal(evaluated["features.1.mean"][0, 0], bn1.running_mean)
    torch.testing.assert_close(evaluated["features.1.var"][0, 0], bn1.running_var)


def test_dropout_masks_follow_the_sample_not_the_split():
    torch.manual_seed(0)
    vgg = build_model("vgg11", 1, 10, 32)  # no BatchNorm: only dropout differs between modes
    images, labels = batch(n=4, size=32)
    one = simulate_client(vgg, images, labels, client(batch_size=4), seed=5).gradients
    two = simulate_client(vgg, images, labels, client(batch_size=4, participants=2, bn="async"), seed=5).gradients
    assert_same(two, one)
    other_seed = simulate_client(vgg, images, labels, client(batch_size=4), seed=6).gradients
    eval_mode = simulate_client(vgg, images, labels, client(batch_size=4, mode="eval"), seed=5).gradients
    assert_same(eval_mode, by_hand(vgg.eval(), images, labels))
    for changed in (other_seed, eval_mode):  # dropout in train mode really drops
        assert float((changed["classifier.1.weight"] - one["classifier.1.weight"]).abs().max()) > 1e-4


def test_per_sample_dp_clips_each_sample_and_reports_epsilon():
    model, (images, labels) = convnet(), batch(n=4)
    dp = {"kind": "per-sample", "clip": 0.5, "sigma": 0.0, "delta": 1e-5}
    got = simulate_client(model, images, labels, client(batch_size=4, mode="eval", dp=dp), seed=0)
    m = convnet().eval()
    expected = None
    for i in range(4):
        g = by_hand(m, images[i : i + 1], labels[i : i + 1])
        norm = math.sqrt(sum(float(t.pow(2).sum()) for t in g.values()))
        scaled = {n: t * min(1.0, 0.5 / (norm + 1e-6)) / 4 for n, t in g.items()}
        expected = scaled if expected is None else {n: expected[n] + scaled[n] for n in scaled}
    assert_same(got.gradients, expected)
    assert got.epsilon == float("inf")  # no noise, no guarantee
    noisy = simulate_client(model, images, labels, client(batch_size=4, mode="eval", dp={**dp, "sigma": 1.0}), seed=0)
    assert noisy.epsilon == pytest.approx(epsilon(1.0, 1.0, 1, 1e-5, "prv")) and 2 < noisy.epsilon < 20  # the tighter
    spread = torch.cat([(noisy.gradients[n] - expected[n]).flatten() for n in expected]).std()
    assert float(spread) == pytest.approx(1.0 * 0.5 / 4, rel=0.05)  # noise std sigma * C over the step batch


def test_per_sample_dp_through_train_mode_batchnorm_is_refused():
    model, (images, labels) = convnet(), batch(n=4)
    with pytest.raises(PipelineError, match="per-sample DP cannot run through train-mode BatchNorm"):
        simulate_client(
            model,
            images,
            labels,
            client(batch_size=4, dp={"kind": "per-sample", "clip": 1, "sigma": 1, "delta": 1e-5}),
            seed=0,
        )


def test_original_batch_clipping_clips_each_step_then_adds_noise_once():
    model, (images, labels) = convnet(), batch(n=4)
    plain_grad = simulate_client(model, images, labels, client(batch_size=4), seed=0).gradients
    dp = {"kind": "batch", "clip": 1e-3, "sigma": 0.0, "delta": None}
    clipped = simulate_client(model, images, labels, client(batch_size=4, dp=dp), seed=0)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in clipped.gradients.values()))
    assert norm == pytest.approx(1e-3, rel=1e-4) and clipped.epsilon is None
    assert gradient_heterogeneity(clipped.gradients, plain_grad) == pytest.approx(0, abs=1e-9)  # only rescaled
    noisy = simulate_client(model, images, labels, client(batch_size=4, dp={**dp, "sigma": 10.0}), seed=0).gradients
    spread = torch.cat([(noisy[n] - clipped.gradients[n]).flatten() for n in noisy]).std()
    assert float(spread) == pytest.approx(10.0 * 1e-3, rel=0.05)


def test_gh_is_zero_for_the_plain_client_and_grows_with_each_defense():
    model, (images, labels) = convnet(), batch()
    c = client()
    modelled = simulate_client(model, images, labels, plain(c), seed=0).gradients

    def gh(**changes):
        return gradient_heterogeneity(
            simulate_client(model, images, labels, client(**changes), seed=0).gradients, modelled
        )

    assert gh() == pytest.approx(0, abs=1e-12)
    assert gh(participants=2, bn="sync") == pytest.approx(0, abs=1e-6)
    for changes in (
        {"participants": 2, "bn": "async"},
        {"local_steps": 2, "lr": 0.5},
        {"dp": {"kind": "batch", "clip": 1.0, "sigma": 0.05, "delta": None}},
    ):
        assert gh(**changes) > 1e-3, changes
    assert gh(participants=4, bn="async") > gh(participants=2, bn="async")  # smaller shards, further apart


def test_gir_sums_to_100_and_ranks_the_largest_loss_first():
    model, (images, _) = convnet(), batch()
    with torch.no_grad():
        model.fc.bias[3] += 6.0  # the model now predicts class 3 with confidence
    labels = torch.full((8,), 3)
    labels[5] = 7  # sample 5 is the one it gets wrong: by far the largest loss
    with torch.no_grad():
        losses = F.cross_entropy(model.eval()(images), labels, reduction="none")
    assert int(losses.argmax()) == 5 and float(losses[5]) > 3 * float(losses[[0, 1, 2, 3, 4, 6, 7]].max())
    before = [b.clone() for b in model.buffers()]
    gir = information_ratio(model, images, labels, "eval", seed=0)
    assert float(gir.sum()) == pytest.approx(100, abs=1e-9) and bool((gir >= 0).all())
    assert int(gir.argmax()) == 5
    information_ratio(model, images, labels, "train", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))  # running statistics untouched


def test_label_repetition_trials_hold_k_classes_of_true_images_and_never_share_one(fashion_images):
    _, pool_labels, _, _ = fashion_images
    batches = choose_batches(pool_labels, 8, 3, seed=4, label_repetition=2)
    for positions in batches:
        chosen = pool_labels[positions]
        counts = torch.bincount(chosen, minlength=10)
        assert sorted(counts[counts > 0].tolist()) == [4, 4]  # exactly two classes of four true images
        assert repetition_rate(chosen) == pytest.approx(1 - 2 / 8)
    assert len(set(torch.cat(batches).tolist())) == 24  # three disjoint batches
    assert all(
        torch.equal(a, b) for a, b in zip(batches, choose_batches(pool_labels, 8, 3, seed=4, label_repetition=2))
    )
    with pytest.raises(PipelineError, match="finds only .* classes with 40 unused victims left"):
        choose_batches(pool_labels, 80, 1, seed=4, label_repetition=2)


def test_step_parts_cover_the_batch_once_in_contiguous_shards():
    parts = step_parts(12, 2, 3)
    assert [p.tolist() for p in parts[0]] == [[0, 1], [6, 7]]
    assert sorted(torch.cat([torch.cat(s) for s in parts]).tolist()) == list(range(12))


def test_a_batch_of_79_works_alone_and_is_refused_over_two_participants():
    model, (images, labels) = convnet(), batch(n=79)
    assert_same(
        simulate_client(model, images, labels, client(batch_size=79), seed=0).gradients,
        by_hand(convnet().train(), images, labels),
    )
    with pytest.raises(
        PipelineError, match="settings.gh: batch_size 79 does not split into 2 equal participant shards"
    ):
        make_params(client__batch_size=79)
    with pytest.raises(ValueError, match="a shard of 3 images does not split into 2 equal local steps"):
        client(batch_size=6, participants=2, local_steps=2)


def test_train_mode_groups_of_one_image_on_resnet18_at_32px_are_refused():
    model = build_model("resnet18", 1, 10, 32)
    with pytest.raises(PipelineError, match=r"groups of 1 image\(s\).*one value per channel at 32 px"):
        check_batchnorm_batch(model, client(batch_size=2, participants=2, bn="async"), 1, 32)
    check_batchnorm_batch(model, client(batch_size=2, participants=2, bn="sync"), 1, 32)
    check_batchnorm_batch(model, client(batch_size=1, mode="eval"), 1, 32)
    check_batchnorm_batch(model, client(batch_size=1), 1, 64)


def test_batch_gradient_leaves_running_statistics_untouched():
    model = build_model("convnet", 1, 10, 32)
    before = model.features[1].running_mean.clone()
    batch_gradient(model, torch.randn(4, 1, 32, 32), torch.zeros(4, dtype=torch.long), "train")
    assert torch.equal(model.features[1].running_mean, before)


def test_trials_are_disjoint_seeded_batches_and_the_pool_bounds_them():
    labels = torch.arange(40) % 10
    batches = choose_batches(labels, 8, 5, seed=3)
    assert len(set(torch.cat(batches).tolist())) == 40  # five disjoint batches use the whole pool
    assert all(torch.equal(a, b) for a, b in zip(batches, choose_batches(labels, 8, 5, seed=3)))
    assert torch.equal(batches[1], choose_batches(labels, 8, 2, seed=3)[1])  # more trials keep the first ones
    with pytest.raises(
        PipelineError, match="extract.trials 6 x batch_size 8 needs 48 distinct victims, but the pool holds 40"
    ):
        choose_batches(labels, 8, 6, seed=3)
