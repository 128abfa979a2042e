import pytest
import torch

from pipeline.checkpoints import load_checkpoint, save_checkpoint
from pipeline.errors import PipelineError
from pipeline.files import sha256
from pipeline.nets import build_model
from tests.helpers import ARCH


def test_round_trip_is_exact_and_byte_stable(tmp_path):
    model = build_model(**ARCH)
    save_checkpoint(tmp_path / "a.safetensors", model, {**ARCH, "epoch": 0})
    save_checkpoint(tmp_path / "b.safetensors", model, {**ARCH, "epoch": 0})
    assert sha256(tmp_path / "a.safetensors") == sha256(tmp_path / "b.safetensors")
    loaded, meta = load_checkpoint(tmp_path / "a.safetensors")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert meta["epoch"] == 0


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    save_checkpoint(tmp_path / "a.safetensors", build_model(**ARCH), ARCH)
    with pytest.raises(PipelineError, match="checkpoint has arch='convnet', expected 'resnet18'"):
        load_checkpoint(tmp_path / "a.safetensors", expect={"arch": "resnet18"})
    # metadata that lies about the architecture: the weights do not fit
    resnet = build_model("resnet18", 1, 10, 32)  # metadata below says convnet
    save_checkpoint(tmp_path / "b.safetensors", resnet, ARCH)
    with pytest.raises(PipelineError, match="weights do not fit a convnet"):
        load_checkpoint(tmp_path / "b.safetensors")
