"""Label recovery methods side by side on a setting's uploads: each method's labels for every
upload, scored against the truth (the multiset overlap the evaluate stage reports).

    python -m tools.labels <setting> [--methods llg,counts]

Run after `dvc repro` (it reads uploads/<setting> and truth/<setting>, writes nothing). The
methods see only the upload and its checkpoint; the truth is read here only to score them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.attack.labels import LABEL_METHODS
from pipeline.attack.target import Target, Victim
from pipeline.config import load_params
from pipeline.errors import PipelineError
from pipeline.metrics import label_accuracy
from pipeline.uploads import load_truth
from tools import fail


def label_rows(setting: str, methods: list[str]) -> list[dict]:
    """One row per (method, checkpoint): mean label accuracy over the uploads and how many were exact."""
    p = load_params(Path("params.yaml"))
    p.setting(setting)  # an unknown name is refused here
    victims = [Victim.load(u) for u in sorted(Path("uploads", setting).glob("*.safetensors"))]
    if not victims:
        raise PipelineError(f"uploads/{setting}: no uploads (run `dvc repro extract@{setting}` first)")
    cells: dict[tuple[str, str], list[float]] = {}
    for method in methods:
        a = p.attack_for(setting).model_copy(update={"labels": method})
        for v in victims:
            got = Target.of(v, a).labels
            _, truth, _ = load_truth(Path("truth", setting, v.path.name))
            cells.setdefault((method, v.threat_model.at), []).append(label_accuracy(got, truth))
    return [
        {
            "method": m,
            "checkpoint": e,
            "uploads": len(v),
            "accuracy": sum(v) / len(v),
            "exact": sum(x == 1.0 for x in v),
        }
        for (m, e), v in cells.items()
    ]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.labels", description=__doc__.split("\n\n")[0])
    parser.add_argument("setting")
    parser.add_argument("--methods", default="llg,counts", help="comma-separated, of " + ", ".join(LABEL_METHODS[1:]))
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in LABEL_METHODS[1:]]
    if unknown:
        fail("labels", f"--methods: unknown method {unknown[0]!r}; choose of {', '.join(LABEL_METHODS[1:])}")
    try:
        rows = label_rows(args.setting, methods)
    except PipelineError as err:
        fail("labels", str(err))
    print(f"{args.setting}: label accuracy by recovery method, mean over the uploads of each checkpoint")
    print("| method | checkpoint | uploads | label accuracy | exact |\n|---|---|---|---|---|")
    for r in rows:
        shown = f"{r['accuracy']:.3f} | {r['exact']}/{r['uploads']}"
        print(f"| {r['method']} | {r['checkpoint']} | {r['uploads']} | {shown} |")


if __name__ == "__main__":
    main(sys.argv[1:])
