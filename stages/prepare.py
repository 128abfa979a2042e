"""prepare: the dataset as a deterministic split, its normalisation and a pool of victims."""

import tempfile
from pathlib import Path

from pipeline.data import prepare, save_prepared
from pipeline.files import atomic_dir
from pipeline.images import ImageIndex
from pipeline.report import save_grid
from stages._common import Stage, run

OUT = Path("data/prepared")


def main(stage: Stage) -> None:
    p, mlflow = stage.params, stage.mlflow
    data = prepare(p.data, p.seed)
    with atomic_dir(OUT) as tmp:
        save_prepared(tmp, data, p.data.source)
    streamed = " (streamed from the files: an index written)" if isinstance(data.train, ImageIndex) else ""
    print(
        f"prepare: {len(data.train.labels)} train, {len(data.test.labels)} test, {len(data.victims.labels)} victims, "
        f"{len(data.classes)} classes, {tuple(data.victims.images.shape[1:])}{streamed} -> {OUT}"
    )
    if data.converted:
        mode = "RGB" if data.victims.images.shape[1] == 3 else "L"
        found = ", ".join(f"{n} {m}" for m, n in data.converted.items())
        print(f"prepare: converted to {mode}: {found} image(s)")
        mlflow.log_metrics({f"converted.{m}": n for m, n in data.converted.items()})
    mlflow.log_metrics({"train_size": len(data.train.labels), "test_size": len(data.test.labels)})
    mlflow.log_dict(
        {"classes": data.classes, "mean": data.mean, "std": data.std, "converted": data.converted}, "data.json"
    )
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp) / "victims.png"
        save_grid(grid, [data.victims.images.float() / 255])
        mlflow.log_artifact(str(grid))


if __name__ == "__main__":
    run("prepare", main, reads=("seed", "data"))
