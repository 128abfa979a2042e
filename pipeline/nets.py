"""Model builders: ResNet-18 (the original's model), VGG-11 (dropout), a small ConvNet.

Every builder takes the data's input shape and class count, so the same code serves
Fashion-MNIST (1 channel), CIFAR and ImageNet folders (3 channels). Three architecture
variants come from the defense schemes: GroupNorm instead of BatchNorm (DP-SGD), a
larger ResNet maxpool kernel (the RA defense) and PRECODE's variational bottleneck before
the classifier. Checkpoint metadata records them, so every stage rebuilds exactly the model
that was trained.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.errors import PipelineError

ARCHS = ("resnet18", "vgg11", "convnet")
NORMS = ("batch", "group")
RA_ARCHS = ("resnet18", "convnet")  # the architectures with a stem maxpool to enlarge


def _resnet18(in_channels: int, num_classes: int) -> nn.Module:
    # torchvision's ResNet-18 with its stem and maxpool as they are; only the first
    # convolution follows the data's channel count.
    from torchvision.models import resnet18  # torchvision takes seconds to import: only where used

    model = resnet18(num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


class ConvNet(nn.Module):
    """Three conv + BatchNorm blocks and one linear layer: cheap to train and to attack.

    With `maxpool_kernel`, a stride-2 maxpool follows the first block (the RA defense's
    variant, as ResNet-18's stem maxpool).
    """

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int, width: int = 32, maxpool_kernel: int | None = None
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        side = image_size
        if maxpool_kernel is not None:
            layers.append(nn.MaxPool2d(maxpool_kernel, stride=2, padding=1))
            side = (side + 2 - maxpool_kernel) // 2 + 1
        layers += [
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        ]
        if side < 1:
            raise PipelineError(f"maxpool kernel {maxpool_kernel} leaves nothing of a {image_size} px image")
        self.features = nn.Sequential(*layers)
        side = ((side + 1) // 2 + 1) // 2
        self.fc = nn.Linear(2 * width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def _vgg11(in_channels: int, num_classes: int) -> nn.Module:
    # torchvision's VGG-11 features (no BatchNorm) with a head for small inputs: its
    # 25088x4096 classifier is built for 224 px. Dropout stays, as in the original.
    from torchvision.models import vgg11

    model = vgg11(num_classes=num_classes)
    if in_channels != 3:
        model.features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(
        nn.Dropout(0.5), nn.Linear(512, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, num_classes)
    )
    return model


# sigma = softplus(s - 5): an untrained block's codes start near their means (sigma ~ 0.007)
BOTTLENECK_SIGMA_SHIFT = 5.0


class VariationalBottleneck(nn.Module):
    """PRECODE's block (Scheliga et al., WACV'22): the features encoded as the means and standard
    deviations of `size` Gaussian codes, one code vector drawn per image (the means in eval mode,
    or where `sample` is off), decoded back to the features' size.

    `penalty` holds `beta` times the KL divergence of the codes' Gaussians from N(0, 1), summed
    over the codes and averaged over the images, of the last forward: the training loss adds it
    (`take_penalty`). The noise comes from `row_generators` where set (one per image: the client's
    draw per sample, as its dropout's), else from `generator` (the batch's: a training step's on one
    process), else from torch's global generator (an attacker's restart, seeded)."""

    def __init__(self, features: int, size: int, beta: float):
        super().__init__()
        self.encoder = nn.Linear(features, 2 * size)
        self.decoder = nn.Linear(size, features)
        self.size, self.beta = size, beta
        self.sample = True
        self.generator: torch.Generator | None = None
        self.row_generators: list[torch.Generator] | None = None
        self.penalty: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.encoder(x)
        mean = codes[:, : self.size]
        # floored: a softplus that underflows to 0 would make log(sigma), and the step, NaN
        sigma = F.softplus(codes[:, self.size :] - BOTTLENECK_SIGMA_SHIFT).clamp_min(torch.finfo(codes.dtype).tiny)
        kl = 0.5 * (mean.pow(2) + sigma.pow(2) - 1).sum(1) - sigma.log().sum(1)
        self.penalty = self.beta * kl.mean()
        if self.training and self.sample:
            mean = mean + sigma * self._noise(sigma.shape).to(sigma)
        return self.decoder(mean)

    def _noise(self, shape: torch.Size) -> torch.Tensor:
        if self.row_generators is not None:
            if len(self.row_generators) != shape[0]:
                raise RuntimeError("the bottleneck's per-image generators do not match its batch")
            return torch.stack([torch.randn(shape[1:], generator=g) for g in self.row_generators])
        return torch.randn(shape, generator=self.generator)

    def __getstate__(self) -> dict[str, Any]:
        # copies (deepcopy, spawned processes) leave the last forward's penalty and its graph behind
        return {**super().__getstate__(), "penalty": None}


def bottlenecks(model: nn.Module) -> list[VariationalBottleneck]:
    """`model`'s PRECODE blocks, in module order."""
    return [m for m in model.modules() if isinstance(m, VariationalBottleneck)]


