"""The attacker's search for its own hyper-parameters (tune@<setting>), on data it owns.

The attacker holds images of the task (the training split less the victim pool: never a
victim). It plays the client on them: surrogate batches drawn as the setting draws its
victims, uploaded through the same client simulator from the same checkpoints the attack
will face, with the same threat model. A study (Optuna: TPE sampler, median pruner) then
searches `tune.space`; a trial attacks every surrogate upload with its values and scores the
result against the surrogate images, which the attacker may look at because they are its
own. Trial 0 is the fixed attack (params.yaml's values), so the chosen set never scored below
it on the surrogates.

Reproducible and resumable: the study lives in a sqlite file in the stage's scratch folder;
the sampler is seeded afresh before each trial from (seed, trials finished), so a study killed
and resumed asks the same values as one run straight through (the killed trial is marked
failed and asked again). Pruning steps are the attacked epochs: after each epoch's surrogate
uploads the running mean is reported, and a trial below the median of earlier trials at that
step stops.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline.attack.service import attack_uploads
from pipeline.attack.target import Victim
from pipeline.checkpoints import load_checkpoint
from pipeline.client import check_batchnorm_batch, simulate_client
from pipeline.data import normalise
from pipeline.errors import PipelineError
from pipeline.images import Images
from pipeline.metrics import paired_scores
from pipeline.sections import TUNABLE_CHOICES, AttackParams, ClientParams, ExtractParams, TuneParams
from pipeline.seeds import Draw, mix
from pipeline.trials import choose_batches
from pipeline.uploads import save_upload, upload_name, upload_of

# a study's direction per objective: the surrogate images' mean PSNR, or the reconstructions'
# mean gradient loss (the attack's own criterion, no images needed)
DIRECTIONS: dict[str, Literal["maximize", "minimize"]] = {"psnr": "maximize", "grad_loss": "minimize"}


@dataclass
class Surrogate:
    """One surrogate upload the attacker made, and the images it made it from ([0, 1] pixels)."""

    victim: Victim
    images: torch.Tensor

    @property
    def at(self) -> tuple[int, str]:
        """Its checkpoint's optimizer step and name: the order of training."""
        tm = self.victim.threat_model
        return tm.step, tm.at


def surrogate_batches(own: Images, c: ClientParams, batches: int, seed: int) -> list[torch.Tensor]:
    """Positions in the attacker's own images of its surrogate batches: drawn as the victims'
    are (the same batch size, the same label repetition), from another seeded order."""
    return choose_batches(own.labels, c.batch_size, batches, mix(Draw.SURROGATE_BATCHES, seed), c.label_repetition)


def make_surrogates(
    own: Images,
    meta: dict[str, Any],
    c: ClientParams,
    setting: str,
    checkpoints: dict[str, Path],
    batches: int,
    reveal: ExtractParams,
    seed: int,
    folder: Path,
) -> list[Surrogate]:
    """The attacker's surrogate uploads into `folder`: each batch at each checkpoint (by name),
    revealing what the setting's uploads reveal (`reveal`: extract's parameters)."""
    folder.mkdir(parents=True, exist_ok=True)
    chosen = surrogate_batches(own, c, batches, seed)
    client_seed = mix(Draw.SURROGATE_CLIENT, seed)
    made = []
    for at, path in checkpoints.items():
        model, ckpt = load_checkpoint(path)
        check_batchnorm_batch(model, c, ckpt["in_channels"], ckpt["image_size"])
        for trial, positions in enumerate(chosen):
            images, labels = own.images_at(positions), own.labels[positions]
            update = simulate_client(model, normalise(images, meta["mean"], meta["std"]), labels, c, client_seed)
            name = folder / upload_name(at, trial)
            save_upload(name, upload_of(update, model, (path, ckpt), c, setting, trial, labels, reveal))
            made.append(Surrogate(Victim.load(name), images.float() / 255))
    return made


def trial_attack(a: AttackParams, values: dict[str, Any]) -> AttackParams:
    """The attack with one trial's (or the study's best) values, validated as params.yaml's are."""
    try:
        return AttackParams.model_validate({**a.model_dump(), **values})
    except ValueError as err:
        raise PipelineError(f"tuned attack values {values}: {str(err).splitlines()[0]}") from None


def tuned_attack(a: AttackParams, tuning: dict[str, Any], source: str) -> AttackParams:
    """`a` with the best values of a finished study (the JSON tune@<setting> wrote), or a one-line
    refusal when `source` holds no study."""
    if tuning.get("hyperparameters") != "tuned" or not isinstance(tuning.get("best"), dict):
        raise PipelineError(
            f"{source}: holds no tuned hyper-parameters (its setting had attack.hyperparameters: fixed "
            "when tune ran; run `dvc repro` again)"
        )
    return trial_attack(a, tuning["best"])


def _distributions(space: dict[str, Any]) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    made: dict[str, Any] = {}
    for key, r in space.items():
        if key in TUNABLE_CHOICES:
            made[key] = CategoricalDistribution(r.choices)
        elif key == "iterations":
            made[key] = IntDistribution(int(r.low), int(r.high), log=r.log)
        else:
            made[key] = FloatDistribution(r.low, r.high, log=r.log)
    return made


