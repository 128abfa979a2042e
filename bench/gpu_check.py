"""The GPU check: the tiny profile's training and attack on a CUDA device, against the CPU.

    python -m bench.gpu_check [--stand-in-cpu]

One short script (minutes): no data set is needed (the device machine has none), so the
images are seeded noise of the tiny profile's shapes (Fashion-MNIST at 32 px, 1 024 training
images; throughput does not depend on the pixels). Printed:
  1. training (`pipeline.train.train`, scheme pure, ConvNet, one process): images/s on the GPU
     and on the CPU;
  2. the attack (`pipeline.attack.service.attack_uploads`, one process, the tiny profile's 100
     iterations): restart-iterations/s on the GPU, on the CPU, and of a plain eager loop on the
     GPU (bench/attack.py's reference) — ConvNet at B = 4, and ResNet-18 at 224 px, B = 8 (the
     paper profile's model; fewer iterations on the CPU);
  3. agreement: the GPU's reconstruction after 10 iterations against the CPU's (max difference).
Without CUDA it says so in one line and exits 2; `--stand-in-cpu` then runs every step on the
CPU in the GPU's place, to check the script itself.
"""

from __future__ import annotations

# first, before torch loads: the stages' CPU kernel pins (the CPU side runs as a stage would)
# and their filter of third-party notices
import stages  # noqa: F401

# isort: split

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench.attack import plain_attack, write_upload
from pipeline.attack.service import attack_uploads
from pipeline.attack.target import Victim
from pipeline.config import parse_params
from pipeline.images import Split
from pipeline.train import train

REPO = Path(__file__).resolve().parents[1]


def tiny_params(**changes):
    """params.yaml with profiles/tiny.yaml over it, and `changes` (section__key=value)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text()).items():
        if isinstance(values, dict) and section != "settings":
            raw[section].update(values)
    for key, value in changes.items():
        section, name = key.split("__")
        raw[section][name] = value
    return parse_params(raw)


def training_rate(accelerator: str, folder: Path) -> float:
    params = tiny_params(
        model__arch="convnet", train__epochs=1, train__devices=1, train__accelerator=accelerator, extract__epochs=[0, 1]
    )
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (1024, 1, 32, 32), dtype=torch.uint8, generator=gen), torch.arange(1024) % 10)
    test = Split(split.images[:256], split.labels[:256])
    meta = {"classes": [str(i) for i in range(10)], "mean": [0.5], "std": [0.3], "channels": 1, "image_size": 32}
    train(split, test, meta, params, "pure", folder / "warm-up")  # CUDA's start-up and kernels' first loads
    started = time.perf_counter()
    train(split, test, meta, params, "pure", folder / "timed")
    return 1024 / (time.perf_counter() - started)


def attack_rate(upload: Path, accelerator: str, iterations: int, folder: Path) -> tuple[float, torch.Tensor]:
    a = tiny_params(
        attack__accelerator=accelerator, attack__iterations=iterations, attack__processes=1, attack__restarts=1
    ).attack
    folder.mkdir()
    started = time.perf_counter()
    (done,) = attack_uploads([Victim.load(upload)], a, seed=0, scratch=folder)
    seconds = time.perf_counter() - started
    return iterations / seconds, done.reconstruction.images


def eager_rate(model, grads, labels, shape, iterations: int, device: str) -> float:
    model, grads = model.to(device), {k: v.to(device) for k, v in grads.items()}
    plain_attack(model, grads, labels.to(device), shape, 1, 2, device)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    plain_attack(model, grads, labels.to(device), shape, 1, iterations, device)
    if device == "cuda":
        torch.cuda.synchronize()
    return iterations / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stand-in-cpu", action="store_true", help="without CUDA: the CPU in the GPU's place")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.stand_in_cpu:
        print("gpu_check: torch sees no CUDA device here: nothing to check (--stand-in-cpu runs it on the CPU)")
        sys.exit(2)
    gpu = "gpu" if torch.cuda.is_available() else "cpu"
    device = "cuda" if gpu == "gpu" else "cpu"
    name = torch.cuda.get_device_name(0) if gpu == "gpu" else "the CPU standing in"
    print(f"gpu_check: torch {torch.__version__}, {name}; CPU: {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rates = {acc: training_rate(acc, folder / f"train-{acc}") for acc in (gpu, "cpu")}
        print(
            f"training (ConvNet, 1 024 images, one process): GPU {rates[gpu]:.0f} img/s, CPU {rates['cpu']:.0f} img/s, "
            f"ratio {rates[gpu] / rates['cpu']:.1f}"
        )
        for arch, batch, channels, size, gpu_its, cpu_its in (
            ("convnet", 4, 1, 32, 100, 100),
            ("resnet18", 8, 3, 224, 100, 3),
        ):
            gpu_its = gpu_its if gpu == "gpu" else cpu_its  # standing in, the CPU's count
            where = folder / f"{arch}"
            where.mkdir()
            upload, model, grads, labels = write_upload(where, arch, batch, "train", channels, size)
            attack_rate(upload, gpu, 2, where / "warm-up")
            ours_gpu, _ = attack_rate(upload, gpu, gpu_its, where / "gpu")
            ours_cpu, _ = attack_rate(upload, "cpu", cpu_its, where / "cpu")
            eager = eager_rate(model, grads, labels, (channels, size, size), gpu_its, device)
            print(
                f"attack ({arch}, B = {batch}, {size} px): GPU {ours_gpu:.2f} restart-it/s, CPU {ours_cpu:.2f}, "
                f"GPU / CPU {ours_gpu / ours_cpu:.1f}; plain eager loop on the GPU {eager:.2f}, "
                f"ours / eager {ours_gpu / eager:.2f}",
                flush=True,
            )
        where = folder / "agree"
        where.mkdir()
        upload, *_ = write_upload(where, "convnet", 4, "train")
        _, on_gpu = attack_rate(upload, gpu, 10, where / "gpu")
        _, on_cpu = attack_rate(upload, "cpu", 10, where / "cpu")
        gap = float((on_gpu - on_cpu).abs().max())
        print(f"agreement after 10 iterations (ConvNet, B = 4): max |GPU - CPU| {gap:.2e}")


if __name__ == "__main__":
    main()
