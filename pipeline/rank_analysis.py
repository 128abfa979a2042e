"""R-GAP's rank analysis (Zhu & Blaschko, ICLR 2021) as the original system computed it.

The network is walked unit by unit (a convolution, a pooling layer, a residual block, the
classifier). For a unit with n_x input values, n_z output values and n_w counted weights:

    rank = n_x - n_w - n_z,        RA-i(unit) = rank - n_v,
    n_v  <- n_v + max(max(n_z - n_x, 0) - max(rank, 0), 0)        (n_v starts at 0)

and the model's RA-i is the largest over its units. A positive RA-i means the system of
gradient equations is under-determined somewhere: the RA defense enlarges ResNet-18's stem
maxpool until that happens (kernel 19 at 224 px, as the original chose).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.nets import build_model


@dataclass(frozen=True)
class UnitRank:
    unit: str
    inputs: int
    outputs: int
    weights: int
    ra_index: int


def _units(model: nn.Module, arch: str) -> list[tuple[str, nn.Module, int]]:
    """(name, module, counted weights) in forward order, as the original counted them."""

    def count(*params: torch.Tensor) -> int:
        return sum(p.numel() for p in params)

    units: list[tuple[str, nn.Module, int]]
    if arch == "resnet18":
        from torchvision.models import ResNet  # imported already: the model is one

        assert isinstance(model, ResNet)
        units = [("conv1", model.conv1, count(model.conv1.weight)), ("maxpool", model.maxpool, 0)]
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            for i, block in enumerate(getattr(model, layer)):
                # the original counts a block's second convolution (and its 1x1 shortcut)
                weights = count(block.conv2.weight) + (count(block.downsample[0].weight) if block.downsample else 0)
                units.append((f"{layer}.{i}", block, weights))
        return units + [("avgpool", model.avgpool, 0), ("fc", model.fc, count(model.fc.weight, model.fc.bias))]
    units = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            units.append((name, module, count(module.weight)))
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            units.append((name, module, 0))
        elif isinstance(module, nn.Linear):
            units.append((name, module, count(module.weight, module.bias)))
    return units


def rank_analysis(model: nn.Module, arch: str, in_channels: int, image_size: int, batch: int = 1) -> list[UnitRank]:
    """RA-i of every unit for a batch of `batch` images."""
    units = _units(model, arch)
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(_module, inputs, output) -> None:
            sizes[name] = (inputs[0].numel(), output.numel())

        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module, _ in units]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(batch, in_channels, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    result, n_v = [], 0
    for name, _, weights in units:
        n_x, n_z = sizes[name]
        rank = n_x - weights - n_z
        result.append(UnitRank(name, n_x, n_z, weights, rank - n_v))
        n_v += max(max(n_z - n_x, 0) - max(rank, 0), 0)
    return result


def model_ra_index(units: list[UnitRank]) -> int:
    return max(u.ra_index for u in units)


def ra_maxpool_kernel(arch: str, in_channels: int, num_classes: int, image_size: int) -> int:
    """The smallest stem maxpool kernel (from 3) giving a positive model RA-i and a working network."""
    for kernel in range(3, image_size + 3):  # padding 1 on both sides
        try:
            model = build_model(arch, in_channels, num_classes, image_size, maxpool_kernel=kernel)
            units = rank_analysis(model, arch, in_channels, image_size)
        except (RuntimeError, PipelineError):  # the maps vanished: no working network from here on
            break
        if model_ra_index(units) > 0:
            return kernel
    raise PipelineError(
        f"no {arch} maxpool kernel makes RA-i positive at {image_size} px; set the ra scheme's maxpool_kernel"
    )
