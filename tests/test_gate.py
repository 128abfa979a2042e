"""The reproducibility gate: it passes on the project and fails on a deliberate nondeterminism."""

import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.helpers import copy_project, sh
from tools.repro_gate import lock_differences, metric_differences

LOCK = """schema: '2.0'
stages:
  extract:
    cmd: python -m stages.extract
    deps:
    - path: models/pure
      md5: aaa.dir
    outs:
    - path: uploads
      md5: {uploads}.dir
"""


def test_lock_differences_name_the_changed_output():
    assert lock_differences(LOCK.format(uploads="bbb"), LOCK.format(uploads="bbb")) == []
    assert lock_differences(LOCK.format(uploads="bbb"), LOCK.format(uploads="ccc")) == [
        "stage extract: out uploads changed"
    ]


def test_metric_differences_respect_the_tolerance():
    import pandas as pd

    reference = {
        "tolerance": {"psnr": 0.5, "label_accuracy": 0.0},
        "tolerance_trained": {"psnr": 4.0, "label_accuracy": 0.0},
        "rows": [
            {"scheme": "pure", "checkpoint": "epoch-000", "step": 0, "psnr": 20.0, "label_accuracy": 1.0},
            {"scheme": "pure", "checkpoint": "step-000002", "step": 2, "psnr": 12.0, "label_accuracy": 1.0},
        ],
    }
    close = pd.DataFrame(
        [
            {"scheme": "pure", "checkpoint": "epoch-000", "step": 0, "psnr": 20.4, "label_accuracy": 1.0},
            {"scheme": "pure", "checkpoint": "step-000002", "step": 2, "psnr": 15.0, "label_accuracy": 1.0},
        ]
    )
    far = pd.DataFrame(
        [
            {"scheme": "pure", "checkpoint": "epoch-000", "step": 0, "psnr": 19.0, "label_accuracy": 1.0},
            {"scheme": "pure", "checkpoint": "step-000002", "step": 2, "psnr": 17.0, "label_accuracy": 0.75},
            {"scheme": "pure", "checkpoint": "epoch-002", "step": 16, "psnr": 19.0, "label_accuracy": 1.0},
        ]
    )
    assert metric_differences(close, reference) == []
    assert metric_differences(far, reference) == [
        "row scheme=pure, checkpoint=epoch-000, step=0: psnr 19.0000 vs reference 20.0000 (tolerance 0.5)",
        "row scheme=pure, checkpoint=epoch-002, step=16: not in the reference",
        "row scheme=pure, checkpoint=step-000002, step=2: psnr 17.0000 vs reference 12.0000 (tolerance 4.0)",
        "row scheme=pure, checkpoint=step-000002, step=2: label_accuracy 0.7500 vs reference 1.0000 (tolerance 0.0)",
    ]


UNSEEDED_NOISE = """
import os as _os


def _unseeded(grads):
    # a deliberate bug: noise from the operating system's entropy, not from params.yaml's seed
    gen = torch.Generator().manual_seed(int.from_bytes(_os.urandom(8), "little"))
    return {n: g + 1e-7 * torch.randn(g.shape, generator=gen) for n, g in grads.items()}


_seeded_client_upload = client_upload


def client_upload(*args, **kwargs):
    update = _seeded_client_upload(*args, **kwargs)
    update.gradients = _unseeded(update.gradients)
    return update
"""


@pytest.mark.slow
def test_gate_fails_on_an_unseeded_noise_draw(tmp_path, fashion_root):
    source = tmp_path / "source"
    env = copy_project(source)
    with open(source / "pipeline" / "client.py", "a") as f:
        f.write(UNSEEDED_NOISE)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    sh(git + ["commit", "-qam", "unseeded noise in the client upload"], source, env)
    done = subprocess.run(
        [sys.executable, "-m", "tools.repro_gate", "--source", str(source), "--target", "extract@pure"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1:] == [
        "repro_gate: FAIL: stage extract@pure: out uploads/pure changed"
    ], done.stdout + done.stderr
    assert "PASS" not in done.stdout
