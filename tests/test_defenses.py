"""The post-processing defenses (pipeline.defenses) and SME's surrogate (pipeline.attack.client_model):
at the truth, the transform the adaptive attacker applies to its dummy upload gives the client's
defended upload where the defense is deterministic, and the classic attacker's plain gradient does not."""

import pytest
import torch
from pydantic import TypeAdapter, ValidationError
from torch.nn import functional as F

from pipeline.attack.client_model import dummy_gradient, surrogate_gradient, surrogate_point
from pipeline.attack.invert import invert
from pipeline.attack.objective import Objective, gradient_loss
from pipeline.attack.target import Target, Victim, adapts
from pipeline.client import batch_gradient, simulate_client
from pipeline.defenses import (
    ModelledDefense,
    defended,
    estimated_bound,
    pruning_mask,
    soteria_mask,
)
from pipeline.errors import PipelineError
from pipeline.files import read_json
from pipeline.nets import build_model
from pipeline.sections import ClippingParams, DefenseParams, PruningParams, SignParams, SoteriaParams
from tests.conftest import inversion_params
from tests.helpers import make_upload, plain_client, target_of


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    flat = [torch.cat([t.detach().reshape(-1).double() for t in ts]) for ts in (a, b)]
    return float(F.cosine_similarity(*flat, dim=0))


@pytest.fixture
def truth(fashion_images):
    """An untrained ConvNet in train mode, four real images, their gradient by parameter name."""
    images, labels, _, _ = fashion_images
    model = build_model("convnet", 1, 10, 32).train()
    gradients = batch_gradient(model, images[:4], labels[:4], "train")
    return model, images[:4], labels[:4], gradients


DETERMINISTIC = [
    PruningParams(kind="prune", ratio=0.9),
    ClippingParams(kind="clip", bound=0.05, scope="per-tensor"),
    SoteriaParams(kind="soteria", percentile=80),
]


@pytest.mark.parametrize("defense", DETERMINISTIC, ids=lambda d: d.kind)
def test_the_adaptive_transform_of_the_true_gradient_is_the_upload(truth, defense):
    model, images, labels, gradients = truth
    names = list(gradients)
    upload = defended(gradients, defense, model, images)
    at_truth = dummy_gradient(model, images, labels)  # the attacker's dummy gradient at the true batch
    plain = [upload[n] for n in names]
    for pruning in ("magnitude", "mask") if isinstance(defense, PruningParams) else ("magnitude",):
        modelled = ModelledDefense(defense, upload, model, pruning=pruning)(at_truth)
        for name, got in zip(names, modelled):
            torch.testing.assert_close(got.detach(), upload[name], rtol=1e-5, atol=1e-7)
        assert _cosine(modelled, plain) == pytest.approx(1.0, abs=1e-6)
    assert _cosine([gradients[n] for n in names], plain) < 0.99  # the classic attacker's match at the truth


@pytest.mark.parametrize("scope", ["global", "per-tensor"])
def test_a_clip_bound_estimated_from_the_upload_reproduces_it(truth, scope):
    """GGL's estimate (the upload's norm, or its largest tensor's) in place of the stated bound."""
    model, _, _, gradients = truth
    names, norm = list(gradients), float(torch.stack([g.norm() for g in gradients.values()]).norm())
    for bound in (0.02, 10 * norm):  # the clip acting on some tensors; acting on none
        upload = defended(gradients, ClippingParams(kind="clip", bound=bound, scope=scope), model)
        got = ModelledDefense(ClippingParams(kind="clip", bound=1.0, scope=scope), upload, model, bound_known=False)(
            [gradients[n] for n in names]
        )
        for name, g in zip(names, got):
            torch.testing.assert_close(g, upload[name], rtol=1e-5, atol=1e-8)
    assert estimated_bound([upload[n] for n in names], scope) == pytest.approx(
        norm if scope == "global" else max(float(g.norm()) for g in gradients.values()), rel=1e-6
    )


