"""PatchCore: towards total recall in industrial anomaly detection (Roth et al., CVPR 2022).

1. Locally aware patch features: two mid-level feature maps of a frozen ImageNet backbone, each
   averaged over the p x p neighbourhood of every position (the paper's f_agg, p = 3), the coarser
   one bilinearly upsampled to the finer grid, concatenated, and reduced to ``embed_dim`` channels
   by adaptive average pooling over the channel axis (only when there are more channels than that).
2. Memory bank: all training patch features, streamed batch by batch, reduced to a fraction
   ``coreset_ratio`` by greedy k-center coreset selection (minimax facility location) computed on a
   Johnson-Lindenstrauss random projection to ``projection_dim`` dimensions
   (:func:`vadlab.nn.coreset.greedy_coreset`: exact greedy, accelerated by exact pruning bounds).
3. Scoring: each test patch scores its distance to the nearest memory-bank patch (exact search);
   the map is upsampled to the image and smoothed (sigma 4 at 256 px); the image score is the
   paper's re-weighted maximum (Eq. 7, :func:`reweighted_score`), with N_b = the ``num_neighbors``
   nearest bank items of m* (m* included, as its own nearest neighbour).

Departures, on purpose:
- backbone: the offline EfficientNet-Lite0, layers blocks.2 and blocks.4 (strides 8 and 16 like the
  paper's WRN-50 layer2/layer3); no 256 -> 224 centre crop (maps cover the whole image);
- neighbourhood averaging is a per-channel p x p mean with zero padding at the border (as the official
  code's zero-padded unfold; it measured 3-5 image-AUROC points better here than averaging only the
  positions inside the map); the official code then pools the flattened C x 9 vector to 1024 per layer,
  we pool the concatenated channels to ``embed_dim`` only when there are more (152 here, so no pooling);
- the image score is the paper's Eq. 7, which the official code omits (it takes the max);
- the first coreset centre is a seeded random patch and belongs to the coreset.

Where anomalib 2.7 differs (its features, neighbourhood averaging, upsampling and Eq. 7 are the same
as here, so these are the remaining differences; they change which patches the coreset keeps, and
on an 80-image test set the image AUROC then varies by a few points from seed to seed in both):
- its JL projection is a very sparse random matrix (Li et al.) to 4 ln N / (eps^2/2 - eps^3/3)
  dimensions with eps = 0.9, about 300 for N = 205,000, i.e. *more* than our 152 feature dimensions;
  here a dense Gaussian to ``projection_dim`` = 128 (the paper's d = 128);
- its map is upsampled with nearest-neighbour interpolation (here bilinear) before the same blur;
- it computes all distances by the expansion ||x||^2 - 2 x.y + ||y||^2 in float32 (here the
  selection uses centred coordinates and the reported distances are recomputed from differences).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vadlab.backbones import FeatureExtractor
from vadlab.methods.base import AnomalyMethod, check_images, iter_images
from vadlab.nn.coreset import greedy_coreset, nearest_neighbours, random_projection
from vadlab.nn.filters import sigma_for, upsample_blur


@dataclass
class PatchCoreConfig:
    """PatchCore hyperparameters; defaults follow the paper / official code (p = 3, 10 %, d = 128, sigma 4)."""

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ("blocks.2", "blocks.4")
    weights: str = "imagenet"
    backbone_precision: str = "float32"  # or "bfloat16": the frozen backbone under bfloat16 autocast
    patch_size: int = 3  # neighbourhood p of the local aggregation
    embed_dim: int = 1024  # target dimension d* of the adaptive channel pooling (no-op below it)
    coreset_ratio: float = 0.1  # fraction of patches kept in the memory bank (paper: 0.25 / 0.1 / 0.01)
    projection_dim: int = 128  # JL projection used for the coreset distances (0 = none)
    num_neighbors: int = 9  # b of Eq. 7 (not stated in the paper; anomalib's default)
    image_score: str = "reweighted"  # "reweighted" (paper Eq. 7) or "max" (official code)
    sigma: float = 4.0  # Gaussian blur of the map, in pixels at 256 px
    seed: int = 0  # projection matrix and first coreset centre
    batch_size: int = 32
    device: str = "cpu"

    @classmethod
    def cpu_preset(cls) -> "PatchCoreConfig":
        """Small-CPU preset: 1 % coreset (paper: 99.0 vs 99.1 image AUROC at 25 %); use 128 px images."""
        return cls(**CPU_PRESET)


#: overrides of the small-CPU preset (fit + predict of 200 + 80 images at CPU_IMAGE_SIZE on one core)
CPU_PRESET: dict[str, Any] = {"coreset_ratio": 0.01}
CPU_IMAGE_SIZE = 128


def reweighted_score(test_patches: torch.Tensor, bank: torch.Tensor, num_neighbors: int,
                     nn_dist: torch.Tensor | None = None, nn_index: torch.Tensor | None = None) -> torch.Tensor:
    """Paper Eq. 7 for one image: s = (1 - exp||m_t* - m*|| / sum_{m in N_b(m*)} exp||m_t* - m||) * s*.

    ``test_patches`` ``[P, D]`` are the image's patch features; m_t* is the patch whose nearest bank item
    m* is farthest (s* = that distance); N_b(m*) are the ``num_neighbors`` bank items nearest to m*
    (m* itself first).  With ``num_neighbors = 1`` the weight is 0 and the formula degenerates, so
    the plain maximum s* is returned (as anomalib does).  Pass precomputed nearest distances/indices
    to avoid searching twice.
    """
    if nn_dist is None or nn_index is None:
        nn_dist, nn_index = (t[:, 0] for t in nearest_neighbours(test_patches, bank, k=1))
    worst = int(torch.argmax(nn_dist))
    s_star = nn_dist[worst]
    b = min(num_neighbors, bank.shape[0])
    if b <= 1:
        return s_star
    m_star = bank[nn_index[worst]]
    _, support = nearest_neighbours(m_star[None], bank, k=b)
    support = support[0]
    if support[0] != nn_index[worst]:  # duplicates in the bank: keep m* itself first
        support = torch.cat([nn_index[worst][None], support[support != nn_index[worst]]])[:b]
    dist = (test_patches[worst][None] - bank[support]).pow(2).sum(1).sqrt()
    weight = 1.0 - torch.softmax(dist, 0)[0]  # exp(d_0) / sum_j exp(d_j), computed stably
    return weight * s_star


class PatchCore(AnomalyMethod):
    """Coreset memory bank of locally aware patch features; nearest-neighbour anomaly map."""

    name = "patchcore"
    Config = PatchCoreConfig

    def __init__(self, config: PatchCoreConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        if cfg.patch_size < 1 or cfg.patch_size % 2 == 0:
            raise ValueError(f"patch_size={cfg.patch_size} must be a positive odd number (paper: 3)")
        if not 0 < cfg.coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio={cfg.coreset_ratio} must be in (0, 1] (paper: 0.1 or 0.01)")
        if cfg.image_score not in ("reweighted", "max"):
            raise ValueError(f"image_score={cfg.image_score!r} must be 'reweighted' (paper) or 'max'")
        if cfg.num_neighbors < 1 or cfg.embed_dim < 1 or cfg.projection_dim < 0:
            raise ValueError("num_neighbors and embed_dim must be >= 1 and projection_dim >= 0, got "
                             f"{cfg.num_neighbors}, {cfg.embed_dim}, {cfg.projection_dim}")
        self.backbone = FeatureExtractor(cfg.backbone, cfg.layers, cfg.weights, precision=cfg.backbone_precision)
        self.backbone.cache_features = True  # it embeds the data's images (vadlab.backbones.FeatureCache)
        # channels-last convolutions are ~2x faster on CPU; results equal up to float rounding
        self.backbone.to(memory_format=torch.channels_last)
        self.register_buffer("memory_bank", None)
        self.to(self.device)

    # -- 1. locally aware patch features ---------------------------------------------
    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features ``[B, D, h, w]`` on the grid of the first layer, for images in [0, 1]."""
        p = self.config.patch_size
        feats = [F.avg_pool2d(f, p, stride=1, padding=p // 2, count_include_pad=True) for f in self.backbone(images)]
        size = feats[0].shape[-2:]
        feats = [feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]]
        x = torch.cat(feats, dim=1)
        if x.shape[1] > self.config.embed_dim:  # adaptive average pooling over channels to d*
            b, c, h, w = x.shape
            x = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(-1, 1, c), self.config.embed_dim)
            x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return x.contiguous()

    # -- 2. memory bank and coreset --------------------------------------------------
    @torch.no_grad()
    def fit(self, train_loader: Iterable) -> "PatchCore":
        cfg = self.config
        chunks: list[torch.Tensor] = []  # patch features per batch (never concatenated)
        for images in tqdm(iter_images(train_loader, self.device), desc="patchcore features", leave=False):
            x = self.embed(images)
            chunks.append(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]))
        if not chunks:
            raise ValueError("the training loader yielded no images; PatchCore needs defect-free training images")
        if cfg.coreset_ratio >= 1:
            self.memory_bank = torch.cat(chunks)
            return self
        n, dim = sum(len(c) for c in chunks), chunks[0].shape[1]
        matrix = random_projection(dim, cfg.projection_dim, cfg.seed) if 0 < cfg.projection_dim < dim else None
        n_select = max(1, int(n * cfg.coreset_ratio))
        start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(cfg.seed)))
        index = greedy_coreset(chunks, n_select, start=start, projection=matrix, progress=True)
        self.memory_bank = _gather_rows(chunks, index)
        return self

    # -- 3. scoring --------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.memory_bank is None:
            raise RuntimeError("PatchCore is not fitted yet: call fit() on defect-free training images first")
        images = check_images(images).to(self.device)
        scores, maps = [], []
        for chunk in images.split(self.config.batch_size):
            x = self.embed(chunk)
            b, d, h, w = x.shape
            if d != self.memory_bank.shape[1]:
                raise ValueError(f"patch features have {d} channels but the memory bank {self.memory_bank.shape[1]}: "
                                 "predict with the same backbone configuration as fit")
            patches = x.permute(0, 2, 3, 1).reshape(b, h * w, d)
            dist, index = nearest_neighbours(patches.reshape(-1, d), self.memory_bank, k=1)
            dist, index = dist.reshape(b, h * w), index.reshape(b, h * w)
            for i in range(b):
                if self.config.image_score == "reweighted":
                    scores.append(reweighted_score(patches[i], self.memory_bank, self.config.num_neighbors,
                                                   dist[i], index[i]))
                else:
                    scores.append(dist[i].max())
            maps.append(upsample_blur(dist.reshape(b, h, w), chunk.shape[-2:],
                                      sigma_for(self.config.sigma, chunk.shape[-1])))
        return torch.stack(scores), torch.cat(maps)


def _gather_rows(chunks: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of the virtual concatenation of ``chunks``, in the order of ``index``."""
    sizes = torch.tensor([len(c) for c in chunks])
    offsets = torch.cumsum(sizes, 0) - sizes
    which = torch.searchsorted(torch.cumsum(sizes, 0), index, right=True)
    out = torch.empty(len(index), chunks[0].shape[1], dtype=chunks[0].dtype, device=chunks[0].device)
    for k in which.unique().tolist():
        sel = (which == k).nonzero().squeeze(1)
        out[sel] = chunks[k][index[sel] - offsets[k]]
    return out
