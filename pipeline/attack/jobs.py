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

import torch

from pipeline.attack.invert import invert
from pipeline.attack.restarts import Reconstruction, save_reconstruction
from pipeline.attack.target import Target
from pipeline.parallel import launched_processes, resolve_accelerator, worker_fabric
from pipeline.sections import AttackParams


@dataclass  # not frozen: Fabric's launcher walks its arguments and refuses frozen dataclasses
class Job:
    upload: Path
    restart: int

    def result_path(self, folder: Path) -> Path:
        return folder / f"{self.upload.stem}.restart-{self.restart:03d}.safetensors"

    def done(self, folder: Path) -> bool:
        """Whether a run (this one, or one killed before) finished the job: its metadata, written last, is there."""
        return self.result_path(folder).with_suffix(".json").is_file()


def _timed_job(job: Job, target: Target, a: AttackParams, seed: int, progress: bool) -> Reconstruction:
    started = time.perf_counter()
    rec = invert(target, a, seed, restarts=[job.restart], progress=progress)
    rec.seconds = round(time.perf_counter() - started, 3)
    return rec


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep memory freed at the top of its heap (up to 1 GiB) and serve
    blocks up to 32 MiB from there, instead of handing them back to the system and faulting
    them in again. An attack step builds and frees the same tensors every iteration, and each
    handed back is faulted in again the next (docs/benchmarks.md). False where the C library is
    not glibc (its own policy stands)."""
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


@dataclass  # not frozen: see Job
class Work:
    """Jobs against their targets (by upload path), with one attack and seed, results into `folder`."""

    jobs: list[Job]
    targets: dict[Path, Target]
    a: AttackParams
    seed: int
    folder: Path

    def todo(self) -> list[Job]:
        return [job for job in self.jobs if not job.done(self.folder)]


def _run_share(
    work: Work, jobs: list[Job], rank: int = 0, world: int = 1, accelerator: str = "cpu", local_rank: int = 0
) -> None:
    """This process's share of `jobs`: all of them, each on its part of the batch (split: batch),
    or every world-th."""
    a = work.a
    torch.set_num_threads(a.threads)
    keep_freed_memory()
    device = job_device(accelerator, local_rank)
    there = {path: target.to(device) for path, target in work.targets.items()}
    if a.split == "batch":  # every process on every job; the first one writes
        for job in jobs:
            rec = _timed_job(job, there[job.upload], a, work.seed, progress=rank == 0)
            if rank == 0:
                save_reconstruction(job.result_path(work.folder), rec)
        return
    for job in jobs[rank::world]:
        rec = _timed_job(job, there[job.upload], a, work.seed, progress=rank == 0)
        save_reconstruction(job.result_path(work.folder), rec)


def _fabric_rank(fabric, work: Work, accelerator: str) -> None:
    fabric.barrier()  # started by torchrun, the first process has made the folder by now
    todo = work.todo()
    fabric.barrier()  # all processes have seen the same finished jobs before any writes one
    _run_share(work, todo, fabric.global_rank, fabric.world_size, accelerator, fabric.local_rank)
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


def run_jobs(jobs: list[Job], targets: dict[Path, Target], a: AttackParams, seed: int, folder: Path) -> None:
    """Run the jobs not yet done in `folder` (a killed run's are kept) against `targets` (by
    upload path) on `a.processes` processes of `a.threads` threads each, or, started by
    torchrun, on its processes (every one of them calls this with the same jobs; the first
    makes `folder`); results into `folder`."""
    launched = launched_processes()
    processes = process_count(jobs, a, folder)
    accelerator = resolve_accelerator(a.accelerator, "attack.accelerator", max(processes, 1))
    for path in dict.fromkeys(job.upload for job in jobs):
        targets[path].check(a, processes)
    work = Work(jobs, targets, a, seed, folder)
    if processes <= 1 or not jobs:
        _run_share(work, work.todo(), accelerator=accelerator)
        return
    # Forked, not spawned, when this process starts them: they leave by os._exit, so no MLflow exit
    # hook runs (no CUDA context is made here before the fork: resolve_accelerator asks NVML). The
    # forked processes inherit the targets: no upload or checkpoint is read again.
    fabric = worker_fabric(processes, "launched" if launched else "fork", accelerator)
    fabric.launch(_fabric_rank, work, accelerator)  # type: ignore[arg-type]  # *args are passed on
