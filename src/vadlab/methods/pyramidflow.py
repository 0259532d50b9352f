"""PyramidFlow: a fully normalizing-flow anomaly localiser (Lei et al., CVPR 2023).

1. **Input.**  The paper's baseline needs no pretrained model: a semi-invertible 1x1 convolution lifts
   the RGB image to C channels.  The "pre-trained" variant instead feeds the feature map of a frozen
   encoder's early block (here EfficientNet-Lite0 ``blocks.1``: 24 channels at stride 4, where the
   official code uses ResNet-18's stem + layer1: 64 channels at stride 4).
2. **Invertible pyramid decomposition.**  A Laplacian pyramid with L levels (5x5 binomial blur,
   stride-2 subsampling, nearest upsampling + blur): ``h_l = g_l - up(g_{l+1})``, the last level keeps
   the low-pass ``g_{L-1}``.  It is exactly invertible by composition, ``g_l = h_l + up(g_{l+1})``.
3. **Pyramid coupling blocks.**  ``stacks`` times: every even level is affinely transformed with
   parameters predicted from its (nearest-resized) neighbour levels, then every odd level from its
   even neighbours (a middle level sees both neighbours: the paper's "dual" coupling), then an
   invertible 1x1 conv per level with a centred log-diagonal.  Subnets: conv k x k -> LeakyReLU ->
   conv k x k, last one zero-initialised; log-scales soft-clamped to (-2, 2).
4. **Volume normalization** (the paper's Algorithm 2).  Each log-scale map is made zero-mean: over
   channels (CVN) or positions (SVN) per sample during training, so ``log|det J| = 0`` exactly; a
   running mean (momentum 0.1) replaces the batch statistic at test time.  With ``|det J| = 1`` the
   likelihood ``log p(x) = log p(z)`` can only be raised by pulling latents together, never by
   shrinking space, so the loss needs no log-determinant and cannot collapse.
5. **Loss.**  For every pair of training images in a batch, the per-level squared latent difference is
   composed back to full resolution (pyramid difference), averaged over channels, and the mean
   magnitude of its 2-D Fourier transform is minimised (Fourier loss).  The transform is the
   *unnormalised* DFT, as in the official ``train.py`` (``torch.fft.fft2(diff).abs().mean()``, torch's
   default ``norm="backward"``); ``fft_norm="ortho"`` divides it by ``sqrt(H W)``.  The scale matters
   despite Adam's scale invariance, because the official optimiser settings are absolute: gradient
   norms are clipped at 1.0, Adam's ``eps`` is 1e-4 and its weight decay (1e-5, added to the
   gradient) competes with a gradient ``sqrt(H W)`` times smaller under ``"ortho"``.  Measured at the
   paper's baseline (256 px, 1.4 M parameters, generated bricks): ``"ortho"`` gradient norms are
   0.03-0.05, never clipped, about 3e-5 per parameter, below ``eps``, so Adam's steps shrink several
   fold; the unnormalised loss's norms (4-12) are clipped to 1, about 8e-4 per parameter.  Over the
   first 12 steps (same pairs) the loss, in ortho units, fell 0.0098 -> 0.0013 unnormalised and
   0.0098 -> 0.0048 with ``"ortho"``.  At the 128 px CPU preset (encoder features, lr 1e-3) both are
   always clipped and train alike.
6. **Scoring.**  The latent template is the mean training latent (recomputed, in eval mode, after every
   epoch).  A test image's map is the composed pyramid of ``|z_l - template_l|``, averaged over
   channels (no blur); the image score is its maximum.

Departures from the paper / the official code:

- The lift (baseline only) is a 3 -> C 1x1 conv with orthonormal columns, ``det(W^T W) = 1``.  By
  default it stays **frozen** at that random initialisation, as in the official code (its
  ``SemiInvertible_1x1Conv`` is orthogonally initialised and applied under ``torch.no_grad``);
  ``train_lift=True`` trains it instead, rescaled so that ``det(W^T W)`` stays 1 (volume-normalised).
- The coupling pattern (even levels | odd levels) is a compact form of the paper's scale-wise and dual
  couplings; downsampling is subsampling after blur (the paper's nearest; the code uses max-pool).
- No test-set checkpoint selection (the code keeps the epoch with the best test pixel AUROC), no
  texture flip/rotation augmentation; the pretrained variant uses EfficientNet-Lite0 instead of
  ResNet-18, at the training image size instead of 1024 px.
- Images are resized to the training size before scoring (the running means of volume normalization
  and the template are tied to it) and the map is resized back.

Training never silently produces NaN maps: a non-finite loss or latent raises
:class:`FlowDivergenceError` naming the step and pyramid level.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vadlab.backbones import FeatureExtractor
from vadlab.methods.base import AnomalyMethod, check_images, iter_images
from vadlab.nn.flows import FlowDivergenceError, InvertibleConv1x1, conv_subnet, soft_clamp


@dataclass
class PyramidFlowConfig:
    """PyramidFlow hyperparameters; defaults follow the paper's baseline (C = 16, L = 4, 4 stacks, k = 7)."""

    encoder: str = "none"  # "none": the fully-NF baseline (1x1 lift of RGB); or a backbone name
    encoder_layer: str = "blocks.1"  # pretrained variant: an early block (stride 4, like ResNet-18 layer1)
    weights: str = "imagenet"
    channels: int = 16  # C of the lift (the encoder's channels are used with an encoder)
    levels: int = 4
    stacks: int = 4
    kernel_size: int = 7
    clamp: float = 2.0  # log-scale soft clamp: clamp * 2/pi * atan(s / clamp)
    volume_norm: str = "cvn"  # "cvn" (over channels) or "svn" (over positions)
    momentum: float = 0.1  # running mean of volume normalization
    fft_norm: str = "backward"  # Fourier loss: "backward" = unnormalised DFT (official), "ortho" = / sqrt(HW)
    train_lift: bool = False  # baseline: False = the 3 -> C lift stays at its orthogonal init (official)
    epochs: int = 15
    batch_size: int = 2  # images per step: batch_size * (batch_size - 1) / 2 pairs
    lr: float = 2e-4
    betas: tuple[float, ...] = (0.5, 0.9)
    eps: float = 1e-4
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def cpu_preset(cls) -> "PyramidFlowConfig":
        """Small-CPU preset (use at 128 px; ~1 min for 200 + 80 images on one core)."""
        return cls(**CPU_PRESET)


