"""The results: every (setting, epoch) cell from its trials' images, with the evidence behind it.

A cell holds `extract.trials` client batches of B images each, attacked once per restart set
and scored image by image. The unit of every statistic is the image: the mean with a seeded
bootstrap interval (scipy.stats.bootstrap, BCa), the median, and, against the baseline setting
on the same images (same epoch, trial and batch position: the trials pair the settings), the
paired mean difference with its interval and a Wilcoxon signed-rank test (scipy.stats.wilcoxon).
Images of one batch share an attack, so they are not fully independent: the intervals are, if
anything, narrower than a resampling of whole batches would give.

A verdict is read per attacked epoch under one rule (`verdict`): a defense protects at an epoch
when the paired difference's interval lies below zero and p < alpha. It is read against the
adaptive attacker, the one that models what the threat model says of the client (its shards,
its local steps); where that attacker differs from the classic one, the classic's PSNR is
shown beside it (`add_classic`), for every other setting the two are one attack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from pipeline.errors import PipelineError
from pipeline.files import load_tensors, read_json
from pipeline.uploads import CLASSIC

SCORES = ("psnr", "ssim", "mse", "lpips")
# The columns both tables have: the one built from the DVC outputs and the one rebuilt from MLflow.
SHARED = [
    "setting",
    "scheme",
    "epoch",
    "test_accuracy",
    "epsilon",
    "gh",
    "label_accuracy",
    "psnr",
    "ssim",
    "mse",
    "lpips",
    "iterations_run",
    "unconverged",
]


@dataclass(frozen=True)
class Evidence:
    """How the statistics are computed (params.yaml: report)."""

    confidence: float = 0.95
    resamples: int = 10000
    alpha: float = 0.05
    seed: int = 0


def mean_interval(values, evidence: Evidence) -> tuple[float, float]:
    """The bootstrap interval (BCa) of the mean of `values`, seeded; (nan, nan) below two values,
    the value itself twice when all are equal (no spread to resample)."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) < 2:
        return math.nan, math.nan
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    found = stats.bootstrap(
        (x,),
        np.mean,
        confidence_level=evidence.confidence,
        n_resamples=evidence.resamples,
        method="BCa",
        rng=np.random.default_rng(evidence.seed),
    )
    return float(found.confidence_interval.low), float(found.confidence_interval.high)


def wilcoxon_p(differences) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences; 1 when all are zero."""
    d = np.asarray(differences, dtype=float)
    if len(d) == 0 or np.all(d == 0):
        return 1.0
    return float(stats.wilcoxon(d).pvalue)


def paired(per_image: pd.DataFrame, setting: str, baseline: str, epoch: int) -> pd.DataFrame:
    """The setting's and the baseline's images at one epoch side by side, matched by trial and
    batch position (columns <score>, <score>_baseline). The trials must hold the same victims."""
    keys = ["trial", "image"]
    mine = per_image[(per_image.setting == setting) & (per_image.epoch == epoch)].set_index(keys)
    theirs = per_image[(per_image.setting == baseline) & (per_image.epoch == epoch)].set_index(keys)
    both = mine.join(theirs[["victim", *SCORES]], rsuffix="_baseline", how="inner")
    if len(both) != len(mine) or len(both) != len(theirs):
        raise PipelineError(
            f"{setting} and {baseline} at epoch {epoch}: {len(mine)} and {len(theirs)} images, "
            f"{len(both)} in the same trial positions (extract both with the same extract.trials)"
        )
    if not (both.victim == both.victim_baseline).all():
        raise PipelineError(
            f"{setting} and {baseline} at epoch {epoch}: a trial holds other victims in the two "
            "settings, so they cannot be paired"
        )
    return both.reset_index()


def pairs_with(client, baseline_client) -> bool:
    """Whether a setting's trials draw the baseline's images: same batch size, no label repetition
    (a repeated-label batch is chosen class by class, other images by construction)."""
    return (
        client.batch_size == baseline_client.batch_size
        and client.label_repetition is None
        and baseline_client.label_repetition is None
    )


def cell_statistics(cell: pd.DataFrame, evidence: Evidence) -> dict:
    """Mean, median and interval of each score over a cell's images."""
    out: dict = {"trials": int(cell.trial.nunique()), "n": len(cell)}
    for score in SCORES:
        values = cell[score].astype(float)
        if values.isna().all():
            out.update({score: None, f"{score}_low": None, f"{score}_high": None})
            continue
        low, high = mean_interval(values, evidence)
        out.update({score: float(values.mean()), f"{score}_low": low, f"{score}_high": high})
        if score == "psnr":
            out["psnr_median"] = float(values.median())
    return out


