"""The attack as jobs: one upload x one restart each, run in this process or sharded over
processes (Lightning Fabric; gloo on CPU, the same code under torchrun or SLURM).

A job's result depends only on the upload, the attack parameters and (seed, restart): the
same jobs give the same reconstructions on one process or several. Each job writes its
result to a file in a scratch folder; the caller combines the restarts of an upload.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.attack.invert import AttackSettings, Reconstruction, invert
from pipeline.attack.labels import recover_labels
from pipeline.checkpoints import ARCH_KEYS, load_checkpoint
from pipeline.config import AttackParams
from pipeline.files import load_tensors, save_tensors
from pipeline.nets import classifier_weight_name
from pipeline.uploads import check_fits, load_upload


@dataclass  # not frozen: Fabric's launcher walks its arguments and refuses frozen dataclasses
class Job:
    upload: Path
    restart: int

    def result_path(self, folder: Path) -> Path:
        return folder / f"{self.upload.stem}.restart-{self.restart:03d}.safetensors"


def settings_of(a: AttackParams, seed: int) -> AttackSettings:
    return AttackSettings(iterations=a.iterations, lr=a.lr, lr_min=a.lr_min, tv_weight=a.tv_weight,
                          restarts=a.restarts, seed=seed)


def run_job(job: Job, a: AttackParams, seed: int, progress: bool = True) -> Reconstruction:
    """One restart against one upload, with the client's exact architecture and mode rebuilt
    from the upload's threat model (maxpool kernel, GroupNorm, dropout and BatchNorm mode)."""
    upload = load_upload(job.upload)
    tm = upload.threat_model
    arch = {k: tm[k] for k in ARCH_KEYS}
    model, _ = load_checkpoint(Path(tm["checkpoint"]), expect={"sha256": tm["checkpoint_sha256"], **arch})
    check_fits(job.upload, upload, model)
    model.train(tm["mode"] == "train")
    labels = recover_labels(a.labels, upload.gradients[classifier_weight_name(model)], tm["batch_size"], upload.labels)
    # An attacker who knows the protocol normalises its dummy shards as the client's async BN did.
    shards = tm["participants"] if a.client_model == "exact" and tm["bn"] == "async" and tm["mode"] == "train" else 1
    shape = (tm["in_channels"], tm["image_size"], tm["image_size"])
    return invert(model, upload.gradients, labels, shape, tm["mean"], tm["std"], settings_of(a, seed),
                  progress=progress, restarts=[job.restart], shards=shards)


def save_result(path: Path, rec: Reconstruction) -> None:
    save_tensors(path, {"images": rec.images, "labels": rec.labels},
                 {"grad_loss": rec.grad_loss, "restart": rec.restart, "curve": rec.curve, "note": rec.note})


def load_result(path: Path) -> Reconstruction:
    tensors, meta = load_tensors(path, expected={"images", "labels"})
    return Reconstruction(tensors["images"], tensors["labels"], meta["grad_loss"], meta["restart"],
                          [tuple(point) for point in meta["curve"]], meta["note"])


def _run_share(rank: int, world: int, jobs: list[Job], a: AttackParams, seed: int, folder: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    for job in jobs[rank::world]:
        save_result(job.result_path(folder), run_job(job, a, seed, progress=rank == 0))


def _fabric_rank(fabric, jobs: list[Job], a: AttackParams, seed: int, folder: Path, threads: int) -> None:
    _run_share(fabric.global_rank, fabric.world_size, jobs, a, seed, folder, threads)
    fabric.barrier()


def run_jobs(jobs: list[Job], a: AttackParams, seed: int, folder: Path) -> None:
    """Run the jobs, `a.processes` at a time with `a.threads` threads each; results into `folder`."""
    if a.processes == 1 or len(jobs) <= 1:
        _run_share(0, 1, jobs, a, seed, folder, a.threads)
        return
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=min(a.processes, len(jobs)), strategy="ddp_spawn", precision="32-true")
    fabric.launch(_fabric_rank, jobs, a, seed, folder, a.threads)
