"""RIAD: reconstruction by inpainting (Zavrtanik, Kristan & Skocaj, Pattern Recognition 2021).

A plain autoencoder reconstructs anomalies too well because it sees them.  RIAD never lets the network
see the pixels it must produce:

1. Masks: the image is cut into a grid of ``k x k``-pixel cells (``k`` drawn from {2, 4, 8, 16} per
   batch); the cells are shuffled and dealt into ``n = 3`` disjoint sets, giving masks ``M_1..M_n``
   whose hidden parts partition the image (:func:`inpainting_masks`).
2. Inpainting: a U-Net sees ``x * M_i`` (hidden cells zeroed) and the reconstruction takes each pixel
   from the pass in which it was hidden:  ``x_hat = sum_i U(x * M_i) * (1 - M_i)``.
3. Loss: ``L = L2 + lambda_G * MSGMS + lambda_S * SSIM`` (all weights 1), with random horizontal and
   vertical flips as augmentation.
4. Test: every ``k`` is used; the MSGMS distance maps ``1 - GMS`` of the ``k`` reconstructions are
   averaged, Gaussian-smoothed (sigma 7 at 256 px) and the image score is the maximum.

Departures, on purpose: there is no official code; the unofficial one weights the map of cell size
``k`` by ``1 / N^2`` with ``N = size / k`` (so ``k = 16`` counts 64x more than ``k = 2``), which reads
as an artefact - we take the plain average over ``k`` as the paper describes.  The unofficial code also
early-stops on a validation split and min-max normalises maps over the test set; we train a fixed
number of epochs and do not normalise (neither changes AUROC-type metrics).  Cell sizes are given at
256 px and scaled to ``image_size`` (:func:`cell_sizes`), so a small preset keeps the paper's
geometry relative to the image.  MSGMS works on the channel-mean grey image without the unofficial
code's 3x3 median pre-filter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vadlab.methods.ae_ssim import epoch_batches, epoch_record, gather_images, random_flips, resize_images, seeded
from vadlab.methods.base import AnomalyMethod, check_images
from vadlab.nn.filters import sigma_for, upsample_blur
from vadlab.nn.similarity import msgms_loss, msgms_map, ssim_loss


@dataclass
class RIADConfig:
    """RIAD hyperparameters; defaults follow the paper / unofficial code (256 px, k in {2,4,8,16}, n = 3)."""

    image_size: int = 256  # images are resized to this
    channels: tuple[int, ...] = (64, 128, 256, 512, 512)  # U-Net widths, one per resolution
    k_values: tuple[int, ...] = (2, 4, 8, 16)  # cell sizes in pixels at reference_size
    reference_size: int = 256
    n_masks: int = 3
    weight_l2: float = 1.0
    weight_gms: float = 1.0
    weight_ssim: float = 1.0
    epochs: int = 300
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-5
    flips: bool = True
    sigma: float = 7.0  # Gaussian blur of the map, in pixels at 256 px
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def cpu_preset(cls) -> "RIADConfig":
        """Small-CPU preset: 64 px, a four-level 16-128 U-Net, 6 epochs (about 35 s per category on one core;
        an epoch costs three U-Net passes per image)."""
        return cls(image_size=64, channels=(16, 32, 64, 128), epochs=6, batch_size=8, lr=1e-3)


# ----------------------------------------------------------------------------- masks


def cell_sizes(k_values: tuple[int, ...], image_size: int, reference_size: int = 256) -> list[int]:
    """The paper's cell sizes (given at ``reference_size``) scaled to ``image_size``, at least 1, deduplicated."""
    sizes = sorted({max(1, round(k * image_size / reference_size)) for k in k_values})
    if any(k > image_size for k in sizes):
        raise ValueError(f"cell sizes {sizes} exceed the image size {image_size}")
    return sizes


