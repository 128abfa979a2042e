"""The two adaptive attackers of local steps on the same uploads: the client's steps unrolled
(`attack.local_steps_model: unrolled`) and SME's surrogate (`sme`), beside the classic attacker.

    python -m tools.local_steps_probe [--setting local-steps] [--checkpoint epoch-000] [--trials 8]

Run after `dvc repro extract@<setting>` (it reads uploads/<setting>, and truth/<setting> to score).
Every attacker runs params.yaml's attack (the setting's own, fixed hyper-parameters) with the
same seed, so a batch's attacks differ only in the client they model. Per attacker: PSNR mean
[t interval over the batches], the wall time per upload of its attack (all its uploads on
attack.processes processes, over their count), and each against the unrolled attacker, paired by
batch, with the paired t-test's p. Nothing is written.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from pipeline.attack.jobs import Job, run_jobs
from pipeline.attack.restarts import load_reconstruction
from pipeline.attack.service import combine
from pipeline.attack.target import Target, Victim
from pipeline.config import load_params
from pipeline.data import to_unit_range
from pipeline.errors import PipelineError
from pipeline.metrics import paired_scores
from pipeline.statistics import t_estimate
from pipeline.uploads import load_truth, upload_name
from tools import fail

# attacker -> what it changes of the setting's attack
ATTACKERS = {
    "classic": {"client_model": "plain"},
    "unrolled": {"client_model": "exact", "local_steps_model": "unrolled"},
    "sme": {"client_model": "exact", "local_steps_model": "sme"},
}


def probe(setting: str, checkpoint: str, trials: int) -> pd.DataFrame:
    """One row per (attacker, trial): the batch's mean PSNR, and the attacker's seconds per upload."""
    p = load_params(Path("params.yaml"))
    if setting not in p.settings:
        raise PipelineError(f"setting {setting!r} is not in params.yaml ({', '.join(p.settings)})")
    own = p.attack_for(setting).model_copy(update={"classic": False, "hyperparameters": "fixed"})
    paths = [Path("uploads") / setting / upload_name(checkpoint, t) for t in range(trials)]
    missing = [str(x) for x in paths if not x.is_file()]
    if missing:
        raise PipelineError(f"{missing[0]}: no such upload (run `dvc repro extract@{setting}`, or fewer --trials)")
    victims = [Victim.load(path) for path in paths]
    if victims[0].threat_model.local_steps == 1:
        raise PipelineError(f"{setting}: its client takes one local step: nothing for the two models to differ on")
    rows = []
    for attacker, change in ATTACKERS.items():
        a = own.model_copy(update=change)
        targets = {path: Target.of(victim, a) for path, victim in zip(paths, victims)}
        jobs = [Job(path, r) for path in paths for r in range(a.restarts)]
        with tempfile.TemporaryDirectory() as scratch:
            started = time.perf_counter()
            run_jobs(jobs, targets, a, p.seed, Path(scratch))
            seconds = (time.perf_counter() - started) / len(paths)
            for trial, (path, target) in enumerate(targets.items()):
                found = [load_reconstruction(Job(path, r).result_path(Path(scratch))) for r in range(a.restarts)]
                rec = combine(target, found, a, p.seed)
                images, _, _ = load_truth(Path("truth") / setting / path.name)
                unit = to_unit_range(rec.images, list(target.mean), list(target.std))
                psnr = float(paired_scores(unit, images.float() / 255)["psnr"].mean())
                rows.append({"attacker": attacker, "trial": trial, "psnr": psnr, "seconds": seconds})
    return pd.DataFrame(rows)


def summary(rows: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """Per attacker: PSNR mean [interval], seconds per upload, and the paired difference to unrolled."""
    by = rows.pivot(index="trial", columns="attacker", values="psnr")
    out = []
    for attacker in ATTACKERS:
        e = t_estimate(by[attacker], confidence)
        row = {
            "attacker": attacker,
            "batches": len(by),
            "psnr": f"{e.mean:.1f} [{e.low:.1f}, {e.high:.1f}]",
            "s / upload": f"{rows[rows.attacker == attacker].seconds.iloc[0]:.1f}",
        }
        if attacker != "unrolled":
            d = t_estimate(by[attacker] - by["unrolled"], confidence)
            row["- unrolled"] = f"{d.mean:+.1f} [{d.low:+.1f}, {d.high:+.1f}], p {d.p:.2g}"
        else:
            row["- unrolled"] = ""
        out.append(row)
    return pd.DataFrame(out)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.local_steps_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", default="local-steps", help="a setting whose client takes local steps")
    parser.add_argument("--checkpoint", default="epoch-000", help="an attacked checkpoint (epoch-000)")
    parser.add_argument("--trials", type=int, default=8, help="client batches (the setting's first)")
    args = parser.parse_args(argv)
    if args.trials < 2:
        fail("local_steps_probe", "--trials takes at least 2 (an interval needs two batches)")
    try:
        rows = probe(args.setting, args.checkpoint, args.trials)
    except PipelineError as err:
        fail("local_steps_probe", str(err))
    p = load_params(Path("params.yaml"))
    print(
        f"{args.setting}'s uploads at {args.checkpoint}, {args.trials} batches: PSNR (dB) mean "
        f"[t interval over batches]; seconds per upload on {p.attack_for(args.setting).processes} processes"
    )
    print(summary(rows, p.report.confidence).to_markdown(index=False))


if __name__ == "__main__":
    main(sys.argv[1:])
