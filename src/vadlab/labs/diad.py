"""The DiAD lab: one DDIM step (``check_ddim_step``), and the guided noise prediction: the semantic-guidance
network's residuals entering the denoiser's U-Net (``check_guided_eps``)."""

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


# ----------------------------------------------------------------------------- semantic guidance


def _ref_guided_eps(denoiser, z_t, t, guidance):
    """The package's guided noise prediction: :meth:`vadlab.methods.diad.Denoiser.forward` with the guidance."""
    return denoiser(z_t, t, guidance)


def _run_guided_eps(fn, denoiser, z_t, t, guidance):
    return {"eps": _call(fn, denoiser, z_t, t, guidance)}


def _guided_variant(denoiser, z_t, t, guidance, middle=True, skips=True, reverse_skips=False, skips_into_h=False,
                    skip_first=False):
    """The guided U-Net pass with one switch per typical mistake (the defaults give the right one)."""
    h, hs, emb = denoiser.encode(z_t, t)
    hs = list(hs)
    if guidance is not None and middle:
        h = h + guidance.middle
    g_skips = [] if guidance is None or not skips else list(guidance.skips)
    if reverse_skips:
        g_skips = g_skips[::-1]
    for i, block in enumerate(denoiser.decoder):
        skip = hs.pop()
        if i < len(g_skips):
            if skips_into_h:
                h = h + g_skips[i]
            else:
                skip = skip + g_skips[i]
        h = block(torch.cat([skip, h] if skip_first else [h, skip], dim=1), emb)
    return denoiser.out(h)


def _guided_networks(seed: int, channel_mult: tuple[int, ...], num_res_blocks: int = 1):
    """A small DiAD denoiser and SG network whose zero-initialised layers got random weights (at the start of
    training the guidance is exactly zero, and every mistake would go unnoticed).  float32: the timestep
    embedding is."""
    from vadlab.methods.diad import Denoiser, DiADConfig, SemanticGuidance

    cfg = DiADConfig(latent_channels=4, model_channels=8, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                     attention_resolutions=(2,), num_heads=2, hint_channels=(8, 8))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        denoiser, sg = Denoiser(cfg).eval(), SemanticGuidance(cfg, 2).eval()
        with torch.no_grad():
            for p in list(denoiser.parameters()) + list(sg.parameters()):
                if not p.any():  # zero-initialised (and biases that start at zero)
                    p.copy_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    return denoiser, sg


def check_guided_eps(guided_eps: Callable, raise_on_fail: bool | None = None) -> bool:
    """Check ``guided_eps(denoiser, z_t, t, guidance) -> eps`` [B, C, h, w], DiAD's guided noise prediction.

    ``guidance`` is a :class:`vadlab.methods.diad.Guidance` (``middle``: a residual for the denoiser's middle-block
    output; ``skips``: residuals for the skip features of the first decoder blocks, deepest first) or None (the
    plain denoiser).  The reference is :meth:`vadlab.methods.diad.Denoiser.forward`.
    """
    from vadlab.methods.diad import Guidance

    f32 = torch.float32
    den1, sg1 = _guided_networks(71, (2, 2))  # the guided skips all have the same shape
    den2, sg2 = _guided_networks(72, (1, 2), num_res_blocks=2)  # they do not
    z = torch.randn(2, 4, 8, 8, generator=_gen(73), dtype=f32)
    image = torch.rand(2, 3, 16, 16, generator=_gen(74), dtype=f32) * 2 - 1
    t = torch.tensor([900, 250])
    with torch.no_grad():
        g1, g2 = sg1(z, t, image), sg2(z, t, image)
        plain1 = den1(z, t)
    zero = Guidance(torch.zeros_like(g1.middle), [torch.zeros_like(s) for s in g1.skips])
    rand = Guidance(torch.randn(g1.middle.shape, generator=_gen(75), dtype=f32),
                    [torch.randn(s.shape, generator=_gen(76 + k), dtype=f32) for k, s in enumerate(g1.skips)])
    cases = [
        _Case("guidance=None: the plain denoiser", {"denoiser": den1, "z_t": z, "t": t, "guidance": None},
              {"eps": plain1}),
        _Case("zero guidance (a fresh SG network's zero convolutions): equals the plain denoiser",
              {"denoiser": den1, "z_t": z, "t": t, "guidance": zero}, {"eps": plain1}),
        _Case("random guidance residuals (middle and 2 skips)", {"denoiser": den1, "z_t": z, "t": t, "guidance": rand}),
        _Case("the guidance of an SG network from the input image", {"denoiser": den1, "z_t": z, "t": t, "guidance": g1}),
        _Case("two res blocks per level, widths 8 -> 16: 3 skip residuals of two shapes",
              {"denoiser": den2, "z_t": z, "t": t, "guidance": g2}),
    ]
    mistakes = [
        _Mistake(lambda *a: _guided_variant(*a, middle=False),
                 "the middle residual is missing: add guidance.middle to the denoiser's middle-block output before the "
                 "first decoder block"),
        _Mistake(lambda *a: _guided_variant(*a, skips=False),
                 "the skip residuals are missing: guidance.skips[i] is added to the skip feature of decoder block i"),
        _Mistake(lambda *a: _guided_variant(*a, reverse_skips=True),
                 "guidance.skips is in decoder order, deepest first: skips[0] goes with the first skip popped "
                 "(the last encoder output)"),
        _Mistake(lambda *a: _guided_variant(*a, skips_into_h=True),
                 "the skip residuals go into the skip connection (skip + guidance.skips[i]), not into h"),
        _Mistake(lambda *a: _guided_variant(*a, skip_first=True),
                 "each decoder block takes torch.cat([h, skip], dim=1): h first, then the skip feature"),
    ]
    hints = ["denoiser.encode(z_t, t) gives (middle output h, the encoder's skip features in encoder order, emb)",
             "pop the skip features from the end, one per decoder block; finish with denoiser.out(h)",
             "with guidance=None nothing is added: the plain denoiser",
             "a size mismatch? guidance.skips[i] has the shape of the i-th skip feature popped (deepest first)"]
    return _run_check("check_guided_eps", "guided_eps", _run_guided_eps, (guided_eps,), (_ref_guided_eps,), cases,
                      {"eps": (1e-5, 1e-6)}, mistakes, hints, raise_on_fail)
