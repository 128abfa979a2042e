"""The field's post-processing defenses on `pure`'s uploads, each against the classic attacker and
the adaptive one that applies it (pipeline.defenses): a first look on a few batches, without the
pipeline's settings (profiles/defenses.yaml) and their corrected family.

    python -m tools.defense_probe [--checkpoint epoch-000] [--trials 4] [--iterations 500]
                                  [--prune 0.9] [--clip 1.0] [--soteria 60]

Run after `dvc repro` (it reads uploads/pure, and truth/pure to score). Each defense is what a
client applies to the upload it would otherwise send, so here it is applied to `pure`'s plain
uploads at one checkpoint: magnitude pruning, per-tensor clipping (a global clip only scales,
which the cosine objective ignores), sign, and Soteria (whose mask the client computes from its
own images: read from truth/pure as the client's, never given to the attacker). Pruning is
attacked under both of the adaptive attacker's models (attack.pruning_model). Both attackers
run params.yaml's attack (fixed hyper-parameters) with the same seed: a batch's two attacks differ
only in the transform. Per defense: PSNR mean [t interval over the batches] for each attacker,
the adaptive less the classic paired by batch, and, at params.yaml's budget, the adaptive less the
undefended upload's adaptive attack (reports/per_image.csv), with the paired t-test's p. It takes
attack.labels known (it recovers no labels from the defended uploads). Nothing is written.
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
from pipeline.data import normalise, to_unit_range
from pipeline.defenses import ModelledDefense, defended
from pipeline.errors import PipelineError
from pipeline.metrics import paired_scores
from pipeline.sections import ClippingParams, PruningParams, SignParams, SoteriaParams
from pipeline.statistics import t_estimate
from pipeline.uploads import ADAPTIVE, CLASSIC, load_truth, upload_name
from tools import fail


def probe(checkpoint: str, trials: int, iterations: int | None, defenses: dict) -> pd.DataFrame:
    """One row per (defense, trial, attacker): the batch's mean PSNR, and the attack's seconds.
    `defenses`: label -> (the defense, the adaptive attacker's pruning model)."""
    p = load_params(Path("params.yaml"))
    if p.attack.labels != "known":
        raise PipelineError(
            f"attack.labels {p.attack.labels!r}: the probe recovers no labels from the defended uploads (use known)"
        )
    a = p.attack.model_copy(update={"iterations": iterations or p.attack.iterations, "classic": False})
    paths = [Path("uploads/pure") / upload_name(checkpoint, t) for t in range(trials)]
    missing = [str(x) for x in paths if not x.is_file()]
    if missing:
        raise PipelineError(f"{missing[0]}: no such upload (run `dvc repro extract@pure`, or fewer --trials)")
    targets: dict[Path, Target] = {}
    truths: dict[Path, object] = {}
    for trial, path in enumerate(paths):
        victim = Victim.load(path)
        tm = victim.threat_model
        images, _, _ = load_truth(Path("truth/pure") / path.name)
        client_images = normalise(images.float() / 255, list(tm.mean), list(tm.std))  # the client's own
        plain = Target.of(victim, a)
        for label, (d, pruning) in defenses.items():
            upload = defended(plain.gradients, d, victim.model, client_images)
            modelled = ModelledDefense(
                d, upload, victim.model, a.sign_temperature, bound_known=a.clip_bound == "stated", pruning=pruning
            )
            for attacker, transform in ((CLASSIC, None), (ADAPTIVE, modelled)):
                key = Path(f"{label}-{attacker}-{path.stem}.safetensors".replace(" ", "_"))
                targets[key] = Target(
                    plain.model, upload, plain.labels, plain.image_shape, plain.mean, plain.std, defense=transform
                )
                truths[key] = (label, attacker, trial, images.float() / 255)
    jobs = [Job(key, r) for key in targets for r in range(a.restarts)]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        run_jobs(jobs, targets, a, p.seed, Path(scratch))
        seconds = (time.perf_counter() - started) / len(targets)
        for key, target in targets.items():
            found = [load_reconstruction(Job(key, r).result_path(Path(scratch))) for r in range(a.restarts)]
            rec = combine(target, found, a, p.seed)
            kind, attacker, trial, truth = truths[key]
            unit = to_unit_range(rec.images, list(target.mean), list(target.std))
            psnr = float(paired_scores(unit, truth)["psnr"].mean())
            rows.append({"defense": kind, "attacker": attacker, "trial": trial, "psnr": psnr, "seconds": seconds})
    return pd.DataFrame(rows)


def summary(rows: pd.DataFrame, undefended: pd.Series | None, confidence: float) -> pd.DataFrame:
    """Per defense: each attacker's mean [interval], adaptive less classic and adaptive less the
    undefended upload (None: not attacked at this budget), paired by batch."""
    out = []
    for kind, part in rows.groupby("defense", sort=False):
        by = part.pivot(index="trial", columns="attacker", values="psnr")
        row = {"defense": kind, "batches": len(by)}
        for attacker in (CLASSIC, ADAPTIVE):
            e = t_estimate(by[attacker], confidence)
            row[attacker] = f"{e.mean:.1f} [{e.low:.1f}, {e.high:.1f}]"
        others = {"adaptive - classic": by[CLASSIC]}
        if undefended is not None:
            others["adaptive - undefended"] = undefended.loc[by.index]
        for name, other in others.items():
            d = t_estimate(by[ADAPTIVE] - other, confidence)
            row[name] = f"{d.mean:+.1f} [{d.low:+.1f}, {d.high:+.1f}], p {d.p:.2g}"
        out.append(row)
    return pd.DataFrame(out)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.defense_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="epoch-000", help="an attacked checkpoint of pure (epoch-000)")
    parser.add_argument("--trials", type=int, default=4, help="client batches (the first of pure's)")
    parser.add_argument("--iterations", type=int, help="attack iterations (default: params.yaml's)")
    parser.add_argument("--prune", type=float, default=0.9, help="pruned share of each tensor")
    parser.add_argument("--clip", type=float, default=1.0, help="per-tensor clip bound")
    parser.add_argument("--soteria", type=float, default=60, help="Soteria's pruned percentile of entries")
    args = parser.parse_args(argv)
    try:
        pruning = PruningParams(kind="prune", ratio=args.prune)
        defenses = {  # both of the adaptive attacker's models of pruning
            "prune, magnitude": (pruning, "magnitude"),
            "prune, mask": (pruning, "mask"),
            "clip": (ClippingParams(kind="clip", bound=args.clip, scope="per-tensor"), "magnitude"),
            "sign": (SignParams(kind="sign"), "magnitude"),
            "soteria": (SoteriaParams(kind="soteria", percentile=args.soteria), "magnitude"),
        }
    except ValueError as err:
        fail("defense_probe", " ".join(str(err).split()))
    if args.trials < 2 or (args.iterations is not None and args.iterations < 1):
        fail("defense_probe", "--trials takes at least 2 (an interval needs two batches), --iterations a positive one")
    try:
        rows = probe(args.checkpoint, args.trials, args.iterations, defenses)
    except PipelineError as err:
        fail("defense_probe", str(err))
    p = load_params(Path("params.yaml"))
    same_budget = args.iterations in (None, p.attack.iterations)  # the undefended attack ran at params.yaml's
    attacked = Path("reports/per_image.csv").is_file()
    undefended = None
    if same_budget and attacked:
        per_image = pd.read_csv("reports/per_image.csv")
        mine = per_image[
            (per_image.setting == "pure") & (per_image.checkpoint == args.checkpoint) & (per_image.attacker == ADAPTIVE)
        ]
        undefended = mine.groupby("trial").psnr.mean()
    table = summary(rows, undefended, p.report.confidence)
    print(
        f"pure's uploads at {args.checkpoint}, {args.trials} batches: PSNR (dB) mean [t interval over batches]; "
        f"{rows.seconds.iloc[0]:.1f} s an attack"
    )
    print(table.to_markdown(index=False))
    if not same_budget:
        print(f"(no comparison with the undefended uploads: they were attacked at {p.attack.iterations} iterations)")
    elif not attacked:
        print("(no comparison with the undefended uploads: reports/per_image.csv not found; `dvc repro` attacks them)")


if __name__ == "__main__":
    main(sys.argv[1:])
