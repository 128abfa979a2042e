"""Two runs of the pipeline compared image by image: how much one attack beats the other on the
same victims (tuned against fixed hyper-parameters, one code version against another).

    python -m tools.paired BASE/reports/per_image.csv OTHER/reports/per_image.csv
                           [--settings pure,client-dp] [--attacker adaptive]

Both files must hold the same images (the same seed, data and extract parameters: the same
victims in every cell). Per (setting, epoch): n, each run's mean PSNR [interval], the mean of
OTHER - BASE [interval] and Wilcoxon's p, with params.yaml's report settings for the statistics.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from pipeline.config import load_params
from pipeline.errors import PipelineError
from pipeline.results import Evidence, mean_interval, wilcoxon_p
from pipeline.uploads import ADAPTIVE

KEYS = ["setting", "epoch", "trial", "victim"]


def paired_rows(base: pd.DataFrame, other: pd.DataFrame, settings: list[str] | None, evidence: Evidence) -> list[dict]:
    both = base.merge(other, on=[*KEYS, "attacker"], suffixes=("_base", "_other"), validate="one_to_one")
    if len(both) != len(base) or len(both) != len(other):
        raise PipelineError(
            f"the two runs hold other images ({len(base)} and {len(other)} rows, {len(both)} in common): "
            "they must share seed, data and extract parameters"
        )
    rows = []
    for (setting, epoch), cell in both.groupby(["setting", "epoch"], sort=False):
        if settings is not None and setting not in settings:
            continue
        d = (cell.psnr_other - cell.psnr_base).tolist()
        rows.append(
            {
                "setting": setting,
                "epoch": int(epoch),
                "n": len(cell),
                "base": (cell.psnr_base.mean(), *mean_interval(cell.psnr_base, evidence)),
                "other": (cell.psnr_other.mean(), *mean_interval(cell.psnr_other, evidence)),
                "diff": (sum(d) / len(d), *mean_interval(d, evidence)),
                "p": wilcoxon_p(d),
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
        evidence = Evidence(r.confidence, r.resamples, r.alpha)
        settings = None if args.settings is None else args.settings.split(",")
        rows = paired_rows(_read(args.base, args.attacker), _read(args.other, args.attacker), settings, evidence)
    except PipelineError as err:
        print(f"paired: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"PSNR (dB) per cell, mean [{r.confidence:.0%} interval]; difference other - base, paired by image")
    print("| setting | epoch | n | base | other | difference | p (Wilcoxon) |\n|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [f"{m:.1f} [{lo:.1f}, {hi:.1f}]" for m, lo, hi in (row["base"], row["other"])]
        m, lo, hi = row["diff"]
        print(
            f"| {row['setting']} | {row['epoch']} | {row['n']} | {cells[0]} | {cells[1]} | "
            f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}] | {row['p']:.2g} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
