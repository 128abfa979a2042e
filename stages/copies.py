"""copies: which client uploads repeat, byte for byte, an upload of a setting before them (the
baseline first, then the settings on the baseline's scheme, then the rest, each in params.yaml's
order), under the same attack: attack@<setting> attacks only the others, and the report shows
such a cell as "same upload as <setting>".

Writes copies/<setting>.json for every setting ({"copies": {} } where none repeats), so each
attack stage depends on its own file alone. It computes nothing and opens no MLflow run; each
attack run records the copies it skipped.
"""

from pathlib import Path

from pipeline.checkpoints import checkpoint_label
from pipeline.copies import find_copies
from pipeline.files import atomic_dir, write_json
from stages._common import Stage, run

UPLOADS, COPIES = Path("uploads"), Path("copies")


def main(stage: Stage) -> None:
    p = stage.params
    baseline = p.report.baseline
    # who keeps a measurement: the baseline, then the settings on its scheme's checkpoints (an
    # untrained checkpoint of another scheme is the same model: the client behaviour is the measure)
    base_scheme = p.settings[baseline].scheme if baseline else None
    order = sorted(p.settings, key=lambda s: (s != baseline, p.settings[s].scheme != base_scheme))
    uploads = {s: sorted((UPLOADS / s).glob("*.safetensors")) for s in order}
    attacks = {
        s: None if p.attack_for(s).hyperparameters == "tuned" else {"seed": p.seed, **p.attack_for(s).model_dump()}
        for s in order
    }
    found = find_copies(uploads, attacks)
    with atomic_dir(COPIES) as out:
        for setting in p.settings:
            write_json(out / f"{setting}.json", {"setting": setting, "copies": found[setting]})
    for setting in p.settings:
        cells: dict[tuple[str, str], int] = {}
        for original in found[setting].values():
            cell = (original["checkpoint"], original["setting"])
            cells[cell] = cells.get(cell, 0) + 1
        for (at, original), count in cells.items():
            print(
                f"copies: {setting} at {checkpoint_label(at)}: {count} upload(s) are {original}'s, attacked there once"
            )


if __name__ == "__main__":
    run("copies", main, reads=("seed", "attack", "settings", "report"), computes=lambda params, setting: False)
