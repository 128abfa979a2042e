"""report: the results table (CSV and Markdown) with its evidence and a generated summary, DVC
metrics and plots, truth-over-reconstruction figures, and one MLflow child run per setting for
the UI's compare view.

    python -m stages.report                      the DVC stage
    python -m stages.report --from-mlflow [--check] [--group ID]
        rebuild the table from the tracking store's stage runs alone (no DVC outputs read);
        --check: exit 1 unless it equals reports/results.csv
"""

import os
import sys
from pathlib import Path

import pandas as pd

from pipeline.checkpoints import checkpoint_name
from pipeline.errors import PipelineError
from pipeline.files import atomic_file, load_tensors, read_json, write_json
from pipeline.report import band_plot, line_plot, markdown_table, overview_figure, save_grid, scatter_plot
from pipeline.results import (
    SHARED,
    Evidence,
    add_classic,
    add_differences,
    client_summary,
    load_outputs,
    pairs_with,
    privacy_of,
    results_table,
    shown_summary,
    shown_table,
    summary_of,
    table_differences,
    training_table,
)
from pipeline.uploads import ADAPTIVE, load_truth
from stages._common import Stage, run

ATTACKS, TRUTH, MODELS, CLIENT = Path("attacks"), Path("truth"), Path("models"), Path("reports/client")
METRICS, PER_IMAGE = Path("reports/metrics.json"), Path("reports/per_image.csv")
RESULTS_CSV, RESULTS_MD = Path("reports/results.csv"), Path("reports/results.md")
TRAINING_CSV, FIGURE = Path("reports/training.csv"), Path("reports/reconstructions.png")
SUMMARY, PLOTS, FIGURES = Path("reports/summary.json"), Path("reports/plots"), Path("reports/figures")


def describe(p, setting: str, epoch: int, uploads: pd.DataFrame) -> dict:
    """The columns of a cell that are not statistics: the scheme's checkpoint, the client, privacy."""
    scheme, client = p.setting(setting)
    checkpoint = read_json(MODELS / scheme / Path(checkpoint_name(epoch)).with_suffix(".json"))
    client_epsilon = None if uploads.epsilon.isna().any() else float(uploads.epsilon.mean())
    client_privacy = (
        ""
        if client.dp is None
        else (
            f"client ({client_epsilon:.3g}, {client.dp.delta:g})-DP"
            if client.dp.kind == "per-sample"
            else "client clip+noise: no privacy guarantee"
        )
    )
    return {
        "scheme": scheme,
        "arch": checkpoint["arch"],
        "test_accuracy": checkpoint["test_accuracy"],
        "client": client_summary(client),
        "labels": uploads.labels.iloc[0],
        "privacy": "; ".join(x for x in (privacy_of(checkpoint), client_privacy) if x),
        "epsilon": checkpoint.get("epsilon", client_epsilon),
        "repetition_rate": float(uploads.repetition_rate.mean()),
        "ra_index": uploads.ra_index.iloc[0],
    }


def intro(p, table: pd.DataFrame, baseline: str | None) -> str:
    r = p.report
    lpips = "" if table.lpips.notna().any() else " LPIPS n/a: no AlexNet weights on this machine (see README)."
    paired = (
        "no baseline is set (report.baseline: null), so there are no paired columns: compare the intervals."
        if baseline is None
        else f"Every setting is paired with `{baseline}` image by image (same epoch, trial and batch position, "
        "the same victims); a setting whose batches are chosen otherwise (label repetition, another batch size) "
        "is not paired. 'vs baseline' is the mean paired PSNR difference with its interval; p the Wilcoxon "
        f"signed-rank test of the differences (scipy.stats.wilcoxon). Verdict, per attacked epoch: **protects** "
        f"when the difference's interval lies below 0 and p < {r.alpha:g}; **leaks more** when it lies above 0 "
        "and p < alpha; else **no detectable protection**."
    )
    return (
        f"Each cell: {p.extract.trials} client batches (trials) of the setting's batch size, disjoint, drawn "
        f"from the victim pool; n = images. Intervals: {r.confidence:.0%} bootstrap (BCa, {r.resamples} "
        f"resamples, seeded) of the mean over the images. {paired} An attack counts as unconverged when its "
        "best gradient loss over the last 10 % of iterations is more than 1 % under the best of the 10 % before "
        f"(pipeline.attack.invert.still_falling); a verdict resting on any says so. The attack runs with "
        "params.yaml's hyper-parameters (fixed) unless the summary names tuned ones: chosen by tune@<setting> on "
        f"the attacker's own images, never a victim's (the classic attacker keeps the fixed ones).{lpips}\n"
    )


