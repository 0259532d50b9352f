"""Evaluation metrics for visual anomaly detection.

Every metric here ranks samples by an anomaly score (higher = more anomalous) and compares the
ranking with ground truth: one label per image (0 = defect-free, 1 = anomalous) or one binary
mask per image (1 = defect pixel).

All curve-based metrics share one idea: sort the scores once (descending), walk down the sorted
list and keep running counts of positives and negatives. Each distinct score value is one
threshold ("call everything with score >= s anomalous"); among tied scores only the last point of
the run counts, because a threshold cannot split samples that have the same score. This gives the
exact, threshold-free curves that scikit-learn computes, but one sort can be shared by AUROC, AP,
F1-max and AUPRO (see :func:`evaluate_all`), which matters for millions of pixels.

Inputs may be numpy arrays or torch tensors. Maps and masks are ``[N, H, W]`` or ``[N, 1, H, W]``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "image_auroc",
    "image_ap",
    "image_f1max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1max",
    "auroc",
    "average_precision",
    "f1_max",
    "aupro",
    "pro_curve",
    "evaluate_all",
]


# --------------------------------------------------------------------------------------------
# Input conversion and validation
# --------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array (torch tensors are detached and moved to the CPU)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _as_vector(x: Any, name: str) -> np.ndarray:
    """Accept ``[N]`` or ``[N, 1]`` and return a 1-D array."""
    a = _to_numpy(x)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D with one value per image, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    return a


def _as_maps(x: Any, name: str) -> np.ndarray:
    """Accept ``[N, H, W]`` or ``[N, 1, H, W]`` and return ``[N, H, W]``."""
    a = _to_numpy(x)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"{name} must have shape [N, H, W] or [N, 1, H, W], got {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    return a


def _binary(a: np.ndarray, name: str) -> np.ndarray:
    """Check that ``a`` only holds 0/1 (or False/True) and return it as bool."""
    if a.dtype == np.bool_:
        return a
    ok = (a == 0) | (a == 1)
    if not ok.all():
        bad = np.unique(a[~ok])[:5]
        hint = " (masks stored as 0/255? use masks > 0)" if np.any(bad == 255) else ""
        raise ValueError(
            f"{name} must be binary (0/1 or bool); found other values such as {bad.tolist()}{hint}"
        )
    return a.astype(bool)


def _finite_scores(a: np.ndarray, name: str) -> np.ndarray:
    """Return ``a`` as float64; raise if any score is NaN or infinite, naming the images."""
    if not (a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer)
            or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{name} must be real numbers, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    finite = np.isfinite(a)
    if not finite.all():
        bad = ~finite
        n_bad = int(bad.sum())
        per_image = bad.reshape(bad.shape[0], -1).any(axis=1) if bad.ndim > 1 else bad
        idx = np.flatnonzero(per_image)
        shown = idx[:20].tolist()
        more = f" (+{idx.size - 20} more)" if idx.size > 20 else ""
        raise ValueError(
            f"{name} contain {n_bad} non-finite value(s) (NaN/inf) at image indices {shown}{more}"
        )
    return a


def _check_two_classes(y: np.ndarray, what: str) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = "anomalous (1)" if n_pos else "defect-free (0)"
        raise ValueError(
            f"{what} is undefined: the ground truth contains only {only} samples; "
            "it needs both defect-free (0) and anomalous (1) samples"
        )


def _check_has_positive(y: np.ndarray, what: str) -> None:
    if not y.any():
        raise ValueError(
            f"{what} is undefined: the ground truth contains no anomalous (1) samples"
        )


def _image_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _binary(_as_vector(labels, "labels"), "labels")
    s = _as_vector(scores, "scores")
    if y.shape[0] != s.shape[0]:
        raise ValueError(f"labels has {y.shape[0]} entries but scores has {s.shape[0]}")
    return y, _finite_scores(s, "scores")


def _pixel_inputs(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    m = _as_maps(masks, "masks")
    a = _as_maps(maps, "maps")
    if m.shape != a.shape:
        raise ValueError(
            f"masks and maps must have the same shape, got masks {m.shape} and maps {a.shape}"
        )
    return _binary(m, "masks"), _finite_scores(a, "maps")


# --------------------------------------------------------------------------------------------
# One sort, many curves
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ranking:
    """Scores sorted once, highest first.

    ``order`` sorts the flattened scores in descending order; ``ends`` are the positions in that
    order of the last element of every run of equal scores (one entry per distinct threshold).
    """

    order: np.ndarray
    ends: np.ndarray
    thresholds: np.ndarray

    @classmethod
    def of(cls, scores: np.ndarray) -> _Ranking:
        s = scores.ravel()
        order = np.argsort(s)[::-1]  # descending; order within ties is irrelevant
        s_desc = s[order]
        ends = np.append(np.flatnonzero(s_desc[1:] != s_desc[:-1]), s_desc.size - 1)
        return cls(order=order, ends=ends, thresholds=s_desc[ends])

    def counts(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """True- and false-positive counts at every distinct threshold (int64)."""
        tps = np.cumsum(y.ravel()[self.order], dtype=np.int64)[self.ends]
        fps = (self.ends + 1) - tps
        return tps, fps


def _auroc_from_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    # Trapezoids under TPR(FPR), starting at (0, 0). Done in integers, divided once: exact.
    n_pos, n_neg = int(tps[-1]), int(fps[-1])
    tp = np.concatenate(([0], tps))
    fp = np.concatenate(([0], fps))
    twice_area = int(np.sum(np.diff(fp) * (tp[1:] + tp[:-1])))
    return twice_area / (2.0 * n_pos * n_neg)


def _ap_from_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    # AP = sum_k (R_k - R_{k-1}) * P_k over thresholds (sklearn's step-wise definition).
    precision = tps / (tps + fps)
    recall_step = np.diff(np.concatenate(([0], tps))) / tps[-1]
    return float(np.sum(recall_step * precision))


def _f1_from_counts(tps: np.ndarray, fps: np.ndarray) -> tuple[float, int]:
    # F1 = 2PR/(P+R) = 2TP / (2TP + FP + FN); zero when TP = 0, never 0/0 if positives exist.
    fns = tps[-1] - tps
    f1 = 2.0 * tps / (2.0 * tps + fps + fns)
    k = int(np.argmax(f1))
    return float(f1[k]), k


# --------------------------------------------------------------------------------------------
# Generic binary metrics (any labels / scores, flattened)
# --------------------------------------------------------------------------------------------


def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of binary ``labels`` vs ``scores`` (inputs are flattened).

    AUROC = probability that a random anomalous sample scores higher than a random normal one
    (ties count one half). 0.5 is chance, 1.0 is a perfect ranking.
    """
    y = _binary(_to_numpy(labels), "labels").ravel()
    s = _finite_scores(_to_numpy(scores), "scores").ravel()
    if y.size != s.size:
        raise ValueError(f"labels has {y.size} entries but scores has {s.size}")
    _check_two_classes(y, "AUROC")
    return _auroc_from_counts(*_Ranking.of(s).counts(y))


