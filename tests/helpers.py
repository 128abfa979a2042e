"""What several test modules build the same way: the plain client, small models, an upload,
stage and tool runs that must fail in one line, image folders, a copy of the project, and
scipy's power of a t-test.
Fixtures live in conftest.py; no test module imports another."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from scipy import stats

from pipeline.attack.invert import invert
from pipeline.attack.jobs import Job, run_jobs
from pipeline.attack.restarts import Reconstruction
from pipeline.attack.service import targets_of
from pipeline.attack.target import Target, Victim
from pipeline.checkpoints import epoch_checkpoint, save_checkpoint
from pipeline.client import batch_gradient, simulate_client
from pipeline.data import to_unit_range
from pipeline.files import load_meta
from pipeline.metrics import image_metrics, pair_by_hungarian
from pipeline.nets import build_model
from pipeline.parallel import LAUNCHER_VARIABLES
from pipeline.sections import ClientParams, ExtractParams
from pipeline.uploads import Upload, save_upload, threat_model, upload_of
from tests.conftest import REPO, make_params

# ---- the client -------------------------------------------------------------------------------


def plain_client(batch_size: int, mode: str = "train", lr: float = 1.0, **changes) -> ClientParams:
    """The plain client (ClientParams.plain) with `changes` to its protocol, validated as params.yaml's are."""
    plain = ClientParams.plain(batch_size, mode, lr)
    return ClientParams(**{**plain.model_dump(), **changes}) if changes else plain


# the upload_file fixture's client: two images, one step of 0.01
CLIENT = plain_client(2, lr=0.01)

# ---- small models -----------------------------------------------------------------------------

# the small ConvNet on 32-px grey images, as a checkpoint's metadata spells its architecture
ARCH = {
    "arch": "convnet",
    "in_channels": 1,
    "num_classes": 10,
    "image_size": 32,
    "norm": "batch",
    "maxpool_kernel": None,
}

# ---- uploads ----------------------------------------------------------------------------------

MEAN, STD = [0.286], [0.353]  # Fashion-MNIST's normalisation (the fashion_images fixture's)


def make_upload(
    folder: Path,
    images,
    labels,
    norm="batch",
    maxpool_kernel=None,
    participants=1,
    bn="sync",
    name="epoch-000",
    mode="train",
    reveal_bn_statistics=False,
    local_steps=1,
    lr=0.01,
    upload_buffers=False,
    epoch=0,
    defense=None,
    bottleneck=None,
) -> Path:
    """A client's upload of `images` from an untrained ConvNet (seed 0) whose checkpoint says
    `epoch`, the checkpoint beside it in `folder` as <name>/epoch-<epoch>.safetensors (a checkpoint
    is known by its file's name), the labels revealed; returns the upload's path. `bottleneck`:
    PRECODE's block ({size, beta}) in the ConvNet."""
    arch = {**ARCH, "norm": norm, "maxpool_kernel": maxpool_kernel}
    arch.update({"bottleneck": bottleneck} if bottleneck else {})
    torch.manual_seed(0)
    model = build_model(**arch)
    checkpoint = folder / name / f"{epoch_checkpoint(epoch)}.safetensors"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(checkpoint, model, {**arch, "mean": MEAN, "std": STD, "scheme": "s", "epoch": epoch, "step": epoch})
    client = plain_client(
        len(labels),
        mode,
        lr,
        participants=participants,
        bn=bn,
        local_steps=local_steps,
        upload_buffers=upload_buffers,
        defense=defense,
    )
    update = simulate_client(model, images, labels, client, seed=0)
    reveal = ExtractParams(
        epochs=[epoch], steps=[], trials=2, reveal_labels=True, reveal_bn_statistics=reveal_bn_statistics
    )
    path = folder / f"{name}.safetensors"
    save_upload(path, upload_of(update, model, (checkpoint, load_meta(checkpoint)), client, "s", 0, labels, reveal))
    return path


def two_image_upload(folder: Path) -> Path:
    """The upload_file fixture: CLIENT's upload of two random images from an untrained ARCH
    (folder/up.safetensors), its checkpoint at folder/ckpt.safetensors, nothing revealed."""
    model = build_model(**ARCH)
    checkpoint = folder / "ckpt.safetensors"
    save_checkpoint(checkpoint, model, {**ARCH, "mean": [0.3], "std": [0.3], "scheme": "pure", "epoch": 0, "step": 0})
    threat = threat_model(model, checkpoint, load_meta(checkpoint), CLIENT, "pure", 0)
    grads = batch_gradient(model, torch.randn(2, 1, 32, 32), torch.tensor([1, 2]), "train")
    save_upload(folder / "up.safetensors", Upload(grads, threat))
    return folder / "up.safetensors"


def target_of(model, gradients, labels, mean=MEAN, std=STD, shape=(1, 32, 32), **modelled) -> Target:
    """What `invert` takes: the gradient `gradients` at `model` of a batch with `labels` of images
    of `shape` (normalised by mean and std); `modelled`: shards, bn_statistics, local_steps."""
    return Target(model, gradients, labels, shape, tuple(mean), tuple(std), **modelled)


