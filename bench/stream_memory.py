"""Peak memory of prepare + one training epoch on an image folder, streamed and in memory.

    python -m bench.stream_memory [--images 20000 40000] [--size 32] [--workers 2] [--bound-mib 1536]

For each folder size it writes a folder of small random PNGs (10 classes), then runs, in a
fresh process, `prepare` and one epoch of `train` (ConvNet, one process) with the folder
streamed (data.stream_above 0: an index, images decoded in `--workers` DataLoader workers)
and, as the reference, held in memory (stream_above null: every image a tensor). A sampler
reads /proc every 50 ms and keeps the peak over the process and its workers of the summed
PSS (each shared page counted once, split among its sharers) and of the summed RSS (shared
pages counted in every process that maps them), and the training process's own peak RSS (its
VmHWM). Streamed, the peak PSS should stay under
`--bound-mib` whatever the folder's size; in memory it grows with it. Exits 1 if a streamed
peak is over the bound.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

CHILD = """
import sys, time
from pathlib import Path
from pipeline.data import prepare
from pipeline.train import train
from tests.conftest import make_params

root, stream, workers, size, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
params = make_params(
    data__source="imagefolder", data__root=root, data__image_size=size, data__train_size=None, data__test_size=None,
    data__test_fraction=0.05, data__victims_per_class=4, data__stream_above=0 if stream == "streamed" else None,
    model__arch="convnet", train__epochs=1, train__batch_size=128, train__devices=1, train__loader_workers=workers,
    extract__epochs=[0, 1],
)
started = time.perf_counter()
data = prepare(params.data, params.seed)
prepared = time.perf_counter()
meta = {"classes": data.classes, "mean": data.mean, "std": data.std, "channels": 3, "image_size": size}
written = train(data.train, data.test, meta, params, "pure", out)
print(f"{prepared - started:.1f} {time.perf_counter() - prepared:.1f} {written[-1]['test_accuracy']:.3f}")
"""


def write_folder(root: Path, images: int, classes: int = 10, side: int = 36) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class-{c}").mkdir(parents=True)
    for i in range(images):
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        pixels[:, :, i % 3] //= 2 + i % classes  # a faint class signal
        Image.fromarray(pixels).save(root / f"class-{i % classes}" / f"{i:06d}.png")


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def _kib(pid: int, field: str, source: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def measure(root: Path, mode: str, workers: int, size: int) -> dict:
    """Run the child; the peak summed PSS and RSS (MiB) of its process tree, and its timings."""
    peak = {"pss": 0, "rss": 0, "hwm": 0}
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        args = [sys.executable, "-c", CHILD, str(root), mode, str(workers), str(size), out]
        child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                tree = _tree(child.pid)
                peak["pss"] = max(peak["pss"], sum(_kib(p, "Pss:", "smaps_rollup") for p in tree))
                peak["rss"] = max(peak["rss"], sum(_kib(p, "VmRSS:", "status") for p in tree))
                peak["hwm"] = max(peak["hwm"], _kib(child.pid, "VmHWM:", "status"))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, _ = child.communicate()
        done.set()
        sampler.join()
        if child.returncode:
            raise SystemExit(f"stream_memory: the {mode} run failed (exit {child.returncode})")
    prepare_s, train_s, accuracy = stdout.split()[-3:]
    return {k: v / 1024 for k, v in peak.items()} | {"prepare_s": prepare_s, "train_s": train_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[20000, 40000])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bound-mib", type=float, default=1536)
    args = parser.parse_args()
    over = False
    for n in args.images:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "folder"
            started = time.perf_counter()
            write_folder(root, n)
            print(f"{n} images of 36 x 36 px written in {time.perf_counter() - started:.0f} s", flush=True)
            for mode in ("streamed", "in-memory"):
                r = measure(root, mode, args.workers, args.size)
                print(
                    f"  {mode:9s}: peak PSS {r['pss']:5.0f} MiB, RSS {r['rss']:5.0f} MiB (summed over the process "
                    f"and its workers), the process's own peak RSS {r['hwm']:5.0f} MiB; prepare {r['prepare_s']} s, "
                    f"one epoch {r['train_s']} s",
                    flush=True,
                )
                over |= mode == "streamed" and r["pss"] > args.bound_mib
    print(f"streamed peak PSS {'OVER' if over else 'under'} the bound of {args.bound_mib:.0f} MiB at every size")
    sys.exit(1 if over else 0)


if __name__ == "__main__":
    main()
