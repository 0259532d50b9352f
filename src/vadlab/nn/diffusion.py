"""Gaussian diffusion: noise schedule, closed-form forward process, epsilon loss, DDPM and DDIM steps.

Notation (Ho et al. 2020; Song et al. 2021), with steps indexed ``t = 0 .. T-1`` as in code
(index ``t`` is the (t+1)-th noising step, so ``x_t`` has had ``t + 1`` steps of noise):

- forward Markov chain  q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I);
- closed form           q(x_t | x_0)     = N(sqrt(abar_t) x_0, (1 - abar_t) I),  abar_t = prod_{s<=t} (1 - beta_s);
- epsilon prediction    L = E || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2;
- DDPM step             x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps_theta) / sqrt(alpha_t) + sigma_t z;
- DDIM step (eta = 0)   x_{t'} = sqrt(abar_t') x0_hat + sqrt(1 - abar_t') eps_theta,
                        x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t),
  deterministic and valid for any decreasing subsequence of steps (here: any number of steps).

Two "linear" schedules exist: DDPM's betas linear in ``[1e-4, 0.02]`` (``kind="linear"``) and
Stable Diffusion's, linear in sqrt(beta) over ``[0.00085, 0.012]`` (``kind="scaled_linear"``, the
one DiAD inherits from SD v1.5).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

#: an epsilon predictor: (x_t [B, ...], t [B] long) -> eps_hat [B, ...]
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
               kind: str = "linear") -> torch.Tensor:
    """Betas ``[T]`` (float64) of a linear (DDPM) or scaled-linear (Stable Diffusion) schedule."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
    raise ValueError(f"unknown schedule kind {kind!r}; choose 'linear' or 'scaled_linear'")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` of (integer or real) timesteps ``t [B]`` (Transformer style)."""
    if dim < 2:
        raise ValueError(f"embedding dim must be >= 2, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


def _expand(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather ``values[t]`` and reshape to broadcast against ``like`` ([B, 1, 1, ...])."""
    out = values.to(like.device)[t.to(like.device)].to(like.dtype)
    return out.view(-1, *([1] * (like.ndim - 1)))


class NoiseSchedule(nn.Module):
    """A fixed variance schedule with the forward process, the loss and both samplers.

    The tables are float64 buffers (so a saved model carries its schedule); results are cast to the
    data's dtype.
    """

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 kind: str = "linear") -> None:
        super().__init__()
        betas = make_betas(num_steps, beta_start, beta_end, kind)
        alphas = 1.0 - betas
        self.num_steps = num_steps
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas", alphas, persistent=False)
        self.register_buffer("alpha_bars", torch.cumprod(alphas, 0), persistent=False)

    # -- forward process ------------------------------------------------------------
    def _check_t(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.long)
        if t.numel() and (t.min() < 0 or t.max() >= self.num_steps):
            raise ValueError(f"timesteps must lie in 0..{self.num_steps - 1}, got {t.min().item()}..{t.max().item()}")
        return t

    def q_step(self, x_prev: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One Markov step ``x_t ~ q(x_t | x_{t-1})`` (used to check the closed form by simulation)."""
        t = self._check_t(t)
        noise = torch.randn_like(x_prev) if noise is None else noise
        beta = _expand(self.betas, t, x_prev)
        return (1 - beta).sqrt() * x_prev + beta.sqrt() * noise

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Closed form ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (eq. 1 / 5 of DiAD)."""
        t = self._check_t(t)
        noise = torch.randn_like(x0) if noise is None else noise
        ab = _expand(self.alpha_bars, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert the closed form for ``x_0`` given a noise estimate."""
        ab = _expand(self.alpha_bars, self._check_t(t), x_t)
        return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()

    # -- training -------------------------------------------------------------------
    def epsilon_loss(self, model: EpsModel, x0: torch.Tensor, t: torch.Tensor | None = None,
                     noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean squared error between the true and predicted noise (eq. 3 / 6); ``t`` uniform if omitted."""
        if t is None:
            t = torch.randint(0, self.num_steps, (x0.shape[0],), generator=generator).to(x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        return (model(self.q_sample(x0, t, noise), t) - noise).pow(2).mean()

    # -- samplers -------------------------------------------------------------------
    def ddpm_step(self, x_t: torch.Tensor, t: int, eps: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral step ``x_{t-1}`` of eq. 2 with ``sigma_t^2 = beta_t`` (no noise added at t = 0)."""
        t_vec = self._check_t(torch.full((x_t.shape[0],), int(t)))
        beta = _expand(self.betas, t_vec, x_t)
        alpha = _expand(self.alphas, t_vec, x_t)
        ab = _expand(self.alpha_bars, t_vec, x_t)
        mean = (x_t - beta / (1 - ab).sqrt() * eps) / alpha.sqrt()
        if int(t) == 0:
            return mean
        z = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype).to(x_t.device)
        return mean + beta.sqrt() * z

    @torch.no_grad()
    def ddpm_sample(self, model: EpsModel, x_t: torch.Tensor, t_start: int | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Run the DDPM chain from step ``t_start`` (default T-1) down to ``x_0``: t_start + 1 model calls."""
        t_start = self.num_steps - 1 if t_start is None else int(t_start)
        x = x_t
        for t in range(t_start, -1, -1):
            x = self.ddpm_step(x, t, model(x, torch.full((x.shape[0],), t, device=x.device)), generator)
        return x

    def ddim_timesteps(self, t_start: int, steps: int) -> list[int]:
        """``steps`` evenly spaced, strictly decreasing timesteps starting at ``t_start``."""
        t_start = int(t_start)
        if not 0 <= t_start < self.num_steps:
            raise ValueError(f"t_start must lie in 0..{self.num_steps - 1}, got {t_start}")
        if not 1 <= steps <= t_start + 1:
            raise ValueError(f"steps must lie in 1..{t_start + 1} for t_start={t_start}, got {steps}")
        grid = torch.linspace(t_start, 0, steps + 1, dtype=torch.float64)[:-1]
        ts = [int(round(v)) for v in grid.tolist()]
        if len(set(ts)) != len(ts):  # rounding collapsed two steps: fall back to consecutive integers
            ts = list(range(t_start, t_start - steps, -1))
        return ts

    def ddim_step(self, x_t: torch.Tensor, t: int, t_next: int, eps: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM update (eta = 0) from step ``t`` to ``t_next`` (``-1`` means x_0)."""
        ab = self.alpha_bars[int(t)].to(x_t.dtype)
        ab_next = self.alpha_bars[int(t_next)].to(x_t.dtype) if t_next >= 0 else torch.ones((), dtype=x_t.dtype)
        ab, ab_next = ab.to(x_t.device), ab_next.to(x_t.device)
        x0_hat = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
        return ab_next.sqrt() * x0_hat + (1 - ab_next).sqrt() * eps

    @torch.no_grad()
    def ddim_sample(self, model: EpsModel, x_t: torch.Tensor, t_start: int | None = None,
                    steps: int = 10) -> torch.Tensor:
        """Denoise ``x_t`` (at step ``t_start``, default T-1) to ``x_0`` with ``steps`` DDIM updates, eta = 0."""
        t_start = self.num_steps - 1 if t_start is None else int(t_start)
        ts = self.ddim_timesteps(t_start, steps)
        x = x_t
        for i, t in enumerate(ts):
            t_next = ts[i + 1] if i + 1 < len(ts) else -1
            eps = model(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
            x = self.ddim_step(x, t, t_next, eps)
        return x


__all__ = ["EpsModel", "NoiseSchedule", "make_betas", "timestep_embedding"]
