"""Files between stages: tensors as safetensors beside a JSON of metadata, written atomically.

A tensor file `x.safetensors` always has its metadata in `x.json`, which records the
tensor file's SHA-256: a truncated, swapped or tampered file is refused with its path.
Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from pipeline.errors import PipelineError

if TYPE_CHECKING:  # torch is imported by the functions that move tensors: a stage that writes JSON alone starts fast
    import torch


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if err.filename is None:  # a failed write() names no file: name the output
            err.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


FINGERPRINT = ".fingerprint"


def partial_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


@contextmanager
def atomic_dir(path: str | Path, fingerprint: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block succeeds.

    A stage that dies half-way leaves its previous output, or none, never a partial one.
    With a `fingerprint` (a digest of everything the output depends on), the work a killed
    run left in the temporary directory is kept for the next run with the same
    fingerprint, so long stages can resume; any other leftover is discarded.
    """
    path, tmp = Path(path), partial_path(path)
    marker = tmp / FINGERPRINT
    resumable = fingerprint is not None and marker.is_file() and marker.read_text() == fingerprint
    if not resumable:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if fingerprint is not None:
            marker.write_text(fingerprint)
    try:
        yield tmp
    except BaseException:
        if fingerprint is None:  # nothing to resume: leave no trace
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    marker.unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


@contextmanager
def resumable_scratch(output: str | Path, fingerprint: str) -> Iterator[Path]:
    """A work folder beside the file `output` for a stage that writes `output` itself: kept after
    a killed run for the next run with the same `fingerprint` (anything else left there is
    discarded), removed once the block succeeds."""
    output = Path(output)
    tmp = output.with_name(f".{output.name}.work.partial")  # not partial_path: atomic_file's name for output
    marker = tmp / FINGERPRINT
    if not (marker.is_file() and marker.read_text() == fingerprint):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        marker.write_text(fingerprint)
    yield tmp
    shutil.rmtree(tmp)


def digest(*parts: Any) -> str:
    """A digest of JSON-able parts (parameters, input hashes): equal inputs, equal digest."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def tree_digest(folder: str | Path) -> str:
    """A digest of every file's name and contents under `folder`."""
    folder = Path(folder)
    return digest(sorted((p.relative_to(folder).as_posix(), sha256(p)) for p in folder.rglob("*") if p.is_file()))


def dumps_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(dumps_json(obj))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path}: not valid JSON ({err})") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write `path` (.safetensors) and its metadata beside it (.json, with the file's hash)."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_file(path) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        except SafetensorError as err:  # its I/O errors (a full disk) surface as OSError, like any write
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
        file_digest = sha256(tmp)
    write_json(path.with_suffix(".json"), {**meta, "sha256": file_digest})


def load_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of tensor file `path`; refuses a file whose hash does not match."""
    path = Path(path)
    meta = read_json(path.with_suffix(".json"))
    if not isinstance(meta, dict) or "sha256" not in meta:
        raise PipelineError(f"{path.with_suffix('.json')}: metadata without the tensor file's sha256")
    if not path.is_file():
        raise PipelineError(f"{path}: tensor file not found")
    if sha256(path) != meta["sha256"]:
        raise PipelineError(f"{path}: contents do not match the sha256 in its metadata (truncated or modified)")
    return meta


def load_tensors(path: str | Path, expected: set[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a tensor file and its verified metadata; `expected` names the keys it must hold."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = load_meta(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise PipelineError(f"{path}: not a safetensors file ({err})") from None
    if expected is not None and set(tensors) != expected:
        missing = sorted(expected - set(tensors))
        extra = sorted(set(tensors) - expected)
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise PipelineError(f"{path}: tensors do not match what was expected ({detail})")
    return tensors, meta
