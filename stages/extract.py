"""extract@<scheme>: the update one client uploads at each listed checkpoint, the ground truth apart."""

from pathlib import Path

from pipeline.checkpoints import ARCH_KEYS, checkpoint_name, load_checkpoint
from pipeline.client import batch_gradient, check_batchnorm_batch, choose_batch
from pipeline.data import load_split, normalise
from pipeline.files import atomic_dir
from pipeline.uploads import Upload, save_truth, save_upload
from stages._common import Stage, run

DATA = Path("data/prepared")


def main(stage: Stage) -> None:
    p, scheme = stage.params, stage.scheme
    victims, meta = load_split(DATA, "victims")
    chosen = choose_batch(len(victims.labels), p.extract.batch_size, p.seed)
    images, labels = victims.images[chosen], victims.labels[chosen]
    inputs = normalise(images, meta["mean"], meta["std"])
    norms = {}
    with atomic_dir(Path("uploads") / scheme) as uploads, atomic_dir(Path("truth") / scheme) as truth:
        for epoch in p.extract.epochs:
            path = Path("models") / scheme / checkpoint_name(epoch)
            model, ckpt = load_checkpoint(path)
            check_batchnorm_batch(model, p.extract.batch_size, p.extract.mode, ckpt["in_channels"], ckpt["image_size"])
            gradients = batch_gradient(model, inputs, labels, p.extract.mode)
            threat_model = {  # what the server knows: the exact architecture, the weights, the client's setup
                **{k: ckpt[k] for k in (*ARCH_KEYS, "mean", "std", "scheme", "epoch")},
                "checkpoint": path.as_posix(),
                "checkpoint_sha256": ckpt["sha256"],
                "batch_size": p.extract.batch_size,
                "mode": p.extract.mode,
                "labels": labels.tolist() if p.extract.reveal_labels else None,
            }
            name = checkpoint_name(epoch)
            save_upload(uploads / name, Upload(gradients, threat_model))
            save_truth(truth / name, images, labels, {"epoch": epoch, "victim_positions": chosen.tolist()})
            norms[epoch] = float(sum(g.pow(2).sum() for g in gradients.values()) ** 0.5)
            print(f"extract@{scheme}: epoch {epoch}: upload of {len(labels)} images, gradient norm {norms[epoch]:.4g}")
    for epoch, norm in norms.items():
        stage.mlflow.log_metric("gradient_norm", norm, step=epoch)
    stage.mlflow.log_artifacts(str(Path("uploads") / scheme), "uploads")


if __name__ == "__main__":
    run("extract", main, reads=("seed", "extract", "schemes.{scheme}"))
