"""The PaDiM lab: the Mahalanobis map (``check_mahalanobis_map``)."""

from __future__ import annotations

from typing import Callable

import torch

from ._common import _Case, _Mistake, _call, _gen, _run_check


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
