"""Datasets: Fashion-MNIST from its idx files, or any folder of class sub-folders.

`prepare` turns either into the same thing: uint8 image tensors at one square size, a
deterministic train/test split, the normalisation of the train split, class names and a
fixed pool of victim images (a few per class) from which client batches are drawn.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.config import DataParams
from pipeline.errors import PipelineError
from pipeline.files import load_tensors, save_tensors
from pipeline.seeds import Draw, generator

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]


@dataclass
class PreparedData:
    train: Split
    test: Split
    victims: Split
    victim_indices: torch.Tensor  # positions of the victims in the train split
    classes: list[str]
    mean: list[float]
    std: list[float]


def read_idx(path: Path) -> np.ndarray:
    """Read one gzipped idx file (the MNIST format) as an unsigned byte array."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except (OSError, EOFError) as err:
        raise PipelineError(f"{path}: not a readable gzip file ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise PipelineError(f"{path}: not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise PipelineError(f"{path}: idx header says {dims} but the file holds {len(raw) - offset} bytes")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(root: Path) -> tuple[Split, Split, list[str]]:
    if not root.is_dir():
        raise PipelineError(
            f"Fashion-MNIST not found at {root}: install it with `apt-get install dataset-fashion-mnist`, "
            "or set data.root to a folder holding the four *-ubyte.gz files"
        )
    arrays = {key: read_idx(root / name) for key, name in FASHION_MNIST_FILES.items()}
    splits = []
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise PipelineError(f"{root}: {part} images {images.shape} and labels {labels.shape} do not match")
        splits.append(Split(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))))
    return splits[0], splits[1], list(FASHION_MNIST_CLASSES)


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            gray = img.mode in ("1", "L", "I;16", "I", "F")
            array = np.asarray(img.convert("L" if gray else "RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise PipelineError(f"{path}: unreadable image ({err})") from None
    return array[:, :, None] if array.ndim == 2 else array


def load_image_folder(root: Path, image_size: int) -> tuple[Split, list[str]]:
    """Every image of every class sub-folder, resized (shorter side) and centre-cropped."""
    if not root.is_dir():
        raise PipelineError(f"{root}: image folder not found (data.root)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise PipelineError(f"{root}: no class sub-folders (expected {root}/<class>/<image files>)")
    images, labels = [], []
    first_of_channels: dict[int, Path] = {}
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise PipelineError(f"{root / name}: class folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for path in files:
            array = _read_image(path)
            first_of_channels.setdefault(array.shape[2], path)
            if len(first_of_channels) > 1:
                (c1, p1), (c2, p2) = sorted(first_of_channels.items())
                raise PipelineError(f"{root}: mixed channel counts: {p1} has {c1}, {p2} has {c2}")
            tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
            tensor = _fit(tensor, image_size)
            images.append(tensor)
            labels.append(label)
    return Split(torch.stack(images), torch.tensor(labels, dtype=torch.long)), classes


def _fit(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize the shorter side to `image_size`, then crop the centre square."""
    from torchvision.transforms.v2 import functional as TF  # slow to import: only the prepare stage needs it

    return TF.center_crop(TF.resize(images, [image_size], antialias=True), [image_size, image_size])


def _resize(split: Split, image_size: int) -> Split:
    if split.images.shape[-1] == image_size and split.images.shape[-2] == image_size:
        return split
    return Split(_fit(split.images, image_size).contiguous(), split.labels)


def _subset(split: Split, size: int | None, gen: torch.Generator) -> Split:
    if size is None or size >= len(split.labels):
        return split
    keep = torch.randperm(len(split.labels), generator=gen)[:size].sort().values
    return Split(split.images[keep].contiguous(), split.labels[keep].contiguous())


def _victim_pool(split: Split, per_class: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """`per_class` train positions of every class, class by class, chosen at random."""
    chosen = []
    for c in range(num_classes):
        members = torch.nonzero(split.labels == c).flatten()
        if len(members) < per_class:
            raise PipelineError(
                f"data.victims_per_class is {per_class} but class {c} has only {len(members)} training images"
            )
        chosen.append(members[torch.randperm(len(members), generator=gen)[:per_class]].sort().values)
    return torch.cat(chosen)


def prepare(params: DataParams, seed: int) -> PreparedData:
    """Load the configured source and derive everything the later stages need."""
    gen = generator(Draw.DATA_SPLIT, seed)
    root = Path(params.root)
    if params.source == "fashion-mnist":
        train, test, classes = load_fashion_mnist(root)
        train, test = _resize(train, params.image_size), _resize(test, params.image_size)
    else:
        everything, classes = load_image_folder(root, params.image_size)
        order = torch.randperm(len(everything.labels), generator=gen)
        n_test = max(1, round(params.test_fraction * len(order)))
        if n_test >= len(order):
            raise PipelineError(f"{root}: too few images ({len(order)}) to hold out a test split")
        test_idx, train_idx = order[:n_test].sort().values, order[n_test:].sort().values
        train = Split(everything.images[train_idx], everything.labels[train_idx])
        test = Split(everything.images[test_idx], everything.labels[test_idx])
    train = _subset(train, params.train_size, gen)
    test = _subset(test, params.test_size, gen)
    pixels = train.images.double().div(255).transpose(0, 1).flatten(1)  # [C, N*H*W]
    mean, std = pixels.mean(1), pixels.std(1)
    if (std == 0).any():
        raise PipelineError("the training images have a channel of constant value; cannot normalise")
    victim_idx = _victim_pool(train, params.victims_per_class, len(classes), gen)
    return PreparedData(
        train=train,
        test=test,
        victims=Split(train.images[victim_idx].contiguous(), train.labels[victim_idx].contiguous()),
        victim_indices=victim_idx,
        classes=classes,
        mean=[round(float(v), 6) for v in mean],
        std=[round(float(v), 6) for v in std],
    )


def normalise(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 [N, C, H, W] images to normalised float32."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s


def to_unit_range(normalised: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Normalised float images back to [0, 1] pixels."""
    m = torch.tensor(mean, dtype=normalised.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=normalised.dtype).view(1, -1, 1, 1)
    return (normalised * s + m).clamp(0, 1)


def attacker_split(data: PreparedData) -> Split:
    """The images the attacker owns: the training split less the victim pool (what it tunes on)."""
    keep = torch.ones(len(data.train.labels), dtype=torch.bool)
    keep[data.victim_indices] = False
    return Split(data.train.images[keep].contiguous(), data.train.labels[keep].contiguous())


def save_prepared(folder: Path, data: PreparedData, source: str) -> None:
    """Write the splits as tensor files (train, test, victims and the attacker's own images),
    each beside a JSON naming classes and normalisation."""
    channels, size = data.train.images.shape[1], data.train.images.shape[-1]
    meta = {
        "source": source,
        "classes": data.classes,
        "mean": data.mean,
        "std": data.std,
        "channels": channels,
        "image_size": size,
    }
    for name, split in (
        ("train", data.train),
        ("test", data.test),
        ("victims", data.victims),
        ("attacker", attacker_split(data)),
    ):
        tensors = {"images": split.images, "labels": split.labels}
        if name == "victims":
            tensors["train_index"] = data.victim_indices
        save_tensors(folder / f"{name}.safetensors", tensors, {**meta, "split": name, "size": len(split.labels)})


def load_split(folder: Path, name: str) -> tuple[Split, dict]:
    """One prepared split and its metadata (classes, mean, std, channels, image_size)."""
    keys = {"images", "labels"} | ({"train_index"} if name == "victims" else set())
    tensors, meta = load_tensors(folder / f"{name}.safetensors", expected=keys)
    images, labels = tensors["images"], tensors["labels"]
    if images.dtype != torch.uint8 or images.ndim != 4 or labels.shape != (images.shape[0],):
        raise PipelineError(f"{folder / name}.safetensors: images/labels have unexpected types or shapes")
    return Split(images, labels), meta