def take_penalty(model: nn.Module) -> torch.Tensor | float:
    """The penalties of `model`'s bottleneck blocks from their last forward, summed, and cleared
    (0 where it has none): what the training loss adds to the cross-entropy after each forward."""
    total: torch.Tensor | float = 0.0
    for m in bottlenecks(model):
        if m.penalty is not None:
            total, m.penalty = total + m.penalty, None
    return total


def with_bottleneck(model: nn.Module, size: int, beta: float) -> nn.Module:
    """`model` with a variational bottleneck before its last linear layer (in place)."""
    name = classifier_weight_name(model).rpartition(".")[0]
    linear = model.get_submodule(name)
    assert isinstance(linear, nn.Linear)
    parent, _, attr = name.rpartition(".")
    block = nn.Sequential(VariationalBottleneck(linear.in_features, size, beta), linear)
    setattr(model.get_submodule(parent) if parent else model, attr, block)
    return model


def bottleneck_left_out(model: nn.Module) -> nn.Module:
    """A copy of `model` as the attacker of a PRECODE model uses it (Scheliga et al.): the block's
    codes at their means (the client's noise is its own), and the block's and every later
    parameter frozen, so that their gradients, which the client's noise drew, are left out of the
    match. The model itself where it has no block."""
    first = next((n for n, m in model.named_modules() if isinstance(m, VariationalBottleneck)), None)
    if first is None:
        return model
    model = copy.deepcopy(model)
    after = False
    for name, p in model.named_parameters():
        after = after or name.startswith(first + ".")
        p.requires_grad_(not after)
    for block in bottlenecks(model):
        block.sample = False
    return model


