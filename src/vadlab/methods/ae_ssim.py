"""AE-SSIM: a convolutional autoencoder trained with an SSIM loss (Bergmann et al., VISAPP 2019).

The baseline of the reconstruction chapter.  An autoencoder is trained on defect-free images only;
where a test image holds something it never saw, the reconstruction should fail and the local
structural dissimilarity ``1 - SSIM(x, x_hat)`` lights up.

1. Encoder: 4x4 stride-2 and 3x3 convolutions (32-32-32-64-64-128-64-32 channels, LeakyReLU 0.2), then
   a ``P/16 x P/16`` convolution to a ``latent_dim`` bottleneck (1x1 spatial) for inputs of ``P`` px;
   the decoder mirrors it.
2. Patches (``patch_size``): on textures the paper trains on random crops (128 px of the larger
   image, latent 100) rather than whole images, so the bottleneck has to describe a small piece of
   texture, not a whole image; at test the image is reconstructed tile by tile with a stride
   (``patch_stride``) and the residual maps of overlapping tiles are averaged.  ``None`` = whole images.
3. Loss: ``mean(1 - SSIM(x, x_hat))`` with an 11-tap Gaussian window (sigma 1.5).
4. Map: ``1 - SSIM`` averaged over RGB (and overlapping tiles), upsampled to the input size and
   Gaussian-smoothed; image score = its maximum.

Departures from the paper, on purpose: RGB images (the paper used grey-scale) with SSIM averaged over
channels; no offline augmentation to 10,000 patches (one random crop per image and epoch instead, with
optional flips); a sigmoid output; the map is Gaussian-smoothed (sigma 4 at 256 px) and its maximum
is the image score (the paper only thresholds the residual map).

The helpers :func:`gather_images`, :func:`resize_images`, :func:`epoch_batches` and :func:`seeded`
are shared by the trained methods of this family (RIAD, FAVAE, MKD).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vadlab.methods.base import AnomalyMethod, check_images, iter_images
from vadlab.nn.filters import sigma_for, upsample_blur
from vadlab.nn.similarity import ssim_loss, ssim_map

# ----------------------------------------------------------------------------- shared training helpers


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[B, C, H, W]`` images to ``size x size`` (bilinear, antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    shrink = images.shape[-1] > size or images.shape[-2] > size
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=shrink).clamp(0, 1)


def gather_images(loader: Iterable, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """All training images of ``loader`` resized to ``size``, as one tensor (read once, reused every epoch)."""
    chunks = [resize_images(x, size) for x in iter_images(loader, device)]
    if not chunks:
        raise ValueError("the training loader yielded no images; check the dataset path and split")
    return torch.cat(chunks)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of one shuffled epoch over ``n`` items (the last, smaller batch is kept)."""
    order = torch.randperm(n, generator=generator)
    yield from order.split(batch_size)


