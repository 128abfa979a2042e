import json
import pickle

import pytest
import torch
from pydantic import ValidationError

from pipeline.checkpoints import load_checkpoint, save_checkpoint
from pipeline.errors import PipelineError
from pipeline.files import load_meta, sha256, write_json
from pipeline.nets import build_model
from pipeline.uploads import Upload, check_fits, load_truth, load_upload, save_truth, save_upload, threat_model
from tests.helpers import ARCH, CLIENT


def test_upload_round_trip_keeps_gradients_and_threat_model(upload_file):
    upload = load_upload(upload_file)
    assert upload.threat_model.batch_size == 2 and upload.labels is None
    assert set(upload.gradients) == {n for n, _ in build_model(**ARCH).named_parameters()}
    assert upload.bn_statistics == {}  # not revealed


def test_the_threat_model_is_read_back_as_the_client_stated_it(upload_file, tmp_path):
    upload = load_upload(upload_file)
    assert upload.threat_model == threat_model(
        build_model(**ARCH), tmp_path / "ckpt.safetensors", load_meta(tmp_path / "ckpt.safetensors"), CLIENT, "pure", 0
    )
    assert upload.threat_model.image_shape == (1, 32, 32) and upload.threat_model.arch_meta == ARCH
    with pytest.raises(ValidationError):  # frozen: what the server knows is not edited on the way
        upload.threat_model.lr = 1.0


DROP = object()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bn": DROP}, "threat model: missing key 'bn'"),
        ({"colour": "red"}, "threat model: unknown key 'colour'"),
        ({"bn": "none"}, "threat model: bn: Input should be 'sync' or 'async' (got 'none')"),
        ({"lr": -0.1}, "threat model: lr: Input should be greater than 0 (got -0.1)"),
        ({"local_steps": "two"}, "threat model: local_steps: Input should be a valid integer"),
    ],
)
def test_a_threat_model_with_a_missing_unknown_or_bad_key_is_refused_in_one_line(upload_file, change, message):
    meta = json.loads(upload_file.with_suffix(".json").read_text())
    meta.update(change)
    write_json(upload_file.with_suffix(".json"), {k: v for k, v in meta.items() if v is not DROP})
    with pytest.raises(PipelineError, match=rf"^{upload_file}: ") as refused:
        load_upload(upload_file)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_revealed_batchnorm_statistics_travel_beside_the_gradients(upload_file, tmp_path):
    upload = load_upload(upload_file)
    statistics = {"features.1.mean": torch.randn(1, 2, 32), "features.1.var": torch.rand(1, 2, 32)}
    save_upload(tmp_path / "revealed.safetensors", Upload(upload.gradients, upload.threat_model, statistics))
    again = load_upload(tmp_path / "revealed.safetensors")
    assert set(again.gradients) == set(upload.gradients)
    assert set(again.bn_statistics) == set(statistics)
    assert all(torch.equal(again.bn_statistics[n], s) for n, s in statistics.items())


def test_tampered_gradient_bytes_are_refused(upload_file):
    raw = bytearray(upload_file.read_bytes())
    raw[-5] ^= 0xFF  # same length, one value changed
    upload_file.write_bytes(bytes(raw))
    with pytest.raises(PipelineError, match="do not match the sha256"):
        load_upload(upload_file)


def test_threat_model_pointing_at_another_checkpoint_is_refused(upload_file, tmp_path):
    save_checkpoint(tmp_path / "other.safetensors", build_model(**ARCH), ARCH)  # other random weights
    meta_path = upload_file.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["checkpoint"] = str(tmp_path / "other.safetensors")
    meta_path.write_text(json.dumps(meta))
    upload = load_upload(upload_file)
    with pytest.raises(PipelineError, match="checkpoint has sha256="):
        load_checkpoint(upload.threat_model.checkpoint, expect={"sha256": upload.threat_model.checkpoint_sha256})


def test_truth_is_not_an_upload(tmp_path):
    save_truth(tmp_path / "t.safetensors", torch.zeros(1, 1, 4, 4, dtype=torch.uint8), torch.tensor([3]), {})
    with pytest.raises(PipelineError, match="not an upload"):
        load_upload(tmp_path / "t.safetensors")
    images, labels, _ = load_truth(tmp_path / "t.safetensors")
    assert labels.tolist() == [3]


def test_truncated_upload_is_refused_naming_the_file(upload_file):
    upload_file.write_bytes(upload_file.read_bytes()[:-100])
    with pytest.raises(PipelineError, match=rf"^{upload_file}: .*do not match the sha256"):
        load_upload(upload_file)


def test_gradient_of_the_wrong_shape_for_the_architecture_is_refused(upload_file):
    upload = load_upload(upload_file)
    check_fits(upload_file, upload, build_model(**ARCH))  # the right one fits
    upload.gradients["fc.weight"] = upload.gradients["fc.weight"][:, :-1]
    with pytest.raises(
        PipelineError, match=rf"^{upload_file}: gradient 'fc.weight' has shape \(10, \d+\), the architecture needs"
    ):
        check_fits(upload_file, upload, build_model(**ARCH))
    with pytest.raises(PipelineError, match="not a parameter of the convnet"):
        check_fits(upload_file, load_upload(upload_file), build_model("convnet", 1, 10, 32, maxpool_kernel=3))


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['PAYLOAD_MARK']).write_text('ran')",))


def test_pickle_disguised_as_an_upload_is_refused_and_never_executed(upload_file, tmp_path, monkeypatch):
    mark = tmp_path / "payload-ran"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    upload_file.write_bytes(pickle.dumps(_Payload()))
    meta = json.loads(upload_file.with_suffix(".json").read_text())
    write_json(upload_file.with_suffix(".json"), {**meta, "sha256": sha256(upload_file)})  # a consistent disguise
    with pytest.raises(PipelineError, match=rf"^{upload_file}: not a safetensors file"):
        load_upload(upload_file)
    assert not mark.exists()
    pickle.loads(upload_file.read_bytes())  # the payload is live: unpickling it would have run it
    assert mark.read_text() == "ran"
