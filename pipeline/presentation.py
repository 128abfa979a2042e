"""The results as a reader takes them: the table of every cell and the summary as text
("mean [interval]", p values, verdicts in words), and results.md around them. Every number
comes from pipeline.results; only the wording is decided here."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from pipeline.checkpoints import checkpoint_label, training_order
from pipeline.report import markdown_table
from pipeline.results import BASELINE, BUDGET, COPY, TEST, UNPAIRED

if TYPE_CHECKING:
    from pipeline.config import Params


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
    out = table[["setting", "checkpoint", "step", "test_accuracy", "client", "trials"]].copy()
    out["checkpoint"] = out.checkpoint.map(checkpoint_label)
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
        if "classic_p_value" in table and table.classic_p_value.notna().any():
            out["classic vs baseline dB"] = [
                _interval(r.classic_psnr_diff, r.classic_psnr_diff_low, r.classic_psnr_diff_high)
                for r in table.itertuples()
            ]
        out["p"] = [
            _p(v if not pd.isna(v) else p) for v, p in zip(table.p_verdict, table.p_value)
        ]  # budget: no verdict
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
    checkpoints = [c.removeprefix("psnr_") for c in summary.columns if c.startswith("psnr_") and not c.endswith("_ci")]
    out = summary[["setting", "scheme", "trials"]].copy()
    out["trials"] = out.trials.astype("Int64")
    if (summary.hyperparameters != "fixed").any():  # else every attack ran with params.yaml's values
        out["attack hyper-parameters"] = summary.hyperparameters
    for at in checkpoints:
        same = summary[f"same_upload_{at}"]
        out[f"PSNR {checkpoint_label(at)}"] = [
            f"= {s}" if isinstance(s, str) else _interval(m, *ci)
            for m, ci, s in zip(summary[f"psnr_{at}"], summary[f"psnr_{at}_ci"], same)
        ]
        out[f"IIP {checkpoint_label(at)}"] = [
            "" if isinstance(s, str) or v is None or pd.isna(v) else f"{v:.2f}"
            for v, s in zip(summary[f"iip_{at}"], same)
        ]
    if "classic_separate" in summary:
        for at in checkpoints:
            classic = f"classic_psnr_{at}"
            out[f"classic {checkpoint_label(at)}"] = [
                "" if isinstance(s, str) else (_interval(m, *ci) if separate else "same attack")
                for m, ci, separate, s in zip(
                    summary[classic],
                    summary[f"{classic}_ci"],
                    summary.classic_separate,
                    summary[f"same_upload_{at}"],
                )
            ]
    if "falls" in summary:
        out["where the attack falls"] = summary.falls
    out["test accuracy"] = summary.test_accuracy
    out["cost vs baseline"] = [
        "not measured" if not measured else "" if pd.isna(cost) else f"{cost:.3f}"
        for cost, measured in zip(summary.accuracy_cost, summary.cost_measured)
    ]
    out["verdict"] = summary.verdict
    return out


def intro(p: Params, table: pd.DataFrame, baseline: str | None) -> str:
    r = p.report
    lpips = "" if table.lpips.notna().any() else " LPIPS n/a: no AlexNet weights on this machine (see README)."
    family = int(table.family_size.iloc[0]) if "family_size" in table else 0
    paired = (
        "no baseline is set (report.baseline: null), so there are no paired columns: compare the intervals."
        if baseline is None
        else f"Every setting is paired with `{baseline}` batch by batch (same checkpoint and trial: the same victims); "
        "a setting whose batches are chosen otherwise (label repetition, another batch size) is not paired. "
        "'vs baseline' is the mean over the batches of each batch's mean paired PSNR difference, with its t "
        f"interval; p is the paired t-test of the same batch means (scipy.stats.ttest_1samp), so the interval "
        f"and the test are one procedure. The family is every paired cell of the table ({family} tests; the "
        f"budget row and the cells that are another setting's upload are not in it): p adjusted by Holm "
        f"(statsmodels). Where the classic attacker ran beside the adaptive one, a verdict of effect needs "
        "both: the cell's p is the larger of their two paired p-values (an intersection-union test), and "
        "differences of opposite signs are no effect (its detectable difference is the larger of the two "
        f"attackers', each at {(1 + r.power) / 2:.0%} power, so that both detect it with {r.power:.0%}). "
        "Verdict, per cell: **protects** when the Holm-adjusted "
        f"p < {r.alpha:g} and the "
        "difference is negative; **leaks more** when it is positive; else **no detectable effect**, with the "
        f"smallest difference the design would detect with {r.power:.0%} power at Holm's strictest level "
        f"(alpha / {family}), from that cell's batch SD (the paired t-test's power); **underpowered** where "
        f"that exceeds {r.effect:g} dB."
    )
    budget = (
        f" `{r.budget}` is `{baseline}` attacked at {p.attack_for(r.budget).iterations} iterations instead of "
        f"{p.attack_for(baseline).iterations}: its difference is how much more the attacker gets with twice the "
        "budget, not a verdict (every verdict is a bound of this attacker)."
        if r.budget and baseline  # (a budget needs a baseline: pipeline.config)
        else ""
    )
    return (
        f"Each cell: {p.extract.trials} client batches (trials) of the setting's batch size, disjoint, drawn "
        "from the victim pool. The batch is the unit: its images share one attack, so every interval and test "
        f"runs over the batch means ({r.confidence:.0%} t intervals); the PSNR median is over images, as "
        f"description. {paired}{budget} A cell whose uploads are byte for byte another setting's (the same "
        "checkpoint and client) was attacked once and reads 'same upload as'. IIP: the share of "
        "reconstructions whose nearest image by MSE, among the victim pool and as many of the attacker's own "
        "images, is their own. An attack counts as unconverged when its best gradient loss over the last 10 % "
        "of iterations is more than 1 % under the best of the 10 % before (pipeline.attack.invert."
        "still_falling); a cell's verdict says when it rests on any of its own or of the baseline's cell at "
        "that checkpoint. The attack runs with params.yaml's hyper-parameters (fixed) unless the summary names "
        "tuned ones: chosen by tune@<setting> on the attacker's own images, never a victim's (the classic "
        f"attacker keeps the fixed ones).{lpips}\n"
    )


def training_accuracy(training: pd.DataFrame, schemes: list[str]) -> pd.DataFrame:
    """Test accuracy, one row per checkpoint in the order of training, one column per scheme."""
    accuracy = training.pivot(index="checkpoint", columns="scheme", values="test_accuracy")
    out = accuracy.loc[training_order(training), schemes]
    out = out.reset_index()
    out["checkpoint"] = out.checkpoint.map(checkpoint_label)
    return out


def results_markdown(p: Params, table: pd.DataFrame, summary: pd.DataFrame, training: pd.DataFrame, baseline) -> str:
    """reports/results.md: how to read it, the summary, every cell, training."""
    return (
        "# Results\n\n"
        + intro(p, table, baseline)
        + "\n## Summary\n\nPSNR (dB, Hungarian-paired) at each attacked checkpoint as mean [interval over batches] "
        "and IIP, against the "
        "adaptive attacker (it models the client's asynchronous-BatchNorm shards and unrolls its local steps, as "
        "the threat model states them) and, where that differs, the classic attacker (one full-batch gradient; "
        "'same attack' where there is nothing to adapt to); the test accuracy of the setting's scheme after the "
        "last epoch, with its cost against the baseline's scheme (positive: the defense costs accuracy; 'not "
        "measured' where the setting's client acts otherwise than the baseline's on its scheme's checkpoints: "
        "no training ran under it); the "
        "verdict against the baseline, read against the adaptive attacker.\n\n"
        + markdown_table(shown_summary(summary))
        + "\n## Every cell\n\nOne row per client setting x checkpoint (its optimizer step beside it). "
        "GH = 1 - cos(upload, the single-step "
        "full-batch sync-BN gradient the attacker models), the mean over the trials; epsilon: the DP-SGD model's, "
        "or the DP client's. Every number and per-image score: `reports/results.csv`, `reports/per_image.csv`.\n\n"
        + markdown_table(shown_table(table))
        + "\n## Training\n\nTest accuracy per scheme and checkpoint (a scheme's optimizer steps per epoch follow "
        "its global batch); epsilon where the scheme is DP-SGD.\n\n"
        + markdown_table(training_accuracy(training, list(p.schemes)))
        + "\n"
        + markdown_table(training[training.epsilon.notna()][["scheme", "checkpoint", "step", "epsilon", "privacy"]])
    )