def write_markdown(p, table: pd.DataFrame, summary: pd.DataFrame, training: pd.DataFrame, baseline) -> None:
    with atomic_file(RESULTS_MD) as tmp:
        tmp.write_text(
            "# Results\n\n"
            + intro(p, table, baseline)
            + "\n## Summary\n\nPSNR (dB, Hungarian-paired) at each attacked epoch as mean [interval], against the "
            "adaptive attacker (it models the client's asynchronous-BatchNorm shards and unrolls its local steps, as "
            "the threat model states them) and, where that differs, the classic attacker (one full-batch gradient; "
            "'same attack' where there is nothing to adapt to); the test accuracy of the setting's scheme after the "
            "last epoch, with its cost against the baseline's scheme (positive: the defense costs accuracy); the "
            "verdict against the baseline, read against the adaptive attacker.\n\n"
            + markdown_table(shown_summary(summary))
            + "\n## Every cell\n\nOne row per client setting x training epoch. GH = 1 - cos(upload, the single-step "
            "full-batch sync-BN gradient the attacker models), the mean over the trials; epsilon: the DP-SGD model's, "
            "or the DP client's. Every number and per-image score: `reports/results.csv`, `reports/per_image.csv`.\n\n"
            + markdown_table(shown_table(table))
            + "\n## Training\n\nTest accuracy per scheme and epoch; epsilon where the scheme is DP-SGD.\n\n"
            + markdown_table(
                training.pivot(index="epoch", columns="scheme", values="test_accuracy")[list(p.schemes)]
                .reset_index()
                .astype({"epoch": str})
            )
            + "\n"
            + markdown_table(training[training.epsilon.notna()][["scheme", "epoch", "epsilon", "privacy"]])
        )


def write_figures(
    p, table: pd.DataFrame, training: pd.DataFrame, per_image: pd.DataFrame, uploads: pd.DataFrame
) -> None:
    panels: dict[str, list] = {}
    for u in uploads.itertuples():
        rec, _ = load_tensors(ATTACKS / u.setting / f"{u.upload}.safetensors", expected={"images", "labels"})
        truth_u8, _, _ = load_truth(TRUTH / u.setting / f"{u.upload}.safetensors")
        mine = per_image[(per_image.setting == u.setting) & (per_image.upload == u.upload)].sort_values("image")
        truth, paired = truth_u8.float() / 255, rec["images"][mine["reconstruction"].tolist()]
        save_grid(FIGURES / u.setting / f"{u.upload}.png", [truth, paired])  # truth over reconstruction
        if u.trial == 0:  # the overviews show the first trial of each cell
            gh = "n/a" if pd.isna(u.gh) else f"{u.gh:.3f}"
            panels.setdefault(u.setting, []).append(
                (f"{u.setting} epoch {u.epoch} trial 0: GH {gh}, PSNR {mine.psnr.mean():.1f} dB", truth, paired)
            )
    for setting, mine in panels.items():  # one figure per setting across epochs
        overview_figure(FIGURES / f"{setting}.png", mine, columns=len(mine))
    overview_figure(FIGURE, [panel for mine in panels.values() for panel in mine], columns=len(p.extract.epochs))
    band_plot(
        PLOTS / "psnr_by_epoch.png",
        table,
        "epoch",
        "psnr",
        "psnr_low",
        "psnr_high",
        "setting",
        f"Attack PSNR through training, mean and {p.report.confidence:.0%} interval over {int(table.n.max())} images",
        "PSNR (dB), Hungarian-paired",
    )
    line_plot(
        PLOTS / "accuracy_by_epoch.png",
        training,
        "epoch",
        "test_accuracy",
        "scheme",
        "Test accuracy per defense scheme",
        "test accuracy",
    )
    scored = uploads.merge(per_image.groupby(["setting", "upload"]).psnr.mean().reset_index(), on=["setting", "upload"])
    scatter_plot(
        PLOTS / "gh_vs_psnr.png",
        scored,
        "gh",
        "psnr",
        "setting",
        "Gradient heterogeneity against attack PSNR, one point per upload",
        "GH = 1 - cos(upload, modelled gradient)",
        "mean PSNR of the upload (dB)",
    )
    scatter_plot(
        PLOTS / "gir_vs_psnr.png",
        per_image,
        "gir",
        "psnr",
        "setting",
        "Gradient information ratio against PSNR, one point per image",
        "GIR (%)",
        "PSNR (dB)",
    )


