"""The results: every (setting, epoch) cell from its trials' images, with the evidence behind it.

A cell holds `extract.trials` client batches of B images each. The images of one batch share one
attack, so the batch is the unit of every interval and test (pipeline.statistics): per cell the
mean over the batches with a t interval of the batch means; against the baseline setting at the
same epoch (same trial and batch position: the trials pair the settings) the paired difference
of each batch, its mean, t interval and paired t-test. The verdicts of one table are one family,
adjusted by Holm; a cell without a verdict of effect states the smallest difference the design
would have detected. Image-level numbers (the median, the image count) are description only.

A cell whose uploads are byte for byte another setting's (the same checkpoint and the same client
behaviour under two names: stages.copies finds them) is attacked once and shown as "same upload
as <setting>": it enters no family. The verdicts are read against the adaptive attacker, the one
that models what the threat model says of the client; where it differs from the classic one the
classic's PSNR is shown beside it (`add_classic`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.files import load_tensors, read_json
from pipeline.statistics import Evidence, batch_means, detectable_difference, holm, t_estimate
from pipeline.uploads import CLASSIC

SCORES = ("psnr", "ssim", "mse", "lpips")
MEASURES = (*SCORES, "iip")  # iip: image identifiability, 1 where the reconstruction's nearest image is its own
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
# What a row is to the verdicts: the baseline; a test against it (one of the family); the baseline's
# client attacked at a larger budget (how far the attacker is from its plateau); the same upload as
# another setting's cell; a setting drawing other images (no pairing).
BASELINE, TEST, BUDGET, COPY, UNPAIRED = "baseline", "test", "budget", "copy", "unpaired"


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


def batch_differences(both: pd.DataFrame) -> np.ndarray:
    """One paired difference per batch: the mean over its images of PSNR less the baseline's."""
    return batch_means(both.assign(difference=both.psnr - both.psnr_baseline), "difference")


def cell_statistics(cell: pd.DataFrame, evidence: Evidence) -> dict:
    """Per measure the mean over the cell's batches with the t interval of the batch means; the
    image count and the PSNR median over the images (description)."""
    out: dict = {"trials": int(cell.trial.nunique()), "n": len(cell)}
    for measure in MEASURES:
        if measure not in cell or cell[measure].isna().all():
            out.update({measure: None, f"{measure}_low": None, f"{measure}_high": None})
            continue
        found = t_estimate(batch_means(cell, measure), evidence.confidence)
        out.update({measure: found.mean, f"{measure}_low": found.low, f"{measure}_high": found.high})
        if measure == "psnr":
            out["psnr_median"] = float(cell.psnr.median())
    return out


def difference_statistics(both: pd.DataFrame, evidence: Evidence) -> dict:
    found = t_estimate(batch_differences(both), evidence.confidence)
    return {
        "paired_batches": found.batches,
        "psnr_diff": found.mean,
        "psnr_diff_low": found.low,
        "psnr_diff_high": found.high,
        "diff_sd": found.sd,
        "p_value": found.p,
    }


def shown_difference(row) -> str:
    """ "-6.1 dB [-7.0, -5.2]": a table row's paired difference with its interval."""
    return f"{row.psnr_diff:+.1f} dB [{row.psnr_diff_low:+.1f}, {row.psnr_diff_high:+.1f}]"