def average_precision(labels: Any, scores: Any) -> float:
    """Average precision: sum over thresholds of (recall gained) x (precision there).

    The step-wise area under the precision-recall curve (scikit-learn's definition, no
    interpolation). Chance level equals the fraction of positives, so it suits rare defects.
    """
    y = _binary(_to_numpy(labels), "labels").ravel()
    s = _finite_scores(_to_numpy(scores), "scores").ravel()
    if y.size != s.size:
        raise ValueError(f"labels has {y.size} entries but scores has {s.size}")
    _check_has_positive(y, "Average precision")
    return _ap_from_counts(*_Ranking.of(s).counts(y))


def f1_max(labels: Any, scores: Any, return_threshold: bool = False) -> float | tuple[float, float]:
    """Best F1 = 2PR/(P+R) over all thresholds of the precision-recall curve (0/0 counts as 0).

    The threshold is chosen on the evaluated data itself, so the number is optimistic. With
    ``return_threshold=True`` also return the score ``t`` that achieves it (predict ``score >= t``).
    """
    y = _binary(_to_numpy(labels), "labels").ravel()
    s = _finite_scores(_to_numpy(scores), "scores").ravel()
    if y.size != s.size:
        raise ValueError(f"labels has {y.size} entries but scores has {s.size}")
    _check_has_positive(y, "F1-max")
    ranking = _Ranking.of(s)
    best, k = _f1_from_counts(*ranking.counts(y))
    return (best, float(ranking.thresholds[k])) if return_threshold else best