def difference_statistics(both: pd.DataFrame, evidence: Evidence) -> dict:
    d = (both.psnr - both.psnr_baseline).to_numpy()
    low, high = mean_interval(d, evidence)
    return {
        "paired_n": len(d),
        "psnr_diff": float(d.mean()),
        "psnr_diff_low": low,
        "psnr_diff_high": high,
        "p_value": wilcoxon_p(d),
    }


def verdict_at(row, alpha: float) -> str:
    """One epoch's reading of the paired difference to the baseline."""
    shown = (
        f"{row.psnr_diff:+.1f} dB [{row.psnr_diff_low:+.1f}, {row.psnr_diff_high:+.1f}], "
        f"p = {row.p_value:.2g}, n = {int(row.paired_n)}"
    )
    if row.p_value < alpha and row.psnr_diff_high < 0:
        return f"protects: {shown}"
    if row.p_value < alpha and row.psnr_diff_low > 0:
        return f"leaks more: {shown}"
    return f"no detectable protection: {shown}"


def verdict(cells: pd.DataFrame, alpha: float, baseline: str | None) -> str:
    """A setting's verdict, epoch by epoch, flagged where unconverged attacks are behind it."""
    setting = cells.setting.iloc[0]
    if baseline is None:
        return "no baseline (report.baseline: null): compare the intervals"
    if setting == baseline:
        return "baseline"
    if cells.psnr_diff.isna().all():
        return f"not paired with {baseline} (other images by construction): compare the intervals"
    parts = [f"epoch {int(r.epoch)}: {verdict_at(r, alpha)}" for r in cells.itertuples()]
    unconverged = int(cells.unconverged.sum() + cells.baseline_unconverged.sum())
    flag = f"; rests on {unconverged} unconverged attack(s)" if unconverged else ""
    return "; ".join(parts) + flag


def privacy_of(checkpoint: dict) -> str:
    if "epsilon" in checkpoint:
        return f"({checkpoint['epsilon']:.2f}, {checkpoint['delta']:g})-DP"
    return "no privacy guarantee" if "guarantee" in checkpoint else ""


