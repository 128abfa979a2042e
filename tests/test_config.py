import copy

import pytest
import yaml

from pipeline.config import load_params, parse_params
from pipeline.errors import PipelineError
from pipeline.sections import PruningParams, SoteriaParams
from tests.conftest import RAW_PARAMS, REPO, set_dotted


def test_project_params_validate():
    params = load_params(REPO / "params.yaml")
    assert params.model.arch == "convnet" and set(params.schemes) == {"pure", "ra", "dp-sgd", "clip-noise", "gh"}
    assert max(params.extract.epochs) <= params.train.epochs


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.optimizer", "adam", "params.yaml: unknown key 'train.optimizer'"),
        (
            "schemes.gh.norm",
            "batch",
            "params.yaml: schemes.gh.norm: Input should be 'batch-sync', 'batch-async' or 'group' (got 'batch')",
        ),
        (
            "schemes.dp-sgd.norm",
            "batch-sync",
            "params.yaml: schemes.dp-sgd: per-sample DP needs norm: group (BatchNorm ties the samples of a batch together)",
        ),
        (
            "schemes.dp-sgd.dp.sigma",
            -1.0,
            "params.yaml: schemes.dp-sgd.dp.sigma: Input should be greater than or equal to 0 (got -1.0)",
        ),
        (
            "schemes.clip-noise.dp.delta",
            1e-5,
            "params.yaml: schemes.clip-noise.dp: batch clipping has no delta and no per_sample: it gives no guarantee to account",
        ),
        (
            "schemes.clip-noise.defense",
            {"kind": "sign"},
            "params.yaml: schemes.clip-noise: defense and dp: one post-processing of the gradient at a time "
            "(DP clips already)",
        ),
        (
            "schemes.pure.defense",
            {"kind": "soteria", "percentile": 60},
            "params.yaml: schemes.pure: defense soteria trains no scheme: its mask takes one backward per "
            "representation entry at every step (docs/defenses.md); use it as a client setting's defense",
        ),
        (
            "schemes.gh.batch_multiplier",
            0,
            "params.yaml: schemes.gh.batch_multiplier: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            "train.batch_size",
            63,
            "params.yaml: schemes.pure: the global batch 63 does not split evenly over 2 processes",
        ),
        (
            "model.arch",
            "vgg11",
            "params.yaml: schemes.ra.maxpool_kernel: vgg11 has no stem maxpool to enlarge (resnet18 and convnet have)",
        ),
        ("attack.lr", -0.1, "params.yaml: attack.lr: Input should be greater than 0 (got -0.1)"),
        ("client.batch_size", 0, "params.yaml: client.batch_size: Input should be greater than or equal to 1 (got 0)"),
        ("client.mode", "both", "params.yaml: client.mode: Input should be 'train' or 'eval' (got 'both')"),
        ("client.label_repetition", 3, "params.yaml: client: batch_size 4 does not split into 3 classes of equal size"),
        (
            "settings.async-bn.participants",
            3,
            "params.yaml: settings.async-bn: batch_size 4 does not split into 3 equal participant shards",
        ),
        (
            "settings.local-steps.local_steps",
            0,
            "params.yaml: settings.local-steps.local_steps: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            "settings.client-dp.dp.sigma",
            -1.0,
            "params.yaml: settings.client-dp.dp.sigma: Input should be greater than or equal to 0 (got -1.0)",
        ),
        (
            "settings.client-dp.mode",
            "train",
            "params.yaml: settings.client-dp: per-sample DP cannot run through train-mode BatchNorm, which ties the samples together (use mode: eval or a scheme with norm: group)",
        ),
        (
            "settings.pure.scheme",
            "gradient",
            "params.yaml: settings.pure.scheme: 'gradient' is not a scheme; params.yaml defines pure, ra, dp-sgd, clip-noise, gh",
        ),
        (
            "settings.pure.participant",
            2,
            "params.yaml: settings.pure: unknown key 'participant' (a setting changes keys of client, and of attack under attack:)",
        ),
        (
            "settings.label-repeat.attack.labels",
            "guess",
            "params.yaml: settings.label-repeat.attack.labels: Input should be 'known', 'llg', 'llg-original', 'idlg' or 'counts' (got 'guess')",
        ),
        (
            "settings.label-repeat.attack.iteration",
            5,
            "params.yaml: settings.label-repeat.attack: unknown key 'iteration' (it changes keys of attack)",
        ),
        (
            "settings.pure.attack",
            {"labels": "idlg"},
            "params.yaml: settings.pure.attack.labels: 'idlg' needs batch_size 1 (settings.pure has 4)",
        ),
        (
            "model.arch",
            "vgg99",
            "params.yaml: model.arch: Input should be 'resnet18', 'vgg11' or 'convnet' (got 'vgg99')",
        ),
        (
            "attack.bn_statistics",
            "exact",
            "params.yaml: attack.bn_statistics: 'exact' needs extract.reveal_bn_statistics: true",
        ),
        ("attack.iterations", 0, "params.yaml: attack.iterations: Input should be greater than or equal to 1 (got 0)"),
        (
            "attack.combine",
            "mlco",
            "params.yaml: attack.combine: 'mlco' combines restarts: it needs restarts: 2 or more (has 1)",
        ),
        (
            "data.source",
            "mnist",
            "params.yaml: data.source: Input should be 'fashion-mnist', 'cifar10', 'cifar100' or 'imagefolder' (got 'mnist')",
        ),
        (
            "extract.epochs",
            [0, 99],
            "params.yaml: extract.epochs: checkpoint epoch 99 is past the last one trained (train.epochs is 3)",
        ),
        ("attack.labels", "idlg", "params.yaml: attack.labels: 'idlg' needs batch_size 1 (settings.pure has 4)"),
        ("extract.trials", 0, "params.yaml: extract.trials: Input should be greater than or equal to 1 (got 0)"),
        (
            "extract.trials",
            1,
            "params.yaml: extract.trials: 1 client batch per cell leaves no spread between batches to test or "
            "to make an interval from (the batch is the unit): 2 or more",
        ),
        (
            "report.budget",
            "ra",
            "params.yaml: report.budget: 'ra' must be 'pure''s scheme and client attacked with more iterations "
            "and nothing else changed (settings.<name>.attack: {iterations: N})",
        ),
        (
            "settings.pure-2x.attack",
            {"iterations": 1000, "lr": 0.2},
            "params.yaml: report.budget: 'pure-2x' must be 'pure''s scheme and client attacked with more iterations "
            "and nothing else changed (settings.<name>.attack: {iterations: N})",
        ),
        (
            "report.budget",
            "none-such",
            "params.yaml: report.budget: 'none-such' is not a setting; params.yaml defines pure, ra, dp-sgd, "
            "clip-noise, gh, async-bn, local-steps, client-dp, buffers, label-repeat, pure-2x",
        ),
        (
            "report.baseline",
            "plain",
            "params.yaml: report.baseline: 'plain' is not a setting, so nothing can be paired "
            "with it; params.yaml defines pure, ra, dp-sgd, clip-noise, gh, async-bn, local-steps, client-dp, buffers, label-repeat, pure-2x "
            "(null: a table without paired columns)",
        ),
        (
            "report.baseline",
            "label-repeat",
            "params.yaml: report.baseline: 'label-repeat' repeats labels, so its batches pair with no other setting's",
        ),
    ],
)
def test_bad_value_gives_one_line_naming_the_key(key, value, message):
    raw = copy.deepcopy(RAW_PARAMS)
    set_dotted(raw, key, value)
    with pytest.raises(PipelineError) as err:
        parse_params(raw)
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_a_family_without_a_paired_cell_is_refused_in_one_line():
    raw = copy.deepcopy(RAW_PARAMS)
    raw["settings"] = {k: v for k, v in raw["settings"].items() if k in ("pure", "label-repeat", "pure-2x")}
    with pytest.raises(PipelineError) as err:
        parse_params(raw)
    assert str(err.value) == (
        "params.yaml: report.baseline: no other setting pairs with 'pure' (the same batch size, no label "
        "repetition), so the table has no verdict to make (null: a table without paired columns)"
    )
    raw["report"]["budget"] = None
    del raw["settings"]["pure-2x"]
    raw["settings"]["bigger"] = {"scheme": "pure", "batch_size": 8}
    with pytest.raises(PipelineError, match="no other setting pairs with 'pure'"):
        parse_params(raw)
    raw["report"]["baseline"] = None
    parse_params(raw)  # no baseline: no family, a table of intervals