@dataclass
class TrialRecord:
    """One trial as the stage reports it (MLflow nested run, the JSON summary)."""

    number: int  # among the study's finished trials, from 0 (the fixed attack)
    values: dict[str, Any]
    state: str  # complete | pruned
    steps: list[tuple[int, float]] = field(default_factory=list)  # (checkpoint's optimizer step, running objective)
    value: float | None = None  # the objective of a complete trial


def score(surrogates: list[Surrogate], a: AttackParams, seed: int, folder: Path, objective: str) -> list[float]:
    """Attack these surrogate uploads with `a` (jobs over its processes, results in `folder`); per
    image its PSNR against the surrogate image (objective psnr), or per upload its gradient loss."""
    found = []
    for s, done in zip(surrogates, attack_uploads([s.victim for s in surrogates], a, seed, folder)):
        if objective == "grad_loss":
            found.append(done.reconstruction.grad_loss)
        else:
            found += paired_scores(done.images, s.images)["psnr"].tolist()
    return found


def run_study(
    surrogates: list[Surrogate],
    a: AttackParams,
    tune: TuneParams,
    seed: int,
    folder: Path,
    on_trial: Callable[[TrialRecord], None] = lambda record: None,
) -> list[TrialRecord]:
    """The study over `tune.space` against the surrogates, in `folder` (its sqlite storage and the
    trials' scratch; a study found there is resumed); `on_trial` hears of each finished trial.
    Returns the finished trials in order."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder.mkdir(parents=True, exist_ok=True)
    direction = DIRECTIONS[tune.objective]
    study = optuna.create_study(
        storage=f"sqlite:///{(folder / 'study.db').resolve()}",
        study_name="tune",
        direction=direction,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=0),
        load_if_exists=True,
    )
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # a killed run's
        study.tell(stale.number, state=TrialState.FAIL)
    if not study.trials:
        study.enqueue_trial({key: getattr(a, key) for key in tune.space})
    distributions = _distributions(tune.space)
    checkpoints = sorted({s.at for s in surrogates})
    records = [_record(i, t) for i, t in enumerate(_finished(study))]
    while len(records) < tune.trials:
        study.sampler = optuna.samplers.TPESampler(
            seed=mix(Draw.TUNE_SAMPLER, seed, len(records)) % 2**32, n_startup_trials=tune.startup_trials
        )
        trial = study.ask(distributions)
        record = TrialRecord(len(records), dict(trial.params), "complete")
        attack = trial_attack(a, trial.params)
        scratch = folder / "trial"
        shutil.rmtree(scratch, ignore_errors=True)  # a killed trial's jobs: asked again from the start
        found: list[float] = []
        for step, at in enumerate(checkpoints):
            found += score([s for s in surrogates if s.at == at], attack, seed, scratch, tune.objective)
            running = sum(found) / len(found)
            if not math.isfinite(running):
                raise PipelineError(f"tune: trial {record.number} {trial.params}: the objective is not finite")
            record.steps.append((at[0], running))
            trial.report(running, step)
            if step < len(checkpoints) - 1 and trial.should_prune():
                record.state = "pruned"
                break
        shutil.rmtree(scratch, ignore_errors=True)
        if record.state == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        else:
            record.value = record.steps[-1][1]
            study.tell(trial, record.value)
        records.append(record)
        on_trial(record)
    return records


def _finished(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def _record(number: int, t: Any) -> TrialRecord:
    steps = sorted(t.intermediate_values.items())
    return TrialRecord(
        number,
        dict(t.params),
        "complete" if t.value is not None else "pruned",
        [(s, v) for s, v in steps],
        t.value,
    )


def best_of(records: list[TrialRecord], objective: str) -> TrialRecord:
    """The best complete trial (the earliest of equals, so the fixed attack wins ties)."""
    complete = [r for r in records if r.state == "complete"]
    sign = 1 if DIRECTIONS[objective] == "maximize" else -1
    return max(complete, key=lambda r: (sign * (r.value or 0.0), -r.number))


def study_summary(
    setting: str, records: list[TrialRecord], tune: TuneParams, a: AttackParams, surrogates: list[Surrogate]
) -> dict[str, Any]:
    """What tuning/<setting>.json holds: the best values, the fixed ones, every trial."""
    best = best_of(records, tune.objective)
    return {
        "setting": setting,
        "hyperparameters": "tuned",
        "objective": tune.objective,
        "direction": DIRECTIONS[tune.objective],
        "best": best.values,
        "best_trial": best.number,
        "best_value": best.value,
        "fixed": {key: getattr(a, key) for key in tune.space},
        "fixed_value": records[0].value,
        "surrogates": {
            "uploads": len(surrogates),
            "images": sum(len(s.images) for s in surrogates),
            "checkpoints": [name for _, name in sorted({s.at for s in surrogates})],
        },
        "trials": [
            {"number": r.number, "values": r.values, "state": r.state, "steps": r.steps, "value": r.value}
            for r in records
        ],
    }


def importances(folder: Path, seed: int) -> dict[str, float]:
    """Each searched key's share of the objective's variance over the complete trials (Optuna's
    fANOVA, seeded); empty when the study is too small to say."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{(folder / 'study.db').resolve()}")
    try:
        found = get_param_importances(
            study, evaluator=FanovaImportanceEvaluator(seed=mix(Draw.TUNE_SAMPLER, seed) % 2**32)
        )
    except (ValueError, RuntimeError):  # fewer than two complete trials, or no spread
        return {}
    return {k: float(v) for k, v in found.items()}