# --------------------------------------------------------------------------------------------
# Image-level metrics
# --------------------------------------------------------------------------------------------


def image_auroc(labels: Any, scores: Any) -> float:
    """ROC-AUC of one anomaly score per image against image labels (0 = good, 1 = anomalous)."""
    y, s = _image_inputs(labels, scores)
    _check_two_classes(y, "Image AUROC")
    return _auroc_from_counts(*_Ranking.of(s).counts(y))


def image_ap(labels: Any, scores: Any) -> float:
    """Average precision of one score per image against image labels."""
    y, s = _image_inputs(labels, scores)
    _check_has_positive(y, "Image AP")
    return _ap_from_counts(*_Ranking.of(s).counts(y))


def image_f1max(labels: Any, scores: Any) -> float:
    """Maximum F1 over all thresholds of the image scores."""
    y, s = _image_inputs(labels, scores)
    _check_has_positive(y, "Image F1-max")
    return _f1_from_counts(*_Ranking.of(s).counts(y))[0]


# --------------------------------------------------------------------------------------------
# Pixel-level metrics (all pixels of all images pooled, good images included)
# --------------------------------------------------------------------------------------------


def pixel_auroc(masks: Any, maps: Any) -> float:
    """ROC-AUC over all pixels of all images pooled (every pixel is one sample)."""
    m, a = _pixel_inputs(masks, maps)
    _check_two_classes(m, "Pixel AUROC")
    return _auroc_from_counts(*_Ranking.of(a).counts(m))


def pixel_ap(masks: Any, maps: Any) -> float:
    """Average precision over all pixels pooled; unlike pixel AUROC it is not inflated by the
    huge number of easy defect-free pixels."""
    m, a = _pixel_inputs(masks, maps)
    _check_has_positive(m, "Pixel AP")
    return _ap_from_counts(*_Ranking.of(a).counts(m))


def pixel_f1max(masks: Any, maps: Any) -> float:
    """Maximum F1 over all thresholds, with all pixels pooled."""
    m, a = _pixel_inputs(masks, maps)
    _check_has_positive(m, "Pixel F1-max")
    return _f1_from_counts(*_Ranking.of(a).counts(m))[0]


# --------------------------------------------------------------------------------------------
# PRO / AUPRO (MVTec AD evaluation definition)
# --------------------------------------------------------------------------------------------

# 8-connectivity inside each image, never across images of the stack.
_STRUCTURE_8 = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8[1] = True


def _label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Label connected defect regions (8-connectivity) of every mask with globally unique ids."""
    regions, n_regions = ndimage.label(masks, structure=_STRUCTURE_8)
    return regions, int(n_regions)


def _pro_curve_ranked(
    regions: np.ndarray, n_regions: int, ranking: _Ranking
) -> tuple[np.ndarray, np.ndarray]:
    """FPR and PRO at every distinct threshold, starting at (0, 0)."""
    flat = regions.ravel()
    sizes = np.bincount(flat, minlength=n_regions + 1)
    n_ok = int(sizes[0])
    # Each defect pixel of region k adds 1 / (|C_k| * #regions) to PRO; normal pixels add 0.
    weight = np.zeros(n_regions + 1, dtype=np.float64)
    weight[1:] = 1.0 / (sizes[1:] * float(n_regions))
    r_desc = flat[ranking.order]
    pro = np.cumsum(weight[r_desc])[ranking.ends]
    fpr = np.cumsum(r_desc == 0, dtype=np.int64)[ranking.ends] / n_ok
    pro = np.minimum(pro, 1.0)  # cumulative sums may overshoot 1 by rounding
    return np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro))


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under y(x) on [0, x_max] with y interpolated linearly at x_max.

    ``x`` must be non-decreasing, start at 0 and end at >= x_max.
    """
    keep = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    xs, ys = x[:keep], y[:keep]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if xs[-1] < x_max:  # partial trapezoid up to x_max
        x0, y0, x1, y1 = x[keep - 1], y[keep - 1], x[keep], y[keep]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return float(area)