def run_upload_jobs(jobs: list[Job], a, seed: int, folder: Path) -> None:
    """pipeline.attack.jobs.run_jobs on these jobs, each upload loaded once as the attack stage does."""
    victims = [Victim.load(path) for path in dict.fromkeys(job.upload for job in jobs)]
    run_jobs(jobs, targets_of(victims, a), a, seed, folder)


def attack_one(path: Path, a, seed: int = 0, restart: int = 0) -> Reconstruction:
    """One restart of attacker `a` against the upload at `path`, in this process."""
    return invert(Target.of(Victim.load(path), a), a, seed, restarts=[restart], progress=False)


def attack_params(**changes):
    """params.yaml's attack, small: 60 iterations, 2 restarts, one process of one thread."""
    return make_params(
        **{"attack__iterations": 60, "attack__restarts": 2, "attack__processes": 1, "attack__threads": 1, **changes}
    ).attack


def psnr(rec, images) -> float:
    """Mean PSNR (dB) of a reconstruction of normalised `images`, paired by the Hungarian rule."""
    got, truth = to_unit_range(rec.images, MEAN, STD), to_unit_range(images, MEAN, STD)
    return float(image_metrics(got[pair_by_hungarian(got, truth)], truth)["psnr"].mean())


# ---- command lines that fail in one line ------------------------------------------------------


def run_stage(stage: str, cwd: Path, params: dict, *args: str) -> subprocess.CompletedProcess:
    """`python -m stages.<stage> args` in `cwd`, with `params` as its params.yaml and its own MLflow store."""
    (cwd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def assert_one_line_failure(done: subprocess.CompletedProcess, expected: str) -> None:
    """Exit status 2 and one line on stderr that holds `expected`."""
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert expected in lines[0]


# ---- image folders ----------------------------------------------------------------------------


def image_folder(root, classes=("cat", "dog"), per_class=5, mode="RGB", size=(40, 30)):
    """A folder of class folders of random PNGs (`mode`, `size` pixels), as an ImageFolder dataset."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")


def mixed_folder(root, per_class=6):
    """Mostly colour PNGs, two grey ones and one CMYK JPEG, as ImageNet's training set mixes them."""
    image_folder(root, classes=("cat", "dog"), per_class=per_class)
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 255, (30, 40), dtype=np.uint8)
    Image.fromarray(grey, "L").save(root / "cat" / "grey-0.png")
    Image.fromarray(grey[::-1].copy(), "L").save(root / "dog" / "grey-1.png")
    cmyk = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), "RGB").convert("CMYK")
    cmyk.save(root / "dog" / "cmyk.jpg", quality=95)
    return grey


def folder_params(root, **changes):
    """params.yaml reading the image folder at `root` at 16 px, two victims a class."""
    base = dict(
        data__source="imagefolder", data__root=str(root), data__image_size=16, data__test_fraction=0.2,
        data__victims_per_class=2, data__train_size=None, data__test_size=None,
    )  # fmt: skip
    return make_params(**{**base, **changes})


# ---- the project copied -----------------------------------------------------------------------

PROJECT_FILES = [
    "pipeline",
    "stages",
    "tools",
    "profiles",
    "params.yaml",
    "dvc.yaml",
    ".dvc/config",
    ".dvcignore",
    ".gitignore",
    "pyproject.toml",
]


def sh(args, cwd, env, check=True):
    """Run `args` in `cwd`; unless check is false, a failure raises with the ends of its output."""
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and done.returncode:
        raise AssertionError(f"{args} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def copy_project(root: Path) -> dict:
    """The project's files in `root`, the tiny profile applied, committed; returns the environment to run in."""
    for name in PROJECT_FILES:
        src, dst = REPO / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_")) and k not in LAUNCHER_VARIABLES}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", DVC_NO_ANALYTICS="1", PYTHONPATH=str(root))
    sh([sys.executable, "-m", "tools.apply_profile", "profiles/tiny.yaml"], root, env)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    sh(git + ["init", "-q"], root, env)
    sh(git + ["add", "-A"], root, env)
    sh(git + ["commit", "-qm", "tiny project"], root, env)
    return env


def noncentral_t_power(size: float, batches: int, alpha: float) -> float:
    """scipy's power of a two-sided one-sample t-test of `batches` values at standardised `size`:
    the noncentral t's two tails, an independent computation of `pipeline.statistics.t_test_power`.
    Its far tail, below 1e-10 where the tests use it, comes out nan from scipy at some shifts:
    counted as 0."""
    df, shift = batches - 1, size * np.sqrt(batches)
    crit = stats.t.isf(alpha / 2, df)
    return float(stats.nct.sf(crit, df, shift) + np.nan_to_num(stats.nct.cdf(-crit, df, shift)))
