"""The semi-orthogonal embedding lab: the random matrix W and the projected Mahalanobis distance
(``check_semi_orthogonal``)."""

from __future__ import annotations

from typing import Callable

import torch

from ._common import _Case, _Mistake, _call, _gen, _run_check


def _ref_semi_orthogonal_matrix(n_rows: int, n_cols: int, seed: int = 0) -> torch.Tensor:
    from vadlab.methods.semi_orthogonal import semi_orthogonal_matrix

    return semi_orthogonal_matrix(n_rows, n_cols, seed)


def _ref_projected_mahalanobis(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, W: torch.Tensor,
                               ridge: float) -> torch.Tensor:
    """Distances ``[N]`` of features ``x [N, F]`` under N(W^T mean, W^T cov W + ridge I), as the method scores:
    the package's PositionalGaussian on a 1 x 1 grid, with the precision of the projected covariance."""
    from vadlab.nn.gaussian import PositionalGaussian

    k = W.shape[1]
    g = PositionalGaussian()
    g.mean = (mean @ W).reshape(1, 1, k)
    g.precision = torch.linalg.inv(W.T @ cov @ W + ridge * torch.eye(k, dtype=cov.dtype)).reshape(1, 1, k, k)
    return g.distance((x @ W)[:, :, None, None])[:, 0, 0]


def _run_semi_orthogonal(matrix_fn, distance_fn, **inputs):
    out = {}
    if "n_rows" in inputs:
        n, k, seed = inputs["n_rows"], inputs["n_cols"], inputs["seed"]
        if not 1 <= k <= n:  # the function must refuse: there is no F x k matrix with orthonormal columns
            try:
                _call(matrix_fn, n, k, seed)
            except ValueError:
                return {"raises ValueError": 1.0}
            return {"raises ValueError": 0.0}
        W = _call(matrix_fn, n, k, seed)
        out["W"] = W
        if isinstance(W, torch.Tensor) and W.ndim == 2:
            out["W^T W"] = W.detach().double().T @ W.detach().double()
            out["dtype is float32"] = float(W.dtype == torch.float32)
    if "x" in inputs:
        out["distance"] = _call(distance_fn, inputs["x"], inputs["mean"], inputs["cov"], inputs["W"], inputs["ridge"])
    return out


def _validate(n_rows, n_cols):  # the mistakes below only differ from the reference in what they name
    if not 1 <= n_cols <= n_rows:
        raise ValueError("k must be in 1..F")


