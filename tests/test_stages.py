"""Stage command lines on bad input: one line on stderr, a non-zero exit, nothing that looks finished."""

import os
import subprocess
import sys

import yaml

from tests.conftest import RAW_PARAMS, REPO
from tests.helpers import assert_one_line_failure, make_upload, run_stage


def test_unknown_key(tmp_path):
    params = {**RAW_PARAMS, "train": {**RAW_PARAMS["train"], "epoch": 3}}
    done = run_stage("prepare", tmp_path, params)
    assert_one_line_failure(done, "prepare: error: params.yaml: unknown key 'train.epoch'")
    assert not (tmp_path / "data").exists()


def test_missing_dataset(tmp_path):
    params = {**RAW_PARAMS, "data": {**RAW_PARAMS["data"], "root": str(tmp_path / "absent")}}
    done = run_stage("prepare", tmp_path, params)
    assert_one_line_failure(done, "Fashion-MNIST not found at")
    assert "apt-get install dataset-fashion-mnist" in done.stderr
    assert not (tmp_path / "data").exists()


def test_empty_image_folder_keeps_the_previous_output(tmp_path):
    (tmp_path / "imgs" / "cats").mkdir(parents=True)
    finished = tmp_path / "data" / "prepared"
    finished.mkdir(parents=True)
    (finished / "train.json").write_text("{}\n")  # the output of an earlier, good run
    params = {**RAW_PARAMS, "data": {**RAW_PARAMS["data"], "source": "imagefolder", "root": str(tmp_path / "imgs")}}
    done = run_stage("prepare", tmp_path, params)
    assert_one_line_failure(done, "cats: class folder holds no images")
    assert [p.name for p in finished.iterdir()] == ["train.json"]
    assert not list((tmp_path / "data").glob(".*partial"))


def test_attack_without_uploads(tmp_path):
    done = run_stage("attack", tmp_path, RAW_PARAMS, "pure")
    assert_one_line_failure(done, "attack: error: uploads/pure: no uploads to attack (run extract@pure first)")


def test_a_prior_from_buffers_on_uploads_without_them_is_refused_before_any_job(tmp_path, fashion_images):
    """The setting asks for buffers, but its uploads were extracted before it did."""
    import copy

    images, labels, _, _ = fashion_images
    (tmp_path / "made").mkdir()
    (tmp_path / "uploads" / "pure").mkdir(parents=True)
    made = make_upload(tmp_path / "made", images[:4], labels[:4], name="epoch-000-trial-00")  # its checkpoint stays
    for path in (made, made.with_suffix(".json")):
        path.rename(tmp_path / "uploads" / "pure" / path.name)
    params = copy.deepcopy(RAW_PARAMS)
    params["settings"]["pure"] = {
        "scheme": "pure",
        "upload_buffers": True,
        "attack": {"bn_prior": 0.01, "bn_statistics": "from-buffers"},
    }
    params["report"]["budget"] = None  # pure-2x is no longer pure's client
    done = run_stage("attack", tmp_path, params, "pure")
    assert_one_line_failure(
        done,
        "epoch-000-trial-00.safetensors: attack.bn_statistics 'from-buffers', but the "
        "upload carries no BatchNorm buffers",
    )
    assert not (tmp_path / "attacks" / "pure").exists()


def test_scheme_stages_need_a_known_scheme(tmp_path):
    assert_one_line_failure(
        run_stage("train", tmp_path, RAW_PARAMS),
        "train: error: usage: python -m stages.train <scheme> (one of pure, ra, dp-sgd, clip-noise, gh)",
    )
    assert_one_line_failure(
        run_stage("train", tmp_path, RAW_PARAMS, "gradient"),
        "train: error: unknown scheme 'gradient'; params.yaml defines pure, ra, dp-sgd, clip-noise, gh",
    )