def results_table(
    per_image: pd.DataFrame,
    uploads: pd.DataFrame,
    describe,
    evidence: Evidence,
    order: list[str],
    copies: dict[tuple[str, int], str] | None = None,
) -> pd.DataFrame:
    """One row per (setting, epoch), settings in `order`. `describe(setting, epoch, uploads)`
    gives the columns that are not statistics (scheme, test accuracy, client, privacy, ...).
    `copies` maps a (setting, epoch) cell that was not attacked to the setting whose uploads it
    repeats: its row names that setting and carries the description, no statistics."""
    copies = copies or {}
    rows = []
    for setting in order:
        epochs = set(uploads[uploads.setting == setting].epoch) | {e for s, e in copies if s == setting}
        for epoch in sorted(int(e) for e in epochs):
            original = copies.get((setting, epoch))
            source = original or setting
            mine = uploads[(uploads.setting == source) & (uploads.epoch == epoch)]
            row = {"setting": setting, "epoch": epoch, **describe(setting, epoch, mine), "same_upload_as": original}
            if original is None:
                cell = per_image[(per_image.setting == setting) & (per_image.epoch == epoch)]
                row.update(
                    {
                        **cell_statistics(cell, evidence),
                        "gh": None if mine.gh.isna().any() else float(mine.gh.mean()),
                        "label_accuracy": float(mine.label_accuracy.mean()),
                        "iterations": int(mine.iterations.iloc[0]),
                        "iterations_run": float(mine.iterations_run.mean()),
                        "unconverged": int((mine.converged == False).sum()),  # noqa: E712 (None is not False)
                        "hyperparameters": mine.hyperparameters.iloc[0],
                    }
                )
            else:
                row["hyperparameters"] = mine.hyperparameters.iloc[0]
            rows.append(row)
    return pd.DataFrame(rows)


def add_differences(
    table: pd.DataFrame,
    per_image: pd.DataFrame,
    baseline: str | None,
    pairs,
    evidence: Evidence,
    budget: str | None = None,
) -> pd.DataFrame:
    """Each row's role, and the paired columns against the baseline at the same epoch (empty where
    a setting does not pair with it). `budget`: the setting that is the baseline's client attacked
    at a larger budget; its difference is the attacker's gain, not a verdict."""
    columns = ["role", *_PAIRED, "baseline_unconverged"]
    extra: list[dict] = []
    for row in table.itertuples():
        if baseline is None:
            role = None
        elif row.setting == baseline:
            role = BASELINE
        elif isinstance(row.same_upload_as, str):
            role = COPY
        elif not pairs(row.setting):
            role = UNPAIRED
        else:
            role = BUDGET if row.setting == budget else TEST
        if baseline is None or role not in (TEST, BUDGET):
            extra.append({"role": role})
            continue
        both = paired(per_image, row.setting, baseline, row.epoch)
        base = table[(table.setting == baseline) & (table.epoch == row.epoch)]
        extra.append(
            {
                "role": role,
                **difference_statistics(both, evidence),
                "baseline_unconverged": int(base.unconverged.iloc[0]),
            }
        )
    extra_frame = pd.DataFrame(extra, columns=columns, index=table.index).astype(
        {"paired_batches": "Int64", "baseline_unconverged": "Int64"}
    )
    return pd.concat([table, extra_frame], axis=1)


_PAIRED = ["paired_batches", "psnr_diff", "psnr_diff_low", "psnr_diff_high", "diff_sd", "p_value"]


def add_family(table: pd.DataFrame, evidence: Evidence) -> pd.DataFrame:
    """The table's verdicts as one family: Holm-adjusted p (`p_adjusted`) over every test row, the
    verdict read from it (`effect`: protects | leaks more | none), and for a test without an
    effect the smallest difference the design detects with `evidence.power` at the level of Holm's
    strictest step, alpha / family size (`detectable`); `underpowered` where that exceeds the
    effect the trials are sized for (`evidence.effect`)."""
    out = table.copy()
    tests = out.role == TEST if "role" in out else pd.Series(False, index=out.index)
    size = int(tests.sum())
    out["family_size"] = size
    out["p_adjusted"] = math.nan
    out.loc[tests, "p_adjusted"] = holm(out.loc[tests, "p_value"].astype(float))
    effects: list[str | None] = []
    detectable: list[float] = []
    for row in out.itertuples():
        if not tests[row.Index]:
            effects.append(None)
            detectable.append(math.nan)
        elif row.p_adjusted < evidence.alpha:
            effects.append("protects" if row.psnr_diff < 0 else "leaks more")
            detectable.append(math.nan)
        else:
            effects.append("none")
            detectable.append(
                detectable_difference(row.diff_sd, int(row.paired_batches), evidence.alpha / size, evidence.power)
            )
    out["effect"] = effects
    out["detectable"] = detectable
    out["underpowered"] = [bool(d > evidence.effect) if not math.isnan(d) else None for d in detectable]
    return out


