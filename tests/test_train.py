import pytest
import torch

from pipeline.checkpoints import load_checkpoint
from pipeline.data import prepare
from pipeline.files import sha256
from pipeline.train import train
from tests.conftest import make_params


def test_training_writes_every_epoch_learns_and_is_byte_reproducible(fashion_root, tmp_path):
    params = make_params(
        data__train_size=1024,
        data__test_size=256,
        model__arch="convnet",
        train__epochs=2,
        train__batch_size=64,
        train__devices=1,
        extract__epochs=[0, 2],
    )
    data = prepare(params.data, params.seed)
    meta = {"classes": data.classes, "mean": data.mean, "std": data.std, "channels": 1, "image_size": 32}
    runs = []
    for name in ("a", "b"):
        written = train(data.train, data.test, meta, params, "pure", tmp_path / name)
        runs.append(written)
    names = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert names == ["epoch-000.safetensors", "epoch-001.safetensors", "epoch-002.safetensors"]
    for n in names:  # same seed, same bytes
        assert sha256(tmp_path / "a" / n) == sha256(tmp_path / "b" / n)
    accuracy = [m["test_accuracy"] for m in runs[0]]
    assert [m["epoch"] for m in runs[0]] == [0, 1, 2]
    assert accuracy[0] < 0.25 and accuracy[2] > 0.6  # chance at init, learning after two epochs
    model, ckpt = load_checkpoint(tmp_path / "a" / "epoch-002.safetensors")
    assert ckpt["test_accuracy"] == accuracy[2] and ckpt["scheme"] == "pure" and ckpt["mean"] == data.mean
    images = (data.test.images[:256].float() / 255 - data.mean[0]) / data.std[0]
    with torch.no_grad():
        again = (model.eval()(images).argmax(1) == data.test.labels[:256]).float().mean()
    assert abs(float(again) - accuracy[2]) < 1e-6  # the checkpoint's accuracy is the saved weights' accuracy


RESUME_SCRIPT = """
import sys
from pathlib import Path
from pipeline.data import prepare
from pipeline.train import train
from tests.conftest import make_params
params = make_params(data__train_size=512, data__test_size=128, model__arch="convnet", train__epochs=3,
                     train__batch_size=32, train__devices=1, extract__epochs=[0, 3], train__lr_milestones=[2])
data = prepare(params.data, params.seed)
meta = {"classes": data.classes, "mean": data.mean, "std": data.std, "channels": 1, "image_size": 32}
train(data.train, data.test, meta, params, sys.argv[2], Path(sys.argv[1]))
"""


@pytest.mark.parametrize("scheme", ["pure", "dp-sgd"])
def test_training_killed_by_a_signal_resumes_to_the_same_weights(fashion_root, tmp_path, scheme):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(whole), scheme], env=env, check=True, capture_output=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", RESUME_SCRIPT, str(killed), scheme],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    # the training state is saved after each epoch's checkpoint: killed once it exists, epoch 1 is behind it
    while not (killed / "resume.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "epoch-003.json").exists(), "the run finished before it could be killed"
    assert (killed / "resume.ckpt").exists()
    done = subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, str(killed), scheme], env=env, check=True, capture_output=True, text=True
    )
    assert "resuming after epoch" in done.stdout
    for epoch in range(4):
        name = f"epoch-{epoch:03d}.safetensors"
        assert sha256(whole / name) == sha256(killed / name), name
    assert not (killed / "resume.ckpt").exists()


def test_a_streamed_folder_trains_in_loader_workers_and_repeats_its_bytes(tmp_path):
    """Random crops and flips drawn in two DataLoader workers, seeded by Lightning: the same seed
    gives the same checkpoint bytes; the crops make it differ from training on the centre crops."""
    from pipeline.images import ImageIndex
    from tests.helpers import folder_params, mixed_folder

    mixed_folder(tmp_path / "imgs", per_class=20)
    changes = dict(
        model__arch="convnet", train__epochs=1, train__batch_size=8, train__devices=1, train__loader_workers=2,
        extract__epochs=[0, 1],
    )  # fmt: skip
    params = folder_params(tmp_path / "imgs", data__stream_above=0, **changes)
    data = prepare(params.data, params.seed)
    assert isinstance(data.train, ImageIndex)
    meta = {"classes": data.classes, "mean": data.mean, "std": data.std, "channels": 3, "image_size": 16}
    for name in ("a", "b"):
        written = train(data.train, data.test, meta, params, "pure", tmp_path / name)
    assert [m["epoch"] for m in written] == [0, 1]
    assert sha256(tmp_path / "a" / "epoch-001.safetensors") == sha256(tmp_path / "b" / "epoch-001.safetensors")
    centre = prepare(folder_params(tmp_path / "imgs", data__stream_above=None, **changes).data, params.seed)
    train(centre.train, centre.test, meta, params, "pure", tmp_path / "centre")
    assert sha256(tmp_path / "centre" / "epoch-000.safetensors") == sha256(tmp_path / "a" / "epoch-000.safetensors")
    assert sha256(tmp_path / "centre" / "epoch-001.safetensors") != sha256(tmp_path / "a" / "epoch-001.safetensors")
