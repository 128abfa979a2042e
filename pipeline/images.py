"""A set of labelled images, in memory (`Split`) or streamed from files (`ImageIndex`): both
answer `Images` — their labels, the uint8 images at some positions, a subset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.errors import PipelineError


class Images(Protocol):
    labels: torch.Tensor  # int64 [N]

    def images_at(self, positions: torch.Tensor) -> torch.Tensor:
        """uint8 [n, C, H, W]: the images at `positions`."""
        ...

    def subset(self, keep: torch.Tensor) -> Images: ...


@dataclass
class Split:
    """Images in memory."""

    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    def images_at(self, positions: torch.Tensor) -> torch.Tensor:
        return self.images[positions]

    def subset(self, keep: torch.Tensor) -> Split:
        return Split(self.images[keep].contiguous(), self.labels[keep].contiguous())


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
            [fit(read_image(self.root / self.files[int(i)], self.mode), self.image_size) for i in positions]
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
            image = fit(image, size)
        return (image.float() / 255 - self.mean) / self.std, self.index.labels[i]


def read_image(path: Path, mode: str) -> torch.Tensor:
    """One image file as uint8 [C, H, W] in `mode` (L or RGB: grey, palette and CMYK converted)."""
    try:
        with Image.open(path) as img:
            img.load()
            array = np.asarray(img.convert(mode))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise PipelineError(f"{path}: unreadable image ({err})") from None
    return torch.from_numpy((array[:, :, None] if array.ndim == 2 else array).copy()).permute(2, 0, 1)


def fit(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize the shorter side to `image_size`, then crop the centre square."""
    from torchvision.transforms.v2 import functional as TF  # slow to import: only the prepare stage needs it

    return TF.center_crop(TF.resize(images, [image_size], antialias=True), [image_size, image_size])