def training_table(models: Path, schemes: list[str]) -> pd.DataFrame:
    """Test accuracy (and epsilon) per scheme and checkpoint epoch."""
    rows = []
    for scheme in schemes:
        for path in sorted((models / scheme).glob("epoch-*.json")):
            c = read_json(path)
            rows.append(
                {
                    "scheme": scheme,
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
    ]
    return ", ".join(x for x in parts if x)


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
                "epoch": m["epoch"],
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


def results_table(
    per_image: pd.DataFrame, uploads: pd.DataFrame, describe, evidence: Evidence, order: list[str]
) -> pd.DataFrame:
    """One row per (setting, epoch), settings in `order`. `describe(setting, epoch, uploads)`
    gives the columns that are not statistics (scheme, test accuracy, client, privacy, ...)."""
    rows = []
    for setting in order:
        for epoch in sorted(uploads[uploads.setting == setting].epoch.unique()):
            mine = uploads[(uploads.setting == setting) & (uploads.epoch == epoch)]
            cell = per_image[(per_image.setting == setting) & (per_image.epoch == epoch)]
            row = {
                "setting": setting,
                "epoch": int(epoch),
                **describe(setting, int(epoch), mine),
                **cell_statistics(cell, evidence),
                "gh": None if mine.gh.isna().any() else float(mine.gh.mean()),
                "label_accuracy": float(mine.label_accuracy.mean()),
                "iterations": int(mine.iterations.iloc[0]),
                "iterations_run": float(mine.iterations_run.mean()),
                "unconverged": int((mine.converged == False).sum()),  # noqa: E712 (None is not False)
                "hyperparameters": mine.hyperparameters.iloc[0],
            }
            rows.append(row)
    return pd.DataFrame(rows)


def add_differences(
    table: pd.DataFrame, per_image: pd.DataFrame, baseline: str | None, pairs, evidence: Evidence
) -> pd.DataFrame:
    """The paired columns against the baseline (empty where a setting does not pair with it)."""
    columns = ["paired_n", "psnr_diff", "psnr_diff_low", "psnr_diff_high", "p_value", "baseline_unconverged"]
    extra: list[dict] = []
    for row in table.itertuples():
        if baseline is None or row.setting == baseline or not pairs(row.setting):
            extra.append(dict.fromkeys(columns))
            continue
        both = paired(per_image, row.setting, baseline, row.epoch)
        base = table[(table.setting == baseline) & (table.epoch == row.epoch)]
        extra.append({**difference_statistics(both, evidence), "baseline_unconverged": int(base.unconverged.iloc[0])})
    extra_frame = pd.DataFrame(extra, columns=columns, index=table.index).astype(
        {"paired_n": "Int64", "baseline_unconverged": "Int64"}
    )
    return pd.concat([table, extra_frame], axis=1)


def add_classic(table: pd.DataFrame, per_image: pd.DataFrame, evidence: Evidence) -> pd.DataFrame:
    """The classic attacker's PSNR per cell: its own images' mean and interval where it ran as a
    separate attack, else the adaptive attacker's (`classic_separate` False: the same attack)."""
    classic = per_image[per_image.attacker == CLASSIC]
    rows = []
    for row in table.itertuples():
        cell = classic[(classic.setting == row.setting) & (classic.epoch == row.epoch)]
        if len(cell):
            low, high = mean_interval(cell.psnr.astype(float), evidence)
            rows.append(
                {
                    "classic_separate": True,
                    "classic_psnr": float(cell.psnr.mean()),
                    "classic_psnr_low": low,
                    "classic_psnr_high": high,
                }
            )
        else:
            rows.append(
                {
                    "classic_separate": False,
                    "classic_psnr": row.psnr,
                    "classic_psnr_low": row.psnr_low,
                    "classic_psnr_high": row.psnr_high,
                }
            )
    return pd.concat([table, pd.DataFrame(rows, index=table.index)], axis=1)


def summary_of(table: pd.DataFrame, training: pd.DataFrame, evidence: Evidence, baseline: str | None) -> pd.DataFrame:
    """Per setting: PSNR at each attacked epoch as mean [interval], the accuracy the defense costs
    (the setting's scheme against the baseline's after the last epoch) and the verdict."""
    final = training[training.epoch == training.epoch.max()].set_index("scheme").test_accuracy
    base_scheme = None if baseline is None else table[table.setting == baseline].scheme.iloc[0]
    rows = []
    for setting, part in table.groupby("setting", sort=False):
        part = part.sort_values("epoch")
        scheme = part.scheme.iloc[0]
        row = {
            "setting": setting,
            "scheme": scheme,
            "n": int(part.n.iloc[0]),
            "hyperparameters": part.hyperparameters.iloc[0],
        }
        for r in part.itertuples():
            row[f"psnr_epoch_{r.epoch}"] = r.psnr
            row[f"psnr_epoch_{r.epoch}_ci"] = [r.psnr_low, r.psnr_high]
        if "classic_psnr" in part:
            row["classic_separate"] = bool(part.classic_separate.any())
            for r in part.itertuples():
                row[f"classic_psnr_epoch_{r.epoch}"] = r.classic_psnr
                row[f"classic_psnr_epoch_{r.epoch}_ci"] = [r.classic_psnr_low, r.classic_psnr_high]
        row.update(
            {
                "test_accuracy": final.get(scheme),
                "accuracy_cost": (final[base_scheme] - final[scheme])
                if base_scheme in final and scheme in final
                else None,
                "gh_last": part.gh.iloc[-1],
                "unconverged": int(part.unconverged.sum()),
                "verdict": verdict(part, evidence.alpha, baseline),
            }
        )
        rows.append(row)
    return pd.DataFrame(rows)


def _interval(mean, low, high, digits: int = 1) -> str:
    if mean is None or pd.isna(mean):
        return ""
    if low is None or pd.isna(low):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def shown_table(table: pd.DataFrame) -> pd.DataFrame:
    """The cells as a reader takes them: "mean [interval]" per score, the paired difference and p."""
    out = table[["setting", "epoch", "test_accuracy", "client", "trials", "n"]].copy()
    out["PSNR dB"] = [_interval(r.psnr, r.psnr_low, r.psnr_high) for r in table.itertuples()]
    if "classic_psnr" in table:
        out["classic attacker"] = [
            _interval(r.classic_psnr, r.classic_psnr_low, r.classic_psnr_high) if r.classic_separate else "same attack"
            for r in table.itertuples()
        ]
    out["median"] = table.psnr_median.round(1)
    out["SSIM"] = [_interval(r.ssim, r.ssim_low, r.ssim_high, 2) for r in table.itertuples()]
    out["LPIPS"] = [
        _interval(r.lpips, r.lpips_low, r.lpips_high, 2) if r.lpips is not None else "n/a" for r in table.itertuples()
    ]
    out["labels"] = table.label_accuracy.round(2)
    out["GH"] = table.gh.round(4)
    if "psnr_diff" in table:
        out["vs baseline dB"] = [_interval(r.psnr_diff, r.psnr_diff_low, r.psnr_diff_high) for r in table.itertuples()]
        out["p (Wilcoxon)"] = [f"{p:.2g}" if p is not None and not pd.isna(p) else "" for p in table.p_value]
    out["unconverged"] = table.unconverged
    out["epsilon"] = table.epsilon
    out["privacy"] = table.privacy
    return out


def shown_summary(summary: pd.DataFrame) -> pd.DataFrame:
    epochs = [c for c in summary.columns if c.startswith("psnr_epoch_") and not c.endswith("_ci")]
    out = summary[["setting", "scheme", "n"]].copy()
    if (summary.hyperparameters != "fixed").any():  # else every attack ran with params.yaml's values
        out["attack hyper-parameters"] = summary.hyperparameters
    for column in epochs:
        out[f"PSNR epoch {column.removeprefix('psnr_epoch_')}"] = [
            _interval(m, *ci) for m, ci in zip(summary[column], summary[f"{column}_ci"])
        ]
    if "classic_separate" in summary:
        for column in epochs:
            classic = f"classic_{column}"
            out[f"classic epoch {column.removeprefix('psnr_epoch_')}"] = [
                _interval(m, *ci) if separate else "same attack"
                for m, ci, separate in zip(summary[classic], summary[f"{classic}_ci"], summary.classic_separate)
            ]
    out["test accuracy"] = summary.test_accuracy
    out["cost vs baseline"] = summary.accuracy_cost
    out["verdict"] = summary.verdict
    return out


def table_differences(ours: pd.DataFrame, theirs: pd.DataFrame) -> list[str]:
    """Where two results tables disagree on the shared columns (rows matched by setting and epoch)."""
    a, b = (
        t[SHARED].astype({"epoch": int}).sort_values(["setting", "epoch"]).reset_index(drop=True)
        for t in (ours, theirs)
    )
    if a[["setting", "epoch"]].values.tolist() != b[["setting", "epoch"]].values.tolist():
        return [
            f"rows differ: {sorted(map(tuple, a[['setting', 'epoch']].values))} vs "
            f"{sorted(map(tuple, b[['setting', 'epoch']].values))}"
        ]
    problems = []
    for column in SHARED[1:]:
        for i in range(len(a)):
            x, y = a.at[i, column], b.at[i, column]
            same = (pd.isna(x) and pd.isna(y)) or (
                not pd.isna(x)
                and not pd.isna(y)
                and (x == y if isinstance(x, str) else abs(float(x) - float(y)) <= 1e-9)
            )
            if not same:
                problems.append(f"{a.at[i, 'setting']} epoch {a.at[i, 'epoch']}: {column} {x} vs {y}")
    return problems
