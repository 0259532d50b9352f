"""Semi-orthogonal embedding for efficient unsupervised anomaly segmentation (Kim et al., 2021).

Same model as PaDiM, a Gaussian N(mu_ij, Sigma_ij) per grid position of multi-scale features, but the
F-dimensional features are reduced to k dimensions by a random *semi-orthogonal* matrix
W in R^{F x k} (W^T W = I_k) instead of a random subset of channels:

1. multi-scale features: three backbone depths, upsampled (nearest) to the finest grid, concatenated;
2. x -> W^T x with W = Q diag(sign(diag R)) from the QR decomposition of a Gaussian F x k matrix
   (the sign fix makes Q unique, hence W Haar-distributed on the Stiefel manifold);
3. per-position mean and covariance of W^T x, accumulated batch by batch, plus ridge * I;
4. Mahalanobis distance map, upsampled (bilinear) to the image, Gaussian blur (sigma 4 at 256 px);
   image score = maximum of the map (the paper evaluates maps only).

Why it works (the paper's Theorem 1): among rank-k embeddings, W (W^T C W)^{-1} W^T approximates the
precision C^{-1} best when W spans the top-k eigenvectors of C; a random semi-orthogonal W is a cheap,
data-independent stand-in that keeps the k x k inverse small (cubic saving over F x F).

Departures, on purpose: backbone EfficientNet-Lite0 blocks 1, 2, 4 (F = 176, k = 100; the paper uses
WRN-50 with F = 1792, k = 300, and ResNet-18 with k = 100); the covariance divides by N - 1 as in
PaDiM (the official code divides by N, a factor N / (N - 1) on Sigma).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vadlab.backbones import FeatureExtractor
from vadlab.methods.base import AnomalyMethod, check_images, iter_images
from vadlab.nn.filters import sigma_for, upsample_blur
from vadlab.nn.gaussian import PositionalGaussian


@dataclass
class SemiOrthogonalConfig:
    """Semi-orthogonal embedding hyperparameters; defaults follow the paper's ResNet-18 setting (k = 100)."""

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ("blocks.1", "blocks.2", "blocks.4")
    weights: str = "imagenet"
    backbone_precision: str = "float32"  # or "bfloat16": the frozen backbone under bfloat16 autocast
    k: int = 100  # embedding dimension (paper: 100 for ResNet-18, 300 for WRN-50)
    ridge: float = 0.01  # epsilon * I added to every covariance
    sigma: float = 4.0  # Gaussian blur of the map, in pixels at 256 px
    seed: int = 1111  # the random matrix W (official code's seed)
    batch_size: int = 32
    device: str = "cpu"

    @classmethod
    def cpu_preset(cls) -> "SemiOrthogonalConfig":
        """Small-CPU preset: the paper's settings already fit; use 128 px images."""
        return cls(**CPU_PRESET)


#: overrides of the small-CPU preset (fit + predict of 200 + 80 images at CPU_IMAGE_SIZE on one core)
CPU_PRESET: dict[str, Any] = {}
CPU_IMAGE_SIZE = 128


def semi_orthogonal_matrix(n_rows: int, n_cols: int, seed: int = 0) -> torch.Tensor:
    """Random W ``[n_rows, n_cols]`` with W^T W = I: QR of a Gaussian matrix, columns sign-fixed by diag(R)."""
    if not 1 <= n_cols <= n_rows:
        raise ValueError(f"a semi-orthogonal matrix needs 1 <= k <= F, got F={n_rows}, k={n_cols}")
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(n_rows, n_cols, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(omega)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).float()


class SemiOrthogonal(AnomalyMethod):
    """Per-position Gaussian on a random semi-orthogonal projection of multi-scale features."""

    name = "semi_orthogonal"
    Config = SemiOrthogonalConfig

    def __init__(self, config: SemiOrthogonalConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        self.backbone = FeatureExtractor(cfg.backbone, cfg.layers, cfg.weights, precision=cfg.backbone_precision)
        self.backbone.cache_features = True  # it embeds the data's images (vadlab.backbones.FeatureCache)
        self.backbone.to(memory_format=torch.channels_last)  # ~2x faster on CPU, same numbers up to rounding
        total = sum(self.backbone.channels)
        if not 0 < cfg.k <= total:
            raise ValueError(f"k={cfg.k} must be in 1..{total} (the channels of {cfg.backbone} layers {cfg.layers})")
        self.register_buffer("W", semi_orthogonal_matrix(total, cfg.k, cfg.seed))
        self.gaussian = PositionalGaussian()
        self.to(self.device)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Semi-orthogonal embedding W^T x ``[B, k, H/4, W/4]`` of images in [0, 1]."""
        # W^T [x_1; up(x_2); ...] = sum_l up(W_l^T x_l): nearest upsampling commutes with a map over channels,
        # so each layer is projected on its own (coarser, cheaper) grid, then upsampled and summed
        feats, out, offset = self.backbone(images), None, 0
        size = feats[0].shape[-2:]
        for maps in feats:
            part = torch.einsum("bfhw,fk->bkhw", maps, self.W[offset:offset + maps.shape[1]])
            if part.shape[-2:] != size:
                part = F.interpolate(part, size=size, mode="nearest")
            out = part if out is None else out + part
            offset += maps.shape[1]
        return out.contiguous()

    @torch.no_grad()
    def fit(self, train_loader: Iterable) -> "SemiOrthogonal":
        for images in tqdm(iter_images(train_loader, self.device), desc="semi-orthogonal fit", leave=False):
            self.gaussian.update(self.embed(images))
        if self.gaussian._count == 0:
            raise ValueError("the training loader yielded no images; the method needs defect-free training images")
        self.gaussian.finalize(self.config.ridge)
        return self

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = check_images(images).to(self.device)
        scores, maps = [], []
        for chunk in images.split(self.config.batch_size):
            dist = self.gaussian.distance(self.embed(chunk))
            m = upsample_blur(dist, chunk.shape[-2:], sigma_for(self.config.sigma, chunk.shape[-1]))
            maps.append(m)
            scores.append(m.flatten(1).amax(1))
        return torch.cat(scores), torch.cat(maps)
