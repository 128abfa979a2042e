"""The attack as jobs: one upload x one restart each, run in this process or over processes
(Lightning Fabric on gloo: processes it forks here, or those torchrun started, on one node or
several): either the jobs shard over the processes, or every process works on every job with
its part of the dummy batch.

A job's result depends only on the upload, the attack parameters and (seed, restart): the
same jobs give the same reconstructions on one process or several (bytes when the jobs shard,
float tolerance when the batch splits: the dummy gradient is then summed in another order).
Each job writes its result to a file in a scratch folder; the caller combines the restarts.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from pipeline.attack.invert import (
    LocalSteps,
    Reconstruction,
    best_of,
    check_split,
    gradient_loss,
    invert,
    min_loss_combination,
    pixel_box,
    statistics_from_buffers,
)
from pipeline.attack.labels import mean_prediction, recover_labels
from pipeline.checkpoints import load_checkpoint
from pipeline.client import step_parts
from pipeline.config import AttackParams
from pipeline.errors import PipelineError
from pipeline.files import load_tensors, save_tensors
from pipeline.nets import batchnorm_layers, classifier_weight_name
from pipeline.parallel import launched_processes, resolve_accelerator, worker_fabric
from pipeline.uploads import ThreatModel, Upload, check_fits, load_upload


@dataclass  # not frozen: Fabric's launcher walks its arguments and refuses frozen dataclasses
class Job:
    upload: Path
    restart: int

    def result_path(self, folder: Path) -> Path:
        return folder / f"{self.upload.stem}.restart-{self.restart:03d}.safetensors"

    def done(self, folder: Path) -> bool:
        """Whether a run (this one, or one killed before) finished the job: its metadata, written last, is there."""
        return self.result_path(folder).with_suffix(".json").is_file()


@dataclass
class Target:
    """What the attacker has for one upload: the client's model rebuilt, the gradient, labels."""

    model: torch.nn.Module
    gradients: dict[str, torch.Tensor]
    labels: torch.Tensor
    shards: int
    threat_model: ThreatModel
    bn_statistics: dict[str, torch.Tensor] | None  # the prior's reference when exact or from buffers; None: running
    local_steps: LocalSteps | None  # the client's E > 1 steps, unrolled by the exact client model

    @property
    def adapted(self) -> bool:
        """Whether this attacker models the client otherwise than the classic one does."""
        return self.shards > 1 or self.local_steps is not None


def target_of(job: Job, a: AttackParams) -> Target:
    """The client's exact architecture and mode rebuilt from the upload's threat model (maxpool
    kernel, GroupNorm, dropout and BatchNorm mode), the checkpoint's hash checked."""
    upload = load_upload(job.upload)
    tm = upload.threat_model
    model, _ = load_checkpoint(Path(tm.checkpoint), expect={"sha256": tm.checkpoint_sha256, **tm.arch_meta})
    check_fits(job.upload, upload, model)
    model.train(tm.mode == "train")
    labels = _labels(a, model, upload)
    # An attacker who knows the protocol normalises its dummy shards as the client's async BN did,
    # and takes the client's local steps on the same parts of its dummy batch.
    exact = a.client_model == "exact"
    shards = tm.participants if exact and tm.bn == "async" and tm.mode == "train" else 1
    local_steps = None
    if exact and tm.local_steps > 1:
        try:
            parts = step_parts(tm.batch_size, tm.participants, tm.local_steps)
        except PipelineError as err:
            raise PipelineError(f"{job.upload}: the threat model's local steps: {err}") from None
        local_steps = LocalSteps(parts, separate=shards > 1, lr=tm.lr)
    statistics = None
    if a.bn_prior and a.bn_statistics == "exact":
        if batchnorm_layers(model) and not upload.bn_statistics:
            raise PipelineError(
                f"{job.upload}: attack.bn_statistics 'exact', but the upload reveals no BatchNorm "
                "statistics (extract it again with extract.reveal_bn_statistics: true)"
            )
        statistics = upload.bn_statistics
    if a.bn_prior and a.bn_statistics == "from-buffers" and batchnorm_layers(model):
        if not upload.bn_buffers or tm.bn_momentum is None:
            raise PipelineError(
                f"{job.upload}: attack.bn_statistics 'from-buffers', but the upload carries no BatchNorm "
                "buffers and momentum (extract it again with client.upload_buffers: true)"
            )
        try:
            statistics = statistics_from_buffers(
                model, upload.bn_buffers, tm.bn_momentum, tm.local_steps, tm.step_images, tm.image_shape
            )
        except ValueError as err:
            raise PipelineError(f"{job.upload}: attack.bn_statistics 'from-buffers': {err}") from None
    return Target(model, upload.gradients, labels, shards, tm, statistics, local_steps)


