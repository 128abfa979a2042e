import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import load_split, prepare, save_prepared
from pipeline.errors import PipelineError
from pipeline.sources import read_idx
from tests.conftest import RAW_PARAMS, make_params
from tests.helpers import assert_one_line_failure, folder_params, image_folder, mixed_folder, run_stage


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


def test_image_folder_prepare(tmp_path):
    image_folder(tmp_path / "imgs")
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
    ],
)
def test_image_folder_errors(tmp_path, case, message):
    root = tmp_path / "imgs"
    if case == "no-classes":
        root.mkdir()
    elif case == "empty-class":
        image_folder(root, classes=("cat",))
        (root / "dog").mkdir()
    elif case == "corrupt":
        image_folder(root)
        (root / "dog" / "bad.png").write_bytes(b"\x89PNG not really")
    params = make_params(data__source="imagefolder", data__root=str(root), data__victims_per_class=1)
    with pytest.raises(PipelineError, match=message):
        prepare(params.data, seed=0)


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    params = make_params(data__root=str(tmp_path / "nowhere"))
    with pytest.raises(PipelineError, match="apt-get install dataset-fashion-mnist"):
        prepare(params.data, seed=0)


def _write_cifar(root, source: str, per_file: int = 3, seed: int = 0):
    """CIFAR's binary version as its page describes it, written from HWC images: per record the
    label byte(s), then the 1024 red values row by row, the green, the blue. Returns what was written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    if source == "cifar10":
        files, names, classes = (
            [*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin"],
            "batches.meta.txt",
            10,
        )
    else:
        files, names, classes = ["train.bin", "test.bin"], "fine_label_names.txt", 100
    class_names = [f"class_{i}" for i in range(classes)]
    (root / names).write_text("\n".join(class_names) + "\n\n")  # the real files end with blank lines
    written = {}
    for name in files:
        hwc = rng.integers(0, 256, (per_file, 32, 32, 3), dtype=np.uint8)
        fine = rng.integers(0, classes, per_file)
        records = b""
        for image, label in zip(hwc, fine):
            head = bytes([label]) if source == "cifar10" else bytes([label // 5, label])  # (coarse, fine)
            records += head + b"".join(image[:, :, c].tobytes() for c in range(3))
        (root / name).write_bytes(records)
        written[name] = (hwc, fine)
    return written, class_names


@pytest.mark.parametrize("source", ["cifar10", "cifar100"])
def test_cifar_binary_records_read_back_exactly(tmp_path, source):
    from pipeline.sources import CIFAR, load_cifar

    written, class_names = _write_cifar(tmp_path / "cifar", source)
    train, test, classes = load_cifar(tmp_path / "cifar", source)
    assert classes == class_names
    layout = CIFAR[source]
    for split, files in ((train, layout.train_files), (test, layout.test_files)):
        hwc = np.concatenate([written[f][0] for f in files])
        labels = np.concatenate([written[f][1] for f in files])
        assert split.images.dtype == torch.uint8 and split.images.shape == (len(labels), 3, 32, 32)
        assert torch.equal(split.images.permute(0, 2, 3, 1), torch.from_numpy(hwc))
        assert split.labels.tolist() == labels.tolist()


def test_cifar_prepares_with_its_own_test_split(tmp_path):
    written, _ = _write_cifar(tmp_path / "cifar", "cifar10", per_file=12)
    params = make_params(
        data__source="cifar10", data__root=str(tmp_path / "cifar"), data__image_size=32, data__train_size=None,
        data__test_size=None, data__victims_per_class=1,
    )  # fmt: skip
    labels = np.concatenate([written[f"data_batch_{i}.bin"][1] for i in range(1, 6)])
    if len(set(labels)) < 10:  # every class needs a victim: draw until it has one (seeded: stable)
        pytest.skip("the generated records miss a class")
    data = prepare(params.data, params.seed)
    assert len(data.train.labels) == 60 and len(data.test.labels) == 12 and data.train.images.shape[1] == 3


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            "truncate",
            "data_batch_3.bin: 9218 bytes is not a whole number of CIFAR-10 records of 3073 bytes (truncated?)",
        ),
        ("names", "batches.meta.txt: 9 class names, CIFAR-10 has 10"),
        ("missing", "test_batch.bin: file not found"),
    ],
)
def test_a_damaged_cifar_folder_is_refused_in_one_line(tmp_path, damage, message):
    root = tmp_path / "cifar"
    _write_cifar(root, "cifar10")
    if damage == "truncate":
        raw = (root / "data_batch_3.bin").read_bytes()
        (root / "data_batch_3.bin").write_bytes(raw[:-1])
    elif damage == "names":
        (root / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(9)))
    else:
        (root / "test_batch.bin").unlink()
    params = {**RAW_PARAMS, "data": {**RAW_PARAMS["data"], "source": "cifar10", "root": str(root), "image_size": 32}}
    assert_one_line_failure(run_stage("prepare", tmp_path, params), message)
    assert not (tmp_path / "data").exists()


def test_a_mostly_colour_folder_reads_grey_and_cmyk_as_rgb_and_counts_them(tmp_path):
    from pipeline.images import read_image
    from pipeline.sources import list_image_folder

    grey = mixed_folder(tmp_path / "imgs")
    listing = list_image_folder(tmp_path / "imgs", None)
    assert listing.mode == "RGB" and listing.conversions() == {"CMYK": 1, "L": 2}
    as_rgb = read_image(tmp_path / "imgs" / "cat" / "grey-0.png", "RGB")
    assert as_rgb.shape == (3, 30, 40) and all(torch.equal(c, torch.from_numpy(grey)) for c in as_rgb)
    cmyk = read_image(tmp_path / "imgs" / "dog" / "cmyk.jpg", "RGB")
    with Image.open(tmp_path / "imgs" / "dog" / "cmyk.jpg") as img:  # PIL's own conversion, as torchvision's loader
        assert torch.equal(cmyk, torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1))
    data = prepare(folder_params(tmp_path / "imgs").data, seed=0)
    assert data.victims.images.shape[1] == 3 and data.converted == {"CMYK": 1, "L": 2}
    save_prepared(tmp_path / "out", data, "imagefolder")
    _, meta = load_split(tmp_path / "out", "train")
    assert meta["converted"] == {"CMYK": 1, "L": 2} and meta["channels"] == 3
    forced = prepare(folder_params(tmp_path / "imgs", data__channels=1).data, seed=0)
    assert forced.victims.images.shape[1] == 1 and forced.converted == {"CMYK": 1, "RGB": 12}


def test_a_mostly_grey_folder_is_read_grey_and_fashion_mnist_refuses_three_channels(tmp_path):
    from pipeline.sources import list_image_folder

    image_folder(tmp_path / "imgs", mode="L")
    image_folder(tmp_path / "imgs", classes=("bird",), per_class=1)  # one colour image
    assert list_image_folder(tmp_path / "imgs", None).mode == "L"
    with pytest.raises(PipelineError, match="data.channels is 3, but fashion-mnist has 1"):
        prepare(make_params(data__channels=3, data__train_size=64, data__test_size=16).data, seed=0)


def test_a_streamed_folder_indexes_what_the_materialised_one_holds(tmp_path):
    """stream_above 0 (always) against null (never): the same split, the same victims bytes, the
    test images decoded from the index equal to those prepared in memory, the same normalisation
    (the sample covers this small training split whole)."""
    from pipeline.data import normalise
    from pipeline.images import ImageIndex, StreamedImages

    mixed_folder(tmp_path / "imgs")
    kept = prepare(folder_params(tmp_path / "imgs", data__stream_above=None).data, seed=0)
    streamed = prepare(folder_params(tmp_path / "imgs", data__stream_above=0).data, seed=0)
    assert isinstance(streamed.train, ImageIndex) and isinstance(streamed.test, ImageIndex)
    assert torch.equal(streamed.train.labels, kept.train.labels) and torch.equal(streamed.test.labels, kept.test.labels)
    assert torch.equal(streamed.victims.images, kept.victims.images)
    assert torch.equal(streamed.victim_indices, kept.victim_indices)
    positions = torch.arange(len(kept.test.labels))
    assert torch.equal(streamed.test.images_at(positions), kept.test.images)
    assert streamed.mean == pytest.approx(kept.mean, abs=1e-6) and streamed.std == pytest.approx(kept.std, abs=1e-6)
    save_prepared(tmp_path / "out", streamed, "imagefolder")
    train, meta = load_split(tmp_path / "out", "train")
    assert isinstance(train, ImageIndex) and train.files == streamed.train.files and meta["streamed"]["mode"] == "RGB"
    attacker, _ = load_split(tmp_path / "out", "attacker")
    assert len(attacker.labels) == len(train.labels) - len(streamed.victims.labels)
    assert not set(attacker.files) & {train.files[int(i)] for i in streamed.victim_indices}
    test_images = StreamedImages(streamed.test, streamed.mean, streamed.std, augment=False)
    x, y = test_images[0]
    assert torch.equal(x, normalise(kept.test.images[:1], kept.mean, kept.std)[0]) and y == kept.test.labels[0]
    crops = StreamedImages(streamed.train, streamed.mean, streamed.std, augment=True)
    assert crops[0][0].shape == (3, 16, 16)
