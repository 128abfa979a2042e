"""evaluate: pair each reconstruction with a true image (Hungarian) and score it, for every setting
and attacker (the adaptive one's in attacks/<setting>/, the classic one's in attacks/<setting>/classic/).

Image identifiability (IIP) asks whether a reconstruction's nearest image by MSE, among the whole
victim pool and as many of the attacker's own images (the first of its split), is its true one:
a success measure without a PSNR threshold. Only this stage reads the truth and the victim pool."""

from pathlib import Path

import pandas as pd
import torch

from pipeline.data import images_at, in_memory, load_split
from pipeline.errors import PipelineError
from pipeline.files import atomic_file, load_tensors, write_json
from pipeline.metrics import Lpips, identified, image_metrics, label_accuracy, pair_by_hungarian
from pipeline.uploads import ADAPTIVE, CLASSIC, load_truth
from stages._common import Stage, run

ATTACKS, TRUTH, DATA = Path("attacks"), Path("truth"), Path("data/prepared")
METRICS, PER_IMAGE = Path("reports/metrics.json"), Path("reports/per_image.csv")
SCORES = ("psnr", "ssim", "mse", "lpips", "iip")


def _stats(values) -> dict[str, float] | None:
    if values.isna().all():  # LPIPS without its backbone weights
        return None
    return {"mean": round(float(values.mean()), 6), "std": round(float(values.std(ddof=0)), 6)}


def identification_pool(data: Path = DATA) -> torch.Tensor:
    """The images a reconstruction is identified among ([0, 1]): the victim pool's, in its order
    (row = victim position), then as many of the attacker's own."""
    victims = in_memory(load_split(data, "victims")[0], data / "victims.safetensors").images
    own, _ = load_split(data, "attacker")
    count = min(len(victims), len(own.labels))
    others = images_at(own, torch.arange(count))
    return torch.cat([victims, others]).float() / 255


def evaluate_upload(path: Path, lpips: Lpips, pool: torch.Tensor, attacker: str = ADAPTIVE) -> tuple[list[dict], dict]:
    """Per-image rows and the upload's summary for one reconstruction file; `pool`: the
    identification candidates (identification_pool)."""
    setting = path.parent.name if attacker == ADAPTIVE else path.parent.parent.name
    rec, meta = load_tensors(path, expected={"images", "labels"})
    truth_u8, truth_labels, truth_meta = load_truth(TRUTH / setting / path.name)
    truth = truth_u8.float() / 255
    if rec["images"].shape != truth.shape:
        raise PipelineError(f"{path}: reconstruction shape {tuple(rec['images'].shape)} != truth {tuple(truth.shape)}")
    order = pair_by_hungarian(rec["images"], truth)
    paired = rec["images"][order]
    scores = image_metrics(paired, truth)
    scores["lpips"] = lpips(paired, truth) if lpips.available else torch.full((len(truth),), float("nan"))
    scores["iip"] = identified(paired, torch.as_tensor(truth_meta["victim_positions"]), pool).double()
    rows = [
        {
            "setting": setting,
            "attacker": attacker,
            "scheme": meta["scheme"],
            "upload": path.stem,
            "epoch": meta["epoch"],
            "trial": meta["trial"],
            "image": i,
            "victim": truth_meta["victim_positions"][i],
            "true_label": int(truth_labels[i]),
            "gir": truth_meta["gir"][i],
            "reconstruction": int(order[i]),
            "converged": meta["converged"],
            **{k: round(float(v[i]), 6) for k, v in scores.items()},
        }
        for i in range(len(truth))
    ]
    frame = pd.DataFrame(rows)
    summary = {
        "setting": setting,
        "scheme": meta["scheme"],
        "epoch": meta["epoch"],
        "trial": meta["trial"],
        "converged": meta["converged"],
        "label_accuracy": label_accuracy(rec["labels"], truth_labels),
        **{k: _stats(frame[k]) for k in SCORES},
    }
    return rows, summary


def main(stage: Stage) -> None:
    reconstructions = [(path, ADAPTIVE) for path in sorted(ATTACKS.glob("*/*.safetensors"))]
    reconstructions += [(path, CLASSIC) for path in sorted(ATTACKS.glob(f"*/{CLASSIC}/*.safetensors"))]
    if not reconstructions:
        raise PipelineError(f"{ATTACKS}: no reconstructions to evaluate (run the attack stages first)")
    lpips, pool = Lpips(stage.params.evaluate.lpips_backbone), identification_pool()
    if not lpips.available:
        print(f"evaluate: {lpips.reason}")
    stage.mlflow.set_tag("lpips", "computed" if lpips.available else lpips.reason)
    rows, summary, classic = [], {}, {}
    for path, attacker in reconstructions:
        upload_rows, upload = evaluate_upload(path, lpips, pool, attacker)
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
    metrics = {"uploads": summary, "classic": classic, "all": {k: _stats(adaptive[k]) for k in SCORES}}
    with atomic_file(PER_IMAGE) as tmp:
        per_image.to_csv(tmp, index=False)
    write_json(METRICS, metrics)
    # step = training epoch: the UI plots each metric through training, the mean over a cell's images
    for (setting, epoch), cell in adaptive.groupby(["setting", "epoch"], sort=False):
        stage.mlflow.log_metrics(
            {f"{k}.{setting}": float(cell[k].mean()) for k in SCORES if cell[k].notna().any()}, step=int(epoch)
        )
        uploads = [s for s in summary.values() if s["setting"] == setting and s["epoch"] == epoch]
        stage.mlflow.log_metric(
            f"label_accuracy.{setting}", sum(s["label_accuracy"] for s in uploads) / len(uploads), step=int(epoch)
        )
    for (setting, epoch), cell in per_image[per_image.attacker == CLASSIC].groupby(["setting", "epoch"], sort=False):
        stage.mlflow.log_metric(f"classic.psnr.{setting}", float(cell.psnr.mean()), step=int(epoch))
    stage.mlflow.log_metrics({k: v["mean"] for k, v in metrics["all"].items() if v})
    stage.mlflow.log_artifact(str(METRICS))
    stage.mlflow.log_artifact(str(PER_IMAGE))


if __name__ == "__main__":
    run("evaluate", main, reads=("evaluate",))
