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

from pipeline.attack.jobs import (
    Job,
    classic_of,
    combined,
    load_result,
    process_count,
    run_jobs,
    target_of,
)
from pipeline.attack.tune import tuned_attack
from pipeline.config import AttackParams
from pipeline.data import to_unit_range
from pipeline.errors import PipelineError
from pipeline.files import atomic_dir, digest, partial_path, read_json, save_tensors, tree_digest
from pipeline.parallel import is_first_process, launched_processes, resolve_accelerator
from pipeline.report import save_grid
from pipeline.uploads import CLASSIC, load_upload
from stages._common import Stage, code_digest, run

TUNING, COPIES = Path("tuning"), Path("copies")


def attackers(
    a: AttackParams, uploads: list[Path], fixed: AttackParams | None = None
) -> list[tuple[str, AttackParams, list[Path]]]:
    """(subfolder, attack parameters, uploads) per attacker: the adaptive one on every upload, the
    classic one on those the adaptive one models otherwise, with the `fixed` hyper-parameters
    when the adaptive one's are tuned (the study tuned the adaptive attacker, not it)."""
    runs = [("", a, uploads)]
    if a.client_model == "exact" and a.classic:
        adapted = [path for path in uploads if target_of(Job(path, 0), a).adapted]
        if adapted:
            runs.append((CLASSIC, classic_of(fixed or a), adapted))
    return runs


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
    stage: Stage, a: AttackParams, uploads: list[Path], out: Path, scratch: Path, prefix: str, tuned: dict | None
) -> dict:
    """Run one attacker's jobs (resuming those done in `scratch`) and write its reconstructions
    into `out` (`tuned`: the values a study chose, for the record); returns per epoch the
    (reconstruction, seconds) of each upload."""
    setting = stage.setting
    jobs = [Job(path, r) for path in uploads for r in range(a.restarts)]
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
    run_jobs(jobs, a, stage.params.seed, scratch)
    out.mkdir(exist_ok=True)
    by_epoch: dict[int, list] = {}
    for path in uploads:
        tm = load_upload(path).threat_model
        restarts = [load_result(Job(path, r).result_path(scratch)) for r in range(a.restarts)]
        rec = combined(path, restarts, a, stage.params.seed)
        images = to_unit_range(rec.images, tm.mean, tm.std)
        meta = {
            "upload": path.name,
            "epoch": tm.epoch,
            "trial": tm.trial,
            "scheme": tm.scheme,
            "setting": tm.setting,
            "labels_method": a.labels,
            "client_model": a.client_model,
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
        save_grid((out / path.name).with_suffix(".png"), [images])
        save_tensors(out / path.name, {"images": images, "labels": rec.labels}, meta)
        for iteration, loss in rec.curve:
            stage.mlflow.log_metric(f"{prefix}grad_loss.epoch_{tm.epoch}.trial_{tm.trial}", loss, step=iteration)
        by_epoch.setdefault(tm.epoch, []).append((rec, sum(r.seconds or 0 for r in restarts)))
        stopped = (
            ""
            if rec.note or rec.iterations_run == a.iterations
            else f", stopped at the TV target after {rec.iterations_run} iterations"
        )
        stopped += ", still falling at the end: not converged" if rec.converged is False else ""
        print(
            f"attack@{setting}: {prefix.replace('.', ': ')}{path.name}: labels {rec.labels.tolist()}: "
            + (rec.note or f"lowest gradient loss {rec.grad_loss:.4f} (restart {rec.restart}{stopped})")
        )
    shutil.rmtree(scratch)
    return by_epoch


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
    uploads = [path for path in every if path.stem not in copies]
    for name, original in copies.items():
        print(f"attack@{setting}: {name}: the same upload as {original['setting']}'s, attacked there")
    runs = attackers(a, uploads, fixed) if uploads else []
    if not is_first_process():  # one of torchrun's other processes: its share, into the first one's folder
        for sub, params, paths in runs:
            run_jobs(
                [Job(path, r) for path in paths for r in range(params.restarts)],
                params,
                p.seed,
                partial_path(out_folder) / sub / ".jobs",
            )
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
        for sub, params, paths in runs:  # one scratch folder per attacker, removed before the output is finished
            timings[sub] = attack(
                stage, params, paths, out / sub, out / sub / ".jobs", f"{sub}." if sub else "", None if sub else tuned
            )
    for sub, by_epoch in timings.items():  # step = training epoch, over its trials; the wall time goes
        # to MLflow only (in an output it would break byte-identity)
        prefix = f"{sub}." if sub else ""
        for epoch, done in by_epoch.items():
            stage.mlflow.log_metrics(
                {
                    f"{prefix}iterations_run": sum(r.iterations_run or 0 for r, _ in done) / len(done),
                    f"{prefix}unconverged": sum(r.converged is False for r, _ in done),
                    f"{prefix}attack_seconds": sum(s for _, s in done),
                },
                step=epoch,
            )
    stage.mlflow.log_artifacts(str(out_folder), "reconstructions")


if __name__ == "__main__":
    run("attack", main, reads=("seed", "attack", "settings.{setting}"))
