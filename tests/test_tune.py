"""The attacker's own hyper-parameter search: it never touches a victim, its study repeats
from its seed (straight through or resumed), and bad search spaces are refused in one line."""

import copy

import optuna
import pytest
import torch
import yaml

from pipeline.attack.target import Victim
from pipeline.attack.tune import Surrogate, run_study, surrogate_batches, tuned_attack
from pipeline.data import attacker_split, prepare
from pipeline.errors import PipelineError
from pipeline.sections import TuneParams
from tests.conftest import RAW_PARAMS, REPO, make_params
from tests.helpers import assert_one_line_failure, make_upload, run_stage


def test_the_attackers_images_are_the_training_split_less_every_victim(fashion_root):
    p = make_params(data__train_size=600, data__test_size=100, data__victims_per_class=3)
    data = prepare(p.data, p.seed)
    own = attacker_split(data)
    assert len(own.labels) == len(data.train.labels) - len(data.victim_indices)
    keep = torch.ones(len(data.train.labels), dtype=torch.bool)
    keep[data.victim_indices] = False
    assert torch.equal(own.images, data.train.images[keep])  # every other training image, in order
    assert not keep[data.victim_indices].any()
    # the surrogate batches are drawn from those images only, as the setting draws its victims
    batches = surrogate_batches(own, p.client, 3, p.seed)
    assert all(len(b) == p.client.batch_size and int(b.max()) < len(own.labels) for b in batches)
    assert len(torch.cat(batches).unique()) == 3 * p.client.batch_size


def test_no_tune_stage_depends_on_truth_uploads_or_the_victims():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    deps = stages["tune"]["do"]["deps"]
    assert [d for d in deps if d.startswith("data/")] == [
        "data/prepared/attacker.safetensors",
        "data/prepared/attacker.json",
    ]
    assert not [d for d in deps if d.startswith(("truth", "uploads", "attacks")) or "victim" in d]
    assert "tuning/${key}.json" in stages["attack"]["do"]["deps"]


def _surrogates(tmp_path, fashion_images) -> list[Surrogate]:
    images, labels, _, _ = fashion_images
    made = []
    for epoch in (0, 1):
        path = make_upload(
            tmp_path,
            images[epoch * 2 : epoch * 2 + 2],
            labels[epoch * 2 : epoch * 2 + 2],
            name=f"s{epoch}",
            epoch=epoch,
        )
        made.append(Surrogate(Victim.load(path), ((images[epoch * 2 : epoch * 2 + 2] * 0.353) + 0.286).clamp(0, 1)))
    return made


TUNE = TuneParams(
    trials=4,
    batches=1,
    objective="psnr",
    startup_trials=1,
    space={"lr": {"low": 0.01, "high": 0.5, "log": True}, "tv_weight": {"low": 1e-4, "high": 0.1, "log": True}},
)


def _attack():
    return make_params(attack__iterations=8, attack__processes=1, attack__threads=1).attack


def test_the_same_seed_gives_the_same_study_and_a_killed_one_resumes_to_it(tmp_path, fashion_images):
    surrogates = _surrogates(tmp_path, fashion_images)
    straight = run_study(surrogates, _attack(), TUNE, 0, tmp_path / "a")
    again = run_study(surrogates, _attack(), TUNE, 0, tmp_path / "b")
    assert straight == again
    assert straight[0].values == {"lr": 0.1, "tv_weight": 0.01}  # trial 0: params.yaml's fixed attack
    assert len({tuple(r.values.values()) for r in straight}) == TUNE.trials  # the sampler moved
    assert all(r.state == "complete" or len(r.steps) < 2 for r in straight)  # pruned: stopped after epoch 0
    # killed during its third trial: two finished, one left RUNNING in the study's storage
    folder = tmp_path / "c"
    run_study(surrogates, _attack(), TUNE.model_copy(update={"trials": 2}), 0, folder)
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{folder / 'study.db'}")
    study.ask()
    assert run_study(surrogates, _attack(), TUNE, 0, folder) == straight
    assert run_study(surrogates, _attack(), TUNE, 1, tmp_path / "d") != straight  # another seed, another study


def test_the_tuned_attack_takes_the_studys_best_values_and_refuses_a_fixed_record():
    a = _attack()
    assert tuned_attack(a, {"hyperparameters": "tuned", "best": {"lr": 0.02}}, "t.json").lr == 0.02
    with pytest.raises(PipelineError, match="t.json: holds no tuned hyper-parameters"):
        tuned_attack(a, {"hyperparameters": "fixed"}, "t.json")


def _tuned_params(**tune) -> dict:
    raw = copy.deepcopy(RAW_PARAMS)
    raw["settings"]["pure"]["attack"] = {"hyperparameters": "tuned"}
    raw["report"]["budget"] = None  # a tuned baseline has no fixed budget to double
    raw["tune"].update(tune)
    return raw


@pytest.mark.parametrize(
    "space, expected",
    [
        ({"lr": {"low": 0.3, "high": 0.01}}, "params.yaml: tune.space.lr: low 0.3 is above high 0.01"),
        ({"momentum": {"low": 0.1, "high": 0.9}}, "tune.space: 'momentum' is not a key the study can tune"),
        ({"objective": {"low": 0.1, "high": 0.9}}, "tune.space.objective: takes choices"),
        (
            {"tv_weight": {"low": -1.0, "high": 0.1}},
            "tune.space.tv_weight.tv_weight: Input should be greater than or equal to 0",
        ),
    ],
)
def test_a_bad_search_space_is_refused_in_one_line(tmp_path, space, expected):
    done = run_stage("tune", tmp_path, _tuned_params(space=space), "pure")
    assert_one_line_failure(done, expected)
    assert not (tmp_path / "tuning").exists()


def test_a_tuned_attack_without_its_study_is_refused_in_one_line(tmp_path):
    done = run_stage("attack", tmp_path, _tuned_params(), "pure")
    assert_one_line_failure(done, "attack: error: tuning/pure.json: not found, but attack.hyperparameters is tuned")


def test_a_fixed_setting_only_writes_that_down(tmp_path):
    done = run_stage("tune", tmp_path, RAW_PARAMS, "ra")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load((tmp_path / "tuning" / "ra.json").read_text()) == {
        "setting": "ra",
        "hyperparameters": "fixed",
    }
    assert not (tmp_path / "mlflow.db").exists()  # nothing computed, nothing tracked
