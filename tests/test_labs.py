"""Course labs: the checks of vadlab.labs accept the package's implementation, reject plausible wrong ones
with a helpful message, and the student edition empties exactly the solution code.

Each wrong implementation below is written the way a student might write it (not taken from vadlab.labs), and
the test asserts both the verdict (False) and that the report points at the mistake.
"""

from __future__ import annotations

from pathlib import Path

import jupytext
import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.stats import rankdata

from vadlab import labs

ROOT = Path(__file__).resolve().parents[1]
LAB_DIR = ROOT / "book" / "labs"
EXERCISES = ["auroc", "aupro", "mahalanobis_map", "greedy_coreset", "affine_coupling", "positional_encoding", "ssim_map",
             "quantize", "dmad_score", "ddim_step", "guided_eps", "semi_orthogonal", "mkd_loss"]


def _check(name: str, *fns, **kwargs) -> bool:
    return getattr(labs, f"check_{name}")(*fns, **kwargs)


def _verdict(capsys, name: str, *fns) -> tuple[bool, str]:
    ok = _check(name, *fns, raise_on_fail=False)
    return ok, capsys.readouterr().out


# ------------------------------------------------------------------------------------------ package passes


@pytest.mark.parametrize("name", EXERCISES)
def test_reference_passes(capsys, name):
    ref = labs.reference(name)
    fns = ref if isinstance(ref, tuple) else (ref,)
    assert _check(name, *fns, raise_on_fail=True)
    out = capsys.readouterr().out
    assert "cases pass. Well done!" in out and "FAIL" not in out


def test_known_answers_of_the_coreset_cases_match_brute_force():
    """The hand-written expected sequences are the farthest-point sequences (exact arithmetic)."""
    def brute(points, n, start):
        chosen = [start]
        d = [abs(complex(*p) - complex(*points[start])) if len(p) == 2 else abs(p[0] - points[start][0]) for p in points]
        while len(chosen) < n:
            nxt = max(range(len(points)), key=lambda i: (d[i], -i))
            chosen.append(nxt)
            d = [min(d[i], abs(complex(*points[i]) - complex(*points[nxt])) if len(points[i]) == 2
                     else abs(points[i][0] - points[nxt][0])) for i in range(len(points))]
        return chosen

    assert brute([(0,), (1,), (2,), (10,), (11.5,)], 4, 0) == [0, 4, 2, 3]
    assert brute([(0, 0), (5, 0), (5, 0), (0, 1)], 3, 0) == [0, 1, 3]
    assert brute([(0, 0), (4, 0), (0, 3), (4, 3), (1, 1)], 5, 4) == [4, 3, 1, 2, 0]


# ------------------------------------------------------------------------------------------ metrics