def cell_verdict(row, evidence: Evidence, baseline: str | None) -> str:
    """One cell's reading against the baseline, flagged where unconverged attacks of this cell or
    of the baseline's cell at its epoch are behind it."""
    if isinstance(row.same_upload_as, str):
        return f"same upload as `{row.same_upload_as}`: measured there"
    if row.role == BASELINE:
        return "baseline"
    if row.role == UNPAIRED:
        return f"not paired with {baseline} (other images by construction): compare the intervals"
    if row.role is None or (isinstance(row.role, float) and math.isnan(row.role)):
        return "no baseline (report.baseline: null): compare the intervals"
    batches = f"{int(row.paired_batches)} batches"
    if row.role == BUDGET:
        text = f"the attacker at {int(row.iterations)} iterations gains {shown_difference(row)}, {batches}"
    else:
        shown = f"{shown_difference(row)}, p = {row.p_value:.2g} (Holm {row.p_adjusted:.2g}), {batches}"
        if row.effect != "none":
            text = f"{row.effect}: {shown}"
        else:
            text = f"no detectable effect: {shown}; would detect >= {row.detectable:.1f} dB"
            if row.underpowered:
                text += f" (underpowered for {evidence.effect:g} dB)"
    unconverged = int(row.unconverged) + int(row.baseline_unconverged)
    return text + (f"; rests on {unconverged} unconverged attack(s)" if unconverged else "")


def verdict(cells: pd.DataFrame, evidence: Evidence, baseline: str | None) -> str:
    """A setting's verdict, epoch by epoch."""
    setting = cells.setting.iloc[0]
    if baseline is None:
        return "no baseline (report.baseline: null): compare the intervals"
    if setting == baseline:
        return "baseline"
    return "; ".join(f"epoch {int(r.epoch)}: {cell_verdict(r, evidence, baseline)}" for r in cells.itertuples())


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


