"""Grid-sampling warps: identity, translations, composition, inverse fields and the cycle loss."""

import pytest
import torch

from vadlab.nn.warp import (
    compose, cycle_loss, magnitude, smoothness_loss, strength_loss, transport, upsample_field, warp, warp_sequence,
)


def _images(b=2, c=3, h=20, w=24, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def _constant(b, h, w, dx, dy):
    field = torch.zeros(b, 2, h, w)
    field[:, 0], field[:, 1] = dx, dy
    return field


def test_zero_offsets_leave_the_image_unchanged():
    x = _images()
    torch.testing.assert_close(warp(x, torch.zeros(2, 2, 20, 24)), x, atol=1e-5, rtol=0)  # float32 grid rounding


def test_integer_translation_moves_content_exactly():
    x = _images()
    y = warp(x, _constant(2, 20, 24, 3, -2))  # y(p) = x(p + (3, -2))
    torch.testing.assert_close(y[..., 2:, :-3], x[..., :-2, 3:], atol=1e-5, rtol=0)


def test_warp_is_differentiable_in_the_field():
    x = torch.linspace(0, 1, 24).view(1, 1, 1, 24).expand(1, 1, 20, 24).contiguous()  # a horizontal ramp
    field = torch.full((1, 2, 20, 24), 0.3, requires_grad=True)
    warp(x, field)[..., 2:-2, 2:-2].sum().backward()
    # d/d dx of a ramp of slope 1/23 per pixel; the ramp has no y-gradient
    torch.testing.assert_close(field.grad[0, 0, 2:-2, 2:-2], torch.full((16, 20), 1 / 23), atol=1e-5, rtol=0)
    assert field.grad[0, 1].abs().max() < 1e-6


def test_cycle_loss_zero_for_exact_inverse_and_not_otherwise():
    x = _images()
    fwd = [_constant(2, 20, 24, 3, -2), _constant(2, 20, 24, -1, 1)]
    inv = [-f for f in fwd]
    assert cycle_loss(x, fwd, inv, crop=4) < 1e-10
    assert cycle_loss(x, fwd, fwd, crop=4) > 1e-3  # the field itself is not its own inverse
    with pytest.raises(ValueError, match="as many backward"):
        cycle_loss(x, fwd, inv[:1])


def test_compose_equals_sequential_warps():
    x = _images()
    a, b = _constant(2, 20, 24, 2, 1), _constant(2, 20, 24, -1, 3)
    torch.testing.assert_close(compose(a, b), a + b)
    torch.testing.assert_close(warp(x, compose(a, b))[..., 4:-4, 4:-4], warp_sequence(x, [a, b])[..., 4:-4, 4:-4],
                               atol=1e-5, rtol=0)
    # a smooth, non-constant pair: composition agrees with two warps up to interpolation error
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 20), torch.linspace(0, 1, 24), indexing="ij")
    smooth_img = torch.stack([torch.sin(3 * xx) * torch.cos(2 * yy)] * 3)[None]
    s1 = torch.stack([torch.sin(2 * yy), torch.cos(2 * xx)])[None] * 1.5
    s2 = torch.stack([xx - 0.5, yy * 0])[None] * 2.0
    torch.testing.assert_close(warp(smooth_img, compose(s1, s2))[..., 3:-3, 3:-3],
                               warp_sequence(smooth_img, [s1, s2])[..., 3:-3, 3:-3], atol=2e-2, rtol=0)


def test_upsample_field_rescales_offsets_and_transport_maps():
    f = _constant(1, 5, 5, 1.0, 2.0)
    up = upsample_field(f, 9, rescale=True)  # (9-1)/(5-1) = 2
    torch.testing.assert_close(up, _constant(1, 9, 9, 2.0, 4.0))
    torch.testing.assert_close(upsample_field(f, 9), _constant(1, 9, 9, 1.0, 2.0))
    m = torch.rand(2, 20, 24)
    moved = transport(m, [_constant(2, 20, 24, 3, -2)])
    torch.testing.assert_close(moved[:, 2:, :-3], m[:, :-2, 3:], atol=1e-5, rtol=0)


def test_field_losses():
    f = _constant(1, 6, 6, 3.0, 4.0)
    torch.testing.assert_close(strength_loss(f), torch.tensor(5.0))
    torch.testing.assert_close(magnitude(f), torch.full((1, 6, 6), 5.0))
    assert smoothness_loss(f) == 0
    ramp = torch.zeros(1, 2, 6, 6)
    ramp[:, 0] = torch.arange(6.0).view(1, 6)  # dx grows by 1 per column
    torch.testing.assert_close(smoothness_loss(ramp), torch.tensor(0.5))  # mean |d/dx| over 2 channels = 0.5


def test_bad_field_shape_errors():
    with pytest.raises(ValueError, match=r"\[B, 2, H, W\]"):
        warp(_images(), torch.zeros(2, 3, 20, 24))
    with pytest.raises(ValueError, match="upsample_field"):
        warp(_images(), torch.zeros(2, 2, 10, 12))
