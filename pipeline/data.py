"""Datasets: Fashion-MNIST from its idx files, CIFAR-10/100 from their binary versions, or any
folder of class sub-folders.

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
from pipeline.files import load_meta, load_tensors, save_tensors
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
    train: Split | ImageIndex
    test: Split | ImageIndex
    victims: Split  # always in memory (small)
    victim_indices: torch.Tensor  # positions of the victims in the train split
    classes: list[str]
    mean: list[float]
    std: list[float]
    converted: dict[str, int]  # an image folder's images per mode converted to the one it is read as


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


GREY_MODES = ("1", "L", "LA", "I;16", "I", "F")
NORMALISATION_SAMPLE = 2048  # images a streamed folder's normalisation is estimated on (seeded)


@dataclass
class ImageIndex:
    """A streamed split: its images' files (relative to `root`) and labels, decoded when read.
    Every image is read as `mode` (L or RGB) at `image_size`, as the materialised folder is."""

    root: Path
    files: list[str]
    labels: torch.Tensor  # int64 [N]
    mode: str
    image_size: int

    def images_at(self, positions: torch.Tensor) -> torch.Tensor:
        """uint8 [n, C, S, S]: those images resized (shorter side) and centre-cropped."""
        return torch.stack(
            [_fit(read_image(self.root / self.files[int(i)], self.mode), self.image_size) for i in positions]
        )

    def subset(self, keep: torch.Tensor) -> ImageIndex:
        return ImageIndex(
            self.root, [self.files[int(i)] for i in keep], self.labels[keep].contiguous(), self.mode, self.image_size
        )


class StreamedImages(torch.utils.data.Dataset):
    """An index's images decoded one by one (in DataLoader workers), normalised. `augment`: the
    original's training crops (RandomResizedCrop to the size, a horizontal flip at random,
    torch's generator: seeded per worker by Lightning); else the centre crop prepare takes."""

    def __init__(self, index: ImageIndex, mean: list[float], std: list[float], augment: bool):
        self.index, self.augment = index, augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.index.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.transforms import v2

        image = read_image(self.index.root / self.index.files[i], self.index.mode)
        size = self.index.image_size
        if self.augment:
            image = v2.RandomHorizontalFlip()(v2.RandomResizedCrop(size, antialias=True)(image))
        else:
            image = _fit(image, size)
        return (image.float() / 255 - self.mean) / self.std, self.index.labels[i]


def images_at(split: Split | ImageIndex, positions: torch.Tensor) -> torch.Tensor:
    """The uint8 images at `positions` of a split, in memory or streamed."""
    return split.images_at(positions) if isinstance(split, ImageIndex) else split.images[positions]


def read_image(path: Path, mode: str) -> torch.Tensor:
    """One image file as uint8 [C, H, W] in `mode` (L or RGB: grey, palette and CMYK converted)."""
    try:
        with Image.open(path) as img:
            img.load()
            array = np.asarray(img.convert(mode))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise PipelineError(f"{path}: unreadable image ({err})") from None
    return torch.from_numpy((array[:, :, None] if array.ndim == 2 else array).copy()).permute(2, 0, 1)


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


