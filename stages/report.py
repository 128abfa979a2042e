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
from pipeline.config import pairs_with
from pipeline.errors import PipelineError
from pipeline.files import atomic_file, load_tensors, read_json, write_json
from pipeline.report import (
    band_plot,
    line_plot,
    markdown_table,
    overview_figure,
    privacy_utility_plot,
    save_grid,
    scatter_plot,
)
from pipeline.results import (
    SHARED,
    add_classic,
    add_differences,
    add_family,
    client_summary,
    load_outputs,
    privacy_of,
    results_table,
    shown_summary,
    shown_table,
    summary_of,
    table_differences,
    training_table,
)
from pipeline.statistics import Evidence
from pipeline.uploads import ADAPTIVE, load_truth
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
    family = int(table.family_size.iloc[0]) if "family_size" in table else 0
    paired = (
        "no baseline is set (report.baseline: null), so there are no paired columns: compare the intervals."
        if baseline is None
        else f"Every setting is paired with `{baseline}` batch by batch (same epoch and trial: the same victims); "
        "a setting whose batches are chosen otherwise (label repetition, another batch size) is not paired. "
        "'vs baseline' is the mean over the batches of each batch's mean paired PSNR difference, with its t "
        f"interval; p is the paired t-test of the same batch means (scipy.stats.ttest_1samp), so the interval "
        f"and the test are one procedure. The family is every paired cell of the table ({family} tests; the "
        f"budget row and the cells that are another setting's upload are not in it): p adjusted by Holm "
        f"(statsmodels). Verdict, per cell: **protects** when the Holm-adjusted p < {r.alpha:g} and the "
        "difference is negative; **leaks more** when it is positive; else **no detectable effect**, with the "
        f"smallest difference the design would detect with {r.power:.0%} power at Holm's strictest level "
        f"(alpha / {family}), from that cell's batch SD (statsmodels' t-test power); **underpowered** where "
        f"that exceeds {r.effect:g} dB."
    )
    budget = (
        f" `{r.budget}` is `{baseline}` attacked at {p.attack_for(r.budget).iterations} iterations instead of "
        f"{p.attack_for(baseline).iterations}: its difference is how much more the attacker gets with twice the "
        "budget, not a verdict (every verdict is a bound of this attacker)."
        if r.budget
        else ""
    )
    return (
        f"Each cell: {p.extract.trials} client batches (trials) of the setting's batch size, disjoint, drawn "
        "from the victim pool. The batch is the unit: its images share one attack, so every interval and test "
        f"runs over the batch means ({r.confidence:.0%} t intervals); the PSNR median is over images, as "
        f"description. {paired}{budget} A cell whose uploads are byte for byte another setting's (the same "
        "checkpoint and client) was attacked once and reads 'same upload as'. IIP: the share of "
        "reconstructions whose nearest image by MSE, among the victim pool and as many of the attacker's own "
        "images, is their own. An attack counts as unconverged when its best gradient loss over the last 10 % "
        "of iterations is more than 1 % under the best of the 10 % before (pipeline.attack.invert."
        "still_falling); a cell's verdict says when it rests on any of its own or of the baseline's cell at "
        "that epoch. The attack runs with params.yaml's hyper-parameters (fixed) unless the summary names "
        "tuned ones: chosen by tune@<setting> on the attacker's own images, never a victim's (the classic "
        f"attacker keeps the fixed ones).{lpips}\n"
    )


