"""Every shipped profile applies to params.yaml and validates; the paper profile is the original's scale."""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config import load_params
from pipeline.errors import PipelineError
from pipeline.parallel import LAUNCHER_VARIABLES
from pipeline.rank_analysis import ra_maxpool_kernel
from tests.conftest import REPO
from tools.apply_profile import apply_profile


@pytest.mark.parametrize("profile", sorted(p.name for p in (REPO / "profiles").glob("*.yaml")))
def test_profile_applies_and_validates(profile, tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    apply_profile(REPO / "profiles" / profile, params)
    load_params(params)
    assert "# Every knob" in params.read_text()  # comments survive


def test_paper_profile_is_the_original_setting(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    apply_profile(REPO / "profiles" / "paper.yaml", params)
    p = load_params(params)
    assert (p.model.arch, p.data.image_size, p.train.epochs, p.train.devices) == ("resnet18", 224, 90, 4)
    assert (p.train.lr, p.train.momentum, p.train.weight_decay, p.train.lr_milestones) == (0.1, 0.9, 1e-4, [30, 60])
    assert p.train.batch_size == 128 and p.train.batch_size * p.scheme("gh").batch_multiplier == 384
    assert p.scheme("gh").norm == "batch-async" and p.scheme("pure").norm == "batch-sync"
    assert p.scheme("ra").maxpool_kernel == "auto" and ra_maxpool_kernel("resnet18", 3, 1000, 224) == 19
    assert p.client.batch_size == 32 and p.attack.iterations == 15000
    assert p.setting("async-bn")[1].participants == 4 and p.setting("gh") == ("gh", p.setting("async-bn")[1])


def test_a_profile_key_params_yaml_lacks_is_refused(tmp_path):
    params, profile = tmp_path / "params.yaml", tmp_path / "typo.yaml"
    shutil.copy(REPO / "params.yaml", params)
    profile.write_text("train:\n  epoch: 3\n")
    with pytest.raises(PipelineError, match="profile sets 'train.epoch', which params.yaml does not have"):
        apply_profile(profile, params)


def test_a_profile_adds_a_setting_and_refuses_a_misspelt_one(tmp_path):
    params, profile = tmp_path / "params.yaml", tmp_path / "more.yaml"
    shutil.copy(REPO / "params.yaml", params)
    profile.write_text("settings:\n  sign: {scheme: pure, defense: {kind: sign}}\n")
    apply_profile(profile, params)
    assert load_params(params).setting("sign")[1].defense.kind == "sign"
    profile.write_text("settings:\n  local-step: {local_steps: 4}\n")  # local-steps, misspelt: no scheme
    with pytest.raises(PipelineError, match="missing key 'settings.local-step.scheme'"):
        apply_profile(profile, params)


def test_a_profile_adds_a_trained_scheme_and_refuses_an_incomplete_one(tmp_path):
    params, profile = tmp_path / "params.yaml", tmp_path / "more.yaml"
    shutil.copy(REPO / "params.yaml", params)
    scheme = "{norm: batch-sync, batch_multiplier: 1, maxpool_kernel: null, dp: null, defense: {kind: sign}}"
    profile.write_text(f"schemes:\n  signed: {scheme}\nsettings:\n  signed: {{scheme: signed}}\n")
    apply_profile(profile, params)
    assert load_params(params).scheme("signed").defense.kind == "sign"
    profile.write_text("schemes:\n  pur: {defense: {kind: sign}}\n")  # pure, misspelt: not a whole scheme
    with pytest.raises(PipelineError, match="missing key 'schemes.pur.norm'"):
        apply_profile(profile, params)


def _jpeg_folder(root: Path, classes: int = 4, per_class: int = 8) -> None:
    """224-px JPEGs (some larger, to be resized): colour, two grey, one CMYK, as ImageNet's are."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"n0{c}").mkdir(parents=True)
        for i in range(per_class):
            h, w = (224, 224) if i % 3 else (256, 300)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            pixels[:, :, c % 3] //= 2  # a class signal
            image = Image.fromarray(pixels)
            if (c, i) in ((0, 1), (2, 5)):
                image = image.convert("L")
            elif (c, i) == (3, 2):
                image = image.convert("CMYK")
            image.save(root / f"n0{c}" / f"{i:03d}.JPEG", quality=90)


@pytest.mark.slow
def test_the_paper_profile_runs_its_chain_on_a_224_px_folder(tmp_path):
    """profiles/paper.yaml with its epochs, iterations, checkpoints and batch cut down, on the
    CPU, over a streamed folder of 224-px JPEGs: `dvc repro` runs every stage; the RA scheme's
    ResNet-18 has the 19 x 19 stem maxpool of the original's ImageNet setting."""
    from tests.helpers import PROJECT_FILES, sh

    _jpeg_folder(tmp_path / "imagenet")
    root = tmp_path / "project"
    for name in PROJECT_FILES:
        src, dst = REPO / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_")) and k not in LAUNCHER_VARIABLES}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", DVC_NO_ANALYTICS="1", PYTHONPATH=str(root))
    cut = {  # what two CPU cores can run in minutes; the rest is the paper profile's
        "data": {"root": str(tmp_path / "imagenet"), "test_fraction": 0.1, "victims_per_class": 2, "stream_above": 0},
        "train": {
            "epochs": 1,
            "batch_size": 16,
            "accelerator": "cpu",
            "devices": 1,
            "loader_workers": 1,
            "checkpoint_steps": [1],
        },  # a few steps in all
        "extract": {"epochs": [1], "steps": [1], "trials": 2},  # the fewest a batch-level test takes
        "client": {"batch_size": 4},  # the paper's W = 4 shards and E = 4 steps of one 224-px image each
        # counts' probes at 224 px: minutes; the budget check (30 000 iterations) is not the chain's test
        "settings": {"label-repeat": {"attack": {"labels": "llg"}}, "pure-2x": None},
        "attack": {"iterations": 1, "processes": 2, "classic": False},  # the adaptive attacker only, as the gate
        "report": {"budget": None},  # pure-2x is dropped above
    }
    (root / "cut.yaml").write_text(yaml.safe_dump(cut))
    sh([sys.executable, "-m", "tools.apply_profile", "profiles/paper.yaml"], root, env)
    sh([sys.executable, "-m", "tools.apply_profile", "cut.yaml"], root, env)
    params = yaml.safe_load((root / "params.yaml").read_text())
    keep = {"pure", *yaml.safe_load((REPO / "profiles" / "paper.yaml").read_text())["settings"]} - {"pure-2x"}
    params["settings"] = {k: v for k, v in params["settings"].items() if k in keep}  # the paper's four, and pure
    params["schemes"] = {k: v for k, v in params["schemes"].items() if k in ("pure", "gh", "ra")}  # theirs, and RA
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    sh(git + ["init", "-q"], root, env)
    sh(git + ["add", "-A"], root, env)
    sh(git + ["commit", "-qm", "paper, cut down"], root, env)
    started = time.perf_counter()
    done = sh(["dvc", "repro"], root, env)
    print(f"paper profile, cut down: dvc repro {time.perf_counter() - started:.0f} s")
    assert "prepare: converted to RGB: 1 CMYK, 2 L image(s)" in done.stdout
    ra = json.loads((root / "models" / "ra" / "epoch-001.json").read_text())
    assert (ra["arch"], ra["image_size"], ra["maxpool_kernel"]) == ("resnet18", 224, 19)
    train = json.loads((root / "data" / "prepared" / "train.json").read_text())
    assert train["streamed"]["mode"] == "RGB" and train["channels"] == 3
    assert (root / "reports" / "results.md").is_file()
    assert sorted(p.name for p in (root / "attacks").iterdir()) == sorted(keep)


def test_a_profile_applied_twice_gives_the_same_parameters(tmp_path):
    """The gate applies the tiny profile to a clone that may already hold it: a dropped setting stays dropped."""
    params = tmp_path / "params.yaml"
    shutil.copy2(REPO / "params.yaml", params)
    apply_profile(REPO / "profiles" / "tiny.yaml", params)
    once = params.read_text()
    apply_profile(REPO / "profiles" / "tiny.yaml", params)
    assert params.read_text() == once and "pure-2x" not in yaml.safe_load(once)["settings"]


def test_a_profile_sets_a_schemes_optional_key_and_refuses_a_misspelt_one(tmp_path):
    params, profile = tmp_path / "params.yaml", tmp_path / "more.yaml"
    shutil.copy(REPO / "params.yaml", params)
    profile.write_text("schemes:\n  ra: {lr: 0.01}\n")
    apply_profile(profile, params)
    assert load_params(params).scheme("ra").lr == 0.01
    profile.write_text("schemes:\n  pure: {rate: 0.01}\n")
    with pytest.raises(PipelineError, match="unknown key 'schemes.pure.rate'"):
        apply_profile(profile, params)


def test_the_precode_profile_trains_precode_and_sign_at_their_own_step_sizes(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    apply_profile(REPO / "profiles" / "precode.yaml", params)
    p = load_params(params)
    assert p.scheme("precode").bottleneck.model_dump() == {"size": 256, "beta": 1e-3} and p.scheme("precode").lr == 5e-3
    assert p.scheme("sign-lr").defense.kind == "sign" and p.scheme("sign-lr").lr == 1e-4
    assert sorted(p.settings) == ["precode", "pure", "sign-lr"]