def _labels(a: AttackParams, model: torch.nn.Module, upload: Upload) -> torch.Tensor:
    tm, weight = upload.threat_model, classifier_weight_name(model)
    bias, mean_probs = None, None
    if a.labels == "counts":
        bias = upload.gradients.get(weight.removesuffix("weight") + "bias")
        mean_probs = mean_prediction(model, tm.image_shape, *pixel_box(tm.mean, tm.std))
    return recover_labels(a.labels, upload.gradients[weight], tm.batch_size, upload.labels, bias, mean_probs)


def combined(upload: Path, found: list[Reconstruction], a: AttackParams, seed: int) -> Reconstruction:
    """One upload's restarts made its reconstruction: the one of lowest gradient loss (`a.combine`
    best), or their image-by-image combination (mlco), its loss that of the attacker `a`."""
    if a.combine == "best" or len(found) < 2:
        return best_of(found)
    t = target_of(Job(upload, 0), a)
    return min_loss_combination(
        found, lambda images: gradient_loss(t.model, t.gradients, images, t.labels, a, seed, t.shards, t.local_steps)
    )


def classic_of(a: AttackParams) -> AttackParams:
    """The classic attacker with the same budget and objective: one full-batch gradient, with
    `a`'s values as they stand (a study tuned the adaptive attacker, not it)."""
    return a.model_copy(update={"client_model": "plain", "classic": False, "hyperparameters": "fixed"})


def check_upload(path: Path, a: AttackParams, processes: int) -> None:
    """Refuse, before any process starts, an upload the attack cannot run on (or, with
    split: batch, whose dummy batch cannot split `processes` ways)."""
    t = target_of(Job(path, 0), a)
    if t.local_steps is not None and a.compile:
        raise PipelineError(
            f"{path}: attack.compile: the compiled step does not unroll the client's "
            f"{t.threat_model.local_steps} local steps (compile: false, or client_model: plain)"
        )
    if a.split != "batch":
        return
    try:
        if t.local_steps is not None and processes > 1:
            raise ValueError(
                "unrolled local steps train on parts of the whole dummy batch (use split: jobs, or client_model: plain)"
            )
        check_split(t.model, len(t.labels), t.shards, processes, a.bn_prior)
    except ValueError as err:
        raise PipelineError(f"{path}: attack.split batch: {err}") from None


def run_job(
    job: Job,
    a: AttackParams,
    seed: int,
    progress: bool = True,
    split_batch: bool = False,
    device: torch.device | None = None,
) -> Reconstruction:
    """One restart against one upload (with `split_batch`, this process's part of it), on
    `device` (the CPU by default): the model, upload and dummy batch there, the result back here."""
    t = target_of(job, a)
    tm = t.threat_model
    device = device or torch.device("cpu")

    def there(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        return None if tensors is None else {k: v.to(device) for k, v in tensors.items()}

    return invert(
        t.model.to(device),
        cast(dict, there(t.gradients)),
        t.labels,
        tm.image_shape,
        tm.mean,
        tm.std,
        a,
        seed,
        progress=progress,
        restarts=[job.restart],
        shards=t.shards,
        split_batch=split_batch,
        bn_statistics=there(t.bn_statistics),
        local_steps=t.local_steps,
    )


def save_result(path: Path, rec: Reconstruction) -> None:
    save_tensors(
        path,
        {"images": rec.images, "labels": rec.labels},
        {
            "grad_loss": rec.grad_loss,
            "restart": rec.restart,
            "curve": rec.curve,
            "note": rec.note,
            "iterations_run": rec.iterations_run,
            "seconds": rec.seconds,
            "tail": None if rec.tail is None else list(rec.tail),
            "converged": rec.converged,
        },
    )


def load_result(path: Path) -> Reconstruction:
    tensors, meta = load_tensors(path, expected={"images", "labels"})
    return Reconstruction(
        tensors["images"],
        tensors["labels"],
        meta["grad_loss"],
        meta["restart"],
        [tuple(point) for point in meta["curve"]],
        meta["note"],
        meta["iterations_run"],
        meta["seconds"],
        None if meta["tail"] is None else tuple(meta["tail"]),
        meta["converged"],
    )


def _timed_job(job: Job, a: AttackParams, seed: int, **options) -> Reconstruction:
    started = time.perf_counter()
    rec = run_job(job, a, seed, **options)
    rec.seconds = round(time.perf_counter() - started, 3)
    return rec


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep memory freed at the top of its heap (up to 1 GiB) and serve
    blocks up to 32 MiB from there, instead of handing them back to the system and faulting
    them in again. An attack step builds and frees the same tensors every iteration: on the
    ConvNet at B = 8, 3 000 page faults a step, a seventh of its time. False where the C library
    is not glibc (its own policy stands)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_trim_threshold, 1 << 30)) and bool(mallopt(m_mmap_threshold, 1 << 25))


