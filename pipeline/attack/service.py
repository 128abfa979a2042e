"""The attack as one service: uploads in, one reconstruction per upload out.

Every caller (the attack stage, the attacker's tuning on its own surrogates, tools.budget)
attacks the same way: each upload read once (a `Victim`), seen by the attacker (a `Target`),
one job per restart run over the processes (pipeline.attack.jobs), and the restarts combined
(best, or MLCO). What is done with the reconstructions (written, scored) is the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.attack.jobs import Job, run_jobs
from pipeline.attack.objective import gradient_loss
from pipeline.attack.restarts import Reconstruction, best_of, load_reconstruction, min_loss_combination
from pipeline.attack.target import Target, Victim, adapts
from pipeline.data import to_unit_range
from pipeline.sections import AttackParams
from pipeline.uploads import CLASSIC


@dataclass
class Attacked:
    """One upload attacked: its reconstruction and the restarts it was made of."""

    victim: Victim
    target: Target
    reconstruction: Reconstruction  # images in the client's normalised space
    restarts: list[Reconstruction]

    @property
    def images(self) -> torch.Tensor:
        """The reconstruction in [0, 1] pixels."""
        tm = self.victim.threat_model
        return to_unit_range(self.reconstruction.images, list(tm.mean), list(tm.std))

    @property
    def seconds(self) -> float:
        """The wall time of its restarts' jobs."""
        return sum(r.seconds or 0 for r in self.restarts)

    def record(self, a: AttackParams, tuned: dict | None) -> dict:
        """What the reconstruction's file says of it (`tuned`: the values a study chose, if any)."""
        tm, rec = self.victim.threat_model, self.reconstruction
        return {
            "upload": self.victim.path.name,
            "checkpoint": tm.at,
            "step": tm.step,
            "epoch": tm.epoch,
            "trial": tm.trial,
            "scheme": tm.scheme,
            "setting": tm.setting,
            "labels_method": a.labels,
            "client_model": a.client_model,
            # SME's attack only (the unrolled one's files read as before)
            **({"local_steps_model": "sme"} if self.target.surrogate is not None else {}),
            "grad_loss": round(rec.grad_loss, 6),
            "restart": rec.restart,
            "iterations": a.iterations,
            "iterations_run": rec.iterations_run,
            "converged": rec.converged,
            "loss_tail": None if rec.tail is None else [round(v, 6) for v in rec.tail],
            "note": rec.note,
            "tuned": tuned,
            **({} if rec.sources is None else {"sources": rec.sources}),  # the restart of each image, combined
        }

    def outcome(self, a: AttackParams) -> str:
        """The attack in one line: labels, and the lowest loss or why it did not run."""
        rec = self.reconstruction
        stopped = (
            ""
            if rec.note or rec.iterations_run == a.iterations
            else f", stopped at the TV target after {rec.iterations_run} iterations"
        )
        stopped += ", still falling at the end: not converged" if rec.converged is False else ""
        return f"labels {rec.labels.tolist()}: " + (
            rec.note or f"lowest gradient loss {rec.grad_loss:.4f} (restart {rec.restart}{stopped})"
        )


def combine(target: Target, found: list[Reconstruction], a: AttackParams, seed: int) -> Reconstruction:
    """One upload's restarts made its reconstruction: the one of lowest gradient loss (`a.combine`
    best), or their image-by-image combination (mlco), its loss that of the attacker `a`."""
    if a.combine == "best" or len(found) < 2:
        return best_of(found)
    return min_loss_combination(found, gradient_loss(target, a, seed))


def classic_of(a: AttackParams) -> AttackParams:
    """The classic attacker with the same budget and objective: one full-batch gradient, with
    `a`'s values as they stand (a study tuned the adaptive attacker, not it)."""
    return a.model_copy(update={"client_model": "plain", "classic": False, "hyperparameters": "fixed"})


def targets_of(victims: list[Victim], a: AttackParams) -> dict[Path, Target]:
    return {victim.path: Target.of(victim, a) for victim in victims}


def attack_uploads(victims: list[Victim], a: AttackParams, seed: int, scratch: Path) -> list[Attacked]:
    """Attack each victim with `a`: its restarts as jobs (those a killed run finished in
    `scratch` kept), then combined. Returns them in the victims' order."""
    targets = targets_of(victims, a)
    jobs = [Job(victim.path, r) for victim in victims for r in range(a.restarts)]
    run_jobs(jobs, targets, a, seed, scratch)
    attacked = []
    for victim in victims:
        target = targets[victim.path]
        found = [load_reconstruction(Job(victim.path, r).result_path(scratch)) for r in range(a.restarts)]
        attacked.append(Attacked(victim, target, combine(target, found, a, seed), found))
    return attacked


def attackers(
    a: AttackParams, victims: list[Victim], fixed: AttackParams | None = None
) -> list[tuple[str, AttackParams, list[Victim]]]:
    """(subfolder, attack parameters, victims) per attacker: the adaptive one on every upload, the
    classic one on those the adaptive one models otherwise, with the `fixed` hyper-parameters
    when the adaptive one's are tuned (the study tuned the adaptive attacker, not it)."""
    runs = [("", a, victims)]
    if a.client_model == "exact" and a.classic:
        adapted = [v for v in victims if adapts(v.threat_model, a)]
        if adapted:
            runs.append((CLASSIC, classic_of(fixed or a), adapted))
    return runs


def checkpoint_metrics(attacked: list[Attacked]) -> dict[int, dict[str, float]]:
    """Per checkpoint, keyed by its optimizer step, over its uploads: the mean iterations run, the
    unconverged attacks and the wall time of the jobs."""
    by_step: dict[int, list[Attacked]] = {}
    for done in attacked:
        by_step.setdefault(done.victim.threat_model.step, []).append(done)
    return {
        step: {
            "iterations_run": sum(d.reconstruction.iterations_run or 0 for d in done) / len(done),
            "unconverged": sum(d.reconstruction.converged is False for d in done),
            "attack_seconds": sum(d.seconds for d in done),
        }
        for step, done in by_step.items()
    }
