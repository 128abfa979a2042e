"""Preparation: a data source (pipeline.sources: Fashion-MNIST, CIFAR-10/100, or any folder of
class sub-folders) made the prepared splits every later stage reads, and their file format.

`prepare` turns either into the same thing: uint8 image tensors at one square size, a
deterministic train/test split, the normalisation of the train split, class names and a
fixed pool of victim images (a few per class) from which client batches are drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.files import load_meta, load_tensors, save_tensors
from pipeline.images import ImageIndex, Images, Split, fit, read_image
from pipeline.sections import DataParams
from pipeline.seeds import Draw, generator
from pipeline.sources import FolderListing, list_image_folder, load_cifar, load_fashion_mnist

NORMALISATION_SAMPLE = 2048  # images a streamed folder's normalisation is estimated on (seeded)


@dataclass
class PreparedData:
    train: Images
    test: Images
    victims: Split  # always in memory (small)
    victim_indices: torch.Tensor  # positions of the victims in the train split
    classes: list[str]
    mean: list[float]
    std: list[float]
    converted: dict[str, int]  # an image folder's images per mode converted to the one it is read as


def _resize(split: Split, image_size: int) -> Split:
    if split.images.shape[-1] == image_size and split.images.shape[-2] == image_size:
        return split
    return Split(fit(split.images, image_size).contiguous(), split.labels)


def _subset(split: Images, size: int | None, gen: torch.Generator) -> Images:
    if size is None or size >= len(split.labels):
        return split
    return split.subset(torch.randperm(len(split.labels), generator=gen)[:size].sort().values)


def _victim_pool(split: Images, per_class: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
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
    train: Images
    test: Images
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
        everything: Images
        if params.stream_above is not None and len(listing.files) > params.stream_above:
            everything = ImageIndex(root, listing.files, listing.labels, listing.mode, params.image_size)
        else:
            everything = Split(*_decoded(root, listing, params.image_size))
        order = torch.randperm(len(everything.labels), generator=gen)
        n_test = max(1, round(params.test_fraction * len(order)))
        if n_test >= len(order):
            raise PipelineError(f"{root}: too few images ({len(order)}) to hold out a test split")
        test = everything.subset(order[:n_test].sort().values)
        train = everything.subset(order[n_test:].sort().values)
    train = _subset(train, params.train_size, gen)
    test = _subset(test, params.test_size, gen)
    if isinstance(train, Split):
        pixels = train.images.double().div(255).transpose(0, 1).flatten(1)  # [C, N*H*W]
    else:  # streamed: estimated on a seeded sample of the training images
        sample = torch.randperm(len(train.labels), generator=generator(Draw.NORMALISATION_SAMPLE, seed))
        sample = sample[:NORMALISATION_SAMPLE].sort().values
        pixels = train.images_at(sample).double().div(255).transpose(0, 1).flatten(1)
    mean, std = pixels.mean(1), pixels.std(1)
    if (std == 0).any():
        raise PipelineError("the training images have a channel of constant value; cannot normalise")
    victim_idx = _victim_pool(train, params.victims_per_class, len(classes), gen)
    return PreparedData(
        train=train,
        test=test,
        victims=Split(train.images_at(victim_idx).contiguous(), train.labels[victim_idx].contiguous()),
        victim_indices=victim_idx,
        classes=classes,
        mean=[round(float(v), 6) for v in mean],
        std=[round(float(v), 6) for v in std],
        converted=converted,
    )


def _decoded(root: Path, listing: FolderListing, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([fit(read_image(root / f, listing.mode), image_size) for f in listing.files])
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


def attacker_split(data: PreparedData) -> Images:
    """The images the attacker owns: the training split less the victim pool (what it tunes on)."""
    keep = torch.ones(len(data.train.labels), dtype=torch.bool)
    keep[data.victim_indices] = False
    return data.train.subset(torch.nonzero(keep).flatten())


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
        if isinstance(split, Split):
            tensors = {"images": split.images, "labels": split.labels}
        else:
            assert isinstance(split, ImageIndex)
            tensors = {"labels": split.labels}
            extra = {"streamed": {"root": str(split.root), "mode": split.mode, "files": split.files}}
        if name == "victims":
            tensors["train_index"] = data.victim_indices
        save_tensors(
            folder / f"{name}.safetensors", tensors, {**meta, "split": name, "size": len(split.labels), **extra}
        )


def load_split(folder: Path, name: str) -> tuple[Images, dict]:
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


def in_memory(split: Images, path: Path) -> Split:
    """A split that must be in memory (the victims): refuses an index."""
    if not isinstance(split, Split):
        raise PipelineError(f"{path}: a streamed split where images in memory are needed")
    return split
