"""How a cell's PSNR moves with the attack's budget: the setting's uploads attacked again at each
number of iterations (and restarts; the rest of params.yaml's attack as it is), the restarts
combined by each rule asked for, then scored against the truth.

    python -m tools.budget <setting> --iterations 500,1500,3000 [--epochs 0,3]
                           [--restarts 4] [--combine best,mlco]

Run after `dvc repro` (it reads uploads/<setting> and truth/<setting>, writes nothing but a
scratch folder it removes). The truth is read here only to score, as the evaluate stage does.
Each cell's interval is a t interval over its client batches (the unit: one upload, one attack).
With several combination rules, each after the first is paired batch by batch with the first
(the same restarts, the same truth): the mean difference, its t interval and the paired t-test's p.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from pipeline.attack.service import attack_uploads, combine
from pipeline.attack.target import Victim
from pipeline.config import load_params
from pipeline.data import to_unit_range
from pipeline.errors import PipelineError
from pipeline.metrics import paired_scores
from pipeline.statistics import t_estimate
from pipeline.uploads import load_truth
from tools import fail

COMBINE_RULES = ("best", "mlco")


def budget_rows(
    setting: str,
    iterations: list[int],
    epochs: list[int] | None,
    restarts: int | None = None,
    combines: tuple[str, ...] = ("best",),
) -> list[dict]:
    p = load_params(Path("params.yaml"))
    p.setting(setting)  # an unknown name is refused here
    victims = [Victim.load(u) for u in sorted(Path("uploads", setting).glob("*.safetensors"))]
    victims = [v for v in victims if epochs is None or v.threat_model.epoch in epochs]
    if not victims:
        raise PipelineError(f"uploads/{setting}: no uploads to attack (run `dvc repro extract@{setting}` first)")
    truths = {v.path: load_truth(Path("truth", setting, v.path.name))[0].float() / 255 for v in victims}
    confidence = p.report.confidence
    rows = []
    for budget in iterations:
        a = p.attack_for(setting).model_copy(
            update={"iterations": budget, "restarts": restarts or p.attack.restarts, "combine": combines[0]}
        )
        cells: dict[tuple[tuple[int, str], str], dict] = {}  # ((step, checkpoint), rule)
        with tempfile.TemporaryDirectory() as scratch:
            started = time.perf_counter()
            attacked = attack_uploads(victims, a, p.seed, Path(scratch))
            seconds = time.perf_counter() - started  # the jobs and the first rule's combination
        for done in attacked:
            tm, truth = done.victim.threat_model, truths[done.victim.path]
            for rule in combines:
                rec = (  # the first rule's combination is the attack's own
                    done.reconstruction
                    if rule == combines[0]
                    else combine(done.target, done.restarts, a.model_copy(update={"combine": rule}), p.seed)
                )
                psnr = paired_scores(to_unit_range(rec.images, list(tm.mean), list(tm.std)), truth)["psnr"].tolist()
                cell = cells.setdefault(
                    ((tm.step, tm.at), rule), {"psnr": [], "batches": [], "unconverged": 0, "uploads": 0}
                )
                cell["psnr"] += psnr
                cell["batches"].append(sum(psnr) / len(psnr))
                cell["unconverged"] += rec.converged is False
                cell["uploads"] += 1
        for (at, rule), cell in sorted(cells.items(), key=lambda item: (item[0][0], combines.index(item[0][1]))):
            found = t_estimate(cell["batches"], confidence)
            row = {
                "iterations": budget,
                "restarts": a.restarts,
                "combine": rule,
                "checkpoint": at[1],
                "n": len(cell["psnr"]),
                "batches": cell["uploads"],
                "psnr": sum(cell["psnr"]) / len(cell["psnr"]),
                "psnr_low": found.low,
                "psnr_high": found.high,
                "unconverged": f"{cell['unconverged']}/{cell['uploads']}",
                "seconds": round(seconds, 1),
            }
            if rule != combines[0]:
                d = t_estimate(
                    [x - y for x, y in zip(cell["batches"], cells[(at, combines[0])]["batches"])], confidence
                )
                row.update(diff=d.mean, diff_low=d.low, diff_high=d.high, p_value=d.p)
            rows.append(row)
    return rows


def _numbers(text: str | None) -> list[int] | None:
    return None if text is None else [int(x) for x in text.split(",")]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.budget", description=__doc__.split("\n\n")[0])
    parser.add_argument("setting")
    parser.add_argument("--iterations", default="500,1500,3000", help="comma-separated budgets")
    parser.add_argument("--epochs", help="comma-separated checkpoint epochs (default: every attacked one)")
    parser.add_argument("--restarts", help="restarts per upload (default: params.yaml's attack.restarts)")
    parser.add_argument("--combine", default="best", help=f"comma-separated rules, of {', '.join(COMBINE_RULES)}")
    args = parser.parse_args(argv)
    try:
        iterations, epochs, restarts = _numbers(args.iterations), _numbers(args.epochs), _numbers(args.restarts)
        if min(iterations) < 1 or (restarts and (len(restarts) > 1 or restarts[0] < 1)):
            raise ValueError
    except ValueError:
        fail("budget", "--iterations and --epochs take comma-separated positive whole numbers, --restarts one")
    combines = tuple(args.combine.split(","))
    if not set(combines) <= set(COMBINE_RULES) or len(set(combines)) < len(combines):
        fail("budget", f"--combine takes distinct rules of {', '.join(COMBINE_RULES)} (got {args.combine!r})")
    try:
        rows = budget_rows(args.setting, iterations, epochs, restarts and restarts[0], combines)
    except PipelineError as err:
        fail("budget", str(err))
    print(
        f"{args.setting}: PSNR (dB) by attack budget, mean [t interval over the batches] of n images"
        + (
            f"; the difference to {combines[0]}, paired by batch, and the paired t-test's p"
            if len(combines) > 1
            else ""
        )
    )
    print(
        "| iterations | restarts | combine | checkpoint | n | PSNR | difference | p | unconverged | seconds |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        diff = (
            f"{r['diff']:+.2f} [{r['diff_low']:+.2f}, {r['diff_high']:+.2f}] | {r['p_value']:.2g}"
            if "diff" in r
            else "– | –"
        )
        print(
            f"| {r['iterations']} | {r['restarts']} | {r['combine']} | {r['checkpoint']} | {r['n']} | {r['psnr']:.1f} "
            f"[{r['psnr_low']:.1f}, {r['psnr_high']:.1f}] | {diff} | {r['unconverged']} | {r['seconds']} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