def test_a_global_clip_only_scales_the_upload(truth):
    model, _, _, gradients = truth
    names = list(gradients)
    upload = defended(gradients, ClippingParams(kind="clip", bound=1e-3, scope="global"), model)
    total = float(torch.stack([u.norm() for u in upload.values()]).norm())
    assert total == pytest.approx(1e-3, rel=1e-5)
    assert _cosine([gradients[n] for n in names], [upload[n] for n in names]) == pytest.approx(1.0, abs=1e-6)


def test_a_global_clip_leaves_the_cosine_attack_unchanged(fashion_images):
    """The same seed against the gradient and against it clipped to a thousandth of its norm: the
    cosine objective normalises the target, so the reconstructions agree to float rounding."""
    images, labels, mean, std = fashion_images
    model = build_model("convnet", 1, 10, 32).train()
    gradients = batch_gradient(model, images[:2], labels[:2], "train")
    norm = float(torch.stack([g.norm() for g in gradients.values()]).norm())
    clipped = defended(gradients, ClippingParams(kind="clip", bound=norm / 1000, scope="global"), model)
    a = inversion_params(iterations=30, restarts=1, lr=0.1, lr_min=0.001, tv_weight=0.0)
    plain = invert(target_of(model, gradients, labels[:2], mean, std), a, seed=3, progress=False)
    defended_rec = invert(target_of(model, clipped, labels[:2], mean, std), a, seed=3, progress=False)
    torch.testing.assert_close(defended_rec.images, plain.images, rtol=0, atol=1e-4)
    l2_attack = a.model_copy(update={"objective": "l2"})
    l2 = invert(target_of(model, clipped, labels[:2], mean, std), l2_attack, seed=3, progress=False)
    assert (l2.images - plain.images).abs().max() > 1e-2  # an L2 objective sees the scale


def test_the_relaxed_sign_tends_to_the_upload_as_the_temperature_falls(truth):
    """Sign is deterministic but flat: the attacker matches tanh(g / tau). At the truth its cosine
    with the signed upload rises toward 1 as tau falls, above the classic attacker's."""
    model, images, labels, gradients = truth
    names = list(gradients)
    upload = defended(gradients, SignParams(kind="sign"), model)
    assert all(set(u.unique().tolist()) <= {-1.0, 0.0, 1.0} for u in upload.values())
    plain = [upload[n] for n in names]
    cosines = [
        _cosine(
            ModelledDefense(SignParams(kind="sign"), upload, model, temperature=t)([gradients[n] for n in names]),
            plain,
        )
        for t in (1.0, 0.1, 0.01, 1e-4)
    ]
    assert cosines == sorted(cosines) and cosines[-1] > 0.999, cosines
    assert _cosine([gradients[n] for n in names], plain) < cosines[1]


def test_pruning_zeroes_the_stated_share_of_each_tensor():
    g = torch.tensor([[0.5, -3.0, 0.1], [2.0, -0.2, 0.1]])
    assert pruning_mask(g, 0.5).tolist() == [[True, True, False], [True, False, False]]
    assert pruning_mask(g, 1 / 6).tolist() == [[True, True, False], [True, True, True]]  # a tie: the first goes
    assert int((~pruning_mask(torch.randn(1000), 0.9)).sum()) == 900
    assert int((~pruning_mask(torch.randn(100), 0.29)).sum()) == 29  # 0.29 * 100 is under 29 in floats


