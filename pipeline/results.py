"""The results: every (setting, checkpoint) cell from its trials' images, with the evidence behind it.

A cell holds `extract.trials` client batches of B images each. The images of one batch share one
attack, so the batch is the unit of every interval and test (pipeline.statistics): per cell the
mean over the batches with a t interval of the batch means; against the baseline setting at the
same checkpoint (same trial and batch position: the trials pair the settings) the paired difference
of each batch, its mean, t interval and paired t-test. The verdicts of one table are one family,
adjusted by Holm; a cell without a verdict of effect states the smallest difference the design
would have detected. Image-level numbers (the median, the image count) are description only.

A cell whose uploads are byte for byte another setting's (the same checkpoint and the same client
behaviour under two names: stages.copies finds them) is attacked once and shown as "same upload
as <setting>": it enters no family. The verdicts are read against the adaptive attacker, the one
that models what the threat model says of the client; where the classic attacker ran beside it
(`add_classic`) a verdict of effect needs both: the cell's p is the larger of the two attackers'
paired p-values, an intersection-union test (a defense beaten by either attacker is not credited
with protecting), and differences of opposite signs are no effect.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd

from pipeline.checkpoints import checkpoint_label
from pipeline.errors import PipelineError
from pipeline.statistics import Evidence, batch_means, detectable_difference, holm, t_estimate
from pipeline.uploads import CLASSIC

SCORES = ("psnr", "ssim", "mse", "lpips")
MEASURES = (*SCORES, "iip")  # iip: image identifiability, 1 where the reconstruction's nearest image is its own
# What a row is to the verdicts: the baseline; a test against it (one of the family); the baseline's
# client attacked at a larger budget (how far the attacker is from its plateau); the same upload as
# another setting's cell; a setting drawing other images (no pairing).
BASELINE, TEST, BUDGET, COPY, UNPAIRED = "baseline", "test", "budget", "copy", "unpaired"


def paired(per_image: pd.DataFrame, setting: str, baseline: str, at: str) -> pd.DataFrame:
    """The setting's and the baseline's images at one checkpoint side by side, matched by trial and
    batch position (columns <score>, <score>_baseline). The trials must hold the same victims."""
    keys = ["trial", "image"]
    mine = per_image[(per_image.setting == setting) & (per_image.checkpoint == at)].set_index(keys)
    theirs = per_image[(per_image.setting == baseline) & (per_image.checkpoint == at)].set_index(keys)
    both = mine.join(theirs[["victim", *SCORES]], rsuffix="_baseline", how="inner")
    if len(both) != len(mine) or len(both) != len(theirs):
        raise PipelineError(
            f"{setting} and {baseline} at {at}: {len(mine)} and {len(theirs)} images, "
            f"{len(both)} in the same trial positions (extract both with the same extract.trials)"
        )
    if not (both.victim == both.victim_baseline).all():
        raise PipelineError(
            f"{setting} and {baseline} at {at}: a trial holds other victims in the two "
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
    if "chance_psnr" in cell:  # the same batches scored against the attacker's own images
        chance = t_estimate(batch_means(cell, "chance_psnr"), evidence.confidence)
        above = t_estimate(batch_means(cell.assign(above=cell.psnr - cell.chance_psnr), "above"), evidence.confidence)
        out.update(
            {
                "chance_psnr": chance.mean,
                "chance_psnr_low": chance.low,
                "chance_psnr_high": chance.high,
                "above_chance": above.mean,
                "above_chance_low": above.low,
                "above_chance_high": above.high,
                # the attack's PSNR over chance's is, within its interval, under the effect the design
                # is sized to see: it recovers no more of the batch than real images of the data do
                "at_chance": bool(above.high < evidence.effect),
            }
        )
    return out


def settles(steps: list[int], flags: list[bool]) -> tuple[int | None, int | None]:
    """The optimizer step from which on every attacked checkpoint has the flag (None: the last has
    not), and the step of the checkpoint before it (None: from the first): what the flag marks
    happens between the two. A checkpoint that has it between two that have not does not count."""
    if not flags or not flags[-1]:
        return None, steps[-1] if steps else None
    first = len(flags)
    while first > 0 and flags[first - 1]:
        first -= 1
    return steps[first], steps[first - 1] if first else None


def add_floor(table: pd.DataFrame, per_image: pd.DataFrame, evidence: Evidence) -> pd.DataFrame:
    """Each cell against its setting's last checkpoint, batch by batch (the same victims in every
    checkpoint of a setting): `above_floor` the mean over batches of the cell's PSNR less the last
    checkpoint's, with its t interval; `at_floor` where that interval ends under the effect the
    design is sized to see: the attack has fallen as far as training takes it. A copied cell
    reads its original's images."""

    def images_of(row) -> pd.DataFrame:
        source = row.same_upload_as if isinstance(row.same_upload_as, str) else row.setting
        return per_image[(per_image.setting == source) & (per_image.checkpoint == row.checkpoint)]

    rows, keys = [], ["trial", "image"]
    for row in table.itertuples():
        mine = table[table.setting == row.setting]
        cell, floor = images_of(row), images_of(mine.loc[mine.step.idxmax()])
        both = cell.set_index(keys)[["psnr"]].join(floor.set_index(keys)[["psnr"]], rsuffix="_floor", how="inner")
        found = t_estimate(
            batch_means(both.reset_index().assign(d=both.psnr.values - both.psnr_floor.values), "d"),
            evidence.confidence,
        )
        rows.append(
            {
                "above_floor": found.mean,
                "above_floor_low": found.low,
                "above_floor_high": found.high,
                "at_floor": bool(found.high < evidence.effect),
            }
        )
    return pd.concat([table, pd.DataFrame(rows, index=table.index)], axis=1)


