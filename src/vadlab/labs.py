"""Automatic checks for the course labs (``book/labs/``), and the student-edition generator.

Every lab asks the student to implement one core piece of a method in a marked exercise cell, then calls
``check_<exercise>(student_fn)``.  A check runs the function on cases with known answers (edge cases
included) and on random cases whose expected output comes from the package's own implementation, and
prints one line per case: ``PASS``, or ``FAIL`` with the input shapes, the first mismatching index and
values, and a hint.  When the wrong output matches a typical mistake (a missing square root, a
stop-gradient on the wrong side, ...) the hint names that mistake.  A check never prints solution code.

Return value and strictness: a check returns ``True`` / ``False``.  With ``raise_on_fail=True``, or when
the environment variable ``VADLAB_LABS_STRICT=1`` is set (the instructor build sets it, so a broken
solution fails the build), a failing check raises ``AssertionError`` with the same report.  A function
that still raises ``NotImplementedError`` (the student edition's placeholder) is reported as "not
implemented yet", not as a crash, so the student book executes from top to bottom.

The inputs of the last failing case are kept in :data:`last_failure` (``.case``, ``.inputs``) so that a
student can call the function on them and debug.

Student edition: :func:`student_version` turns a lab's jupytext source into the student's: in cells
tagged ``solution`` the lines between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` become a
``raise NotImplementedError`` placeholder (same indentation); a solution cell without markers is emptied
entirely.  Everything else is kept byte for byte.  ``python -m vadlab.labs student|instructor SRC DST``
writes a copy of a lab folder as one edition (used by ``scripts/build_labs.sh``).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = [
    "check_auroc",
    "check_aupro",
    "check_mahalanobis_map",
    "check_greedy_coreset",
    "check_affine_coupling",
    "check_ssim_map",
    "check_quantize",
    "check_ddim_step",
    "ssim_blur",
    "reference",
    "last_failure",
    "project_root",
    "show_params",
    "results_table",
    "student_version",
    "write_lab_edition",
    "write_student_labs",
]


# ============================================================================================
# Reporting machinery
# ============================================================================================


@dataclass
class Failure:
    """The case a check failed on last: its name and the inputs (copies) to debug with."""

    check: str = ""
    case: str = ""
    inputs: dict[str, Any] = field(default_factory=dict)


#: inputs of the last failing case of any check (empty until a check fails)
last_failure = Failure()


class _NotImplemented(Exception):
    """The student's function still raises NotImplementedError."""


@dataclass
class _Case:
    """One test input.  ``expected`` (known answers) is optional: missing outputs come from the reference."""

    name: str
    inputs: dict[str, Any]
    expected: dict[str, Any] | None = None


@dataclass
class _Mistake:
    """A typical wrong implementation (same signature as the student's) and the hint shown when matched."""

    fn: Callable[..., Any]
    hint: str


def _strict(raise_on_fail: bool | None) -> bool:
    if raise_on_fail is not None:
        return bool(raise_on_fail)
    return os.environ.get("VADLAB_LABS_STRICT", "0") not in ("", "0", "false", "False")


def _clone(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, np.ndarray):
        return v.copy()
    if isinstance(v, dict):
        return {k: _clone(x) for k, x in v.items()}
    return v


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor {list(v.shape)} {str(v.dtype).replace('torch.', '')}"
    if isinstance(v, np.ndarray):
        return f"array {list(v.shape)} {v.dtype}"
    if isinstance(v, torch.nn.Module):
        return type(v).__name__
    if callable(v):
        return "function"
    return repr(v)


def _as_array(v: Any) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        if v.dtype == torch.bfloat16:
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def _compare(name: str, got: Any, expected: Any, rtol: float, atol: float, exact: bool = False) -> str | None:
    """None if ``got`` matches ``expected``; otherwise a short description of the first difference."""
    if got is None:
        return f"`{name}` is None (did you forget a `return`?)"
    try:
        g = _as_array(got)
    except Exception:  # noqa: BLE001 - anything that is not array-like
        return f"`{name}` has type {type(got).__name__}; expected {_describe(expected)}"
    e = _as_array(expected)
    if g.dtype == object:
        return f"`{name}` could not be read as numbers (got {type(got).__name__})"
    if g.shape != e.shape:
        if g.size == e.size and g.size > 1:
            extra = " (same number of entries: a reshape/permute mix-up, or a missing or extra dimension?)"
        else:
            extra = ""
        return f"`{name}` has shape {list(g.shape)}, expected {list(e.shape)}{extra}"
    if e.size == 0:
        return None
    if exact:
        ok = g == e
    else:
        g64, e64 = g.astype(np.float64), e.astype(np.float64)
        if not np.isfinite(g64).all():
            idx = tuple(int(i) for i in np.argwhere(~np.isfinite(g64))[0])
            where = f" at index {idx}" if g.ndim else ""
            return f"`{name}` contains NaN or inf{where} (a square root or log of a negative number, or 0/0?)"
        ok = np.isclose(g64, e64, rtol=rtol, atol=atol)
    if ok.all():
        return None
    if g.ndim == 0:
        return f"`{name}` = {_fmt(g)}, expected {_fmt(e)}"
    bad = np.argwhere(~ok)
    idx = tuple(int(i) for i in bad[0])
    msg = (f"`{name}` differs at index {idx}: got {_fmt(g[idx])}, expected {_fmt(e[idx])} "
           f"({len(bad)} of {e.size} entries differ")
    if not exact:
        msg += f", max |difference| {np.max(np.abs(g.astype(np.float64) - e.astype(np.float64))):.3g}"
    return msg + ")"


def _fmt(v: Any) -> str:
    v = np.asarray(v)
    if v.dtype.kind in "fc":
        return f"{float(v):.6g}"
    return str(v.item() if v.ndim == 0 else v)


