"""End to end: the real `dvc repro` on a tiny configuration in a temporary copy of the project."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import RAW_PARAMS, REPO

pytestmark = pytest.mark.slow

STAGES = {"prepare", "train", "extract", "attack", "evaluate", "report"}
PROJECT_FILES = ["pipeline", "stages", "params.yaml", "dvc.yaml", ".dvc/config", ".dvcignore", ".gitignore", "pyproject.toml"]


def tiny_params() -> dict:
    params = json.loads(json.dumps(RAW_PARAMS))
    params["data"].update(train_size=512, test_size=256, victims_per_class=1)
    params["train"].update(epochs=1, batch_size=64)
    params["extract"].update(epochs=[0, 1], batch_size=1, mode="eval")
    params["attack"].update(iterations=40, labels="known")
    return params


def sh(args, cwd, env, check=True):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and done.returncode:
        raise AssertionError(f"{args} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="module")
def project(tmp_path_factory, fashion_root):
    root = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        src, dst = REPO / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", DVC_NO_ANALYTICS="1", PYTHONPATH=str(root))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    sh(git + ["init", "-q"], root, env)
    sh(git + ["add", "-A"], root, env)
    sh(git + ["commit", "-qm", "tiny project"], root, env)
    first = sh([sys.executable, "-m", "dvc", "repro"], root, env)
    return root, env, first


def test_repro_writes_metrics_from_a_real_chain(project):
    root, _, first = project
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert set(metrics["uploads"]) == {"epoch-000", "epoch-001"}
    for upload in metrics["uploads"].values():
        assert upload["label_accuracy"] == 1.0  # known labels
        assert 5 < upload["psnr"]["mean"] < 60 and 0 < upload["ssim"]["mean"] <= 1
    table = (root / "reports/results.md").read_text()
    assert "| pure" in table and (root / "reports/reconstructions.png").stat().st_size > 1000
    # the attacker's inputs hold no ground truth
    upload_meta = json.loads((root / "uploads/epoch-000.json").read_text())
    assert upload_meta["kind"] == "upload" and "images" not in upload_meta


def test_mlflow_holds_one_run_per_stage_with_its_artifacts(project):
    root, env, _ = project
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["gradient-heterogeneity"])
    assert sorted(runs["tags.dvc.stage"]) == sorted(STAGES)
    assert set(runs["tags.git.commit"]) == {sh(["git", "rev-parse", "HEAD"], root, env).stdout.strip()}
    client = MlflowClient(uri)
    by_stage = dict(zip(runs["tags.dvc.stage"], runs["run_id"]))

    def files(stage, folder=""):
        return {Path(a.path).name for a in client.list_artifacts(by_stage[stage], folder)}

    assert {"epoch-000.safetensors", "epoch-001.safetensors", "epoch-001.json"} <= files("train", "checkpoints")
    assert {"epoch-000.safetensors", "epoch-001.safetensors"} <= files("extract", "uploads")
    assert {"epoch-000.png", "epoch-000.safetensors"} <= files("attack", "reconstructions")
    assert {"metrics.json", "per_image.csv"} <= files("evaluate")
    assert {"results.md", "results.csv", "reconstructions.png"} <= files("report")
    train = runs[runs["tags.dvc.stage"] == "train"].iloc[0]
    assert 0 <= train["metrics.test_accuracy"] <= 1
    evaluate = runs[runs["tags.dvc.stage"] == "evaluate"].iloc[0]
    assert evaluate["metrics.psnr"] > 5
    assert (root / "mlruns").is_dir()  # artifacts beside the store, at the project root


def test_second_repro_runs_nothing_and_force_gives_the_same_lock(project):
    root, env, _ = project
    status = sh([sys.executable, "-m", "dvc", "status"], root, env)
    assert "up to date" in status.stdout, status.stdout
    again = sh([sys.executable, "-m", "dvc", "repro"], root, env)
    assert "Running stage" not in again.stdout
    lock = (root / "dvc.lock").read_text()
    sh([sys.executable, "-m", "dvc", "repro", "--force"], root, env)
    assert (root / "dvc.lock").read_text() == lock  # every output byte-identical