def fall_text(floor: tuple[int | None, int | None], chance: tuple[int | None, int | None], last) -> str:
    """Where a setting's attack reaches its floor and chance, in words; `last`: its last cell."""
    step, before = floor
    if step is None:
        text = f"not at its floor by step {before}"
    elif before is None:
        text = f"at its floor from step {step}, the first checkpoint"
    else:
        text = f"at its floor from step {step} (above at step {before})"
    step, before = chance
    if step is None:
        above = f"{last.above_chance:+.1f} dB [{last.above_chance_low:+.1f}, {last.above_chance_high:+.1f}]"
        return f"{text}; above chance at step {before} by {above}"
    return text + (f"; at chance from step {step}" + (f" (above at step {before})" if before is not None else ""))


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


def shown_difference(row, attacker: str = "") -> str:
    """ "-6.1 dB [-7.0, -5.2]": a table row's paired difference with its interval (`attacker`
    "classic_": the classic attacker's)."""
    mean, low, high = (getattr(row, f"{attacker}psnr_diff{end}") for end in ("", "_low", "_high"))
    return f"{mean:+.1f} dB [{low:+.1f}, {high:+.1f}]"


def results_table(
    per_image: pd.DataFrame,
    uploads: pd.DataFrame,
    describe,
    evidence: Evidence,
    order: list[str],
    copies: dict[tuple[str, str], str] | None = None,
) -> pd.DataFrame:
    """One row per (setting, checkpoint), settings in `order`, checkpoints by optimizer step.
    `describe(setting, checkpoint, uploads)` gives the columns that are not statistics (scheme,
    test accuracy, client, privacy, ...). `copies` maps a (setting, checkpoint) cell that was not
    attacked to the setting whose uploads it repeats: its row names that setting and carries the
    description, no statistics."""
    copies = copies or {}
    rows = []
    for setting in order:
        names = set(uploads[uploads.setting == setting].checkpoint) | {c for s, c in copies if s == setting}
        cells = []
        for at in names:
            original = copies.get((setting, at))
            mine = uploads[(uploads.setting == (original or setting)) & (uploads.checkpoint == at)]
            cells.append((int(mine.step.iloc[0]), at, original, mine))
        for step, at, original, mine in sorted(cells, key=lambda c: c[:2]):
            row = {
                "setting": setting,
                "checkpoint": at,
                "step": step,
                **describe(setting, at, mine),
                "same_upload_as": original,
            }
            if original is None:
                cell = per_image[(per_image.setting == setting) & (per_image.checkpoint == at)]
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
    """Each row's role, and the paired columns against the baseline at the same checkpoint (empty where
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
        both = paired(per_image, row.setting, baseline, row.checkpoint)
        base = table[(table.setting == baseline) & (table.checkpoint == row.checkpoint)]
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
    out["p_verdict"] = [verdict_p(row) if tests[row.Index] else math.nan for row in out.itertuples()]
    out["p_adjusted"] = math.nan
    out.loc[tests, "p_adjusted"] = holm(out.loc[tests, "p_verdict"].astype(float))
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
            # both attackers must detect it: each at power (1 + power) / 2 gives the pair `power`
            sds, power = [row.diff_sd], evidence.power
            if _classic_tested(row):
                sds, power = [row.diff_sd, row.classic_diff_sd], (1 + evidence.power) / 2
            detectable.append(
                max(detectable_difference(sd, int(row.paired_batches), evidence.alpha / size, power) for sd in sds)
            )
    out["effect"] = effects
    out["detectable"] = detectable
    out["underpowered"] = [bool(d > evidence.effect) if not math.isnan(d) else None for d in detectable]
    return out


def _classic_tested(row) -> bool:
    """Whether the cell's classic attacker, run apart from the adaptive one, was paired with the baseline."""
    value = getattr(row, "classic_p_value", math.nan)
    return value is not None and not pd.isna(value)


