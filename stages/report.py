"""report: the results table (CSV and Markdown) with a generated summary, DVC metrics and plots,
truth-over-reconstruction figures, and one MLflow child run per setting for the UI's compare view.

    python -m stages.report                      the DVC stage
    python -m stages.report --from-mlflow [--check] [--group ID]
        rebuild the table from the tracking store's stage runs alone (no DVC outputs read);
        --check: exit 1 unless it equals reports/results.csv
"""

import os
import sys
from pathlib import Path

import pandas as pd

from pipeline.errors import PipelineError
from pipeline.files import atomic_file, load_tensors, read_json, write_json
from pipeline.report import line_plot, markdown_table, overview_figure, save_grid, scatter_plot
from pipeline.uploads import load_truth
from stages._common import Stage, run

ATTACKS, TRUTH, MODELS, CLIENT = Path("attacks"), Path("truth"), Path("models"), Path("reports/client")
METRICS, PER_IMAGE = Path("reports/metrics.json"), Path("reports/per_image.csv")
RESULTS_CSV, RESULTS_MD = Path("reports/results.csv"), Path("reports/results.md")
TRAINING_CSV, FIGURE = Path("reports/training.csv"), Path("reports/reconstructions.png")
SUMMARY, PLOTS, FIGURES = Path("reports/summary.json"), Path("reports/plots"), Path("reports/figures")
# The columns both tables have: the DVC outputs' and the one rebuilt from MLflow.
SHARED = ["setting", "scheme", "epoch", "test_accuracy", "epsilon", "gh", "label_accuracy", "psnr", "ssim", "mse",
          "lpips", "iterations_run"]


def _privacy(checkpoint: dict) -> str:
    if "epsilon" in checkpoint:
        return f"({checkpoint['epsilon']:.2f}, {checkpoint['delta']:g})-DP"
    return "no privacy guarantee" if "guarantee" in checkpoint else ""


def training_table(schemes: list[str]) -> pd.DataFrame:
    rows = []
    for scheme in schemes:
        for path in sorted((MODELS / scheme).glob("epoch-*.json")):
            c = read_json(path)
            rows.append({"scheme": scheme, "epoch": c["epoch"], "test_accuracy": c["test_accuracy"],
                         "epsilon": c.get("epsilon"), "privacy": _privacy(c), "bn": c["bn"],
                         "global_batch": c["global_batch"], "maxpool_kernel": c["maxpool_kernel"]})
    return pd.DataFrame(rows)


def client_summary(c) -> str:
    """The client setting in a few words, for the table."""
    parts = [f"B={c.batch_size}", f"W={c.participants} {c.bn} BN" if c.participants > 1 else "",
             f"E={c.local_steps}" if c.local_steps > 1 else "", c.mode,
             f"k={c.label_repetition} classes" if c.label_repetition else "",
             f"DP {c.dp.kind} sigma={c.dp.sigma:g} C={c.dp.clip:g}" if c.dp else ""]
    return ", ".join(x for x in parts if x)


def _applicable_epsilon(checkpoint: dict, measured: dict) -> float | None:
    """The epsilon that applies to a row: the DP-SGD model's, else the DP client's."""
    return checkpoint.get("epsilon", measured.get("epsilon"))


def summary_of(table: pd.DataFrame, training: pd.DataFrame) -> pd.DataFrame:
    """Per setting: the attack's best PSNR over training (and when), and the last epoch's test
    accuracy of its scheme against `pure`'s (the accuracy the defense costs)."""
    final = training[training.epoch == training.epoch.max()].set_index("scheme").test_accuracy
    rows = []
    for setting, part in table.groupby("setting", sort=False):
        best = part.loc[part.psnr.idxmax()]
        scheme = best.scheme
        rows.append({"setting": setting, "scheme": scheme, "best_psnr": best.psnr, "best_psnr_epoch": int(best.epoch),
                     "last_psnr": part.sort_values("epoch").psnr.iloc[-1], "test_accuracy": final.get(scheme),
                     "accuracy_cost": (final["pure"] - final[scheme]) if "pure" in final and scheme in final else None,
                     "gh_last": part.sort_values("epoch").gh.iloc[-1]})
    return pd.DataFrame(rows)


