"""The reconstruction lab: the SSIM map (``check_ssim_map``, and the blur ``ssim_blur`` it uses)."""

from __future__ import annotations

from typing import Callable

import torch

from ._common import _Case, _Mistake, _call, _gen, _run_check


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
