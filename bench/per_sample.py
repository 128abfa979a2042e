"""Per-sample gradients for DP-SGD: torch.func's vmap against a loop of backward passes.

    python bench/per_sample.py [--batch 64] [--repeats 3]

Both on the same GroupNorm model, batch and threads; the plain batch gradient (what one
non-private step costs) is the reference. Opacus' hooks are timed where they run: they
refuse torchvision's ResNet-18 (its in-place residual addition).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.dp import per_sample_gradients
from pipeline.nets import build_model


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def opacus_hooks(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    from opacus import GradSampleModule

    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    wrapped = GradSampleModule(model)

    def run():
        wrapped.zero_grad(set_to_none=True)
        F.cross_entropy(wrapped(images), labels, reduction="sum").backward()
        return [p.grad_sample for p in wrapped.parameters()]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, 1x32x32 inputs")
    for arch in ("convnet", "resnet18"):
        torch.manual_seed(0)
        model = build_model(arch, 1, 10, 32, norm="group")
        images, labels = torch.randn(args.batch, 1, 32, 32), torch.randint(0, 10, (args.batch,))

        def batch_gradient():
            torch.autograd.grad(F.cross_entropy(model(images), labels), list(model.parameters()))

        plain = best_of(batch_gradient, args.repeats)
        vmap = best_of(lambda: per_sample_gradients(model, images, labels, "vmap"), args.repeats)
        loop = best_of(lambda: per_sample_gradients(model, images, labels, "loop"), args.repeats)
        try:
            hooks = f"{best_of(opacus_hooks(model, images, labels), args.repeats) * 1e3:.0f} ms"
        except RuntimeError as err:
            hooks = f"fails ({str(err).split('.')[0]})"
        print(
            f"{arch:9s} batch gradient {plain * 1e3:6.0f} ms | per-sample: vmap {vmap * 1e3:6.0f} ms, "
            f"loop {loop * 1e3:6.0f} ms, loop/vmap = {loop / vmap:.2f} | Opacus hooks {hooks}"
        )


if __name__ == "__main__":
    main()
