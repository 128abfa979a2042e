"""attack@<setting>: rebuild each upload's images from its gradient alone (the truth is never read).

The attacker is the adaptive one (`attack.client_model: exact`: it models the client's shards
and local steps as the threat model states them); with `attack.classic`, every upload it treats
otherwise than the classic attacker is attacked a second time by that one (attacks/<setting>/
classic/), so the report shows both. An upload that copies/<setting>.json names as another
setting's (the same measurement) is not attacked here.

The work is one job per upload x restart, sharded over `attack.processes` processes forked
here, or over the processes torchrun started (`torchrun --nproc_per_node N -m stages.attack
<setting>`, on one node or several sharing the project's folder); the first process alone
writes the outputs and logs. A killed attack resumes: the temporary output is fingerprinted by
the parameters, the uploads and the code, and jobs finished before the kill are kept.
"""

import shutil
from pathlib import Path

from pipeline.attack.jobs import Job, process_count, run_jobs
from pipeline.attack.service import Attacked, attack_uploads, attackers, checkpoint_metrics, targets_of
from pipeline.attack.target import Victim
from pipeline.attack.tune import tuned_attack
from pipeline.errors import PipelineError
from pipeline.files import atomic_dir, digest, partial_path, read_json, save_tensors, tree_digest
from pipeline.parallel import is_first_process, launched_processes, resolve_accelerator
from pipeline.report import save_grid
from pipeline.sections import AttackParams
from stages._common import Stage, code_digest, run

TUNING, COPIES = Path("tuning"), Path("copies")


def with_tuning(a: AttackParams, setting: str) -> tuple[AttackParams, dict | None]:
    """The setting's attack as it runs, and the values tune@<setting> chose (None: fixed)."""
    if a.hyperparameters == "fixed":
        return a, None
    source = TUNING / f"{setting}.json"
    if not source.is_file():
        raise PipelineError(
            f"{source}: not found, but attack.hyperparameters is tuned for {setting} "
            f"(run `dvc repro tune@{setting}` first)"
        )
    tuning = read_json(source)
    return tuned_attack(a, tuning, str(source)), tuning["best"]


def attack(
    stage: Stage, a: AttackParams, victims: list[Victim], out: Path, scratch: Path, prefix: str, tuned: dict | None
) -> list[Attacked]:
    """Run one attacker's jobs (resuming those done in `scratch`) and write its reconstructions
    into `out` (`tuned`: the values a study chose, for the record)."""
    setting = stage.setting
    jobs = [Job(v.path, r) for v in victims for r in range(a.restarts)]
    scratch.mkdir(parents=True, exist_ok=True)
    todo = [job for job in jobs if not job.done(scratch)]
    if len(todo) < len(jobs):
        print(f"attack@{setting}: {len(jobs) - len(todo)} of {len(jobs)} jobs kept from the interrupted run")
    processes = max(process_count(jobs, a, scratch), 1)
    how = f"each split over {processes} process(es)" if a.split == "batch" else f"on {processes} process(es)"
    print(
        f"attack@{setting}: {'the classic attacker: ' if prefix else ''}{len(todo)} jobs (upload x restart) {how}"
        f"{' started by torchrun' if launched_processes() else ''}, {a.labels} labels, "
        f"{a.objective} objective, {a.iterations} iterations"
    )
    attacked = attack_uploads(victims, a, stage.params.seed, scratch)
    out.mkdir(exist_ok=True)
    for done in attacked:
        tm, rec, name = done.victim.threat_model, done.reconstruction, done.victim.path.name
        images = done.images
        save_grid((out / name).with_suffix(".png"), [images])
        save_tensors(out / name, {"images": images, "labels": rec.labels}, done.record(a, tuned))
        for iteration, loss in rec.curve:
            stage.mlflow.log_metric(f"{prefix}grad_loss.{tm.at}.trial_{tm.trial}", loss, step=iteration)
        print(f"attack@{setting}: {prefix.replace('.', ': ')}{name}: {done.outcome(a)}")
    shutil.rmtree(scratch)
    return attacked


def main(stage: Stage) -> None:
    p, setting = stage.params, stage.setting
    fixed = p.attack_for(setting)
    resolve_accelerator(fixed.accelerator, "attack.accelerator", fixed.processes)  # refused before any work
    a, tuned = with_tuning(fixed, setting)
    folder, out_folder = Path("uploads") / setting, Path("attacks") / setting
    every = sorted(folder.glob("*.safetensors"))
    if not every:
        raise PipelineError(f"{folder}: no uploads to attack (run extract@{setting} first)")
    # attacked once, under the setting named there (no file, as when run by hand before `copies`: none)
    listed = COPIES / f"{setting}.json"
    copies = read_json(listed)["copies"] if listed.is_file() else {}
    victims = [Victim.load(path) for path in every if path.stem not in copies]  # each read once, here
    for name, original in copies.items():
        print(f"attack@{setting}: {name}: the same upload as {original['setting']}'s, attacked there")
    runs = attackers(a, victims, fixed) if victims else []
    if not is_first_process():  # one of torchrun's other processes: its share, into the first one's folder
        for sub, params, chosen in runs:
            jobs = [Job(v.path, r) for v in chosen for r in range(params.restarts)]
            run_jobs(jobs, targets_of(chosen, params), params, p.seed, partial_path(out_folder) / sub / ".jobs")
        return
    if tuned:
        stage.mlflow.log_params({f"tuned.{k}": v for k, v in tuned.items()})
    if copies:
        stage.mlflow.log_dict(copies, "same_upload_as.json")
    inputs = digest(
        p.seed, a.model_dump(), fixed.model_dump(), tree_digest(folder), copies, code_digest("stages.attack")
    )
    with atomic_dir(out_folder, fingerprint=inputs) as out:
        timings = {}
        for sub, params, chosen in runs:  # one scratch folder per attacker, removed before the output is finished
            timings[sub] = attack(
                stage, params, chosen, out / sub, out / sub / ".jobs", f"{sub}." if sub else "", None if sub else tuned
            )
    for sub, attacked in timings.items():  # to MLflow only: in an output the wall time would break byte-identity
        prefix = f"{sub}." if sub else ""
        for step, metrics in checkpoint_metrics(attacked).items():
            stage.mlflow.log_metrics({prefix + k: v for k, v in metrics.items()}, step=step)
    stage.mlflow.log_artifacts(str(out_folder), "reconstructions")


if __name__ == "__main__":
    run("attack", main, reads=("seed", "attack", "settings.{setting}"))
