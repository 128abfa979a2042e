"""Soteria's sensitivities: one backward per representation entry (pipeline.defenses) against
the same backwards batched through vmap (autograd.grad's is_grads_batched), blocks of entries at once.

    python -m bench.soteria [--batch 4] [--repeats 3]

Both on the default ConvNet at 32 px in train mode, the same batch and threads; the plain batch
gradient (what the client's upload costs without the defense) is the reference.
"""

from __future__ import annotations

import argparse

import torch

from bench.per_sample import best_of
from pipeline.defenses import classifier_input, soteria_mask
from pipeline.nets import build_model


def vmapped_sensitivities(model, images: torch.Tensor, block: int) -> torch.Tensor:
    x = images.detach().clone().requires_grad_(True)
    r = classifier_input(model, x)
    batch, features = r.shape
    out = torch.empty(features, batch)
    for start in range(0, features, block):
        rows = torch.arange(start, min(start + block, features))
        seeds = torch.zeros(len(rows), batch, features)
        seeds[torch.arange(len(rows)), :, rows] = 1
        (dx,) = torch.autograd.grad(r, x, grad_outputs=seeds, is_grads_batched=True, retain_graph=True)
        out[rows] = dx.flatten(2).norm(dim=2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model("convnet", 1, 10, 32).train()
    images, labels = torch.randn(args.batch, 1, 32, 32), torch.randint(0, 10, (args.batch,))
    features = classifier_input(model, images).shape[1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {features} entries")

    def gradient():
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        torch.autograd.grad(loss, list(model.parameters()))

    plain = best_of(gradient, args.repeats)
    loop = best_of(lambda: soteria_mask(model, images, 60), args.repeats)
    print(f"batch gradient          {plain * 1e3:9.1f} ms")
    print(f"soteria, loop           {loop * 1e3:9.1f} ms   {loop / plain:7.0f}x the gradient")
    for block in (16, 64, 256):
        vmapped = best_of(lambda: vmapped_sensitivities(model, images, block), args.repeats)
        print(f"soteria, vmap {block:4d}      {vmapped * 1e3:9.1f} ms   {vmapped / loop:7.2f}x the loop")


if __name__ == "__main__":
    main()
