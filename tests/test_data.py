import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import load_split, prepare, read_idx, save_prepared
from pipeline.errors import PipelineError
from tests.conftest import make_params


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_round_trip_and_truncation(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", array)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    with gzip.open(tmp_path / "b.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"short")
    with pytest.raises(PipelineError, match="idx header says"):
        read_idx(tmp_path / "b.gz")


def test_fashion_mnist_prepare_is_deterministic_and_stratified(fashion_root, tmp_path):
    params = make_params(data__train_size=2000, data__test_size=300, data__victims_per_class=3)
    a, b = prepare(params.data, seed=5), prepare(params.data, seed=5)
    assert a.train.images.shape == (2000, 1, 32, 32) and a.train.images.dtype == torch.uint8
    assert a.test.images.shape == (300, 1, 32, 32)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.victim_indices, b.victim_indices)
    # three victims of every class, and they really are train images of that class
    assert torch.equal(torch.bincount(a.victims.labels), torch.full((10,), 3))
    assert torch.equal(a.train.labels[a.victim_indices], a.victims.labels)
    # the normalisation is the train split's own
    pixels = a.train.images.double() / 255
    assert a.mean[0] == pytest.approx(float(pixels.mean()), abs=1e-6)
    assert a.std[0] == pytest.approx(float(pixels.std()), abs=1e-6)
    save_prepared(tmp_path, a, "fashion-mnist")
    victims, meta = load_split(tmp_path, "victims")
    assert torch.equal(victims.images, a.victims.images) and meta["classes"][9] == "Ankle boot"
    assert prepare(params.data, seed=6).victim_indices.tolist() != a.victim_indices.tolist()


def _image_folder(root, classes=("cat", "dog"), per_class=5, mode="RGB", size=(40, 30)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")


def test_image_folder_prepare(tmp_path):
    _image_folder(tmp_path / "imgs")
    params = make_params(
        data__source="imagefolder",
        data__root=str(tmp_path / "imgs"),
        data__image_size=16,
        data__test_fraction=0.2,
        data__victims_per_class=2,
        data__train_size=None,
        data__test_size=None,
    )
    data = prepare(params.data, seed=0)
    assert data.classes == ["cat", "dog"]
    assert data.train.images.shape == (8, 3, 16, 16) and data.test.images.shape == (2, 3, 16, 16)
    assert len(data.mean) == 3


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "image folder not found"),
        ("no-classes", "no class sub-folders"),
        ("empty-class", "dog: class folder holds no images"),
        ("corrupt", "bad.png: unreadable image"),
        ("mixed", "mixed channel counts"),
    ],
)
def test_image_folder_errors(tmp_path, case, message):
    root = tmp_path / "imgs"
    if case == "no-classes":
        root.mkdir()
    elif case == "empty-class":
        _image_folder(root, classes=("cat",))
        (root / "dog").mkdir()
    elif case == "corrupt":
        _image_folder(root)
        (root / "dog" / "bad.png").write_bytes(b"\x89PNG not really")
    elif case == "mixed":
        _image_folder(root, classes=("cat",))
        _image_folder(root, classes=("dog",), mode="L")
    params = make_params(data__source="imagefolder", data__root=str(root), data__victims_per_class=1)
    with pytest.raises(PipelineError, match=message):
        prepare(params.data, seed=0)


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    params = make_params(data__root=str(tmp_path / "nowhere"))
    with pytest.raises(PipelineError, match="apt-get install dataset-fashion-mnist"):
        prepare(params.data, seed=0)
