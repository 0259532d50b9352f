"""Smoothing of anomaly maps, as almost every method does before scoring."""

from __future__ import annotations

from functools import lru_cache

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


@lru_cache(maxsize=64)
def _resample_blur_matrix(n_in: int, n_out: int, sigma: float, mode: str, truncate: float) -> torch.Tensor:
    """The ``[n_out, n_in]`` matrix of bilinear resizing (align_corners=False) then the 1-D blur (float64)."""
    eye = torch.eye(n_in, dtype=torch.float64)[:, None, :, None]  # n_in unit impulses of length n_in
    x = F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)[:, :, :, 0]  # [n_in, 1, n_out]
    if sigma > 0:
        k = gaussian_kernel1d(sigma, truncate, torch.float64)
        r = k.numel() // 2
        x = F.conv1d(F.pad(x, (r, r), mode=mode), k.view(1, 1, -1))
    return x[:, 0].T.contiguous()


def upsample_blur(maps: torch.Tensor, size: tuple[int, int] | int, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """``gaussian_blur(upsample_to(maps, size), sigma)`` of ``[B, h, w]`` maps in two small matrix products.

    Bilinear resizing and the separable blur are both linear and act on rows and columns separately, so the
    two together are ``A_h @ map @ A_w^T`` with ``A`` of shape ``[H, h]`` and ``[W, w]``: the operators are
    built once (from unit impulses, through the same interpolation and blur) and cached. The result equals
    the two-step computation up to float rounding, at a fraction of its cost on a CPU: no full-resolution
    intermediate map, no single-channel convolution.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    (h, w), (H, W) = maps.shape[-2:], size
    r = int(truncate * sigma + 0.5) if sigma > 0 else 0
    mode = "reflect" if r < min(H, W) else "replicate"  # gaussian_blur's rule, on the output size
    a_h = _resample_blur_matrix(h, H, float(sigma), mode, truncate).to(maps.device, maps.dtype)
    a_w = _resample_blur_matrix(w, W, float(sigma), mode, truncate).to(maps.device, maps.dtype)
    return a_h @ maps @ a_w.T


__all__ = ["gaussian_blur", "gaussian_kernel1d", "sigma_for", "upsample_blur"]
