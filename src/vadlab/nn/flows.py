"""Invertible layers for normalizing flows (CFLOW-AD and PyramidFlow).

A normalizing flow is a bijection ``z = f(x)`` built from layers whose Jacobian determinant is
cheap.  By the change of variables ``log p_X(x) = log p_Z(f(x)) + log|det df/dx|``, so every layer
here returns ``(output, log|det J|)`` with one log-determinant per sample (shape ``[N]``), and has an
exact ``inverse``.  Layers accept vectors ``[N, D]`` or feature maps ``[B, C, H, W]`` (the split and
the mixing act on dimension 1; for maps the log-determinant sums over positions).

- :class:`AffineCoupling`: RealNVP affine coupling.  The first ``D - D//2`` channels pass unchanged
  and, concatenated with an optional conditioning input, predict a log-scale ``s`` and shift ``t``
  for the rest: ``y2 = x2 * exp(s) + t``.  ``s`` is soft-clamped (``soft_clamp``) so that
  ``|s| < clamp`` and the flow cannot blow up; ``log|det J| = sum(s)``.
- :class:`ActNorm`: a per-channel affine map with data-dependent initialisation (Glow).
- :class:`FixedPermutation` and :class:`InvertibleConv1x1` (LU-parametrised, as in Glow) mix the
  channels between couplings so that every channel gets transformed; optionally the 1x1 conv
  centres its log-diagonal ("volume normalised", ``log|det| = 0``, as PyramidFlow does).
- :class:`SequentialFlow` chains layers and sums their log-determinants.
- :func:`positional_encoding_2d`: the 2-D sinusoidal positional encoding of CFLOW-AD's conditions.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn


class FlowDivergenceError(RuntimeError):
    """Flow training produced a non-finite loss; the message names the optimisation step and the scale."""


def soft_clamp(s: torch.Tensor, clamp: float) -> torch.Tensor:
    """Smoothly squash ``s`` into ``(-clamp, clamp)``: ``clamp * 2/pi * atan(s / clamp)``.

    Slope 2/pi at zero; keeps ``exp(s)`` bounded so a coupling can neither explode nor collapse a
    channel.  This is FrEIA's ``"ATAN"`` clamp of its GLOW / RealNVP coupling blocks
    (``clamp * 0.636 * atan(s / clamp)``) and PyramidFlow's.  FrEIA's ``AllInOneBlock``, which CFLOW-AD's
    official code uses, clamps differently: ``clamp * tanh(0.1 * s)`` (same bound, slope ``0.1 * clamp``).
    """
    if clamp <= 0:
        return s
    return clamp * (2.0 / math.pi) * torch.atan(s / clamp)


def _per_sample_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum every dimension except the first: one number per sample."""
    return x.reshape(x.shape[0], -1).sum(1)