def _run_check(label: str, fn_names: str, run: Callable[..., dict[str, Any]], fns: tuple[Callable, ...],
               ref: tuple[Callable, ...], cases: list[_Case], tolerances: dict[str, tuple[float, float]],
               mistakes: list[_Mistake], hints: list[str], raise_on_fail: bool | None,
               exact: tuple[str, ...] = ()) -> bool:
    """Run every case on the student's functions and print the report (see the module docstring)."""
    global last_failure
    lines: list[str] = []
    n_pass = 0
    first_fail: _Case | None = None
    not_implemented = False
    for case in cases:
        expected = dict(case.expected or {})
        ref_out = run(*ref, **_clone(case.inputs))
        for k, v in ref_out.items():
            expected.setdefault(k, v)
        try:
            got = run(*fns, **_clone(case.inputs))
        except _NotImplemented:
            not_implemented = True
            break
        except Exception as exc:  # noqa: BLE001 - report any error of the student's code
            lines.append(f"  FAIL  {case.name}\n        inputs: {_inputs_line(case)}\n"
                         f"        your code raised {type(exc).__name__}: {exc}")
            first_fail = first_fail or case
            continue
        problems = [p for k in expected if (p := _compare(k, got.get(k), expected[k], *tolerances.get(k, (1e-5, 1e-7)),
                                                          exact=k in exact))]
        if not problems:
            n_pass += 1
            lines.append(f"  PASS  {case.name}")
            continue
        first_fail = first_fail or case
        text = f"  FAIL  {case.name}\n        inputs: {_inputs_line(case)}"
        text += "".join(f"\n        {p}" for p in problems[:3])
        hint = _match_mistake(run, mistakes, case, got, expected, tolerances, exact)
        if hint:
            text += f"\n        hint: {hint}"
        lines.append(text)
    if not_implemented:
        report = (f"{label}: not implemented yet - `{fn_names}` still raises NotImplementedError.\n"
                  f"  Write your code in the exercise cell (replace the `raise NotImplementedError` line), run that cell, "
                  f"then run this check again.")
        last_failure = Failure(label, "not implemented", {})
        ok = False
    else:
        ok = n_pass == len(cases)
        head = (f"{label}: all {len(cases)} cases pass. Well done!" if ok
                else f"{label}: {n_pass} of {len(cases)} cases pass")
        report = "\n".join([head, *lines])
        if not ok:
            assert first_fail is not None
            last_failure = Failure(label, first_fail.name, _clone(first_fail.inputs))
            if hints:
                report += "\n  Things to check:\n" + "\n".join(f"   - {h}" for h in hints)
            report += ("\n  The inputs of the first failing case are in `vadlab.labs.last_failure.inputs`: "
                       "call your function on them to debug.")
    print(report, flush=True)
    if not ok and _strict(raise_on_fail):
        raise AssertionError(report)
    return ok


def _inputs_line(case: _Case) -> str:
    return ", ".join(f"{k}={_describe(v)}" for k, v in case.inputs.items())


def _match_mistake(run, mistakes: list[_Mistake], case: _Case, got: dict, expected: dict,
                   tolerances: dict, exact: tuple[str, ...]) -> str | None:
    """The hint of the first typical mistake whose output equals the student's on this case."""
    for m in mistakes:
        try:
            out = run(*(m.fn if isinstance(m.fn, tuple) else (m.fn,)), **_clone(case.inputs))
        except Exception:  # noqa: BLE001 - a mistake may crash on this input
            continue
        same_as_mistake = all(_compare(k, got.get(k), out[k], *tolerances.get(k, (1e-5, 1e-7)), exact=k in exact) is None
                              for k in expected if k in out)
        differs_from_right = any(_compare(k, out[k], expected[k], *tolerances.get(k, (1e-5, 1e-7)), exact=k in exact)
                                 for k in expected if k in out)
        if same_as_mistake and differs_from_right:
            return m.hint
    return None


