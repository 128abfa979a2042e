"""The attack stage's throughput against a plain eager attack on the same uploads.

    python bench/attack.py [--restarts 4] [--archs convnet resnet18] [--batches 1 8] [--split jobs]

Reference (`plain_attack` below): the attack written the straightforward way, in one process
with all the machine's threads: the restarts one after the other, each iteration
`autograd.grad(create_graph=True)` of the batch loss, the cosine with the upload summed
parameter by parameter in Python, TV, the sign of the image gradient into Adam. Ours: the
attack stage's service (`pipeline.attack.service.attack_uploads`) with `--processes` Fabric
processes of `--threads` threads, the jobs sharded (`--split jobs`) or each job's dummy batch
split (`--split batch`), timed end to end (process start-up included). Same model (train
mode; eval for ResNet-18 at B = 1, whose train-mode BatchNorm cannot take one 32-px image),
upload, labels, iterations. Printed: restart-iterations per second (medians of `--repeats`
interleaved pairs) and the ratio ours / reference (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from pipeline.attack.objective import total_variation
from pipeline.attack.service import attack_uploads
from pipeline.attack.target import Victim, pixel_box
from pipeline.checkpoints import save_checkpoint
from pipeline.client import simulate_client
from pipeline.files import load_meta
from pipeline.nets import build_model
from pipeline.sections import AttackParams, ClientParams, ExtractParams
from pipeline.uploads import save_upload, upload_of

# The ConvNet at the stage default; ResNet-18 shorter (the paper profile runs 15 000), long enough
# that the workers' start (docs/benchmarks.md) is not what is measured.
ITERATIONS = {"convnet": 500, "resnet18": 150}


def plain_attack(
    model, target: dict[str, torch.Tensor], labels, shape, restarts: int, iterations: int, device: str = "cpu"
) -> None:
    """The reference: one restart after the other, the loss assembled parameter by parameter
    (`model`, `target` and `labels` already on `device`)."""
    params = list(model.parameters())
    target = [target[n] for n, _ in model.named_parameters()]
    target_norm = sum((t * t).sum() for t in target).sqrt()
    low, high = (b.to(device) for b in pixel_box((0.3,) * shape[0], (0.3,) * shape[0]))  # write_upload's normalisation
    for restart in range(restarts):
        x = torch.randn(len(labels), *shape, generator=torch.Generator().manual_seed(restart)).to(device)
        x.requires_grad_(True)
        opt = torch.optim.Adam([x], lr=0.1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations, eta_min=1e-3)
        for _ in range(iterations):
            grads = torch.autograd.grad(F.cross_entropy(model(x), labels), params, create_graph=True)
            dot = sum((g * t).sum() for g, t in zip(grads, target))
            norm = sum((g * g).sum() for g in grads).sqrt()
            loss = 1 - dot / (norm * target_norm) + 1e-2 * total_variation(x)
            (x.grad,) = torch.autograd.grad(loss, x)
            x.grad.sign_()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(low, high)


def write_upload(
    folder: Path, arch: str, batch: int, mode: str, channels: int = 1, size: int = 32
) -> tuple[Path, torch.nn.Module, dict, torch.Tensor]:
    meta = {
        "arch": arch,
        "in_channels": channels,
        "num_classes": 10,
        "image_size": size,
        "norm": "batch",
        "maxpool_kernel": None,
    }
    torch.manual_seed(0)
    model = build_model(**meta)
    checkpoint = folder / "model.safetensors"
    box = {"mean": [0.3] * channels, "std": [0.3] * channels}
    save_checkpoint(checkpoint, model, {**meta, **box, "scheme": "bench", "epoch": 0})
    gen = torch.Generator().manual_seed(1)
    images, labels = torch.randn(batch, channels, size, size, generator=gen), torch.arange(batch) % 10
    client = ClientParams.plain(batch, mode, lr=0.01)
    update = simulate_client(model, images, labels, client, seed=0)
    reveal = ExtractParams(epochs=[0], trials=2, reveal_labels=True, reveal_bn_statistics=False)
    upload = upload_of(update, model, (checkpoint, load_meta(checkpoint)), client, "bench", 0, labels, reveal)
    save_upload(folder / "upload.safetensors", upload)
    return folder / "upload.safetensors", model.train(mode == "train"), update.gradients, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument("--archs", nargs="+", default=["convnet", "resnet18"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--split", choices=["jobs", "batch"], default="jobs")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved pairs; the median is printed")
    parser.add_argument("--compile", action="store_true", help="ours with attack.compile (the compile is timed too)")
    args = parser.parse_args()
    cores = torch.get_num_threads()
    print(
        f"torch {torch.__version__}; reference: 1 process x {cores} threads; "
        f"ours: {args.processes} processes x {args.threads} thread(s), split {args.split}"
        f"{', compiled' if args.compile else ''}; K = {args.restarts} restarts"
    )
    print(
        f"{'model':<9}{'B':>3}{'mode':>6}{'iters':>6}  {'reference it/s':>14}{'ours it/s':>10}{'ratio':>7}"
        "   (range over pairs)"
    )
    for arch in args.archs:
        for b in args.batches:
            mode = "eval" if arch == "resnet18" and b == 1 else "train"
            iterations = ITERATIONS[arch]
            refs, ours, ratios = [], [], []
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                path, model, grads, labels = write_upload(folder, arch, b, mode)
                params = AttackParams(
                    labels="known",
                    iterations=iterations,
                    restarts=args.restarts,
                    lr=0.1,
                    lr_min=1e-3,
                    tv_weight=1e-2,
                    client_model="exact",
                    local_steps_model="unrolled",
                    classic=False,
                    objective="cosine",
                    layer_weights="equal",
                    bn_prior=0.0,
                    bn_statistics="running",
                    tv_target=None,
                    accelerator="cpu",
                    processes=args.processes,
                    split=args.split,
                    threads=args.threads,
                    compile=args.compile,
                    combine="best",
                    hyperparameters="fixed",
                    sign_temperature=0.1,
                    clip_bound="stated",
                    pruning_model="magnitude",
                )
                for repeat in range(args.repeats):  # interleaved pairs: this machine's speed drifts
                    start = time.perf_counter()
                    plain_attack(model, grads, labels, (1, 32, 32), args.restarts, iterations)
                    refs.append(time.perf_counter() - start)
                    results = folder / f"jobs-{repeat}"
                    results.mkdir()
                    start = time.perf_counter()
                    attack_uploads([Victim.load(path)], params, seed=0, scratch=results)
                    ours.append(time.perf_counter() - start)
                    torch.set_num_threads(cores)  # the jobs set this process's threads when it ran in it
                    ratios.append(refs[-1] / ours[-1])
            work = iterations * args.restarts
            print(
                f"{arch:<9}{b:>3}{mode:>6}{iterations:>6}  {work / statistics.median(refs):>14.1f}"
                f"{work / statistics.median(ours):>10.1f}{statistics.median(ratios):>7.2f}"
                f"   ({min(ratios):.2f}-{max(ratios):.2f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