def auroc_ordinal(labels, scores):  # ties broken by position
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1)
    n1, n0 = labels.sum(), len(labels) - labels.sum()
    return (ranks[labels == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


def auroc_no_offset(labels, scores):
    r = rankdata(scores)
    n1, n0 = labels.sum(), len(labels) - labels.sum()
    return r[labels == 1].sum() / (n1 * n0)


@pytest.mark.parametrize("wrong, words", [(auroc_ordinal, "average rank"), (auroc_no_offset, "n_pos (n_pos + 1) / 2")])
def test_auroc_rejects(capsys, wrong, words):
    ok, out = _verdict(capsys, "auroc", wrong)
    assert not ok and "FAIL" in out and words in out


def _aupro_student(masks, maps, fpr_limit, connectivity=8, per_region=True, normalise=True):
    """A threshold-by-threshold AUPRO as a student writes it, with switches for the typical mistakes."""
    structure = np.ones((3, 3)) if connectivity == 8 else None
    regions = [ndimage.label(m, structure=structure)[0] for m in masks]
    normal = ~masks
    pts = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fpr = (pred & normal).sum() / normal.sum()
        if per_region:
            overlaps = [(pred[i][r == k]).mean() for i, r in enumerate(regions) for k in range(1, r.max() + 1)]
            pro = float(np.mean(overlaps))
        else:
            pro = (pred & masks).sum() / masks.sum()
        pts.append((fpr, pro))
    x, y = np.array(pts).T
    keep = np.searchsorted(x, fpr_limit, side="right")
    area = np.trapezoid(y[:keep], x[:keep])
    if x[keep - 1] < fpr_limit:
        y_at = np.interp(fpr_limit, x, y)
        area += 0.5 * (y[keep - 1] + y_at) * (fpr_limit - x[keep - 1])
    return area / fpr_limit if normalise else area


def test_aupro_student_style_correct_version_passes(capsys):
    """The student-style loop (with no mistake switched on) is right: the wrong ones below differ by one switch."""
    ok, out = _verdict(capsys, "aupro", _aupro_student)
    assert ok, out


@pytest.mark.parametrize("kwargs, words", [
    ({"connectivity": 4}, "8-connectivity"),
    ({"per_region": False}, "per connected region"),
    ({"normalise": False}, "divide the area by fpr_limit"),
])
def test_aupro_rejects(capsys, kwargs, words):
    ok, out = _verdict(capsys, "aupro", lambda m, s, f: _aupro_student(m, s, f, **kwargs))
    assert not ok and words in out


# ------------------------------------------------------------------------------------------ PaDiM


def maha_squared(x, mean, precision):
    d = x.permute(0, 2, 3, 1) - mean
    return torch.einsum("bhwi,hwij,bhwj->bhw", d, precision, d)


def maha_reshape(x, mean, precision):
    d = x.reshape(x.shape[0], x.shape[2], x.shape[3], x.shape[1]) - mean
    return torch.einsum("bhwi,hwij,bhwj->bhw", d, precision, d).clamp_min(0).sqrt()


def maha_inverts(x, mean, precision):
    d = x.permute(0, 2, 3, 1) - mean
    return torch.einsum("bhwi,hwij,bhwj->bhw", d, torch.linalg.inv(precision), d).clamp_min(0).sqrt()


@pytest.mark.parametrize("wrong, words", [(maha_squared, "squared distances"), (maha_reshape, "permute(0, 2, 3, 1)"),
                                          (maha_inverts, "do not invert it again")])
def test_mahalanobis_rejects(capsys, wrong, words):
    ok, out = _verdict(capsys, "mahalanobis_map", wrong)
    assert not ok and words in out and "differs at index" in out


# ------------------------------------------------------------------------------------------ PatchCore


def coreset_last_centre(features, n_select, start=0):
    out = [start]
    while len(out) < n_select:
        out.append(int(torch.cdist(features, features[out[-1:]]).squeeze(1).argmax()))
    return torch.tensor(out)


def coreset_argmin(features, n_select, start=0):
    dist = torch.cdist(features, features[[start]]).squeeze(1)
    out = [start]
    while len(out) < n_select:
        dist[out] = float("inf")
        nxt = int(dist.argmin())
        out.append(nxt)
        dist = torch.minimum(dist, torch.cdist(features, features[[nxt]]).squeeze(1))
    return torch.tensor(out)


def coreset_off_by_one(features, n_select, start=0):
    dist = torch.cdist(features, features[[start]]).squeeze(1)
    out = []
    for _ in range(n_select):  # forgets that the start point is already the first centre
        nxt = int(dist.argmax())
        out.append(nxt)
        dist = torch.minimum(dist, torch.cdist(features, features[[nxt]]).squeeze(1))
    return torch.tensor(out)


@pytest.mark.parametrize("wrong, words", [(coreset_last_centre, "*nearest* chosen centre"),
                                          (coreset_argmin, "differs at index"),
                                          (coreset_off_by_one, "differs at index (0,)")])
def test_coreset_rejects(capsys, wrong, words):
    ok, out = _verdict(capsys, "greedy_coreset", wrong)
    assert not ok and words in out


# ------------------------------------------------------------------------------------------ flows


def coupling_forward(x, st_net):
    k = x.shape[1] - x.shape[1] // 2
    s, t = st_net(x[:, :k])
    return torch.cat([x[:, :k], x[:, k:] * torch.exp(s) + t], 1), s.flatten(1).sum(1)


def coupling_inverse(y, st_net):
    k = y.shape[1] - y.shape[1] // 2
    s, t = st_net(y[:, :k])
    return torch.cat([y[:, :k], (y[:, k:] - t) * torch.exp(-s)], 1)


def forward_no_logdet(x, st_net):
    return coupling_forward(x, st_net)[0], torch.zeros(x.shape[0], dtype=x.dtype)


def forward_split_half(x, st_net):  # the first D // 2 channels: wrong for odd D
    k = x.shape[1] // 2
    s, t = st_net(x[:, :k])
    return torch.cat([x[:, :k], x[:, k:] * torch.exp(s) + t], 1), s.flatten(1).sum(1)


def inverse_wrong_order(y, st_net):
    k = y.shape[1] - y.shape[1] // 2
    s, t = st_net(y[:, :k])
    return torch.cat([y[:, :k], y[:, k:] * torch.exp(-s) - t], 1)


def forward_logdet_batch(x, st_net):
    return coupling_forward(x, st_net)[0], coupling_forward(x, st_net)[1].sum()


def test_coupling_student_style_passes(capsys):
    ok, out = _verdict(capsys, "affine_coupling", coupling_forward, coupling_inverse)
    assert ok, out


@pytest.mark.parametrize("fwd, inv, words", [
    (forward_no_logdet, coupling_inverse, "log-det is missing"),
    (forward_split_half, coupling_inverse, "first 3 channels"),
    (coupling_forward, inverse_wrong_order, "first subtract t"),
    (forward_logdet_batch, coupling_inverse, "one number per sample"),
])
def test_coupling_rejects(capsys, fwd, inv, words):
    ok, out = _verdict(capsys, "affine_coupling", fwd, inv)
    assert not ok and words in out


def pe_student(channels, height, width, rows_first=False, freq_per_channel=False, sin_then_cos=False,
               cos_first=False):
    """CFLOW's positional encoding written entry by entry, with switches for the typical mistakes."""
    import math

    pe = torch.zeros(channels, height, width)
    half = channels // 2
    for k in range(half // 2):
        w = 1.0 / 10000 ** (2 * k / (channels if freq_per_channel else half))
        for axis, n in ((0, width), (1, height)):
            first = 1 - axis if rows_first else axis  # which half of the channels encodes this axis
            for pos in range(n):
                a, b = math.sin(pos * w), math.cos(pos * w)
                if cos_first:
                    a, b = b, a
                c0 = first * half + (k if sin_then_cos else 2 * k)
                c1 = first * half + (half // 2 + k if sin_then_cos else 2 * k + 1)
                if axis == 0:  # columns
                    pe[c0, :, pos], pe[c1, :, pos] = a, b
                else:  # rows
                    pe[c0, pos, :], pe[c1, pos, :] = a, b
    return pe


def test_positional_encoding_student_style_passes(capsys):
    ok, out = _verdict(capsys, "positional_encoding", pe_student)
    assert ok, out


@pytest.mark.parametrize("kwargs, words", [({"rows_first": True}, "the axes are swapped"),
                                           ({"freq_per_channel": True}, "not 10000^(-2k / P)"),
                                           ({"sin_then_cos": True}, "interleaved within each half"),
                                           ({"cos_first": True}, "even channels hold the sines")])
def test_positional_encoding_rejects(capsys, kwargs, words):
    ok, out = _verdict(capsys, "positional_encoding", lambda p, h, w: pe_student(p, h, w, **kwargs))
    assert not ok and words in out and "FAIL" in out


def test_positional_encoding_rejects_float64_and_channels_last(capsys):
    ok, out = _verdict(capsys, "positional_encoding", lambda p, h, w: pe_student(p, h, w).double())
    assert not ok and "`dtype is float32` = 0" in out
    ok, out = _verdict(capsys, "positional_encoding", lambda p, h, w: pe_student(p, h, w).permute(1, 2, 0))
    assert not ok and "has shape [3, 5, 8], expected [8, 3, 5]" in out


def test_positional_encoding_reference_is_cflows_condition():
    """The check's reference is the encoding CFlow.condition flattens into one row per fiber."""
    from vadlab.methods.cflow import CFlow

    model = CFlow(weights="random", condition_channels=12)
    torch.testing.assert_close(labs.reference("positional_encoding")(12, 3, 5).flatten(1).T, model.condition(3, 5))


# ------------------------------------------------------------------------------------------ SSIM


def ssim_student(x, y, blur, data_range=1.0, centred=True, k_squared=True):
    c1 = (0.01 * data_range) ** 2 if k_squared else 0.01 * data_range
    c2 = (0.03 * data_range) ** 2 if k_squared else 0.03 * data_range
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x), blur(y * y), blur(x * y)
    if centred:
        sxx, syy, sxy = sxx - mx ** 2, syy - my ** 2, sxy - mx * my
    return (2 * mx * my + c1) * (2 * sxy + c2) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))


def test_ssim_student_style_passes(capsys):
    ok, out = _verdict(capsys, "ssim_map", ssim_student)
    assert ok, out


@pytest.mark.parametrize("kwargs, words", [({"centred": False}, "centred moments"),
                                           ({"k_squared": False}, "constants are squared")])
def test_ssim_rejects(capsys, kwargs, words):
    ok, out = _verdict(capsys, "ssim_map", lambda x, y, b, L=1.0: ssim_student(x, y, b, L, **kwargs))
    assert not ok and words in out


def test_ssim_rejects_hardcoded_range(capsys):
    ok, out = _verdict(capsys, "ssim_map", lambda x, y, b, L=1.0: ssim_student(x, y, b, 1.0))
    assert not ok and "data_range" in out and "0..255 scale" in out


# ------------------------------------------------------------------------------------------ VQ


def quantize_student(z_e, memory, beta, swap_sg=False, straight_through=True):
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])
    idx = ((flat[:, None, :] - memory[None]) ** 2).sum(-1).argmin(1).view(z_e.shape[0], *z_e.shape[2:])
    z_q = memory[idx].permute(0, 3, 1, 2)
    if swap_sg:
        loss = torch.mean((z_e - z_q.detach()) ** 2) + beta * torch.mean((z_e.detach() - z_q) ** 2)
    else:
        loss = torch.mean((z_e.detach() - z_q) ** 2) + beta * torch.mean((z_e - z_q.detach()) ** 2)
    z_st = z_e + (z_q - z_e).detach() if straight_through else z_q
    return z_st, loss, idx


