#!/usr/bin/env bash
# The project's one entry point.
#   ./run.sh          set up (venv + dataset) and run the default pipeline (dvc repro)
#   ./run.sh test     set up and run what CI runs: every test, the slow end-to-end ones and the gate among them
#   ./run.sh gate     the reproducibility gate alone (tools/repro_gate.py)
#   ./run.sh lint     ruff's checks and formatting and mypy's types, as CI runs them first
#   ./run.sh setup    only create .venv and install the default dataset
#   ./run.sh ui       MLflow UI on http://127.0.0.1:${PORT:-5000} over this project's runs; prints the address of its runs page
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
VENV=.venv
export PATH="$PWD/$VENV/bin:$PATH" DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true

pip_install() {
  # pip warns once per package about this machine's absent mirror folders; keep its real messages.
  { "$VENV/bin/pip" install -q "$@" 2>&1 1>&3 | { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; }; } 3>&1
}

setup_env() {
  # Reinstall only when requirements.lock changed since the last install.
  if [ -f "$VENV/.installed-lock" ] && cmp -s requirements.lock "$VENV/.installed-lock"; then return; fi
  echo "run.sh: installing into $VENV from requirements.lock (torch 2.14.1, torchvision 0.29.1, lightning, mlflow, dvc; ~2 min)"
  python3 -m venv "$VENV"
  pip_install -r requirements.lock
  pip_install --no-deps -e .
  cp requirements.lock "$VENV/.installed-lock"
}

setup_data() {
  # Only the default source is installed here; an image folder (data.source: imagefolder) is the user's own.
  local root
  root=$(python -c 'import yaml; d = yaml.safe_load(open("params.yaml"))["data"]; print(d["root"] if d["source"] == "fashion-mnist" else "")')
  if [ -z "$root" ] || [ -f "$root/train-images-idx3-ubyte.gz" ]; then return; fi
  if [ "$root" = /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    echo "run.sh: installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "run.sh: Fashion-MNIST not found at $root. Without apt, download it with" \
         "\`python -c \"from torchvision.datasets import FashionMNIST; FashionMNIST('data/raw', download=True)\"\`" \
         "and set data.root: data/raw/FashionMNIST/raw in params.yaml" >&2
    exit 1
  fi
}

case "${1:-repro}" in
  setup) setup_env; setup_data ;;
  repro)
    setup_env; setup_data
    dvc repro
    echo "run.sh: done. Results: reports/results.md, reports/reconstructions.png; runs: ./run.sh ui" ;;
  lint)
    setup_env
    ruff check .
    ruff format --check .
    mypy ;;
  test)
    setup_env; setup_data
    # lint first (seconds), then every test, fast and slow (the reproducibility gate is
    # tests/test_pipeline.py), on two processes
    ruff check .  # two commands, not an && list: set -e stops at either
    ruff format --check .
    mypy  # pipeline/, as pyproject.toml's [tool.mypy] says
    python -m pytest -q -m "slow or not slow" -n 2 --dist loadfile --durations=8 ;;
  gate)
    setup_env; setup_data
    python -m tools.repro_gate ;;
  ui)
    setup_env
    # MLflow 3.17's experiment page (#/experiments/<id>) lands on the GenAI overview; #/experiments/<id>/runs
    # shows the runs. So print that page of the experiment the stages log to (pipeline/tracking.py),
    # its id read from mlflow.db; without the db or the experiment, the plain address.
    python -c '
import os, sqlite3, sys
from pipeline.tracking import EXPERIMENT
address, name = sys.argv[1], os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
try:
    db = sqlite3.connect("file:mlflow.db?mode=ro", uri=True)
    query = "SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = ?"
    found = db.execute(query, (name, "active")).fetchone()
except sqlite3.Error:
    found = None
print(f"run.sh: MLflow UI at {address}/#/experiments/{found[0]}/runs" if found else f"run.sh: MLflow UI at {address}")
' "http://127.0.0.1:${PORT:-5000}" || echo "run.sh: MLflow UI at http://127.0.0.1:${PORT:-5000}"
    export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
    exec mlflow server --backend-store-uri "sqlite:///$PWD/mlflow.db" --default-artifact-root "$PWD/mlruns" \
      --host 127.0.0.1 --port "${PORT:-5000}" --workers 1 ;;
  *) echo "usage: ./run.sh [repro|test|lint|gate|setup|ui]" >&2; exit 2 ;;
esac
