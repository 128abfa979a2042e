"""MLflow runs: one per stage execution; a run whose process was killed does not stay RUNNING."""

import os
import signal
import socket
import subprocess
import sys

from pipeline.tracking import EXPERIMENT, HOST_TAG, KIND, KIND_TAG, PID_TAG, open_run
from tests.conftest import REPO


def test_a_run_left_running_by_a_killed_process_is_marked_killed_by_the_next(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    script = (
        "import os, signal\nfrom pathlib import Path\nfrom pipeline.tracking import open_run\n"
        f"with open_run(Path({str(tmp_path)!r}), 'train@pure', {{}}, {{}}):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env)
    assert killed.returncode == -signal.SIGKILL
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    # a run of a process that is alive (this one) stays as it is
    alive = mlflow.MlflowClient().create_run(
        experiment, run_name="train@pure", tags={PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
    )
    runs = mlflow.search_runs([experiment], output_format="list")
    (before,) = [r for r in runs if r.info.run_id != alive.info.run_id]
    assert before.info.status == "RUNNING"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with open_run(tmp_path, "train@pure", {}, {}) as tracked:
        current = tracked.active_run().info.run_id
    status = {r.info.run_id: r.info.status for r in mlflow.search_runs([experiment], output_format="list")}
    assert status == {before.info.run_id: "KILLED", alive.info.run_id: "RUNNING", current: "FINISHED"}
    # the UI opens the experiment on its training runs
    assert mlflow.get_experiment(experiment).tags[KIND_TAG] == KIND


def test_the_parent_run_of_a_pipeline_version_spans_its_children(tmp_path, monkeypatch):
    import time

    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    children = []
    for stage in ("train@pure", "extract@pure"):
        with open_run(tmp_path, stage, {}, {}, group=("abc", "pipeline abc")) as tracked:
            children.append(tracked.active_run().info.run_id)
            time.sleep(0.05)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = [client.get_run(r).info for r in children]
    (parent,) = {client.get_run(r).data.tags["mlflow.parentRunId"] for r in children}
    group = client.get_run(parent).info
    assert group.status == "FINISHED"
    assert group.start_time <= min(r.start_time for r in runs)
    assert group.end_time >= max(r.end_time for r in runs) > group.start_time + 100  # both children, not 7 ms
