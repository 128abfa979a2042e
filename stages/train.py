"""train@<scheme>: the model under one defense scheme, a weights-only checkpoint every epoch
and after each of `train.checkpoint_steps` optimizer steps.

A killed run resumes from its last finished epoch: the temporary output is fingerprinted by the
data, the parameters and the code, and kept for the next run with the same fingerprint.
With several processes, the first one owns the output; the others train beside it.
"""

from pathlib import Path

from pipeline.checkpoints import checkpoint_label
from pipeline.data import load_split
from pipeline.files import atomic_dir, digest, partial_path, tree_digest, write_json
from pipeline.parallel import is_first_process, resolve_accelerator
from pipeline.rank_analysis import model_ra_index, ra_maxpool_kernel, rank_analysis
from stages._common import Stage, code_digest, run

DATA = Path("data/prepared")


def maxpool_kernel(stage: Stage, meta: dict) -> int | None:
    """The scheme's maxpool kernel; "auto" is the smallest giving the model a positive RA-i here."""
    kernel = stage.params.scheme(stage.scheme).maxpool_kernel
    if kernel == "auto":
        kernel = ra_maxpool_kernel(stage.params.model.arch, meta["channels"], len(meta["classes"]), meta["image_size"])
        print(f"train: RA maxpool kernel {kernel} (the smallest with RA-i > 0 at {meta['image_size']} px)")
    return kernel


def write_rank_analysis(folder: Path, model_meta: dict) -> dict:
    from pipeline.checkpoints import model_from_meta

    model = model_from_meta(model_meta)
    units = rank_analysis(model, model_meta["arch"], model_meta["in_channels"], model_meta["image_size"])
    result = {"ra_index": model_ra_index(units), "units": [vars(u) for u in units]}
    write_json(folder / "rank_analysis.json", result)
    return result


def main(stage: Stage) -> None:
    from lightning.pytorch.loggers import MLFlowLogger

    from pipeline.train import train

    p, scheme = stage.params, stage.scheme
    resolve_accelerator(p.train.accelerator, "train.accelerator", p.train.devices)  # refused before any work
    out = Path("models") / scheme
    train_split, meta = load_split(DATA, "train")
    test_split, _ = load_split(DATA, "test")
    kernel = maxpool_kernel(stage, meta)
    if not is_first_process():  # train beside the first process, which owns the output
        train(train_split, test_split, meta, p, scheme, partial_path(out), kernel)
        return
    logger = MLFlowLogger(tracking_uri=stage.tracking_uri, run_id=stage.mlflow.active_run().info.run_id)
    inputs = digest(
        p.seed,
        p.model.model_dump(),
        p.train.model_dump(),
        p.scheme(scheme).model_dump(),
        tree_digest(DATA),
        code_digest("stages.train"),
    )
    with atomic_dir(out, fingerprint=inputs) as tmp:
        written = train(train_split, test_split, meta, p, scheme, tmp, kernel, logger=logger)
        ranks = write_rank_analysis(tmp, written[0])
    for ckpt in written:
        extra = f", epsilon {ckpt['epsilon']:.3f}" if "epsilon" in ckpt else ""
        label = checkpoint_label(ckpt["checkpoint"])
        where = label if ckpt["epoch"] is None else f"{label} (step {ckpt['step']})"
        print(f"train@{scheme}: {where}: test accuracy {ckpt['test_accuracy']:.4f}{extra}")
        scores = {k: ckpt[k] for k in ("test_accuracy", "epsilon") if k in ckpt}
        stage.mlflow.log_metrics({f"checkpoint.{k}": v for k, v in scores.items()}, step=ckpt["step"])
        if ckpt["epoch"] is not None:  # step = training epoch (Lightning's own test_accuracy: optimizer steps)
            stage.mlflow.log_metrics({f"epoch.{k}": v for k, v in scores.items()}, step=ckpt["epoch"])
    stage.mlflow.log_metric("ra_index", ranks["ra_index"])
    stage.mlflow.log_artifacts(str(out), "checkpoints")


if __name__ == "__main__":
    run("train", main, reads=("seed", "model", "train", "schemes.{scheme}"))
