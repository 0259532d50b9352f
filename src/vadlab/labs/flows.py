"""The flows lab: affine coupling forward, inverse and log-determinant (``check_affine_coupling``), and CFLOW's
2-D sinusoidal positional encoding, the condition of its flows (``check_positional_encoding``)."""

from __future__ import annotations

from typing import Callable

import torch

from ._common import _Case, _Mistake, _call, _gen, _run_check


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


# ----------------------------------------------------------------------------- CFLOW's condition


def _ref_positional_encoding(channels: int, height: int, width: int) -> torch.Tensor:
    from vadlab.nn.flows import positional_encoding_2d

    return positional_encoding_2d(channels, height, width)


def _run_positional_encoding(fn, channels, height, width):
    pe = _call(fn, channels, height, width)
    out = {"pe": pe}
    if isinstance(pe, torch.Tensor):
        out["dtype is float32"] = float(pe.dtype == torch.float32)
    return out


def _pe_variant(channels, height, width, swap_axes=False, freq_over=None, blocks=False, cos_first=False):
    """The encoding written the way a student might, with switches for the typical mistakes."""
    import math

    half = channels // 2
    denom = half if freq_over is None else freq_over
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(10000.0) / denom))

    def one_axis(n: int) -> torch.Tensor:  # [half, n]
        a = torch.arange(n, dtype=torch.float64)[None, :] * freq[:, None]
        first, second = (torch.cos(a), torch.sin(a)) if cos_first else (torch.sin(a), torch.cos(a))
        if blocks:
            return torch.cat([first, second], 0)
        return torch.stack([first, second], 1).reshape(half, n)

    cols, rows = one_axis(width), one_axis(height)
    x_part = cols[:, None, :].expand(-1, height, -1)
    y_part = rows[:, :, None].expand(-1, -1, width)
    parts = [y_part, x_part] if swap_axes else [x_part, y_part]
    return torch.cat(parts, 0).float()


def check_positional_encoding(positional_encoding: Callable, raise_on_fail: bool | None = None) -> bool:
    """Check ``positional_encoding(channels, height, width) -> [channels, height, width]`` float32, CFLOW's condition.

    The expected values come from :func:`vadlab.nn.flows.positional_encoding_2d`: the first half of the channels
    encodes the column, the second half the row, each as interleaved ``sin(pos w_k), cos(pos w_k)`` with
    ``w_k = 10000^(-2k / (channels / 2))``.
    """
    f = torch.tensor([0.0, 1.0, 2.0])
    known = torch.stack([torch.sin(f), torch.cos(f), torch.zeros(3), torch.ones(3)])[:, None, :]  # [4, 1, 3]
    cases = [
        _Case("P = 4 on a 1 x 3 row: one frequency (w = 1), sin/cos of the column, row 0 gives (0, 1)",
              {"channels": 4, "height": 1, "width": 3}, {"pe": known, "dtype is float32": 1.0}),
        _Case("P = 8 on a 3 x 5 grid (not square: rows and columns differ)", {"channels": 8, "height": 3, "width": 5}),
        _Case("P = 12 (3 frequencies per axis) on a 2 x 7 grid", {"channels": 12, "height": 2, "width": 7}),
        _Case("P = 64 on a 16 x 16 grid (the CPU preset's condition width)",
              {"channels": 64, "height": 16, "width": 16}),
    ]
    mistakes = [
        _Mistake(lambda p, h, w: _pe_variant(p, h, w, swap_axes=True),
                 "the axes are swapped: the first half of the channels encodes the column (x, along the width), "
                 "the second half the row (y)"),
        _Mistake(lambda p, h, w: _pe_variant(p, h, w, freq_over=p),
                 "the frequencies are those of one axis' P/2 channels: w_k = 10000^(-2k / (P/2)), not 10000^(-2k / P)"),
        _Mistake(lambda p, h, w: _pe_variant(p, h, w, blocks=True),
                 "sin and cos are interleaved within each half (channel 0 sin, 1 cos, 2 sin, ...), not two blocks"),
        _Mistake(lambda p, h, w: _pe_variant(p, h, w, cos_first=True),
                 "the even channels hold the sines and the odd ones the cosines (at position 0: 0, 1, 0, 1, ...)"),
    ]
    hints = ["shape [P, H, W]: channels first, like one feature map; return float32",
             "positions are the integer indices 0..W-1 (columns) and 0..H-1 (rows), not normalised",
             "each half has P/4 frequencies w_k = 10000^(-2k / (P/2)), k = 0, 1, ..., P/4 - 1"]
    return _run_check("check_positional_encoding", "positional_encoding", _run_positional_encoding,
                      (positional_encoding,), (_ref_positional_encoding,), cases,
                      {"pe": (1e-5, 1e-5), "dtype is float32": (0.0, 0.0)}, mistakes, hints, raise_on_fail)
