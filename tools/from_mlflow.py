"""The results table rebuilt from the tracking store's stage runs alone (no DVC output read but
the table it is checked against): what the MLflow UI's runs hold is the pipeline's result.

    python -m tools.from_mlflow [--check] [--group ID]

--check: exit 1 unless it equals reports/results.csv on the columns both tables have; an error
(no store, no runs) is one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from pipeline.errors import PipelineError
from pipeline.report import markdown_table
from pipeline.tracking import EXPERIMENT, table_from_mlflow, tracking_uri
from tools import fail

RESULTS_CSV = Path("reports/results.csv")
# The columns both tables have: the one built from the DVC outputs and the one rebuilt from MLflow.
SHARED = [
    "setting",
    "scheme",
    "step",
    "test_accuracy",
    "epsilon",
    "gh",
    "label_accuracy",
    "psnr",
    "ssim",
    "mse",
    "lpips",
    "iterations_run",
    "unconverged",
]


def table_differences(ours: pd.DataFrame, theirs: pd.DataFrame) -> list[str]:
    """Where two results tables disagree on the shared columns (rows matched by setting and optimizer step)."""
    a, b = (
        t[SHARED].astype({"step": int}).sort_values(["setting", "step"]).reset_index(drop=True) for t in (ours, theirs)
    )
    if a[["setting", "step"]].values.tolist() != b[["setting", "step"]].values.tolist():
        return [
            f"rows differ: {sorted(map(tuple, a[['setting', 'step']].values))} vs "
            f"{sorted(map(tuple, b[['setting', 'step']].values))}"
        ]
    problems = []
    for column in SHARED[1:]:
        for i in range(len(a)):
            x, y = a.at[i, column], b.at[i, column]
            same = (pd.isna(x) and pd.isna(y)) or (
                not pd.isna(x)
                and not pd.isna(y)
                and (x == y if isinstance(x, str) else abs(float(x) - float(y)) <= 1e-9)
            )
            if not same:
                problems.append(f"{a.at[i, 'setting']} step {a.at[i, 'step']}: {column} {x} vs {y}")
    return problems


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.from_mlflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help=f"exit 1 unless the table equals {RESULTS_CSV}")
    parser.add_argument("--group", help="only the runs of this pipeline group (the tag pipeline.group)")
    args = parser.parse_args(argv)
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)  # where the stages logged
    try:
        table = table_from_mlflow(tracking_uri(Path(".")), experiment, SHARED, args.group)
    except PipelineError as err:
        fail("from_mlflow", str(err))
    print(markdown_table(table))
    if args.check:
        ours = pd.read_csv(RESULTS_CSV)
        problems = table_differences(table, ours[ours.same_upload_as.isna()])  # a copy has no runs of its own
        for line in problems:
            print(f"from_mlflow: differs: {line}")
        if problems:
            sys.exit(1)
        print(f"from_mlflow: the table rebuilt from MLflow equals {RESULTS_CSV} on {', '.join(SHARED)}")


if __name__ == "__main__":
    main(sys.argv[1:])