def test_soterias_mask_agrees_with_the_full_jacobian():
    """The per-entry backwards against torch's whole Jacobian of the representation, on a
    small network whose Jacobian fits in memory, in train-mode BatchNorm (samples tied together)."""
    from torch import nn
    from torch.autograd.functional import jacobian

    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 5))
    images = torch.randn(4, 1, 8, 8)
    before = model.state_dict()["1.running_mean"].clone()
    keep = soteria_mask(model.train(), images, 60)
    assert torch.equal(model.state_dict()["1.running_mean"], before)  # the caller's model untouched
    representation = model[:4]
    full = jacobian(representation, images)  # [B, F, B, C, H, W]: d r_bf / d x_b'
    batch, features = full.shape[:2]
    summed = full.sum(0)  # d (sum_b r_bf) / d x_b', as one backward of column f gives it
    norms = summed.reshape(features, batch, -1).norm(dim=2)  # [F, B]
    ratio = (norms.T / (representation(images).detach() + 0.1)).sum(0)
    assert torch.equal(keep, ratio.double() >= torch.quantile(ratio.double(), 0.6))
    assert (~keep).sum() == 16  # 60 % of 27 entries, the tie-free rank rule: 16 under the percentile


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"kind": "prune", "ratio": 1.0}, "ratio\n  Input should be less than 1"),
        ({"kind": "clip", "bound": 0, "scope": "global"}, "bound\n  Input should be greater than 0"),
        ({"kind": "clip", "bound": 4, "scope": "layer"}, "scope\n  Input should be 'global' or 'per-tensor'"),
        ({"kind": "soteria", "percentile": 100}, "percentile\n  Input should be less than 100"),
        ({"kind": "sign", "levels": 16}, "levels\n  Extra inputs are not permitted"),
        ({"kind": "mixup"}, "does not match any of the expected tags"),
    ],
)
def test_bad_defense_parameters_are_refused(raw, message):
    with pytest.raises(ValidationError, match=message):
        TypeAdapter(DefenseParams).validate_python(raw)


def test_smes_surrogate_point_lies_on_the_line_to_the_clients_weights(fashion_images):
    """theta_0 + alpha (theta_E - theta_0), with theta_E the weights a plain loop of the client's E
    SGD steps reaches; at alpha = 0 its gradient is the first step's full-batch gradient."""
    images, labels, _, _ = fashion_images
    model = build_model("convnet", 1, 10, 32, norm="group").train()  # no running statistics to drift
    client = plain_client(4, lr=0.05, local_steps=2)
    upload = simulate_client(model, images[:4], labels[:4], client, seed=0).gradients
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    start = [p for p in model.parameters() if p.requires_grad]
    reached = [p.detach().clone() for p in start]  # the client's steps, by hand: images 0-1, then 2-3
    for part in (slice(0, 2), slice(2, 4)):
        stepped = build_model("convnet", 1, 10, 32, norm="group")
        stepped.load_state_dict(dict(zip(names, reached)), strict=False)
        loss = F.cross_entropy(stepped.train()(images[part]), labels[part])
        grads = torch.autograd.grad(loss, [p for p in stepped.parameters() if p.requires_grad])
        reached = [w - 0.05 * g for w, g in zip(reached, grads)]
    for alpha in (0.0, 0.5, 1.0):
        point = surrogate_point(start, [upload[n] for n in names], 0.05, 2, alpha)
        for p0, pe, got in zip(start, reached, point):
            torch.testing.assert_close(got.detach(), p0.detach() + alpha * (pe - p0.detach()), rtol=1e-4, atol=1e-6)
    alpha = torch.tensor(1.0, requires_grad=True)
    end_point = surrogate_point(start, list(upload.values()), 0.05, 2, alpha)
    at_end = surrogate_gradient(model, images[:4], labels[:4], end_point)
    stepped = build_model("convnet", 1, 10, 32, norm="group")
    stepped.load_state_dict(dict(zip(names, reached)), strict=False)
    by_hand = torch.autograd.grad(F.cross_entropy(stepped.train()(images[:4]), labels[:4]), list(stepped.parameters()))
    for got, want in zip(at_end, by_hand):  # the gradient at theta_E: the upload's order is the model's
        torch.testing.assert_close(got.detach(), want, rtol=1e-3, atol=1e-6)
    (d_alpha,) = torch.autograd.grad(sum(g.pow(2).sum() for g in at_end), alpha)
    assert torch.isfinite(d_alpha) and d_alpha != 0  # SME can learn alpha
    at_start = surrogate_gradient(
        model, images[:4], labels[:4], surrogate_point(start, list(upload.values()), 0.05, 2, 0.0)
    )
    first = batch_gradient(model, images[:4], labels[:4], "train")
    for name, got in zip(names, at_start):
        torch.testing.assert_close(got.detach(), first[name], rtol=1e-4, atol=1e-6)


