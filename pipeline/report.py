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
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    width = max(len(t) for _, t, _ in panels)
    lines = -(-len(panels) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(columns * max(3, 1.2 * width), 2.6 * lines), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, truth, recon) in zip(axes.flat, panels):
        grid = make_grid(torch.cat([truth, recon]), nrow=len(truth), padding=2, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray" if grid.shape[0] == 1 else None, vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel("truth / attack", fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
