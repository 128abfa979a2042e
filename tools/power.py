"""How many client batches a verdict needs: variance components of the paired PSNR differences
of a run, and the batches a paired t-test needs for 1, 2 and 3 dB.

    python -m tools.power [reports/per_image.csv] [--family N] [--checkpoints epoch-000,step-000016] [--cells null|all]

Per attacked checkpoint and over all, from the adaptive attacker's images of the cells paired with
params.yaml's report.baseline (the budget setting left out; by default only the cells whose
verdict in reports/results.csv is no detectable effect, since a real effect that differs from
batch to batch inflates the spread; `--cells all` takes every paired cell): the between-batch and within-batch
variances of the per-image difference (one-way random effects, ANOVA estimators), the intra-batch
correlation, the design effect of a batch, the SD of one batch's mean difference, and the batches
needed for report.power at report.alpha, uncorrected and at alpha / N (Holm's strictest step
over a family of N tests; default: the family of reports/results.csv).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from pipeline.checkpoints import checkpoint_label
from pipeline.config import load_params
from pipeline.errors import PipelineError
from pipeline.results import paired
from pipeline.sections import pairs_with
from pipeline.statistics import batches_needed, variance_components
from pipeline.uploads import ADAPTIVE
from tools import fail

EFFECTS = (1.0, 2.0, 3.0)


def differences(per_image: pd.DataFrame, baseline: str, settings: list[str]) -> dict[tuple[str, str], pd.DataFrame]:
    """Per paired (setting, checkpoint) cell: trial and the per-image difference d to the baseline."""
    cells = {}
    for (setting, at), _ in per_image[per_image.setting.isin(settings)].groupby(["setting", "checkpoint"]):
        both = paired(per_image, setting, baseline, str(at))
        cells[(setting, str(at))] = both.assign(d=both.psnr - both.psnr_baseline)[["trial", "d"]]
    return cells


def power_rows(cells: dict[tuple[str, str], pd.DataFrame], alpha: float, power: float, family: int) -> list[dict]:
    order = sorted({at for _, at in cells})
    groups = {checkpoint_label(at): [c for (_, ca), c in cells.items() if ca == at] for at in order}
    groups["all"] = list(cells.values())
    rows = []
    for name, group in groups.items():
        c = variance_components(group, "d")
        row = {
            "cells": name,
            "n cells": len(group),
            "batches": c.batches,
            "between": c.between,
            "within": c.within,
            "icc": c.icc,
            "design effect": c.design_effect,
            "batch SD": c.batch_sd,
        }
        for effect in EFFECTS:
            row[f"{effect:g} dB"] = batches_needed(c.batch_sd, effect, alpha, power)
            row[f"{effect:g} dB, alpha/{family}"] = batches_needed(c.batch_sd, effect, alpha / family, power)
        rows.append(row)
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.power", description=__doc__.split("\n\n")[0])
    parser.add_argument("per_image", nargs="?", type=Path, default=Path("reports/per_image.csv"))
    parser.add_argument("--family", type=int, help="tests in the family (default: reports/results.csv's)")
    parser.add_argument("--checkpoints", help="comma-separated checkpoint names (default: every attacked one)")
    parser.add_argument("--cells", choices=("null", "all"), default="null", help="which paired cells (default: null)")
    args = parser.parse_args(argv)
    try:
        p = load_params(Path("params.yaml"))
        r = p.report
        if r.baseline is None:
            raise PipelineError("report.baseline is null: there are no paired differences to size")
        try:
            per_image = pd.read_csv(args.per_image)
        except (OSError, pd.errors.ParserError) as err:
            raise PipelineError(f"{args.per_image}: not a readable per-image table ({err})") from None
        per_image = per_image[per_image.attacker == ADAPTIVE]
        if args.checkpoints:
            per_image = per_image[per_image.checkpoint.isin(args.checkpoints.split(","))]
        base = p.setting(r.baseline)[1]
        settings = [s for s in p.settings if s not in (r.baseline, r.budget) and pairs_with(p.setting(s)[1], base)]
        results = Path("reports/results.csv")
        table = pd.read_csv(results) if results.is_file() else None
        family = args.family
        if family is None:
            family = int(table.family_size.iloc[0]) if table is not None else 1
        if family < 1:
            raise PipelineError(f"--family {family}: a family holds at least one test")
        cells = differences(per_image, r.baseline, settings)
        if args.cells == "null":
            if table is None:
                raise PipelineError(f"{results}: not found; the null cells are read from it (or pass --cells all)")
            nulls = table[table.effect == "none"][["setting", "checkpoint"]]
            null = {(s, str(c)) for s, c in nulls.itertuples(index=False)}
            cells = {cell: frame for cell, frame in cells.items() if cell in null}
        if not cells:
            raise PipelineError("no paired cell to estimate the variance from")
        rows = power_rows(cells, r.alpha, r.power, family)
    except (PipelineError, ValueError) as err:
        fail("power", str(err))
    which = "the cells without a verdict of effect" if args.cells == "null" else "every paired cell"
    print(
        f"Paired PSNR differences to {r.baseline} (dB) in {which}, variance components over batches of images; "
        f"batches a paired t-test needs for {r.power:.0%} power at alpha {r.alpha:g}, and at alpha/{family} (Holm's "
        "strictest step over the family)"
    )
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main(sys.argv[1:])