def log_setting_runs(stage: Stage, table: pd.DataFrame) -> None:
    """One child run per setting with the same metric names (step = epoch): the UI's compare view
    then lines the settings up side by side."""
    numbers = [
        c
        for c in table.columns
        if c not in ("setting", "scheme", "arch", "epoch", "client", "labels", "privacy", "hyperparameters")
    ]
    for setting, part in table.groupby("setting", sort=False):
        with stage.mlflow.start_run(
            run_name=f"results@{setting}",
            nested=True,
            tags={"setting": setting, "scheme": part.scheme.iloc[0], "pipeline.role": "results"},
        ):
            stage.mlflow.log_params(
                {
                    "scheme": part.scheme.iloc[0],
                    "client": part.client.iloc[0],
                    "attack_hyperparameters": part.hyperparameters.iloc[0],
                }
            )
            for _, row in part.iterrows():
                stage.mlflow.log_metrics({k: float(row[k]) for k in numbers if pd.notna(row[k])}, step=int(row.epoch))


def main(stage: Stage) -> None:
    p = stage.params
    baseline = p.report.baseline
    evidence = Evidence(p.report.confidence, p.report.resamples, p.report.alpha, p.seed)
    every_image = pd.read_csv(PER_IMAGE)
    per_image = every_image[every_image.attacker == ADAPTIVE]  # the verdicts' attacker
    uploads = load_outputs(read_json(METRICS)["uploads"], ATTACKS, CLIENT)
    training = training_table(MODELS, list(p.schemes))
    table = results_table(per_image, uploads, lambda s, e, u: describe(p, s, e, u), evidence, list(p.settings))
    base_client = None if baseline is None else p.setting(baseline)[1]
    table = add_differences(table, per_image, baseline, lambda s: pairs_with(p.setting(s)[1], base_client), evidence)
    table = add_classic(table, every_image, evidence)
    summary = summary_of(table, training, evidence, baseline)
    with atomic_file(RESULTS_CSV) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_file(TRAINING_CSV) as tmp:
        training.to_csv(tmp, index=False)
    records = summary.astype(object).where(summary.notna(), None).to_dict(orient="records")
    write_json(SUMMARY, {row.pop("setting"): row for row in records})  # DVC metrics: `dvc metrics show`
    write_markdown(p, table, summary, training, baseline)
    write_figures(p, table, training, per_image, uploads)
    print(markdown_table(shown_summary(summary)))
    if baseline is None:
        print("report: report.baseline is null: the table has no paired columns and no verdicts")
    for path in (RESULTS_CSV, RESULTS_MD, TRAINING_CSV, SUMMARY, FIGURE):
        stage.mlflow.log_artifact(str(path))
    stage.mlflow.log_artifacts(str(PLOTS), "plots")
    stage.mlflow.log_artifacts(str(FIGURES), "figures")
    log_setting_runs(stage, table)


def from_mlflow(argv: list[str]) -> None:
    import argparse

    from pipeline.tracking import EXPERIMENT, table_from_mlflow, tracking_uri

    parser = argparse.ArgumentParser(prog="python -m stages.report --from-mlflow")
    parser.add_argument("--from-mlflow", action="store_true", required=True)
    parser.add_argument("--check", action="store_true", help=f"exit 1 unless the table equals {RESULTS_CSV}")
    parser.add_argument("--group", help="only the runs of this pipeline group (the tag pipeline.group)")
    args = parser.parse_args(argv)
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)  # where the stages logged
    try:
        table = table_from_mlflow(tracking_uri(Path(".")), experiment, SHARED, args.group)
    except PipelineError as err:
        sys.exit(f"report: error: {err}")
    print(markdown_table(table))
    if args.check:
        problems = table_differences(table, pd.read_csv(RESULTS_CSV))
        for line in problems:
            print(f"report: differs: {line}")
        if problems:
            sys.exit(1)
        print(f"report: the table rebuilt from MLflow equals {RESULTS_CSV} on {', '.join(SHARED)}")


if __name__ == "__main__":
    if "--from-mlflow" in sys.argv:
        from_mlflow(sys.argv[1:])
    else:
        run("report", main, reads=("seed", "schemes", "extract", "client", "settings", "report"))
