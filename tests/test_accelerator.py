"""Where the attack and training run: cpu, gpu or auto. A gpu asked for on a machine without one
is refused in one line before any work; auto falls back to the CPU. The tests marked `gpu` need
a CUDA device and are skipped, with one line saying so, without one."""

import pytest
import torch

from pipeline.attack.jobs import Job
from pipeline.attack.restarts import load_reconstruction
from pipeline.checkpoints import load_checkpoint
from pipeline.errors import PipelineError
from pipeline.images import Split
from pipeline.parallel import resolve_accelerator
from pipeline.train import strategy_options, train
from tests.conftest import RAW_PARAMS, make_params
from tests.helpers import (
    MEAN,
    STD,
    assert_one_line_failure,
    attack_params,
    make_upload,
    psnr,
    run_stage,
    run_upload_jobs,
)

CUDA = torch.cuda.is_available()
no_cuda = pytest.mark.skipif(CUDA, reason="this machine has a CUDA device: nothing to refuse")


@no_cuda
def test_gpu_without_a_cuda_device_is_one_line_and_auto_is_the_cpu():
    with pytest.raises(PipelineError, match=r"^attack.accelerator: gpu, but torch \(.*\) sees no CUDA device here"):
        resolve_accelerator("gpu", "attack.accelerator")
    assert resolve_accelerator("auto", "attack.accelerator", 2) == "cpu"
    assert resolve_accelerator("cpu", "attack.accelerator") == "cpu"
    params = make_params(train__accelerator="auto")
    assert strategy_options(params.train, params.scheme("pure"))["accelerator"] == "cpu"


@no_cuda
@pytest.mark.parametrize(
    "stage, section, argument", [("attack", "attack", "pure"), ("tune", "attack", "pure"), ("train", "train", "pure")]
)
def test_a_stage_asked_for_a_gpu_here_stops_before_any_work(tmp_path, stage, section, argument):
    # an empty project: any work (reading uploads, data, a study) would fail otherwise, and later
    params = {**RAW_PARAMS, section: {**RAW_PARAMS[section], "accelerator": "gpu"}}
    if stage == "tune":
        params["attack"]["hyperparameters"] = "tuned"
    done = run_stage(stage, tmp_path, params, argument)
    assert_one_line_failure(done, f"{stage}: error: {section}.accelerator: gpu, but torch (")
    assert "sees no CUDA device here; use cpu or auto" in done.stderr


def test_auto_attacks_on_the_cpu_here_and_gives_the_cpu_bytes(tmp_path, fashion_images):
    images, labels, _, _ = fashion_images
    upload = make_upload(tmp_path, images[:2], labels[:2])
    jobs = [Job(upload, 0)]
    results = {}
    for accelerator in ("cpu", "auto"):
        folder = tmp_path / accelerator
        folder.mkdir()
        run_upload_jobs(
            jobs, attack_params(attack__accelerator=accelerator, attack__iterations=20), seed=0, folder=folder
        )
        results[accelerator] = load_reconstruction(jobs[0].result_path(folder))
    if not CUDA:
        assert torch.equal(results["cpu"].images, results["auto"].images)
        assert results["cpu"].grad_loss == results["auto"].grad_loss


gpu = pytest.mark.gpu
# The tests below run where a GPU is lent: such a machine holds no data set, so their images are
# seeded and made here (smooth, like photos at 32 px, and, for training, a learnable pattern).


def smooth_images(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` normalised 1 x 32 x 32 images (8 x 8 noise upsampled) and distinct labels."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 1, 8, 8, generator=gen)
    pixels = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)
    return (pixels - MEAN[0]) / STD[0], torch.arange(count) % 10


def pattern_split(count: int, seed: int) -> Split:
    """uint8 images whose class is where a bright 8 x 8 block sits (10 places), under noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=gen)
    images = torch.randint(0, 64, (count, 1, 32, 32), generator=gen, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        row, col = divmod(c, 4)
        images[i, 0, 8 * row : 8 * row + 8, 8 * col : 8 * col + 8] += 160
    return Split(images, labels)


@gpu
def test_the_attack_on_a_gpu_matches_the_cpu_within_float_tolerance(tmp_path):
    """Same starts (drawn on the CPU), same steps: the GPU's kernels sum in other orders, so the
    sign steps agree for the first iterations and the reconstruction's quality stays that of the CPU."""
    images, labels = smooth_images(4)
    upload = make_upload(tmp_path, images, labels)
    found = {}
    for accelerator, iterations in (("cpu", 10), ("gpu", 10), ("cpu", 200), ("gpu", 200)):
        folder = tmp_path / f"{accelerator}-{iterations}"
        folder.mkdir()
        params = attack_params(attack__accelerator=accelerator, attack__iterations=iterations, attack__restarts=1)
        run_upload_jobs([Job(upload, 0)], params, seed=0, folder=folder)
        found[accelerator, iterations] = load_reconstruction(Job(upload, 0).result_path(folder))
    assert found["gpu", 10].images.device.type == "cpu"  # results come back to the CPU
    assert torch.allclose(found["cpu", 10].images, found["gpu", 10].images, atol=1e-3)
    assert abs(psnr(found["gpu", 200], images) - psnr(found["cpu", 200], images)) < 2.0


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_jobs_sharded_over_two_gpus_give_the_one_gpu_bytes(tmp_path):
    images, labels = smooth_images(4)
    uploads = [
        make_upload(tmp_path, images[2 * i : 2 * i + 2], labels[2 * i : 2 * i + 2], name=f"e{i}") for i in (0, 1)
    ]  # noqa: E501
    jobs = [Job(u, 0) for u in uploads]
    for processes in (1, 2):
        (tmp_path / str(processes)).mkdir()
        params = attack_params(attack__accelerator="gpu", attack__processes=processes, attack__restarts=1)
        run_upload_jobs(jobs, params, seed=0, folder=tmp_path / str(processes))
    for job in jobs:
        one, two = (load_reconstruction(job.result_path(tmp_path / str(p))) for p in (1, 2))
        assert torch.equal(one.images, two.images)


def train_twice(tmp_path, accelerator: str) -> list[dict]:
    params = make_params(
        model__arch="convnet", train__epochs=1, train__devices=1, train__accelerator=accelerator,
        extract__epochs=[0, 1], train__checkpoint_steps=[], extract__steps=[],  # 16 steps: under the default's
    )  # fmt: skip
    split, test = pattern_split(1024, seed=0), pattern_split(256, seed=1)
    meta = {"classes": [str(c) for c in range(10)], "mean": [0.3], "std": [0.3], "channels": 1, "image_size": 32}
    for run in ("a", "b"):
        written = train(split, test, meta, params, "pure", tmp_path / run)
    return written


@gpu
def test_training_on_a_gpu_learns_and_reproduces_itself(tmp_path):
    written = train_twice(tmp_path, "gpu")
    assert written[0]["test_accuracy"] < 0.3 and written[1]["test_accuracy"] > 0.6  # chance, then the pattern
    a, _ = load_checkpoint(tmp_path / "a" / "epoch-001.safetensors")
    b, _ = load_checkpoint(tmp_path / "b" / "epoch-001.safetensors")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-5), name  # deterministic kernels: the same run twice agrees