def _call(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call a student's function; turn its NotImplementedError into the 'not implemented yet' report."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as exc:
        raise _NotImplemented from exc


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ============================================================================================
# Metrics lab: AUROC via ranks, AUPRO
# ============================================================================================


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


# ============================================================================================
# PaDiM lab: the Mahalanobis map
# ============================================================================================


def _ref_mahalanobis_map(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    from vadlab.nn.gaussian import PositionalGaussian

    g = PositionalGaussian()
    g.mean, g.precision = mean, precision
    return g.distance(x)


def _run_mahalanobis(fn, x, mean, precision):
    return {"distance": _call(fn, x, mean, precision)}


def _random_precision(h: int, w: int, d: int, seed: int) -> torch.Tensor:
    a = torch.randn(h, w, d, d, generator=_gen(seed), dtype=torch.float64)
    return a @ a.transpose(-1, -2) / d + 0.5 * torch.eye(d, dtype=torch.float64)


def check_mahalanobis_map(mahalanobis_map: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                          raise_on_fail: bool | None = None) -> bool:
    """Check ``mahalanobis_map(x [B,D,H,W], mean [H,W,D], precision [H,W,D,D]) -> [B,H,W]``."""
    f64 = torch.float64
    x1 = torch.randn(1, 3, 2, 2, generator=_gen(1), dtype=f64)
    m1 = torch.randn(2, 2, 3, generator=_gen(2), dtype=f64)
    eye = torch.eye(3, dtype=f64).expand(2, 2, 3, 3).clone()
    diag = torch.tensor([0.5, 2.0, 4.0], dtype=f64)
    x4 = torch.randn(2, 4, 3, 5, generator=_gen(3), dtype=f64)
    m4 = torch.randn(3, 5, 4, generator=_gen(4), dtype=f64)
    p4 = _random_precision(3, 5, 4, seed=5)
    x5 = torch.randn(3, 1, 2, 3, generator=_gen(6), dtype=f64)
    m5 = torch.randn(2, 3, 1, generator=_gen(7), dtype=f64)
    p5 = torch.full((2, 3, 1, 1), 4.0, dtype=f64)
    cases = [
        _Case("identity precision: the Euclidean distance", {"x": x1, "mean": m1, "precision": eye},
              {"distance": (x1.permute(0, 2, 3, 1) - m1).norm(dim=-1)}),
        _Case("diagonal precision diag(0.5, 2, 4)", {"x": x1, "mean": m1, "precision": torch.diag(diag).expand(2, 2, 3, 3).clone()},
              {"distance": ((x1.permute(0, 2, 3, 1) - m1) ** 2 * diag).sum(-1).sqrt()}),
        _Case("x equal to the mean: distance 0 (no NaN)",
              {"x": m1.permute(2, 0, 1)[None].clone(), "mean": m1, "precision": _random_precision(2, 2, 3, 8)},
              {"distance": torch.zeros(1, 2, 2, dtype=f64)}),
        _Case("one feature (D = 1), precision 4: 2 |x - mean|", {"x": x5, "mean": m5, "precision": p5},
              {"distance": 2 * (x5[:, 0] - m5[..., 0]).abs()}),
        _Case("non-square 3x5 grid, a different Gaussian at every position", {"x": x4, "mean": m4, "precision": p4}),
    ]
    mistakes = [
        _Mistake(lambda x, m, p: _ref_mahalanobis_map(x, m, p) ** 2,
                 "these are squared distances: the map is the square root of (x - mu)^T P (x - mu)"),
        _Mistake(lambda x, m, p: _ref_mahalanobis_map(x, m, torch.linalg.inv(p)),
                 "`precision` already is the inverse covariance: do not invert it again"),
        _Mistake(lambda x, m, p: _ref_mahalanobis_map(
            x.reshape(x.shape[0], *x.shape[2:], x.shape[1]).permute(0, 3, 1, 2), m, p),
                 "x is [B, D, H, W]: move the feature axis last with permute(0, 2, 3, 1); reshape keeps the memory "
                 "order and mixes features with positions"),
        _Mistake(lambda x, m, p: _ref_mahalanobis_map(x, m, p[:1, :1].expand_as(p)),
                 "every grid position (i, j) has its own mean and precision: use precision[i, j] at position (i, j)"),
    ]
    hints = ["diff = x - mu at every position (features last); distance = sqrt(diff^T P diff) per position",
             "an einsum over (batch, row, column, feature) indices computes the quadratic form at all positions at once",
             "rounding can make the quadratic form slightly negative when x = mu: clamp at 0 before the sqrt"]
    return _run_check("check_mahalanobis_map", "mahalanobis_map", _run_mahalanobis, (mahalanobis_map,),
                      (_ref_mahalanobis_map,), cases, {"distance": (1e-5, 1e-6)}, mistakes, hints, raise_on_fail)


# ============================================================================================
# PatchCore lab: greedy k-center coreset
# ============================================================================================


def _ref_greedy_coreset(features: torch.Tensor, n_select: int, start: int = 0) -> torch.Tensor:
    from vadlab.nn.coreset import greedy_coreset

    return greedy_coreset(features, n_select, start=start)


def _run_coreset(fn, features, n_select, start):
    out = _call(fn, features, n_select, start)
    if out is not None and not isinstance(out, (torch.Tensor, np.ndarray)):
        try:
            out = np.asarray(list(out), dtype=np.int64)
        except (TypeError, ValueError):
            pass
    return {"indices": out}


def _coreset_from_last_only(features, n_select, start=0):
    chosen = [start]
    for _ in range(n_select - 1):
        d = (features - features[chosen[-1]]).norm(dim=1)
        chosen.append(int(d.argmax()))
    return torch.tensor(chosen)


def _coreset_farthest_from_mean(features, n_select, start=0):
    chosen = [start]
    for _ in range(n_select - 1):
        d = (features - features[chosen].mean(0)).norm(dim=1)
        d[chosen] = -1
        chosen.append(int(d.argmax()))
    return torch.tensor(chosen)


def _coreset_ignores_start(features, n_select, start=0):
    return _ref_greedy_coreset(features, n_select, 0)


def _coreset_one_too_many(features, n_select, start=0):
    return _ref_greedy_coreset(features, min(n_select + 1, features.shape[0]), start)


def check_greedy_coreset(greedy_coreset: Callable[[torch.Tensor, int, int], torch.Tensor],
                         raise_on_fail: bool | None = None) -> bool:
    """Check ``greedy_coreset(features [N,d], n_select, start) -> indices [n_select]`` (the exact sequence)."""
    f64 = torch.float64
    line = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.5]], dtype=f64)
    dup = torch.tensor([[0.0, 0.0], [5.0, 0.0], [5.0, 0.0], [0.0, 1.0]], dtype=f64)
    square = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 3.0], [4.0, 3.0], [1.0, 1.0]], dtype=f64)
    rnd = torch.randn(200, 8, generator=_gen(11), dtype=f64) * torch.linspace(2.0, 0.2, 8, dtype=f64)
    clusters = torch.cat([torch.randn(30, 3, generator=_gen(12), dtype=f64) * 0.1 + c
                          for c in torch.tensor([[0.0, 0, 0], [5, 0, 0], [0, 5, 0], [0, 0, 5]], dtype=f64)])
    cases = [
        _Case("points 0, 1, 2, 10, 11.5 on a line, start 0", {"features": line, "n_select": 4, "start": 0},
              {"indices": torch.tensor([0, 4, 2, 3])}),
        _Case("only the start point (n_select = 1), start 3", {"features": line, "n_select": 1, "start": 3},
              {"indices": torch.tensor([3])}),
        _Case("a duplicated farthest point: ties go to the lowest index", {"features": dup, "n_select": 3, "start": 0},
              {"indices": torch.tensor([0, 1, 3])}),
        _Case("rectangle corners and a point near a corner, start there (index 4), all 5 selected",
              {"features": square, "n_select": 5, "start": 4}, {"indices": torch.tensor([4, 3, 1, 2, 0])}),
        _Case("4 clusters of 30 points: one centre per cluster first", {"features": clusters, "n_select": 6, "start": 0}),
        _Case("200 random points in 8-D, 25 centres, start 17", {"features": rnd, "n_select": 25, "start": 17}),
    ]
    mistakes = [
        _Mistake(_coreset_from_last_only, "the next centre is the point farthest from its *nearest* chosen centre "
                                          "(min over all centres so far), not from the last centre only"),
        _Mistake(_coreset_farthest_from_mean, "distance to the set of centres = distance to the nearest centre, not "
                                              "to their mean"),
        _Mistake(_coreset_ignores_start, "the first centre is row `start`, not row 0"),
        _Mistake(_coreset_one_too_many, "return exactly n_select indices, the start point included"),
    ]
    hints = ["keep one number per point: its distance to the nearest chosen centre; after adding a centre c update it "
             "with min(old, ||x - c||), then pick the argmax",
             "ties: torch.argmax returns the first (lowest) index of the maximum"]
    return _run_check("check_greedy_coreset", "greedy_coreset", _run_coreset, (greedy_coreset,), (_ref_greedy_coreset,),
                      cases, {}, mistakes, hints, raise_on_fail, exact=("indices",))