#: overrides of :class:`PyramidFlowConfig` for the small-CPU preset (use at 128 px)
CPU_PRESET: dict = {"encoder": "efficientnet_lite0", "encoder_layer": "blocks.1", "levels": 3, "stacks": 2,
                    "kernel_size": 3, "epochs": 3, "batch_size": 4, "lr": 1e-3}


# -- invertible pieces ----------------------------------------------------------------------------------
class VolumeNorm(nn.Module):
    """Zero-mean normalization of a log-scale map (Algorithm 2): CVN over channels, SVN over positions.

    Training: subtract each sample's own mean (so the log-scales sum to zero: ``log|det| = 0``) and
    update the running mean; evaluation: subtract the running mean.
    """

    def __init__(self, mode: str = "cvn", momentum: float = 0.1) -> None:
        super().__init__()
        if mode not in ("cvn", "svn"):
            raise ValueError(f"volume_norm must be 'cvn' or 'svn', got {mode!r}")
        self.mode, self.momentum = mode, momentum
        self.register_buffer("running_mean", None)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        dims = (1,) if self.mode == "cvn" else (2, 3)
        if self.training:
            mean = s.mean(dim=dims, keepdim=True)
            with torch.no_grad():
                batch = mean.mean(0, keepdim=True).detach()
                if self.running_mean is None or self.running_mean.shape != batch.shape:
                    self.running_mean = batch.clone()
                else:
                    self.running_mean.mul_(1 - self.momentum).add_(self.momentum * batch)
            return s - mean
        if self.running_mean is None:
            raise RuntimeError("VolumeNorm has no running mean yet: run it in training mode first")
        return s - self.running_mean.to(s.dtype)


