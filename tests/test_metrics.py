"""Tests for vadlab.metrics: agreement with scikit-learn, AUPRO against a slow reference written
from the definition, hand-computed answers, and input validation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from vadlab import metrics as M

TOL = 1e-9


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def sk_f1max(y: np.ndarray, s: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * p * r / (p + r)
    return float(np.nanmax(np.where(np.isfinite(f1), f1, 0.0)))


def random_case(seed: int, kind: str, n: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < rng.uniform(0.02, 0.5)
    y[:2] = [True, False]  # both classes present
    if kind == "float":
        s = rng.normal(size=n) + 0.7 * y
    elif kind == "ties":
        s = np.round(rng.normal(size=n) + 0.7 * y, 1)  # many tied scores
    elif kind == "int":
        # integer-valued scores with only a few levels
        s = rng.integers(0, 4, size=n) + y * rng.integers(0, 2, size=n)
    elif kind == "float32":
        s = (rng.normal(size=n) + y).astype(np.float32)
    else:
        raise AssertionError(kind)
    return y.astype(int), s


def blob_masks(seed: int, n: int = 6, size: int = 20) -> np.ndarray:
    """Hand-made-ish masks: random rectangles/points, some images good, some diagonal touches."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        if i % 3 == 0:
            continue  # good image
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, size - 5, size=2)
            h, w = rng.integers(1, 6, size=2)
            masks[i, r : r + h, c : c + w] = True
        masks[i, 0, 0] = masks[i, 1, 1] = True  # diagonal neighbours -> one region with 8-conn
    return masks


def reference_aupro(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """Slow AUPRO straight from the definition: loop over every distinct threshold."""
    structure = np.ones((3, 3), dtype=int)
    regions = []  # list of (image index, boolean region mask)
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=structure)
        regions += [(i, lab == k) for k in range(1, n + 1)]
    ok = ~masks
    points = [(0.0, 0.0)]
    # "score > t" for t just below each distinct value == "score >= value"
    for v in np.unique(maps)[::-1]:
        pred = maps >= v
        pro = np.mean([pred[i][r].mean() for i, r in regions])
        fpr = pred[ok].sum() / ok.sum()
        points.append((fpr, pro))
    # clip every segment to [0, limit] and add up trapezoids
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= limit or x1 == x0:
            continue
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / limit