# ============================================================================================
# Flows lab: affine coupling forward, inverse, log-det
# ============================================================================================


def _coupling(channels: int, subnet: str, seed: int, zero: bool = False):
    """A RealNVP coupling of the package with random (non-zero) subnet weights, in float64."""
    from vadlab.nn.flows import AffineCoupling

    with torch.random.fork_rng():  # leave the student's global RNG alone
        torch.manual_seed(seed)
        layer = AffineCoupling(channels, hidden=8, subnet=subnet).double()
    if not zero:
        with torch.no_grad():
            for p in layer.subnet.parameters():
                p.copy_(torch.randn(p.shape, generator=_gen(seed + p.numel()), dtype=p.dtype) * 0.7)
    return layer


def _st_net(layer) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    from vadlab.nn.flows import soft_clamp

    def st_net(x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x1.shape[1] != layer.n_keep:
            raise ValueError(f"st_net expects the first {layer.n_keep} channels (D - D//2 of D = {layer.channels}), "
                             f"got {x1.shape[1]}")
        s, t = layer.subnet(x1).chunk(2, dim=1)
        return soft_clamp(s, layer.clamp), t

    return st_net


def _ref_coupling_forward(x, st_net):
    keep = x.shape[1] - x.shape[1] // 2
    x1, x2 = x[:, :keep], x[:, keep:]
    s, t = st_net(x1)
    return torch.cat([x1, x2 * torch.exp(s) + t], 1), s.reshape(s.shape[0], -1).sum(1)


def _ref_coupling_inverse(y, st_net):
    keep = y.shape[1] - y.shape[1] // 2
    y1, y2 = y[:, :keep], y[:, keep:]
    s, t = st_net(y1)
    return torch.cat([y1, (y2 - t) * torch.exp(-s)], 1)


def _run_coupling(forward, inverse, x, st_net):
    out = _call(forward, x, st_net)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"coupling_forward must return (y, logdet), got {type(out).__name__}")
    with torch.no_grad():
        y_ref, _ = _ref_coupling_forward(x, st_net)
    x_back = _call(inverse, y_ref, st_net)
    return {"y": out[0], "logdet": out[1], "inverse(y)": x_back}


