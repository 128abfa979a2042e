"""End to end: the reproducibility gate (two clean clones of this tree, `dvc repro` in both at
once) on the tiny profile, and what a researcher reads afterwards in the first: the reports, DVC's
metrics and plots, the MLflow runs and the table rebuilt from them.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO
from tests.helpers import copy_project, sh
from tools.repro_gate import gate

pytestmark = pytest.mark.slow

SCHEMES = ("pure", "ra", "dp-sgd", "clip-noise", "gh")
SETTINGS = (*SCHEMES, "async-bn", "local-steps", "client-dp", "buffers", "label-repeat")
STAGES = {
    "prepare",
    "copies",
    "evaluate",
    "report",
    *(f"train@{k}" for k in SCHEMES),
    *(f"{s}@{k}" for s in ("extract", "tune", "attack") for k in SETTINGS),
}
TUNED = ("pure",)  # the tiny profile tunes pure's attack; every other tune@ stage only writes "fixed"
# the stages that compute: one MLflow run each (copies only compares digests)
TRACKED = STAGES - {f"tune@{k}" for k in SETTINGS if k not in TUNED} - {"copies"}
# the tiny profile's checkpoints: untrained, after 2 optimizer steps, after the last epoch
CHECKPOINTS = ("epoch-000", "step-000002", "epoch-002")
# gh's untrained checkpoint is pure's, so its epoch-0 uploads are async-bn's: attacked once, there
COPIED = {("gh", "epoch-000"): "async-bn"}


@pytest.fixture(scope="module")
def project(tmp_path_factory, fashion_root):
    """The reproducibility gate on this working tree: two clones run `dvc repro` at once; its
    findings, the first clone, and the logs of both runs."""
    source, workdir = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("gate")
    env = copy_project(source)
    problems = gate(source, Path("profiles/tiny.yaml"), REPO / "profiles/tiny.reference.json", workdir)
    root = workdir / "project"
    env["PYTHONPATH"] = str(root)
    log = (workdir / "gate.log").read_text() + (workdir / "again.log").read_text()
    return root, env, log, (root / "dvc.lock").read_text(), problems


def test_gate_passes_twice_the_same_bytes_and_the_reference_numbers(project):
    *_, problems = project
    assert problems == []


def test_repro_writes_metrics_from_a_real_chain(project):
    root, _, log, _, _ = project
    for stage in STAGES:
        assert log.count(f"Running stage '{stage}'") == 2  # once in each clone
    for notice in ("is deprecated", "sync_dist=True", "Tip: For seamless cloud logging"):
        assert notice not in log  # third-party notices dropped by their text (stages/__init__.py)
    assert "train@gh: epoch 2 (step 6): test accuracy" in log  # ... and the stages' own lines kept
    assert "train@gh: step 2: test accuracy" in log
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert set(metrics["uploads"]) == {
        f"{k}/{c}-trial-0{t}" for k in SETTINGS for c in CHECKPOINTS for t in (0, 1) if (k, c) not in COPIED
    }
    copies = json.loads((root / "copies/gh.json").read_text())["copies"]
    assert copies == {
        f"epoch-000-trial-0{t}": {
            "setting": "async-bn",
            "upload": f"epoch-000-trial-0{t}",
            "checkpoint": "epoch-000",
            "trial": t,
        }
        for t in (0, 1)
    }
    assert sorted(p.name for p in (root / "attacks/gh").glob("*.safetensors")) == [
        f"{c}-trial-0{t}.safetensors" for c in ("epoch-002", "step-000002") for t in (0, 1)
    ]
    for t in (0, 1):  # the same upload under two names: the same tensor bytes
        name = f"epoch-000-trial-0{t}.safetensors"
        assert (root / "uploads/gh" / name).read_bytes() == (root / "uploads/async-bn" / name).read_bytes()
    for name, upload in metrics["uploads"].items():
        if not name.startswith("label-repeat/"):
            assert upload["label_accuracy"] == 1.0, name  # known labels
        elif name.startswith("label-repeat/epoch-000"):
            assert upload["label_accuracy"] == 1.0, name  # counted from the bias gradient: exact when untrained
        assert 3 < upload["psnr"]["mean"] < 60 and 0 < upload["ssim"]["mean"] <= 1
    # GH: 0 for the plain client, > 0 where the client departs from what the attacker models
    client = {k: json.loads((root / f"reports/client/{k}.json").read_text()) for k in SETTINGS}
    for k in ("pure", "ra", "dp-sgd", "clip-noise", "buffers", "label-repeat"):
        assert all(abs(u["gh"]) < 1e-6 for u in client[k]["uploads"].values()), k
    for k in ("gh", "async-bn", "local-steps", "client-dp"):
        assert all(u["gh"] > 1e-3 for u in client[k]["uploads"].values()), k
    first = "epoch-000-trial-00"
    assert client["label-repeat"]["uploads"][first]["repetition_rate"] == 0.5
    assert client["client-dp"]["uploads"][first]["epsilon"] > 0

    # the pairing: trial t holds the same victims in every setting that draws its batch the same way,
    # other victims in every other trial, and a repeated-label batch of its own
    def victims(setting, checkpoint, trial):
        return json.loads((root / f"truth/{setting}/{checkpoint}-trial-0{trial}.json").read_text())["victim_positions"]

    untrained = "epoch-000"
    for trial in (0, 1):
        assert all(
            victims(k, c, trial) == victims("pure", untrained, trial) for k in SETTINGS[:-1] for c in CHECKPOINTS
        )
    assert not set(victims("pure", untrained, 0)) & set(victims("pure", untrained, 1))
    assert victims("label-repeat", untrained, 0) == victims("label-repeat", "epoch-002", 0)
    assert victims("label-repeat", untrained, 0) != victims("pure", untrained, 0)
    # every checkpoint says its optimizer step, and an upload the step of the checkpoint it left from
    steps = {c: json.loads((root / f"models/gh/{c}.json").read_text())["step"] for c in CHECKPOINTS}
    assert steps == {"epoch-000": 0, "step-000002": 2, "epoch-002": 6}  # gh: 3 steps an epoch
    assert json.loads((root / "uploads/pure/epoch-002-trial-00.json").read_text())["step"] == 16
    async_upload = json.loads((root / f"uploads/async-bn/{first}.json").read_text())
    assert (async_upload["participants"], async_upload["bn"], async_upload["scheme"]) == (2, "async", "pure")
    table = (root / "reports/results.md").read_text()
    assert "| pure" in table and (root / "reports/reconstructions.png").stat().st_size > 1000
    # the attacker's inputs hold no ground truth
    upload_meta = json.loads((root / f"uploads/pure/{first}.json").read_text())
    assert upload_meta["kind"] == "upload" and "images" not in upload_meta
    # every scheme's checkpoints say how they were trained; the attacker rebuilds that architecture
    ra = json.loads((root / "models/ra/epoch-002.json").read_text())
    assert ra["maxpool_kernel"] == 25
    assert json.loads((root / "uploads/ra/epoch-002-trial-01.json").read_text())["maxpool_kernel"] == 25
    assert json.loads((root / "models/ra/rank_analysis.json").read_text())["ra_index"] > 0
    dp = json.loads((root / "models/dp-sgd/epoch-002.json").read_text())
    assert dp["norm"] == "group" and dp["epsilon"] > 0 and dp["delta"] == 1e-5
    assert dp["epsilon"] == min(dp["epsilon_rdp"], dp["epsilon_prv"]) == dp["epsilon_" + dp["accountant"]]
    assert f"by {dp['accountant'].upper()}" in table  # the report names whose epsilon it shows
    gh = json.loads((root / "models/gh/epoch-002.json").read_text())
    assert gh["bn"] == "async" and gh["bn_state_rank"] == 0 and gh["processes"] == 2 and gh["global_batch"] == 192
    assert "no privacy guarantee" in table


def test_mlflow_holds_one_run_per_stage_with_its_artifacts(project):
    root, env, _, _, _ = project
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    every = mlflow.search_runs(experiment_names=["gradient-heterogeneity"], order_by=["attributes.start_time DESC"])
    assert set(every["status"]) == {"FINISHED"}
    # the stages of one `dvc repro` are children of one parent: the same commit and parameters
    parent = every[every["tags.pipeline.role"] == "group"]
    assert len(parent) == 1 and parent["tags.mlflow.runName"].iloc[0].startswith("pipeline ")
    runs = every[every["tags.dvc.stage"].notna()]
    assert sorted(runs["tags.dvc.stage"]) == sorted(TRACKED)
    assert set(runs["tags.mlflow.parentRunId"]) == {parent["run_id"].iloc[0]}
    assert parent["start_time"].iloc[0] <= runs["start_time"].min()  # the parent spans its children
    assert parent["end_time"].iloc[0] >= runs["end_time"].max()
    # the report's per-setting runs, for the UI's compare view
    results = every[every["tags.pipeline.role"] == "results"]
    assert sorted(results["tags.setting"]) == sorted(SETTINGS)
    assert set(results["tags.mlflow.parentRunId"]) == set(runs[runs["tags.dvc.stage"] == "report"]["run_id"])
    assert runs["tags.params.digest"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert set(runs["tags.git.commit"]) == {sh(["git", "rev-parse", "HEAD"], root, env).stdout.strip()}
    assert set(runs["tags.git.dirty"]) == {"false"}  # dvc.lock and outputs rewritten by dvc do not count
    client = MlflowClient(uri)
    by_stage = dict(zip(runs["tags.dvc.stage"], runs["run_id"]))

    def files(stage, folder=""):
        return {Path(a.path).name for a in client.list_artifacts(by_stage[stage], folder)}

    for scheme in SCHEMES:
        assert {"epoch-000.safetensors", "step-000002.safetensors", "epoch-002.safetensors", "epoch-002.json"} <= files(
            f"train@{scheme}", "checkpoints"
        )
        assert "resume.ckpt" not in files(f"train@{scheme}", "checkpoints")
    for setting in SETTINGS:
        assert {"epoch-000-trial-01.safetensors", "epoch-002-trial-00.safetensors"} <= files(
            f"extract@{setting}", "uploads"
        )
        first = "epoch-002" if (setting, "epoch-000") in COPIED else "epoch-000"  # a copy is attacked as its original
        assert {f"{first}-trial-00.png", f"{first}-trial-01.safetensors", "step-000002-trial-00.png"} <= files(
            f"attack@{setting}", "reconstructions"
        )
    assert "same_upload_as.json" in files("attack@gh")
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
    assert {"psnr_through_training.png", "accuracy_through_training.png", "gh_vs_psnr.png", "gir_vs_psnr.png"} <= files(
        "report", "plots"
    )
    attack = client.get_metric_history(by_stage["attack@pure"], "iterations_run")
    # the mean over the trials, at each checkpoint's optimizer step (pure: 8 steps an epoch)
    assert sorted((m.step, m.value) for m in attack) == [(0, 60), (2, 60), (16, 60)]
    assert {m.step for m in client.get_metric_history(by_stage["attack@pure"], "unconverged")} == {0, 2, 16}
    assert all(m.value > 0 for m in client.get_metric_history(by_stage["attack@pure"], "attack_seconds"))


def test_table_rebuilt_from_mlflow_equals_the_dvc_table(project):
    root, env, _, _, _ = project
    done = sh([sys.executable, "-m", "tools.from_mlflow", "--check"], root, env)
    assert "the table rebuilt from MLflow equals reports/results.csv" in done.stdout
    assert done.stdout.count("| label-repeat ") == 3  # one row per attacked checkpoint


def test_report_writes_dvc_metrics_plots_and_a_summary(project):
    root, env, _, _, _ = project
    from PIL import Image

    shown = sh([sys.executable, "-m", "dvc", "metrics", "show", "--json"], root, env).stdout
    summary = json.loads(shown)[""]["data"]["reports/summary.json"]["data"]
    assert set(summary) == set(SETTINGS) and summary["pure"]["accuracy_cost"] == 0
    assert summary["ra"]["accuracy_cost"] == pytest.approx(
        summary["pure"]["test_accuracy"] - summary["ra"]["test_accuracy"]
    )
    assert summary["pure"]["verdict"] == "baseline" and summary["pure"]["trials"] == 2
    assert summary["label-repeat"]["verdict"].startswith("epoch 0: not paired with pure")
    assert summary["async-bn"]["verdict"].startswith("epoch 0: ") and "(Holm " in summary["async-bn"]["verdict"]
    assert summary["gh"]["verdict"].startswith("epoch 0: same upload as `async-bn`: measured there; step 2: ")
    assert "; epoch 2: " in summary["gh"]["verdict"]
    assert summary["pure"]["falls"].startswith("at its floor from step ")
    table = pd.read_csv(root / "reports/results.csv")
    attacked = table[table.same_upload_as.isna()]
    assert (attacked.trials == 2).all() and (attacked.n == 8).all() and (attacked.psnr_low <= attacked.psnr).all()
    assert table[table.setting == "local-steps"].paired_batches.tolist() == [2, 2, 2]
    assert table[table.setting == "local-steps"].step.tolist() == [0, 2, 16]  # in the order of training
    assert table[table.setting.isin(["pure", "label-repeat"])].p_value.isna().all()
    copy = table[(table.setting == "gh") & (table.checkpoint == "epoch-000")].iloc[0]
    assert copy.same_upload_as == "async-bn" and copy.role == "copy" and pd.isna(copy.psnr) and pd.isna(copy.p_value)
    family = table[table.role == "test"]  # 8 paired settings x 3 checkpoints, less gh's copy
    assert len(family) == 23 and (table.family_size == 23).all()
    assert (family.p_adjusted >= family.p_value).all() and (attacked.iip.between(0, 1)).all()
    assert family[family.effect == "none"].detectable.notna().all()
    for name in ("psnr_through_training", "accuracy_through_training", "gh_vs_psnr", "gir_vs_psnr", "privacy_utility"):
        with Image.open(root / "reports/plots" / f"{name}.png") as image:
            assert image.size in ((600, 400), (1400, 500), (1300, 500)) and len(image.getcolors(1 << 16)) > 20
    rendered = sh([sys.executable, "-m", "dvc", "plots", "show", "-o", "plots-html"], root, env)
    assert (root / "plots-html" / "index.html").stat().st_size > 1000, rendered.stdout
    text = (root / "reports/results.md").read_text()
    assert text.startswith("# Results\n\nEach cell: 2 client batches") and "\n## Summary\n" in text
    for setting in SETTINGS:
        assert (root / "reports/figures" / f"{setting}.png").is_file()
        assert {p.name for p in (root / "reports/figures" / setting).iterdir()} == {
            f"{c}-trial-0{t}.png" for c in CHECKPOINTS for t in (0, 1) if (setting, c) not in COPIED
        }


def test_the_power_tool_sizes_the_trials_from_the_runs_paired_differences(project):
    root, env, _, _, _ = project
    done = sh([sys.executable, "-m", "tools.power"], root, env)
    lines = done.stdout.splitlines()
    assert "alpha/23" in lines[0]  # the family of reports/results.csv
    rows = {line.split("|")[1].strip(): line for line in lines[3:]}
    assert set(rows) == {"epoch 0", "step 2", "epoch 2", "all"}
    bad = sh([sys.executable, "-m", "tools.power", "--family", "0"], root, env, check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == "power: error: --family 0: a family holds at least one test"


def test_mlflow_server_lists_the_settings_side_by_side(project):
    """The tracking server's REST API (what the UI's compare view reads) on 127.0.0.1."""
    import socket
    import urllib.request

    import mlflow

    root, env, _, _, _ = project
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("gradient-heterogeneity").experiment_id
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=root,
        env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        body = json.dumps(
            {"experiment_ids": [experiment], "filter": "tags.`pipeline.role` = 'results'", "max_results": 100}
        ).encode()
        deadline = time.time() + 120
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search", body, {"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(request, timeout=10) as answer:
                    found = json.loads(answer.read())["runs"]
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
    finally:
        server.terminate()
        server.wait(30)
    latest = {}
    for run in found:
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        latest.setdefault(tags["setting"], {m["key"]: m["value"] for m in run["data"]["metrics"]})
    assert set(latest) == set(SETTINGS)
    table = pd.read_csv(root / "reports/results.csv")
    for setting, metrics in latest.items():  # the last logged value: the last checkpoint's, the largest step
        row = table[(table.setting == setting) & (table.checkpoint == "epoch-002")].iloc[0]
        assert metrics["psnr"] == pytest.approx(row.psnr) and metrics["test_accuracy"] == pytest.approx(
            row.test_accuracy
        )


def test_the_tune_stage_reads_no_victim_and_its_study_repeats_from_the_seed(project, tmp_path):
    """tune@pure again in a copy of the project from which truth/, uploads/, attacks/ and the victim
    split are deleted, every file Python opens recorded: the same tuning/pure.json, byte for byte."""
    root, env, *_ = project
    copy = tmp_path / "project"
    shutil.copytree(
        root, copy, ignore=shutil.ignore_patterns("truth", "uploads", "attacks", "victims.*", "mlruns", "cache")
    )
    assert not (copy / "data/prepared/victims.safetensors").exists() and not (copy / "truth").exists()
    (copy / "tuning/pure.json").unlink()
    audit = (
        "import runpy, sys\n"
        "opened = []\n"
        "sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == 'open' else None)\n"
        "sys.argv = ['stages.tune', 'pure']\n"
        "try:\n"
        "    runpy.run_module('stages.tune', run_name='__main__')\n"
        "finally:\n"
        "    print('OPENED', *opened, sep='\\n')\n"
    )
    env = {**env, "PYTHONPATH": str(copy), "DVC_ROOT": str(copy)}
    done = sh([sys.executable, "-c", audit], copy, env)
    opened = done.stdout.split("OPENED\n", 1)[1].splitlines()
    assert any(path.endswith("data/prepared/attacker.safetensors") for path in opened)  # the audit sees its reads
    assert not [p for p in opened if "/truth/" in p or "/uploads/" in p or "/attacks/" in p or "victims" in p]
    assert (copy / "tuning/pure.json").read_bytes() == (root / "tuning/pure.json").read_bytes()
    tuning = json.loads((root / "tuning/pure.json").read_text())
    assert tuning["trials"][0]["values"] == {"lr": 0.1, "tv_weight": 0.01}  # the fixed attack first
    assert tuning["best_value"] >= tuning["fixed_value"]
    attack = json.loads((root / "attacks/pure/epoch-000-trial-00.json").read_text())
    assert attack["tuned"] == tuning["best"]
    assert json.loads((root / "tuning/ra.json").read_text()) == {"setting": "ra", "hyperparameters": "fixed"}
    assert "tuned: lr" in (root / "reports/results.md").read_text()  # the table names which attack ran


def test_second_repro_runs_nothing(project):
    root, env, _, lock, _ = project
    status = sh([sys.executable, "-m", "dvc", "status"], root, env)
    assert "up to date" in status.stdout, status.stdout
    again = sh([sys.executable, "-m", "dvc", "repro"], root, env)
    assert "Running stage" not in again.stdout
    assert (root / "dvc.lock").read_text() == lock


def test_the_attack_stage_under_torchrun_writes_the_bytes_of_its_forked_run(project):
    root, env, *_ = project
    folder = root / "attacks" / "pure"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    done = sh(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "stages.attack",
            "pure",
        ],
        root,
        env,
    )
    assert "on 2 process(es) started by torchrun" in done.stdout, done.stdout
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not (root / "attacks" / ".pure.partial").exists()
    assert "up to date" in sh([sys.executable, "-m", "dvc", "status"], root, env).stdout