def verdict_p(row) -> float:
    """The p a test row's verdict reads: the adaptive attacker's paired p, or, where the classic
    attacker was tested too, the larger of the two (both must show the effect, the same way)."""
    if not _classic_tested(row):
        return float(row.p_value)
    if not _attackers_agree(row):
        return 1.0
    return float(max(row.p_value, row.classic_p_value))


def _attackers_agree(row) -> bool:
    return bool(np.sign(row.psnr_diff) == np.sign(row.classic_psnr_diff))


def cell_verdict(row, evidence: Evidence, baseline: str | None) -> str:
    """One cell's reading against the baseline, flagged where unconverged attacks of this cell or
    of the baseline's cell at its checkpoint are behind it."""
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
        if _classic_tested(row):
            shown = (
                f"{shown_difference(row)}, classic attacker {shown_difference(row, 'classic_')}, "
                f"p = {row.p_verdict:.2g} ("
                + ("the larger of the two attackers'" if _attackers_agree(row) else "the attackers disagree in sign")
                + f"; Holm {row.p_adjusted:.2g}), {batches}"
            )
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
    """A setting's verdict, checkpoint by checkpoint."""
    setting = cells.setting.iloc[0]
    if baseline is None:
        return "no baseline (report.baseline: null): compare the intervals"
    if setting == baseline:
        return "baseline"
    return "; ".join(
        f"{checkpoint_label(r.checkpoint)}: {cell_verdict(r, evidence, baseline)}" for r in cells.itertuples()
    )


