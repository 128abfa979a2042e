"""How the pipeline's processes start and tell themselves apart: the one place that knows the
launchers (torchrun, SLURM, Lightning's own) and how workers are started.

Stages and the library ask here whether they are the first process, how many processes a
launcher started, and for a CPU Fabric over workers; nothing else reads a launcher's variables.
"""

from __future__ import annotations

import os
import signal
from functools import cache
from typing import TYPE_CHECKING, Literal

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from lightning.fabric import Fabric

# What torchrun, Lightning and SLURM set in the processes they start. A run that must start its
# own world (the gate's clones, the tests' pipelines) gets an environment without them: inherited,
# they would make its multi-process stages join the launcher's rendezvous or bind a port in use.
LAUNCHER_VARIABLES = frozenset(
    {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "SLURM_PROCID"}
)
_RANKS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def is_first_process() -> bool:
    """False in the extra processes a distributed launcher (Lightning, torchrun, SLURM) starts."""
    return all(int(os.environ.get(k, "0")) == 0 for k in _RANKS)


def launched_processes() -> tuple[int, int] | None:
    """(processes per node, nodes) when torchrun started this process among others, else None."""
    if "LOCAL_WORLD_SIZE" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    per_node, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
    return (per_node, world // per_node) if world > 1 else None


def _sigint_ends_the_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@cache
def _forked_workers_die_on_sigint() -> None:
    """torch's process starter asks the kernel to send its workers SIGINT when their parent dies
    (a stage the OOM killer took). Under Python's handler a worker blocked in C++ (a rendezvous
    whose host died, a collective) would act on it only when that call returned, which a dead peer
    can make never; with the default action the kernel ends it at once. Set in the child right
    after the fork, before the rendezvous; registered once per process."""
    os.register_at_fork(after_in_child=_sigint_ends_the_worker)


def worker_fabric(
    processes: int, start: Literal["fork", "spawn", "launched"], accelerator: Literal["cpu", "gpu"] = "cpu"
) -> Fabric:
    """A Fabric (float32; gloo on CPU, NCCL on GPUs, one process per GPU) over `processes` workers
    it starts itself, forked (they begin with this process's imports: about a second each instead
    of ten, bench/attack.py) or spawned (a fresh interpreter each), or, `launched`, over the
    processes torchrun started."""
    from lightning.fabric import Fabric

    device = "cuda" if accelerator == "gpu" else "cpu"
    if start == "launched":
        launched = launched_processes()
        if launched is None:
            raise RuntimeError("worker_fabric(start='launched') outside a torchrun launch")
        return Fabric(
            accelerator=device, devices=launched[0], num_nodes=launched[1], strategy="ddp", precision="32-true"
        )
    if start == "fork":
        _forked_workers_die_on_sigint()
    return Fabric(accelerator=device, devices=processes, strategy=f"ddp_{start}", precision="32-true")


def resolve_accelerator(
    requested: Literal["cpu", "gpu", "auto"], key: str, processes: int = 1
) -> Literal["cpu", "gpu"]:
    """What `key` (cpu, gpu or auto) means on this machine: auto is gpu where torch sees a CUDA
    device. gpu without one, or with fewer devices than `processes`, is refused in one line
    before any work. Asks the driver, so no CUDA context starts and forking stays safe."""
    import torch
    from lightning.fabric.accelerators.cuda import num_cuda_devices  # fork-safe: NVML, no CUDA context

    if requested == "cpu":
        return "cpu"
    found = num_cuda_devices()
    if requested == "auto":
        return "gpu" if found >= processes else "cpu"
    if not found:
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a build without CUDA"
        raise PipelineError(f"{key}: gpu, but torch ({build}) sees no CUDA device here; use cpu or auto")
    if found < processes:
        raise PipelineError(f"{key}: gpu over {processes} processes, but torch sees {found} CUDA device(s)")
    return "gpu"


def threads_per_process(processes: int) -> int:
    """Threads each of `processes` processes gets when they share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // processes)
