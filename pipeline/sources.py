"""The data sources prepare reads: Fashion-MNIST from its gzipped idx files, CIFAR-10/100 from
their binary versions, and a folder of class sub-folders of image files (listed here; decoded
or streamed by prepare)."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.errors import PipelineError
from pipeline.images import Split

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


@dataclass(frozen=True)
class CifarLayout:
    """One CIFAR binary version: its files, its record (label bytes, then 3 x 32 x 32 pixels,
    channel by channel, row-major) and which label byte is the class."""

    name: str
    archive: str  # what to download and extract, for the error message
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    class_names: str  # a text file, one name per line
    label_bytes: int
    label_at: int  # CIFAR-100: the coarse label first, then the fine one (its 100 classes)
    classes: int


CIFAR = {
    "cifar10": CifarLayout(
        "CIFAR-10",
        "cifar-10-binary.tar.gz (extracts to cifar-10-batches-bin/)",
        tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        ("test_batch.bin",),
        "batches.meta.txt",
        1,
        0,
        10,
    ),
    "cifar100": CifarLayout(
        "CIFAR-100",
        "cifar-100-binary.tar.gz (extracts to cifar-100-binary/)",
        ("train.bin",),
        ("test.bin",),
        "fine_label_names.txt",
        2,
        1,
        100,
    ),
}
CIFAR_PIXELS = 3 * 32 * 32


def read_cifar_records(path: Path, layout: CifarLayout) -> Split:
    """Every record of one CIFAR binary file: plain bytes, read with numpy (no pickle)."""
    record = layout.label_bytes + CIFAR_PIXELS
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found (a file of {layout.name}'s binary version)") from None
    if len(raw) == 0 or len(raw) % record:
        raise PipelineError(
            f"{path}: {len(raw)} bytes is not a whole number of {layout.name} records of {record} bytes (truncated?)"
        )
    rows = raw.reshape(-1, record)
    labels = rows[:, layout.label_at].astype(np.int64)
    if labels.max() >= layout.classes:
        raise PipelineError(f"{path}: label {labels.max()} out of range for {layout.name}'s {layout.classes} classes")
    images = rows[:, layout.label_bytes :].reshape(-1, 3, 32, 32)
    return Split(torch.from_numpy(images.copy()), torch.from_numpy(labels))


def load_cifar(root: Path, source: str) -> tuple[Split, Split, list[str]]:
    """CIFAR-10 or CIFAR-100 from its binary version: the official train and test split, the
    class names from the text file beside the batches (CIFAR-100: the 100 fine classes)."""
    layout = CIFAR[source]
    if not root.is_dir():
        raise PipelineError(f"{layout.name} not found at {root}: set data.root to the extracted {layout.archive}")
    names_file = root / layout.class_names
    if not names_file.is_file():
        raise PipelineError(f"{names_file}: not found (the class names of {layout.name}'s binary version)")
    classes = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(classes) != layout.classes:
        raise PipelineError(f"{names_file}: {len(classes)} class names, {layout.name} has {layout.classes}")
    splits = []
    for files in (layout.train_files, layout.test_files):
        parts = [read_cifar_records(root / name, layout) for name in files]
        splits.append(Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts])))
    return splits[0], splits[1], classes


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

GREY_MODES = ("1", "L", "LA", "I;16", "I", "F")


@dataclass
class FolderListing:
    files: list[str]  # relative to the folder, class by class, sorted
    labels: torch.Tensor
    classes: list[str]
    mode: str  # what every image is read as
    modes: dict[str, int]  # images per mode found in the files (PIL's names: RGB, L, CMYK, ...)

    def conversions(self) -> dict[str, int]:
        """Images of each mode other than the one they are read as: converted, counted, reported."""
        return {m: n for m, n in sorted(self.modes.items()) if m != self.mode}


def list_image_folder(root: Path, channels: int | None) -> FolderListing:
    """The files of every class sub-folder and the one mode they are read as: `channels` 1 (L)
    or 3 (RGB) as asked, or, by default, RGB when colour images are the majority, else L (as
    torchvision's loader makes ImageNet's grey and CMYK JPEGs RGB). Reads each file's header only."""
    if not root.is_dir():
        raise PipelineError(f"{root}: image folder not found (data.root)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise PipelineError(f"{root}: no class sub-folders (expected {root}/<class>/<image files>)")
    files, labels, modes = [], [], {}  # type: ignore[var-annotated]
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise PipelineError(f"{root / name}: class folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for path in found:
            try:
                with Image.open(path) as img:  # the header: the pixels are decoded later
                    modes[img.mode] = modes.get(img.mode, 0) + 1
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
                raise PipelineError(f"{path}: unreadable image ({err})") from None
            files.append(f"{name}/{path.name}")
            labels.append(label)
    grey = sum(n for m, n in modes.items() if m in GREY_MODES)
    mode = {1: "L", 3: "RGB"}[channels] if channels else ("L" if 2 * grey > len(files) else "RGB")
    return FolderListing(files, torch.tensor(labels, dtype=torch.long), classes, mode, modes)
