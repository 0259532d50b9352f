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