def test_quantize_student_style_passes(capsys):
    ok, out = _verdict(capsys, "quantize", quantize_student)
    assert ok, out


@pytest.mark.parametrize("kwargs, words", [({"swap_sg": True}, "stop-gradients of the loss are on the wrong sides"),
                                           ({"straight_through": False}, "no straight-through gradient")])
def test_quantize_rejects(capsys, kwargs, words):
    ok, out = _verdict(capsys, "quantize", lambda z, m, b: quantize_student(z, m, b, **kwargs))
    assert not ok and words in out and "grad" in out


# ------------------------------------------------------------------------------------------ DMAD score


def dmad_score_student(x, rec, fields, alpha, blur, abs_error=False, channel_sum=False, length_of_sum=False,
                       manhattan=False, max_of_map=False, smooth=True):
    err = (x - rec).abs() if abs_error else (x - rec) ** 2
    a_rec = err.sum(dim=1) if channel_sum else err.mean(dim=1)
    if length_of_sum:
        total = torch.stack(fields).sum(0)
        a_df = total.abs().sum(1) if manhattan else torch.linalg.vector_norm(total, dim=1)
    else:
        a_df = sum(f.abs().sum(1) if manhattan else torch.linalg.vector_norm(f, dim=1) for f in fields)
    if smooth:
        a_rec, a_df = blur(a_rec), blur(a_df)
    if max_of_map:
        scores = (a_rec + alpha * a_df).amax(dim=(1, 2))
    else:
        scores = a_rec.amax(dim=(1, 2)) + alpha * a_df.amax(dim=(1, 2))
    return a_rec, a_df, scores


