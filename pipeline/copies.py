"""Uploads that are one measurement under two names: the same checkpoint bytes and the same
client behaviour (an untrained checkpoint is the same for every scheme that starts from the same
seed), attacked the same way. Such an upload is attacked once; the other setting's cell says
whose it is. Reads metadata only (no torch), so the stage that decides it starts in a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.files import digest, load_meta, read_json

# Which setting, scheme and checkpoint file an upload came from: names, not what was measured.
_NAMES = ("setting", "scheme", "checkpoint", "sha256")


def measurement(path: Path, attack: dict[str, Any]) -> str:
    """A digest of what attacking the upload at `path` measures: its tensor file (by the sha256 its
    metadata holds, checked), its threat model less the names, and the attack run on it."""
    meta = load_meta(path)
    return digest(meta["sha256"], {k: v for k, v in meta.items() if k not in _NAMES}, attack)


def find_copies(
    uploads: dict[str, list[Path]], attacks: dict[str, dict[str, Any] | None]
) -> dict[str, dict[str, dict]]:
    """Per setting, its uploads whose measurement an earlier setting (in the order of `uploads`)
    already holds: {upload name: {"setting", "upload", "checkpoint", "trial"} of the one attacked}. A
    setting whose attack is None (hyper-parameters tuned on its own surrogates) is neither."""
    first: dict[str, tuple[str, Path]] = {}
    found: dict[str, dict[str, dict]] = {}
    for setting, paths in uploads.items():
        found[setting] = {}
        attack = attacks[setting]
        if attack is None:
            continue
        for path in paths:
            key = measurement(path, attack)
            if key not in first:
                first[key] = (setting, path)
                continue
            original, their_path = first[key]
            meta = load_meta(path)
            found[setting][path.stem] = {
                "setting": original,
                "upload": their_path.stem,
                "checkpoint": Path(meta["checkpoint"]).stem,
                "trial": meta["trial"],
            }
    return found


def copied_cells(folder: Path, settings: list[str]) -> dict[tuple[str, str], str]:
    """The (setting, checkpoint) cells whose uploads are another setting's (`folder`/<setting>.json, as
    stages.copies wrote them), each with that setting; a cell must be a copy whole or not at all."""
    cells: dict[tuple[str, str], set[str]] = {}
    for setting in settings:
        for original in read_json(folder / f"{setting}.json")["copies"].values():
            cells.setdefault((setting, original["checkpoint"]), set()).add(original["setting"])
    for (setting, at), originals in cells.items():
        if len(originals) > 1:
            raise PipelineError(f"{setting} at {at}: its uploads repeat several settings' ({sorted(originals)})")
    return {cell: originals.pop() for cell, originals in cells.items()}
