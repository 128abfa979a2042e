"""train: the model under the scheme, a weights-only checkpoint before training and every epoch."""

from pathlib import Path

from pipeline.data import load_split
from pipeline.files import atomic_dir
from stages._common import Stage, run

DATA = Path("data/prepared")


def main(stage: Stage) -> None:
    from lightning.pytorch.loggers import MLFlowLogger

    from pipeline.train import train

    p = stage.params
    out = Path("models") / p.train.scheme
    train_split, meta = load_split(DATA, "train")
    test_split, _ = load_split(DATA, "test")
    with stage.track({"seed": p.seed, "model": p.model.model_dump(), "train": p.train.model_dump()},
                     scheme=p.train.scheme) as mlflow:
        logger = MLFlowLogger(tracking_uri=stage.tracking_uri, run_id=mlflow.active_run().info.run_id)
        with atomic_dir(out) as tmp:
            written = train(train_split, test_split, meta, p, tmp, logger=logger)
        for ckpt in written:
            print(f"train: epoch {ckpt['epoch']}: test accuracy {ckpt['test_accuracy']:.4f}")
        mlflow.log_artifacts(str(out), "checkpoints")


if __name__ == "__main__":
    run("train", main)
