"""End to end: the real `dvc repro` on the tiny profile in a temporary copy of the project.

Also: stages killed by a signal part-way, and the next `dvc repro` finishing with the same
bytes as the uninterrupted run.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow

SCHEMES = ("pure", "ra", "dp-sgd", "clip-noise", "gh")
SETTINGS = (*SCHEMES, "async-bn", "local-steps", "client-dp", "label-repeat")
STAGES = {"prepare", "evaluate", "report", *(f"train@{k}" for k in SCHEMES),
          *(f"{s}@{k}" for s in ("extract", "attack") for k in SETTINGS)}
PROJECT_FILES = ["pipeline", "stages", "tools", "profiles", "params.yaml", "dvc.yaml", ".dvc/config", ".dvcignore",
                 ".gitignore", "pyproject.toml"]


def sh(args, cwd, env, check=True):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and done.returncode:
        raise AssertionError(f"{args} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def copy_project(root: Path) -> dict:
    """The project's files in `root`, the tiny profile applied, committed; returns the environment to run in."""
    for name in PROJECT_FILES:
        src, dst = REPO / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", DVC_NO_ANALYTICS="1", PYTHONPATH=str(root))
    sh([sys.executable, "-m", "tools.apply_profile", "profiles/tiny.yaml"], root, env)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    sh(git + ["init", "-q"], root, env)
    sh(git + ["add", "-A"], root, env)
    sh(git + ["commit", "-qm", "tiny project"], root, env)
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory, fashion_root):
    root = tmp_path_factory.mktemp("project")
    env = copy_project(root)
    first = sh([sys.executable, "-m", "dvc", "repro"], root, env)
    return root, env, first, (root / "dvc.lock").read_text()


def test_repro_writes_metrics_from_a_real_chain(project):
    root, _, first, _ = project
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert set(metrics["uploads"]) == {f"{k}/epoch-00{e}" for k in SETTINGS for e in (0, 2)}
    for upload in metrics["uploads"].values():
        assert upload["label_accuracy"] == 1.0  # known labels
        assert 3 < upload["psnr"]["mean"] < 60 and 0 < upload["ssim"]["mean"] <= 1
    # GH: 0 for the plain client, > 0 where the client departs from what the attacker models
    client = {k: json.loads((root / f"reports/client/{k}.json").read_text()) for k in SETTINGS}
    for k in ("pure", "ra", "dp-sgd", "clip-noise", "label-repeat"):
        assert all(abs(client[k][f"epoch_{e}"]["gh"]) < 1e-6 for e in (0, 2)), k
    for k in ("gh", "async-bn", "local-steps", "client-dp"):
        assert all(client[k][f"epoch_{e}"]["gh"] > 1e-3 for e in (0, 2)), k
    assert client["label-repeat"]["epoch_0"]["repetition_rate"] == 0.5 and client["client-dp"]["epoch_0"]["epsilon"] > 0
    async_upload = json.loads((root / "uploads/async-bn/epoch-000.json").read_text())
    assert (async_upload["participants"], async_upload["bn"], async_upload["scheme"]) == (2, "async", "pure")
    table = (root / "reports/results.md").read_text()
    assert "| pure" in table and (root / "reports/reconstructions.png").stat().st_size > 1000
    # the attacker's inputs hold no ground truth
    upload_meta = json.loads((root / "uploads/pure/epoch-000.json").read_text())
    assert upload_meta["kind"] == "upload" and "images" not in upload_meta
    # every scheme's checkpoints say how they were trained; the attacker rebuilds that architecture
    ra = json.loads((root / "models/ra/epoch-002.json").read_text())
    assert ra["maxpool_kernel"] == 25 and json.loads((root / "uploads/ra/epoch-002.json").read_text())["maxpool_kernel"] == 25
    assert json.loads((root / "models/ra/rank_analysis.json").read_text())["ra_index"] > 0
    dp = json.loads((root / "models/dp-sgd/epoch-002.json").read_text())
    assert dp["norm"] == "group" and dp["epsilon"] > 0 and dp["delta"] == 1e-5
    gh = json.loads((root / "models/gh/epoch-002.json").read_text())
    assert gh["bn"] == "async" and gh["bn_state_rank"] == 0 and gh["processes"] == 2 and gh["global_batch"] == 192
    assert "no privacy guarantee" in table