def inpainting_masks(size: int, k: int, n: int = 3, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` masks ``[n, 1, size, size]`` (1 = visible, 0 = hidden) whose hidden parts partition the image.

    The image is cut into ``ceil(size / k)^2`` cells of ``k x k`` pixels, dealt at random into ``n``
    sets of (nearly) equal size; mask ``i`` hides the cells of set ``i``.
    """
    if not 1 <= k <= size:
        raise ValueError(f"cell size k={k} must be in 1..{size}")
    if n < 2:
        raise ValueError(f"need at least n=2 masks, got {n}")
    cells = -(-size // k)
    owner = torch.randperm(cells * cells, generator=generator) % n
    grid = owner.view(cells, cells).repeat_interleave(k, 0).repeat_interleave(k, 1)[:size, :size]
    return torch.stack([(grid != i) for i in range(n)]).float()[:, None]


# ----------------------------------------------------------------------------- U-Net


def _conv_bn_relu(cin: int, cout: int, k: int = 3, s: int = 1, p: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, s, p, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class UNet(nn.Module):
    """U-Net: a 3x3 stem, 4x4 stride-2 downsampling blocks, transposed-conv upsampling with skips, tanh out."""

    def __init__(self, channels: tuple[int, ...] = (64, 128, 256, 512, 512)) -> None:
        super().__init__()
        c = list(channels)
        self.down = nn.ModuleList([nn.Sequential(*_conv_bn_relu(3, c[0]), *_conv_bn_relu(c[0], c[0]))])
        for cin, cout in zip(c[:-1], c[1:]):
            self.down.append(nn.Sequential(*_conv_bn_relu(cin, cout, 4, 2, 1), *_conv_bn_relu(cout, cout)))
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for cin, cskip in zip(c[::-1][:-1], c[::-1][1:]):
            self.up.append(nn.Sequential(nn.ConvTranspose2d(cin, cskip, 4, 2, 1, bias=False),
                                         nn.BatchNorm2d(cskip), nn.ReLU(inplace=True)))
            self.merge.append(nn.Sequential(*_conv_bn_relu(2 * cskip, cskip), *_conv_bn_relu(cskip, cskip)))
        self.out = nn.Conv2d(c[0], 3, 3, 1, 1)
        self.factor = 2 ** (len(c) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"U-Net input size {tuple(x.shape[-2:])} must be divisible by {self.factor}")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return torch.tanh(self.out(x))


# ----------------------------------------------------------------------------- method


class RIAD(AnomalyMethod):
    """U-Net inpainting of disjoint grid masks; anomaly map = MSGMS distance averaged over cell sizes."""

    name = "riad"
    Config = RIADConfig

    def __init__(self, config: RIADConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        factor = 2 ** (len(cfg.channels) - 1)
        if cfg.image_size % factor:
            raise ValueError(f"image_size={cfg.image_size} must be divisible by {factor} for a U-Net with "
                             f"{len(cfg.channels)} levels; change image_size or channels")
        self.k_test = cell_sizes(cfg.k_values, cfg.image_size, cfg.reference_size)
        with seeded(cfg.seed):
            self.net = UNet(cfg.channels)
        self.history: list[dict[str, float]] = []
        self.to(self.device, memory_format=torch.channels_last)  # CPU fit 1.24-1.35x; numbers equal up to rounding

    def inpaint(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``images`` [B, 3, S, S] in [0, 1] from the ``n`` disjoint ``masks`` [n, 1, S, S]."""
        n, b = masks.shape[0], images.shape[0]
        masks = masks.to(images.device)
        hidden_in = ((images * 2 - 1)[None] * masks[:, None]).flatten(0, 1)  # zero = grey in [-1, 1]
        out = (self.net(hidden_in).view(n, b, *images.shape[1:]) + 1) / 2
        return (out * (1 - masks[:, None])).sum(0)

    def loss(self, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return (cfg.weight_l2 * F.mse_loss(recon, images) + cfg.weight_gms * msgms_loss(recon, images)
                + cfg.weight_ssim * ssim_loss(recon, images))

    def fit(self, train_loader: Iterable) -> "RIAD":
        cfg = self.config
        data = gather_images(train_loader, cfg.image_size, self.device)
        k_train = cell_sizes(cfg.k_values, cfg.image_size, cfg.reference_size)
        generator = torch.Generator().manual_seed(cfg.seed)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.net.train()
        for epoch in tqdm(range(cfg.epochs), desc="riad fit", leave=False):
            start, cpu, total = time.perf_counter(), time.process_time(), 0.0
            for index in epoch_batches(len(data), cfg.batch_size, generator):
                batch = random_flips(data[index], generator) if cfg.flips else data[index]
                k = k_train[int(torch.randint(len(k_train), (1,), generator=generator))]
                masks = inpainting_masks(cfg.image_size, k, cfg.n_masks, generator)
                loss = self.loss(batch, self.inpaint(batch, masks))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(index)
            self.history.append(epoch_record(epoch, total / len(data), start, cpu))
        self.net.eval()
        return self

    def test_masks(self) -> dict[int, torch.Tensor]:
        """The fixed test masks for every cell size (same seed every call, so predictions are repeatable)."""
        generator = torch.Generator().manual_seed(self.config.seed + 1)
        return {k: inpainting_masks(self.config.image_size, k, self.config.n_masks, generator) for k in self.k_test}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """Inpainted reconstructions ``{k: [B, 3, S, S]}`` at ``image_size``, one per test cell size."""
        x = resize_images(check_images(images).to(self.device), self.config.image_size)
        return {k: self.inpaint(x, m) for k, m in self.test_masks().items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        images = check_images(images).to(self.device)
        masks = self.test_masks()
        scores, maps = [], []
        for chunk in images.split(cfg.batch_size):
            x = resize_images(chunk, cfg.image_size)
            dist = torch.stack([msgms_map(x, self.inpaint(x, m)) for m in masks.values()]).mean(0)
            m = upsample_blur(dist, chunk.shape[-2:], sigma_for(cfg.sigma, chunk.shape[-1]))
            maps.append(m)
            scores.append(m.flatten(1).amax(1))
        return torch.cat(scores), torch.cat(maps)
