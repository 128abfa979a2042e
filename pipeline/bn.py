"""BatchNorm across data-parallel workers: synchronous, asynchronous, or replaced by GroupNorm.

* sync: every worker normalises with the statistics of the global batch. On GPUs torch's
  SyncBatchNorm does this; on CPU (gloo) it refuses to run, so `CrossProcessBatchNorm2d`
  all-reduces the per-channel sums and sums of squares with a differentiable all-reduce.
* async: every worker normalises with its own shard's statistics and keeps its own running
  statistics (DDP must not broadcast buffers); a checkpoint holds one worker's statistics.
* group: GroupNorm instead of BatchNorm (`pipeline.nets.batchnorm_to_groupnorm`), for
  per-sample gradients (DP-SGD), where the statistics of a batch tie the samples together.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.layer_sync import LayerSync
from torch import nn
from torch.distributed.nn.functional import all_reduce

# torch 2.14 marks this differentiable all-reduce deprecated in favour of a private module;
# it is still the public, autograd-aware one.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CrossProcessBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch over all processes.

    Gradients flow through the all-reduce, so the backward pass is that of one BatchNorm
    over the global batch. With one process it is exactly nn.BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        dims = (0, 2, 3)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        stats = all_reduce(stats, op=dist.ReduceOp.SUM)
        channels = x.shape[1]
        total = stats[-1]
        mean = stats[:channels] / total
        var = stats[channels : 2 * channels] / total - mean * mean  # biased, as BatchNorm normalises
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean)
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        shape = (1, channels, 1, 1)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def _swap_batchnorm(module: nn.Module, cls: type[nn.BatchNorm2d]) -> nn.Module:
    """Replace every BatchNorm2d in `module` by `cls`, keeping parameters and buffers."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and type(child) is not cls:
            new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            _swap_batchnorm(child, cls)
    return module


class CrossProcessSyncBatchNorm(LayerSync):
    """Lightning's extension point for BatchNorm synchronisation, working on CPU (gloo) too."""

    def apply(self, model: nn.Module) -> nn.Module:
        return _swap_batchnorm(model, CrossProcessBatchNorm2d)

    def revert(self, model: nn.Module) -> nn.Module:
        return _swap_batchnorm(model, nn.BatchNorm2d)
