"""The PatchCore lab: the greedy k-center coreset (``check_greedy_coreset``)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ._common import _Case, _Mistake, _call, _gen, _run_check


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