def write_markdown(p, table: pd.DataFrame, summary: pd.DataFrame, training: pd.DataFrame, baseline) -> None:
    with atomic_file(RESULTS_MD) as tmp:
        tmp.write_text(
            "# Results\n\n"
            + intro(p, table, baseline)
            + "\n## Summary\n\nPSNR (dB, Hungarian-paired) at each attacked epoch as mean [interval over batches] "
            "and IIP, against the "
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
    p,
    table: pd.DataFrame,
    summary: pd.DataFrame,
    training: pd.DataFrame,
    per_image: pd.DataFrame,
    uploads: pd.DataFrame,
) -> None:
    panels: dict[tuple[str, int], tuple] = {}
    for u in uploads.itertuples():
        rec, _ = load_tensors(ATTACKS / u.setting / f"{u.upload}.safetensors", expected={"images", "labels"})
        truth_u8, _, _ = load_truth(TRUTH / u.setting / f"{u.upload}.safetensors")
        mine = per_image[(per_image.setting == u.setting) & (per_image.upload == u.upload)].sort_values("image")
        truth, paired = truth_u8.float() / 255, rec["images"][mine["reconstruction"].tolist()]
        save_grid(FIGURES / u.setting / f"{u.upload}.png", [truth, paired])  # truth over reconstruction
        if u.trial == 0:  # the overviews show the first trial of each cell
            gh = "n/a" if pd.isna(u.gh) else f"{u.gh:.3f}"
            title = f"{u.setting} epoch {u.epoch} trial 0: GH {gh}, PSNR {mine.psnr.mean():.1f} dB"
            panels[(u.setting, int(u.epoch))] = (title, truth, paired)
    for row in table[table.same_upload_as.notna()].itertuples():  # the original's panel, named so
        _, truth, paired = panels[(row.same_upload_as, int(row.epoch))]
        panels[(row.setting, int(row.epoch))] = (
            f"{row.setting} epoch {row.epoch}: the same upload as {row.same_upload_as}",
            truth,
            paired,
        )
    ordered = [[panels[(s, e)] for e in p.extract.epochs if (s, e) in panels] for s in p.settings]
    for setting, mine in zip(p.settings, ordered):  # one figure per setting across epochs
        if mine:
            overview_figure(FIGURES / f"{setting}.png", mine, columns=len(mine))
    overview_figure(FIGURE, [panel for mine in ordered for panel in mine], columns=len(p.extract.epochs))
    first = min(p.extract.epochs)
    leakage = table[(table.epoch == first) & (table.role != "budget")].copy()
    for column in ("psnr", "psnr_low", "psnr_high", "iip", "iip_low", "iip_high"):  # a copy shows its original's
        leakage[column] = [
            table[(table.setting == r.same_upload_as) & (table.epoch == first)][column].iloc[0]
            if isinstance(r.same_upload_as, str)
            else getattr(r, column)
            for r in leakage.itertuples()
        ]
    leakage["test_accuracy"] = [summary.set_index("setting").test_accuracy[s] for s in leakage.setting]
    privacy_utility_plot(PLOTS / "privacy_utility.png", leakage, first, p.report.confidence)
    attacked = table[table.same_upload_as.isna()]
    band_plot(
        PLOTS / "psnr_by_epoch.png",
        attacked,
        "epoch",
        "psnr",
        "psnr_low",
        "psnr_high",
        "setting",
        f"Attack PSNR through training, mean and {p.report.confidence:.0%} interval over "
        f"{int(attacked.trials.max())} client batches",
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
        if c != "epoch" and pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])
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


def copied_cells(settings) -> dict[tuple[str, int], str]:
    """The (setting, epoch) cells whose uploads are another setting's (copies/<setting>.json), each
    with that setting; a cell must be a copy whole or not at all."""
    cells: dict[tuple[str, int], set[str]] = {}
    for setting in settings:
        for original in read_json(COPIES / f"{setting}.json")["copies"].values():
            cells.setdefault((setting, original["epoch"]), set()).add(original["setting"])
    for (setting, epoch), originals in cells.items():
        if len(originals) > 1:
            raise PipelineError(
                f"{setting} at epoch {epoch}: its uploads repeat several settings' ({sorted(originals)})"
            )
    return {cell: originals.pop() for cell, originals in cells.items()}


def main(stage: Stage) -> None:
    p = stage.params
    baseline = p.report.baseline
    evidence = Evidence(p.report.confidence, p.report.alpha, p.report.power, p.report.effect)
    every_image = pd.read_csv(PER_IMAGE)
    per_image = every_image[every_image.attacker == ADAPTIVE]  # the verdicts' attacker
    uploads = load_outputs(read_json(METRICS)["uploads"], ATTACKS, CLIENT)
    training = training_table(MODELS, list(p.schemes))
    copies = copied_cells(p.settings)
    table = results_table(per_image, uploads, lambda s, e, u: describe(p, s, e, u), evidence, list(p.settings), copies)
    base_client = None if baseline is None else p.setting(baseline)[1]
    table = add_differences(
        table,
        per_image,
        baseline,
        lambda s: pairs_with(p.setting(s)[1], base_client),
        evidence,
        p.report.budget,
    )
    table = add_family(add_classic(table, every_image, evidence), evidence)
    if baseline is not None and not table.family_size.iloc[0]:
        raise PipelineError(
            f"report.baseline {baseline}: no cell of the table pairs with it (every other setting's uploads are "
            "copies, or draw other images), so there is no verdict to make"
        )
    summary = summary_of(table, training, evidence, baseline)
    with atomic_file(RESULTS_CSV) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_file(TRAINING_CSV) as tmp:
        training.to_csv(tmp, index=False)
    records = summary.astype(object).where(summary.notna(), None).to_dict(orient="records")
    write_json(SUMMARY, {row.pop("setting"): row for row in records})  # DVC metrics: `dvc metrics show`
    write_markdown(p, table, summary, training, baseline)
    write_figures(p, table, summary, training, per_image, uploads)
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
        ours = pd.read_csv(RESULTS_CSV)
        problems = table_differences(table, ours[ours.same_upload_as.isna()])  # a copy has no runs of its own
        for line in problems:
            print(f"report: differs: {line}")
        if problems:
            sys.exit(1)
        print(f"report: the table rebuilt from MLflow equals {RESULTS_CSV} on {', '.join(SHARED)}")


if __name__ == "__main__":
    if "--from-mlflow" in sys.argv:
        from_mlflow(sys.argv[1:])
    else:
        run("report", main, reads=("schemes", "extract", "client", "settings", "attack", "report"))
