"""Smoothing of anomaly maps, as almost every method does before scoring."""

from __future__ import annotations


import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``round(truncate * sigma)`` (scipy's ``gaussian_filter`` rule)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, H, W]`` (or ``[B, C, H, W]``) maps with mirror padding.

    ``sigma <= 0`` returns the maps unchanged.  Equals ``scipy.ndimage.gaussian_filter`` with
    ``mode="mirror"`` when the kernel radius is smaller than the map.
    """
    if sigma <= 0:
        return maps
    squeeze = maps.ndim == 3
    x = maps[:, None] if squeeze else maps
    b, c, h, w = x.shape
    k = gaussian_kernel1d(sigma, truncate, x.dtype).to(x.device)
    r = k.numel() // 2
    x = x.reshape(b * c, 1, h, w)
    mode = "reflect" if r < min(h, w) else "replicate"
    x = F.pad(x, (r, r, 0, 0), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode=mode)
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    x = x.reshape(b, c, h, w)
    return x[:, 0] if squeeze else x


def sigma_for(sigma: float, image_size: int, reference_size: int = 256) -> float:
    """Scale a paper's blur ``sigma`` (given at ``reference_size`` px) to ``image_size`` px."""
    return sigma * image_size / reference_size if sigma > 0 else 0.0


__all__ = ["gaussian_blur", "gaussian_kernel1d", "sigma_for"]
