"""Time the pixel metrics of vadlab.metrics against scikit-learn on a realistic test set size.

100 anomaly maps of 256x256 (6.5M pixels), ~2% defect pixels in elliptic blobs,
1/3 of the images good.
Run:  OMP_NUM_THREADS=1 python benchmarks/bench_metrics.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from vadlab import metrics as M


def make_data(n: int = 100, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Blob-shaped defect masks (~2% of all pixels) and noisy maps that partly see them."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        if i % 3 == 0:
            continue  # good image
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(20, size - 20, size=2)
            ry, rx = rng.uniform(6, 28, size=2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    noise = ndimage.gaussian_filter(rng.normal(size=masks.shape), sigma=(0, 4, 4))
    maps = (noise / noise.std() + 1.5 * masks).astype(np.float32)
    return masks, maps


def timed(fn: Callable[[], object], repeats: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def sk_f1max(y: np.ndarray, s: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * p * r / (p + r)
    return float(np.nanmax(f1))


def main() -> None:
    masks, maps = make_data()
    y, s = masks.ravel(), maps.ravel()
    labels = masks.any(axis=(1, 2))
    img_scores = maps.max(axis=(1, 2))
    print(f"{masks.shape[0]} maps of {masks.shape[1]}x{masks.shape[2]} = "
          f"{y.size / 1e6:.1f}M pixels, defect fraction {y.mean():.3%}, "
          f"{int(labels.sum())} anomalous images")

    rows = [
        ("pixel AUROC", lambda: M.pixel_auroc(masks, maps), lambda: roc_auc_score(y, s)),
        ("pixel AP", lambda: M.pixel_ap(masks, maps), lambda: average_precision_score(y, s)),
        ("pixel F1-max", lambda: M.pixel_f1max(masks, maps), lambda: sk_f1max(y, s)),
        ("AUPRO (0.3)", lambda: M.aupro(masks, maps), None),
        ("evaluate_all", lambda: M.evaluate_all(labels, img_scores, masks, maps), None),
    ]
    print(f"{'metric':<14} {'vadlab [s]':>10} {'sklearn [s]':>11} {'ratio':>6}  "
          f"{'|diff|':>8}  value")
    for name, ours, theirs in rows:
        t_ours, v_ours = timed(ours)
        if theirs is None:
            value = v_ours if isinstance(v_ours, float) else f"aupro={v_ours['aupro']:.4f}"
            shown = f"{value:.6f}" if isinstance(value, float) else value
            print(f"{name:<14} {t_ours:>10.3f} {'-':>11} {'-':>6}  {'-':>8}  {shown}")
            continue
        t_sk, v_sk = timed(theirs)
        print(f"{name:<14} {t_ours:>10.3f} {t_sk:>11.3f} {t_sk / t_ours:>5.1f}x  "
              f"{abs(v_ours - v_sk):>8.1e}  {v_ours:.6f}")


if __name__ == "__main__":
    main()