# --------------------------------------------------------------------------------------------
# agreement with scikit-learn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["float", "ties", "int", "float32"])
def test_binary_metrics_match_sklearn(seed: int, kind: str) -> None:
    y, s = random_case(seed, kind)
    assert abs(M.auroc(y, s) - roc_auc_score(y, s)) < TOL
    assert abs(M.image_auroc(y, s) - roc_auc_score(y, s)) < TOL
    assert abs(M.average_precision(y, s) - average_precision_score(y, s)) < TOL
    assert abs(M.image_ap(y, s) - average_precision_score(y, s)) < TOL
    assert abs(M.f1_max(y, s) - sk_f1max(y, s)) < TOL
    assert abs(M.image_f1max(y, s) - sk_f1max(y, s)) < TOL


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ties", [False, True])
def test_pixel_metrics_match_sklearn(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    masks = blob_masks(seed, n=8, size=32)
    maps = rng.random(masks.shape) + 0.5 * masks
    if ties:
        maps = np.floor(maps * 8)
    y, s = masks.ravel(), maps.ravel()
    assert abs(M.pixel_auroc(masks, maps) - roc_auc_score(y, s)) < TOL
    assert abs(M.pixel_ap(masks, maps) - average_precision_score(y, s)) < TOL
    assert abs(M.pixel_f1max(masks, maps) - sk_f1max(y, s)) < TOL


def test_f1_threshold_is_consistent() -> None:
    y, s = random_case(7, "ties")
    best, t = M.f1_max(y, s, return_threshold=True)
    pred = s >= t
    tp = np.sum(pred & (y == 1))
    f1 = 2 * tp / (pred.sum() + y.sum())
    assert abs(f1 - best) < TOL


def test_known_small_values() -> None:
    assert M.image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert M.image_auroc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts one half
    # thresholds 2, 1, 0 give (P, R) = (1, 1/2), (1/2, 1/2), (2/3, 1) -> F1 2/3, 1/2, 4/5
    assert M.image_f1max([0, 1, 1], [1.0, 2.0, 0.0]) == pytest.approx(0.8)


# --------------------------------------------------------------------------------------------
# AUPRO
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_aupro_matches_slow_reference(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(100 + seed)
    masks = blob_masks(seed)
    maps = rng.random(masks.shape) + rng.uniform(0, 1) * masks
    if ties:
        maps = np.round(maps * 6)
    for limit in (0.3, 0.05, 1.0):
        ours = M.aupro(masks, maps, fpr_limit=limit)
        assert abs(ours - reference_aupro(masks, maps, limit)) < TOL


def test_aupro_perfect_map_is_one() -> None:
    masks = blob_masks(1)
    assert M.aupro(masks, masks.astype(float)) == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(0)
    maps = rng.random(masks.shape) + 2.0 * masks  # all defect pixels above all normal ones
    assert M.aupro(masks, maps) == pytest.approx(1.0, abs=1e-12)


def test_aupro_constant_map() -> None:
    # One threshold only: the curve jumps from (0,0) straight to (1,1), so PRO = FPR on the
    # diagonal; area on [0, 0.3] is 0.3^2 / 2, normalised by 0.3 -> 0.15 (= fpr_limit / 2).
    masks = blob_masks(2)
    const = np.full(masks.shape, 0.7)
    assert M.aupro(masks, const) == pytest.approx(0.15, abs=1e-12)
    assert M.aupro(masks, const, fpr_limit=0.1) == pytest.approx(0.05, abs=1e-12)
    assert M.aupro(masks, const, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


def test_aupro_weights_regions_not_pixels() -> None:
    # One 2x2 region and one 20x20 region. The map finds the small one completely (score 1)
    # and misses the big one (score 0, below every normal pixel at 0.5).
    masks = np.zeros((2, 32, 32), dtype=bool)
    masks[0, 5:7, 5:7] = True
    masks[1, 4:24, 4:24] = True
    maps = np.full(masks.shape, 0.5)
    maps[0, 5:7, 5:7] = 1.0
    maps[1, 4:24, 4:24] = 0.0
    fpr, pro = M.pro_curve(masks, maps)
    assert fpr[1] == 0.0 and pro[1] == pytest.approx(0.5)  # half the regions at zero FPR
    assert M.aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)
    pixel_weighted = 4 / (4 + 400)
    assert M.aupro(masks, maps) > 10 * pixel_weighted


def test_aupro_uses_8_connectivity() -> None:
    # Three pixels in a row plus one pixel touching diagonally: ONE region of 4 pixels.
    # Only the diagonal pixel scores high -> PRO jumps to 1/4 at FPR 0, then straight to (1,1):
    # area = 0.25*0.3 + 0.75*0.3^2/2 = 0.10875 -> AUPRO 0.3625 (4-connectivity would give 0.575).
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 2, 2:5] = True
    masks[0, 3, 5] = True
    maps = np.zeros(masks.shape)
    maps[0, 3, 5] = 1.0
    assert M.aupro(masks, maps) == pytest.approx(0.3625, abs=1e-12)
    assert M.aupro(masks, maps) == pytest.approx(reference_aupro(masks, maps), abs=1e-12)


def test_aupro_invariant_to_monotone_transform() -> None:
    rng = np.random.default_rng(5)
    masks = blob_masks(5)
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 3)
    base = M.aupro(masks, maps)
    for f in (np.exp, lambda x: 10 * x**3 + 2, lambda x: np.log1p(x) - 7):
        assert abs(M.aupro(masks, f(maps)) - base) < TOL


def test_aupro_no_regions_is_nan_with_warning() -> None:
    masks = np.zeros((3, 8, 8), dtype=bool)
    with pytest.warns(RuntimeWarning, match="no defect regions"):
        assert math.isnan(M.aupro(masks, np.random.rand(3, 8, 8)))


def test_aupro_bad_limit() -> None:
    masks = blob_masks(0)
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro(masks, masks.astype(float), fpr_limit=0.0)


# --------------------------------------------------------------------------------------------
# evaluate_all, layouts, torch
# --------------------------------------------------------------------------------------------