def job_device(accelerator: str, local_rank: int) -> torch.device:
    """The device a process's jobs run on, made deterministic where its kernels allow. On CUDA the
    kernels that have no deterministic form (docs/scale.md) warn instead of stopping the attack."""
    if accelerator != "gpu":
        torch.set_deterministic_debug_mode("error")  # use_deterministic_algorithms(True), without importing inductor
        return torch.device("cpu")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic reductions
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 as on the CPU
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _run_share(
    rank: int,
    world: int,
    jobs: list[Job],
    a: AttackParams,
    seed: int,
    folder: Path,
    threads: int,
    accelerator: str = "cpu",
    local_rank: int = 0,
) -> None:
    torch.set_num_threads(threads)
    keep_freed_memory()
    device = job_device(accelerator, local_rank)
    if a.split == "batch":  # every process on every job; the first one writes
        for job in jobs:
            rec = _timed_job(job, a, seed, progress=rank == 0, split_batch=world > 1, device=device)
            if rank == 0:
                save_result(job.result_path(folder), rec)
        return
    for job in jobs[rank::world]:
        save_result(job.result_path(folder), _timed_job(job, a, seed, progress=rank == 0, device=device))


def _fabric_rank(
    fabric, jobs: list[Job], a: AttackParams, seed: int, folder: Path, threads: int, accelerator: str
) -> None:
    fabric.barrier()  # started by torchrun, the first process has made `folder` by now
    todo = [job for job in jobs if not job.done(folder)]
    fabric.barrier()  # all processes have seen the same finished jobs before any writes one
    _run_share(fabric.global_rank, fabric.world_size, todo, a, seed, folder, threads, accelerator, fabric.local_rank)
    fabric.barrier()


def process_count(jobs: list[Job], a: AttackParams, folder: Path) -> int:
    """The processes run_jobs runs `jobs` on: torchrun's, or `a.processes` (when the jobs shard,
    no more than there are jobs not yet done in `folder`)."""
    launched = launched_processes()
    if launched:
        return launched[0] * launched[1]
    if a.split == "batch":
        return a.processes
    return min(a.processes, sum(not job.done(folder) for job in jobs))


def run_jobs(jobs: list[Job], a: AttackParams, seed: int, folder: Path) -> None:
    """Run the jobs not yet done in `folder` (a killed run's are kept) on `a.processes` processes
    of `a.threads` threads each, or, started by torchrun, on its processes (every one of them
    calls this with the same jobs; the first makes `folder`); results into `folder`."""
    launched = launched_processes()
    processes = process_count(jobs, a, folder)
    accelerator = resolve_accelerator(a.accelerator, "attack.accelerator", max(processes, 1))
    for path in dict.fromkeys(job.upload for job in jobs):
        check_upload(path, a, processes)
    if processes <= 1 or not jobs:
        _run_share(0, 1, [job for job in jobs if not job.done(folder)], a, seed, folder, a.threads, accelerator)
        return
    # Forked, not spawned, when this process starts them: they leave by os._exit, so no MLflow exit
    # hook runs (no CUDA context is made here before the fork: resolve_accelerator asks NVML).
    fabric = worker_fabric(processes, "launched" if launched else "fork", accelerator)
    fabric.launch(_fabric_rank, jobs, a, seed, folder, a.threads, accelerator)  # type: ignore[arg-type]  # *args are passed on
