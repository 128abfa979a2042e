"""The pipeline's outputs read back as tables: per scheme and checkpoint the training (checkpoint
JSONs), per upload what the client stage measured and the attack recorded (reports/client/,
attacks/), and the columns of a cell that describe rather than measure (scheme, client,
privacy)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pipeline.checkpoints import checkpoint_name, written_checkpoints
from pipeline.dp import client_epsilon
from pipeline.files import load_tensors, read_json
from pipeline.sections import ClippingParams, DefenseParams, PruningParams, SoteriaParams

if TYPE_CHECKING:
    from pipeline.config import Params


def privacy_of(checkpoint: dict) -> str:
    if "epsilon" in checkpoint:
        by = f" by {checkpoint['accountant'].upper()}" if "accountant" in checkpoint else ""
        return f"({checkpoint['epsilon']:.2f}, {checkpoint['delta']:g})-DP{by}"
    return "no privacy guarantee" if "guarantee" in checkpoint else ""


def training_table(models: Path, schemes: list[str]) -> pd.DataFrame:
    """Test accuracy (and epsilon) per scheme and checkpoint (epochs and optimizer steps), in the
    order of training."""
    rows = []
    for scheme in schemes:
        for c in written_checkpoints(models / scheme):
            rows.append(
                {
                    "scheme": scheme,
                    "checkpoint": c["checkpoint"],
                    "step": c["step"],
                    "epoch": c["epoch"],
                    "test_accuracy": c["test_accuracy"],
                    "epsilon": c.get("epsilon"),
                    "privacy": privacy_of(c),
                    "bn": c["bn"],
                    "global_batch": c["global_batch"],
                    "maxpool_kernel": c["maxpool_kernel"],
                }
            )
    return pd.DataFrame(rows)


def client_summary(c) -> str:
    """The client setting in a few words, for the table."""
    parts = [
        f"B={c.batch_size}",
        f"W={c.participants} {c.bn} BN" if c.participants > 1 else "",
        f"E={c.local_steps}" if c.local_steps > 1 else "",
        c.mode,
        f"k={c.label_repetition} classes" if c.label_repetition else "",
        f"DP {c.dp.kind} sigma={c.dp.sigma:g} C={c.dp.clip:g}" if c.dp else "",
        "BN buffers uploaded" if c.upload_buffers else "",
        defense_summary(c.defense) if c.defense else "",
    ]
    return ", ".join(x for x in parts if x)


def defense_summary(d: DefenseParams) -> str:
    """A client's defense in a few words."""
    if isinstance(d, PruningParams):
        return f"pruned {d.ratio:.0%}"
    if isinstance(d, ClippingParams):
        return f"clipped to {d.bound:g} ({d.scope})"
    if isinstance(d, SoteriaParams):
        return f"Soteria {d.percentile:g} %"
    return "signed"


def hyperparameters_of(attack_meta: dict) -> str:
    """Which hyper-parameters an attack ran with, in a few words: fixed, or the values tuned."""
    tuned = attack_meta.get("tuned")
    if not tuned:
        return "fixed"
    return "tuned: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in tuned.items())


def load_outputs(metrics: dict, attacks: Path, client: Path) -> pd.DataFrame:
    """One row per attacked upload: what the client stage measured (GH, ...), the attack's
    bookkeeping (labels method, iterations, convergence) and the label accuracy."""
    rows = []
    for key, m in metrics.items():
        setting, name = key.split("/")
        measured = read_json(client / f"{setting}.json")["uploads"][name]
        _, rec = load_tensors(attacks / setting / f"{name}.safetensors", expected={"images", "labels"})
        rows.append(
            {
                "setting": setting,
                "upload": name,
                "checkpoint": m["checkpoint"],
                "step": m["step"],
                "trial": m["trial"],
                "label_accuracy": m["label_accuracy"],
                **{
                    k: measured[k] for k in ("gh", "gradient_norm", "gir_max", "repetition_rate", "ra_index", "epsilon")
                },
                "labels": rec["labels_method"],
                "iterations": rec["iterations"],
                "iterations_run": rec["iterations_run"],
                "converged": rec["converged"],
                "grad_loss": rec["grad_loss"],
                "hyperparameters": hyperparameters_of(rec),
            }
        )
    return pd.DataFrame(rows)


def describe(p: Params, models: Path, setting: str, at: str, uploads: pd.DataFrame) -> dict:
    """The columns of a cell that are not statistics: the scheme's checkpoint, the client, privacy."""
    scheme, client = p.setting(setting)
    checkpoint = read_json(models / scheme / Path(checkpoint_name(at)).with_suffix(".json"))
    # the uploads' recorded epsilon, as MLflow has it (tools.from_mlflow rebuilds the table from there)
    client_guarantee = None if uploads.epsilon.isna().any() else float(uploads.epsilon.mean())
    client_privacy = ""
    if client.dp is not None and client.dp.kind == "batch":
        client_privacy = "client clip+noise: no privacy guarantee"
    elif client.dp is not None and client.dp.sigma == 0:
        client_privacy = "client clipping without noise: no privacy guarantee"
    elif client.dp is not None and client_guarantee is not None:
        assert client.dp.delta is not None  # per-sample DP has one (pipeline.config)
        accountant = client_epsilon(client.dp.sigma, client.dp.delta)[1]  # whose epsilon the client's is
        client_privacy = f"client ({client_guarantee:.3g}, {client.dp.delta:g})-DP by {accountant.upper()}"
    return {
        "scheme": scheme,
        "arch": checkpoint["arch"],
        "test_accuracy": checkpoint["test_accuracy"],
        "client": client_summary(client),
        "labels": uploads.labels.iloc[0],
        "privacy": "; ".join(x for x in (privacy_of(checkpoint), client_privacy) if x),
        "epsilon": checkpoint.get("epsilon", client_guarantee),
        "repetition_rate": float(uploads.repetition_rate.mean()),
        "ra_index": uploads.ra_index.iloc[0],
    }
