import pickle

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.files import atomic_dir, load_tensors, save_tensors, sha256, write_json


def test_atomic_dir_keeps_old_output_when_the_body_fails(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed half-way")
    assert (out / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial folder left behind


def test_tensor_files_round_trip_and_are_byte_stable(tmp_path):
    tensors = {"w": torch.randn(3, 4), "n": torch.tensor([1, 2])}
    save_tensors(tmp_path / "a.safetensors", tensors, {"epoch": 1})
    save_tensors(tmp_path / "b.safetensors", dict(reversed(tensors.items())), {"epoch": 1})
    assert sha256(tmp_path / "a.safetensors") == sha256(tmp_path / "b.safetensors")
    loaded, meta = load_tensors(tmp_path / "a.safetensors", expected={"w", "n"})
    assert torch.equal(loaded["w"], tensors["w"]) and meta["epoch"] == 1


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "a.safetensors"
    save_tensors(path, {"w": torch.randn(100)}, {})
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(PipelineError, match="do not match the sha256"):
        load_tensors(path)


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


def test_pickle_in_place_of_tensors_is_refused_never_executed(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(pickle.dumps(_Boom()))
    write_json(path.with_suffix(".json"), {"sha256": sha256(path)})  # even with a matching hash
    with pytest.raises(PipelineError, match="not a safetensors file"):
        load_tensors(path)
