"""Pictures and tables a researcher reads: image grids, the results table, the overview figure."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torchvision.utils import make_grid, save_image

from pipeline.files import atomic_file


def save_grid(path: Path, rows: list[torch.Tensor], scale: int = 2) -> None:
    """PNG of image rows ([N, C, H, W] in [0, 1] each, same N), enlarged `scale` times."""
    images = torch.cat(rows)
    if scale > 1:
        images = images.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    grid = make_grid(images, nrow=len(rows[0]), padding=2, pad_value=1.0)
    with atomic_file(path) as tmp:
        save_image(grid, tmp, format="png")


def markdown_table(frame: pd.DataFrame, floatfmt: str = ".3f") -> str:
    return frame.to_markdown(index=False, floatfmt=floatfmt) + "\n"


def overview_figure(path: Path, panels: list[tuple[str, torch.Tensor, torch.Tensor]], columns: int = 1) -> None:
    """One figure: for each (title, truth, paired reconstruction) a truth row over a reconstruction
    row, the panels laid out `columns` to a line (e.g. one line per setting, one column per epoch)."""
    width = max(len(t) for _, t, _ in panels)
    lines = -(-len(panels) // columns)
    plt, fig, axes = _figure(lines, columns, (columns * max(3, 1.2 * width), 2.6 * lines))
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (title, truth, recon) in zip(axes.flat, panels):
        grid = make_grid(torch.cat([truth, recon]), nrow=len(truth), padding=2, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray" if grid.shape[0] == 1 else None, vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel("truth / attack", fontsize=8)
    _save(plt, fig, path)


def _figure(rows: int = 1, columns: int = 1, size: tuple[float, float] = (6, 4)):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt, *plt.subplots(rows, columns, figsize=size, squeeze=False)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})  # no version stamp: same bytes
    plt.close(fig)


def line_plot(
    path: Path,
    frame: pd.DataFrame,
    x: str,
    y: str,
    by: str,
    title: str,
    ylabel: str,
    band: tuple[str, str] | None = None,
    symlog: bool = False,
) -> None:
    """One line of `y` against `x` per value of `by`, in the order the frame lists them; with
    `band` (two columns: low, high), each line's interval shaded behind it; `symlog`: `x` on a
    symmetric-log axis (optimizer steps from 0)."""
    plt, fig, axes = _figure(size=(6, 4) if band is None else (7, 4.5))
    ax = axes[0, 0]
    for name, part in frame.groupby(by, sort=False):
        part = part.sort_values(x)
        (line,) = ax.plot(part[x], part[y], marker="o", label=str(name))
        if band is not None:
            low, high = (part[column].astype(float) for column in band)
            ax.fill_between(part[x], low, high, color=line.get_color(), alpha=0.12)
    ax.set(title=title, xlabel=x, ylabel=ylabel)
    if symlog:
        ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(sorted(frame[x].unique()))
    ax.set_xticklabels([str(v) for v in sorted(frame[x].unique())], rotation=45)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    _save(plt, fig, path)


def scatter_plot(
    path: Path, frame: pd.DataFrame, x: str, y: str, by: str, title: str, xlabel: str, ylabel: str
) -> None:
    """`y` against `x`, one marker colour per value of `by`; points without an `x` are left out."""
    plt, fig, axes = _figure()
    ax = axes[0, 0]
    for name, part in frame.dropna(subset=[x, y]).groupby(by, sort=False):
        ax.scatter(part[x], part[y], label=str(name))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    _save(plt, fig, path)


def study_plots(folder: Path, records: list, importances: dict[str, float], objective: str) -> list[Path]:
    """A study's optimisation history (each trial's objective, pruned ones at their last step, the
    best so far) and its parameters' importance, as PNGs in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    plt, fig, axes = _figure()
    ax = axes[0][0]
    done = [r for r in records if r.state == "complete"]
    pruned = [r for r in records if r.state == "pruned"]
    ax.plot([r.number for r in done], [r.value for r in done], "o", label="complete")
    ax.plot([r.number for r in pruned], [r.steps[-1][1] for r in pruned], "x", label="pruned (at its last step)")
    pick = max if objective == "psnr" else min
    best, running = [], None
    for r in done:
        running = r.value if running is None else pick(running, r.value)
        best.append(running)
    ax.step([r.number for r in done], best, where="post", label="best so far")
    ax.set_xlabel("trial (0: the fixed attack)")
    ax.set_ylabel("surrogate PSNR dB" if objective == "psnr" else "gradient loss")
    ax.legend(fontsize=8)
    paths = [folder / "optimisation_history.png"]
    _save(plt, fig, paths[0])
    if importances:
        plt, fig, axes = _figure(size=(6, 1 + 0.5 * len(importances)))
        names = list(importances)
        axes[0][0].barh(names, [importances[n] for n in names])
        axes[0][0].set_xlabel("importance (fANOVA)")
        paths.append(folder / "parameter_importance.png")
        _save(plt, fig, paths[1])
    return paths


