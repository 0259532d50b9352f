"""SSIM and MSGMS: known answers, agreement with scikit-image, differentiability."""

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from vadlab.nn.similarity import gms_map, msgms_loss, msgms_map, ssim, ssim_loss, ssim_map


def _pair(seed: int = 0, shape=(3, 3, 40, 37)):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    y = (x + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return x, y


def test_ssim_is_one_on_identical_images():
    x, _ = _pair()
    torch.testing.assert_close(ssim_map(x, x), torch.ones_like(x))
    torch.testing.assert_close(ssim(x, x), torch.ones(3, dtype=torch.float64))
    assert ssim_loss(x, x).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_ssim_matches_scikit_image(data_range):
    x, y = _pair(1)
    x, y = x * data_range, y * data_range
    ours = ssim(x, y, data_range=data_range)
    full = ssim_map(x, y, data_range=data_range)
    for i in range(len(x)):
        ref, ref_map = structural_similarity(
            x[i].numpy(), y[i].numpy(), channel_axis=0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=data_range, full=True)
        assert abs(ours[i].item() - ref) < 1e-3
        np.testing.assert_allclose(full[i].numpy(), ref_map, atol=1e-3)
    assert ours.max() < 0.9  # the noisy images are really different


def test_ssim_float32_and_grey():
    x, y = _pair(2, (2, 1, 32, 32))
    ref = structural_similarity(x[0, 0].numpy(), y[0, 0].numpy(), gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=1.0)
    assert abs(ssim(x.float(), y.float())[0].item() - ref) < 1e-3


def test_msgms_zero_on_identical_positive_on_different():
    x, y = _pair(3)
    assert msgms_loss(x, x).item() == pytest.approx(0.0, abs=1e-12)
    assert msgms_map(x, x).abs().max().item() < 1e-12
    assert msgms_loss(x, y).item() > 0.01
    assert (msgms_map(x, y) >= -1e-12).all()
    # a change confined to one square shows up there and not far away
    z = x.clone()
    z[:, :, 10:20, 10:20] = 0.5
    m = msgms_map(x, z)
    assert m[:, 12:18, 12:18].mean() > 5 * m[:, 30:, 30:].mean()


def test_gms_known_values():
    # constant images have zero gradient: GMS = c / c = 1; a ramp against a flat image: GMS = c / (g^2 + c)
    flat = torch.full((1, 3, 16, 16), 0.5, dtype=torch.float64)
    ramp = torch.linspace(0, 1, 16, dtype=torch.float64).view(1, 1, 1, 16).expand(1, 3, 16, 16)
    torch.testing.assert_close(gms_map(flat, flat), torch.ones(1, 1, 16, 16, dtype=torch.float64))
    g = 2 / 15 * 3 / 3  # Prewitt (/3) of a ramp of step 1/15: (x[j+1] - x[j-1]) summed over 3 rows / 3
    inner = gms_map(ramp, flat)[0, 0, 2:-2, 2:-2]
    torch.testing.assert_close(inner, torch.full_like(inner, 0.0026 / (g * g + 0.0026)), rtol=1e-5, atol=0)


def test_losses_are_differentiable():
    x, y = _pair(4)
    y = y.clone().requires_grad_(True)
    (ssim_loss(x, y) + msgms_loss(x, y)).backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_bad_input_errors():
    x, _ = _pair()
    with pytest.raises(ValueError, match="same shape"):
        ssim(x, x[:, :, :20])
    with pytest.raises(ValueError, match="same shape"):
        msgms_loss(x[0], x[0])
    with pytest.raises(ValueError, match="odd"):
        ssim_map(x, x, window_size=10)