def test_setting_stages_need_a_known_setting(tmp_path):
    assert_one_line_failure(
        run_stage("extract", tmp_path, RAW_PARAMS, "sync"),
        "extract: error: unknown setting 'sync'; params.yaml defines pure, ra, dp-sgd, clip-noise, gh, ",
    )
    bad = {**RAW_PARAMS, "settings": {**RAW_PARAMS["settings"], "w3": {"scheme": "pure", "participants": 3}}}
    assert_one_line_failure(
        run_stage("extract", tmp_path, bad, "w3"),
        "extract: error: params.yaml: settings.w3: batch_size 4 does not split into 3 equal participant shards",
    )


def test_unreachable_mlflow_server_fails_fast_before_any_work(tmp_path):
    params = {**RAW_PARAMS, "data": {**RAW_PARAMS["data"], "train_size": 512, "test_size": 128}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    done = subprocess.run(
        [sys.executable, "-m", "stages.prepare"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert_one_line_failure(done, "prepare: error: MLflow tracking server http://127.0.0.1:9 is unreachable")
    assert not (tmp_path / "data").exists()


def test_full_disk_during_a_write_leaves_nothing_that_looks_finished(tmp_path):
    """The disk refuses writes past 2 MB (RLIMIT_FSIZE); the train split needs 4 MB."""
    import resource
    import signal

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))

    params = {**RAW_PARAMS, "data": {**RAW_PARAMS["data"], "train_size": 4000, "test_size": 128}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run(
        [sys.executable, "-m", "stages.prepare"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=small_disk,
    )
    assert_one_line_failure(
        done, "prepare: error: cannot write data/.prepared.partial/train.safetensors: File too large"
    )
    assert not (tmp_path / "data" / "prepared").exists()
    assert not list((tmp_path / "data").glob(".*"))


def test_a_missing_baseline_too_few_trials_and_no_family_are_refused_before_anything_is_written(tmp_path):
    settings = {k: v for k, v in RAW_PARAMS["settings"].items() if k != "pure"}
    done = run_stage("prepare", tmp_path, {**RAW_PARAMS, "settings": settings})
    assert_one_line_failure(
        done, "prepare: error: params.yaml: report.baseline: 'pure' is not a setting, so nothing can be paired with it"
    )
    done = run_stage("prepare", tmp_path, {**RAW_PARAMS, "extract": {**RAW_PARAMS["extract"], "trials": 0}})
    assert_one_line_failure(
        done, "prepare: error: params.yaml: extract.trials: Input should be greater than or equal to 1"
    )
    done = run_stage("extract", tmp_path, {**RAW_PARAMS, "extract": {**RAW_PARAMS["extract"], "trials": 1}}, "pure")
    assert_one_line_failure(
        done, "extract: error: params.yaml: extract.trials: 1 client batch per cell leaves no spread between batches"
    )
    unpaired = {k: v for k, v in RAW_PARAMS["settings"].items() if k in ("pure", "label-repeat", "pure-2x")}
    done = run_stage("report", tmp_path, {**RAW_PARAMS, "settings": unpaired})
    assert_one_line_failure(
        done, "report: error: params.yaml: report.baseline: no other setting pairs with 'pure' (the same batch size"
    )
    assert not (tmp_path / "data").exists() and not (tmp_path / "uploads").exists()
    assert not (tmp_path / "reports").exists()


def test_more_trials_than_the_pool_holds_are_refused_before_an_upload_is_written(tmp_path):
    params = {**RAW_PARAMS, "data": {**RAW_PARAMS["data"], "train_size": 200, "test_size": 50, "victims_per_class": 2}}
    assert run_stage("prepare", tmp_path, params).returncode == 0
    params["extract"] = {**RAW_PARAMS["extract"], "trials": 6}
    done = run_stage("extract", tmp_path, params, "pure")
    assert_one_line_failure(
        done,
        "extract: error: extract.trials 6 x batch_size 4 needs 24 distinct victims, but the "
        "pool holds 20 (raise data.victims_per_class)",
    )
    assert not (tmp_path / "uploads").exists() and not (tmp_path / "truth").exists()
