"""The metrics lab: AUROC via ranks (``check_auroc``) and AUPRO (``check_aupro``)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from ._common import _Case, _Mistake, _call, _run_check


def _ref_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from vadlab.metrics import auroc

    return auroc(labels, scores)


def _run_auroc(fn, labels, scores):
    return {"auroc": _call(fn, labels, scores)}


def _auroc_ordinal_ranks(labels, scores):
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    n_pos, n_neg = labels.sum(), (1 - labels).sum()
    return (ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _auroc_no_offset(labels, scores):
    from scipy.stats import rankdata

    r = rankdata(scores)
    n_pos, n_neg = labels.sum(), (1 - labels).sum()
    return r[labels == 1].sum() / (n_pos * n_neg)


def _auroc_swapped(labels, scores):
    return 1.0 - _ref_auroc(labels, scores)


def check_auroc(auroc: Callable[[np.ndarray, np.ndarray], float], raise_on_fail: bool | None = None) -> bool:
    """Check ``auroc(labels, scores) -> float``: labels 0/1 ``[N]``, scores ``[N]`` (higher = more anomalous)."""
    rng = np.random.default_rng(0)
    y_big = (rng.random(300) < 0.3).astype(int)
    s_big = rng.normal(size=300) + 1.2 * y_big
    cases = [
        _Case("hand example: labels [0,0,1,1], scores [0.1,0.4,0.35,0.8]",
              {"labels": np.array([0, 0, 1, 1]), "scores": np.array([0.1, 0.4, 0.35, 0.8])}, {"auroc": 0.75}),
        _Case("perfect ranking", {"labels": np.array([0, 1, 0, 1, 1]), "scores": np.array([0.0, 3.0, 1.0, 2.0, 5.0])},
              {"auroc": 1.0}),
        _Case("reversed ranking", {"labels": np.array([1, 0, 1, 0]), "scores": np.array([0.0, 3.0, 1.0, 2.0])},
              {"auroc": 0.0}),
        _Case("all scores tied (a constant detector)", {"labels": np.array([0, 1, 0, 1, 0]), "scores": np.ones(5)},
              {"auroc": 0.5}),
        _Case("ties across the classes", {"labels": np.array([0, 1, 0, 1, 1, 0]),
                                          "scores": np.array([1.0, 2.0, 2.0, 2.0, 3.0, 0.0])}),
        _Case("300 random scores, 30% anomalous", {"labels": y_big, "scores": s_big}),
        _Case("quantised scores (many ties)", {"labels": y_big, "scores": np.round(s_big)}),
    ]
    mistakes = [
        _Mistake(_auroc_ordinal_ranks, "tied scores must share their average rank (scipy.stats.rankdata's default), "
                                       "not get ranks 1, 2, 3 in the order they appear"),
        _Mistake(_auroc_no_offset, "the rank sum of the anomalous samples includes n_pos (n_pos + 1) / 2 that they "
                                   "contribute among themselves: subtract it before dividing"),
        _Mistake(_auroc_swapped, "you get 1 - AUROC: rank the *anomalous* samples (label 1), higher score = more anomalous"),
    ]
    hints = ["AUROC = (sum of the ranks of the anomalous scores - n_pos (n_pos + 1) / 2) / (n_pos * n_neg)",
             "ties: average ranks (a tie between an anomalous and a normal sample counts one half)"]
    return _run_check("check_auroc", "auroc", _run_auroc, (auroc,), (_ref_auroc,), cases,
                      {"auroc": (1e-9, 1e-9)}, mistakes, hints, raise_on_fail)


def _ref_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    from vadlab.metrics import aupro

    return aupro(masks, maps, fpr_limit=fpr_limit)


def _run_aupro(fn, masks, maps, fpr_limit):
    return {"aupro": _call(fn, masks, maps, fpr_limit)}


def _aupro_variant(masks, maps, fpr_limit, *, structure="8", pooled=False, normalise=True, interpolate=True,
                   fpr_all_pixels=False):
    """AUPRO with one switch flipped: the typical mistakes of the exercise."""
    from scipy import ndimage

    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    if structure == "3d":
        regions, n = ndimage.label(masks)
    else:
        st = np.ones((3, 3), bool) if structure == "8" else None
        regions = np.zeros(masks.shape, int)
        n = 0
        for i in range(masks.shape[0]):
            r, k = ndimage.label(masks[i], structure=st)
            regions[i] = np.where(r > 0, r + n, 0)
            n += k
    flat_r, flat_s = regions.ravel(), maps.ravel()
    order = np.argsort(-flat_s, kind="stable")
    s_desc, r_desc = flat_s[order], flat_r[order]
    ends = np.append(np.flatnonzero(s_desc[1:] != s_desc[:-1]), s_desc.size - 1)
    sizes = np.bincount(flat_r, minlength=n + 1)
    if pooled:
        w = np.where(np.arange(n + 1) > 0, 1.0 / max(1, sizes[1:].sum()), 0.0)
    else:
        w = np.zeros(n + 1)
        w[1:] = 1.0 / (sizes[1:] * n)
    pro = np.concatenate(([0.0], np.minimum(np.cumsum(w[r_desc])[ends], 1.0)))
    neg = (r_desc == 0) | fpr_all_pixels
    fpr = np.concatenate(([0.0], np.cumsum(neg)[ends] / neg.sum()))
    keep = int(np.searchsorted(fpr, fpr_limit, side="right"))
    area = float(np.sum(0.5 * (pro[1:keep] + pro[:keep - 1]) * np.diff(fpr[:keep])))
    if interpolate and fpr[keep - 1] < fpr_limit:
        x0, y0, x1, y1 = fpr[keep - 1], pro[keep - 1], fpr[keep], pro[keep]
        y_at = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (fpr_limit - x0)
    return area / fpr_limit if normalise else area


def _aupro_cases() -> list[_Case]:
    rng = np.random.default_rng(1)
    # two images 8x8: a big square and a small square (region sizes differ), scores noisy around the masks
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 1:5, 1:5] = True  # 16 pixels
    masks[1, 5:7, 5:6] = True  # 2 pixels
    maps = masks * 0.8 + rng.normal(0, 0.5, masks.shape)
    maps[1, 5:7, 5] -= 0.6  # the small region is harder to find
    # diagonal neighbours: one region with 8-connectivity, two with 4-connectivity
    diag_m = np.zeros((1, 6, 6), dtype=bool)
    diag_m[0, 1:3, 1:3] = True  # a 2x2 block ...
    diag_m[0, 3, 3] = True  # ... and one pixel touching it diagonally: one region of 5 pixels, not 4 + 1
    diag_s = rng.normal(0, 1, diag_m.shape) + 1.0 * diag_m
    diag_s[0, 3, 3] += 3.0
    # regions in the last row of image 0 and the first row of image 1: separate regions
    stack_m = np.zeros((2, 5, 5), dtype=bool)
    stack_m[0, 4, 0:3] = True
    stack_m[1, 0, 0:3] = True
    stack_m[1, 2:4, 3:5] = True
    stack_s = rng.normal(0, 1, stack_m.shape) + 1.5 * stack_m
    stack_s[1, 0, 0:3] += 1.5
    good = np.zeros((3, 8, 8), dtype=bool)
    good[1, 2:4, 2:6] = True
    good_s = rng.normal(0, 1, good.shape) + 1.2 * good
    return [
        # 1 x 4 pixels, mask [1,1,0,0], scores [.9,.1,.8,.2]: PRO = 0.5 on FPR in (0, 1), so AUPRO = 0.5
        _Case("hand example: one 1x4 image, mask [1,1,0,0], scores [0.9,0.1,0.8,0.2]",
              {"masks": np.array([[[1, 1, 0, 0]]], dtype=bool), "maps": np.array([[[0.9, 0.1, 0.8, 0.2]]]),
               "fpr_limit": 0.3}, {"aupro": 0.5}),
        _Case("perfect map (defects score 1, the rest 0)", {"masks": masks, "maps": masks.astype(float), "fpr_limit": 0.3},
              {"aupro": 1.0}),
        _Case("constant map (every score tied)", {"masks": masks, "maps": np.full(masks.shape, 0.5), "fpr_limit": 0.3},
              {"aupro": 0.15}),
        _Case("a 16-pixel and a 2-pixel region, noisy scores", {"masks": masks, "maps": maps, "fpr_limit": 0.3}),
        _Case("diagonal neighbours (8-connectivity)", {"masks": diag_m, "maps": diag_s, "fpr_limit": 0.3}),
        _Case("regions touching across two images of the stack", {"masks": stack_m, "maps": stack_s, "fpr_limit": 0.3}),
        _Case("defect-free images in the stack, fpr_limit=0.05", {"masks": good, "maps": good_s, "fpr_limit": 0.05}),
        _Case("fpr_limit=1 and quantised scores (ties)", {"masks": masks, "maps": np.round(maps, 1), "fpr_limit": 1.0}),
    ]


def check_aupro(aupro: Callable[[np.ndarray, np.ndarray, float], float], raise_on_fail: bool | None = None) -> bool:
    """Check ``aupro(masks [N,H,W] bool, maps [N,H,W] float, fpr_limit) -> float`` (MVTec AD's definition)."""
    mistakes = [
        _Mistake(lambda m, s, f: _aupro_variant(m, s, f, pooled=True),
                 "this is the overlap of all defect pixels pooled (a truncated pixel ROC); PRO averages the overlap "
                 "*per connected region*, so a small region weighs as much as a big one"),
        _Mistake(lambda m, s, f: _aupro_variant(m, s, f, normalise=False),
                 "divide the area by fpr_limit, so that a perfect map scores 1"),
        _Mistake(lambda m, s, f: _aupro_variant(m, s, f, structure="4"),
                 "connected regions use 8-connectivity (diagonal neighbours belong to the same region): "
                 "scipy.ndimage.label needs structure=np.ones((3, 3))"),
        _Mistake(lambda m, s, f: _aupro_variant(m, s, f, structure="3d"),
                 "label the regions of each image separately: labelling the [N, H, W] stack at once joins regions "
                 "of neighbouring images"),
        _Mistake(lambda m, s, f: _aupro_variant(m, s, f, fpr_all_pixels=True),
                 "the false-positive rate counts only defect-free pixels (mask 0), in the numerator and the denominator"),
        _Mistake(lambda m, s, f: _aupro_variant(m, s, f, interpolate=False),
                 "the last point of the curve before fpr_limit is not at fpr_limit: interpolate PRO linearly up to "
                 "fpr_limit and add that last piece of area"),
    ]
    hints = ["every distinct score value is one threshold; tied scores enter the curve together",
             "the curve starts at (FPR, PRO) = (0, 0); integrate with trapezoids up to fpr_limit, then divide by it"]
    return _run_check("check_aupro", "aupro", _run_aupro, (aupro,), (_ref_aupro,), _aupro_cases(),
                      {"aupro": (1e-6, 1e-9)}, mistakes, hints, raise_on_fail)
