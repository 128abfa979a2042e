"""MLflow: one run per stage execution, in a store anchored at the project root.

The tracking URI is `MLFLOW_TRACKING_URI` when set (a team server), else a sqlite database
in the project root. Artifacts of the default store go to `<root>/mlruns`, fixed when the
experiment is created, so a stage run from a temporary experiment folder logs to the same
place. Nothing here is written into DVC outputs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

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


def _connect(uri: str, experiment: str) -> Any:
    """Point MLflow at `uri` and return the experiment (None if absent); one line if unreachable."""
    import mlflow  # slow to import: only code that tracks pays for it
    from mlflow.exceptions import MlflowException

    # The first use of a sqlite store announces its schema migration; a stage's stderr is for errors.
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)

    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.get_experiment_by_name(experiment)
    except MlflowException as err:
        if not uri.startswith(("http://", "https://")):
            raise
        reason = str(err).split(" failed with exception ")[-1][:160]
        raise PipelineError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it, or unset MLFLOW_TRACKING_URI "
            "to track into the project's sqlite store. Nothing was computed."
        ) from None


GROUP_TAG = "pipeline.group"
PID_TAG, HOST_TAG = "pipeline.pid", "pipeline.host"  # who opened a run: to tell a killed one
# MLflow 3's UI opens an experiment by this tag; without it, on the GenAI (traces) view, empty here
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"


def group_run(mlflow: Any, experiment_id: str, group: str, name: str) -> str:
    """The id of the parent run of `group` (the stage runs of one code + parameters version),
    created (and ended: it holds no work of its own) by the first stage that needs it; each
    child moves its end to the child's own (`open_run`), so that it spans them all."""
    found = mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.`{GROUP_TAG}` = '{group}' and tags.`pipeline.role` = 'group'",
        max_results=1,
        output_format="list",
    )
    if found:
        return found[0].info.run_id
    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id, run_name=name, tags={GROUP_TAG: group, "pipeline.role": "group"})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _gone(pid: str | None, host: str | None) -> bool:
    """Whether the process that opened a run has died: known only for one on this machine."""
    if not pid or host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