def _expand_condition(cond: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a condition ``[N, P]`` over the positions of maps ``[B, C, H, W]``."""
    if like.ndim == 4 and cond.ndim == 2:
        return cond[:, :, None, None].expand(-1, -1, *like.shape[-2:])
    return cond


class FlowLayer(nn.Module):
    """Interface: ``forward(x, cond) -> (y, logdet [N])`` and ``inverse(y, cond) -> x``."""

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover


def mlp_subnet(in_channels: int, out_channels: int, hidden: int) -> nn.Module:
    """Linear -> ReLU -> Linear (last layer zero-initialised so the coupling starts as the identity)."""
    net = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, out_channels))
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


def conv_subnet(in_channels: int, out_channels: int, hidden: int, kernel_size: int = 3) -> nn.Module:
    """Conv -> LeakyReLU -> Conv with 'same' padding (last conv zero-initialised)."""
    pad = kernel_size // 2
    net = nn.Sequential(nn.Conv2d(in_channels, hidden, kernel_size, padding=pad), nn.LeakyReLU(0.2),
                        nn.Conv2d(hidden, out_channels, kernel_size, padding=pad))
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


class AffineCoupling(FlowLayer):
    """Affine coupling ``y1 = x1; y2 = x2 * exp(s(x1, c)) + t(x1, c)`` with soft-clamped ``s``.

    ``channels`` D is split into ``x1`` (first ``D - D//2``) and ``x2`` (last ``D//2``).  The subnet sees
    ``cat(x1, cond)`` and returns ``2 * (D//2)`` numbers (``s`` then ``t``).  ``subnet="mlp"`` for
    vectors ``[N, D]`` (CFLOW-AD), ``"conv"`` for maps ``[B, D, H, W]``; ``subnet_factory`` overrides both.
    """

    def __init__(self, channels: int, cond_channels: int = 0, hidden: int | None = None, clamp: float = 1.9,
                 subnet: str = "mlp", kernel_size: int = 3,
                 subnet_factory: Callable[[int, int], nn.Module] | None = None) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"an affine coupling needs at least 2 channels, got {channels}")
        self.channels, self.cond_channels, self.clamp = channels, cond_channels, clamp
        self.n_keep = channels - channels // 2
        self.n_change = channels // 2
        in_ch = self.n_keep + cond_channels
        hidden = hidden or 2 * in_ch
        if subnet_factory is not None:
            self.subnet = subnet_factory(in_ch, 2 * self.n_change)
        elif subnet == "mlp":
            self.subnet = mlp_subnet(in_ch, 2 * self.n_change, hidden)
        elif subnet == "conv":
            self.subnet = conv_subnet(in_ch, 2 * self.n_change, hidden, kernel_size)
        else:
            raise ValueError(f"subnet must be 'mlp' or 'conv', got {subnet!r}")

    def _params(self, x1: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cond_channels:
            if cond is None:
                raise ValueError(f"this coupling is conditional ({self.cond_channels} channels): pass cond")
            cond = _expand_condition(cond, x1)
            if cond.shape[1] != self.cond_channels:
                raise ValueError(f"cond has {cond.shape[1]} channels, expected {self.cond_channels}")
            h = torch.cat([x1, cond.to(x1.dtype)], dim=1)
        else:
            h = x1
        s, t = self.subnet(h).chunk(2, dim=1)
        return soft_clamp(s, self.clamp), t

    def forward(self, x, cond=None):
        x1, x2 = x.split([self.n_keep, self.n_change], dim=1)
        s, t = self._params(x1, cond)
        return torch.cat([x1, x2 * torch.exp(s) + t], dim=1), _per_sample_sum(s)

    def inverse(self, y, cond=None):
        y1, y2 = y.split([self.n_keep, self.n_change], dim=1)
        s, t = self._params(y1, cond)
        return torch.cat([y1, (y2 - t) * torch.exp(-s)], dim=1)


class ActNorm(FlowLayer):
    """Per-channel affine ``y = (x + b) * exp(log_scale)`` (Glow's actnorm), ``log|det| = sum(log_scale)``.

    ``initialize(x)`` sets it from data so that ``y`` starts standardised per channel: flows on raw CNN
    features (channel scales differing by orders of magnitude) then start near the right density.

    The standard deviation used is floored at ``rel_floor`` (default 0.1) times the mean standard
    deviation over the channels.  Without a floor relative to the data, a channel that is (nearly)
    constant on the training data, such as a dead ReLU channel, is divided by ~0: with an absolute
    floor of 1e-6 any test deviation in it is amplified 10^6-fold and its squared value dominates
    the likelihood of every fiber.  With the relative floor no channel is scaled up by more than
    ``1 / rel_floor`` = 10 times a typical channel, so noise cannot be amplified by orders of magnitude;
    channels whose spread is at least a tenth of the typical one are standardised exactly, as before.
    ``log_scale`` stays trainable: the floor only sets where training starts.
    """

    def __init__(self, channels: int, rel_floor: float = 0.1) -> None:
        super().__init__()
        if not 0 < rel_floor <= 1:
            raise ValueError(f"ActNorm rel_floor must be in (0, 1], got {rel_floor}")
        self.rel_floor = rel_floor
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Standardise the channels of ``x`` ([N, C] or [B, C, H, W]); see the class note on the floor."""
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        std = flat.std(1)
        # relative floor; the absolute 1e-12 only guards an input that is constant in every channel
        floor = (self.rel_floor * std.mean()).clamp_min(1e-12)
        self.bias.copy_(-flat.mean(1))
        self.log_scale.copy_(-torch.log(std.clamp_min(floor)))

    def _shape(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, *([1] * (x.ndim - 2))).to(x.dtype)

    def forward(self, x, cond=None):
        y = (x + self._shape(self.bias, x)) * torch.exp(self._shape(self.log_scale, x))
        logdet = self.log_scale.sum().to(x.dtype) * x[0, 0].numel()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y, cond=None):
        return y * torch.exp(-self._shape(self.log_scale, y)) - self._shape(self.bias, y)


class FixedPermutation(FlowLayer):
    """A fixed random (hard) channel permutation (``log|det| = 0``), drawn from ``seed``.

    FrEIA's ``AllInOneBlock(permute_soft=True)`` uses a fixed random rotation from SO(D) instead.
    """

    def __init__(self, channels: int, seed: int = 0) -> None:
        super().__init__()
        perm = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def forward(self, x, cond=None):
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, y, cond=None):
        return y[:, self.inv_perm]


class InvertibleConv1x1(FlowLayer):
    """Glow's invertible 1x1 convolution ``W = P L (U + diag(sign * exp(log_s)))``, LU-parametrised.

    ``log|det W| = sum(log_s)`` per position.  With ``volume_norm=True`` the log-diagonal is centred
    (``log_s - mean(log_s)``), so ``|det W| = 1`` exactly (PyramidFlow's volume-preserving 1x1 conv).
    Works on vectors ``[N, C]`` and maps ``[B, C, H, W]``; initialised from a random rotation.
    """

    def __init__(self, channels: int, seed: int = 0, volume_norm: bool = False) -> None:
        super().__init__()
        self.volume_norm = volume_norm
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=gen, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        self.register_buffer("p", p.float())
        self.register_buffer("sign", torch.sign(diag).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(diag.abs()).float())

    def _log_s(self) -> torch.Tensor:
        return self.log_s - self.log_s.mean() if self.volume_norm else self.log_s

    def weight(self) -> torch.Tensor:
        """The current ``[C, C]`` matrix."""
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign * torch.exp(self._log_s()))
        return self.p.to(lower.dtype) @ lower @ upper

    @staticmethod
    def _mix(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            return x @ matrix.T
        return torch.einsum("oc,bchw->bohw", matrix, x)

    def forward(self, x, cond=None):
        positions = x[0, 0].numel()
        logdet = self._log_s().sum() * positions
        return self._mix(self.weight().to(x.dtype), x), logdet.to(x.dtype).expand(x.shape[0])

    def inverse(self, y, cond=None):
        return self._mix(torch.linalg.inv(self.weight().to(y.dtype)), y)


class SequentialFlow(FlowLayer):
    """Layers applied in order; log-determinants add up; the inverse runs them backwards."""

    def __init__(self, layers: Sequence[FlowLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x, cond=None):
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x, cond)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y, cond=None):
        for layer in reversed(self.layers):
            y = layer.inverse(y, cond)
        return y


def standard_normal_logprob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` per sample (sum over every dimension but the first)."""
    d = z[0].numel()
    return -0.5 * _per_sample_sum(z ** 2) - 0.5 * d * math.log(2 * math.pi)


def positional_encoding_2d(channels: int, height: int, width: int) -> torch.Tensor:
    """2-D sinusoidal positional encoding ``[channels, height, width]`` (CFLOW-AD's condition).

    The first half of the channels encodes the column ``x`` and the second half the row ``y``, each as
    interleaved ``sin(pos * w_k), cos(pos * w_k)`` with ``w_k = 10000^(-2k / (channels/2))``, the 1-D
    Transformer encoding applied once per axis.  ``channels`` must be a multiple of 4.
    """
    if channels % 4:
        raise ValueError(f"positional encoding channels must be a multiple of 4, got {channels}")
    half = channels // 2
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(10000.0) / half))
    pe = torch.zeros(channels, height, width, dtype=torch.float64)
    xs = torch.arange(width, dtype=torch.float64)[None, :] * freq[:, None]  # [half/2, W]
    ys = torch.arange(height, dtype=torch.float64)[None, :] * freq[:, None]  # [half/2, H]
    pe[0:half:2] = torch.sin(xs)[:, None, :].expand(-1, height, -1)
    pe[1:half:2] = torch.cos(xs)[:, None, :].expand(-1, height, -1)
    pe[half::2] = torch.sin(ys)[:, :, None].expand(-1, -1, width)
    pe[half + 1::2] = torch.cos(ys)[:, :, None].expand(-1, -1, width)
    return pe.float()


def jacobian_logdet(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Reference ``log|det J|`` per sample from autograd's full Jacobian (small inputs only, for tests).

    ``fn`` maps ``x [N, ...]`` to a tensor with as many elements per sample; samples must not interact.
    """
    out = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        jac = torch.autograd.functional.jacobian(lambda v: fn(v).reshape(-1), xi).reshape(-1, xi.numel())
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


__all__ = ["ActNorm", "AffineCoupling", "FixedPermutation", "FlowDivergenceError", "FlowLayer", "InvertibleConv1x1", "SequentialFlow",
           "conv_subnet", "jacobian_logdet", "mlp_subnet", "positional_encoding_2d", "soft_clamp",
           "standard_normal_logprob"]
