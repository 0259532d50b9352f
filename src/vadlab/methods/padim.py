"""PaDiM: a patch distribution model (Defard et al., ICPR workshops 2020).

1. A frozen ImageNet backbone gives feature maps at three depths; they are upsampled to the finest
   grid and concatenated, so each grid position carries a multi-scale patch descriptor.
2. A fixed random subset of ``n_features`` channels keeps the covariance small.
3. Each position (i, j) of the normal training images is modelled by a Gaussian
   N(mu_ij, Sigma_ij + ridge * I), estimated in one streaming pass.
4. A test patch scores its Mahalanobis distance; the map is upsampled to the image, smoothed with a
   Gaussian (sigma 4 at 256 px) and the image score is its maximum.

Departures from the paper, on purpose: the default backbone is the offline EfficientNet-Lite0
(blocks 1, 2, 4: strides 4, 8, 16 like ResNet layers 1-3) instead of ResNet-18 / WRN-50, and there
is no 256 -> 224 centre crop (maps cover the whole image, so border defects count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from tqdm.auto import tqdm

from vadlab.backbones import FeatureExtractor
from vadlab.methods.base import AnomalyMethod, check_images, iter_images
from vadlab.nn.filters import sigma_for, upsample_blur
from vadlab.nn.gaussian import PositionalGaussian, multiscale_embedding


@dataclass
class PadimConfig:
    """PaDiM hyperparameters; defaults follow the paper's ResNet-18 setting (d = 100, ridge 0.01, sigma 4)."""

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ("blocks.1", "blocks.2", "blocks.4")
    weights: str = "imagenet"
    backbone_precision: str = "float32"  # or "bfloat16": the frozen backbone under bfloat16 autocast
    n_features: int = 100  # random channel subset d (paper: 100 for R18, 550 for WRN-50)
    ridge: float = 0.01  # epsilon * I added to every covariance
    sigma: float = 4.0  # Gaussian blur of the map, in pixels at 256 px
    seed: int = 1024  # channel selection
    batch_size: int = 32
    device: str = "cpu"

    @classmethod
    def cpu_preset(cls) -> "PadimConfig":
        """Small-CPU preset: the paper's settings; PaDiM learns no weights and fits a category in ~30 s."""
        return cls()


class Padim(AnomalyMethod):
    """Per-position Gaussian on random-subset multi-scale features; Mahalanobis anomaly map."""

    name = "padim"
    Config = PadimConfig

    def __init__(self, config: PadimConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        self.backbone = FeatureExtractor(cfg.backbone, cfg.layers, cfg.weights, precision=cfg.backbone_precision)
        self.backbone.cache_features = True  # it embeds the data's images (vadlab.backbones.FeatureCache)
        self.backbone.to(memory_format=torch.channels_last)  # ~2x faster convolutions on CPU, same numbers up to rounding
        total = sum(self.backbone.channels)
        if not 0 < cfg.n_features <= total:
            raise ValueError(f"n_features={cfg.n_features} must be in 1..{total} "
                             f"(the channels of {cfg.backbone} layers {cfg.layers})")
        generator = torch.Generator().manual_seed(cfg.seed)
        index = torch.randperm(total, generator=generator)[: cfg.n_features].sort().values
        self.register_buffer("channel_index", index)
        self.gaussian = PositionalGaussian()
        self.to(self.device)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Random-subset multi-scale embedding ``[B, d, H/4, W/4]`` of images in [0, 1]."""
        # select each layer's channels before the coarse layers are upsampled (the same tensor, less copying)
        features, selected, offset = self.backbone(images), [], 0
        for maps in features:
            keep = self.channel_index[(self.channel_index >= offset) & (self.channel_index < offset + maps.shape[1])]
            selected.append(maps[:, keep - offset])
            offset += maps.shape[1]
        return multiscale_embedding(selected, features[0].shape[-2:])

    @torch.no_grad()
    def fit(self, train_loader: Iterable) -> "Padim":
        for images in tqdm(iter_images(train_loader, self.device), desc="padim fit", leave=False):
            self.gaussian.update(self.embed(images))
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