class LevelCoupling(nn.Module):
    """Affine transform of one pyramid level with parameters predicted from its neighbour levels."""

    def __init__(self, channels: int, n_neighbours: int, kernel_size: int, clamp: float, vn: str,
                 momentum: float) -> None:
        super().__init__()
        self.clamp = clamp
        self.net = conv_subnet(channels * n_neighbours, 2 * channels, 2 * channels, kernel_size)
        self.norm = VolumeNorm(vn, momentum)

    def params(self, neighbours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.net(neighbours).chunk(2, dim=1)
        return self.norm(soft_clamp(s, self.clamp)), t

    def forward(self, x: torch.Tensor, neighbours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.params(neighbours)
        return x * torch.exp(s) + t, s.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        s, t = self.params(neighbours)
        return (y - t) * torch.exp(-s)


class VolumeNormLift(nn.Module):
    """Semi-invertible 1x1 conv ``R^3 -> R^C`` with ``det(W^T W) = 1`` (left inverse by least squares)."""

    def __init__(self, in_channels: int, out_channels: int, seed: int = 0, trainable: bool = True) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(out_channels, in_channels, generator=gen, dtype=torch.float64))
        self.raw = nn.Parameter(q.float(), requires_grad=trainable)  # orthonormal columns

    def weight(self) -> torch.Tensor:
        gram = self.raw.T @ self.raw
        return self.raw / torch.linalg.det(gram).clamp_min(1e-12) ** (1.0 / (2 * self.raw.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,bchw->bohw", self.weight().to(x.dtype), x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return torch.einsum("co,bohw->bchw", torch.linalg.pinv(self.weight().to(y.dtype)), y)


def _binomial_blur(x: torch.Tensor) -> torch.Tensor:
    """Depthwise 5x5 binomial blur (1 4 6 4 1)/16 per axis, reflect padding."""
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device) / 16
    c = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > 2 else "replicate"
    x = F.pad(x, (2, 2, 2, 2), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, 5).expand(c, 1, 1, 5).contiguous(), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1).contiguous(), groups=c)


