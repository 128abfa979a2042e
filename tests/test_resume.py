"""Stages killed by a signal part-way: nothing that looks finished is left, and the next
`dvc repro` resumes and ends with the bytes of an uninterrupted run."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import copy_project, sh

pytestmark = pytest.mark.slow


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


def test_stages_killed_part_way_resume_and_end_with_the_same_bytes(tmp_path, fashion_root):
    """A fresh copy whose first `dvc repro attack@pure` is killed in train, its second in attack,
    the third completes: its stages' lock entries are those of an uninterrupted (forced) re-run."""
    root = tmp_path / "killed"
    env = copy_project(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["settings"]["pure"].pop("attack")  # the tiny profile's study: not what this test kills (CI's time)
    # pure alone: attack@pure depends on the copies stage, which reads every setting's uploads
    params["settings"] = {"pure": params["settings"]["pure"]}
    params["report"]["baseline"] = None
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    repro = [sys.executable, "-m", "dvc", "repro", "attack@pure"]  # the chain up to it, not the other schemes'

    def entries(lock: str) -> dict:
        stages = yaml.safe_load(lock)["stages"]
        return {name: stages[name] for name in ("prepare", "train@pure", "extract@pure", "copies", "attack@pure")}

    trained, attacked = root / "models" / ".pure.partial", root / "attacks" / ".pure.partial"

    _kill_when(repro, root, env, trained / "resume.ckpt")
    assert not (root / "models" / "pure").exists()  # nothing that looks finished
    assert (trained / "epoch-001.json").exists() and not (trained / "epoch-002.json").exists()

    second = _kill_when(repro, root, env, attacked / ".jobs" / "epoch-000-trial-00.restart-000.json")
    assert "train: resuming after epoch 1 of an interrupted run" in second
    assert not (root / "attacks" / "pure").exists()
    assert not (trained / "epoch-002.json").exists() and (root / "models" / "pure" / "epoch-002.json").exists()

    done = sh(repro, root, env)
    # 3 checkpoints x 2 trials, one restart each
    assert re.search(r"attack@pure: [1-5] of 6 jobs kept from the interrupted run", done.stdout), done.stdout
    assert not trained.exists() and not attacked.exists()
    assert "Running stage" not in sh(repro, root, env).stdout
    resumed = (root / "dvc.lock").read_text()
    sh([*repro, "--force"], root, env)  # every stage of the chain again, uninterrupted
    assert entries((root / "dvc.lock").read_text()) == entries(resumed)