def batchnorm_to_groupnorm(module: nn.Module, max_groups: int = 32) -> nn.Module:
    """Replace every BatchNorm2d by a GroupNorm over the same channels (affine kept)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            groups = max(g for g in range(1, max_groups + 1) if child.num_features % g == 0)
            setattr(module, name, nn.GroupNorm(groups, child.num_features, eps=child.eps, affine=child.affine))
        else:
            batchnorm_to_groupnorm(child, max_groups)
    return module


def build_model(
    arch: str,
    in_channels: int,
    num_classes: int,
    image_size: int,
    norm: str = "batch",
    maxpool_kernel: int | None = None,
    bottleneck: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A freshly initialised model (initialise under a seeded generator for reproducibility).

    `norm="group"` swaps BatchNorm for GroupNorm; `maxpool_kernel` sets the stem maxpool
    kernel (ResNet-18's, stride 2 and padding 1 kept as the original's RA defense did; the
    ConvNet gains one after its first block); `bottleneck` ({size, beta}) puts PRECODE's block
    before the classifier.
    """
    if maxpool_kernel is not None and arch not in RA_ARCHS:
        raise PipelineError(f"a maxpool kernel (the RA defense) needs a stem maxpool: {arch} has none")
    if arch == "resnet18":
        model = _resnet18(in_channels, num_classes)
        if maxpool_kernel is not None:
            pool = model.get_submodule("maxpool")
            assert isinstance(pool, nn.MaxPool2d)
            pool.kernel_size = maxpool_kernel
    elif arch == "vgg11":
        model = _vgg11(in_channels, num_classes)
    elif arch == "convnet":
        model = ConvNet(in_channels, num_classes, image_size, maxpool_kernel=maxpool_kernel)
    else:
        raise PipelineError(f"unknown model architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if norm == "group":
        batchnorm_to_groupnorm(model)
    elif norm != "batch":
        raise PipelineError(f"unknown normalisation {norm!r}; choose one of {', '.join(NORMS)}")
    if bottleneck is not None:
        with_bottleneck(model, int(bottleneck["size"]), float(bottleneck["beta"]))
    return model


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """(name, module) of every BatchNorm layer of `model`, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def running_statistics(layer: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(running mean, running variance) of a BatchNorm layer that tracks them."""
    if layer.running_mean is None or layer.running_var is None:
        raise ValueError("this BatchNorm layer keeps no running statistics (track_running_stats=False)")
    return layer.running_mean, layer.running_var


def input_shapes(model: nn.Module, kind: type[nn.Module], image_shape: tuple[int, ...]) -> dict[str, torch.Size]:
    """The input shape of each `kind` module of `model` for one image of `image_shape` (C, H, W),
    read off one forward pass in eval mode (the model's mode is restored)."""
    shapes: dict[str, torch.Size] = {}

    def record(name: str):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            shapes.setdefault(name, inputs[0].shape[1:])

        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules() if isinstance(m, kind)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *image_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return shapes


def smallest_batchnorm_input(model: nn.Module, in_channels: int, image_size: int) -> int:
    """Number of values per channel the smallest BatchNorm sees for one input image.

    Train-mode BatchNorm needs more than one value per channel; ResNet-18 at 32 px reaches
    1x1 maps in layer4, so a batch of one image cannot be normalised there.
    """
    shapes = input_shapes(model, nn.modules.batchnorm._BatchNorm, (in_channels, image_size, image_size))
    return min((shape[1:].numel() for shape in shapes.values()), default=0)


def _live_taps(size: int, kernel: int, stride: int, padding: int, dilation: int) -> tuple[int, int]:
    """(first, last) kernel tap along one axis that reads an input pixel at some output position;
    the whole kernel where a symmetric padding cannot express the cropped one."""
    outputs = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    live = [i for i in range(kernel) if any(0 <= o * stride - padding + i * dilation < size for o in range(outputs))]
    if not live:  # a dilated kernel that straddles a tiny input: left as it is
        return 0, kernel - 1
    first, last = live[0], live[-1]
    cropped_padding = padding - first * dilation
    if cropped_padding < 0 or (size + 2 * cropped_padding - dilation * (last - first) - 1) // stride + 1 != outputs:
        return 0, kernel - 1
    return first, last


def crop_dead_taps(model: nn.Module, image_shape: tuple[int, ...]) -> dict[str, tuple[slice, ...]]:
    """Shrink, in place, every convolution kernel whose border taps only ever read zero padding
    at this input size, to its live taps (padding reduced to match): the same outputs with less
    work. ResNet-18 at 32 px has 1 x 1 maps in layer4, where a 3 x 3 kernel uses its centre
    alone: 6.9 M of its 11.2 M parameters, whose gradient is zero by construction.

    Returns, per cropped weight's name, the index that takes the live taps out of the full
    weight (and out of a gradient for it)."""
    crops: dict[str, tuple[slice, ...]] = {}
    for name, shape in input_shapes(model, nn.Conv2d, image_shape).items():
        conv = model.get_submodule(name)
        assert isinstance(conv, nn.Conv2d)
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            continue
        axes = zip(shape[1:], conv.kernel_size, conv.stride, conv.padding, conv.dilation)
        taps = [_live_taps(*axis) for axis in axes]
        if all((first, last) == (0, k - 1) for (first, last), k in zip(taps, conv.kernel_size)):
            continue
        index = (slice(None), slice(None), *(slice(first, last + 1) for first, last in taps))
        conv.weight = nn.Parameter(conv.weight.detach()[index].clone(), requires_grad=conv.weight.requires_grad)
        conv.kernel_size = tuple(last - first + 1 for first, last in taps)
        conv.padding = tuple(p - first * d for p, (first, _), d in zip(conv.padding, taps, conv.dilation))
        crops[f"{name}.weight"] = index
    return crops


def classifier_weight_name(model: nn.Module) -> str:
    """Name of the last linear layer's weight, whose gradient label recovery reads."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise PipelineError("the model has no linear classifier layer to recover labels from")
    return f"{names[-1]}.weight"
