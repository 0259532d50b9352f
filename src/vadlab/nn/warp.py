"""Differentiable warping of images by dense offset fields (grid sampling).

A field ``O`` ``[B, 2, H, W]`` holds, at every output pixel ``p = (x, y)``, an offset in pixels
``(dx, dy)``.  Warping samples the image there, with bilinear interpolation::

    warp(I, O)(p) = I(p + O(p))

so a constant field ``(+3, 0)`` moves the content 3 pixels to the LEFT.  Bilinear sampling is
differentiable in both the image and the field, which is what lets a network learn ``O``.

Warping by ``O_a`` and then ``O_b`` equals one warp by ``compose(O_a, O_b) = O_b + warp(O_a, O_b)``
(the first field is read where the second one points).  A field ``O^T`` is an inverse of ``O`` when
``warp(warp(I, O), O^T) = I``; the cycle loss measures how far that is from true.

Coordinates follow ``grid_sample(..., align_corners=True)``: pixel centres ``0 .. W-1`` map to
``-1 .. 1``, so ``dx`` pixels are ``2 dx / (W - 1)`` grid units.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _check_field(field: torch.Tensor, name: str = "field") -> None:
    if field.ndim != 4 or field.shape[1] != 2:
        raise ValueError(f"{name} must be an offset field [B, 2, H, W] in pixels (dx, dy), got {tuple(field.shape)}")


def identity_grid(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Sampling grid ``[1, H, W, 2]`` of the identity warp in ``grid_sample`` units (x, y in [-1, 1])."""
    ys = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=-1)[None]


def to_grid_units(field: torch.Tensor) -> torch.Tensor:
    """Convert a pixel offset field to ``grid_sample`` units (fraction of the half image size)."""
    _check_field(field)
    h, w = field.shape[-2:]
    scale = field.new_tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)]).view(1, 2, 1, 1)
    return field * scale


def warp(images: torch.Tensor, field: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Sample ``images`` ``[B, C, H, W]`` at ``p + field(p)`` (field in pixels, same H, W)."""
    _check_field(field)
    if images.ndim != 4 or images.shape[-2:] != field.shape[-2:] or images.shape[0] != field.shape[0]:
        raise ValueError(f"images {tuple(images.shape)} and field {tuple(field.shape)} must share batch and size; "
                         "upsample the field with upsample_field first")
    h, w = images.shape[-2:]
    grid = identity_grid(h, w, images.device, images.dtype) + to_grid_units(field).permute(0, 2, 3, 1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)


def warp_sequence(images: torch.Tensor, fields: Sequence[torch.Tensor], padding_mode: str = "border") -> torch.Tensor:
    """Warp by ``fields[0]``, then ``fields[1]``, ... (the order in which DMAD applies its pyramid)."""
    for field in fields:
        images = warp(images, field, padding_mode)
    return images


def upsample_field(field: torch.Tensor, size: int | tuple[int, int], rescale: bool = False) -> torch.Tensor:
    """Bilinearly resize a field to ``size``.

    ``rescale=False``: offsets are already in pixels of the target image (DMAD's heads predict them so).
    ``rescale=True``: offsets are in pixels of the field's own grid and are multiplied by the size ratio.
    """
    _check_field(field)
    size = (size, size) if isinstance(size, int) else tuple(size)
    h, w = field.shape[-2:]
    if (h, w) == size:
        return field
    out = F.interpolate(field, size=size, mode="bilinear", align_corners=True)
    if rescale:
        sx = (size[1] - 1) / max(w - 1, 1)
        sy = (size[0] - 1) / max(h - 1, 1)
        out = out * out.new_tensor([sx, sy]).view(1, 2, 1, 1)
    return out


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The single field equal to warping by ``first`` and then by ``second``.

    ``warp(warp(I, a), b)(p) = I(p + b(p) + a(p + b(p)))``, hence ``b + warp(a, b)``.
    """
    _check_field(first, "first")
    _check_field(second, "second")
    return second + warp(first, second, padding_mode="border")


def transport(maps: torch.Tensor, fields: Sequence[torch.Tensor]) -> torch.Tensor:
    """Carry ``[B, H, W]`` or ``[B, C, H, W]`` maps along a sequence of warps (e.g. back to the input frame)."""
    squeeze = maps.ndim == 3
    out = warp_sequence(maps[:, None] if squeeze else maps, fields)
    return out[:, 0] if squeeze else out


def magnitude(field: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-pixel length ``||O(p)||_2`` ``[B, H, W]`` (smooth at zero so it can be a loss)."""
    _check_field(field)
    return (field.pow(2).sum(1) + eps).sqrt()


def smoothness_loss(field: torch.Tensor) -> torch.Tensor:
    """Mean L1 norm of the field's finite-difference gradient, ``||grad O||_1``."""
    _check_field(field)
    dx = (field[..., :, 1:] - field[..., :, :-1]).abs().mean()
    dy = (field[..., 1:, :] - field[..., :-1, :]).abs().mean()
    return dx + dy


def strength_loss(field: torch.Tensor) -> torch.Tensor:
    """Mean offset length, ``||O||_2`` averaged over pixels."""
    return magnitude(field, 1e-8).mean()


def cycle_loss(images: torch.Tensor, forward: Sequence[torch.Tensor], backward: Sequence[torch.Tensor],
               crop: int = 0, padding_mode: str = "border") -> torch.Tensor:
    """``||x - x (.) O_1 ... (.) O_K (.) O^T_K ... (.) O^T_1||^2`` (mean), optionally on an interior crop.

    ``forward`` is ``[O_1 .. O_K]`` and ``backward`` ``[O^T_1 .. O^T_K]``; the backward fields are
    applied in reverse order.  ``crop`` ignores that many border pixels, where content that left
    the image cannot come back.
    """
    if len(forward) != len(backward):
        raise ValueError(f"cycle_loss needs as many backward fields as forward ones, got {len(forward)} and {len(backward)}")
    there = warp_sequence(images, forward, padding_mode)
    back = warp_sequence(there, list(reversed(backward)), padding_mode)
    diff = (images - back).pow(2)
    if crop > 0:
        diff = diff[..., crop:-crop, crop:-crop]
    return diff.mean()


__all__ = [
    "compose", "cycle_loss", "identity_grid", "magnitude", "smoothness_loss", "strength_loss", "to_grid_units",
    "transport", "upsample_field", "warp", "warp_sequence",
]
