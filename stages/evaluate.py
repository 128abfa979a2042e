"""evaluate: pair each reconstruction with a true image (Hungarian) and score it, for every setting."""

from pathlib import Path

import pandas as pd

from pipeline.errors import PipelineError
from pipeline.files import atomic_file, load_tensors, write_json
from pipeline.metrics import image_metrics, label_accuracy, pair_by_hungarian
from pipeline.uploads import load_truth
from stages._common import Stage, run

ATTACKS, TRUTH = Path("attacks"), Path("truth")
METRICS, PER_IMAGE = Path("reports/metrics.json"), Path("reports/per_image.csv")
SCORES = ("psnr", "ssim", "mse")


def _stats(values) -> dict[str, float]:
    return {"mean": round(float(values.mean()), 6), "std": round(float(values.std(ddof=0)), 6)}


def evaluate_upload(path: Path) -> tuple[list[dict], dict]:
    """Per-image rows and the upload's summary for one reconstruction file."""
    setting = path.parent.name
    rec, meta = load_tensors(path, expected={"images", "labels"})
    truth_u8, truth_labels, truth_meta = load_truth(TRUTH / setting / path.name)
    truth = truth_u8.float() / 255
    if rec["images"].shape != truth.shape:
        raise PipelineError(f"{path}: reconstruction shape {tuple(rec['images'].shape)} != truth {tuple(truth.shape)}")
    order = pair_by_hungarian(rec["images"], truth)
    scores = image_metrics(rec["images"][order], truth)
    rows = [
        {"setting": setting, "scheme": meta["scheme"], "upload": path.stem, "epoch": meta["epoch"], "image": i,
         "true_label": int(truth_labels[i]), "gir": truth_meta["gir"][i], "reconstruction": int(order[i]),
         **{k: round(float(v[i]), 6) for k, v in scores.items()}}
        for i in range(len(truth))
    ]
    frame = pd.DataFrame(rows)
    summary = {"setting": setting, "scheme": meta["scheme"], "epoch": meta["epoch"], "label_accuracy": label_accuracy(rec["labels"], truth_labels),
               **{k: _stats(frame[k]) for k in SCORES}}
    return rows, summary


def main(stage: Stage) -> None:
    reconstructions = sorted(ATTACKS.glob("*/*.safetensors"))
    if not reconstructions:
        raise PipelineError(f"{ATTACKS}: no reconstructions to evaluate (run the attack stages first)")
    rows, summary = [], {}
    for path in reconstructions:
        upload_rows, upload = evaluate_upload(path)
        rows += upload_rows
        key = f"{upload['setting']}/{path.stem}"
        summary[key] = upload
        print(f"evaluate: {key}: PSNR {upload['psnr']['mean']:.2f} dB, SSIM {upload['ssim']['mean']:.3f}, "
              f"labels {upload['label_accuracy']:.2f}")
    per_image = pd.DataFrame(rows)
    metrics = {"uploads": summary, "all": {k: _stats(per_image[k]) for k in SCORES}}
    with atomic_file(PER_IMAGE) as tmp:
        per_image.to_csv(tmp, index=False)
    write_json(METRICS, metrics)
    for s in summary.values():  # step = training epoch: the UI plots each metric through training
        setting = s["setting"]
        stage.mlflow.log_metrics({f"{k}.{setting}": s[k]["mean"] for k in SCORES}, step=s["epoch"])
        stage.mlflow.log_metric(f"label_accuracy.{setting}", s["label_accuracy"], step=s["epoch"])
    stage.mlflow.log_metrics({k: metrics["all"][k]["mean"] for k in SCORES})
    stage.mlflow.log_artifact(str(METRICS))
    stage.mlflow.log_artifact(str(PER_IMAGE))


if __name__ == "__main__":
    run("evaluate", main, reads=("extract", "attack"))
