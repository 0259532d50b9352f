"""The flows lab: affine coupling forward, inverse and log-determinant (``check_affine_coupling``)."""

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