def test_the_attack_objective_applies_the_defense_it_models(truth):
    """Through the attack's own objective: at the true batch the adaptive attacker's gradient term
    against a pruned upload is 0 (its dummy upload is the upload), the classic attacker's is not."""
    model, images, labels, gradients = truth
    upload = defended(gradients, PruningParams(kind="prune", ratio=0.9), model)
    a = inversion_params(iterations=1, restarts=1, lr=0.1, lr_min=0.001, tv_weight=0.0)
    modelled = ModelledDefense(PruningParams(kind="prune", ratio=0.9), upload, model)
    adaptive = gradient_loss(target_of(model, upload, labels, defense=modelled), a, seed=0)(images)
    classic = gradient_loss(target_of(model, upload, labels), a, seed=0)(images)
    assert adaptive == pytest.approx(0.0, abs=1e-6) and classic > 0.01


def test_a_defended_target_refuses_what_cannot_apply_its_transform(truth):
    model, _, labels, gradients = truth
    modelled = ModelledDefense(SignParams(kind="sign"), gradients, model)
    target = target_of(model, gradients, labels, defense=modelled)
    compiled = inversion_params(iterations=1, restarts=1, lr=0.1, lr_min=0.001, tv_weight=0.0, compile=True)
    with pytest.raises(PipelineError, match="the compiled step does not apply the client's defense"):
        target.check(compiled)
    split = compiled.model_copy(update={"compile": False, "split": "batch"})
    with pytest.raises(PipelineError, match="the client's defense acts on the whole batch's upload"):
        target.check(split, processes=2)
    target.check(split, processes=1)  # one process: nothing splits


GRADIENT_CASES = [ClippingParams(kind="clip", bound=0.05, scope="per-tensor"), SignParams(kind="sign")]


@pytest.mark.parametrize("defense", GRADIENT_CASES, ids=["clip", "sign"])
def test_the_image_gradient_goes_through_the_modelled_defense(fashion_images, defense):
    """The attack's image gradient (the term's gradient written out, handed back through the
    transform as grad_outputs) against autograd's of the whole term, transform included."""
    images, labels, mean, std = fashion_images
    model = build_model("convnet", 1, 10, 32).train()
    gradients = batch_gradient(model, images[:4], labels[:4], "train")
    upload = defended(gradients, defense, model)
    target = target_of(model, upload, labels[:4], mean, std, defense=ModelledDefense(defense, upload, model))
    objective = Objective(target, inversion_params(iterations=1, restarts=1, lr=0.1, lr_min=0.001, tv_weight=0.0))
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    written_out, _ = objective.image_gradient(x.clone().requires_grad_(True))
    y = x.clone().requires_grad_(True)
    (whole,) = torch.autograd.grad(objective.match.differentiable(objective.dummy_upload(y)), y)
    # float32: sign's 1 / tau (ten over the tensor's RMS) amplifies rounding to about 0.2 % here
    assert float((written_out - whole).norm() / whole.norm()) < 5e-3
    plain = Objective(target_of(model, upload, labels[:4], mean, std), objective.a)
    ignoring = plain.image_gradient(x.clone().requires_grad_(True))[0]  # the classic attacker's
    assert float((ignoring - whole).norm() / whole.norm()) > 0.1


