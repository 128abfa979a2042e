"""The attack stage's throughput against a plain eager reference on the same uploads.

    python bench/attack.py [--restarts 4] [--archs convnet resnet18] [--batches 1 8]

Reference: the straightforward attack, one process with all the machine's threads, the
restarts one after the other, each iteration `autograd.grad(create_graph=True)` of the batch
loss, its cosine with the upload, TV, the sign of the image gradient into Adam. Ours: the
attack stage's job runner (`pipeline.attack.jobs.run_jobs`), the K restarts as jobs over
`--processes` Fabric processes of `--threads` threads, timed end to end (process start-up
included). Same model (train mode; eval for ResNet-18 at B = 1, whose train-mode BatchNorm
cannot take one 32-px image), upload, labels, iterations. Printed: restart-iterations per
second and the ratio ours / reference (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pipeline.attack.invert import AttackSettings, invert
from pipeline.attack.jobs import Job, run_jobs
from pipeline.checkpoints import save_checkpoint
from pipeline.client import batch_gradient
from pipeline.config import AttackParams
from pipeline.files import load_meta
from pipeline.nets import build_model
from pipeline.uploads import Upload, save_upload

ITERATIONS = {"convnet": 150, "resnet18": 25}


def write_upload(folder: Path, arch: str, batch: int, mode: str) -> tuple[Path, torch.nn.Module, dict, torch.Tensor]:
    meta = {"arch": arch, "in_channels": 1, "num_classes": 10, "image_size": 32, "norm": "batch", "maxpool_kernel": None}
    torch.manual_seed(0)
    model = build_model(**meta)
    save_checkpoint(folder / "model.safetensors", model, meta)
    gen = torch.Generator().manual_seed(1)
    images, labels = torch.randn(batch, 1, 32, 32, generator=gen), torch.arange(batch) % 10
    grads = batch_gradient(model, images, labels, mode)
    threat = {**meta, "mean": [0.3], "std": [0.3], "checkpoint": str(folder / "model.safetensors"),
              "checkpoint_sha256": load_meta(folder / "model.safetensors")["sha256"], "epoch": 0, "scheme": "bench",
              "setting": "bench", "batch_size": batch, "participants": 1, "bn": "sync", "local_steps": 1, "lr": 0.01,
              "mode": mode, "dp": None, "label_repetition": None, "labels": labels.tolist()}
    save_upload(folder / "upload.safetensors", Upload(grads, threat))
    return folder / "upload.safetensors", model.train(mode == "train"), grads, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument("--archs", nargs="+", default=["convnet", "resnet18"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    cores = torch.get_num_threads()
    print(f"torch {torch.__version__}; reference: 1 process x {cores} threads; "
          f"ours: {args.processes} processes x {args.threads} thread(s); K = {args.restarts} restarts")
    print(f"{'model':<9}{'B':>3}{'mode':>6}{'iters':>6}  {'reference it/s':>14}{'ours it/s':>10}{'ratio':>7}")
    for arch in args.archs:
        for b in args.batches:
            mode = "eval" if arch == "resnet18" and b == 1 else "train"
            iterations = ITERATIONS[arch]
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                path, model, grads, labels = write_upload(folder, arch, b, mode)
                settings = AttackSettings(iterations=iterations, lr=0.1, lr_min=1e-3, tv_weight=1e-2,
                                          restarts=args.restarts, seed=0)
                params = AttackParams(labels="known", iterations=iterations, restarts=args.restarts, lr=0.1,
                                      lr_min=1e-3, tv_weight=1e-2, client_model="exact", processes=args.processes,
                                      threads=args.threads)
                start = time.perf_counter()
                invert(model, grads, labels, (1, 32, 32), [0.3], [0.3], settings, progress=False)
                reference = time.perf_counter() - start
                results = folder / "jobs"
                results.mkdir()
                start = time.perf_counter()
                run_jobs([Job(path, r) for r in range(args.restarts)], params, seed=0, folder=results)
                ours = time.perf_counter() - start
                torch.set_num_threads(cores)  # run_jobs set this process's threads when it ran in it
            work = iterations * args.restarts
            print(f"{arch:<9}{b:>3}{mode:>6}{iterations:>6}  {work / reference:>14.1f}{work / ours:>10.1f}"
                  f"{reference / ours:>7.2f}")


if __name__ == "__main__":
    main()
