"""train: the model under the scheme, a weights-only checkpoint before training and every epoch.

A killed run resumes from its last epoch: the temporary output is fingerprinted by the
data, the parameters and the code, and kept for the next run with the same fingerprint.
"""

from pathlib import Path

from pipeline.data import load_split
from pipeline.files import atomic_dir, digest, tree_digest
from stages._common import Stage, code_digest, run

DATA = Path("data/prepared")


def main(stage: Stage) -> None:
    from lightning.pytorch.loggers import MLFlowLogger

    from pipeline.train import train

    p = stage.params
    out = Path("models") / p.train.scheme
    train_split, meta = load_split(DATA, "train")
    test_split, _ = load_split(DATA, "test")
    logger = MLFlowLogger(tracking_uri=stage.tracking_uri, run_id=stage.mlflow.active_run().info.run_id)
    inputs = digest(p.seed, p.model.model_dump(), p.train.model_dump(), tree_digest(DATA), code_digest())
    with atomic_dir(out, fingerprint=inputs) as tmp:
        written = train(train_split, test_split, meta, p, tmp, logger=logger)
    for ckpt in written:
        print(f"train: epoch {ckpt['epoch']}: test accuracy {ckpt['test_accuracy']:.4f}")
    stage.mlflow.log_artifacts(str(out), "checkpoints")


if __name__ == "__main__":
    run("train", main, reads=("seed", "model", "train"))
