import copy

import pytest
import yaml

from pipeline.config import load_params, parse_params
from pipeline.errors import PipelineError
from tests.conftest import RAW_PARAMS, REPO, set_dotted


def test_project_params_validate():
    params = load_params(REPO / "params.yaml")
    assert params.model.arch == "resnet18"
    assert max(params.extract.epochs) <= params.train.epochs


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.optimizer", "adam", "params.yaml: unknown key 'train.optimizer'"),
        ("train.scheme", "gh", "params.yaml: train.scheme: Input should be 'pure' (got 'gh')"),
        ("attack.lr", -0.1, "params.yaml: attack.lr: Input should be greater than 0 (got -0.1)"),
        ("extract.batch_size", 0, "params.yaml: extract.batch_size: Input should be greater than or equal to 1 (got 0)"),
        ("extract.mode", "both", "params.yaml: extract.mode: Input should be 'train' or 'eval' (got 'both')"),
        ("model.arch", "vgg99", "params.yaml: model.arch: Input should be 'resnet18' or 'convnet' (got 'vgg99')"),
        ("attack.iterations", 0, "params.yaml: attack.iterations: Input should be greater than or equal to 1 (got 0)"),
        ("data.source", "mnist", "params.yaml: data.source: Input should be 'fashion-mnist' or 'imagefolder' (got 'mnist')"),
        ("extract.epochs", [0, 99], "params.yaml: extract.epochs: checkpoint epoch 99 is past the last one trained (train.epochs is 3)"),
        ("attack.labels", "idlg", "params.yaml: attack.labels: 'idlg' needs extract.batch_size: 1"),
    ],
)
def test_bad_value_gives_one_line_naming_the_key(key, value, message):
    raw = copy.deepcopy(RAW_PARAMS)
    set_dotted(raw, key, value)
    if key == "attack.labels":
        raw["extract"]["batch_size"] = 4
    with pytest.raises(PipelineError) as err:
        parse_params(raw)
    assert str(err.value) == message
    assert "\n" not in str(err.value)


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