def summary_text(summary: pd.DataFrame) -> str:
    lowest = summary.loc[summary.best_psnr.idxmin()]
    shown = summary.assign(best_psnr=summary.apply(lambda r: f"{r.best_psnr:.1f} (epoch {r.best_psnr_epoch})", axis=1))
    return (
        "## Summary\n\nPer client setting: the attacker's best PSNR over the attacked epochs, and the test accuracy "
        "of the setting's scheme after the last epoch with its cost against `pure` (positive: the defense costs "
        f"accuracy). The attack did least against **{lowest.setting}** (best {lowest.best_psnr:.1f} dB).\n\n"
        + markdown_table(shown.drop(columns=["best_psnr_epoch"]).rename(columns={
            "best_psnr": "best PSNR (dB)", "last_psnr": "last PSNR (dB)", "test_accuracy": "test accuracy",
            "accuracy_cost": "cost vs pure", "gh_last": "GH (last)"}))
    )


def results_table(p, per_image: pd.DataFrame, metrics: dict) -> tuple[pd.DataFrame, list]:
    rows, uploads = [], []
    for key, m in sorted(metrics.items(), key=lambda kv: (list(p.settings).index(kv[1]["setting"]), kv[1]["epoch"])):
        setting, name = key.split("/")
        scheme, client = p.setting(setting)
        checkpoint = read_json(MODELS / scheme / f"{name}.json")
        measured = read_json(CLIENT / f"{setting}.json")[f"epoch_{m['epoch']}"]
        rec, rec_meta = load_tensors(ATTACKS / setting / f"{name}.safetensors", expected={"images", "labels"})
        truth_u8, _, _ = load_truth(TRUTH / setting / f"{name}.safetensors")
        client_privacy = "" if client.dp is None else (
            f"client ({measured['epsilon']:.3g}, {client.dp.delta:g})-DP" if client.dp.kind == "per-sample"
            else "client clip+noise: no privacy guarantee")
        rows.append({
            "setting": setting, "scheme": scheme, "arch": checkpoint["arch"], "epoch": m["epoch"],
            "test_accuracy": checkpoint["test_accuracy"], "client": client_summary(client),
            "privacy": "; ".join(x for x in (_privacy(checkpoint), client_privacy) if x),
            "epsilon": _applicable_epsilon(checkpoint, measured),
            "gh": measured["gh"], "repetition_rate": measured["repetition_rate"], "gir_max": measured["gir_max"],
            "ra_index": measured["ra_index"], "labels": rec_meta["labels_method"], "label_accuracy": m["label_accuracy"],
            "psnr": m["psnr"]["mean"], "psnr_std": m["psnr"]["std"], "ssim": m["ssim"]["mean"], "mse": m["mse"]["mean"],
            "lpips": None if m["lpips"] is None else m["lpips"]["mean"],
            "grad_loss": rec_meta["grad_loss"], "iterations": rec_meta["iterations"],
            "iterations_run": rec_meta["iterations_run"],
        })
        mine = per_image[(per_image.setting == setting) & (per_image.upload == name)].sort_values("image")
        uploads.append((setting, name, m, measured, truth_u8.float() / 255, rec["images"][mine["reconstruction"].tolist()]))
    return pd.DataFrame(rows), uploads


def write_figures(p, table: pd.DataFrame, training: pd.DataFrame, uploads: list) -> None:
    panels: dict[str, list] = {}
    for setting, name, m, measured, truth, paired in uploads:
        save_grid(FIGURES / setting / f"{name}.png", [truth, paired])  # truth over reconstruction
        gh = "n/a" if measured["gh"] is None else f"{measured['gh']:.3f}"
        panels.setdefault(setting, []).append(
            (f"{setting} epoch {m['epoch']}: GH {gh}, PSNR {m['psnr']['mean']:.1f} dB, SSIM {m['ssim']['mean']:.2f}",
             truth, paired))
    for setting, mine in panels.items():  # one figure per setting across epochs
        overview_figure(FIGURES / f"{setting}.png", mine, columns=len(mine))
    overview_figure(FIGURE, [panel for mine in panels.values() for panel in mine], columns=len(p.extract.epochs))
    line_plot(PLOTS / "psnr_by_epoch.png", table, "epoch", "psnr", "setting",
              "Attack PSNR through training, per client setting", "PSNR (dB), Hungarian-paired")
    line_plot(PLOTS / "accuracy_by_epoch.png", training, "epoch", "test_accuracy", "scheme",
              "Test accuracy per defense scheme", "test accuracy")
    scatter_plot(PLOTS / "gh_vs_psnr.png", table, "gh", "psnr", "setting", "Gradient heterogeneity against attack PSNR",
                 "GH = 1 - cos(upload, modelled gradient)", "PSNR (dB)")


