"""attack@<setting>: rebuild each upload's images from its gradient alone (the truth is never read).

A killed attack resumes: reconstructions finished before the kill are kept (the temporary
output is fingerprinted by the parameters and the uploads) and only the rest are attacked.
"""

from pathlib import Path

from pipeline.attack import AttackSettings, invert, recover_labels
from pipeline.checkpoints import ARCH_KEYS, load_checkpoint
from pipeline.config import AttackParams
from pipeline.data import to_unit_range
from pipeline.errors import PipelineError
from pipeline.files import atomic_dir, digest, save_tensors, tree_digest
from pipeline.nets import classifier_weight_name
from pipeline.report import save_grid
from pipeline.uploads import check_fits, load_upload
from stages._common import Stage, code_digest, run


def attack_upload(path: Path, out: Path, a: AttackParams, seed: int, mlflow) -> None:
    upload = load_upload(path)
    tm = upload.threat_model
    # The attacker rebuilds exactly the client's model (maxpool kernel, GroupNorm...) from the threat model.
    arch = {k: tm[k] for k in ARCH_KEYS}
    model, _ = load_checkpoint(Path(tm["checkpoint"]), expect={"sha256": tm["checkpoint_sha256"], **arch})
    check_fits(path, upload, model)
    model.train(tm["mode"] == "train")
    labels = recover_labels(a.labels, upload.gradients[classifier_weight_name(model)], tm["batch_size"], upload.labels)
    print(f"attack@{tm['setting']}: {path.name}: labels {labels.tolist()} ({a.labels})")
    settings = AttackSettings(
        iterations=a.iterations, lr=a.lr, lr_min=a.lr_min, tv_weight=a.tv_weight, restarts=a.restarts, seed=seed
    )
    shape = (tm["in_channels"], tm["image_size"], tm["image_size"])
    rec = invert(model, upload.gradients, labels, shape, tm["mean"], tm["std"], settings)
    images = to_unit_range(rec.images, tm["mean"], tm["std"])
    meta = {
        "upload": path.name, "epoch": tm["epoch"], "scheme": tm["scheme"], "setting": tm["setting"], "labels_method": a.labels,
        "grad_loss": round(rec.grad_loss, 6), "restart": rec.restart, "iterations": a.iterations, "note": rec.note,
    }
    save_grid((out / path.name).with_suffix(".png"), [images])
    save_tensors(out / path.name, {"images": images, "labels": labels}, meta)  # its JSON, last, marks it done
    for iteration, loss in rec.curve:
        mlflow.log_metric(f"grad_loss.epoch_{tm['epoch']}", loss, step=iteration)
    mlflow.log_metric("best_grad_loss", rec.grad_loss, step=tm["epoch"])
    print(f"attack@{tm['setting']}: {path.name}: " + (rec.note or f"lowest 1 - cosine {rec.grad_loss:.4f} (restart {rec.restart})"))


def main(stage: Stage) -> None:
    p = stage.params
    folder, out_folder = Path("uploads") / stage.setting, Path("attacks") / stage.setting
    uploads = sorted(folder.glob("*.safetensors"))
    if not uploads:
        raise PipelineError(f"{folder}: no uploads to attack (run extract@{stage.setting} first)")
    inputs = digest(p.seed, p.attack.model_dump(), tree_digest(folder), code_digest())
    with atomic_dir(out_folder, fingerprint=inputs) as out:
        for path in uploads:
            if (out / path.name).with_suffix(".json").is_file():
                print(f"attack@{stage.setting}: {path.name}: kept from the interrupted run")
                continue
            attack_upload(path, out, p.attack, p.seed, stage.mlflow)
    stage.mlflow.log_artifacts(str(out_folder), "reconstructions")


if __name__ == "__main__":
    run("attack", main, reads=("seed", "attack", "settings.{setting}"))
