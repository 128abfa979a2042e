"""extract@<setting>: what one client uploads at each listed checkpoint, for each of
`extract.trials` client batches (the same victims in every setting that draws its batch the
same way), the ground truth apart.

Per upload it also measures, with the truth the attacker never sees: GH (how far the upload
is from the gradient the attacker models), GIR per sample (who leaks most) and RA-i.
"""

from pathlib import Path

from pipeline.checkpoints import checkpoint_label, checkpoint_name, extracted, load_checkpoint
from pipeline.client import check_batchnorm_batch, client_upload, information_ratio, plain, simulate_client
from pipeline.data import in_memory, load_split, normalise
from pipeline.files import atomic_dir, write_json
from pipeline.metrics import gradient_heterogeneity
from pipeline.rank_analysis import model_ra_index, rank_analysis
from pipeline.trials import choose_batches, repetition_rate
from pipeline.uploads import save_truth, save_upload, upload_name, upload_of
from stages._common import Stage, run

DATA = Path("data/prepared")


def main(stage: Stage) -> None:
    p, setting = stage.params, stage.setting
    scheme, c = p.setting(setting)
    split, meta = load_split(DATA, "victims")
    victims = in_memory(split, DATA / "victims.safetensors")
    batches = choose_batches(victims.labels, c.batch_size, p.extract.trials, p.seed, c.label_repetition)
    summary = {}
    with atomic_dir(Path("uploads") / setting) as uploads, atomic_dir(Path("truth") / setting) as truth:
        for at in extracted(p.extract.epochs, p.extract.steps):
            path = Path("models") / scheme / checkpoint_name(at)
            model, ckpt = load_checkpoint(path)
            check_batchnorm_batch(model, c, ckpt["in_channels"], ckpt["image_size"])
            units = rank_analysis(model, ckpt["arch"], ckpt["in_channels"], ckpt["image_size"], c.batch_size)
            for trial, chosen in enumerate(batches):
                images, labels = victims.images[chosen], victims.labels[chosen]
                inputs = normalise(images, meta["mean"], meta["std"])
                update = client_upload(model, inputs, labels, c, p.seed)
                modelled = simulate_client(model, inputs, labels, plain(c), p.seed).gradients
                gir = information_ratio(model, inputs, labels, c.mode, p.seed)
                name = upload_name(at, trial)
                upload = upload_of(update, model, (path, ckpt), c, setting, trial, labels, p.extract)
                save_upload(uploads / name, upload)
                save_truth(
                    truth / name,
                    images,
                    labels,
                    {
                        "checkpoint": at,
                        "step": ckpt["step"],
                        "epoch": ckpt["epoch"],
                        "trial": trial,
                        "setting": setting,
                        "victim_positions": chosen.tolist(),
                        "participant": [
                            w for w in range(c.participants) for _ in range(c.batch_size // c.participants)
                        ],
                        "gir": [round(float(v), 6) for v in gir],
                    },
                )
                norm = float(sum(g.pow(2).sum() for g in update.gradients.values()) ** 0.5)
                gh = gradient_heterogeneity(update.gradients, modelled)
                summary[Path(name).stem] = {
                    "checkpoint": at,
                    "step": ckpt["step"],
                    "epoch": ckpt["epoch"],
                    "trial": trial,
                    "gh": None if gh is None else round(gh, 6),
                    "gradient_norm": round(norm, 6),
                    "gir_max": round(float(gir.max()), 4),
                    "leaker": int(gir.argmax()),
                    "repetition_rate": round(repetition_rate(labels), 4),
                    "ra_index": model_ra_index(units),
                    "epsilon": None if update.epsilon is None else round(update.epsilon, 4),
                }
                print(
                    f"extract@{setting}: {checkpoint_label(at)} trial {trial}: {len(labels)} images from {scheme}, GH "
                    + ("undefined (zero gradient)" if gh is None else f"{gh:.4f}")
                    + f", leaker {int(gir.argmax())} with GIR {float(gir.max()):.1f} %, gradient norm {norm:.4g}"
                )
    write_json(Path("reports/client") / f"{setting}.json", {"setting": setting, "scheme": scheme, "uploads": summary})
    for at in extracted(p.extract.epochs, p.extract.steps):  # step = the optimizer step; the mean over the trials
        mine = [s for s in summary.values() if s["checkpoint"] == at]
        stage.mlflow.log_metrics(
            {
                k: sum(s[k] for s in mine) / len(mine)
                for k in ("gh", "gradient_norm", "gir_max", "repetition_rate", "ra_index", "epsilon")
                if all(s[k] is not None for s in mine)
            },
            step=mine[0]["step"],
        )
    stage.mlflow.log_artifacts(str(Path("uploads") / setting), "uploads")


if __name__ == "__main__":
    run("extract", main, reads=("seed", "extract", "client", "settings.{setting}"))
