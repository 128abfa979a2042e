"""MLflow: one run per stage execution, in a store anchored at the project root.

The tracking URI is `MLFLOW_TRACKING_URI` when set (a team server), else a sqlite database
in the project root. Artifacts of the default store go to `<root>/mlruns`, fixed when the
experiment is created, so a stage run from a temporary experiment folder logs to the same
place. Nothing here is written into DVC outputs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXPERIMENT = "gradient-heterogeneity"


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root.resolve() / 'mlflow.db'}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: MLflow params and metrics are flat."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


@contextmanager
def open_run(root: Path, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> Iterator[Any]:
    """Open one MLflow run; yields the `mlflow` module with the run active."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow  # slow to import: only code that tracks pays for it

    mlflow.set_tracking_uri(tracking_uri(root))
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    if mlflow.get_experiment_by_name(name) is None:
        local = not os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.create_experiment(name, artifact_location=(root.resolve() / "mlruns").as_uri() if local else None)
    mlflow.set_experiment(name)
    with mlflow.start_run(run_name=run_name, tags=tags):
        mlflow.log_params({k: json.dumps(v) if isinstance(v, list) else v for k, v in flatten(params).items()})
        yield mlflow
