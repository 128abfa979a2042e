"""Training throughput: the Lightning module of the train stage against a bare PyTorch loop.

    python bench/train_throughput.py [--arch convnet] [--images 4096] [--batch 64]

Same model, data, batch size, optimiser, determinism and threads, one process; validation,
checkpoints and the Trainer's one-off set-up are left out so that only the training epoch
is compared. Prints images per second for each and their ratio (Lightning time / bare
time; 1.00 = no cost).
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from pipeline.config import parse_params
from pipeline.nets import build_model
from pipeline.train import Classifier


def params_for(arch: str, batch: int):
    import yaml

    raw = yaml.safe_load(open("params.yaml"))
    raw["model"]["arch"] = arch
    raw["train"].update(batch_size=batch, devices=1, epochs=1)
    raw["extract"]["epochs"] = [0, 1]
    return parse_params(raw)


def bare_loop(arch: str, data: TensorDataset, batch: int, params) -> float:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)  # as the Trainer runs (deterministic=True)
    model = build_model(arch, 1, 10, 32).train()
    hp = params.train
    opt = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    loader = DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for images, labels in loader:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        opt.step()
    return time.perf_counter() - start


class EpochTimer(L.Callback):
    """The time of the training epoch itself, without the Trainer's one-off set-up."""

    def on_train_epoch_start(self, trainer, module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        self.seconds = time.perf_counter() - self.start


def lightning_fit(arch: str, data: TensorDataset, test: TensorDataset, batch: int, params) -> float:
    torch.manual_seed(0)
    module = Classifier(build_model(arch, 1, 10, 32), data, test, 10, params, params.scheme("pure"))
    timer = EpochTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        deterministic=True,
        callbacks=[timer],
    )
    trainer.fit(module)
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="convnet")
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    params = params_for(args.arch, args.batch)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(args.images, 1, 32, 32, generator=gen), torch.randint(0, 10, (args.images,), generator=gen)
    )
    test = TensorDataset(torch.randn(256, 1, 32, 32), torch.randint(0, 10, (256,)))
    bare_loop(args.arch, data, args.batch, params)  # warm-up
    bare, lit = [], []
    for _ in range(args.repeats):  # interleaved, so that drift of the machine hits both alike
        bare.append(bare_loop(args.arch, data, args.batch, params))
        lit.append(lightning_fit(args.arch, data, test, args.batch, params))
    paired = sorted(b / a for a, b in zip(bare, lit))
    print(
        f"{args.arch}, {args.images} images, batch {args.batch}, {torch.get_num_threads()} threads: "
        f"bare loop {args.images / min(bare):.0f} img/s, Lightning {args.images / min(lit):.0f} img/s (best of "
        f"{args.repeats}); ratio Lightning time / bare time: {paired[len(paired) // 2]:.3f} (median of the "
        f"interleaved pairs; range {paired[0]:.3f}-{paired[-1]:.3f})"
    )


if __name__ == "__main__":
    main()