def test_the_compiled_attack_refuses_what_it_cannot_compute():
    raw = copy.deepcopy(RAW_PARAMS)
    set_dotted(raw, "attack.compile", True)
    with pytest.raises(
        PipelineError,
        match="^params.yaml: settings.buffers.attack.compile: the compiled step takes "
        "neither bn_prior nor split: batch$",
    ):
        parse_params(raw)  # the setting's own prior
    set_dotted(raw, "settings.buffers.attack.compile", False)
    assert parse_params(raw).attack.compile
    set_dotted(raw, "attack.bn_prior", 0.1)
    with pytest.raises(
        PipelineError, match="^params.yaml: attack.compile: the compiled step takes neither bn_prior nor split: batch$"
    ):
        parse_params(raw)


def test_unknown_scheme_name():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(
        PipelineError, match=r"^unknown scheme 'gradient'; params.yaml defines pure, ra, dp-sgd, clip-noise, gh$"
    ):
        params.scheme("gradient")


def test_unknown_setting_name():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(
        PipelineError,
        match=r"^unknown setting 'sync'; params.yaml defines pure, ra, dp-sgd, clip-noise, gh, async-bn, ",
    ):
        params.setting("sync")


def test_missing_key_is_an_error():
    raw = copy.deepcopy(RAW_PARAMS)
    del raw["attack"]["lr"]
    with pytest.raises(PipelineError, match=r"^params.yaml: missing key 'attack.lr'$"):
        parse_params(raw)


