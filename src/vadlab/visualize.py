"""Pictures of anomaly maps: the image, its ground-truth outline and the map as a heat overlay."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vadlab.fileio import atomic_path

#: the one colormap of every anomaly map in the package, the pipeline's figures and the book (perceptually
#: uniform, readable in grey scale; ``jet`` is neither)
CMAP = "magma"


def overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, mask: np.ndarray | None = None,
            alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 picture of ``image`` [H, W, 3] in [0, 1] with ``amap`` coloured over it and the mask outline."""
    from matplotlib import colormaps
    from scipy import ndimage

    heat = colormaps[CMAP](np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0, 1))[..., :3]
    out = (1 - alpha) * image + alpha * heat
    if mask is not None and mask.any():
        edge = mask.astype(bool) & ~ndimage.binary_erosion(mask.astype(bool))
        out[edge] = (1.0, 1.0, 1.0)
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def save_overlays(result: Any, out_dir: Path, n: int = 6) -> list[Path]:
    """Write side-by-side PNGs (image | map overlay) for the ``n`` highest-scoring defective and normal images.

    The colour scale is shared by all images of the run (display only; metrics use raw scores).
    """
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vmin, vmax = float(np.min(result.maps)), float(np.max(result.maps))
    order = np.argsort(-result.scores)
    picks = [i for i in order if result.labels[i] == 1][: n - n // 3] + [i for i in order if result.labels[i] == 0][: n // 3]
    written = []
    for i in picks:
        image = np.asarray(Image.open(result.paths[i]).convert("RGB").resize(result.maps.shape[1:][::-1]),
                           dtype=np.float64) / 255
        pic = overlay(image, result.maps[i].astype(np.float64), vmin, vmax, result.masks[i])
        name = f"{Path(result.paths[i]).parent.name}_{Path(result.paths[i]).stem}.png"
        path = out_dir / name
        with atomic_path(path) as tmp:
            Image.fromarray(np.concatenate([(image * 255).astype(np.uint8), pic], axis=1)).save(tmp, format="PNG")
        written.append(path)
    return written


def save_heatmap(path: Path, image: np.ndarray, amap: np.ndarray, score: float, vmin: float, vmax: float,
                 threshold: float | None = None, title: str = "") -> Path:
    """One PNG: the image beside its anomaly-map overlay with a colour bar, titled with score and threshold."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 4), constrained_layout=True)
    left.imshow(image)
    left.set_title(title, fontsize=9)
    right.imshow(image)
    shown = right.imshow(amap, cmap=CMAP, alpha=0.5, vmin=vmin, vmax=vmax)
    fig.colorbar(shown, ax=right, fraction=0.046, label="anomaly score")
    verdict = "" if threshold is None else (f" > threshold {threshold:.4g}: anomalous" if score > threshold
                                            else f" <= threshold {threshold:.4g}: normal")
    right.set_title(f"score {score:.4g}{verdict}", fontsize=9)
    for ax in (left, right):
        ax.axis("off")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return Path(path)


#: colours of a schematic's boxes by the role of what they hold
SCHEMATIC_KINDS = {"data": "#e6e6e6", "frozen": "#9ecae1", "trained": "#fdae6b", "statistics": "#a1d99b",
                   "score": "#fbb4b9"}
_SCHEMATIC_LEGEND = {"data": "data", "frozen": "frozen (pretrained)", "trained": "trained",
                     "statistics": "fitted statistics / memory", "score": "anomaly score or map"}


def schematic(nodes: dict[str, tuple[float, float, str, str]], edges: list[tuple], title: str | None = None,
              ax: Any = None, width: float = 1.8, height: float = 0.66) -> Any:
    """Draw a method's block diagram: boxes at grid positions joined by arrows; returns the axes.

    ``nodes``: name -> ``(column, row, label, kind)`` with ``kind`` one of :data:`SCHEMATIC_KINDS` (what the
    box holds: data, a frozen pretrained network, a trained network, fitted statistics, the score); rows
    grow downwards; half rows (0.5) centre a box between two. ``edges``: ``(from, to)`` or ``(from, to, label)``; a label sits at the arrow's middle.
    A legend lists the kinds used. Unknown node names or kinds raise a ValueError naming them.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch, Patch

    unknown = sorted({k for *_, k in nodes.values()} - set(SCHEMATIC_KINDS))
    missing = sorted({n for e in edges for n in e[:2]} - set(nodes))
    if unknown or missing:
        raise ValueError(f"schematic: unknown kinds {unknown} (use {', '.join(SCHEMATIC_KINDS)}) or edges to "
                         f"undefined nodes {missing}")
    cols = max(c for c, *_ in nodes.values()) + 1
    rows = max(r for _, r, *_ in nodes.values()) + 1
    if ax is None:
        _, ax = plt.subplots(figsize=(2.05 * cols + 0.4, 1.0 * rows + 0.9))
    centre = {n: (2.1 * c, -1.05 * r) for n, (c, r, *_) in nodes.items()}
    for name, (_, _, label, kind) in nodes.items():
        x, y = centre[name]
        ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height,
                                    boxstyle="round,pad=0.02,rounding_size=0.08", fc=SCHEMATIC_KINDS[kind],
                                    ec="0.3", lw=0.8))
        ax.text(x, y, label, ha="center", va="center", fontsize=7.5, wrap=True)
    for edge in edges:
        a, b = edge[:2]
        (xa, ya), (xb, yb) = centre[a], centre[b]
        # leave each box through the side facing the other box
        dx, dy = xb - xa, yb - ya
        if abs(dx) * height >= abs(dy) * width:
            start, end = (xa + np.sign(dx) * width / 2, ya), (xb - np.sign(dx) * width / 2, yb)
        else:
            start, end = (xa, ya + np.sign(dy) * height / 2), (xb, yb - np.sign(dy) * height / 2)
        ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", color="0.25", lw=0.9,
                                                              shrinkA=1, shrinkB=1))
        if len(edge) > 2:  # above a horizontal arrow, right of a vertical one
            vertical = start[0] == end[0]
            ax.text((start[0] + end[0]) / 2 + (0.06 if vertical else 0), (start[1] + end[1]) / 2 + (0 if vertical else 0.06),
                    edge[2], ha="left" if vertical else "center", va="center" if vertical else "bottom",
                    fontsize=6.5, style="italic", color="0.2")
    used = [k for k in SCHEMATIC_KINDS if any(kind == k for *_, kind in nodes.values())]
    ax.legend(handles=[Patch(fc=SCHEMATIC_KINDS[k], ec="0.3", label=_SCHEMATIC_LEGEND[k]) for k in used],
              loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(used), fontsize=6.5, frameon=False)
    ax.set_xlim(-width / 2 - 0.15, 2.1 * (cols - 1) + width / 2 + 0.15)
    ax.set_ylim(-1.05 * (rows - 1) - height / 2 - 0.15, height / 2 + 0.15)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    return ax
