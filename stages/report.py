"""report: the results table (CSV and Markdown) with its evidence and a generated summary, DVC
metrics and plots, truth-over-reconstruction figures, and one MLflow child run per setting for
the UI's compare view. (The same table rebuilt from MLflow alone: python -m tools.from_mlflow.)
"""

from pathlib import Path

import pandas as pd

from pipeline.copies import copied_cells
from pipeline.errors import PipelineError
from pipeline.figures import write_figures
from pipeline.files import atomic_file, read_json, write_json
from pipeline.outputs import describe, load_outputs, training_table
from pipeline.presentation import results_markdown, shown_summary
from pipeline.report import markdown_table
from pipeline.results import add_classic, add_differences, add_family, add_floor, results_table, summary_of
from pipeline.sections import pairs_with, trains_like
from pipeline.statistics import Evidence
from pipeline.tracking import log_setting_runs
from pipeline.uploads import ADAPTIVE
from stages._common import Stage, run

ATTACKS, TRUTH, MODELS, CLIENT, COPIES = (
    Path("attacks"),
    Path("truth"),
    Path("models"),
    Path("reports/client"),
    Path("copies"),
)
METRICS, PER_IMAGE = Path("reports/metrics.json"), Path("reports/per_image.csv")
RESULTS_CSV, RESULTS_MD = Path("reports/results.csv"), Path("reports/results.md")
TRAINING_CSV, FIGURE = Path("reports/training.csv"), Path("reports/reconstructions.png")
SUMMARY, PLOTS, FIGURES = Path("reports/summary.json"), Path("reports/plots"), Path("reports/figures")


def main(stage: Stage) -> None:
    p = stage.params
    baseline = p.report.baseline
    evidence = Evidence(p.report.confidence, p.report.alpha, p.report.power, p.report.effect)
    every_image = pd.read_csv(PER_IMAGE)
    per_image = every_image[every_image.attacker == ADAPTIVE]  # the verdicts' attacker
    uploads = load_outputs(read_json(METRICS)["uploads"], ATTACKS, CLIENT)
    training = training_table(MODELS, list(p.schemes))
    copies = copied_cells(COPIES, list(p.settings))
    table = results_table(
        per_image, uploads, lambda s, e, u: describe(p, MODELS, s, e, u), evidence, list(p.settings), copies
    )
    base_client = None if baseline is None else p.setting(baseline)[1]
    table = add_differences(
        table,
        per_image,
        baseline,
        lambda s: pairs_with(p.setting(s)[1], base_client),
        evidence,
        p.report.budget,
    )
    table = add_floor(add_family(add_classic(table, every_image, evidence, baseline), evidence), per_image, evidence)
    if baseline is not None and not table.family_size.iloc[0]:
        raise PipelineError(
            f"report.baseline {baseline}: no cell of the table pairs with it (every other setting's uploads are "
            "copies, or draw other images), so there is no verdict to make"
        )
    same_training = None if base_client is None else lambda s: trains_like(p.setting(s)[1], base_client)
    summary = summary_of(table, training, evidence, baseline, same_training)
    with atomic_file(RESULTS_CSV) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_file(TRAINING_CSV) as tmp:
        training.to_csv(tmp, index=False)
    records = summary.astype(object).where(summary.notna(), None).to_dict(orient="records")
    write_json(SUMMARY, {row.pop("setting"): row for row in records})  # DVC metrics: `dvc metrics show`
    with atomic_file(RESULTS_MD) as tmp:
        tmp.write_text(results_markdown(p, table, summary, training, baseline))
    write_figures(p, (table, summary, training, per_image, uploads), ATTACKS, TRUTH, Path("reports"))
    print(markdown_table(shown_summary(summary)))
    if baseline is None:
        print("report: report.baseline is null: the table has no paired columns and no verdicts")
    for path in (RESULTS_CSV, RESULTS_MD, TRAINING_CSV, SUMMARY, FIGURE):
        stage.mlflow.log_artifact(str(path))
    stage.mlflow.log_artifacts(str(PLOTS), "plots")
    stage.mlflow.log_artifacts(str(FIGURES), "figures")
    log_setting_runs(stage.mlflow, table)


if __name__ == "__main__":
    run("report", main, reads=("schemes", "extract", "client", "settings", "attack", "report"))