@pytest.mark.parametrize("pruning, tolerance", [("mask", 1e-5), ("magnitude", 1e-4)])
def test_pruning_masks_follow_the_cropped_kernels_of_resnet18(fashion_images, pruning, tolerance):
    """ResNet-18 at 32 px: the attack cuts layer4's 3 x 3 kernels to their live 1 x 1 tap; the
    mask of the upload's zeros is cut the same way, and magnitude pruning on the cut dummy keeps as
    many entries as on the whole tensor (the dead taps, 0, are pruned first): at the truth the term
    is still 0. (The cut model's gradient differs from the whole one's by rounding, which can swap
    entries at the magnitude threshold: 1.3e-5 of the term here.)"""
    images, labels, mean, std = fashion_images
    model = build_model("resnet18", 1, 10, 32).train()
    gradients = batch_gradient(model, images[:2], labels[:2], "train")
    upload = defended(gradients, PruningParams(kind="prune", ratio=0.9), model)
    modelled = ModelledDefense(PruningParams(kind="prune", ratio=0.9), upload, model, pruning=pruning)
    a = inversion_params(iterations=1, restarts=1, lr=0.1, lr_min=0.001, tv_weight=0.0)
    loss = gradient_loss(target_of(model, upload, labels[:2], mean, std, defense=modelled), a, seed=0)
    assert loss(images[:2]) == pytest.approx(0.0, abs=tolerance)


CLIENT_DEFENSES = [*DETERMINISTIC, ClippingParams(kind="clip", bound=0.05, scope="global"), SignParams(kind="sign")]


@pytest.mark.parametrize("defense", CLIENT_DEFENSES, ids=lambda d: d.kind + getattr(d, "scope", ""))
def test_the_client_uploads_its_defense_of_the_update(fashion_images, defense):
    """A defended client sends the defense of the update it would otherwise send (Soteria's mask
    taken at the weights the update started from)."""
    images, labels, _, _ = fashion_images
    model = build_model("convnet", 1, 10, 32).train()
    plain = simulate_client(model, images[:4], labels[:4], plain_client(4, lr=0.01), seed=0).gradients
    client = plain_client(4, lr=0.01, defense=defense)
    got = simulate_client(model, images[:4], labels[:4], client, seed=0).gradients
    want = defended(plain, defense, model, images[:4])
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_the_threat_model_states_the_defense_and_only_the_adaptive_attacker_applies_it(fashion_images, tmp_path):
    images, labels, _, _ = fashion_images
    defense = PruningParams(kind="prune", ratio=0.9)
    path = make_upload(tmp_path, images[:4], labels[:4], defense=defense)
    victim = Victim.load(path)
    assert victim.threat_model.defense == defense and read_json(path.with_suffix(".json"))["defense"] == {
        "kind": "prune",
        "ratio": 0.9,
    }
    a = inversion_params(iterations=1, restarts=1, lr=0.1, lr_min=0.001, tv_weight=0.0)
    classic = a.model_copy(update={"client_model": "plain"})
    assert adapts(victim.threat_model, a) and not adapts(victim.threat_model, classic)
    adaptive_target, classic_target = Target.of(victim, a), Target.of(victim, classic)
    assert adaptive_target.defense is not None and classic_target.defense is None
    assert gradient_loss(adaptive_target, a, seed=0)(images[:4]) == pytest.approx(0.0, abs=1e-6)
    assert gradient_loss(classic_target, classic, seed=0)(images[:4]) > 0.01
    undefended = make_upload(tmp_path / "plain", images[:4], labels[:4])
    assert "defense" not in read_json(undefended.with_suffix(".json"))  # the bytes of uploads before defenses
    assert Victim.load(undefended).threat_model.defense is None


def test_the_table_names_each_clients_defense():
    from pipeline.outputs import client_summary

    named = {
        PruningParams(kind="prune", ratio=0.9): "B=4, train, pruned 90%",
        ClippingParams(kind="clip", bound=4.0, scope="global"): "B=4, train, clipped to 4 (global)",
        SignParams(kind="sign"): "B=4, train, signed",
        SoteriaParams(kind="soteria", percentile=60): "B=4, train, Soteria 60 %",
    }
    for defense, words in named.items():
        assert client_summary(plain_client(4, defense=defense)) == words
    assert client_summary(plain_client(4)) == "B=4, train"
