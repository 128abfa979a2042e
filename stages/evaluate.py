"""evaluate: pair each reconstruction with a true image (Hungarian) and score it, for every setting
and attacker (the adaptive one's in attacks/<setting>/, the classic one's in attacks/<setting>/classic/).

Image identifiability (IIP) asks whether a reconstruction's nearest image by MSE, among the whole
victim pool and as many of the attacker's own images (the first of its split), is its true one:
a success measure without a PSNR threshold. Only this stage reads the truth and the victim pool."""

from pathlib import Path

import pandas as pd

from pipeline.errors import PipelineError
from pipeline.evaluation import SCORES, evaluate_upload, identification_pool, score_summary
from pipeline.files import atomic_file, write_json
from pipeline.metrics import Lpips
from pipeline.uploads import ADAPTIVE, CLASSIC
from stages._common import Stage, run

ATTACKS, TRUTH, DATA = Path("attacks"), Path("truth"), Path("data/prepared")
METRICS, PER_IMAGE = Path("reports/metrics.json"), Path("reports/per_image.csv")


def main(stage: Stage) -> None:
    reconstructions = [(path, ADAPTIVE) for path in sorted(ATTACKS.glob("*/*.safetensors"))]
    reconstructions += [(path, CLASSIC) for path in sorted(ATTACKS.glob(f"*/{CLASSIC}/*.safetensors"))]
    if not reconstructions:
        raise PipelineError(f"{ATTACKS}: no reconstructions to evaluate (run the attack stages first)")
    lpips, pool = Lpips(stage.params.evaluate.lpips_backbone), identification_pool(DATA)
    if not lpips.available:
        print(f"evaluate: {lpips.reason}")
    stage.mlflow.set_tag("lpips", "computed" if lpips.available else lpips.reason)
    rows, summary, classic = [], {}, {}
    for path, attacker in reconstructions:
        upload_rows, upload = evaluate_upload(path, TRUTH, lpips, pool, attacker)
        rows += upload_rows
        key = f"{upload['setting']}/{path.stem}"
        (summary if attacker == ADAPTIVE else classic)[key] = upload
        shown = "n/a" if upload["lpips"] is None else f"{upload['lpips']['mean']:.3f}"
        who = "" if attacker == ADAPTIVE else " (classic attacker)"
        print(
            f"evaluate: {key}{who}: PSNR {upload['psnr']['mean']:.2f} dB, SSIM {upload['ssim']['mean']:.3f}, "
            f"LPIPS {shown}, labels {upload['label_accuracy']:.2f}"
        )
    per_image = pd.DataFrame(rows)
    adaptive = per_image[per_image.attacker == ADAPTIVE]
    metrics = {"uploads": summary, "classic": classic, "all": {k: score_summary(adaptive[k]) for k in SCORES}}
    with atomic_file(PER_IMAGE) as tmp:
        per_image.to_csv(tmp, index=False)
    write_json(METRICS, metrics)
    # step = the checkpoint's optimizer step: the UI plots each metric through training, the mean over a
    # cell's images
    for (setting, at, step), cell in adaptive.groupby(["setting", "checkpoint", "step"], sort=False):
        stage.mlflow.log_metrics(
            {f"{k}.{setting}": float(cell[k].mean()) for k in SCORES if cell[k].notna().any()}, step=int(step)
        )
        uploads = [s for s in summary.values() if s["setting"] == setting and s["checkpoint"] == at]
        stage.mlflow.log_metric(
            f"label_accuracy.{setting}", sum(s["label_accuracy"] for s in uploads) / len(uploads), step=int(step)
        )
    classic_images = per_image[per_image.attacker == CLASSIC]
    for (setting, step), cell in classic_images.groupby(["setting", "step"], sort=False):
        stage.mlflow.log_metric(f"classic.psnr.{setting}", float(cell.psnr.mean()), step=int(step))
    stage.mlflow.log_metrics({k: v["mean"] for k, v in metrics["all"].items() if v})
    stage.mlflow.log_artifact(str(METRICS))
    stage.mlflow.log_artifact(str(PER_IMAGE))


if __name__ == "__main__":
    run("evaluate", main, reads=("evaluate",))
