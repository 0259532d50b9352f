"""The DMAD lab: vector quantisation with the straight-through estimator (``check_quantize``), and the split of
what a reconstruction must explain into a deformation and a residual term (``check_dmad_score``)."""

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


# ----------------------------------------------------------------------------- deformation and residual


def _ref_dmad_score(x, reconstruction, fields, alpha, blur):
    """The PDM score of :meth:`vadlab.methods.dmad.DMAD.predict` (``normalize=False``): smoothed A_rec and A_df
    maps and ``max A_rec + alpha max A_df`` per image."""
    from vadlab.nn.warp import magnitude

    a_rec = blur((x - reconstruction).pow(2).mean(1))
    a_df = blur(sum(magnitude(o) for o in fields))
    return a_rec, a_df, a_rec.flatten(1).amax(1) + alpha * a_df.flatten(1).amax(1)


def _run_dmad_score(fn, x, reconstruction, fields, alpha, blur):
    out = _call(fn, x, reconstruction, [o.clone() for o in fields], alpha, blur)
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise TypeError(f"dmad_score must return (a_rec, a_df, scores), got {type(out).__name__}")
    return {"a_rec": out[0], "a_df": out[1], "scores": out[2]}


def _score_variant(x, reconstruction, fields, alpha, blur, residual="squared", channels="mean", field_norm="l2",
                   sum_first=False, combined_max=False, alpha_on_rec=False, smooth=True):
    """The score with one switch per typical mistake (the defaults give the right one)."""
    blur = blur if smooth else (lambda m: m)
    diff = x - reconstruction
    err = diff.pow(2) if residual == "squared" else diff.abs()
    a_rec = blur(err.mean(1) if channels == "mean" else err.sum(1))

    def length(o):
        if field_norm == "l1":
            return o.abs().sum(1)
        if field_norm == "squared":
            return o.pow(2).sum(1)
        return (o.pow(2).sum(1) + 1e-12).sqrt()

    a_df = blur(length(sum(fields)) if sum_first else sum(length(o) for o in fields))
    if combined_max:
        scores = (a_rec + alpha * a_df).flatten(1).amax(1)
    elif alpha_on_rec:
        scores = alpha * a_rec.flatten(1).amax(1) + a_df.flatten(1).amax(1)
    else:
        scores = a_rec.flatten(1).amax(1) + alpha * a_df.flatten(1).amax(1)
    return a_rec, a_df, scores