def add_classic(
    table: pd.DataFrame, per_image: pd.DataFrame, evidence: Evidence, baseline: str | None = None
) -> pd.DataFrame:
    """The classic attacker's PSNR per cell, mean and t interval over its batches, where it ran as a
    separate attack; else the adaptive attacker's (`classic_separate` False: the same attack). For a
    test row (add_differences) with a separate classic attack, also its paired difference to the
    baseline's classic attacker at that checkpoint: `classic_psnr_diff` [interval], `classic_diff_sd`,
    `classic_p_value`. Where the baseline's cell has no separate classic attack its one attack is the
    classic one, if it ran with fixed hyper-parameters as the classic attacker always does; after a
    tuned one there is no like to pair with, and the cell is tested by its adaptive attacker alone."""
    classic = per_image[per_image.attacker == CLASSIC]
    base = per_image[per_image.setting == baseline]
    rows = []
    for row in table.itertuples():
        cell = classic[(classic.setting == row.setting) & (classic.checkpoint == row.checkpoint)]
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
            like = _baseline_classic(table, base, baseline, row.checkpoint)
            if getattr(row, "role", None) == TEST and like is not None and baseline is not None:
                both = paired(pd.concat([cell, like]), row.setting, baseline, row.checkpoint)
                d = t_estimate(batch_differences(both), evidence.confidence)
                rows[-1].update(
                    {
                        "classic_psnr_diff": d.mean,
                        "classic_psnr_diff_low": d.low,
                        "classic_psnr_diff_high": d.high,
                        "classic_diff_sd": d.sd,
                        "classic_p_value": d.p,
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
    return pd.concat([table, pd.DataFrame(rows, index=table.index, columns=_CLASSIC)], axis=1)


def _baseline_classic(table: pd.DataFrame, base: pd.DataFrame, baseline: str | None, at: str) -> pd.DataFrame | None:
    """The baseline's images at `at` as the classic attacker reconstructed them (add_classic), or None."""
    if baseline is None:
        return None
    cell = base[base.checkpoint == at]
    if (cell.attacker == CLASSIC).any():
        return cell[cell.attacker == CLASSIC]
    fixed = table[(table.setting == baseline) & (table.checkpoint == at)].hyperparameters == "fixed"
    return cell if fixed.all() and len(fixed) else None


_CLASSIC = [
    "classic_separate",
    "classic_psnr",
    "classic_psnr_low",
    "classic_psnr_high",
    "classic_psnr_diff",
    "classic_psnr_diff_low",
    "classic_psnr_diff_high",
    "classic_diff_sd",
    "classic_p_value",
]


def summary_of(
    table: pd.DataFrame,
    training: pd.DataFrame,
    evidence: Evidence,
    baseline: str | None,
    trains_like_baseline: Callable[[str], bool] | None = None,
) -> pd.DataFrame:
    """Per setting: PSNR and IIP at each attacked checkpoint as mean [interval] (columns
    psnr_<checkpoint>, ...), the accuracy the defense costs (the setting's scheme against the
    baseline's after the last epoch) and the verdict, checkpoint by checkpoint.

    A setting on the baseline's scheme whose client does not train as the baseline's
    (`trains_like_baseline`, pipeline.sections.trains_like; None: every one does) has its cost
    not measured (cost_measured false, accuracy_cost None): no training ran under its defense."""
    final = training[training.epoch == training.epoch.max()].set_index("scheme").test_accuracy
    base_scheme = None if baseline is None else table[table.setting == baseline].scheme.iloc[0]
    rows = []
    for setting, part in table.groupby("setting", sort=False):
        scheme = part.scheme.iloc[0]
        attacked = part[part.same_upload_as.isna()]
        row = {
            "setting": setting,
            "scheme": scheme,
            "trials": int(attacked.trials.max()) if len(attacked) else None,
            "hyperparameters": part.hyperparameters.iloc[0],
        }
        for r in part.itertuples():
            row[f"psnr_{r.checkpoint}"] = r.psnr
            row[f"psnr_{r.checkpoint}_ci"] = [r.psnr_low, r.psnr_high]
            row[f"iip_{r.checkpoint}"] = r.iip
            row[f"same_upload_{r.checkpoint}"] = r.same_upload_as
        if "classic_psnr" in part:
            row["classic_separate"] = bool(part.classic_separate.fillna(False).any())
            for r in part.itertuples():
                row[f"classic_psnr_{r.checkpoint}"] = r.classic_psnr
                row[f"classic_psnr_{r.checkpoint}_ci"] = [r.classic_psnr_low, r.classic_psnr_high]
        if "at_floor" in table and "at_chance" in table:  # where the attack falls (add_floor)
            measured = [  # a copy's chance is its original's cell's
                table[
                    (table.setting == (r.same_upload_as if isinstance(r.same_upload_as, str) else r.setting))
                    & (table.checkpoint == r.checkpoint)
                ].iloc[0]
                for r in part.itertuples()
            ]
            steps = [int(s) for s in part.step]
            floor = settles(steps, [bool(f) for f in part.at_floor])
            chance = settles(steps, [bool(m.at_chance) for m in measured])
            row.update(
                {
                    "floor_step": floor[0],
                    "above_floor_at_step": floor[1],
                    "chance_step": chance[0],
                    "above_chance_at_step": chance[1],
                    "falls": fall_text(floor, chance, measured[-1]),
                }
            )
        cost_measured = scheme != base_scheme or trains_like_baseline is None or trains_like_baseline(setting)
        row.update(
            {
                "test_accuracy": final.get(scheme),
                "cost_measured": cost_measured,
                "accuracy_cost": (final[base_scheme] - final[scheme])
                if cost_measured and base_scheme in final and scheme in final
                else None,
                "gh_last": part.gh.iloc[-1],
                "unconverged": int(part.unconverged.fillna(0).sum()),
                "verdict": verdict(part, evidence, baseline),
            }
        )
        rows.append(row)
    return pd.DataFrame(rows)
