"""How a cell's PSNR moves with the attack's budget: the setting's uploads attacked again at each
number of iterations (the rest of params.yaml's attack as it is), then scored against the truth.

    python -m tools.budget <setting> --iterations 500,1500,3000 [--epochs 0,3]

Run after `dvc repro` (it reads uploads/<setting> and truth/<setting>, writes nothing but a
scratch folder it removes). The truth is read here only to score, as the evaluate stage does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from pipeline.attack.invert import best_of
from pipeline.attack.jobs import Job, load_result, run_jobs
from pipeline.config import load_params
from pipeline.data import to_unit_range
from pipeline.errors import PipelineError
from pipeline.metrics import image_metrics, pair_by_hungarian
from pipeline.results import Evidence, mean_interval
from pipeline.uploads import load_truth, load_upload


def budget_rows(setting: str, iterations: list[int], epochs: list[int] | None) -> list[dict]:
    p = load_params(Path("params.yaml"))
    p.setting(setting)  # an unknown name is refused here
    uploads = sorted(Path("uploads", setting).glob("*.safetensors"))
    uploads = [u for u in uploads if epochs is None or load_upload(u).threat_model.epoch in epochs]
    if not uploads:
        raise PipelineError(f"uploads/{setting}: no uploads to attack (run `dvc repro extract@{setting}` first)")
    evidence = Evidence(p.report.confidence, p.report.resamples, p.report.alpha, p.seed)
    rows = []
    for budget in iterations:
        a = p.attack_for(setting).model_copy(update={"iterations": budget})
        with tempfile.TemporaryDirectory() as scratch:
            started = time.perf_counter()
            run_jobs([Job(u, r) for u in uploads for r in range(a.restarts)], a, p.seed, Path(scratch))
            seconds = time.perf_counter() - started
            by_epoch: dict[int, dict] = {}
            for u in uploads:
                tm = load_upload(u).threat_model
                rec = best_of([load_result(Job(u, r).result_path(Path(scratch))) for r in range(a.restarts)])
                truth_u8, _, _ = load_truth(Path("truth", setting, u.name))
                truth, images = truth_u8.float() / 255, to_unit_range(rec.images, tm.mean, tm.std)
                psnr = image_metrics(images[pair_by_hungarian(images, truth)], truth)["psnr"].tolist()
                cell = by_epoch.setdefault(tm.epoch, {"psnr": [], "unconverged": 0, "uploads": 0})
                cell["psnr"] += psnr
                cell["unconverged"] += rec.converged is False
                cell["uploads"] += 1
        for epoch, cell in sorted(by_epoch.items()):
            low, high = mean_interval(cell["psnr"], evidence)
            rows.append({"iterations": budget, "epoch": epoch, "n": len(cell["psnr"]),
                         "psnr": sum(cell["psnr"]) / len(cell["psnr"]), "psnr_low": low, "psnr_high": high,
                         "unconverged": f"{cell['unconverged']}/{cell['uploads']}", "seconds": round(seconds, 1)})
    return rows


def _fail(message: str) -> None:
    print(f"budget: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.budget", description=__doc__.split("\n\n")[0])
    parser.add_argument("setting")
    parser.add_argument("--iterations", default="500,1500,3000", help="comma-separated budgets")
    parser.add_argument("--epochs", help="comma-separated checkpoint epochs (default: every attacked one)")
    args = parser.parse_args(argv)
    try:
        iterations = [int(x) for x in args.iterations.split(",")]
        epochs = None if args.epochs is None else [int(x) for x in args.epochs.split(",")]
        if min(iterations) < 1:
            raise ValueError
    except ValueError:
        _fail("--iterations and --epochs take comma-separated positive whole numbers")
    try:
        rows = budget_rows(args.setting, iterations, epochs)
    except PipelineError as err:
        _fail(str(err))
    print(f"{args.setting}: PSNR (dB) by attack budget, mean [interval] over n images")
    print("| iterations | epoch | n | PSNR | unconverged | seconds |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['iterations']} | {r['epoch']} | {r['n']} | {r['psnr']:.1f} [{r['psnr_low']:.1f}, "
              f"{r['psnr_high']:.1f}] | {r['unconverged']} | {r['seconds']} |")


if __name__ == "__main__":
    main(sys.argv[1:])
