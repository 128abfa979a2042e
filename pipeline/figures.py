"""The report's figures: each upload's truth over its reconstruction, an overview per setting
and of all, and the plots (PSNR through training, accuracy, GH and GIR against PSNR, privacy
against utility)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pipeline.checkpoints import checkpoint_label, training_order
from pipeline.files import load_tensors
from pipeline.report import curve_plot, line_plot, overview_figure, privacy_utility_plot, save_grid, scatter_plot
from pipeline.uploads import load_truth

if TYPE_CHECKING:
    from pipeline.config import Params


def write_figures(
    p: Params,
    tables: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame],
    attacks: Path,
    truths: Path,
    out: Path,
) -> None:
    """The report's figures into `out` (reports/): truth over reconstruction per upload
    (figures/<setting>/), per setting and overall (reconstructions.png), and the plots (plots/),
    from the results `tables` (table, summary, training, per image, uploads) and the
    reconstructions and truth they were scored on."""
    table, summary, training, per_image, uploads = tables
    figures, overview, plots = out / "figures", out / "reconstructions.png", out / "plots"
    panels: dict[tuple[str, str], tuple] = {}
    for u in uploads.itertuples():
        rec, _ = load_tensors(attacks / u.setting / f"{u.upload}.safetensors", expected={"images", "labels"})
        truth_u8, _, _ = load_truth(truths / u.setting / f"{u.upload}.safetensors")
        mine = per_image[(per_image.setting == u.setting) & (per_image.upload == u.upload)].sort_values("image")
        truth, paired = truth_u8.float() / 255, rec["images"][mine["reconstruction"].tolist()]
        save_grid(figures / u.setting / f"{u.upload}.png", [truth, paired])  # truth over reconstruction
        if u.trial == 0:  # the overviews show the first trial of each cell
            gh = "n/a" if pd.isna(u.gh) else f"{u.gh:.3f}"
            at = checkpoint_label(u.checkpoint)
            title = f"{u.setting} {at} trial 0: GH {gh}, PSNR {mine.psnr.mean():.1f} dB"
            panels[(u.setting, u.checkpoint)] = (title, truth, paired)
    for row in table[table.same_upload_as.notna()].itertuples():  # the original's panel, named so
        _, truth, paired = panels[(row.same_upload_as, row.checkpoint)]
        panels[(row.setting, row.checkpoint)] = (
            f"{row.setting} {checkpoint_label(row.checkpoint)}: the same upload as {row.same_upload_as}",
            truth,
            paired,
        )
    checkpoints = training_order(table)
    ordered = [[panels[(s, c)] for c in checkpoints if (s, c) in panels] for s in p.settings]
    for setting, mine in zip(p.settings, ordered):  # one figure per setting across checkpoints
        if mine:
            overview_figure(figures / f"{setting}.png", mine, columns=len(mine))
    overview_figure(overview, [panel for mine in ordered for panel in mine], columns=len(checkpoints))
    first = checkpoints[0]
    leakage = table[(table.checkpoint == first) & (table.role != "budget")].copy()
    for column in ("psnr", "psnr_low", "psnr_high", "iip", "iip_low", "iip_high"):  # a copy shows its original's
        leakage[column] = [
            table[(table.setting == r.same_upload_as) & (table.checkpoint == first)][column].iloc[0]
            if isinstance(r.same_upload_as, str)
            else getattr(r, column)
            for r in leakage.itertuples()
        ]
    leakage["test_accuracy"] = [summary.set_index("setting").test_accuracy[s] for s in leakage.setting]
    privacy_utility_plot(plots / "privacy_utility.png", leakage, checkpoint_label(first), p.report.confidence)
    attacked = table[table.same_upload_as.isna() & (table.role != "budget")]
    chance = None
    if "chance_psnr" in table:  # the victims of the first attacked cell: every checkpoint's batches
        first_cell = attacked.iloc[0]
        chance = (first_cell.chance_psnr, first_cell.chance_psnr_low, first_cell.chance_psnr_high)
    curve_plot(
        plots / "psnr_through_training.png",
        attacked,
        chance,
        f"Attack PSNR through training, mean and {p.report.confidence:.0%} interval over "
        f"{int(attacked.trials.max())} client batches",
    )
    line_plot(
        plots / "accuracy_through_training.png",
        training,
        "step",
        "test_accuracy",
        "scheme",
        "Test accuracy per defense scheme, by optimizer step",
        "test accuracy",
        symlog=True,
    )
    scored = uploads.merge(per_image.groupby(["setting", "upload"]).psnr.mean().reset_index(), on=["setting", "upload"])
    scatter_plot(
        plots / "gh_vs_psnr.png",
        scored,
        "gh",
        "psnr",
        "setting",
        "Gradient heterogeneity against attack PSNR, one point per upload",
        "GH = 1 - cos(upload, modelled gradient)",
        "mean PSNR of the upload (dB)",
    )
    scatter_plot(
        plots / "gir_vs_psnr.png",
        per_image,
        "gir",
        "psnr",
        "setting",
        "Gradient information ratio against PSNR, one point per image",
        "GIR (%)",
        "PSNR (dB)",
    )
