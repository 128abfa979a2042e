"""prepare: the dataset as a deterministic split, its normalisation and a pool of victims."""

import tempfile
from pathlib import Path

from pipeline.data import prepare, save_prepared
from pipeline.files import atomic_dir
from pipeline.report import save_grid
from stages._common import Stage, run

OUT = Path("data/prepared")


def main(stage: Stage) -> None:
    p, mlflow = stage.params, stage.mlflow
    data = prepare(p.data, p.seed)
    with atomic_dir(OUT) as tmp:
        save_prepared(tmp, data, p.data.source)
    print(
        f"prepare: {len(data.train.labels)} train, {len(data.test.labels)} test, {len(data.victims.labels)} victims, "
        f"{len(data.classes)} classes, {tuple(data.train.images.shape[1:])} -> {OUT}"
    )
    mlflow.log_metrics({"train_size": len(data.train.labels), "test_size": len(data.test.labels)})
    mlflow.log_dict({"classes": data.classes, "mean": data.mean, "std": data.std}, "data.json")
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp) / "victims.png"
        save_grid(grid, [data.victims.images.float() / 255])
        mlflow.log_artifact(str(grid))


if __name__ == "__main__":
    run("prepare", main, reads=("seed", "data"))