def log_setting_runs(stage: Stage, table: pd.DataFrame) -> None:
    """One child run per setting with the same metric names (step = epoch): the UI's compare view
    then lines the settings up side by side."""
    for setting, part in table.groupby("setting", sort=False):
        with stage.mlflow.start_run(run_name=f"results@{setting}", nested=True,
                                    tags={"setting": setting, "scheme": part.scheme.iloc[0], "pipeline.role": "results"}):
            stage.mlflow.log_params({"scheme": part.scheme.iloc[0], "client": part.client.iloc[0]})
            for _, row in part.iterrows():
                stage.mlflow.log_metrics({k: float(row[k]) for k in SHARED[3:] if pd.notna(row[k])}, step=int(row.epoch))


def main(stage: Stage) -> None:
    p = stage.params
    table, uploads = results_table(p, pd.read_csv(PER_IMAGE), read_json(METRICS)["uploads"])
    training = training_table(list(p.schemes))
    summary = summary_of(table, training)
    with atomic_file(RESULTS_CSV) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_file(TRAINING_CSV) as tmp:
        training.to_csv(tmp, index=False)
    records = summary.astype(object).where(summary.notna(), None).to_dict(orient="records")
    write_json(SUMMARY, {row.pop("setting"): row for row in records})  # DVC metrics: `dvc metrics show`
    lpips_note = "" if table.lpips.notna().any() else " LPIPS n/a: no AlexNet weights on this machine (see README)."
    with atomic_file(RESULTS_MD) as tmp:
        tmp.write_text(
            "# Results\n\n" + summary_text(summary)
            + "\n## Every attacked upload\n\nOne row per client setting x training epoch; GH = 1 - cos(upload, the "
            "single-step full-batch sync-BN gradient the attacker models); PSNR/SSIM/LPIPS after Hungarian pairing; "
            "epsilon: the DP-SGD model's, or the DP client's; iterations_run: the attack's, fewer than asked when a TV "
            f"target stopped it (its wall time is in MLflow: `python -m stages.report --from-mlflow`).{lpips_note}\n\n"
            + markdown_table(table)
            + "\n## Gradient heterogeneity\n\nGH per setting (rows) and training epoch (columns): 0 is the "
            "gradient the attacker models; the larger, the less the upload looks like it.\n\n"
            + markdown_table(table.pivot(index="setting", columns="epoch", values="gh").loc[list(p.settings)]
                             .rename(columns=lambda e: f"epoch {e}").reset_index(), floatfmt=".4f")
            + "\n## Training\n\nTest accuracy per scheme and epoch; epsilon where the scheme is DP-SGD.\n\n"
            + markdown_table(training.pivot(index="epoch", columns="scheme", values="test_accuracy")[list(p.schemes)]
                             .reset_index().astype({"epoch": str}))
            + "\n" + markdown_table(training[training.epsilon.notna()][["scheme", "epoch", "epsilon", "privacy"]])
        )
    write_figures(p, table, training, uploads)
    print(summary_text(summary))
    for path in (RESULTS_CSV, RESULTS_MD, TRAINING_CSV, SUMMARY, FIGURE):
        stage.mlflow.log_artifact(str(path))
    stage.mlflow.log_artifacts(str(PLOTS), "plots")
    stage.mlflow.log_artifacts(str(FIGURES), "figures")
    log_setting_runs(stage, table)


def _history(client, run_id: str | None, key: str) -> dict[int, float]:
    return {} if run_id is None else {m.step: m.value for m in client.get_metric_history(run_id, key)}