def test_evaluate_all_agrees_with_single_metrics() -> None:
    rng = np.random.default_rng(3)
    masks = blob_masks(3, n=9)
    labels = masks.reshape(len(masks), -1).any(axis=1).astype(int)
    maps = rng.random(masks.shape) + 0.6 * masks
    scores = maps.reshape(len(maps), -1).max(axis=1)
    res = M.evaluate_all(labels, scores, masks[:, None], maps)  # [N,1,H,W] masks accepted
    assert set(res) == {"image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1max",
                        "pixel_f1max", "image_ap"}
    assert all(type(v) is float for v in res.values())
    assert res["image_auroc"] == M.image_auroc(labels, scores)
    assert res["image_ap"] == M.image_ap(labels, scores)
    assert res["image_f1max"] == M.image_f1max(labels, scores)
    assert res["pixel_auroc"] == M.pixel_auroc(masks, maps)
    assert res["pixel_ap"] == M.pixel_ap(masks, maps)
    assert res["pixel_f1max"] == M.pixel_f1max(masks, maps)
    assert res["aupro"] == M.aupro(masks, maps)


def test_evaluate_all_without_defect_pixels_gives_nan() -> None:
    masks = np.zeros((4, 8, 8), dtype=bool)
    maps = np.random.rand(4, 8, 8)
    with pytest.warns(RuntimeWarning, match="no defect pixels"):
        res = M.evaluate_all([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.3], masks, maps)
    assert res["image_auroc"] == 1.0
    for k in ("pixel_auroc", "aupro", "pixel_ap", "pixel_f1max"):
        assert math.isnan(res[k])


def test_torch_inputs() -> None:
    torch = pytest.importorskip("torch")
    masks = blob_masks(4)
    maps = np.random.default_rng(0).random(masks.shape).astype(np.float32) + 0.3 * masks
    ref = M.pixel_auroc(masks, maps)
    assert M.pixel_auroc(torch.from_numpy(masks), torch.from_numpy(maps)) == ref
    assert M.aupro(torch.from_numpy(masks)[:, None], torch.from_numpy(maps)) == M.aupro(masks, maps)
    assert M.image_auroc(torch.tensor([0, 1, 1]), torch.tensor([0.2, 0.5, 0.1])) == 0.5


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def test_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        M.pixel_auroc(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)))
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        M.aupro(np.zeros((8, 8)), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="3 entries but scores has 2"):
        M.image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="masks/maps have"):
        M.evaluate_all([0, 1], [0.1, 0.2], blob_masks(0), np.zeros((6, 20, 20)))


def test_nonfinite_scores_are_reported() -> None:
    with pytest.raises(ValueError, match=r"2 non-finite.*\[1, 3\]"):
        M.image_auroc([0, 1, 0, 1], [0.1, np.nan, 0.3, np.inf])
    masks = blob_masks(0)
    maps = np.random.rand(*masks.shape)
    maps[2, 3, 4] = np.nan
    maps[4, 0, :3] = -np.inf
    with pytest.raises(ValueError, match=r"4 non-finite.*image indices \[2, 4\]"):
        M.pixel_ap(masks, maps)
    with pytest.raises(ValueError, match="non-finite"):
        M.evaluate_all([0, 1, 0, 1, 1, 1], np.arange(6.0), masks, maps)


def test_non_binary_mask() -> None:
    masks = blob_masks(0).astype(np.uint8) * 255
    with pytest.raises(ValueError, match="binary.*255.*masks > 0"):
        M.pixel_auroc(masks, np.random.rand(*masks.shape))
    with pytest.raises(ValueError, match="binary"):
        M.aupro(np.full((1, 4, 4), 0.5), np.random.rand(1, 4, 4))
    # float 0./1. masks are fine
    m = blob_masks(0).astype(np.float32)
    assert 0.0 <= M.pixel_auroc(m, np.random.rand(*m.shape)) <= 1.0


def test_single_class_labels() -> None:
    with pytest.raises(ValueError, match="undefined.*only defect-free"):
        M.image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="undefined.*only anomalous"):
        M.image_auroc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="AUROC is undefined"):
        M.evaluate_all([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="no anomalous"):
        M.image_ap([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="undefined"):
        M.pixel_auroc(np.zeros((2, 4, 4)), np.random.rand(2, 4, 4))


def test_no_warnings_on_normal_use() -> None:
    masks = blob_masks(1)
    maps = np.random.rand(*masks.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.evaluate_all(masks.any(axis=(1, 2)), maps.max(axis=(1, 2)), masks, maps)
