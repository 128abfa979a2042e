import pandas as pd
import pytest
import torch

from pipeline.checkpoints import (
    epoch_checkpoint,
    load_checkpoint,
    save_checkpoint,
    step_checkpoint,
    training_order,
    written_checkpoints,
)
from pipeline.errors import PipelineError
from pipeline.files import sha256, write_json
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


def test_checkpoints_come_in_training_order(tmp_path):
    # epoch 1 ends at step 4, where a step checkpoint is written too: the epoch's comes first
    written = {epoch_checkpoint(0): 0, step_checkpoint(2): 2, step_checkpoint(4): 4, epoch_checkpoint(1): 4}
    written |= {step_checkpoint(16): 16, epoch_checkpoint(2): 8}
    for name, step in written.items():
        write_json(tmp_path / f"{name}.json", {"checkpoint": name, "step": step})
    (tmp_path / "rank_analysis.json").write_text("{}")  # not a checkpoint
    order = ["epoch-000", "step-000002", "epoch-001", "step-000004", "epoch-002", "step-000016"]
    assert [meta["checkpoint"] for meta in written_checkpoints(tmp_path)] == order
    table = pd.DataFrame({"checkpoint": list(written) * 2, "step": list(written.values()) * 2})
    assert training_order(table) == order