def test_dmad_score_student_style_passes(capsys):
    ok, out = _verdict(capsys, "dmad_score", dmad_score_student)
    assert ok, out


@pytest.mark.parametrize("kwargs, words", [({"abs_error": True}, "*squared* error"),
                                           ({"channel_sum": True}, "averages the squared error over the colour"),
                                           ({"length_of_sum": True}, "not the length of their sum"),
                                           ({"manhattan": True}, "not |dx| + |dy|"),
                                           ({"max_of_map": True}, "adds the two maxima"),
                                           ({"smooth": False}, "smooth both maps with `blur`")])
def test_dmad_score_rejects(capsys, kwargs, words):
    ok, out = _verdict(capsys, "dmad_score", lambda *a: dmad_score_student(*a, **kwargs))
    assert not ok and words in out and "FAIL" in out


def test_dmad_score_rejects_a_batch_max(capsys):
    def batch_max(x, rec, fields, alpha, blur):
        a_rec, a_df, _ = dmad_score_student(x, rec, fields, alpha, blur)
        return a_rec, a_df, a_rec.max() + alpha * a_df.max()

    ok, out = _verdict(capsys, "dmad_score", batch_max)
    assert not ok and "`scores` has shape [], expected [2]" in out


def test_dmad_score_reference_is_the_package_score():
    """The check's reference gives DMAD.inspect's scores (normalize=False) from the model's own reconstruction and
    fields, with the model's Gaussian as the blur."""
    from vadlab.methods.dmad import DMAD
    from vadlab.nn.filters import gaussian_blur, sigma_for

    model = DMAD(image_size=32, channels=(8, 16), latent_dim=8, n_memory=8, estimator_channels=8, normalize=False)
    with torch.no_grad():  # non-zero deformation heads, so that the fields are not all zero
        for head in model.estimator.heads:
            head.weight.copy_(0.3 * torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(5)))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    parts = model.inspect(x)
    assert min(float(f.abs().max()) for f in parts["fields"]) > 0.1
    sigma = sigma_for(model.config.sigma, 32)
    a_rec, a_df, scores = labs.reference("dmad_score")(x, parts["reconstructions"][-1], parts["fields"],
                                                      model.config.alpha, lambda m: gaussian_blur(m, sigma))
    torch.testing.assert_close(scores, parts["scores"])
    torch.testing.assert_close(a_rec + model.config.alpha * a_df, parts["maps"])


