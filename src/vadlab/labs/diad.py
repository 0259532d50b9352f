"""The DiAD lab: one DDIM step (``check_ddim_step``)."""

from __future__ import annotations

from typing import Callable

import torch

from ._common import _Case, _Mistake, _call, _gen, _run_check


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