def test_unreadable_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: [unclosed\n")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_params(path)
    path.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(PipelineError, match="expected a mapping"):
        load_params(path)


def test_a_setting_changes_the_attack_it_faces_and_only_its_own():
    params = load_params(REPO / "params.yaml")
    assert params.attack_for("label-repeat").labels == "counts"
    assert params.attack_for("label-repeat").iterations == params.attack.iterations
    assert params.attack_for("pure") == params.attack
    with pytest.raises(PipelineError, match="unknown setting 'nope'"):
        params.attack_for("nope")


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            {"scheme": "pure", "defense": {"kind": "prune", "ratio": 1.5}},
            "params.yaml: settings.defended.defense.prune.ratio: Input should be less than 1 (got 1.5)",
        ),
        (
            {"scheme": "pure", "defense": {"kind": "blur"}},
            "params.yaml: settings.defended.defense: Input tag 'blur' found using 'kind' does not match any of the "
            "expected tags: 'prune', 'clip', 'sign', 'soteria' (got {'kind': 'blur'})",
        ),
        (
            {"scheme": "pure", "local_steps": 2, "defense": {"kind": "soteria", "percentile": 60}},
            "params.yaml: settings.defended: defense soteria: its mask is of one gradient of the whole batch "
            "(participants: 1, local_steps: 1)",
        ),
        (
            {
                "scheme": "pure",
                "mode": "eval",
                "defense": {"kind": "sign"},
                "dp": {"kind": "per-sample", "clip": 1.0, "sigma": 0.1, "delta": 1.0e-5},
            },
            "params.yaml: settings.defended: defense and dp: one post-processing of the update at a time "
            "(DP clips already)",
        ),
        (
            {"scheme": "pure", "defense": {"kind": "clip", "bound": 4, "scope": "global"}, "attack": {"compile": True}},
            "params.yaml: settings.defended.attack.compile: the compiled step does not apply settings.defended's "
            "defense to its dummy upload (compile: false, or client_model: plain)",
        ),
        (
            {
                "scheme": "pure",
                "local_steps": 2,
                "defense": {"kind": "sign"},
                "attack": {"local_steps_model": "sme"},
            },
            "params.yaml: settings.defended.attack.local_steps_model: SME's surrogate steps along the upload, which "
            "settings.defended's defense has changed (unrolled)",
        ),
    ],
)
def test_a_bad_defense_is_refused_in_one_line(setting, message):
    raw = copy.deepcopy(RAW_PARAMS)
    raw["settings"]["defended"] = setting
    with pytest.raises(PipelineError) as err:
        parse_params(raw)
    assert str(err.value) == message


def test_the_fields_defenses_parse_as_client_settings():
    raw = copy.deepcopy(RAW_PARAMS)
    raw["settings"]["pruned"] = {"scheme": "pure", "defense": {"kind": "prune", "ratio": 0.9}}
    raw["settings"]["soteria"] = {"scheme": "pure", "defense": {"kind": "soteria", "percentile": 60}}
    params = parse_params(raw)
    assert params.setting("pruned")[1].defense == PruningParams(kind="prune", ratio=0.9)
    assert params.setting("soteria")[1].defense == SoteriaParams(kind="soteria", percentile=60)
    assert params.setting("pure")[1].defense is None
