"""The DMAD lab: vector quantisation with the straight-through estimator (``check_quantize``)."""

from __future__ import annotations

from typing import Callable

import torch

from ._common import _Case, _Mistake, _call, _gen, _run_check


def _ref_quantize(z_e: torch.Tensor, memory: torch.Tensor, beta: float):
    from vadlab.nn.vq import VectorQuantizer

    with torch.random.fork_rng():  # its random initial memory must not move the student's global RNG
        vq = VectorQuantizer(memory.shape[0], memory.shape[1], beta=beta)
    del vq.memory  # use the caller's tensor itself (not a Parameter copy), so gradients reach it
    vq.memory = memory
    out = vq(z_e)
    return out.z_q, out.loss, out.indices


def _run_quantize(fn, z_e, memory, beta, upstream):
    z_e = z_e.clone().requires_grad_(True)
    memory = memory.clone().requires_grad_(True)
    out = _call(fn, z_e, memory, beta)
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise TypeError(f"quantize must return (z_st, loss, indices), got {type(out).__name__}")
    z_st, loss, indices = out
    objective = (z_st * upstream).sum() + loss
    g_z, g_m = torch.autograd.grad(objective, (z_e, memory), allow_unused=True)
    g_z = torch.zeros_like(z_e) if g_z is None else g_z
    g_m = torch.zeros_like(memory) if g_m is None else g_m
    return {"z_st": z_st.detach(), "loss": loss.detach(), "indices": indices,
            "grad z_e": g_z, "grad memory": g_m}


def _quantize_parts(z_e, memory):
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])
    idx = torch.cdist(flat.detach(), memory.detach()).argmin(1).view(z_e.shape[0], *z_e.shape[2:])
    return memory[idx].permute(0, 3, 1, 2), idx


def _vq_sg_swapped(z_e, memory, beta):
    z_q, idx = _quantize_parts(z_e, memory)
    loss = (z_e - z_q.detach()).pow(2).mean() + beta * (z_e.detach() - z_q).pow(2).mean()
    return z_e + (z_q - z_e).detach(), loss, idx


def _vq_no_straight_through(z_e, memory, beta):
    z_q, idx = _quantize_parts(z_e, memory)
    loss = (z_e.detach() - z_q).pow(2).mean() + beta * (z_e - z_q.detach()).pow(2).mean()
    return z_q, loss, idx


def _vq_reshape(z_e, memory, beta):
    b, d, h, w = z_e.shape
    flat = z_e.reshape(-1, d)
    idx = torch.cdist(flat.detach(), memory.detach()).argmin(1).view(b, h, w)
    z_q = memory[idx].permute(0, 3, 1, 2)
    loss = (z_e.detach() - z_q).pow(2).mean() + beta * (z_e - z_q.detach()).pow(2).mean()
    return z_e + (z_q - z_e).detach(), loss, idx


def _vq_no_detach_in_st(z_e, memory, beta):
    z_q, idx = _quantize_parts(z_e, memory)
    loss = (z_e.detach() - z_q).pow(2).mean() + beta * (z_e - z_q.detach()).pow(2).mean()
    return z_q + (z_e - z_e.detach()), loss, idx


def check_quantize(quantize: Callable, raise_on_fail: bool | None = None) -> bool:
    """Check ``quantize(z_e [B,D,H,W], memory [N,D], beta) -> (z_st, loss, indices [B,H,W])``, values and gradients.

    The gradients are those of ``(z_st * G).sum() + loss`` for a fixed random upstream gradient ``G``, with
    respect to ``z_e`` and to ``memory``; the reference is :class:`vadlab.nn.vq.VectorQuantizer`.
    """
    f64 = torch.float64
    mem = torch.randn(5, 3, generator=_gen(41), dtype=f64)
    z = torch.randn(2, 3, 2, 4, generator=_gen(42), dtype=f64)
    g = torch.randn(2, 3, 2, 4, generator=_gen(43), dtype=f64)
    exact_idx = torch.tensor([[[4, 0], [2, 2]]])
    z_exact = mem[exact_idx].permute(0, 3, 1, 2).clone()
    g_exact = torch.randn(z_exact.shape, generator=_gen(44), dtype=f64)
    dup = torch.cat([mem[:2], mem[1:2], mem[2:]])  # items 1 and 2 are identical
    one = mem[:1].clone()
    cases = [
        _Case("one memory item: everything maps to it",
              {"z_e": z, "memory": one, "beta": 0.25, "upstream": g},
              {"indices": torch.zeros(2, 2, 4, dtype=torch.long), "z_st": one[0].view(1, 3, 1, 1).expand(2, 3, 2, 4)}),
        _Case("z_e made of memory items: indices known, loss 0, gradient to z_e = upstream",
              {"z_e": z_exact, "memory": mem, "beta": 0.25, "upstream": g_exact},
              {"indices": exact_idx, "z_st": z_exact, "loss": torch.zeros((), dtype=f64), "grad z_e": g_exact}),
        _Case("random cube [2, 3, 2, 4], 5 items, beta 0.25", {"z_e": z, "memory": mem, "beta": 0.25, "upstream": g}),
        _Case("two identical memory items (ties: lowest index), beta 1", {"z_e": z, "memory": dup, "beta": 1.0, "upstream": g}),
    ]
    mistakes = [
        _Mistake(_vq_sg_swapped, "the stop-gradients of the loss are on the wrong sides: the first term "
                                 "||SG(z_e) - z_q||^2 moves the memory, the beta term ||z_e - SG(z_q)||^2 moves the encoder"),
        _Mistake(_vq_no_straight_through, "no straight-through gradient: return z_e + SG(z_q - z_e), whose value is z_q "
                                          "but whose gradient passes to z_e unchanged"),
        _Mistake(_vq_no_detach_in_st, "the straight-through output must not pass the decoder's gradient to the memory: "
                                      "write it as z_e + SG(z_q - z_e)"),
        _Mistake(_vq_reshape, "z_e is [B, D, H, W]: put D last with permute(0, 2, 3, 1) before flattening to "
                              "[B*H*W, D]; reshape mixes features and positions"),
    ]
    hints = ["nearest item in L2 per position (torch.cdist + argmin); indices are [B, H, W]",
             "the loss uses means over all entries (F.mse_loss), with beta on the commitment term",
             "SG(.) is .detach()"]
    tol = (1e-6, 1e-9)
    return _run_check("check_quantize", "quantize", _run_quantize, (quantize,), (_ref_quantize,), cases,
                      {k: tol for k in ("z_st", "loss", "grad z_e", "grad memory")}, mistakes, hints, raise_on_fail,
                      exact=("indices",))
