"""Model builders: ResNet-18 (the original's model), a small ConvNet for fast runs.

Every builder takes the data's input shape and class count, so the same code serves
Fashion-MNIST (1 channel), CIFAR and ImageNet folders (3 channels).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18

from pipeline.errors import PipelineError

ARCHS = ("resnet18", "convnet")


def _resnet18(in_channels: int, num_classes: int) -> nn.Module:
    # torchvision's ResNet-18 with its stem and maxpool as they are; only the first
    # convolution follows the data's channel count.
    model = resnet18(num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


class ConvNet(nn.Module):
    """Three conv + BatchNorm blocks and one linear layer: cheap to train and to attack."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        side = (image_size + 3) // 4
        self.fc = nn.Linear(2 * width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def build_model(arch: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """A freshly initialised model (initialise under a seeded generator for reproducibility)."""
    if arch == "resnet18":
        return _resnet18(in_channels, num_classes)
    if arch == "convnet":
        return ConvNet(in_channels, num_classes, image_size)
    raise PipelineError(f"unknown model architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def smallest_batchnorm_input(model: nn.Module, in_channels: int, image_size: int) -> int:
    """Number of values per channel the smallest BatchNorm sees for one input image.

    Train-mode BatchNorm needs more than one value per channel; ResNet-18 at 32 px reaches
    1x1 maps in layer4, so a batch of one image cannot be normalised there.
    """
    sizes: list[int] = []
    hooks = [
        m.register_forward_hook(lambda _m, inp, _out: sizes.append(inp[0][0, 0].numel()))
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, image_size, image_size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return min(sizes) if sizes else 0


def classifier_weight_name(model: nn.Module) -> str:
    """Name of the last linear layer's weight, whose gradient label recovery reads."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise PipelineError("the model has no linear classifier layer to recover labels from")
    return f"{names[-1]}.weight"