def epoch_record(epoch: int, loss: float, start: float, cpu_start: float) -> dict[str, float]:
    """One ``history`` entry: mean loss, wall seconds and CPU seconds of the epoch (CPU time is what an
    unshared core would need, when other processes share the machine)."""
    return {"epoch": epoch, "loss": loss, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random ``size x size`` crop of each image (the images themselves when they are that size)."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    i = torch.randint(0, h - size + 1, (len(images),), generator=generator).tolist()
    j = torch.randint(0, w - size + 1, (len(images),), generator=generator).tolist()
    return torch.stack([img[:, a:a + size, b:b + size] for img, a, b in zip(images, i, j)])


def random_flips(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally and/or vertically with probability 1/2 each."""
    b = images.shape[0]
    h = torch.rand(b, generator=generator) < 0.5
    v = torch.rand(b, generator=generator) < 0.5
    out = images.clone()
    out[h] = out[h].flip(-1)
    out[v] = out[v].flip(-2)
    return out


# ----------------------------------------------------------------------------- model


@dataclass
class AESSIMConfig:
    """AE-SSIM hyperparameters; defaults follow Bergmann et al. (128 px, d = 100, Adam 2e-4, wd 1e-5)."""

    image_size: int = 128  # images are resized to this
    patch_size: int | None = None  # train on random crops / reconstruct sliding tiles of this size (None: whole image)
    patch_stride: int | None = None  # stride of the test tiles (None: patch_size // 2)
    latent_dim: int = 100  # bottleneck channels (paper: 100 textures, 500 objects)
    bottleneck_grid: int = 1  # spatial size of the bottleneck (paper: 1, a vector)
    epochs: int = 200
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 1e-5
    flips: bool = False  # random horizontal/vertical flips as augmentation
    window_size: int = 11
    window_sigma: float = 1.5
    sigma: float = 4.0  # Gaussian blur of the map, in pixels at 256 px
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def cpu_preset(cls) -> "AESSIMConfig":
        """Small-CPU preset: 64 px images, 32-px patches (a quarter of the image area), latent 100 as the
        paper uses for textures, 40 epochs of one crop per image (about 15 s per category on one core).  By
        epoch 20 the training loss has made 99 % of its 80-epoch decrease in every generated category."""
        return cls(image_size=64, patch_size=32, latent_dim=100, epochs=40, batch_size=16, lr=1e-3)


def _conv(cin: int, cout: int, k: int, s: int, p: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, p), nn.LeakyReLU(0.2))


def _deconv(cin: int, cout: int, k: int, s: int, p: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, k, s, p), nn.LeakyReLU(0.2))


class ConvAutoencoder(nn.Module):
    """Bergmann et al.'s convolutional autoencoder for ``size x size`` images (size a multiple of 16)."""

    def __init__(self, size: int = 128, latent_dim: int = 100, grid: int = 1) -> None:
        super().__init__()
        if size % 16 or size < 16:
            raise ValueError(f"image_size must be a positive multiple of 16, got {size}")
        if not 1 <= grid <= size // 16:
            raise ValueError(f"bottleneck_grid must be in 1..{size // 16} for image_size {size}, got {grid}")
        k = size // 16 - grid + 1
        self.encoder = nn.Sequential(
            _conv(3, 32, 4, 2, 1), _conv(32, 32, 4, 2, 1), _conv(32, 32, 3, 1, 1),
            _conv(32, 64, 4, 2, 1), _conv(64, 64, 3, 1, 1), _conv(64, 128, 4, 2, 1),
            _conv(128, 64, 3, 1, 1), _conv(64, 32, 3, 1, 1), nn.Conv2d(32, latent_dim, k, 1, 0))
        self.decoder = nn.Sequential(
            _deconv(latent_dim, 32, k, 1, 0), _conv(32, 64, 3, 1, 1), _conv(64, 128, 3, 1, 1),
            _deconv(128, 64, 4, 2, 1), _conv(64, 64, 3, 1, 1), _deconv(64, 32, 4, 2, 1),
            _conv(32, 32, 3, 1, 1), _deconv(32, 32, 4, 2, 1), nn.ConvTranspose2d(32, 3, 4, 2, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class AESSIM(AnomalyMethod):
    """Convolutional autoencoder with SSIM loss; anomaly map ``1 - SSIM(x, x_hat)``."""

    name = "ae_ssim"
    Config = AESSIMConfig

    def __init__(self, config: AESSIMConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        self.net_size = cfg.patch_size or cfg.image_size
        if self.net_size > cfg.image_size:
            raise ValueError(f"patch_size={cfg.patch_size} exceeds image_size={cfg.image_size}")
        self.stride = cfg.patch_stride or max(1, self.net_size // 2)
        if (cfg.image_size - self.net_size) % self.stride:
            raise ValueError(f"tiles of {self.net_size} px at stride {self.stride} do not cover image_size="
                             f"{cfg.image_size} exactly; pick patch_stride dividing image_size - patch_size")
        with seeded(cfg.seed):
            self.net = ConvAutoencoder(self.net_size, cfg.latent_dim, cfg.bottleneck_grid)
        self.history: list[dict[str, float]] = []
        self.to(self.device)

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """SSIM loss of the reconstruction of ``images`` (already at ``image_size``)."""
        cfg = self.config
        return ssim_loss(self.net(images), images, cfg.window_size, cfg.window_sigma)

    def fit(self, train_loader: Iterable) -> "AESSIM":
        cfg = self.config
        data = gather_images(train_loader, cfg.image_size, self.device)
        generator = torch.Generator().manual_seed(cfg.seed)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.net.train()
        for epoch in tqdm(range(cfg.epochs), desc="ae_ssim fit", leave=False):
            start, cpu, total = time.perf_counter(), time.process_time(), 0.0
            for index in epoch_batches(len(data), cfg.batch_size, generator):
                batch = random_crops(data[index], self.net_size, generator)
                if cfg.flips:
                    batch = random_flips(batch, generator)
                loss = self.loss(batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(index)
            self.history.append(epoch_record(epoch, total / len(data), start, cpu))
        self.net.eval()
        return self

    def _tiles(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Sliding ``net_size`` tiles ``[B * T, 3, p, p]`` of ``[B, 3, S, S]`` and the tile count ``T`` per image."""
        p, s = self.net_size, self.stride
        cols = F.unfold(x, p, stride=s)  # [B, 3 p p, T]
        t = cols.shape[-1]
        return cols.transpose(1, 2).reshape(-1, 3, p, p), t

    def _untile(self, tiles: torch.Tensor, b: int) -> torch.Tensor:
        """Average per-tile maps ``[B * T, C, p, p]`` back onto ``[B, C, S, S]`` where tiles overlap."""
        p, s, size = self.net_size, self.stride, self.config.image_size
        c = tiles.shape[1]
        cols = tiles.reshape(b, -1, c * p * p).transpose(1, 2)
        total = F.fold(cols, size, p, stride=s)
        count = F.fold(torch.ones_like(cols[:1, : p * p]), size, p, stride=s)
        return total / count

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstructions of ``images`` [B, 3, H, W] in [0, 1] at ``image_size`` (overlapping tiles averaged)."""
        x = resize_images(check_images(images).to(self.device), self.config.image_size)
        tiles, _ = self._tiles(x)
        return self._untile(self.net(tiles), len(x))

    @torch.no_grad()
    def dissimilarity(self, x: torch.Tensor) -> torch.Tensor:
        """``1 - SSIM`` of every tile and its reconstruction, averaged over RGB and overlapping tiles ``[B, S, S]``."""
        cfg = self.config
        tiles, _ = self._tiles(x)
        dissim = 1 - ssim_map(self.net(tiles), tiles, cfg.window_size, cfg.window_sigma).mean(1, keepdim=True)
        return self._untile(dissim, len(x))[:, 0]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        images = check_images(images).to(self.device)
        scores, maps = [], []
        for chunk in images.split(cfg.batch_size):
            dissim = self.dissimilarity(resize_images(chunk, cfg.image_size))
            m = upsample_blur(dissim, chunk.shape[-2:], sigma_for(cfg.sigma, chunk.shape[-1]))
            maps.append(m)
            scores.append(m.flatten(1).amax(1))
        return torch.cat(scores), torch.cat(maps)
