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
        train__checkpoint_steps=[],
        extract__steps=[],
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
                     train__batch_size=32, train__devices=1, extract__epochs=[0, 3], train__lr_milestones=[2],
                     train__checkpoint_steps=[4, 20, 36], extract__steps=[])  # 16 steps an epoch: one in each
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
    # and the step checkpoints of epochs 2 and 3 (steps 20 and 36) are not all written yet
    while not (killed / "resume.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "epoch-003.json").exists(), "the run finished before it could be killed"
    assert not (killed / "step-000036.json").exists()
    assert (killed / "resume.ckpt").exists()
    done = subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, str(killed), scheme], env=env, check=True, capture_output=True, text=True
    )
    assert "resuming after epoch" in done.stdout
    names = [*(f"epoch-{e:03d}" for e in range(4)), *(f"step-{s:06d}" for s in (4, 20, 36))]
    for name in names:
        assert sha256(whole / f"{name}.safetensors") == sha256(killed / f"{name}.safetensors"), name
    assert not (killed / "resume.ckpt").exists()


def test_a_streamed_folder_trains_in_loader_workers_and_repeats_its_bytes(tmp_path):
    """Random crops and flips drawn in two DataLoader workers, seeded by Lightning: the same seed
    gives the same checkpoint bytes; the crops make it differ from training on the centre crops."""
    from pipeline.images import ImageIndex
    from tests.helpers import folder_params, mixed_folder

    mixed_folder(tmp_path / "imgs", per_class=20)
    changes = dict(
        model__arch="convnet", train__epochs=1, train__batch_size=8, train__devices=1, train__loader_workers=2,
        extract__epochs=[0, 1], train__checkpoint_steps=[], extract__steps=[],
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


def _plain_sgd_states(params, data, meta, epochs: int, defense=None) -> dict[int, dict[str, torch.Tensor]]:
    """The weights after each optimizer step of a plain loop on one process: SGD with momentum and
    weight decay over the sampler's batches, each step's gradient defended first where `defense` is."""
    import lightning as L
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from pipeline.data import normalise
    from pipeline.defenses import defended
    from pipeline.nets import build_model
    from pipeline.train import architecture

    L.seed_everything(params.seed, workers=True, verbose=False)
    model = build_model(**architecture(params, params.scheme("pure"), meta, None))
    hp = params.train
    opt = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    dataset = TensorDataset(normalise(data.train.images, data.mean, data.std), data.train.labels)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=params.seed)
    states, step = {}, 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for images, labels in DataLoader(dataset, batch_size=hp.batch_size, sampler=sampler):
            opt.zero_grad()
            F.cross_entropy(model.train()(images), labels).backward()
            if defense is not None:
                grads = {n: p.grad for n, p in model.named_parameters()}
                for name, g in defended(grads, defense).items():
                    grads[name].copy_(g)
            opt.step()
            step += 1
            states[step] = {n: v.clone() for n, v in model.state_dict().items()}
    return states


def test_a_step_checkpoint_holds_the_weights_a_plain_loop_reaches_after_that_many_steps(fashion_root, tmp_path):
    """On one process: SGD with momentum and weight decay over the sampler's batches, step by step,
    gives the step checkpoints' bytes; the checkpoint at an epoch's last step is the epoch's."""
    params = make_params(
        data__train_size=256, data__test_size=64, model__arch="convnet", train__epochs=2, train__batch_size=32,
        train__devices=1, extract__epochs=[0, 2], train__checkpoint_steps=[1, 3, 8, 11], extract__steps=[8],
    )  # fmt: skip
    data = prepare(params.data, params.seed)
    meta = {"classes": data.classes, "mean": data.mean, "std": data.std, "channels": 1, "image_size": 32}
    written = train(data.train, data.test, meta, params, "pure", tmp_path)
    # at one step, the epoch's checkpoint first (pipeline.checkpoints.written_checkpoints)
    assert [(m["checkpoint"], m["step"], m["epoch"]) for m in written] == [
        ("epoch-000", 0, 0), ("step-000001", 1, None), ("step-000003", 3, None), ("epoch-001", 8, 1),
        ("step-000008", 8, None), ("step-000011", 11, None), ("epoch-002", 16, 2),
    ]  # fmt: skip
    assert all(0 <= m["test_accuracy"] <= 1 for m in written)

    states = _plain_sgd_states(params, data, meta, epochs=2)
    for step in params.train.checkpoint_steps:
        saved, _ = load_checkpoint(tmp_path / f"step-{step:06d}.safetensors")
        for name, value in states[step].items():
            assert torch.equal(saved.state_dict()[name], value), (step, name)
    at_epoch_end, _ = load_checkpoint(tmp_path / "step-000008.safetensors")
    epoch_one, _ = load_checkpoint(tmp_path / "epoch-001.safetensors")
    for name, value in epoch_one.state_dict().items():
        assert torch.equal(at_epoch_end.state_dict()[name], value), name