def check_affine_coupling(coupling_forward: Callable, coupling_inverse: Callable,
                          raise_on_fail: bool | None = None) -> bool:
    """Check ``coupling_forward(x, st_net) -> (y, logdet [N])`` and ``coupling_inverse(y, st_net) -> x``.

    ``st_net(x1) -> (s, t)`` maps the first ``D - D//2`` channels to the log-scale and shift of the rest.
    The expected outputs come from :class:`vadlab.nn.flows.AffineCoupling`; the log-det of the random cases
    is also checked against autograd's full Jacobian.
    """
    from vadlab.nn.flows import jacobian_logdet

    f64 = torch.float64
    x_vec = torch.randn(4, 6, generator=_gen(21), dtype=f64)
    x_odd = torch.randn(3, 5, generator=_gen(22), dtype=f64)
    x_map = torch.randn(2, 4, 3, 2, generator=_gen(23), dtype=f64)
    l_zero, l_vec, l_odd, l_map = (_coupling(6, "mlp", 1, zero=True), _coupling(6, "mlp", 2),
                                   _coupling(5, "mlp", 3), _coupling(4, "conv", 4))
    cases = []
    for name, x, layer, known in [
        ("zero subnet (s = t = 0): the identity, log-det 0", x_vec, l_zero,
         {"y": x_vec, "logdet": torch.zeros(4, dtype=f64), "inverse(y)": x_vec}),
        ("vectors [4, 6], random subnet", x_vec, l_vec, None),
        ("odd width D = 5 (x1 has 3 channels, x2 has 2)", x_odd, l_odd, None),
        ("feature maps [2, 4, 3, 2] with a conv subnet", x_map, l_map, None),
    ]:
        if known is None:  # the package's layer gives y; autograd's Jacobian gives the log-det
            with torch.no_grad():
                y_pkg, _ = layer(x)
            known = {"y": y_pkg, "logdet": jacobian_logdet(lambda v, layer=layer: layer(v)[0], x).detach(),
                     "inverse(y)": x}
        cases.append(_Case(name, {"x": x, "st_net": _st_net(layer)}, known))
    mistakes = [
        _Mistake((lambda x, n: (_ref_coupling_forward(x, n)[0], torch.zeros(x.shape[0], dtype=x.dtype)),
                  _ref_coupling_inverse),
                 "the log-det is missing: y2 = x2 exp(s) + t scales each x2 entry by exp(s), so log|det J| = sum of s"),
        _Mistake((lambda x, n: (_ref_coupling_forward(x, n)[0], -_ref_coupling_forward(x, n)[1]), _ref_coupling_inverse),
                 "the log-det has the wrong sign: the forward map multiplies by exp(+s)"),
        _Mistake((lambda x, n: (_ref_coupling_forward(x, n)[0], _ref_coupling_forward(x, n)[1].sum()),
                  _ref_coupling_inverse),
                 "the log-det is one number per sample ([N]): sum s over every dimension except the batch"),
        _Mistake((_ref_coupling_forward,
                  lambda y, n: torch.cat([y[:, :y.shape[1] - y.shape[1] // 2],
                                          y[:, y.shape[1] - y.shape[1] // 2:] * torch.exp(-n(y[:, :y.shape[1] - y.shape[1] // 2])[0])
                                          - n(y[:, :y.shape[1] - y.shape[1] // 2])[1]], 1)),
                 "undo the forward steps in reverse order: first subtract t, then divide by exp(s)"),
    ]
    hints = ["split: x1 = the first D - D//2 channels (dimension 1), x2 = the rest; y1 = x1 unchanged",
             "(s, t) depend on x1 only, and y1 = x1, so the inverse can recompute them from y1",
             "log|det J| per sample = sum of s over all its entries (channels and, for maps, positions)"]
    return _run_check("check_affine_coupling", "coupling_forward / coupling_inverse", _run_coupling,
                      (coupling_forward, coupling_inverse), (_ref_coupling_forward, _ref_coupling_inverse), cases,
                      {"y": (1e-6, 1e-8), "logdet": (1e-6, 1e-8), "inverse(y)": (1e-6, 1e-8)}, mistakes, hints,
                      raise_on_fail)


# ============================================================================================
# Reconstruction lab: the SSIM map
# ============================================================================================


def ssim_blur(z: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Local Gaussian-weighted mean of every channel of ``z`` ``[B, C, H, W]`` (symmetric padding, same size).

    The window of SSIM (11 taps, sigma 1.5); given to the students so that the exercise is the statistics.
    """
    from vadlab.nn.similarity import _filter, gaussian_window

    return _filter(z, gaussian_window(window_size, sigma, z.dtype).to(z.device), "symmetric")


def _ref_ssim_map(x, y, blur, data_range=1.0):
    from vadlab.nn.similarity import ssim_map

    return ssim_map(x, y, data_range=data_range)


def _run_ssim(fn, x, y, data_range):
    return {"ssim": _call(fn, x, y, ssim_blur, data_range)}


def _ssim_variant(x, y, blur, data_range=1.0, *, raw_moments=False, c_not_squared=False, ignore_range=False,
                  cov_from_std=False):
    L = 1.0 if ignore_range else data_range
    c1, c2 = (0.01 * L, 0.03 * L) if c_not_squared else ((0.01 * L) ** 2, (0.03 * L) ** 2)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x), blur(y * y), blur(x * y)
    if not raw_moments:
        vx, vy, cxy = vx - mx * mx, vy - my * my, cxy - mx * my
    if cov_from_std:
        cxy = (vx.clamp_min(0) * vy.clamp_min(0)).sqrt()
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def check_ssim_map(ssim_map: Callable, raise_on_fail: bool | None = None) -> bool:
    """Check ``ssim_map(x, y, blur, data_range) -> [B,C,H,W]``; ``blur`` is :func:`ssim_blur` (local means)."""
    f64 = torch.float64
    x = torch.rand(2, 3, 16, 20, generator=_gen(31), dtype=f64)
    y = (x + 0.15 * torch.randn(x.shape, generator=_gen(32), dtype=f64)).clamp(0, 1)
    y2 = torch.rand(1, 1, 12, 12, generator=_gen(33), dtype=f64)
    x2 = 0.5 * y2 + 0.25
    a, b = 0.2, 0.6
    c1 = 0.01 ** 2  # constant images: only the luminance term (with c1) differs from 1
    cases = [
        _Case("identical images: SSIM = 1 everywhere", {"x": x, "y": x.clone(), "data_range": 1.0},
              {"ssim": torch.ones_like(x)}),
        _Case("constant images 0.2 and 0.6: (2ab + C1) / (a^2 + b^2 + C1)",
              {"x": torch.full((1, 1, 12, 14), a, dtype=f64), "y": torch.full((1, 1, 12, 14), b, dtype=f64), "data_range": 1.0},
              {"ssim": torch.full((1, 1, 12, 14), (2 * a * b + c1) / (a * a + b * b + c1), dtype=f64)}),
        _Case("an image and a noisy copy, [2, 3, 16, 20]", {"x": x, "y": y, "data_range": 1.0}),
        _Case("contrast and brightness changed (x = 0.5 y + 0.25)", {"x": x2, "y": y2, "data_range": 1.0}),
        _Case("the same pair on the 0..255 scale with data_range=255 (same SSIM)",
              {"x": 255 * x, "y": 255 * y, "data_range": 255.0},
              {"ssim": _ref_ssim_map(x, y, None, 1.0)}),
    ]
    mistakes = [
        _Mistake(lambda x, y, blur, L=1.0: _ssim_variant(x, y, blur, L, raw_moments=True),
                 "variance and covariance are centred moments: blur(x*x) - mu_x^2 and blur(x*y) - mu_x mu_y"),
        _Mistake(lambda x, y, blur, L=1.0: _ssim_variant(x, y, blur, L, c_not_squared=True),
                 "the constants are squared: C1 = (0.01 L)^2, C2 = (0.03 L)^2"),
        _Mistake(lambda x, y, blur, L=1.0: _ssim_variant(x, y, blur, L, ignore_range=True),
                 "use data_range L in C1 and C2: images on 0..255 need L = 255"),
        _Mistake(lambda x, y, blur, L=1.0: _ssim_variant(x, y, blur, L, cov_from_std=True),
                 "the covariance is blur(x*y) - mu_x mu_y; sigma_x sigma_y is only its upper bound"),
    ]
    hints = ["all five local statistics come from the same blur: mu_x, mu_y, blur(x*x), blur(y*y), blur(x*y)",
             "SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)), per pixel and channel"]
    return _run_check("check_ssim_map", "ssim_map", _run_ssim, (ssim_map,), (_ref_ssim_map,), cases,
                      {"ssim": (1e-6, 1e-8)}, mistakes, hints, raise_on_fail)


# ============================================================================================
# DMAD lab: vector quantisation with the straight-through estimator
# ============================================================================================


def _ref_quantize(z_e: torch.Tensor, memory: torch.Tensor, beta: float):
    from vadlab.nn.vq import VectorQuantizer

    with torch.random.fork_rng():  # its random initial memory must not move the student's global RNG
        vq = VectorQuantizer(memory.shape[0], memory.shape[1], beta=beta)
    del vq.memory  # use the caller's tensor itself (not a Parameter copy), so gradients reach it
    vq.memory = memory
    out = vq(z_e)
    return out.z_q, out.loss, out.indices


def _run_quantize(fn, z_e, memory, beta, upstream):
    z_e = z_e.clone().requires_grad_(True)
    memory = memory.clone().requires_grad_(True)
    out = _call(fn, z_e, memory, beta)
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise TypeError(f"quantize must return (z_st, loss, indices), got {type(out).__name__}")
    z_st, loss, indices = out
    objective = (z_st * upstream).sum() + loss
    g_z, g_m = torch.autograd.grad(objective, (z_e, memory), allow_unused=True)
    g_z = torch.zeros_like(z_e) if g_z is None else g_z
    g_m = torch.zeros_like(memory) if g_m is None else g_m
    return {"z_st": z_st.detach(), "loss": loss.detach(), "indices": indices,
            "grad z_e": g_z, "grad memory": g_m}


def _quantize_parts(z_e, memory):
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])
    idx = torch.cdist(flat.detach(), memory.detach()).argmin(1).view(z_e.shape[0], *z_e.shape[2:])
    return memory[idx].permute(0, 3, 1, 2), idx


def _vq_sg_swapped(z_e, memory, beta):
    z_q, idx = _quantize_parts(z_e, memory)
    loss = (z_e - z_q.detach()).pow(2).mean() + beta * (z_e.detach() - z_q).pow(2).mean()
    return z_e + (z_q - z_e).detach(), loss, idx


def _vq_no_straight_through(z_e, memory, beta):
    z_q, idx = _quantize_parts(z_e, memory)
    loss = (z_e.detach() - z_q).pow(2).mean() + beta * (z_e - z_q.detach()).pow(2).mean()
    return z_q, loss, idx


def _vq_reshape(z_e, memory, beta):
    b, d, h, w = z_e.shape
    flat = z_e.reshape(-1, d)
    idx = torch.cdist(flat.detach(), memory.detach()).argmin(1).view(b, h, w)
    z_q = memory[idx].permute(0, 3, 1, 2)
    loss = (z_e.detach() - z_q).pow(2).mean() + beta * (z_e - z_q.detach()).pow(2).mean()
    return z_e + (z_q - z_e).detach(), loss, idx


def _vq_no_detach_in_st(z_e, memory, beta):
    z_q, idx = _quantize_parts(z_e, memory)
    loss = (z_e.detach() - z_q).pow(2).mean() + beta * (z_e - z_q.detach()).pow(2).mean()
    return z_q + (z_e - z_e.detach()), loss, idx


def check_quantize(quantize: Callable, raise_on_fail: bool | None = None) -> bool:
    """Check ``quantize(z_e [B,D,H,W], memory [N,D], beta) -> (z_st, loss, indices [B,H,W])``, values and gradients.

    The gradients are those of ``(z_st * G).sum() + loss`` for a fixed random upstream gradient ``G``, with
    respect to ``z_e`` and to ``memory``; the reference is :class:`vadlab.nn.vq.VectorQuantizer`.
    """
    f64 = torch.float64
    mem = torch.randn(5, 3, generator=_gen(41), dtype=f64)
    z = torch.randn(2, 3, 2, 4, generator=_gen(42), dtype=f64)
    g = torch.randn(2, 3, 2, 4, generator=_gen(43), dtype=f64)
    exact_idx = torch.tensor([[[4, 0], [2, 2]]])
    z_exact = mem[exact_idx].permute(0, 3, 1, 2).clone()
    g_exact = torch.randn(z_exact.shape, generator=_gen(44), dtype=f64)
    dup = torch.cat([mem[:2], mem[1:2], mem[2:]])  # items 1 and 2 are identical
    one = mem[:1].clone()
    cases = [
        _Case("one memory item: everything maps to it",
              {"z_e": z, "memory": one, "beta": 0.25, "upstream": g},
              {"indices": torch.zeros(2, 2, 4, dtype=torch.long), "z_st": one[0].view(1, 3, 1, 1).expand(2, 3, 2, 4)}),
        _Case("z_e made of memory items: indices known, loss 0, gradient to z_e = upstream",
              {"z_e": z_exact, "memory": mem, "beta": 0.25, "upstream": g_exact},
              {"indices": exact_idx, "z_st": z_exact, "loss": torch.zeros((), dtype=f64), "grad z_e": g_exact}),
        _Case("random cube [2, 3, 2, 4], 5 items, beta 0.25", {"z_e": z, "memory": mem, "beta": 0.25, "upstream": g}),
        _Case("two identical memory items (ties: lowest index), beta 1", {"z_e": z, "memory": dup, "beta": 1.0, "upstream": g}),
    ]
    mistakes = [
        _Mistake(_vq_sg_swapped, "the stop-gradients of the loss are on the wrong sides: the first term "
                                 "||SG(z_e) - z_q||^2 moves the memory, the beta term ||z_e - SG(z_q)||^2 moves the encoder"),
        _Mistake(_vq_no_straight_through, "no straight-through gradient: return z_e + SG(z_q - z_e), whose value is z_q "
                                          "but whose gradient passes to z_e unchanged"),
        _Mistake(_vq_no_detach_in_st, "the straight-through output must not pass the decoder's gradient to the memory: "
                                      "write it as z_e + SG(z_q - z_e)"),
        _Mistake(_vq_reshape, "z_e is [B, D, H, W]: put D last with permute(0, 2, 3, 1) before flattening to "
                              "[B*H*W, D]; reshape mixes features and positions"),
    ]
    hints = ["nearest item in L2 per position (torch.cdist + argmin); indices are [B, H, W]",
             "the loss uses means over all entries (F.mse_loss), with beta on the commitment term",
             "SG(.) is .detach()"]
    tol = (1e-6, 1e-9)
    return _run_check("check_quantize", "quantize", _run_quantize, (quantize,), (_ref_quantize,), cases,
                      {k: tol for k in ("z_st", "loss", "grad z_e", "grad memory")}, mistakes, hints, raise_on_fail,
                      exact=("indices",))


# ============================================================================================
# DiAD lab: one DDIM step
# ============================================================================================


def _ref_ddim_step(x_t, eps, t, t_next, alpha_bars):
    from vadlab.nn.diffusion import NoiseSchedule

    sched = NoiseSchedule(num_steps=len(alpha_bars))
    sched.alpha_bars = alpha_bars  # the schedule the case uses
    return sched.ddim_step(x_t, t, t_next, eps)


def _run_ddim(fn, x_t, eps, t, t_next, alpha_bars):
    return {"x_next": _call(fn, x_t, eps, t, t_next, alpha_bars)}


def _ddim_negative_index(x_t, eps, t, t_next, ab):
    a, a_next = ab[t], ab[t_next]
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


def _ddim_no_sqrt(x_t, eps, t, t_next, ab):
    a = ab[t]
    a_next = ab[t_next] if t_next >= 0 else torch.ones((), dtype=ab.dtype)
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    return a_next * x0 + (1 - a_next) * eps


def _ddim_old_noise_level(x_t, eps, t, t_next, ab):
    a = ab[t]
    a_next = ab[t_next] if t_next >= 0 else torch.ones((), dtype=ab.dtype)
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    return a_next.sqrt() * x0 + (1 - a).sqrt() * eps


def _ddim_x0_not_divided(x_t, eps, t, t_next, ab):
    a = ab[t]
    a_next = ab[t_next] if t_next >= 0 else torch.ones((), dtype=ab.dtype)
    x0 = x_t - (1 - a).sqrt() * eps
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


def check_ddim_step(ddim_step: Callable, raise_on_fail: bool | None = None) -> bool:
    """Check ``ddim_step(x_t, eps, t, t_next, alpha_bars) -> x_{t_next}`` (eta = 0; ``t_next = -1`` means x_0)."""
    from vadlab.nn.diffusion import make_betas

    f64 = torch.float64
    ab_lin = torch.cumprod(1 - make_betas(1000, kind="linear"), 0)
    ab_sd = torch.cumprod(1 - make_betas(1000, 0.00085, 0.012, kind="scaled_linear"), 0)
    ab_short = torch.cumprod(1 - make_betas(10, 0.05, 0.3), 0)
    x0 = torch.rand(2, 3, 4, 4, generator=_gen(51), dtype=f64) * 2 - 1
    noise = torch.randn(x0.shape, generator=_gen(52), dtype=f64)
    eps_model = torch.randn(x0.shape, generator=_gen(53), dtype=f64)

    def q(t: int, ab: torch.Tensor) -> torch.Tensor:
        return ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * noise

    cases = [
        _Case("the true noise: DDIM jumps exactly to q(x_300 | x_0) from t=500",
              {"x_t": q(500, ab_lin), "eps": noise, "t": 500, "t_next": 300, "alpha_bars": ab_lin},
              {"x_next": q(300, ab_lin)}),
        _Case("last step t=100 -> t_next=-1 (x_0): returns the x_0 estimate",
              {"x_t": q(100, ab_lin), "eps": noise, "t": 100, "t_next": -1, "alpha_bars": ab_lin}, {"x_next": x0}),
        _Case("t_next = t: nothing changes", {"x_t": q(40, ab_lin), "eps": eps_model, "t": 40, "t_next": 40,
                                              "alpha_bars": ab_lin}, {"x_next": q(40, ab_lin)}),
        _Case("a model's eps, Stable Diffusion schedule, t=999 -> 899",
              {"x_t": q(999, ab_sd), "eps": eps_model, "t": 999, "t_next": 899, "alpha_bars": ab_sd}),
        _Case("a 10-step schedule, t=3 -> t_next=0 (a real step, not x_0)",
              {"x_t": q(3, ab_short), "eps": eps_model, "t": 3, "t_next": 0, "alpha_bars": ab_short}),
    ]
    mistakes = [
        _Mistake(_ddim_negative_index, "t_next = -1 means 'x_0' (alpha_bar = 1): alpha_bars[-1] is Python's *last* "
                                       "entry, the noisiest step"),
        _Mistake(_ddim_no_sqrt, "the coefficients are square roots: sqrt(alpha_bar_next) x0_hat + sqrt(1 - alpha_bar_next) eps"),
        _Mistake(_ddim_old_noise_level, "the noise is re-added at the *new* level: sqrt(1 - alpha_bar_next), "
                                        "not sqrt(1 - alpha_bar_t)"),
        _Mistake(_ddim_x0_not_divided, "x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t): the division "
                                       "is missing"),
    ]
    hints = ["first predict x0_hat from x_t and eps, then move it to the noise level of t_next with the same eps",
             "alpha_bars[t] is the cumulative product up to and including step t"]
    return _run_check("check_ddim_step", "ddim_step", _run_ddim, (ddim_step,), (_ref_ddim_step,), cases,
                      {"x_next": (1e-6, 1e-8)}, mistakes, hints, raise_on_fail)


# ============================================================================================
# References (for instructors and tests): the package wrapped in the exercises' signatures
# ============================================================================================

_REFERENCES: dict[str, Callable | tuple[Callable, ...]] = {
    "auroc": _ref_auroc,
    "aupro": _ref_aupro,
    "mahalanobis_map": _ref_mahalanobis_map,
    "greedy_coreset": _ref_greedy_coreset,
    "affine_coupling": (_ref_coupling_forward, _ref_coupling_inverse),
    "ssim_map": _ref_ssim_map,
    "quantize": _ref_quantize,
    "ddim_step": _ref_ddim_step,
}


def reference(exercise: str) -> Callable | tuple[Callable, ...]:
    """The package's implementation in the signature of an exercise (a tuple for ``affine_coupling``)."""
    if exercise not in _REFERENCES:
        raise KeyError(f"unknown exercise {exercise!r}; choose one of {sorted(_REFERENCES)}")
    return _REFERENCES[exercise]


# ============================================================================================
# The pipeline from a lab: where the project is, its settings, its results table
# ============================================================================================


def project_root(start: str | Path | None = None) -> Path:
    """The repository root: the first folder above ``start`` (default: the working directory) holding
    ``params.yaml`` and ``dvc.yaml``; else the checkout the package was installed from."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file() and (folder / "dvc.yaml").is_file():
            return folder
    installed = Path(__file__).resolve().parents[2]
    if (installed / "params.yaml").is_file():
        return installed
    raise FileNotFoundError(f"no params.yaml/dvc.yaml above {here}: run the lab inside the vadlab repository")


def show_params(method: str) -> dict | None:
    """Print and return the pipeline settings of ``method`` from params.yaml (None if it has none yet)."""
    import yaml

    params = yaml.safe_load((project_root() / "params.yaml").read_text())
    settings = (params.get("methods") or {}).get(method)
    stages = [key for key in ("run_methods", "unified_methods") if method in (params.get(key) or [])]
    if settings is None:
        print(f"params.yaml has no `methods.{method}` entry yet")
    else:
        print(f"methods.{method} in params.yaml: {settings}")
    print(f"{method} is listed in: {', '.join(stages) if stages else 'no stage (add it to run_methods)'}")
    return settings


def results_table(method: str | None = None):
    """The pipeline's per-category results of ``method`` (all methods if None) as a DataFrame, or None.

    Reads results/tables/per_category.csv; for a method without rows there, the first other table under
    results/tables/ that has rows for it (e.g. the multi-class protocol's).  Prints what to run when nothing
    exists yet.
    """
    import pandas as pd

    root = project_root()
    tables = root / "results" / "tables"
    main = tables / "per_category.csv"
    candidates = [main] + sorted(p for p in tables.glob("*.csv") if p != main)
    for path in candidates:
        if not path.is_file():
            continue
        table = pd.read_csv(path)
        if "method" not in table.columns:
            continue
        if method is not None:
            table = table[table["method"] == method]
        if table.empty:
            continue
        if path != main:
            print(f"rows for {method} from {path.relative_to(root)}")
        cols = [c for c in ("method", "category", "seed", "image_size", "image_auroc", "pixel_auroc", "aupro", "pixel_ap",
                            "fit_seconds") if c in table.columns]
        return table[cols].reset_index(drop=True)
    what = f"rows for {method!r}" if method else "results"
    print(f"no {what} under {tables.relative_to(root)} yet: run `dvc repro` in the repository root (and make sure "
          f"the method is listed in run_methods or unified_methods in params.yaml)")
    return None


# ============================================================================================
# Student edition
# ============================================================================================

_HEADER = re.compile(r"^# %%(.*)$")
_TAGS = re.compile(r"tags\s*=\s*\[([^\]]*)\]")
_BEGIN = re.compile(r"^(\s*)# BEGIN SOLUTION\s*$")
_END = re.compile(r"^\s*# END SOLUTION\s*$")
PLACEHOLDER = 'raise NotImplementedError("exercise: write your code here")'


def _is_solution_header(line: str) -> bool:
    m = _HEADER.match(line)
    if not m:
        return False
    tags = _TAGS.search(m.group(1))
    return bool(tags) and any(t.strip().strip("'\"") == "solution" for t in tags.group(1).split(","))


def student_version(source: str, name: str = "<lab>") -> str:
    """The student edition of a jupytext percent-format lab (see the module docstring).

    Inside a cell tagged ``solution``: each ``# BEGIN SOLUTION`` ... ``# END SOLUTION`` block becomes
    ``# YOUR CODE HERE`` + ``raise NotImplementedError(...)`` at the marker's indentation; a solution cell
    without markers keeps only its header and gets the placeholder.  Markers outside solution cells, or
    unbalanced markers, raise ``ValueError`` naming the line.  All other lines are kept unchanged.
    """
    lines = source.splitlines(keepends=True)
    out: list[str] = []
    in_solution = False
    cell_has_marker = False
    cell_start = 0  # index in `out` of the current solution cell's first body line
    skipping = False
    nl = "\n"

    def close_unmarked_cell() -> None:
        # a solution cell without markers: drop its body, keep trailing blank lines (cell separation)
        body = out[cell_start:]
        trailing = []
        while body and not body[-1].strip():
            trailing.insert(0, body.pop())
        del out[cell_start:]
        out.extend(["# YOUR CODE HERE\n", PLACEHOLDER + "\n", *trailing])

    for no, line in enumerate(lines, 1):
        if _HEADER.match(line):
            if skipping:
                raise ValueError(f"{name}:{no}: a new cell starts inside a BEGIN SOLUTION block (missing END SOLUTION)")
            if in_solution and not cell_has_marker:
                close_unmarked_cell()
            in_solution = _is_solution_header(line)
            cell_has_marker = False
            out.append(line)
            cell_start = len(out)
            continue
        begin, end = _BEGIN.match(line), _END.match(line)
        if begin:
            if not in_solution:
                raise ValueError(f"{name}:{no}: '# BEGIN SOLUTION' in a cell that is not tagged solution")
            if skipping:
                raise ValueError(f"{name}:{no}: nested '# BEGIN SOLUTION'")
            indent = begin.group(1)
            out.append(f"{indent}# YOUR CODE HERE{nl}")
            out.append(f"{indent}{PLACEHOLDER}{nl}")
            skipping, cell_has_marker = True, True
            continue
        if end:
            if not skipping:
                raise ValueError(f"{name}:{no}: '# END SOLUTION' without a matching BEGIN SOLUTION")
            skipping = False
            continue
        if not skipping:
            out.append(line)
    if skipping:
        raise ValueError(f"{name}: the file ends inside a BEGIN SOLUTION block (missing END SOLUTION)")
    if in_solution and not cell_has_marker:
        close_unmarked_cell()
    return "".join(out)


EDITIONS = ("student", "instructor")


def write_lab_edition(src: str | Path, dst: str | Path, edition: str = "student") -> list[Path]:
    """Copy the lab folder ``src`` to ``dst`` as one edition; return the written lab files (``*.py``).

    ``student``: every ``*.py`` lab becomes its :func:`student_version`; ``instructor``: copied unchanged.
    The book title in ``_config.yml`` gets the edition's name; other files are copied as they are
    (build outputs and checkpoints are skipped).
    """
    if edition not in EDITIONS:
        raise ValueError(f"edition must be one of {EDITIONS}, got {edition!r}")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"lab folder {src} does not exist")
    if dst.resolve() == src.resolve():
        raise ValueError("the copy must go to another folder than the sources")
    written = []
    for path in sorted(src.rglob("*")):
        if {"_build", "__pycache__", ".ipynb_checkpoints"} & set(path.parts):
            continue
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".py":
            text = path.read_text()
            target.write_text(student_version(text, name=str(path)) if edition == "student" else text)
            written.append(target)
        elif path.name == "_config.yml" and path.parent == src:
            target.write_text(re.sub(r'^title: "(.*)"$', rf'title: "\1 ({edition} edition)"', path.read_text(),
                                     count=1, flags=re.M))
        else:
            shutil.copy2(path, target)
    return written


def write_student_labs(src: str | Path, dst: str | Path) -> list[Path]:
    """The student edition of the lab folder ``src`` in ``dst`` (see :func:`write_lab_edition`)."""
    return write_lab_edition(src, dst, "student")


def _main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in EDITIONS:
        print("usage: python -m vadlab.labs student|instructor SRC_DIR DST_DIR", file=sys.stderr)
        return 2
    for path in write_lab_edition(argv[1], argv[2], argv[0]):
        print(f"{argv[0]} edition: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main(sys.argv[1:]))
