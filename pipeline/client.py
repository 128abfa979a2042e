"""The federated client: which images it holds and the update it uploads.

The walking skeleton's client takes one local step on its whole batch, so the upload is the
plain batch gradient at the checkpoint's weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.errors import PipelineError
from pipeline.nets import smallest_batchnorm_input


def choose_batch(pool_size: int, batch_size: int, seed: int) -> torch.Tensor:
    """Positions in the victim pool of the client's batch: the same at every checkpoint."""
    if batch_size > pool_size:
        raise PipelineError(
            f"extract.batch_size is {batch_size} but the victim pool holds {pool_size} images "
            "(raise data.victims_per_class)"
        )
    return torch.randperm(pool_size, generator=torch.Generator().manual_seed(seed))[:batch_size]


def check_batchnorm_batch(model: nn.Module, batch_size: int, mode: str, in_channels: int, image_size: int) -> None:
    """Refuse a train-mode batch that some BatchNorm would normalise from one value per channel."""
    if mode != "train":
        return
    values = smallest_batchnorm_input(model, in_channels, image_size) * batch_size
    if values == 1:
        raise PipelineError(
            f"extract.mode 'train' with a batch of {batch_size}: a BatchNorm layer of this model sees one value "
            f"per channel at {image_size} px; use extract.mode: eval, a larger batch or a larger data.image_size"
        )


def batch_gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """The gradient of the mean cross-entropy over the batch, by parameter name.

    Computed on a copy, so train-mode BatchNorm does not move the caller's running statistics.
    """
    model = copy.deepcopy(model).train(mode == "train")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loss = F.cross_entropy(model(images), labels)
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return {n: g.detach() for (n, _), g in zip(named, grads)}