@pytest.mark.parametrize(
    "defense",
    [
        {"kind": "prune", "ratio": 0.9},
        {"kind": "clip", "bound": 0.5, "scope": "global"},
        {"kind": "clip", "bound": 0.1, "scope": "per-tensor"},
        {"kind": "sign"},
    ],
    ids=["prune", "clip-global", "clip-per-tensor", "sign"],
)
def test_a_defended_scheme_steps_with_the_defended_gradient(fashion_root, tmp_path, defense):
    """A scheme's defense is the client's transform (pipeline.defenses.defended) of each step's batch
    gradient before SGD's momentum and weight decay: a plain loop doing that reaches the step
    checkpoints' bytes, and they differ from the undefended loop's (the defense acted)."""
    params = make_params(
        data__train_size=256, data__test_size=64, model__arch="convnet", train__epochs=1, train__batch_size=32,
        train__devices=1, extract__epochs=[0, 1], train__checkpoint_steps=[1, 3], extract__steps=[3],
        schemes__pure__defense=defense,
    )  # fmt: skip
    data = prepare(params.data, params.seed)
    meta = {"classes": data.classes, "mean": data.mean, "std": data.std, "channels": 1, "image_size": 32}
    train(data.train, data.test, meta, params, "pure", tmp_path)
    _, saved_meta = load_checkpoint(tmp_path / "step-000003.safetensors")
    assert saved_meta["defense"] == params.scheme("pure").defense.model_dump()

    trained = params.scheme("pure").defense
    with_defense, without = (_plain_sgd_states(params, data, meta, 1, d) for d in (trained, None))
    for step in (1, 3):
        saved, _ = load_checkpoint(tmp_path / f"step-{step:06d}.safetensors")
        for name, value in saved.state_dict().items():
            assert torch.equal(with_defense[step][name], value), (step, name)
    assert not torch.equal(with_defense[3]["fc.weight"], without[3]["fc.weight"])


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([4, 4], "train: checkpoint_steps: a step is listed twice"),
        ([-1], "train.checkpoint_steps"),
        ([0], "train.checkpoint_steps"),
        ([17], "train.checkpoint_steps: step 17 is past the last of pure's run (2 epochs of 8 steps: 16)"),
    ],
)
def test_a_checkpoint_step_negative_repeated_or_past_the_run_is_refused_in_one_line(tmp_path, steps, message):
    from tests.conftest import RAW_PARAMS
    from tests.helpers import assert_one_line_failure, run_stage

    raw = {**RAW_PARAMS, "data": {**RAW_PARAMS["data"], "train_size": 256, "test_size": 64}}
    assert run_stage("prepare", tmp_path, raw).returncode == 0
    raw = {**raw, "train": {**RAW_PARAMS["train"], "epochs": 2, "batch_size": 32, "checkpoint_steps": steps}}
    raw["extract"] = {**RAW_PARAMS["extract"], "epochs": [0, 2], "steps": []}
    assert_one_line_failure(run_stage("train", tmp_path, raw, "pure"), message)
    assert not (tmp_path / "models" / "pure").exists()


def test_an_extracted_step_train_does_not_write_is_refused():
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match=r"extract.steps: step 5 is not one train writes"):
        make_params(train__checkpoint_steps=[4], extract__steps=[5])