# ------------------------------------------------------------------------------------------ DDIM


def ddim_student(x_t, eps, t, t_next, alpha_bars, negative_index_bug=False, old_level=False):
    a = alpha_bars[t]
    a_next = alpha_bars[t_next] if (t_next >= 0 or negative_index_bug) else torch.tensor(1.0, dtype=alpha_bars.dtype)
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    return a_next.sqrt() * x0 + (1 - (a if old_level else a_next)).sqrt() * eps


def test_ddim_student_style_passes(capsys):
    ok, out = _verdict(capsys, "ddim_step", ddim_student)
    assert ok, out


@pytest.mark.parametrize("kwargs, words", [({"negative_index_bug": True}, "alpha_bars[-1]"),
                                           ({"old_level": True}, "*new* level")])
def test_ddim_rejects(capsys, kwargs, words):
    ok, out = _verdict(capsys, "ddim_step", lambda *a: ddim_student(*a, **kwargs))
    assert not ok and words in out


# ------------------------------------------------------------------------------------------ DiAD guidance


def guided_eps_student(denoiser, z_t, t, guidance, no_middle=False, no_skips=False, skips_reversed=False,
                       into_h=False, skip_first=False):
    h, feats, emb = denoiser.encode(z_t, t)
    g = guidance
    if g is not None and not no_middle:
        h = h + g.middle
    residuals = [] if g is None or no_skips else (g.skips[::-1] if skips_reversed else g.skips)
    n = len(feats)
    for i, block in enumerate(denoiser.decoder):
        skip = feats[n - 1 - i]
        if i < len(residuals):
            if into_h:
                h = h + residuals[i]
            else:
                skip = skip + residuals[i]
        x = torch.cat((skip, h), 1) if skip_first else torch.cat((h, skip), 1)
        h = block(x, emb)
    return denoiser.out(h)


def test_guided_eps_student_style_passes(capsys):
    ok, out = _verdict(capsys, "guided_eps", guided_eps_student)
    assert ok, out


@pytest.mark.parametrize("kwargs, words", [({"no_middle": True}, "the middle residual is missing"),
                                           ({"no_skips": True}, "the skip residuals are missing"),
                                           ({"skips_reversed": True}, "deepest first"),
                                           ({"into_h": True}, "not into h"),
                                           ({"skip_first": True}, "h first, then the skip feature")])
def test_guided_eps_rejects(capsys, kwargs, words):
    ok, out = _verdict(capsys, "guided_eps", lambda *a: guided_eps_student(*a, **kwargs))
    assert not ok and words in out and "FAIL" in out


def test_guided_eps_rejects_ignoring_the_guidance(capsys):
    ok, out = _verdict(capsys, "guided_eps", lambda d, z, t, g: d(z, t))
    assert not ok and "2 of 5 cases pass" in out and "Guidance(middle=tensor [2, 16, 4, 4] float32, skips=list of 2" in out


