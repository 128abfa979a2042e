"""Every shipped profile applies to params.yaml and validates; the paper profile is the original's scale."""

import shutil

import pytest

from pipeline.config import load_params
from pipeline.errors import PipelineError
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
