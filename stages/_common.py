"""What every stage shares: parameters, the one-line error contract, its MLflow run.

DVC runs each stage from the project root and tells it its name (DVC_STAGE) and the real
project root (DVC_ROOT, which differs from the working folder in temporary experiments).
"""

from __future__ import annotations

import ast
import errno
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline.config import Params, load_params
from pipeline.errors import PipelineError
from pipeline.files import digest, sha256
from pipeline.parallel import is_first_process
from pipeline.tracking import open_run, tracking_uri

# Write failures that are the machine's state, not a bug: reported in one line.
_DISK_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES}


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")  # the project's own: what a stage's code is made of


def _module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    found = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return found if found.is_file() else None


def source_files(module: str) -> list[Path]:
    """The project's source files that running `module` (say "stages.attack") executes: the
    module, every pipeline/ or stages/ module it imports (lazy imports inside functions too),
    transitively, and the packages' __init__ files on the way; relative to the project root.
    What a stage's dvc.yaml deps must list, and what its resume fingerprint digests."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            path = _module_file(".".join(parts[:depth]))
            if path is None or path in seen:
                continue
            seen.add(path)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    todo += [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    # `from pipeline.attack import invert` may name a module as well as an attribute
                    todo += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        todo = [n for n in todo if n.split(".")[0] in PACKAGES]
    return sorted(path.relative_to(ROOT) for path in seen)


def code_digest(module: str) -> str:
    """A digest of the source `module` runs (source_files): resumed work must come from the same code."""
    return digest([(path.as_posix(), sha256(ROOT / path)) for path in source_files(module)])


class _NoTracking:
    """Stands in for `mlflow` on processes other than rank 0: only rank 0 logs."""

    def __getattr__(self, _name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@dataclass
class Stage:
    name: str
    params: Params
    root: Path  # where the MLflow store lives
    scheme: str | None = None  # for the stages that run once per scheme (train@pure, ...)
    setting: str | None = None  # for those that run once per client setting (extract@async-bn, ...)
    mlflow: Any = None  # the tracking module, with this execution's run active

    @property
    def run_name(self) -> str:
        item = self.setting or self.scheme
        return os.environ.get("DVC_STAGE") or (f"{self.name}@{item}" if item else self.name)

    @property
    def tracking_uri(self) -> str:
        return tracking_uri(self.root)

    def _tags(self) -> dict[str, str]:
        return {
            "dvc.stage": self.run_name,
            "stage": self.name,
            **({"scheme": self.scheme} if self.scheme else {}),
            **({"setting": self.setting} if self.setting else {}),
            "git.commit": self.code_version[0],
            "git.dirty": str(self.code_version[1]).lower(),
            **{
                f"dvc.{k[4:].lower()}": v
                for k, v in os.environ.items()
                if k in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")
            },
        }

    @cached_property
    def code_version(self) -> tuple[str, bool]:
        """The commit, and whether the library or stages differ from it (outputs and dvc.lock,
        which `dvc repro` itself rewrites, do not count)."""
        commit = _git(self.root, "rev-parse", "HEAD") or "unknown"
        return commit, bool(
            _git(self.root, "status", "--porcelain", "--untracked-files=no", "--", "pipeline", "stages")
        )

    def group(self) -> tuple[str, str]:
        """The pipeline version this run belongs to: the code and every parameter. Its stage runs
        share one parent run, whether one `dvc repro` or several made them."""
        commit, dirty = self.code_version
        params = digest(self.params.model_dump())
        return digest(commit, dirty, params), f"pipeline {commit[:7]}{'+dirty' if dirty else ''} params {params[:8]}"


def _sections(tree: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The parameter sections (or dotted single keys) a stage reads, as a nested dict."""
    picked: dict[str, Any] = {}
    for key in keys:
        *parents, leaf = key.split(".")
        src, dst = tree, picked
        for part in parents:
            src, dst = src[part], dst.setdefault(part, {})
        dst[leaf] = src[leaf]
    return picked


def run(
    name: str,
    body: Callable[[Stage], None],
    reads: tuple[str, ...],
    computes: Callable[[Params, str | None], bool] | None = None,
) -> None:
    """Run a stage body inside its MLflow run (first process only), logging the `reads` parameters.

    `reads` names parameter sections or dotted keys; "{scheme}" (or "{setting}") in one stands
    for the scheme (or client setting) given on the command line. Where `computes(params,
    setting)` says False, the body only writes down that there is nothing to do: it runs
    without torch's setup or an MLflow run (seconds saved per stage). A PipelineError, or a
    write the disk refuses, becomes one line on stderr and exit status 2.
    """
    try:
        params = load_params(Path("params.yaml"))
        scheme = setting = None
        if any("{scheme}" in key for key in reads):
            if len(sys.argv) != 2:
                raise PipelineError(f"usage: python -m stages.{name} <scheme> (one of {', '.join(params.schemes)})")
            scheme = sys.argv[1]
            params.scheme(scheme)  # an unknown name is refused here
        elif any("{setting}" in key for key in reads):
            if len(sys.argv) != 2:
                raise PipelineError(f"usage: python -m stages.{name} <setting> (one of {', '.join(params.settings)})")
            setting = sys.argv[1]
            scheme, _ = params.setting(setting)  # an unknown name is refused here
        if computes is not None and not computes(params, setting):
            body(Stage(name, params, Path(os.environ.get("DVC_ROOT", ".")).resolve(), scheme, setting, _NoTracking()))
            return
        import torch

        # = use_deterministic_algorithms(True) for eager kernels, without the import of
        # torch._inductor that call makes (seconds of every stage's start: docs/benchmarks.md)
        torch.set_deterministic_debug_mode("error")
        stage = Stage(name, params, Path(os.environ.get("DVC_ROOT", ".")).resolve(), scheme, setting)
        logged = _sections(params.model_dump(), tuple(key.format(scheme=scheme, setting=setting) for key in reads))
        if setting is not None and "client" in logged:  # the client this setting makes of it, not the plain one
            logged["client"] = params.setting(setting)[1].model_dump()
        tags = {**stage._tags(), "params.digest": digest(logged)}  # equal digests: the same parameters
        tracked = (
            open_run(stage.root, stage.run_name, logged, tags, stage.group())
            if is_first_process()
            else nullcontext(_NoTracking())
        )
        with tracked as stage.mlflow:
            body(stage)
    except PipelineError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in _DISK_ERRORS:
            raise
        print(
            f"{name}: error: cannot write {err.filename or 'an output'}: {err.strerror}; no output was finished",
            file=sys.stderr,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; no output was finished", file=sys.stderr)
        sys.exit(130)