def test_guided_eps_reference_is_what_diad_reconstructs_with():
    """The check's reference is the noise prediction DiAD.eps uses: denoiser(z_t, t, sg(z_t, t, image))."""
    from vadlab.methods.diad import DiAD

    model = DiAD(ae_channels=4, ae_channel_mult=(1, 2), model_channels=8, channel_mult=(1, 2),
                 attention_resolutions=(), num_heads=1, hint_channels=(4, 8), weights="random")
    with torch.no_grad():  # non-zero guidance and output layers (they start at zero)
        for p in list(model.sg.parameters()) + list(model.denoiser.out.parameters()):
            if not p.any():
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    z, image, t = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([700, 20])
    with torch.no_grad():
        guided = labs.reference("guided_eps")(model.denoiser, z, t, model.sg(z, t, image))
        torch.testing.assert_close(guided, model.eps(z, t, image))
        torch.testing.assert_close(labs.reference("guided_eps")(model.denoiser, z, t, None), model.eps(z, t))
    assert not torch.allclose(guided, model.eps(z, t))


# ------------------------------------------------------------------------------------------ semi-orthogonal


def so_matrix_student(n_rows, n_cols, seed=0, sign_fix=True, float64_draw=True, check=True):
    if check and not 1 <= n_cols <= n_rows:
        raise ValueError("k must be between 1 and F")
    g = torch.Generator().manual_seed(seed)
    omega = torch.randn(n_rows, n_cols, generator=g, dtype=torch.float64 if float64_draw else torch.float32)
    q, r = torch.linalg.qr(omega)
    if sign_fix:
        q = q @ torch.diag(torch.sign(torch.diag(r)))
    return q.to(torch.float32)


def so_distance_student(x, mean, cov, W, ridge, invert_first=False, ridge_used=True, root=True):
    d = x - mean
    if invert_first:  # invert the F x F covariance, then project the precision
        prec = W.T @ torch.linalg.inv(cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype)) @ W
    else:
        prec = torch.linalg.inv(W.T @ cov @ W + (ridge if ridge_used else 0.0) * torch.eye(W.shape[1], dtype=cov.dtype))
    z = d @ W
    m2 = ((z @ prec) * z).sum(1)
    return m2.clamp_min(0).sqrt() if root else m2


def so_distance_via_projection(x, mean, cov, W, ridge):
    """Projecting with the F x F matrix W W^T gives the same numbers (at an F x F inverse's cost): accepted."""
    P = W @ W.T
    d = (x - mean) @ P
    prec = torch.linalg.inv(P @ cov @ P + ridge * torch.eye(cov.shape[0], dtype=cov.dtype))
    return ((d @ prec) * d).sum(1).clamp_min(0).sqrt()


def test_semi_orthogonal_student_style_passes(capsys):
    ok, out = _verdict(capsys, "semi_orthogonal", so_matrix_student, so_distance_student)
    assert ok, out
    ok, out = _verdict(capsys, "semi_orthogonal", so_matrix_student, so_distance_via_projection)
    assert ok, out


@pytest.mark.parametrize("matrix_kwargs, distance_kwargs, words", [
    ({"sign_fix": False}, {}, "sign of the matching diagonal entry of R"),
    ({"float64_draw": False}, {}, "in float64"),
    ({"check": False}, {}, "raise ValueError otherwise"),
    ({}, {"invert_first": True}, "project first, then invert"),
    ({}, {"ridge_used": False}, "add ridge * I"),
    ({}, {"root": False}, "squared distances"),
])
def test_semi_orthogonal_rejects(capsys, matrix_kwargs, distance_kwargs, words):
    ok, out = _verdict(capsys, "semi_orthogonal", lambda n, k, s=0: so_matrix_student(n, k, s, **matrix_kwargs),
                       lambda *a: so_distance_student(*a, **distance_kwargs))
    assert not ok and words in out and "FAIL" in out