def _check_pro_inputs(n_regions: int, n_ok: int) -> bool:
    if n_regions == 0:
        warnings.warn(
            "AUPRO is undefined: the masks contain no defect regions; returning nan",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    if n_ok == 0:
        warnings.warn(
            "AUPRO is undefined: the masks contain no defect-free pixels (FPR has no denominator); "
            "returning nan",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def pro_curve(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """The exact per-region-overlap curve: arrays ``(fpr, pro)``, one point per distinct score.

    PRO(t) = mean over all defect regions (all images) of the fraction of the region's pixels with
    score >= t; FPR(t) = fraction of all defect-free pixels with score >= t, for every distinct score t
    (the pixels scoring t included). Starts at (0, 0).
    """
    m, a = _pixel_inputs(masks, maps)
    regions, n_regions = _label_regions(m)
    if not _check_pro_inputs(n_regions, int(m.size - m.sum())):
        return np.array([np.nan]), np.array([np.nan])
    return _pro_curve_ranked(regions, n_regions, _Ranking.of(a))


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD definition).

    Every connected defect region (8-connectivity) weighs the same, however small, so a method
    cannot score well by only finding the big defects. The area under PRO(FPR) on
    [0, fpr_limit] is divided by ``fpr_limit``: a perfect map gives 1.0, a constant map gives
    ``fpr_limit / 2``. Returns nan (with a warning) when there are no defect regions.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    m, a = _pixel_inputs(masks, maps)
    regions, n_regions = _label_regions(m)
    if not _check_pro_inputs(n_regions, int(m.size - m.sum())):
        return float("nan")
    fpr, pro = _pro_curve_ranked(regions, n_regions, _Ranking.of(a))
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


# --------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------


def evaluate_all(
    labels: Any,
    image_scores: Any,
    masks: Any | None = None,
    maps: Any | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All standard metrics in one call, sorting the pixel scores only once.

    Returns a dict with ``image_auroc, image_ap, image_f1max, pixel_auroc, pixel_ap,
    pixel_f1max, aupro``. Pixel metrics are nan (with one warning) when ``masks`` is None or has
    no defect pixels (or no defect-free pixels). Image labels must contain both classes.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    y, s = _image_inputs(labels, image_scores)
    _check_two_classes(y, "Image AUROC")
    img_counts = _Ranking.of(s).counts(y)
    out: dict[str, float] = {
        "image_auroc": _auroc_from_counts(*img_counts),
        "image_ap": _ap_from_counts(*img_counts),
        "image_f1max": _f1_from_counts(*img_counts)[0],
    }
    nan = float("nan")
    pixel_keys = ("pixel_auroc", "aupro", "pixel_ap", "pixel_f1max")
    if (masks is None) != (maps is None):
        raise ValueError("pass both masks and maps, or neither")
    if masks is None:
        out.update(dict.fromkeys(pixel_keys, nan))
        return out

    m, a = _pixel_inputs(masks, maps)
    if m.shape[0] != y.shape[0]:
        raise ValueError(f"labels has {y.shape[0]} entries but masks/maps have {m.shape[0]} images")
    n_pos = int(m.sum())
    if n_pos == 0 or n_pos == m.size:
        which = "no defect pixels" if n_pos == 0 else "no defect-free pixels"
        warnings.warn(
            f"masks contain {which}; pixel metrics are undefined and set to nan",
            RuntimeWarning,
            stacklevel=2,
        )
        out.update(dict.fromkeys(pixel_keys, nan))
        return out

    ranking = _Ranking.of(a)
    pix_counts = ranking.counts(m)
    regions, n_regions = _label_regions(m)
    fpr, pro = _pro_curve_ranked(regions, n_regions, ranking)
    out.update(
        pixel_auroc=_auroc_from_counts(*pix_counts),
        aupro=_area_up_to(fpr, pro, fpr_limit) / fpr_limit,
        pixel_ap=_ap_from_counts(*pix_counts),
        pixel_f1max=_f1_from_counts(*pix_counts)[0],
    )
    return out
