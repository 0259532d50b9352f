"""Perceptual image similarities used as losses and anomaly maps: SSIM and MSGMS (differentiable, torch).

SSIM (Wang et al. 2004) compares local means, variances and the covariance of two images under a
Gaussian window (11 taps, sigma 1.5):

    SSIM(x, y) = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),
    C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = data range.

With ``padding="symmetric"`` and ``crop=True`` the mean equals scikit-image's
``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.

GMS (gradient magnitude similarity, Xue et al. 2014, as used by RIAD) compares Prewitt gradient
magnitudes g of the grey images:  GMS = (2 g_x g_y + c) / (g_x^2 + g_y^2 + c), c = 0.0026 for images
in [0, 1] (GMSD's T = 170 on the 0..255 scale).  MSGMS averages 1 - GMS over 4 scales (the image and
three successive 2x2 average poolings).  Both are 1 (similarity) / 0 (loss) for identical images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gaussian_window", "ssim_map", "ssim", "ssim_loss", "gradient_magnitude", "gms_map",
           "msgms_map", "msgms_loss"]


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be torch tensors [B, C, H, W]")
    if x.ndim != 4 or x.shape != y.shape:
        raise ValueError(f"x and y must both be [B, C, H, W] of the same shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}; add a batch dimension with img[None]")


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps (odd)."""
    if size % 2 != 1 or size < 1:
        raise ValueError(f"window size must be a positive odd number, got {size}")
    x = torch.arange(size, dtype=torch.float64) - size // 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def _symmetric_pad(x: torch.Tensor, r: int) -> torch.Tensor:
    """Pad the last two dims by ``r`` with edge-including reflection (scipy's ``mode="reflect"``)."""
    if r == 0:
        return x
    h, w = x.shape[-2:]
    if r > min(h, w):
        raise ValueError(f"image of size {h}x{w} is smaller than the SSIM window radius {r}; "
                         "use larger images or a smaller window")
    x = torch.cat([x[..., :r, :].flip(-2), x, x[..., h - r:, :].flip(-2)], dim=-2)
    return torch.cat([x[..., :r].flip(-1), x, x[..., w - r:].flip(-1)], dim=-1)


def _filter(x: torch.Tensor, window: torch.Tensor, padding: str) -> torch.Tensor:
    """Separable per-channel filtering of ``[B, C, H, W]``; ``padding`` is "symmetric" or "valid"."""
    c = x.shape[1]
    r = window.numel() // 2
    if padding == "symmetric":
        x = _symmetric_pad(x, r)
    elif padding != "valid":
        raise ValueError(f"padding must be 'symmetric' or 'valid', got {padding!r}")
    kx = window.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = window.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    return F.conv2d(F.conv2d(x, kx, groups=c), ky, groups=c)


def ssim_map(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5,
             data_range: float = 1.0, padding: str = "symmetric", k1: float = 0.01,
             k2: float = 0.03) -> torch.Tensor:
    """Per-pixel, per-channel SSIM ``[B, C, H, W]`` (``H - window_size + 1`` with ``padding="valid"``)."""
    _check_pair(x, y)
    window = gaussian_window(window_size, sigma, x.dtype).to(x.device)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    stats = _filter(torch.cat([x, y, x * x, y * y, x * y], dim=1), window, padding)
    mx, my, xx, yy, xy = stats.split(x.shape[1], dim=1)
    vx, vy, cxy = xx - mx * mx, yy - my * my, xy - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5,
         data_range: float = 1.0, crop: bool = True) -> torch.Tensor:
    """Mean SSIM per image ``[B]``; ``crop`` drops the border of half a window (as scikit-image does)."""
    m = ssim_map(x, y, window_size, sigma, data_range)
    if crop:
        r = window_size // 2
        m = m[..., r:m.shape[-2] - r, r:m.shape[-1] - r]
    return m.flatten(1).mean(1)


def ssim_loss(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5,
              data_range: float = 1.0) -> torch.Tensor:
    """Training loss ``mean(1 - SSIM map)`` over the batch (a scalar; 0 for identical images)."""
    return (1 - ssim_map(x, y, window_size, sigma, data_range)).mean()


# ----------------------------------------------------------------------------- gradient magnitude


def gradient_magnitude(gray: torch.Tensor) -> torch.Tensor:
    """Prewitt gradient magnitude ``[B, 1, H, W]`` of grey images ``[B, 1, H, W]`` (replicate padding)."""
    hx = torch.tensor([[1.0, 0.0, -1.0]] * 3, dtype=gray.dtype, device=gray.device) / 3
    kernels = torch.stack([hx, hx.t()])[:, None]
    g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    return torch.sqrt(g.pow(2).sum(1, keepdim=True) + 1e-16)


def gms_map(x: torch.Tensor, y: torch.Tensor, c: float = 0.0026) -> torch.Tensor:
    """Gradient magnitude similarity ``[B, 1, H, W]`` of the channel-mean (grey) images; 1 = identical."""
    _check_pair(x, y)
    gx = gradient_magnitude(x.mean(1, keepdim=True))
    gy = gradient_magnitude(y.mean(1, keepdim=True))
    return (2 * gx * gy + c) / (gx * gx + gy * gy + c)


def msgms_map(x: torch.Tensor, y: torch.Tensor, scales: int = 4, c: float = 0.0026) -> torch.Tensor:
    """Multi-scale GMS *distance* map ``[B, H, W]``: mean over scales of upsampled ``1 - GMS``; 0 = identical."""
    _check_pair(x, y)
    size = x.shape[-2:]
    total = torch.zeros(x.shape[0], 1, *size, dtype=x.dtype, device=x.device)
    for s in range(scales):
        if s:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        d = 1 - gms_map(x, y, c)
        total = total + (d if s == 0 else F.interpolate(d, size=size, mode="bilinear", align_corners=False))
    return total[:, 0] / scales


def msgms_loss(x: torch.Tensor, y: torch.Tensor, scales: int = 4, c: float = 0.0026) -> torch.Tensor:
    """MSGMS training loss: mean over scales of ``mean(1 - GMS)`` at that scale (a scalar)."""
    _check_pair(x, y)
    total = x.new_zeros(())
    for s in range(scales):
        if s:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        total = total + (1 - gms_map(x, y, c)).mean()
    return total / scales