def test_semi_orthogonal_rejects_a_gaussian_matrix(capsys):
    def gaussian(n_rows, n_cols, seed=0):
        if not 1 <= n_cols <= n_rows:
            raise ValueError("k")
        return torch.randn(n_rows, n_cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()

    ok, out = _verdict(capsys, "semi_orthogonal", gaussian, so_distance_student)
    assert not ok and "`W^T W` differs" in out and "orthonormalise it" in out


# ------------------------------------------------------------------------------------------ MKD


def mkd_student(student_feats, teacher_feats, lamda, per_position=False, lamda_on_direction=False, summed=False,
                average_layers=False):
    total = 0.0
    for c, t in zip(student_feats, teacher_feats):
        if per_position:  # cosine of the channel vectors at each position, averaged over positions
            direction = (1 - torch.nn.functional.cosine_similarity(c, t, dim=1)).flatten(1).mean(1)
        else:
            direction = 1 - torch.nn.functional.cosine_similarity(c.flatten(1), t.flatten(1), dim=1)
        sq = (c - t).pow(2).flatten(1)
        value = sq.sum(1) if summed else sq.mean(1)
        total = total + (lamda * direction + value if lamda_on_direction else direction + lamda * value)
    return total / len(student_feats) if average_layers else total


def test_mkd_student_style_passes(capsys):
    ok, out = _verdict(capsys, "mkd_loss", mkd_student)
    assert ok, out


@pytest.mark.parametrize("kwargs, words", [({"per_position": True}, "whole flattened maps"),
                                           ({"lamda_on_direction": True}, "lamda weighs the value"),
                                           ({"summed": True}, "*mean* of the squared differences"),
                                           ({"average_layers": True}, "summed over the layers")])
def test_mkd_rejects(capsys, kwargs, words):
    ok, out = _verdict(capsys, "mkd_loss", lambda s, t, lam: mkd_student(s, t, lam, **kwargs))
    assert not ok and words in out


def test_mkd_rejects_a_batch_mean(capsys):
    ok, out = _verdict(capsys, "mkd_loss", lambda s, t, lam: mkd_student(s, t, lam).mean())
    assert not ok and "has shape [], expected [2]" in out


def test_mkd_reference_is_the_package_loss():
    """The check's reference is MKD.loss_per_image itself, run on given feature maps."""
    from vadlab.methods.mkd import MKD

    model = MKD(image_size=64)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feats_s, feats_t = model.student(model.backbone.normalize(x)), model.teacher(x)
        torch.testing.assert_close(labs.reference("mkd_loss")(feats_s, feats_t, model.config.lamda),
                                   model.loss_per_image(x))


def test_a_report_with_feature_lists_stays_short(capsys):
    ok, out = _verdict(capsys, "mkd_loss", lambda s, t, lam: mkd_student(s, t, lam, summed=True))
    assert not ok and "list of 4: tensor [2, 8, 16, 16] float64" in out and len(out) < 20_000


# ------------------------------------------------------------------------------------------ behaviour


def test_not_implemented_is_reported_not_raised(capsys, monkeypatch):
    monkeypatch.delenv("VADLAB_LABS_STRICT", raising=False)

    def placeholder(*args):
        raise NotImplementedError("exercise: write your code here")

    assert labs.check_mahalanobis_map(placeholder) is False
    assert "not implemented yet" in capsys.readouterr().out
    monkeypatch.setenv("VADLAB_LABS_STRICT", "1")
    with pytest.raises(AssertionError, match="not implemented yet"):
        labs.check_mahalanobis_map(placeholder)


def test_crash_is_reported_with_the_case_and_inputs_are_kept(capsys):
    def crashes(x, mean, precision):
        return x @ mean  # shapes do not fit

    assert labs.check_mahalanobis_map(crashes, raise_on_fail=False) is False
    out = capsys.readouterr().out
    assert "your code raised RuntimeError" in out and "inputs: x=tensor [1, 3, 2, 2]" in out
    assert labs.last_failure.check == "check_mahalanobis_map"
    assert set(labs.last_failure.inputs) == {"x", "mean", "precision"}


def test_raise_on_fail_raises_with_the_report():
    with pytest.raises(AssertionError, match="squared distances"):
        labs.check_mahalanobis_map(maha_squared, raise_on_fail=True)


def test_checks_do_not_print_solution_code(capsys):
    """A failing report names the mistake but shows no code of the reference."""
    for name, fns in [("mahalanobis_map", (maha_squared,)), ("quantize", (quantize_student,)),
                      ("affine_coupling", (forward_no_logdet, coupling_inverse))]:
        _check(name, *fns, raise_on_fail=False)
    out = capsys.readouterr().out
    assert "def " not in out and "import " not in out and "vadlab.nn" not in out and "lambda" not in out


def test_wrong_shape_is_named(capsys):
    ok, out = _verdict(capsys, "mahalanobis_map", lambda x, m, p: maha_squared(x, m, p)[:, None])
    assert not ok and "has shape [1, 1, 2, 2], expected [1, 2, 2]" in out


def test_checks_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    for name in EXERCISES:
        ref = labs.reference(name)
        _check(name, *(ref if isinstance(ref, tuple) else (ref,)), raise_on_fail=True)
    assert torch.equal(before, torch.random.get_rng_state())


# ------------------------------------------------------------------------------------------ student edition

LAB = '''# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # A lab
# BEGIN SOLUTION in markdown text is just text

# %%
import numpy as np

# %% tags=["solution"]
def f(x):
    """Docstring stays."""
    # BEGIN SOLUTION
    y = x + 1
    return y
    # END SOLUTION

# %% tags=["solution"]
answer = 42
print(answer)

# %%
check(f)
'''


def test_student_version_replaces_exactly_the_solution_code():
    student = labs.student_version(LAB)
    src_nb, stu_nb = jupytext.reads(LAB, fmt="py:percent"), jupytext.reads(student, fmt="py:percent")
    assert len(src_nb.cells) == len(stu_nb.cells)
    for a, b in zip(src_nb.cells, stu_nb.cells):
        assert a.cell_type == b.cell_type and a.metadata == b.metadata
        if "solution" in a.metadata.get("tags", []):
            assert "raise NotImplementedError" in b.source and a.source != b.source
        else:
            assert a.source == b.source
    assert '    """Docstring stays."""\n    # YOUR CODE HERE\n    raise NotImplementedError(' in student
    assert "x + 1" not in student and "answer = 42" not in student and "END SOLUTION" not in student
    # the student code runs up to the check: f is defined and raises NotImplementedError when called
    ns: dict = {}
    exec(compile(stu_nb.cells[2].source, "<cell>", "exec"), ns)
    with pytest.raises(NotImplementedError):
        ns["f"](1)
    with pytest.raises(NotImplementedError):
        exec(compile(stu_nb.cells[3].source, "<cell>", "exec"), {})


@pytest.mark.parametrize("bad, words", [
    ("# %%\nx = 1\n# BEGIN SOLUTION\nx = 2\n# END SOLUTION\n", "not tagged solution"),
    ('# %% tags=["solution"]\n# BEGIN SOLUTION\nx = 2\n', "missing END SOLUTION"),
    ('# %% tags=["solution"]\nx = 2\n# END SOLUTION\n', "without a matching BEGIN"),
])
def test_student_version_rejects_bad_markers(bad, words):
    with pytest.raises(ValueError, match=words):
        labs.student_version(bad)


def test_the_labs_have_exercises_checks_goals_and_an_open_question():
    labs_found = sorted(LAB_DIR.glob("lab_*.py"))
    assert len(labs_found) == 9, labs_found
    checks_used = set()
    for path in labs_found:
        text = path.read_text()
        nb = jupytext.reads(text, fmt="py:percent")
        solution = [c for c in nb.cells if "solution" in c.metadata.get("tags", [])]
        assert solution, f"{path.name} has no cell tagged solution"
        assert "Learning goals" in text and "Expected time" in text and "dvc repro" in text and "params.yaml" in text
        student = jupytext.reads(labs.student_version(text, path.name), fmt="py:percent")
        assert sum("raise NotImplementedError" in c.source for c in student.cells) >= len(solution)
        for cell in nb.cells:
            checks_used.update(n for n in EXERCISES if f"check_{n}(" in cell.source)
    assert checks_used == set(EXERCISES)


def test_write_student_labs_copies_the_folder(tmp_path):
    written = labs.write_student_labs(LAB_DIR, tmp_path / "student")
    assert {p.name for p in written} == {p.name for p in LAB_DIR.glob("*.py")}
    assert (tmp_path / "student" / "_toc.yml").read_text() == (LAB_DIR / "_toc.yml").read_text()
    assert 'title: "vadlab course labs (student edition)"' in (tmp_path / "student" / "_config.yml").read_text()
    for p in written:
        assert "# BEGIN SOLUTION" not in p.read_text()
    teacher = labs.write_lab_edition(LAB_DIR, tmp_path / "instructor", "instructor")
    for p in teacher:
        assert p.read_text() == (LAB_DIR / p.name).read_text()


def test_last_failure_starts_empty():
    from vadlab.labs._common import Failure

    fresh = Failure()
    assert (fresh.check, fresh.case, fresh.inputs) == ("", "", {})