def privacy_utility_plot(path: Path, frame: pd.DataFrame, checkpoint: str, confidence: float) -> None:
    """Leakage against utility, one point per setting: the scheme's final test accuracy across, the
    attack's PSNR (left) and image identifiability (right) at `checkpoint` up, each with its interval
    over batches. Columns: setting, test_accuracy, psnr/_low/_high, iip/_low/_high, and
    same_upload_as (a hollow marker: that setting's upload, measured under another name). Points
    at one accuracy (the client settings of one scheme) are spread a little apart to be read."""
    plt, fig, axes = _figure(1, 2, (13, 5))
    frame = frame.dropna(subset=["test_accuracy"]).reset_index(drop=True)
    span = float(frame.test_accuracy.max() - frame.test_accuracy.min()) or 1.0
    rank = frame.groupby("test_accuracy").cumcount()
    size = frame.groupby("test_accuracy").setting.transform("count")
    x = frame.test_accuracy + (rank - (size - 1) / 2) * 0.02 * span
    colours = plt.get_cmap("tab10").colors
    for ax, measure, label in ((axes[0, 0], "psnr", "PSNR (dB)"), (axes[0, 1], "iip", "image identifiability")):
        for i, row in frame.iterrows():
            value, low, high = (float(row[f"{measure}{s}"]) for s in ("", "_low", "_high"))
            if value != value:
                continue
            copy = isinstance(row.same_upload_as, str)
            ax.errorbar(
                x[i],
                value,
                yerr=[[value - low], [high - value]] if low == low else None,
                fmt="osD^v<>p*h"[i % 10],
                color=colours[i % len(colours)],
                mfc="white" if copy else None,
                capsize=3,
                label=f"{row.setting} (= {row.same_upload_as})" if copy else row.setting,
            )
        ax.set(xlabel="test accuracy of the setting's scheme after training", ylabel=f"{label} at {checkpoint}")
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(f"Attack PSNR, mean and {confidence:.0%} interval over client batches", fontsize=10)
    axes[0, 1].set_title("Share of reconstructions whose nearest image is their own", fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.subplots_adjust(right=0.83, wspace=0.25)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def curve_plot(path: Path, frame: pd.DataFrame, floor: tuple[float, float, float] | None, title: str) -> None:
    """The attack through training: PSNR (left) and image identifiability (right) against the
    checkpoint's optimizer step on a symmetric-log axis (step 0 included), one line per setting
    with its interval band, the classic attacker dashed where it ran separately; `floor` (mean,
    low, high) the chance PSNR shaded grey. Columns: setting, step, psnr/_low/_high,
    iip/_low/_high, classic_separate, classic_psnr/_low/_high."""
    plt, fig, axes = _figure(1, 2, (14, 5))
    colours = plt.get_cmap("tab10").colors
    for i, (setting, part) in enumerate(frame.groupby("setting", sort=False)):
        part = part.sort_values("step")
        colour = colours[i % len(colours)]
        for ax, measure in ((axes[0, 0], "psnr"), (axes[0, 1], "iip")):
            low, high = (part[f"{measure}{s}"].astype(float) for s in ("_low", "_high"))
            ax.plot(part.step, part[measure].astype(float), marker="o", color=colour, label=setting)
            ax.fill_between(part.step, low, high, color=colour, alpha=0.12)
        classic = part[part.classic_separate.fillna(False).astype(bool)]
        if len(classic):
            axes[0, 0].plot(
                classic.step,
                classic.classic_psnr.astype(float),
                ls="--",
                marker="x",
                color=colour,
                label=f"{setting} (classic attacker)",
            )
    if floor is not None:
        mean, low, high = floor
        axes[0, 0].axhspan(low, high, color="grey", alpha=0.25)
        axes[0, 0].axhline(mean, color="grey", lw=1, label="chance: the attacker's own images")
    steps = sorted(frame.step.unique())
    for ax, label in ((axes[0, 0], "PSNR (dB), Hungarian-paired"), (axes[0, 1], "image identifiability")):
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(-0.3, max(steps) * 1.3 + 1)
        ax.set_xticks(steps)
        ax.set_xticklabels([str(s) for s in steps], rotation=60, fontsize=8)
        ax.set(xlabel="optimizer step of the checkpoint attacked (symmetric log scale)", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(title, fontsize=10)
    axes[0, 1].set_title("Share of reconstructions whose nearest image is their own", fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.subplots_adjust(right=0.8, wspace=0.25, bottom=0.18)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
