"""What every stage shares: parameters, the one-line error contract, its MLflow run.

DVC runs each stage from the project root and tells it its name (DVC_STAGE) and the real
project root (DVC_ROOT, which differs from the working folder in temporary experiments).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Params, load_params
from pipeline.errors import PipelineError
from pipeline.tracking import open_run, tracking_uri


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


@dataclass
class Stage:
    name: str
    params: Params
    root: Path  # where the MLflow store lives

    @property
    def tracking_uri(self) -> str:
        return tracking_uri(self.root)

    @contextmanager
    def track(self, params: dict[str, Any], **tags: str) -> Iterator[Any]:
        """This execution's MLflow run, tagged with the DVC stage and the git commit."""
        all_tags = {
            "dvc.stage": os.environ.get("DVC_STAGE", self.name),
            "stage": self.name,
            "git.commit": _git(self.root, "rev-parse", "HEAD") or "unknown",
            "git.dirty": str(bool(_git(self.root, "status", "--porcelain", "--untracked-files=no"))).lower(),
            **{f"dvc.{k[4:].lower()}": v for k, v in os.environ.items() if k in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")},
            **tags,
        }
        with open_run(self.root, os.environ.get("DVC_STAGE", self.name), params, all_tags) as mlflow:
            yield mlflow


def run(name: str, body: Callable[[Stage], None]) -> None:
    """Run a stage body; a PipelineError becomes one line on stderr and exit status 2."""
    try:
        params = load_params(Path("params.yaml"))
        body(Stage(name, params, Path(os.environ.get("DVC_ROOT", ".")).resolve()))
    except PipelineError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; no output was finished", file=sys.stderr)
        sys.exit(130)