def add_classic(table: pd.DataFrame, per_image: pd.DataFrame, evidence: Evidence) -> pd.DataFrame:
    """The classic attacker's PSNR per cell, mean and t interval over its batches, where it ran as a
    separate attack; else the adaptive attacker's (`classic_separate` False: the same attack)."""
    classic = per_image[per_image.attacker == CLASSIC]
    rows = []
    for row in table.itertuples():
        cell = classic[(classic.setting == row.setting) & (classic.epoch == row.epoch)]
        if len(cell):
            found = t_estimate(batch_means(cell, "psnr"), evidence.confidence)
            rows.append(
                {
                    "classic_separate": True,
                    "classic_psnr": found.mean,
                    "classic_psnr_low": found.low,
                    "classic_psnr_high": found.high,
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
    """Per setting: PSNR and IIP at each attacked epoch as mean [interval], the accuracy the
    defense costs (the setting's scheme against the baseline's after the last epoch) and the
    verdict, epoch by epoch."""
    final = training[training.epoch == training.epoch.max()].set_index("scheme").test_accuracy
    base_scheme = None if baseline is None else table[table.setting == baseline].scheme.iloc[0]
    rows = []
    for setting, part in table.groupby("setting", sort=False):
        part = part.sort_values("epoch")
        scheme = part.scheme.iloc[0]
        attacked = part[part.same_upload_as.isna()]
        row = {
            "setting": setting,
            "scheme": scheme,
            "trials": int(attacked.trials.max()) if len(attacked) else None,
            "hyperparameters": part.hyperparameters.iloc[0],
        }
        for r in part.itertuples():
            row[f"psnr_epoch_{r.epoch}"] = r.psnr
            row[f"psnr_epoch_{r.epoch}_ci"] = [r.psnr_low, r.psnr_high]
            row[f"iip_epoch_{r.epoch}"] = r.iip
            row[f"same_upload_epoch_{r.epoch}"] = r.same_upload_as
        if "classic_psnr" in part:
            row["classic_separate"] = bool(part.classic_separate.fillna(False).any())
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
                "unconverged": int(part.unconverged.fillna(0).sum()),
                "verdict": verdict(part, evidence, baseline),
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


def _p(value) -> str:
    return f"{value:.2g}" if value is not None and not pd.isna(value) else ""


def shown_table(table: pd.DataFrame) -> pd.DataFrame:
    """The cells as a reader takes them: "mean [interval]" per measure, the paired difference, raw
    and adjusted p and the cell's verdict (or the copy it is)."""
    out = table[["setting", "epoch", "test_accuracy", "client", "trials"]].copy()
    out["trials"] = out.trials.astype("Int64")
    copy = table.same_upload_as.notna()
    out["PSNR dB"] = [
        f"same upload as {r.same_upload_as}" if c else _interval(r.psnr, r.psnr_low, r.psnr_high)
        for r, c in zip(table.itertuples(), copy)
    ]
    if "classic_psnr" in table:
        out["classic attacker"] = [
            ""
            if c
            else (
                _interval(r.classic_psnr, r.classic_psnr_low, r.classic_psnr_high)
                if r.classic_separate
                else "same attack"
            )
            for r, c in zip(table.itertuples(), copy)
        ]
    out["IIP"] = [_interval(r.iip, r.iip_low, r.iip_high, 2) for r in table.itertuples()]
    out["SSIM"] = [_interval(r.ssim, r.ssim_low, r.ssim_high, 2) for r in table.itertuples()]
    out["LPIPS"] = [
        ""
        if c
        else (
            _interval(r.lpips, r.lpips_low, r.lpips_high, 2) if r.lpips is not None and not pd.isna(r.lpips) else "n/a"
        )
        for r, c in zip(table.itertuples(), copy)
    ]
    out["labels"] = table.label_accuracy.round(2)
    out["GH"] = table.gh.round(4)
    if "psnr_diff" in table:
        out["vs baseline dB"] = [_interval(r.psnr_diff, r.psnr_diff_low, r.psnr_diff_high) for r in table.itertuples()]
        out["p"] = [_p(p) for p in table.p_value]
        out["p (Holm)"] = [_p(p) for p in table.p_adjusted]
        out["verdict"] = [_cell_word(r) for r in table.itertuples()]
    out["unconverged"] = table.unconverged.astype("Int64")
    out["epsilon"] = table.epsilon
    out["privacy"] = table.privacy
    return out


def _cell_word(row) -> str:
    """A cell's verdict in a few words, for the table of every cell."""
    if row.role == TEST:
        if row.effect != "none":
            return row.effect
        return f"none (would detect >= {row.detectable:.1f} dB{', underpowered' if row.underpowered else ''})"
    return {BASELINE: "baseline", BUDGET: "budget check", COPY: "same upload", UNPAIRED: "not paired"}.get(row.role, "")


def shown_summary(summary: pd.DataFrame) -> pd.DataFrame:
    epochs = [c for c in summary.columns if c.startswith("psnr_epoch_") and not c.endswith("_ci")]
    out = summary[["setting", "scheme", "trials"]].copy()
    out["trials"] = out.trials.astype("Int64")
    if (summary.hyperparameters != "fixed").any():  # else every attack ran with params.yaml's values
        out["attack hyper-parameters"] = summary.hyperparameters
    for column in epochs:
        epoch = column.removeprefix("psnr_epoch_")
        same = summary[f"same_upload_epoch_{epoch}"]
        out[f"PSNR epoch {epoch}"] = [
            f"= {s}" if isinstance(s, str) else _interval(m, *ci)
            for m, ci, s in zip(summary[column], summary[f"{column}_ci"], same)
        ]
        out[f"IIP epoch {epoch}"] = [
            "" if isinstance(s, str) or v is None or pd.isna(v) else f"{v:.2f}"
            for v, s in zip(summary[f"iip_epoch_{epoch}"], same)
        ]
    if "classic_separate" in summary:
        for column in epochs:
            epoch = column.removeprefix("psnr_epoch_")
            classic = f"classic_{column}"
            out[f"classic epoch {epoch}"] = [
                "" if isinstance(s, str) else (_interval(m, *ci) if separate else "same attack")
                for m, ci, separate, s in zip(
                    summary[classic],
                    summary[f"{classic}_ci"],
                    summary.classic_separate,
                    summary[f"same_upload_epoch_{epoch}"],
                )
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