def _fit(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize the shorter side to `image_size`, then crop the centre square."""
    from torchvision.transforms.v2 import functional as TF  # slow to import: only the prepare stage needs it

    return TF.center_crop(TF.resize(images, [image_size], antialias=True), [image_size, image_size])


def _resize(split: Split, image_size: int) -> Split:
    if split.images.shape[-1] == image_size and split.images.shape[-2] == image_size:
        return split
    return Split(_fit(split.images, image_size).contiguous(), split.labels)


def _take(split: Split | ImageIndex, keep: torch.Tensor) -> Split | ImageIndex:
    if isinstance(split, ImageIndex):
        return split.subset(keep)
    return Split(split.images[keep].contiguous(), split.labels[keep].contiguous())


def _subset(split: Split | ImageIndex, size: int | None, gen: torch.Generator) -> Split | ImageIndex:
    if size is None or size >= len(split.labels):
        return split
    return _take(split, torch.randperm(len(split.labels), generator=gen)[:size].sort().values)


def _victim_pool(split: Split | ImageIndex, per_class: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
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
    """Load the configured source and derive everything the later stages need. An image folder
    of more than `data.stream_above` images is indexed, not loaded: its train and test splits
    are streamed from the files (pipeline.train), its victims decoded here."""
    gen = generator(Draw.DATA_SPLIT, seed)
    root = Path(params.root)
    converted: dict[str, int] = {}
    train: Split | ImageIndex
    test: Split | ImageIndex
    if params.source != "imagefolder":  # the data sets with their own test split
        train, test, classes = (
            load_fashion_mnist(root) if params.source == "fashion-mnist" else load_cifar(root, params.source)
        )
        train, test = _resize(train, params.image_size), _resize(test, params.image_size)
        if params.channels and params.channels != train.images.shape[1]:
            raise PipelineError(f"data.channels is {params.channels}, but {params.source} has {train.images.shape[1]}")
    else:
        listing = list_image_folder(root, params.channels)
        classes, converted = listing.classes, listing.conversions()
        everything: Split | ImageIndex
        if params.stream_above is not None and len(listing.files) > params.stream_above:
            everything = ImageIndex(root, listing.files, listing.labels, listing.mode, params.image_size)
        else:
            everything = Split(*_decoded(root, listing, params.image_size))
        order = torch.randperm(len(everything.labels), generator=gen)
        n_test = max(1, round(params.test_fraction * len(order)))
        if n_test >= len(order):
            raise PipelineError(f"{root}: too few images ({len(order)}) to hold out a test split")
        test = _take(everything, order[:n_test].sort().values)
        train = _take(everything, order[n_test:].sort().values)
    train = _subset(train, params.train_size, gen)
    test = _subset(test, params.test_size, gen)
    if isinstance(train, ImageIndex):  # estimated on a seeded sample of the training images
        sample = torch.randperm(len(train.labels), generator=generator(Draw.NORMALISATION_SAMPLE, seed))
        sample = sample[:NORMALISATION_SAMPLE].sort().values
        pixels = train.images_at(sample).double().div(255).transpose(0, 1).flatten(1)
    else:
        pixels = train.images.double().div(255).transpose(0, 1).flatten(1)  # [C, N*H*W]
    mean, std = pixels.mean(1), pixels.std(1)
    if (std == 0).any():
        raise PipelineError("the training images have a channel of constant value; cannot normalise")
    victim_idx = _victim_pool(train, params.victims_per_class, len(classes), gen)
    return PreparedData(
        train=train,
        test=test,
        victims=Split(images_at(train, victim_idx).contiguous(), train.labels[victim_idx].contiguous()),
        victim_indices=victim_idx,
        classes=classes,
        mean=[round(float(v), 6) for v in mean],
        std=[round(float(v), 6) for v in std],
        converted=converted,
    )


def _decoded(root: Path, listing: FolderListing, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([_fit(read_image(root / f, listing.mode), image_size) for f in listing.files])
    return images, listing.labels


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


def attacker_split(data: PreparedData) -> Split | ImageIndex:
    """The images the attacker owns: the training split less the victim pool (what it tunes on)."""
    keep = torch.ones(len(data.train.labels), dtype=torch.bool)
    keep[data.victim_indices] = False
    return _take(data.train, torch.nonzero(keep).flatten())


def save_prepared(folder: Path, data: PreparedData, source: str) -> None:
    """Write the splits as tensor files (train, test, victims and the attacker's own images),
    each beside a JSON naming classes and normalisation; a streamed split's file holds its
    labels, its JSON the image files (relative to `streamed.root`) and how they are read."""
    channels, size = data.victims.images.shape[1], data.victims.images.shape[-1]
    meta = {
        "source": source,
        "classes": data.classes,
        "mean": data.mean,
        "std": data.std,
        "channels": channels,
        "image_size": size,
        **({"converted": data.converted} if data.converted else {}),
    }
    for name, split in (
        ("train", data.train),
        ("test", data.test),
        ("victims", data.victims),
        ("attacker", attacker_split(data)),
    ):
        extra = {}
        if isinstance(split, ImageIndex):
            tensors = {"labels": split.labels}
            extra = {"streamed": {"root": str(split.root), "mode": split.mode, "files": split.files}}
        else:
            tensors = {"images": split.images, "labels": split.labels}
        if name == "victims":
            tensors["train_index"] = data.victim_indices
        save_tensors(
            folder / f"{name}.safetensors", tensors, {**meta, "split": name, "size": len(split.labels), **extra}
        )


def load_split(folder: Path, name: str) -> tuple[Split | ImageIndex, dict]:
    """One prepared split (in memory, or streamed: an index of files) and its metadata (classes,
    mean, std, channels, image_size)."""
    path = folder / f"{name}.safetensors"
    streamed = load_meta(path).get("streamed")
    keys = ({"labels"} if streamed else {"images", "labels"}) | ({"train_index"} if name == "victims" else set())
    tensors, meta = load_tensors(path, expected=keys)
    labels = tensors["labels"]
    if streamed:
        if labels.dtype != torch.int64 or labels.shape != (len(streamed["files"]),):
            raise PipelineError(f"{path}: labels do not match the {len(streamed['files'])} files of its index")
        return ImageIndex(Path(streamed["root"]), streamed["files"], labels, streamed["mode"], meta["image_size"]), meta
    images = tensors["images"]
    if images.dtype != torch.uint8 or images.ndim != 4 or labels.shape != (images.shape[0],):
        raise PipelineError(f"{path}: images/labels have unexpected types or shapes")
    return Split(images, labels), meta


def in_memory(split: Split | ImageIndex, path: Path) -> Split:
    """A split that must be in memory (the victims): refuses an index."""
    if isinstance(split, ImageIndex):
        raise PipelineError(f"{path}: a streamed split where images in memory are needed")
    return split
