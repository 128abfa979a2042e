"""tune@<setting>: the attacker searches its attack's hyper-parameters on its own images.

For a setting attacked with `attack.hyperparameters: tuned`, it makes surrogate uploads from the
attacker's images (data/prepared/attacker: the training split less the victim pool) through the
setting's client at the checkpoints the attack will face, runs an Optuna study over `tune.space`
on them (pipeline.attack.tune) and writes tuning/<setting>.json: the best values, the fixed
ones, every trial. It reads nothing of the victims: not truth/, not uploads/, not the victim
split (tests/test_tune.py runs it with those removed). With `fixed`, the file says so and
nothing else runs (no MLflow run either). Each trial is a nested MLflow run; a killed study resumes where it stopped.
"""

import tempfile
from pathlib import Path

from pipeline.files import write_json
from pipeline.sections import AttackParams
from stages._common import Stage, run

OWN = Path("data/prepared")  # only its attacker.* files are read


def main(stage: Stage) -> None:
    p, setting = stage.params, stage.setting
    a = p.attack_for(setting)
    out = Path("tuning") / f"{setting}.json"
    if a.hyperparameters == "fixed":
        write_json(out, {"setting": setting, "hyperparameters": "fixed"})
        print(f"tune@{setting}: attack.hyperparameters is fixed: nothing to tune")
        return
    tune(stage, a, out)


def tune(stage: Stage, a: AttackParams, out: Path) -> None:
    # imported here: a fixed setting's stage (most of them) needs none of it
    from pipeline.attack.tune import importances, make_surrogates, run_study, study_summary
    from pipeline.checkpoints import checkpoint_name, extracted
    from pipeline.data import load_split
    from pipeline.files import digest, resumable_scratch, sha256
    from pipeline.parallel import resolve_accelerator
    from pipeline.report import study_plots
    from stages._common import code_digest

    p, setting = stage.params, stage.setting
    resolve_accelerator(a.accelerator, "attack.accelerator", a.processes)  # refused before any work
    scheme, c = p.setting(setting)
    own, meta = load_split(OWN, "attacker")
    checkpoints = {
        at: Path("models") / scheme / checkpoint_name(at) for at in extracted(p.extract.epochs, p.extract.steps)
    }
    inputs = digest(
        p.seed,
        p.tune.model_dump(),
        a.model_dump(),
        c.model_dump(),
        p.extract.model_dump(exclude={"epochs", "steps", "trials"}),  # what the surrogate uploads reveal
        sha256(OWN / "attacker.safetensors"),
        {at: sha256(path) for at, path in checkpoints.items()},
        code_digest("stages.tune"),
    )
    with resumable_scratch(out, inputs) as scratch:
        surrogates = make_surrogates(
            own, meta, c, setting, checkpoints, p.tune.batches, p.extract, p.seed, scratch / "surrogates"
        )
        space = ", ".join(p.tune.space)
        print(
            f"tune@{setting}: {p.tune.trials} trials over {space}, each attacking {len(surrogates)} surrogate "
            f"uploads ({p.tune.batches} batches of the attacker's own images x {len(checkpoints)} checkpoints), "
            f"objective {p.tune.objective}"
        )

        def log_trial(r) -> None:
            values = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.values.items())
            result = (
                f"{p.tune.objective} {r.value:.4g}" if r.state == "complete" else f"pruned after step {r.steps[-1][0]}"
            )
            which = " (the fixed attack)" if r.number == 0 else ""
            print(f"tune@{setting}: trial {r.number + 1}/{p.tune.trials}{which}: {values}: {result}")
            with stage.mlflow.start_run(
                run_name=f"{stage.run_name} trial {r.number}",
                nested=True,
                tags={"tune.trial": str(r.number), "tune.state": r.state, "setting": setting},
            ):
                stage.mlflow.log_params(r.values)
                for step, value in r.steps:
                    stage.mlflow.log_metric(f"surrogate_{p.tune.objective}", value, step=step)
                if r.value is not None:
                    stage.mlflow.log_metric("objective", r.value)

        records = run_study(surrogates, a, p.tune, p.seed, scratch, on_trial=log_trial)
        summary = study_summary(setting, records, p.tune, a, surrogates)
        weights = importances(scratch, p.seed)
        write_json(out, summary)
    print(
        f"tune@{setting}: best {summary['best']} (trial {summary['best_trial']}): {p.tune.objective} "
        f"{summary['best_value']:.4g}, the fixed attack {summary['fixed_value']}"
    )
    stage.mlflow.log_metrics({"best_value": summary["best_value"], "fixed_value": summary["fixed_value"] or 0.0})
    stage.mlflow.log_params({f"best.{k}": v for k, v in summary["best"].items()})
    with tempfile.TemporaryDirectory() as tmp:
        for path in study_plots(Path(tmp), records, weights, p.tune.objective):
            stage.mlflow.log_artifact(str(path), "study")
    stage.mlflow.log_artifact(str(out))


if __name__ == "__main__":
    run(
        "tune",
        main,
        reads=("seed", "extract", "client", "attack", "tune", "settings.{setting}"),
        computes=lambda params, setting: params.attack_for(str(setting)).hyperparameters == "tuned",
    )