def test_mlflow_holds_one_run_per_stage_with_its_artifacts(project):
    root, env, _, _ = project
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["gradient-heterogeneity"])
    assert sorted(runs["tags.dvc.stage"]) == sorted(STAGES)
    assert set(runs["status"]) == {"FINISHED"}
    assert runs["tags.params.digest"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert set(runs["tags.git.commit"]) == {sh(["git", "rev-parse", "HEAD"], root, env).stdout.strip()}
    client = MlflowClient(uri)
    by_stage = dict(zip(runs["tags.dvc.stage"], runs["run_id"]))

    def files(stage, folder=""):
        return {Path(a.path).name for a in client.list_artifacts(by_stage[stage], folder)}

    for scheme in SCHEMES:
        assert {"epoch-000.safetensors", "epoch-002.safetensors", "epoch-002.json"} <= files(f"train@{scheme}", "checkpoints")
        assert "resume.ckpt" not in files(f"train@{scheme}", "checkpoints")
    for setting in SETTINGS:
        assert {"epoch-000.safetensors", "epoch-002.safetensors"} <= files(f"extract@{setting}", "uploads")
        assert {"epoch-000.png", "epoch-000.safetensors"} <= files(f"attack@{setting}", "reconstructions")
    extract = runs[runs["tags.dvc.stage"] == "extract@local-steps"].iloc[0]
    assert extract["params.client.local_steps"] == "2" and extract["metrics.gh"] > 0
    assert extract["tags.scheme"] == "pure" and extract["tags.setting"] == "local-steps"
    assert {"metrics.json", "per_image.csv"} <= files("evaluate")
    assert {"results.md", "results.csv", "training.csv", "reconstructions.png"} <= files("report")
    train = runs[runs["tags.dvc.stage"] == "train@gh"].iloc[0]
    assert 0 <= train["metrics.test_accuracy"] <= 1 and train["params.schemes.gh.norm"] == "batch-async"
    assert runs[runs["tags.dvc.stage"] == "train@dp-sgd"].iloc[0]["metrics.epsilon"] > 0
    evaluate = runs[runs["tags.dvc.stage"] == "evaluate"].iloc[0]
    assert evaluate["metrics.psnr.pure"] > 5
    assert (root / "mlruns").is_dir()  # artifacts beside the store, at the project root


def test_second_repro_runs_nothing(project):
    root, env, _, lock = project
    status = sh([sys.executable, "-m", "dvc", "status"], root, env)
    assert "up to date" in status.stdout, status.stdout
    again = sh([sys.executable, "-m", "dvc", "repro"], root, env)
    assert "Running stage" not in again.stdout
    assert (root / "dvc.lock").read_text() == lock


def _kill_when(args, root, env, marker: Path, timeout=300) -> str:
    """Start `args` in its own process group, SIGKILL the whole group once `marker` exists; its output."""
    log = root.parent / f"{root.name}-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return log.read_text()


def test_stages_killed_part_way_resume_and_end_with_the_same_bytes(project, tmp_path):
    """A fresh copy whose first `dvc repro attack@pure` is killed in train, its second in attack,
    the third completes: its stages' lock entries are those of the uninterrupted run."""
    _, _, _, uninterrupted = project
    root = tmp_path / "killed"
    env = copy_project(root)
    repro = [sys.executable, "-m", "dvc", "repro", "attack@pure"]  # the chain up to it, not the other schemes'

    def entries(lock: str) -> dict:
        stages = yaml.safe_load(lock)["stages"]
        return {name: stages[name] for name in ("prepare", "train@pure", "extract@pure", "attack@pure")}

    trained, attacked = root / "models" / ".pure.partial", root / "attacks" / ".pure.partial"

    _kill_when(repro, root, env, trained / "resume.ckpt")
    assert not (root / "models" / "pure").exists()  # nothing that looks finished
    assert (trained / "epoch-001.json").exists() and not (trained / "epoch-002.json").exists()

    second = _kill_when(repro, root, env, attacked / ".jobs" / "epoch-000.restart-000.json")
    assert "train: resuming after epoch 1 of an interrupted run" in second
    assert not (root / "attacks" / "pure").exists()
    assert not (trained / "epoch-002.json").exists() and (root / "models" / "pure" / "epoch-002.json").exists()

    done = sh(repro, root, env)
    assert re.search(r"attack@pure: [12] of 2 jobs kept from the interrupted run", done.stdout), done.stdout
    assert entries((root / "dvc.lock").read_text()) == entries(uninterrupted)
    assert not trained.exists() and not attacked.exists()
    assert "Running stage" not in sh(repro, root, env).stdout
