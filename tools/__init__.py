"""Project tools that are not pipeline stages: profiles, the reproducibility gate, the attack's
budget and label-recovery comparisons.

The tools that rerun a stage's computation (`tools.budget`, `tools.labels`) must round as the
stage does, or their 500-iteration row would not be the stage's: importing `stages` here, before
anything loads torch, pins the same CPU kernels (see `stages/__init__.py`).
"""

import sys
from typing import NoReturn

import stages  # noqa: F401


def fail(tool: str, message: str) -> NoReturn:
    """How every tool refuses bad input: one line on stderr, exit 2."""
    print(f"{tool}: error: {message}", file=sys.stderr)
    sys.exit(2)
