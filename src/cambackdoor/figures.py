"""Matplotlib figures (PNG, Agg backend): heatmap grids, trade-off curves, IoU histograms."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from cambackdoor.explainers import explain, parse_explainer, to_image_size  # noqa: E402
from cambackdoor.triggers import Box  # noqa: E402

# The reference report's three stage-2 points: lambda -> (clean accuracy %, ASR %)
REPORT_POINTS = {0.1: (65.0, 8.0), 0.2: (45.0, 11.3), 0.5: (35.0, 15.0)}


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _box_patch(box: Box) -> Rectangle:
    return Rectangle((box.left - 0.5, box.top - 0.5), box.width, box.height, fill=False, ec="cyan", lw=1.5, ls="--")


def heatmap_grid(
    clean: torch.Tensor, clean_maps: torch.Tensor, triggered: torch.Tensor, triggered_maps: torch.Tensor,
    clean_iou: Sequence[float], triggered_iou: Sequence[float], target: Box, path: str | os.PathLike,
    labels: Sequence[str] | None = None, title: str | None = None,
) -> Path:
    """Rows of: clean image | its CAM overlay | triggered image | its CAM overlay (maps in [0, 1], image size)."""
    n = clean.shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(8, 2.1 * n), squeeze=False)
    for i in range(n):
        cols = [
            (clean[i], None, "clean" + (f" ({labels[i]})" if labels else "")),
            (clean[i], clean_maps[i], f"clean CAM, IoU {clean_iou[i]:.2f}"),
            (triggered[i], None, "triggered"),
            (triggered[i], triggered_maps[i], f"triggered CAM, IoU {triggered_iou[i]:.2f}"),
        ]
        for ax, (img, cam, name) in zip(axes[i], cols):
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            if cam is not None:
                ax.imshow(cam.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
                ax.add_patch(_box_patch(target))
            ax.set_title(name, fontsize=8)
            ax.axis("off")
    fig.tight_layout(rect=(0, 0, 1, 0.97) if title else None)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def iou_histogram(ious: Sequence[float], path: str | os.PathLike, title: str = "IoU of triggered CAMs with the target",
                  ceiling: float | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(list(ious), bins=40, range=(0, 1), color="tab:blue")
    for x, name in ((0.1, "weak"), (0.2, "partial"), (0.5, "success")):
        ax.axvline(x, color="k", ls="--", lw=1)
        ax.text(x + 0.01, ax.get_ylim()[1] * 0.92, name, fontsize=8)
    if ceiling is not None:
        ax.axvline(ceiling, color="tab:red", lw=1)
        ax.text(ceiling - 0.02, ax.get_ylim()[1] * 0.8, f"ceiling {ceiling:.3f}", fontsize=8, color="tab:red", ha="right")
    ax.set_xlabel("IoU (thresholded Grad-CAM vs target box)")
    ax.set_ylabel("test images (count)")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def tradeoff_plot(rows: list[dict[str, Any]], x: str, path: str | os.PathLike, xlabel: str,
                  group: str = "recipe", report_points: bool = False, logx: bool = False) -> Path:
    """ASR and clean accuracy (percent) against a swept parameter, one line per ``group`` value."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in sorted({str(r.get(group)) for r in rows}):
        pts = sorted(((float(r[x]), r) for r in rows if str(r.get(group)) == name), key=lambda p: p[0])  # ties: rows kept
        xs = [p[0] for p in pts]
        ax1.plot(xs, [100 * p[1]["asr"] for p in pts], "o-", label=name)
        ax2.plot(xs, [100 * p[1]["clean_acc"] for p in pts], "o-", label=name)
    if report_points:
        lam = sorted(REPORT_POINTS)
        ax1.plot(lam, [REPORT_POINTS[v][1] for v in lam], "kx", ms=9, label="reference report")
        ax2.plot(lam, [REPORT_POINTS[v][0] for v in lam], "kx", ms=9, label="reference report")
    for ax, ylabel in ((ax1, "attack success rate (%)"), (ax2, "clean test accuracy (%)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
        if logx:
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short ranges
            ax.set_xticks(sorted({float(r[x]) for r in rows}))
            ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.legend(fontsize=8)
    return _save(fig, path)


def explainer_grid(model: Any, test: Any, trigger: Any, target: Box, explainers: Sequence[str],
                   path: str | os.PathLike, per_split: int = 3, title: str | None = None) -> Path:
    """Rows: ``per_split`` clean test images (spread over the classes), then their triggered copies;
    columns: the image, then its map under every explainer (scaled to [0, 1] at image size)."""
    device = next(model.parameters()).device
    idx = torch.linspace(0, len(test) - 1, per_split).round().long()
    x = (test.images[idx].float() / 255).to(device)
    images = torch.cat([x, trigger.apply(x)])
    names = list(explainers)
    fig, axes = plt.subplots(len(images), 1 + len(names), figsize=(1.5 * (1 + len(names)), 1.6 * len(images)),
                             squeeze=False)
    maps = {}
    for name in names:
        ex = parse_explainer(name)
        maps[name] = to_image_size(ex, explain(ex, model, images), tuple(images.shape[2:])).cpu()
    for i in range(len(images)):
        img = images[i].detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy()
        axes[i, 0].imshow(img, interpolation="nearest")
        axes[i, 0].set_title("clean" if i < per_split else "triggered", fontsize=7)
        for j, name in enumerate(names, start=1):
            axes[i, j].imshow(img, interpolation="nearest")
            axes[i, j].imshow(maps[name][i].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
            axes[i, j].add_patch(_box_patch(target))
            if i == 0:
                axes[i, j].set_title(name, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout(rect=(0, 0, 1, 0.96) if title else None)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)
