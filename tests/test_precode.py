"""PRECODE (pipeline.nets.VariationalBottleneck): the block's KL term is the Gaussians' KL, its
noise at the client is seeded, the client uploads the gradient of its whole loss, and the adaptive
attacker, which leaves the block and what follows it out of the match, meets the upload at the
truth where the client's noise is off; a model without the block keeps its bytes."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from pipeline.attack.client_model import dummy_gradient
from pipeline.attack.objective import gradient_loss
from pipeline.attack.target import Target, Victim, adapts
from pipeline.client import simulate_client
from pipeline.errors import PipelineError
from pipeline.files import read_json
from pipeline.nets import BOTTLENECK_SIGMA_SHIFT, VariationalBottleneck, build_model, take_penalty
from pipeline.seeds import Draw, generator
from pipeline.train import Classifier
from tests.conftest import inversion_params, make_params
from tests.helpers import make_upload, plain_client

PRECODE = {"size": 256, "beta": 1e-3}


def _block(model: torch.nn.Module) -> VariationalBottleneck:
    (block,) = [m for m in model.modules() if isinstance(m, VariationalBottleneck)]
    return block


def test_the_kl_term_is_the_gaussians_kl_from_the_standard_normal():
    torch.manual_seed(0)
    block = VariationalBottleneck(32, 8, beta=0.5)
    x = torch.randn(5, 32)
    block.eval()(x)
    codes = block.encoder(x)
    mean, sigma = codes[:, :8], F.softplus(codes[:, 8:] - BOTTLENECK_SIGMA_SHIFT)
    want = 0.5 * kl_divergence(Normal(mean, sigma), Normal(0.0, 1.0)).sum(1).mean()
    torch.testing.assert_close(take_penalty(block), want)
    assert take_penalty(block) == 0.0  # taken: the next forward's is its own


def test_the_block_samples_in_train_mode_and_decodes_the_means_otherwise():
    torch.manual_seed(0)
    block = VariationalBottleneck(32, 8, beta=1e-3)
    x = torch.randn(5, 32)
    means = block.decoder(block.encoder(x)[:, :8])
    torch.testing.assert_close(block.eval()(x), means)
    block.train()
    block.generator = generator(Draw.TRAINING_BOTTLENECK, 0)
    first = block(x)
    block.generator = generator(Draw.TRAINING_BOTTLENECK, 0)
    assert torch.equal(block(x), first) and not torch.allclose(first, means)
    # per image: a sample draws alike whichever batch forwards it (the client's groups and processes)
    block.row_generators = [generator(Draw.CLIENT_BOTTLENECK, 0, 0, i) for i in range(5)]
    whole = block(x)
    block.row_generators = [generator(Draw.CLIENT_BOTTLENECK, 0, 0, i) for i in range(3, 5)]
    torch.testing.assert_close(block(x[3:]), whole[3:])
    block.sample = False
    torch.testing.assert_close(block(x), means)


def test_a_precode_model_starts_from_the_plain_models_weights():
    """The block is built after the model, so the same seed gives a PRECODE model whose other
    layers are the plain model's: its epoch-0 uploads pair with the plain scheme's."""
    torch.manual_seed(0)
    plain = build_model("convnet", 1, 10, 32).state_dict()
    torch.manual_seed(0)
    precode = build_model("convnet", 1, 10, 32, bottleneck=PRECODE).state_dict()
    for name, tensor in plain.items():
        assert torch.equal(precode[name.replace("fc.", "fc.1.")], tensor)
    assert precode["fc.0.encoder.weight"].shape == (512, 4096) and precode["fc.0.decoder.weight"].shape == (4096, 256)


def test_the_client_uploads_the_gradient_of_its_whole_loss_with_its_seeded_noise(fashion_images):
    images, labels, _, _ = fashion_images
    torch.manual_seed(0)
    model = build_model("convnet", 1, 10, 32, bottleneck=PRECODE)
    client = plain_client(4, lr=0.01)
    upload = simulate_client(model, images[:4], labels[:4], client, seed=3).gradients
    again = simulate_client(model, images[:4], labels[:4], client, seed=3).gradients
    assert all(torch.equal(upload[n], again[n]) for n in upload)  # the same seed, the same bytes
    by_hand = model.train()
    _block(by_hand).row_generators = [generator(Draw.CLIENT_BOTTLENECK, 3, 0, i) for i in range(4)]
    loss = F.cross_entropy(by_hand(images[:4]), labels[:4]) + take_penalty(by_hand)
    want = torch.autograd.grad(loss, list(by_hand.parameters()))
    for (name, _), g in zip(by_hand.named_parameters(), want):
        torch.testing.assert_close(upload[name], g, rtol=1e-5, atol=1e-7)
    other = simulate_client(model, images[:4], labels[:4], client, seed=4).gradients
    assert not torch.equal(other["fc.0.decoder.weight"], upload["fc.0.decoder.weight"])  # noise drawn per seed


def test_the_adaptive_attacker_leaves_the_block_out_and_meets_a_noiseless_upload_at_the_truth(fashion_images, tmp_path):
    images, labels, _, _ = fashion_images
    path = make_upload(tmp_path, images[:4], labels[:4], bottleneck=PRECODE)
    victim = Victim.load(path)
    assert victim.threat_model.bottleneck is not None and read_json(path.with_suffix(".json"))["bottleneck"] == PRECODE
    a = inversion_params(iterations=1, restarts=1, lr=0.1, lr_min=0.001, tv_weight=0.0)
    classic = a.model_copy(update={"client_model": "plain"})
    assert adapts(victim.threat_model, a) and not adapts(victim.threat_model, classic)
    adaptive_target, classic_target = Target.of(victim, a), Target.of(victim, classic)
    matched = [n for n, p in adaptive_target.model.named_parameters() if p.requires_grad]
    assert matched and all(n.startswith("features.") for n in matched)
    assert all(p.requires_grad for p in classic_target.model.parameters())
    assert all(p.requires_grad for p in victim.model.parameters())  # the victim's model is not touched
    # the client's noise off: the adaptive attacker's gradient at the true batch is the upload
    noiseless = victim.model.train()
    _block(noiseless).sample = False
    loss = F.cross_entropy(noiseless(images[:4]), labels[:4]) + take_penalty(noiseless)
    truth = dict(zip([n for n, _ in noiseless.named_parameters()], torch.autograd.grad(loss, noiseless.parameters())))
    at_truth = dummy_gradient(adaptive_target.model, images[:4], labels[:4])
    for name, got in zip(matched, at_truth):
        torch.testing.assert_close(got, truth[name], rtol=1e-4, atol=1e-7)
    # with the client's own noise, the adaptive attacker's loss at the truth is what the noise moved
    assert 0 < gradient_loss(adaptive_target, a, seed=0)(images[:4]) < 0.05


def test_a_model_without_the_block_names_none(fashion_images, tmp_path):
    images, labels, _, _ = fashion_images
    path = make_upload(tmp_path, images[:4], labels[:4])
    assert "bottleneck" not in read_json(path.with_suffix(".json"))  # the bytes of uploads before PRECODE
    assert "bottleneck" not in read_json(tmp_path / "epoch-000" / "epoch-000.json")
    assert Victim.load(path).threat_model.bottleneck is None


def test_a_scheme_trains_at_its_own_step_size():
    data = TensorDataset(torch.randn(8, 1, 32, 32), torch.arange(8) % 10)
    params = make_params(schemes__pure__lr=0.001)
    module = Classifier(build_model("convnet", 1, 10, 32), data, data, 10, params, params.scheme("pure"))
    assert module.configure_optimizers()[0][0].param_groups[0]["lr"] == 0.001
    params = make_params()
    module = Classifier(build_model("convnet", 1, 10, 32), data, data, 10, params, params.scheme("pure"))
    assert module.configure_optimizers()[0][0].param_groups[0]["lr"] == params.train.lr


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"schemes__pure__bottleneck": {"size": 0, "beta": 1e-3}}, r"bottleneck.size: Input should be greater"),
        ({"schemes__pure__bottleneck": {"size": 256, "beta": -1}}, r"bottleneck.beta: Input should be greater"),
        ({"schemes__dp-sgd__bottleneck": PRECODE}, r"bottleneck and per-sample dp"),
        ({"schemes__pure__lr": 0}, r"schemes.pure.lr: Input should be greater than 0"),
        ({"report__power": 0.05}, r"power 0.05 at level alpha 0.05"),
    ],
)
def test_bad_precode_step_size_and_power_parameters_are_refused_in_one_line(overrides, message):
    with pytest.raises(PipelineError, match=message) as err:
        make_params(**overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"scheme": "precode", "defense": {"kind": "sign"}}, "a client defense"),
        ({"scheme": "precode", "local_steps": 2}, "local_steps > 1"),
        ({"scheme": "precode", "participants": 2, "participants_as": "processes"}, "participants_as: processes"),
        ({"scheme": "precode", "attack": {"labels": "llg"}}, "labels llg or idlg"),
    ],
)
def test_what_a_precode_client_cannot_do_yet_is_refused_in_one_line(setting, message):
    scheme = {"norm": "batch-sync", "batch_multiplier": 1, "maxpool_kernel": None, "dp": None, "defense": None}
    overrides = {"schemes__precode": {**scheme, "bottleneck": PRECODE}, "settings__precode": setting}
    with pytest.raises(
        PipelineError, match=f"settings.precode: its scheme's bottleneck \\(PRECODE\\) does not take {message}"
    ):
        make_params(**overrides)
    with pytest.raises(PipelineError, match="PRECODE's block is built and measured on the convnet only"):
        make_params(model__arch="resnet18", schemes__precode={**scheme, "bottleneck": PRECODE})