def check_dmad_score(dmad_score: Callable, raise_on_fail: bool | None = None) -> bool:
    """Check ``dmad_score(x, reconstruction, fields, alpha, blur) -> (a_rec [B,H,W], a_df [B,H,W], scores [B])``.

    ``a_rec = blur(mean over channels of (x - reconstruction)^2)``, ``a_df = blur(sum_k |O_k|)`` (per-pixel
    Euclidean length of each field, in pixels) and ``scores = max a_rec + alpha max a_df`` per image: the score of
    :meth:`vadlab.methods.dmad.DMAD.predict` without the training-set normalisation (``normalize=False``).
    """
    from vadlab.nn.filters import gaussian_blur

    f64 = torch.float64
    ident = lambda m: m  # noqa: E731 - no smoothing, for the known answers
    smooth = lambda m: gaussian_blur(m, 1.5)  # noqa: E731
    x = torch.rand(2, 3, 12, 12, generator=_gen(61), dtype=f64)
    zero = torch.zeros(2, 2, 12, 12, dtype=f64)
    shift = zero.clone()
    shift[:, 0], shift[:, 1] = 3.0, 4.0  # a translation by (3, 4) px: length 5 everywhere
    right, left = zero.clone(), zero.clone()
    right[:, 0], left[:, 0] = 2.0, -2.0
    spot = x.clone()
    spot[0, 0, 5, 7] -= 0.6  # one pixel of one colour channel off by 0.6
    rec_known = torch.zeros(2, 12, 12, dtype=f64)
    rec_known[0, 5, 7] = 0.36 / 3
    # random: the residual and the deformation peak at different places
    rec_rand = x + 0.05 * torch.randn(x.shape, generator=_gen(62), dtype=f64)
    rec_rand[:, :, 2:4, 2:4] += 0.5
    o1 = torch.randn(2, 2, 12, 12, generator=_gen(63), dtype=f64)
    o1[:, :, 8:11, 8:11] += 3.0
    o2 = 0.5 * torch.randn(2, 2, 12, 12, generator=_gen(64), dtype=f64)
    x3 = torch.rand(3, 3, 10, 14, generator=_gen(65), dtype=f64)
    rec3 = x3 + 0.2 * torch.randn(x3.shape, generator=_gen(66), dtype=f64)
    o3 = [torch.randn(3, 2, 10, 14, generator=_gen(67 + k), dtype=f64) for k in range(3)]
    cases = [
        _Case("perfect reconstruction, zero field: both terms 0",
              {"x": x, "reconstruction": x, "fields": [zero], "alpha": 0.05, "blur": ident},
              {"a_rec": torch.zeros(2, 12, 12, dtype=f64), "a_df": torch.zeros(2, 12, 12, dtype=f64),
               "scores": torch.zeros(2, dtype=f64)}),
        _Case("a translation by (3, 4) px and no residual: |O| = 5 everywhere, score = alpha * 5",
              {"x": x, "reconstruction": x, "fields": [shift], "alpha": 0.05, "blur": ident},
              {"a_df": torch.full((2, 12, 12), 5.0, dtype=f64), "scores": torch.full((2,), 0.25, dtype=f64)}),
        _Case("two heads moving by (+2, 0) and (-2, 0) px: the lengths add up to 4",
              {"x": x, "reconstruction": x, "fields": [right, left], "alpha": 1.0, "blur": ident},
              {"a_df": torch.full((2, 12, 12), 4.0, dtype=f64), "scores": torch.full((2,), 4.0, dtype=f64)}),
        _Case("one pixel of the red channel off by 0.6: A_rec there = 0.6^2 / 3 channels",
              {"x": x, "reconstruction": spot, "fields": [zero], "alpha": 0.05, "blur": ident},
              {"a_rec": rec_known, "scores": torch.tensor([0.12, 0.0], dtype=f64)}),
        _Case("random maps, Gaussian blur (sigma 1.5): residual and deformation peak at different places",
              {"x": x, "reconstruction": rec_rand, "fields": [o1, o2], "alpha": 0.05, "blur": smooth}),
        _Case("3 images 10 x 14, three heads, alpha 2, Gaussian blur",
              {"x": x3, "reconstruction": rec3, "fields": o3, "alpha": 2.0, "blur": smooth}),
    ]
    mistakes = [
        _Mistake(lambda *a: _score_variant(*a, residual="abs"),
                 "A_rec is DMAD's Dis, the *squared* error (x - reconstruction)^2, not the absolute error"),
        _Mistake(lambda *a: _score_variant(*a, channels="sum"),
                 "A_rec averages the squared error over the colour channels (mean over dim 1), it does not sum it"),
        _Mistake(lambda *a: _score_variant(*a, sum_first=True),
                 "A_df sums the lengths of the K fields, sum_k |O_k|, not the length of their sum: two heads that "
                 "move in opposite directions both cost deformation"),
        _Mistake(lambda *a: _score_variant(*a, field_norm="l1"),
                 "the length of a field at a pixel is the Euclidean norm sqrt(dx^2 + dy^2), not |dx| + |dy|"),
        _Mistake(lambda *a: _score_variant(*a, field_norm="squared"),
                 "the length of a field at a pixel is sqrt(dx^2 + dy^2) (in pixels): the square root is missing"),
        _Mistake(lambda *a: _score_variant(*a, combined_max=True),
                 "the image score adds the two maxima, max A_rec + alpha max A_df: the residual and the deformation "
                 "may peak at different places, so do not take the maximum of the combined map"),
        _Mistake(lambda *a: _score_variant(*a, alpha_on_rec=True),
                 "alpha weighs the deformation term: max A_rec + alpha max A_df"),
        _Mistake(lambda *a: _score_variant(*a, smooth=False),
                 "smooth both maps with `blur` (DMAD's Gaussian k) and return the smoothed maps; take the maxima after"),
    ]
    hints = ["x, reconstruction: [B, 3, H, W]; each field: [B, 2, H, W], (dx, dy) in pixels; the maps are [B, H, W]",
             "a_rec = blur(squared error averaged over channels); a_df = blur(sum over fields of the per-pixel length)",
             "scores has one value per image [B]: reduce over H and W only"]
    tol = (1e-6, 1e-5)  # the package's |O| adds 1e-12 under the square root (smooth at 0)
    return _run_check("check_dmad_score", "dmad_score", _run_dmad_score, (dmad_score,), (_ref_dmad_score,), cases,
                      {"a_rec": tol, "a_df": tol, "scores": tol}, mistakes, hints, raise_on_fail)
