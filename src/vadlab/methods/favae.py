"""FAVAE: a feature-augmented VAE (Dehaene & Eline 2020, "Anomaly localization by modeling perceptual features").

A VAE reconstructs pixels, whose errors are a poor proxy for what a person calls a defect.  FAVAE also
asks the decoder to reproduce the *features* a frozen pretrained CNN computes from the input:

1. VAE: a convolutional encoder gives ``q(z|x) = N(mu, diag(sigma^2))`` with a 1x1-spatial latent;
   a transposed-conv decoder maps ``z`` back to the image (sigmoid output).
2. Feature matching: the decoder activations at strides 8, 4 and 2 pass through small adapters
   (1x1 conv - ReLU - 1x1 conv) and must equal the frozen network's activations of the input at the
   same strides.
3. Loss (per image, summed over pixels/channels, averaged over the batch):
   ``||x_hat - x||^2 + sum_l ||A_l(d_l) - T_l(x)||^2 + beta * KL(q(z|x) || N(0, I))``.
4. Test: ``z = mu``; the map is the squared pixel error summed over RGB plus every feature-level squared
   error summed over channels, bilinearly upsampled and added, then Gaussian-smoothed (sigma 4 at
   128 px); the image score is its maximum.
5. Optional patch-wise processing (``patch_size``): train on random crops and score non-overlapping
   tiles, so large images keep small defects visible.

Departures, on purpose: the frozen network defaults to the offline EfficientNet-Lite0 (blocks 0, 1, 2:
strides 2, 4, 8) instead of VGG16 conv2_2 / conv3_3 / conv4_3; ``backbone="vgg16"`` gives VGG16 when its
torchvision weights are available, taken at timm's feature points ``features.8/15/22``, i.e. after the
ReLU of those convolutions (the unofficial code hooks the convolution outputs 7/14/21 before the ReLU,
which timm's feature extractor does not expose), and on ImageNet-normalised input (the unofficial code
feeds raw [0, 1] images).  No early stopping on a validation split and no min-max normalisation of the
test maps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from vadlab.backbones import FeatureExtractor, upsample_to
from vadlab.methods.ae_ssim import epoch_batches, epoch_record, gather_images, random_flips, resize_images, seeded
from vadlab.methods.base import AnomalyMethod, check_images
from vadlab.nn.filters import sigma_for, upsample_blur

#: feature points at strides 2, 4, 8 (shallow to deep) for each supported frozen network
TEACHER_LAYERS: dict[str, tuple[str, ...]] = {
    "efficientnet_lite0": ("blocks.0", "blocks.1", "blocks.2"),
    "vgg16": ("features.8", "features.15", "features.22"),
}


@dataclass
class FAVAEConfig:
    """FAVAE hyperparameters; defaults follow the unofficial code (128 px, z 100, Adam 5e-3, 100 epochs)."""

    image_size: int = 128  # images are resized to this
    patch_size: int | None = None  # train on random crops / score tiles of this size (None: whole image)
    backbone: str = "efficientnet_lite0"  # frozen feature network ("vgg16" = the paper's, needs its weights)
    layers: tuple[str, ...] | None = None  # None: TEACHER_LAYERS[backbone] (strides 2, 4, 8)
    weights: str = "imagenet"
    channels: tuple[int, int, int, int] = (128, 256, 512, 512)  # VAE widths at strides 2, 4, 8, 16
    z_dim: int = 100
    kl_weight: float = 1.0
    epochs: int = 100
    batch_size: int = 64
    lr: float = 5e-3
    weight_decay: float = 1e-5
    flips: bool = False  # random flips (the unofficial code's offline augmentation also flips)
    sigma: float = 4.0  # Gaussian blur of the map, in pixels at sigma_reference px
    sigma_reference: int = 128
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def cpu_preset(cls) -> "FAVAEConfig":
        """Small-CPU preset: 64 px, quarter widths, 15 epochs (about a minute per category)."""
        return cls(image_size=64, channels=(32, 64, 128, 128), epochs=15, batch_size=16, lr=5e-3)


def _block(cin: int, cout: int, k: int, s: int, p: int, transpose: bool = False) -> nn.Sequential:
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    return nn.Sequential(conv(cin, cout, k, s, p), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True))


class FeatureVAE(nn.Module):
    """Convolutional VAE whose decoder also returns its activations at strides 8, 4 and 2."""

    def __init__(self, size: int, channels: tuple[int, int, int, int], z_dim: int) -> None:
        super().__init__()
        if size % 16 or size < 16:
            raise ValueError(f"the VAE input size must be a positive multiple of 16, got {size}")
        c1, c2, c3, c4 = channels
        k = size // 16
        self.encoder = nn.Sequential(
            _block(3, c1, 4, 2, 1), _block(c1, c1, 3, 1, 1),
            _block(c1, c2, 4, 2, 1), _block(c2, c2, 3, 1, 1),
            _block(c2, c3, 4, 2, 1), _block(c3, c3, 3, 1, 1),
            _block(c3, c4, 4, 2, 1), nn.Conv2d(c4, 2 * z_dim, k, 1, 0))
        self.stem = nn.Sequential(_block(z_dim, c4, k, 1, 0, transpose=True), _block(c4, c4, 3, 1, 1))
        self.stages = nn.ModuleList([
            nn.Sequential(_block(c4, c3, 4, 2, 1, transpose=True), _block(c3, c3, 3, 1, 1)),  # stride 8
            nn.Sequential(_block(c3, c2, 4, 2, 1, transpose=True), _block(c2, c2, 3, 1, 1)),  # stride 4
            nn.Sequential(_block(c2, c1, 4, 2, 1, transpose=True), _block(c1, c1, 3, 1, 1)),  # stride 2
        ])
        self.head = nn.Sequential(nn.ConvTranspose2d(c1, 3, 4, 2, 1), nn.Sigmoid())
        self.decoder_channels = (c1, c2, c3)  # shallow to deep, like the teacher layers

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image ``[B, 3, S, S]`` and decoder activations at strides 2, 4, 8 (shallow to deep)."""
        h = self.stem(z)
        acts = []
        for stage in self.stages:
            h = stage(h)
            acts.append(h)
        return self.head(h), acts[::-1]


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` per sample ``[B]`` (closed form)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)


class FAVAE(AnomalyMethod):
    """VAE with decoder features matched to a frozen pretrained network; pixel + feature error map."""

    name = "favae"
    Config = FAVAEConfig

    def __init__(self, config: FAVAEConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        self.net_size = cfg.patch_size or cfg.image_size
        if cfg.image_size % self.net_size:
            raise ValueError(f"image_size={cfg.image_size} must be a multiple of patch_size={cfg.patch_size}")
        if cfg.layers is None and cfg.backbone not in TEACHER_LAYERS:
            raise ValueError(f"no default layers for backbone {cfg.backbone!r}; pass layers=(...) at strides "
                             f"2, 4, 8 or use one of {', '.join(TEACHER_LAYERS)}")
        layers = cfg.layers or TEACHER_LAYERS[cfg.backbone]
        self.backbone = FeatureExtractor(cfg.backbone, layers, cfg.weights)
        if len(self.backbone.strides) != 3 or list(self.backbone.strides) != [2, 4, 8]:
            raise ValueError(f"FAVAE needs three teacher layers at strides 2, 4, 8; {layers} have strides "
                             f"{self.backbone.strides}")
        with seeded(cfg.seed):
            self.vae = FeatureVAE(self.net_size, cfg.channels, cfg.z_dim)
            self.adapters = nn.ModuleList([
                nn.Sequential(nn.Conv2d(cd, ct, 1), nn.ReLU(inplace=True), nn.Conv2d(ct, ct, 1))
                for cd, ct in zip(self.vae.decoder_channels, self.backbone.channels)])
        self.history: list[dict[str, float]] = []
        self.to(self.device)

    def forward_errors(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Reconstruction, per-pixel error maps ``[B, 1, s, s]`` (pixel, then each feature level) and KL ``[B]``.

        With a ``generator`` z is sampled (training); without, ``z = mu`` (test).
        """
        mu, logvar = self.vae.encode(x)
        if generator is None:
            z = mu
        else:
            eps = torch.randn(mu.shape, generator=generator).to(mu.device)
            z = mu + eps * (0.5 * logvar).exp()
        recon, acts = self.vae.decode(z)
        with torch.no_grad():
            targets = self.backbone(x)
        errors = [(recon - x).pow(2).sum(1, keepdim=True)]
        errors += [(adapter(a) - t).pow(2).sum(1, keepdim=True)
                   for adapter, a, t in zip(self.adapters, acts, targets)]
        return recon, errors, kl_divergence(mu, logvar)

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Negative ELBO plus feature matching, summed per image and averaged over the batch."""
        _, errors, kl = self.forward_errors(x, generator)
        per_image = sum(e.flatten(1).sum(1) for e in errors) + self.config.kl_weight * kl
        return per_image.mean()

    def _random_patches(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        p, s = self.net_size, self.config.image_size
        if p == s:
            return batch
        ij = torch.randint(0, s - p + 1, (len(batch), 2), generator=generator)
        return torch.stack([img[:, i:i + p, j:j + p] for img, (i, j) in zip(batch, ij.tolist())])

    def fit(self, train_loader: Iterable) -> "FAVAE":
        cfg = self.config
        data = gather_images(train_loader, cfg.image_size, self.device)
        generator = torch.Generator().manual_seed(cfg.seed)
        params = list(self.vae.parameters()) + list(self.adapters.parameters())
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.vae.train()
        self.adapters.train()
        for epoch in tqdm(range(cfg.epochs), desc="favae fit", leave=False):
            start, cpu, total = time.perf_counter(), time.process_time(), 0.0
            for index in epoch_batches(len(data), cfg.batch_size, generator):
                batch = random_flips(data[index], generator) if cfg.flips else data[index]
                loss = self.loss(self._random_patches(batch, generator), generator)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(index)
            self.history.append(epoch_record(epoch, total / len(data), start, cpu))
        self.vae.eval()
        self.adapters.eval()
        return self

    def _tiles(self, x: torch.Tensor) -> torch.Tensor:
        """Split ``[B, 3, S, S]`` into non-overlapping ``patch_size`` tiles ``[B * n * n, 3, p, p]``."""
        p = self.net_size
        b, c, s, _ = x.shape
        n = s // p
        return x.view(b, c, n, p, n, p).permute(0, 2, 4, 1, 3, 5).reshape(b * n * n, c, p, p)

    def _untile(self, t: torch.Tensor, b: int) -> torch.Tensor:
        p = t.shape[-1]
        n = self.config.image_size // p
        return t.view(b, n, n, p, p).permute(0, 1, 3, 2, 4).reshape(b, n * p, n * p)

    @torch.no_grad()
    def error_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Reconstruction ``[B, 3, S, S]`` and error maps ``[B, S, S]`` (pixel, then each feature level) at
        ``image_size``, each upsampled to its tile and tiles reassembled."""
        x = resize_images(check_images(images).to(self.device), self.config.image_size)
        tiles = self._tiles(x)
        recon, errors, _ = self.forward_errors(tiles)
        size = tiles.shape[-2:]
        maps = [self._untile(upsample_to(e, size)[:, 0], len(x)) for e in errors]
        n = self.config.image_size // self.net_size
        recon = recon.view(len(x), n, n, 3, *size).permute(0, 3, 1, 4, 2, 5).reshape(x.shape)
        return recon, maps

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        images = check_images(images).to(self.device)
        scores, maps = [], []
        for chunk in images.split(cfg.batch_size):
            _, errors = self.error_maps(chunk)
            m = upsample_blur(sum(errors), chunk.shape[-2:], sigma_for(cfg.sigma, chunk.shape[-1], cfg.sigma_reference))
            maps.append(m)
            scores.append(m.flatten(1).amax(1))
        return torch.cat(scores), torch.cat(maps)
