"""report: the results table (CSV and Markdown) and the truth-over-reconstruction figure."""

from pathlib import Path

import pandas as pd

from pipeline.files import atomic_file, load_tensors, read_json
from pipeline.report import markdown_table, overview_figure
from pipeline.uploads import load_truth
from stages._common import Stage, run

ATTACKS, TRUTH = Path("attacks"), Path("truth")
METRICS, PER_IMAGE = Path("reports/metrics.json"), Path("reports/per_image.csv")
RESULTS_CSV, RESULTS_MD, FIGURE = Path("reports/results.csv"), Path("reports/results.md"), Path("reports/reconstructions.png")


def main(stage: Stage) -> None:
    p = stage.params
    metrics = read_json(METRICS)["uploads"]
    per_image = pd.read_csv(PER_IMAGE)
    rows, panels = [], []
    for name, m in sorted(metrics.items(), key=lambda kv: kv[1]["epoch"]):
        checkpoint = read_json(Path("models") / p.train.scheme / f"{name}.json")
        rec, rec_meta = load_tensors(ATTACKS / f"{name}.safetensors", expected={"images", "labels"})
        truth_u8, _, _ = load_truth(TRUTH / f"{name}.safetensors")
        rows.append({
            "scheme": checkpoint["scheme"], "arch": checkpoint["arch"], "epoch": m["epoch"],
            "test_accuracy": checkpoint["test_accuracy"], "batch_size": len(truth_u8), "client_mode": p.extract.mode,
            "labels": rec_meta["labels_method"], "label_accuracy": m["label_accuracy"],
            "psnr": m["psnr"]["mean"], "psnr_std": m["psnr"]["std"], "ssim": m["ssim"]["mean"], "mse": m["mse"]["mean"],
            "grad_loss": rec_meta["grad_loss"], "iterations": rec_meta["iterations"],
        })
        order = per_image[per_image.upload == name].sort_values("image")["reconstruction"].tolist()
        panels.append((
            f"{checkpoint['scheme']} epoch {m['epoch']}: PSNR {m['psnr']['mean']:.1f} dB, SSIM {m['ssim']['mean']:.2f}",
            truth_u8.float() / 255, rec["images"][order],
        ))
    table = pd.DataFrame(rows)
    with atomic_file(RESULTS_CSV) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_file(RESULTS_MD) as tmp:
        tmp.write_text("# Results\n\nOne row per training epoch x upload; PSNR/SSIM after Hungarian pairing.\n\n"
                       + markdown_table(table))
    overview_figure(FIGURE, panels)
    print(markdown_table(table))
    for path in (RESULTS_CSV, RESULTS_MD, FIGURE):
        stage.mlflow.log_artifact(str(path))


if __name__ == "__main__":
    run("report", main, reads=("train.scheme", "extract.mode"))
