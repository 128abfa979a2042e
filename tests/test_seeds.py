"""One mix of integers seeds every draw: stable across processes, no arithmetic collisions."""

import re
import subprocess
import sys

import torch

from pipeline.seeds import Draw, generator, mix
from tests.conftest import REPO


def test_restarts_past_a_thousand_no_longer_collide_with_the_next_seed():
    old = {(s, r): s * 1000 + r for s in range(10) for r in range(2000)}
    assert old[(0, 1000)] == old[(1, 0)]  # the formula this module replaced
    new = {mix(Draw.ATTACK_START, s, r) for s in range(10) for r in range(2000)}
    assert len(new) == 20_000
    assert all(0 <= m < 2**63 for m in new)


def test_purposes_and_lengths_give_different_streams():
    assert mix(Draw.ATTACK_START, 0, 1) != mix(Draw.ATTACK_DROPOUT, 0, 1)
    assert mix(Draw.CLIENT_DP_NOISE, 0, 1) != mix(Draw.CLIENT_DP_NOISE, 0, 1, 0)
    assert mix(Draw.UPLOAD_NOISE, -1) != mix(Draw.UPLOAD_NOISE, 1)


def test_the_mix_is_the_same_in_every_process_and_pinned():
    # a change here changes every output byte of the pipeline: regenerate dvc.lock and the gate reference
    assert mix(Draw.ATTACK_START, 0, 0) == 847567998193011332
    assert mix(Draw.DATA_SPLIT, 0) == 6173411103188844481
    code = "from pipeline.seeds import Draw, mix; print(mix(Draw.ATTACK_START, 7, 1234))"
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert int(other.stdout) == mix(Draw.ATTACK_START, 7, 1234)  # Python's hash() would differ here
    assert torch.equal(
        torch.randn(5, generator=generator(Draw.ATTACK_START, 7, 3)),
        torch.randn(5, generator=generator(Draw.ATTACK_START, 7, 3)),
    )


def test_every_seeded_draw_of_the_library_goes_through_the_mix():
    seeded = re.compile(r"manual_seed\((?!mix\()|Generator\(\)")
    found = [
        f"{path.relative_to(REPO)}:{n}"
        for path in sorted((REPO / "pipeline").rglob("*.py"))
        if path.name != "seeds.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if seeded.search(line)
    ]
    assert found == []