def _matrix_no_sign_fix(n_rows, n_cols, seed=0):
    _validate(n_rows, n_cols)
    omega = torch.randn(n_rows, n_cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.linalg.qr(omega)[0].float()


def _matrix_float32_draw(n_rows, n_cols, seed=0):
    _validate(n_rows, n_cols)
    omega = torch.randn(n_rows, n_cols, generator=torch.Generator().manual_seed(seed))
    q, r = torch.linalg.qr(omega)
    return (q * torch.sign(torch.diagonal(r))).float()


def _matrix_square_q(n_rows, n_cols, seed=0):
    _validate(n_rows, n_cols)
    omega = torch.randn(n_rows, n_cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(omega, mode="complete")
    return q.float()


def _matrix_gaussian(n_rows, n_cols, seed=0):
    _validate(n_rows, n_cols)
    return torch.randn(n_rows, n_cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def _distance_inverts_first(x, mean, cov, W, ridge):
    precision = torch.linalg.inv(cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype))
    d = (x - mean) @ W
    return torch.einsum("ni,ij,nj->n", d, W.T @ precision @ W, d).clamp_min(0).sqrt()


def _distance_no_ridge(x, mean, cov, W, ridge):
    return _ref_projected_mahalanobis(x, mean, cov, W, 0.0)


def _distance_squared(x, mean, cov, W, ridge):
    return _ref_projected_mahalanobis(x, mean, cov, W, ridge) ** 2


def _covariance(f: int, seed: int, decay: float = 1.0) -> torch.Tensor:
    a = torch.randn(f, 3 * f, generator=_gen(seed), dtype=torch.float64) * torch.linspace(1.0, decay, f,
                                                                                          dtype=torch.float64)[:, None]
    return a @ a.T / (3 * f) + 0.01 * torch.eye(f, dtype=torch.float64)


def check_semi_orthogonal(semi_orthogonal_matrix: Callable[[int, int, int], torch.Tensor],
                          projected_mahalanobis: Callable[..., torch.Tensor],
                          raise_on_fail: bool | None = None) -> bool:
    """Check ``semi_orthogonal_matrix(n_rows, n_cols, seed) -> W [F, k]`` (the package's exact matrix, float32,
    W^T W = I, ValueError unless 1 <= k <= F) and ``projected_mahalanobis(x [N,F], mean [F], cov [F,F], W [F,k],
    ridge) -> [N]``, the Mahalanobis distance of W^T x under N(W^T mean, W^T cov W + ridge I)."""
    f64 = torch.float64
    eye_w = torch.eye(4, 2, dtype=f64)  # W = the first two channels: PaDiM's channel subset as a special case
    diag_cov = torch.diag(torch.tensor([4.0, 0.25, 9.0, 1.0], dtype=f64))
    x_small = torch.tensor([[2.0, 1.0, 5.0, -3.0], [0.0, 0.0, 7.0, 1.0], [1.0, 1.0, 1.0, 1.0]], dtype=f64)
    mean_small = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=f64)
    # with the channel subset and a diagonal covariance the distance is the whitened distance on those channels
    known = (((x_small - mean_small)[:, :2] ** 2) / (torch.tensor([4.0, 0.25], dtype=f64) + 0.5)).sum(1).sqrt()
    f, k = 12, 5
    cov = _covariance(f, 21, decay=0.1)
    mean = torch.randn(f, generator=_gen(22), dtype=f64)
    x = mean + torch.randn(7, f, generator=_gen(23), dtype=f64) * 0.7
    W = _ref_semi_orthogonal_matrix(f, k, 3).double()
    Wf = _ref_semi_orthogonal_matrix(f, f, 4).double()  # k = F: a rotation, the full Mahalanobis distance
    full = torch.einsum("ni,ij,nj->n", x - mean, torch.linalg.inv(cov + 0.01 * torch.eye(f, dtype=f64)),
                        x - mean).sqrt()
    cases = [
        _Case("W for F = 6, k = 3, seed 0", {"n_rows": 6, "n_cols": 3, "seed": 0},
              {"W^T W": torch.eye(3, dtype=f64), "dtype is float32": 1.0}),
        _Case("W for F = 40, k = 8, seed 7: orthonormal columns", {"n_rows": 40, "n_cols": 8, "seed": 7},
              {"W^T W": torch.eye(8, dtype=f64)}),
        _Case("W for F = k = 5 (a square orthogonal matrix), seed 1", {"n_rows": 5, "n_cols": 5, "seed": 1},
              {"W^T W": torch.eye(5, dtype=f64)}),
        _Case("W for k = 1 (one unit column), seed 2", {"n_rows": 9, "n_cols": 1, "seed": 2}),
        _Case("k = 4 > F = 3: no such matrix, raise ValueError", {"n_rows": 3, "n_cols": 4, "seed": 0},
              {"raises ValueError": 1.0}),
        _Case("k = 0: raise ValueError", {"n_rows": 3, "n_cols": 0, "seed": 0}, {"raises ValueError": 1.0}),
        _Case("distance: W = first 2 channels, diagonal covariance, ridge 0.5",
              {"x": x_small, "mean": mean_small, "cov": diag_cov, "W": eye_w, "ridge": 0.5}, {"distance": known}),
        _Case("distance: x equal to the mean gives 0 (no NaN)",
              {"x": mean[None].clone(), "mean": mean, "cov": cov, "W": W, "ridge": 0.01},
              {"distance": torch.zeros(1, dtype=f64)}),
        _Case("distance: k = F (a rotation) gives the full Mahalanobis distance",
              {"x": x, "mean": mean, "cov": cov, "W": Wf, "ridge": 0.01}, {"distance": full}),
        _Case("distance: F = 12 correlated features, k = 5, ridge 0.01",
              {"x": x, "mean": mean, "cov": cov, "W": W, "ridge": 0.01}),
        _Case("distance: the same with a large ridge 10",
              {"x": x, "mean": mean, "cov": cov, "W": W, "ridge": 10.0}),
    ]
    ref = (_ref_semi_orthogonal_matrix, _ref_projected_mahalanobis)
    mistakes = [
        _Mistake((_matrix_no_sign_fix, _ref_projected_mahalanobis),
                 "Q from the QR decomposition is orthonormal but not unique: multiply each column by the sign of the "
                 "matching diagonal entry of R (that sign fix is what makes W Haar-distributed)"),
        _Mistake((_matrix_float32_draw, _ref_projected_mahalanobis),
                 "draw the Gaussian matrix in float64 (dtype=torch.float64) with the seeded generator, then convert "
                 "W to float32 at the end"),
        _Mistake((_matrix_square_q, _ref_projected_mahalanobis),
                 "W is F x k: use the reduced QR decomposition (the default mode), not the complete one"),
        _Mistake((_matrix_gaussian, _ref_projected_mahalanobis),
                 "a Gaussian matrix does not have orthonormal columns: orthonormalise it with torch.linalg.qr"),
        _Mistake((_ref_semi_orthogonal_matrix, _distance_inverts_first),
                 "project first, then invert: the precision of W^T x is (W^T C W + ridge I)^-1, a k x k inverse, not "
                 "W^T (C + ridge I)^-1 W"),
        _Mistake((_ref_semi_orthogonal_matrix, _distance_no_ridge),
                 "add ridge * I (k x k) to the projected covariance before inverting it"),
        _Mistake((_ref_semi_orthogonal_matrix, _distance_squared),
                 "these are squared distances: take the square root of the quadratic form"),
    ]
    hints = ["W: there is no F x k matrix with orthonormal columns unless 1 <= k <= F: raise ValueError otherwise",
             "W: omega = torch.randn(F, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64); "
             "q, r = torch.linalg.qr(omega); flip the columns of q whose diagonal entry of r is negative",
             "distance: d = (x - mean) @ W is [N, k]; the k x k covariance is W^T C W + ridge I; the distance is "
             "sqrt(d^T P d) per row, clamped at 0 before the sqrt"]
    return _run_check("check_semi_orthogonal", "semi_orthogonal_matrix / projected_mahalanobis", _run_semi_orthogonal,
                      (semi_orthogonal_matrix, projected_mahalanobis), ref, cases,
                      {"W": (1e-5, 1e-6), "W^T W": (1e-5, 1e-5), "distance": (1e-5, 1e-6)}, mistakes, hints,
                      raise_on_fail)
