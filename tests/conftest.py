import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import Params, parse_params
from pipeline.sections import AttackParams

REPO = Path(__file__).resolve().parents[1]
RAW_PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def set_dotted(raw: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[leaf] = value


def make_params(**overrides) -> Params:
    """The project's params.yaml with overrides given as data__image_size=16 (double underscore = dot)."""
    raw = copy.deepcopy(RAW_PARAMS)
    for key, value in overrides.items():
        set_dotted(raw, key.replace("__", "."), value)
    return parse_params(raw)


# the attack's keys a test of the inversion itself does not vary
INVERSION = {
    "labels": "known",
    "client_model": "exact",
    "local_steps_model": "unrolled",
    "classic": False,
    "objective": "cosine",
    "layer_weights": "equal",
    "bn_prior": 0.0,
    "bn_statistics": "running",
    "tv_target": None,
    "accelerator": "cpu",
    "processes": 1,
    "split": "jobs",
    "threads": 1,
    "compile": False,
    "combine": "best",
    "hyperparameters": "fixed",
    "sign_temperature": 0.1,
    "clip_bound": "stated",
    "pruning_model": "magnitude",
}


def inversion_params(**values) -> AttackParams:
    """Attack parameters for calling `invert` directly: its budget and step in `values`."""
    return AttackParams(**{**INVERSION, **values})


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    root = Path(RAW_PARAMS["data"]["root"])
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"Fashion-MNIST missing at {root}: run ./run.sh setup (or apt-get install dataset-fashion-mnist)")
    return root


@pytest.fixture(scope="session")
def fashion_images(fashion_root):
    """A few real Fashion-MNIST test images at 32 px, normalised, with labels and normalisation."""
    from pipeline.data import _resize, normalise
    from pipeline.sources import load_fashion_mnist

    _, test, _ = load_fashion_mnist(fashion_root)
    small = _resize(type(test)(test.images[:64], test.labels[:64]), 32)
    mean, std = [0.286], [0.353]
    return normalise(small.images, mean, std), small.labels, mean, std


@pytest.fixture
def upload_file(tmp_path) -> Path:
    """A plain client's upload of two random images (tmp_path/up.safetensors), its checkpoint
    beside it (tmp_path/ckpt.safetensors): the threat model stated, nothing else revealed."""
    from tests.helpers import two_image_upload  # here: tests.helpers imports this module

    return two_image_upload(tmp_path)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _own_tracking_store(monkeypatch):
    """mlflow.set_tracking_uri sets a module global and exports MLFLOW_TRACKING_URI, so a test that
    logs would leave its store to every later test in the process; each starts as it was given."""
    given = os.environ.get("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", given or "")  # recorded, so undone after the test
    if given is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
    yield
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if utils is not None:  # set_tracking_uri's module global, which mlflow reads before the environment
        utils._tracking_uri = None


# The end-to-end file (two clean clones running the whole tiny chain side by side) takes the
# longest; under `--dist loadfile` the files go out in collection order, so it goes first
# rather than starting late and finishing last.
LONGEST_FIRST = ("test_pipeline.py",)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: the rest keep their order
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device: torch sees none here")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def pytest_report_header(config) -> str:
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"gpu tests: {devices} CUDA device(s)" if devices else "gpu tests: skipped (torch sees no CUDA device)"
