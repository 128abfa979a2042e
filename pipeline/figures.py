"""The report's figures: each upload's truth over its reconstruction, an overview per setting
and of all, and the plots (PSNR through training, accuracy, GH and GIR against PSNR, privacy
against utility)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pipeline.files import load_tensors
from pipeline.report import line_plot, overview_figure, privacy_utility_plot, save_grid, scatter_plot
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
    panels: dict[tuple[str, int], tuple] = {}
    for u in uploads.itertuples():
        rec, _ = load_tensors(attacks / u.setting / f"{u.upload}.safetensors", expected={"images", "labels"})
        truth_u8, _, _ = load_truth(truths / u.setting / f"{u.upload}.safetensors")
        mine = per_image[(per_image.setting == u.setting) & (per_image.upload == u.upload)].sort_values("image")
        truth, paired = truth_u8.float() / 255, rec["images"][mine["reconstruction"].tolist()]
        save_grid(figures / u.setting / f"{u.upload}.png", [truth, paired])  # truth over reconstruction
        if u.trial == 0:  # the overviews show the first trial of each cell
            gh = "n/a" if pd.isna(u.gh) else f"{u.gh:.3f}"
            title = f"{u.setting} epoch {u.epoch} trial 0: GH {gh}, PSNR {mine.psnr.mean():.1f} dB"
            panels[(u.setting, int(u.epoch))] = (title, truth, paired)
    for row in table[table.same_upload_as.notna()].itertuples():  # the original's panel, named so
        _, truth, paired = panels[(row.same_upload_as, int(row.epoch))]
        panels[(row.setting, int(row.epoch))] = (
            f"{row.setting} epoch {row.epoch}: the same upload as {row.same_upload_as}",
            truth,
            paired,
        )
    ordered = [[panels[(s, e)] for e in p.extract.epochs if (s, e) in panels] for s in p.settings]
    for setting, mine in zip(p.settings, ordered):  # one figure per setting across epochs
        if mine:
            overview_figure(figures / f"{setting}.png", mine, columns=len(mine))
    overview_figure(overview, [panel for mine in ordered for panel in mine], columns=len(p.extract.epochs))
    first = min(p.extract.epochs)
    leakage = table[(table.epoch == first) & (table.role != "budget")].copy()
    for column in ("psnr", "psnr_low", "psnr_high", "iip", "iip_low", "iip_high"):  # a copy shows its original's
        leakage[column] = [
            table[(table.setting == r.same_upload_as) & (table.epoch == first)][column].iloc[0]
            if isinstance(r.same_upload_as, str)
            else getattr(r, column)
            for r in leakage.itertuples()
        ]
    leakage["test_accuracy"] = [summary.set_index("setting").test_accuracy[s] for s in leakage.setting]
    privacy_utility_plot(plots / "privacy_utility.png", leakage, first, p.report.confidence)
    attacked = table[table.same_upload_as.isna()]
    line_plot(
        plots / "psnr_by_epoch.png",
        attacked,
        "epoch",
        "psnr",
        "setting",
        f"Attack PSNR through training, mean and {p.report.confidence:.0%} interval over "
        f"{int(attacked.trials.max())} client batches",
        "PSNR (dB), Hungarian-paired",
        band=("psnr_low", "psnr_high"),
    )
    line_plot(
        plots / "accuracy_by_epoch.png",
        training,
        "epoch",
        "test_accuracy",
        "scheme",
        "Test accuracy per defense scheme",
        "test accuracy",
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