def end_killed_runs(mlflow: Any, experiment_id: str, run_name: str) -> list[str]:
    """Mark KILLED the runs named `run_name` still RUNNING whose process died on this machine
    (a SIGKILL or the OOM killer gives MLflow no chance to end them); their ids."""
    running = mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.runName` = '{run_name}' and attributes.status = 'RUNNING'",
        output_format="list",
    )
    ended = []
    for run in running:
        if _gone(run.data.tags.get(PID_TAG), run.data.tags.get(HOST_TAG)):
            mlflow.MlflowClient().set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    return ended


@contextmanager
def open_run(
    root: Path, run_name: str, params: dict[str, Any], tags: dict[str, str], group: tuple[str, str] | None = None
) -> Iterator[Any]:
    """Open one MLflow run; yields the `mlflow` module with the run active.

    With `group` (an id and a display name), the run is a child of that group's parent run,
    so the UI folds the runs of one pipeline version together.
    Called before a stage does any work, so an unreachable server fails fast (a few seconds
    instead of MLflow's minutes of retries) and loses nothing. Earlier runs of the same name
    left RUNNING by a killed process on this machine are marked KILLED first.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    import mlflow

    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    if _connect(tracking_uri(root), name) is None:
        local = not os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.create_experiment(name, artifact_location=(root.resolve() / "mlruns").as_uri() if local else None)
    experiment = mlflow.set_experiment(name)
    if experiment.tags.get(KIND_TAG) != KIND:  # also on an experiment made before the tag was set
        mlflow.set_experiment_tag(KIND_TAG, KIND)
    for run_id in end_killed_runs(mlflow, experiment.experiment_id, run_name):
        print(f"MLflow: run {run_id} of an earlier {run_name} whose process was killed is marked KILLED")
    tags = {**tags, PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
    parent = None
    if group is not None:
        parent = group_run(mlflow, experiment.experiment_id, *group)
        tags = {**tags, GROUP_TAG: group[0], "mlflow.parentRunId": parent}
    try:
        with mlflow.start_run(run_name=run_name, tags=tags):
            mlflow.log_params({k: json.dumps(v) if isinstance(v, list) else v for k, v in flatten(params).items()})
            yield mlflow
    finally:
        if parent is not None:
            mlflow.MlflowClient().set_terminated(parent, end_time=int(time.time() * 1000))


def _history(client, run_id: str | None, key: str) -> dict[int, float]:
    return {} if run_id is None else {m.step: m.value for m in client.get_metric_history(run_id, key)}


def table_from_mlflow(uri: str, experiment: str, shared: list[str], group: str | None = None) -> Any:
    """The results table rebuilt from the stage runs in the tracking store (the latest finished run
    of each DVC stage, within one pipeline group if given): train (test accuracy, epsilon per checkpoint),
    extract (GH, the client's epsilon), attack (iterations, unconverged restarts, wall time), evaluate
    (image metrics): per checkpoint, keyed by its optimizer step (the metrics' MLflow step), the mean
    over the trials, as the stages log them; `shared` the columns."""
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(uri)
    query = "attributes.status = 'FINISHED'" + (f" and tags.`{GROUP_TAG}` = '{group}'" if group else "")
    runs = mlflow.search_runs(
        experiment_names=[experiment], filter_string=query, order_by=["attributes.start_time DESC"]
    )
    if runs.empty or "tags.dvc.stage" not in runs:
        raise PipelineError(f"{uri}: no finished stage runs in experiment {experiment!r}")
    latest = runs[runs["tags.dvc.stage"].notna()].drop_duplicates("tags.dvc.stage").set_index("tags.dvc.stage")
    run_id = latest.run_id.to_dict()
    if "evaluate" not in run_id:
        raise PipelineError(f"{uri}: no finished evaluate run to take the image metrics from")
    client = mlflow.MlflowClient()
    rows = []
    for _, extract in latest[latest["tags.stage"] == "extract"].iterrows():
        setting, scheme = extract["tags.setting"], extract["tags.scheme"]
        train, attack = run_id.get(f"train@{scheme}"), run_id.get(f"attack@{setting}")
        h = {
            "test_accuracy": _history(client, train, "checkpoint.test_accuracy"),
            "train_epsilon": _history(client, train, "checkpoint.epsilon"),
            "client_epsilon": _history(client, extract.run_id, "epsilon"),
            "gh": _history(client, extract.run_id, "gh"),
            "iterations_run": _history(client, attack, "iterations_run"),
            "unconverged": _history(client, attack, "unconverged"),
            "attack_seconds": _history(client, attack, "attack_seconds"),
            **{
                k: _history(client, run_id["evaluate"], f"{k}.{setting}")
                for k in ("label_accuracy", "psnr", "ssim", "mse", "lpips")
            },
        }
        for step in sorted(h["psnr"]):
            rows.append(
                {
                    "setting": setting,
                    "scheme": scheme,
                    "step": step,
                    "epsilon": h["train_epsilon"].get(step, h["client_epsilon"].get(step)),
                    **{k: h[k].get(step) for k in shared[3:] if k != "epsilon"},
                    "attack_seconds": h["attack_seconds"].get(step),
                }
            )
    return pd.DataFrame(rows)


def log_setting_runs(mlflow: Any, table: Any) -> None:
    """One child run per setting with the same metric names (step = the optimizer step): the UI's compare view
    then lines the settings up side by side."""
    import pandas as pd

    numbers = [
        c
        for c in table.columns
        if c != "step" and pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])
    ]
    for setting, part in table.groupby("setting", sort=False):
        with mlflow.start_run(
            run_name=f"results@{setting}",
            nested=True,
            tags={"setting": setting, "scheme": part.scheme.iloc[0], "pipeline.role": "results"},
        ):
            mlflow.log_params(
                {
                    "scheme": part.scheme.iloc[0],
                    "client": part.client.iloc[0],
                    "attack_hyperparameters": part.hyperparameters.iloc[0],
                }
            )
            for _, row in part.iterrows():
                mlflow.log_metrics({k: float(row[k]) for k in numbers if pd.notna(row[k])}, step=int(row.step))
