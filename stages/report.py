"""report: the results table (CSV and Markdown), training per scheme, truth over reconstruction."""

from pathlib import Path

import pandas as pd

from pipeline.files import atomic_file, load_tensors, read_json
from pipeline.report import markdown_table, overview_figure
from pipeline.uploads import load_truth
from stages._common import Stage, run

ATTACKS, TRUTH, MODELS, CLIENT = Path("attacks"), Path("truth"), Path("models"), Path("reports/client")
METRICS, PER_IMAGE = Path("reports/metrics.json"), Path("reports/per_image.csv")
RESULTS_CSV, RESULTS_MD = Path("reports/results.csv"), Path("reports/results.md")
TRAINING_CSV, FIGURE = Path("reports/training.csv"), Path("reports/reconstructions.png")


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


def main(stage: Stage) -> None:
    p = stage.params
    metrics = read_json(METRICS)["uploads"]
    per_image = pd.read_csv(PER_IMAGE)
    rows, panels = [], []
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
            "gh": measured["gh"], "repetition_rate": measured["repetition_rate"], "gir_max": measured["gir_max"],
            "ra_index": measured["ra_index"], "labels": rec_meta["labels_method"], "label_accuracy": m["label_accuracy"],
            "psnr": m["psnr"]["mean"], "psnr_std": m["psnr"]["std"], "ssim": m["ssim"]["mean"], "mse": m["mse"]["mean"],
            "grad_loss": rec_meta["grad_loss"], "iterations": rec_meta["iterations"],
        })
        mine = per_image[(per_image.setting == setting) & (per_image.upload == name)].sort_values("image")
        panels.append((
            f"{setting} epoch {m['epoch']}: GH " + ("n/a" if measured["gh"] is None else f"{measured['gh']:.3f}") + ", "
            f"PSNR {m['psnr']['mean']:.1f} dB, SSIM {m['ssim']['mean']:.2f}",
            truth_u8.float() / 255, rec["images"][mine["reconstruction"].tolist()],
        ))
    table = pd.DataFrame(rows)
    training = training_table(list(p.schemes))
    with atomic_file(RESULTS_CSV) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_file(TRAINING_CSV) as tmp:
        training.to_csv(tmp, index=False)
    with atomic_file(RESULTS_MD) as tmp:
        tmp.write_text(
            "# Results\n\nOne row per client setting x training epoch; GH = 1 - cos(upload, the single-step "
            "full-batch sync-BN gradient the attacker models); PSNR/SSIM after Hungarian pairing.\n\n"
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
    overview_figure(FIGURE, panels, columns=len(p.extract.epochs))
    print(markdown_table(table))
    for path in (RESULTS_CSV, RESULTS_MD, TRAINING_CSV, FIGURE):
        stage.mlflow.log_artifact(str(path))


if __name__ == "__main__":
    run("report", main, reads=("extract", "client", "settings", "attack"))
