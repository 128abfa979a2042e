import copy
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import Params, parse_params

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


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    root = Path(RAW_PARAMS["data"]["root"])
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"Fashion-MNIST missing at {root}: run ./run.sh setup (or apt-get install dataset-fashion-mnist)")
    return root


@pytest.fixture(scope="session")
def fashion_images(fashion_root):
    """A few real Fashion-MNIST test images at 32 px, normalised, with labels and normalisation."""
    from pipeline.data import _resize, load_fashion_mnist, normalise

    _, test, _ = load_fashion_mnist(fashion_root)
    small = _resize(type(test)(test.images[:64], test.labels[:64]), 32)
    mean, std = [0.286], [0.353]
    return normalise(small.images, mean, std), small.labels, mean, std


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