def _up(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return _binomial_blur(F.interpolate(x, size=size, mode="nearest"))


def pyramid_decompose(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Laplacian pyramid ``[h_0 (finest), ..., h_{L-2}, g_{L-1} (low-pass)]`` of maps ``[B, C, H, W]``."""
    out, g = [], x
    for _ in range(levels - 1):
        low = _binomial_blur(g)[..., ::2, ::2]
        out.append(g - _up(low, g.shape[-2:]))
        g = low
    out.append(g)
    return out


def pyramid_compose(pyramid: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`pyramid_decompose`: ``g_l = h_l + up(g_{l+1})`` from the coarsest level down."""
    g = pyramid[-1]
    for h in reversed(pyramid[:-1]):
        g = h + _up(g, h.shape[-2:])
    return g


class PyramidFlowNet(nn.Module):
    """The invertible map from pyramid levels to latent levels (``stacks`` pyramid coupling blocks)."""

    def __init__(self, channels: int, levels: int, stacks: int, kernel_size: int, clamp: float,
                 vn: str = "cvn", momentum: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"PyramidFlow needs at least 2 pyramid levels, got {levels}")
        self.levels = levels
        self.steps = nn.ModuleList()
        self.mixers = nn.ModuleList()
        for k in range(stacks):
            for parity in (0, 1):
                self.steps.append(nn.ModuleDict({
                    str(l): LevelCoupling(channels, len(self._neighbours(l)), kernel_size, clamp, vn, momentum)
                    for l in range(parity, levels, 2)}))
            self.mixers.append(nn.ModuleList(InvertibleConv1x1(channels, seed=seed + 97 * k + l, volume_norm=True)
                                             for l in range(levels)))

    def _neighbours(self, level: int) -> list[int]:
        return [n for n in (level - 1, level + 1) if 0 <= n < self.levels]

    def _context(self, zs: list[torch.Tensor], level: int) -> torch.Tensor:
        size = zs[level].shape[-2:]
        return torch.cat([F.interpolate(zs[n], size=size, mode="nearest") for n in self._neighbours(level)], dim=1)

    def forward(self, pyramid: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        zs = list(pyramid)
        logdet = zs[0].new_zeros(zs[0].shape[0])
        for k, mixers in enumerate(self.mixers):
            for step in self.steps[2 * k:2 * k + 2]:
                for key, coupling in step.items():
                    l = int(key)
                    zs[l], ld = coupling(zs[l], self._context(zs, l))
                    logdet = logdet + ld
            for l, mixer in enumerate(mixers):
                zs[l], ld = mixer(zs[l])
                logdet = logdet + ld
        return zs, logdet

    def inverse(self, latents: list[torch.Tensor]) -> list[torch.Tensor]:
        zs = list(latents)
        for k in reversed(range(len(self.mixers))):
            for l, mixer in enumerate(self.mixers[k]):
                zs[l] = mixer.inverse(zs[l])
            for step in reversed(self.steps[2 * k:2 * k + 2]):
                for key, coupling in step.items():
                    l = int(key)
                    zs[l] = coupling.inverse(zs[l], self._context(zs, l))
        return zs


# -- the method ----------------------------------------------------------------------------------------
FFT_NORMS = ("backward", "ortho")


def fourier_loss(diff_map: torch.Tensor, norm: str = "backward") -> torch.Tensor:
    """Mean magnitude of the 2-D Fourier transform of difference maps ``[P, H, W]``.

    ``norm="backward"`` (torch's default, the official code's): the unnormalised DFT; ``"ortho"``: divided
    by ``sqrt(H W)`` (a unitary transform, so the loss no longer grows with the map size).
    """
    if norm not in FFT_NORMS:
        raise ValueError(f"fft_norm must be one of {FFT_NORMS}, got {norm!r}")
    return torch.fft.fft2(diff_map, norm=norm).abs().mean()


class PyramidFlow(AnomalyMethod):
    """Pyramid normalizing flow with volume normalization; maps = pyramid difference to a latent template."""

    name = "pyramidflow"
    Config = PyramidFlowConfig

    def __init__(self, config: PyramidFlowConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        if cfg.fft_norm not in FFT_NORMS:
            raise ValueError(f"fft_norm must be one of {FFT_NORMS}, got {cfg.fft_norm!r}")
        torch.manual_seed(cfg.seed)
        if cfg.encoder == "none":
            self.backbone = None
            self.lift = VolumeNormLift(3, cfg.channels, seed=cfg.seed, trainable=cfg.train_lift)
            channels, self.stride = cfg.channels, 1
            self.register_buffer("pixel_mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
            self.register_buffer("pixel_std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        else:
            self.backbone = FeatureExtractor(cfg.encoder, (cfg.encoder_layer,), cfg.weights)
            self.lift = None
            channels, self.stride = self.backbone.channels[0], self.backbone.strides[0]
        self.flow = PyramidFlowNet(channels, cfg.levels, cfg.stacks, cfg.kernel_size, cfg.clamp,
                                   cfg.volume_norm, cfg.momentum, cfg.seed)
        for l in range(cfg.levels):
            self.register_buffer(f"template_{l}", None)
        self.register_buffer("train_size", None)
        self.to(self.device)

    # -- model ---------------------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The flow's input ``[B, C, H', W']``: the lifted normalised image, or frozen encoder features."""
        if self.backbone is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_lift):
                return self.lift((images - self.pixel_mean) / self.pixel_std)
        with torch.no_grad():
            return self.backbone(images)[0]

    def latents(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Latent pyramid ``[z_0 (finest), ..., z_{L-1}]`` of images in [0, 1]."""
        zs, _ = self.flow(pyramid_decompose(self.features(images), self.config.levels))
        return zs

    def template(self) -> list[torch.Tensor]:
        return [getattr(self, f"template_{l}") for l in range(self.config.levels)]

    def check_input_size(self, size: int) -> None:
        self._check_size((size, size))

    def _check_size(self, size: tuple[int, int]) -> None:
        unit = self.stride * 2 ** (self.config.levels - 1)
        if size[0] % unit or size[1] % unit:
            raise ValueError(f"image size {tuple(size)} must be a multiple of {unit} for {self.config.levels} "
                             f"pyramid levels (stride {self.stride}); resize the images or lower levels")

    # -- loss ----------------------------------------------------------------------------------------
    def pair_loss(self, zs: list[torch.Tensor], step: int = 0) -> torch.Tensor:
        """Fourier loss of the composed pyramid of squared latent differences over all pairs in the batch."""
        for l, z in enumerate(zs):
            if not torch.isfinite(z).all():
                raise FlowDivergenceError(f"PyramidFlow training diverged at step {step}: non-finite latent at "
                                          f"pyramid level {l}; lower lr (now {self.config.lr}) or clamp")
        pairs = list(itertools.combinations(range(zs[0].shape[0]), 2))
        i = torch.tensor([p[0] for p in pairs], device=zs[0].device)
        j = torch.tensor([p[1] for p in pairs], device=zs[0].device)
        diff = pyramid_compose([(z[i] - z[j]) ** 2 for z in zs]).mean(1)
        return fourier_loss(diff, self.config.fft_norm)

    def _update_template(self, loader: Iterable) -> None:
        self.flow.eval()
        sums, n = None, 0
        with torch.no_grad():
            for images in iter_images(loader, self.device):
                zs = self.latents(images)
                batch = [z.sum(0) for z in zs]
                sums = batch if sums is None else [a + b for a, b in zip(sums, batch)]
                n += len(images)
        for l, s in enumerate(sums):
            if not torch.isfinite(s).all():
                raise FlowDivergenceError(f"PyramidFlow latent template is non-finite at pyramid level {l}; "
                                          "lower lr or clamp")
            setattr(self, f"template_{l}", s / n)

    def fit(self, train_loader: Iterable) -> "PyramidFlow":
        cfg = self.config
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                     weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed)
        images_all = torch.cat(list(iter_images(train_loader, "cpu")))
        if len(images_all) < 2:
            raise ValueError("PyramidFlow needs at least 2 training images (its loss compares pairs)")
        self._check_size(images_all.shape[-2:])
        self.train_size = torch.tensor(images_all.shape[-2:])
        bs = max(2, cfg.batch_size)
        step = 0
        #: per epoch: mean pair loss over the epoch's steps (not saved)
        self.history: list[dict[str, float]] = []
        for epoch in tqdm(range(cfg.epochs), desc="pyramidflow fit", leave=False):
            epoch_loss, epoch_steps = 0.0, 0
            self.flow.train()
            if self.lift is not None:
                self.lift.train()
            order = torch.randperm(len(images_all), generator=gen)
            for start in range(0, len(order) - 1, bs):
                idx = order[start:start + bs]
                if len(idx) < 2:
                    continue
                zs = self.latents(images_all[idx].to(self.device))
                loss = self.pair_loss(zs, step)
                if not torch.isfinite(loss):
                    raise FlowDivergenceError(f"PyramidFlow training diverged at step {step} (epoch {epoch}): "
                                              f"loss = {loss.item()}; lower lr (now {cfg.lr}) or clamp")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                step += 1
                epoch_loss, epoch_steps = epoch_loss + loss.item(), epoch_steps + 1
            self.history.append({"epoch": epoch, "loss": epoch_loss / max(epoch_steps, 1)})
            self._update_template(images_all.split(max(bs, 16)))
        self.eval()
        return self

    # -- scoring -------------------------------------------------------------------------------------
    @torch.no_grad()
    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        """Pyramid difference to the template, averaged over channels: ``[B, H, W]`` at the training size."""
        zs = self.latents(images)
        diff = pyramid_compose([(z - t).abs() for z, t in zip(zs, self.template())]).mean(1)
        size = tuple(int(s) for s in self.train_size)
        return F.interpolate(diff[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.template_0 is None:
            raise RuntimeError("PyramidFlow.predict called before fit(); fit on defect-free images first")
        images = check_images(images).to(self.device)
        self.eval()
        size = images.shape[-2:]
        train_size = tuple(int(s) for s in self.train_size)
        scores, maps = [], []
        for chunk in images.split(16):
            if chunk.shape[-2:] != train_size:
                chunk = F.interpolate(chunk, size=train_size, mode="bilinear", align_corners=False)
            m = self.anomaly_map(chunk)
            if m.shape[-2:] != size:
                m = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            if not torch.isfinite(m).all():
                raise FlowDivergenceError("PyramidFlow produced a non-finite anomaly map; the model diverged")
            maps.append(m)
            scores.append(m.flatten(1).amax(1))
        return torch.cat(scores), torch.cat(maps)


__all__ = ["CPU_PRESET", "FFT_NORMS", "FlowDivergenceError", "LevelCoupling", "PyramidFlow", "PyramidFlowConfig",
           "PyramidFlowNet", "VolumeNorm", "VolumeNormLift", "fourier_loss", "pyramid_compose",
           "pyramid_decompose"]