def table_from_mlflow(uri: str, experiment: str, group: str | None = None) -> pd.DataFrame:
    """The results table rebuilt from the stage runs in the tracking store (the latest finished run
    of each DVC stage, within one pipeline group if given): train (test accuracy, epsilon per epoch),
    extract (GH, the client's epsilon), attack (iterations, wall time), evaluate (image metrics)."""
    import mlflow

    from pipeline.tracking import GROUP_TAG

    mlflow.set_tracking_uri(uri)
    query = "attributes.status = 'FINISHED'" + (f" and tags.`{GROUP_TAG}` = '{group}'" if group else "")
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=query, order_by=["attributes.start_time DESC"])
    if runs.empty or "tags.dvc.stage" not in runs:
        raise PipelineError(f"{uri}: no finished stage runs in experiment {experiment!r}")
    latest = runs[runs["tags.dvc.stage"].notna()].drop_duplicates("tags.dvc.stage").set_index("tags.dvc.stage")
    run_id = latest.run_id.to_dict()
    if "evaluate" not in run_id:
        raise PipelineError(f"{uri}: no finished evaluate run to take the image metrics from")
    client = mlflow.MlflowClient()
    rows = []
    for _, extract in latest[latest["tags.stage"] == "extract"].iterrows():
        setting, scheme = extract["tags.setting"], extract["tags.scheme"]
        train, attack = run_id.get(f"train@{scheme}"), run_id.get(f"attack@{setting}")
        h = {
            "test_accuracy": _history(client, train, "epoch.test_accuracy"), "train_epsilon": _history(client, train, "epoch.epsilon"),
            "client_epsilon": _history(client, extract.run_id, "epsilon"), "gh": _history(client, extract.run_id, "gh"),
            "iterations_run": _history(client, attack, "iterations_run"), "attack_seconds": _history(client, attack, "attack_seconds"),
            **{k: _history(client, run_id["evaluate"], f"{k}.{setting}") for k in ("label_accuracy", "psnr", "ssim", "mse", "lpips")},
        }
        for epoch in sorted(h["psnr"]):
            rows.append({"setting": setting, "scheme": scheme, "epoch": epoch,
                         "epsilon": h["train_epsilon"].get(epoch, h["client_epsilon"].get(epoch)),
                         **{k: h[k].get(epoch) for k in SHARED[3:] if k != "epsilon"},
                         "attack_seconds": h["attack_seconds"].get(epoch)})
    return pd.DataFrame(rows)


def table_differences(ours: pd.DataFrame, theirs: pd.DataFrame) -> list[str]:
    """Where two results tables disagree on the shared columns (rows matched by setting and epoch)."""
    a, b = (t[SHARED].astype({"epoch": int}).sort_values(["setting", "epoch"]).reset_index(drop=True) for t in (ours, theirs))
    if a[["setting", "epoch"]].values.tolist() != b[["setting", "epoch"]].values.tolist():
        return [f"rows differ: {sorted(map(tuple, a[['setting', 'epoch']].values))} vs "
                f"{sorted(map(tuple, b[['setting', 'epoch']].values))}"]
    problems = []
    for column in SHARED[1:]:
        for i in range(len(a)):
            x, y = a.at[i, column], b.at[i, column]
            same = (pd.isna(x) and pd.isna(y)) or (not pd.isna(x) and not pd.isna(y) and
                                                  (x == y if isinstance(x, str) else abs(float(x) - float(y)) <= 1e-9))
            if not same:
                problems.append(f"{a.at[i, 'setting']} epoch {a.at[i, 'epoch']}: {column} {x} vs {y}")
    return problems


def from_mlflow(argv: list[str]) -> None:
    import argparse

    from pipeline.tracking import EXPERIMENT, tracking_uri

    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)  # where the stages logged

    parser = argparse.ArgumentParser(prog="python -m stages.report --from-mlflow")
    parser.add_argument("--from-mlflow", action="store_true", required=True)
    parser.add_argument("--check", action="store_true", help=f"exit 1 unless the table equals {RESULTS_CSV}")
    parser.add_argument("--group", help="only the runs of this pipeline group (the tag pipeline.group)")
    args = parser.parse_args(argv)
    try:
        table = table_from_mlflow(tracking_uri(Path(".")), experiment, args.group)
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
        run("report", main, reads=("extract", "client", "settings", "attack"))
