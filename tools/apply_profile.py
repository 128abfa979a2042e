"""Apply a parameter profile: merge its keys into params.yaml, keeping the file's comments.

    python -m tools.apply_profile profiles/tiny.yaml [--params params.yaml]

A profile holds only the keys it changes; a key params.yaml does not have is refused (a
typo would otherwise be silently ignored), and the result must validate. `settings: {name: null}`
removes that client setting, `schemes: {name: null}` that scheme; a setting or a scheme params.yaml
does not have is added (a setting must name its scheme, a scheme give every key, so a misspelt
override of an existing one is refused by the validation), and a scheme's optional key (`lr`,
`bottleneck`) may be set on one that does not list it (a misspelt key is refused by the validation).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq

from pipeline.config import parse_params
from pipeline.errors import PipelineError
from tools import fail


def merge(target: Any, overrides: dict[str, Any], where: str = "") -> None:
    # A client setting may change any key of client and attack without params.yaml listing it
    # there, and a scheme may set its optional keys (bottleneck, lr); their keys are validated with
    # the result, so a typo is refused all the same.
    open_mapping = where.startswith(("settings.", "schemes."))
    for key, value in overrides.items():
        name = f"{where}{key}"
        if value is None and where in ("settings.", "schemes."):  # a profile drops one (gone already: nothing to do)
            target.pop(key, None)
            continue
        if key not in target and not open_mapping and where != "schemes.":
            raise PipelineError(f"profile sets {name!r}, which params.yaml does not have")
        if key not in target:
            target[key] = value
            continue
        if isinstance(value, dict) and isinstance(target[key], dict):
            merge(target[key], value, f"{name}.")
        elif isinstance(value, list):
            seq = CommentedSeq(value)
            seq.fa.set_flow_style()  # [0, 3] stays on one line, as params.yaml writes lists
            target[key] = seq
        else:
            target[key] = value


def apply_profile(profile: Path, params: Path) -> None:
    overrides = yaml.safe_load(profile.read_text()) or {}
    rt = YAML()  # round-trip: comments and key order survive
    rt.width = 120
    tree = rt.load(params.read_text())
    merge(tree, overrides)
    out = io.StringIO()
    rt.dump(tree, out)
    parse_params(yaml.safe_load(out.getvalue()), f"{params} with {profile}")
    params.write_text(out.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        apply_profile(args.profile, args.params)
    except (PipelineError, OSError, yaml.YAMLError) as err:
        fail("apply_profile", str(err))
    print(f"apply_profile: {args.profile} applied to {args.params}")


if __name__ == "__main__":
    main()
