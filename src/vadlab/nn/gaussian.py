"""Per-position Gaussian models of patch features (PaDiM and the semi-orthogonal embedding).

Both methods describe the feature vector at every grid position (i, j) of a normal image by a
Gaussian N(mu_ij, Sigma_ij) and score a test patch by its Mahalanobis distance.  The statistics are
accumulated batch by batch (sums of x and x x^T in float64), so memory does not grow with the number
of training images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def multiscale_embedding(features: list[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Concatenate feature maps of several depths on the finest grid (nearest upsampling).

    For integer stride ratios this equals PaDiM's unfold/fold construction: each coarse cell is
    copied onto the fine cells it covers.  Returns ``[B, sum(C_l), H_0, W_0]``; ``size`` gives the
    grid when ``features[0]`` may have no channels (then it is ``features[0]``'s grid all the same).
    """
    size = tuple(size or features[0].shape[-2:])
    return torch.cat([f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="nearest")
                      for f in features if f.shape[1]], dim=1)


class PositionalGaussian(nn.Module):
    """Streaming per-position mean and covariance, then Mahalanobis distances.

    ``update(x)`` takes embeddings ``[B, D, H, W]``; ``finalize(ridge)`` computes the sample
    covariance (divide by N - 1) plus ``ridge * I`` and stores its inverse; ``distance(x)`` returns
    the Mahalanobis distance ``sqrt((x - mu)^T Sigma^-1 (x - mu))`` per position, ``[B, H, W]``.
    """

    #: positions per batched matrix product in :meth:`distance`
    block = 64

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", None)
        self.register_buffer("precision", None)
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None
        self._count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        b, d, h, w = x.shape
        v = x.permute(2, 3, 0, 1).reshape(h * w, b, d)  # [P, B, D]
        if self._sum is None:
            self._sum = torch.zeros(h * w, d, dtype=torch.float64, device=x.device)
            self._outer = torch.zeros(h * w, d, d, dtype=torch.float64, device=x.device)
            self._shape = (h, w)
        elif self._shape != (h, w) or self._sum.shape[1] != d:
            raise ValueError(f"embedding shape {(d, h, w)} differs from the first batch's "
                             f"{(self._sum.shape[1], *self._shape)}: all images must have the same size")
        for s in range(0, h * w, self.block):  # float64 sums, over blocks of positions (small temporaries)
            vb = v[s:s + self.block].double()
            self._sum[s:s + self.block] += vb.sum(1)
            self._outer[s:s + self.block].baddbmm_(vb.transpose(1, 2), vb)  # in place: no [P, D, D] temporary
        self._count += b

    @torch.no_grad()
    def finalize(self, ridge: float, chunk: int = 256) -> None:
        """Mean, covariance (N - 1) + ridge * I, and its inverse via Cholesky.

        Positions are finalised ``chunk`` at a time, so besides the float64 sums only the float32
        precision matrices are held in full: peak memory stays at about 1.5x the sums instead of the
        4-5x that one batched pass over every position needs (covariance, temporaries, factor, inverse).
        """
        n = self._count
        if n < 2:
            raise ValueError(f"need at least 2 training images to estimate a covariance, got {n}")
        mean = self._sum / n
        p, d = mean.shape
        ridge_eye = ridge * torch.eye(d, dtype=mean.dtype, device=mean.device)
        precision = torch.empty(p, d, d, dtype=torch.float32, device=mean.device)
        for start in range(0, p, chunk):
            m = mean[start:start + chunk]
            cov = (self._outer[start:start + chunk] - n * m[:, :, None] * m[:, None, :]) / (n - 1) + ridge_eye
            precision[start:start + chunk] = torch.cholesky_inverse(torch.linalg.cholesky(cov))
        h, w = self._shape
        self.mean = mean.float().reshape(h, w, -1)
        self.precision = precision.reshape(h, w, d, d)
        self._sum = self._outer = None
        self._count = 0

    @property
    def fitted(self) -> bool:
        return self.precision is not None

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of every position of ``x`` ``[B, D, H, W]`` to its Gaussian."""
        if not self.fitted:
            raise RuntimeError("the Gaussian model is not fitted yet: call fit() first")
        if x.shape[1:] != (self.mean.shape[2], *self.mean.shape[:2]):
            raise ValueError(f"embedding shape {tuple(x.shape[1:])} does not match the fitted "
                             f"{(self.mean.shape[2], *self.mean.shape[:2])}: use the training image size")
        b, d, h, w = x.shape
        xf = x.permute(2, 3, 0, 1).reshape(h * w, b, d)  # [P, B, D]
        mean, precision = self.mean.reshape(h * w, 1, d), self.precision.reshape(h * w, d, d)
        m2 = x.new_empty(h * w, b)
        # one batched matmul per position (a 3-operand einsum is planned poorly on CPU: 3-10x slower), over
        # blocks of positions: the temporaries stay in cache and are reused, not allocated (and page-faulted)
        # at full size for every batch -- 3-4x faster on a CPU at 256 px, the same numbers
        for s in range(0, h * w, self.block):
            diff = xf[s:s + self.block] - mean[s:s + self.block]
            m2[s:s + self.block] = torch.linalg.vecdot(torch.bmm(diff, precision[s:s + self.block]), diff)
        return m2.reshape(h, w, b).permute(2, 0, 1).clamp_min(0).sqrt()
