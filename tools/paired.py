"""Two runs of the pipeline compared image by image: how much one attack beats the other on the
same victims (tuned against fixed hyper-parameters, one code version against another).

    python -m tools.paired BASE/reports/per_image.csv OTHER/reports/per_image.csv
                           [--settings pure,client-dp] [--attacker adaptive]

Both files must hold the same images (the same seed, data and extract parameters: the same
victims in every cell). Per (setting, checkpoint): the batches and images, each run's mean PSNR [t
interval over batches], the mean of OTHER - BASE per batch [t interval] and the paired t-test's p
(the batch is the unit: its images share one attack), at params.yaml's report.confidence.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from pipeline.config import load_params
from pipeline.errors import PipelineError
from pipeline.statistics import batch_means, t_estimate
from pipeline.uploads import ADAPTIVE
from tools import fail

KEYS = ["setting", "checkpoint", "trial", "victim"]


def paired_rows(base: pd.DataFrame, other: pd.DataFrame, settings: list[str] | None, confidence: float) -> list[dict]:
    both = base.merge(other, on=[*KEYS, "attacker"], suffixes=("_base", "_other"), validate="one_to_one")
    if len(both) != len(base) or len(both) != len(other):
        raise PipelineError(
            f"the two runs hold other images ({len(base)} and {len(other)} rows, {len(both)} in common): "
            "they must share seed, data and extract parameters"
        )
    rows = []
    for (setting, at), cell in both.groupby(["setting", "checkpoint"], sort=False):
        if settings is not None and setting not in settings:
            continue
        b, o = batch_means(cell, "psnr_base"), batch_means(cell, "psnr_other")
        base_e, other_e, d = (t_estimate(x, confidence) for x in (b, o, o - b))
        rows.append(
            {
                "setting": setting,
                "checkpoint": at,
                "batches": len(b),
                "n": len(cell),
                "base": (base_e.mean, base_e.low, base_e.high),
                "other": (other_e.mean, other_e.low, other_e.high),
                "diff": (d.mean, d.low, d.high),
                "p": d.p,
            }
        )
    if not rows:
        raise PipelineError(f"no cell of settings {settings} in both runs")
    return rows


def _read(path: Path, attacker: str) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError) as err:
        raise PipelineError(f"{path}: not a readable per-image table ({err})") from None
    missing = sorted({*KEYS, "attacker", "psnr"} - set(frame.columns))
    if missing:
        raise PipelineError(f"{path}: not a per_image.csv (no column {missing[0]!r})")
    return frame[frame.attacker == attacker]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.paired", description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("other", type=Path)
    parser.add_argument("--settings", help="comma-separated settings (default: every one)")
    parser.add_argument("--attacker", default=ADAPTIVE, help="adaptive | classic")
    args = parser.parse_args(argv)
    try:
        r = load_params(Path("params.yaml")).report
        settings = None if args.settings is None else args.settings.split(",")
        rows = paired_rows(_read(args.base, args.attacker), _read(args.other, args.attacker), settings, r.confidence)
    except PipelineError as err:
        fail("paired", str(err))
    print(f"PSNR (dB) per cell, mean [{r.confidence:.0%} t interval over batches]; other - base, paired by batch")
    print("| setting | checkpoint | batches | n | base | other | difference | p (paired t) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [f"{m:.1f} [{lo:.1f}, {hi:.1f}]" for m, lo, hi in (row["base"], row["other"])]
        m, lo, hi = row["diff"]
        print(
            f"| {row['setting']} | {row['checkpoint']} | {row['batches']} | {row['n']} | {cells[0]} | {cells[1]} | "
            f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}] | {row['p']:.2g} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
