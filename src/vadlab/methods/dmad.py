"""DMAD: diversity-measurable anomaly detection (Liu et al., CVPR 2023, arXiv 2303.05047).

A reconstruction model that separates *how much the input had to be deformed* from *what could
not be reconstructed*, so normal diversity (pose, shape, small shifts) is measured and bounded
instead of being mistaken for a defect.  Two parts, as in the paper's sections 2.2-2.6:

1. **Information compression** ``phi``: a trained encoder ``f`` gives ``z_e = f(x)`` at 1/8 of the
   image; a VQ layer (:mod:`vadlab.nn.vq`) replaces each vector by its nearest of ``N`` memory
   items, ``z_q``, with ``L_com = ||SG(z_e) - z_q||^2 + beta ||z_e - SG(z_q)||^2`` and a
   straight-through gradient.  A decoder ``g`` with positional embedding ``PE`` (two coordinate
   channels) draws the prototypical *reference* ``g(PE(z_q))``.
2. **Pyramid deformation module (PDM)** ``psi``: an estimator ``h`` on ``PE(x)`` with ``K`` heads gives
   coarse-to-fine offset fields ``O_1 .. O_K`` (2 channels, at strides ``field_strides``, bounded by
   ``tanh`` to ``max_offsets`` pixels), upsampled to the image and applied one after another to the
   reference by grid sampling (:mod:`vadlab.nn.warp`): ``xbar_k = ref (.) O_1 ... (.) O_k``.
   ``L_df = sum_k ||grad O_k||_1 + ||O_k||_2``.
3. **Foreground/background selection**: a learnt background template ``x_bg`` and a predicted mask
   ``m = f_m(x)``: ``xhat_k = m xbar_k + (1 - m) x_bg``.
4. Training: ``L = sum_k Dis(x, xhat_k) + gamma1 L_com + gamma2 L_df`` with ``Dis`` the squared error.
   Inference: ``A_rec = Dis(x, xhat_K)``, ``A_df = sum_k ||O_k||_2``;
   image score ``max(A_rec * k) + alpha max(A_df * k)`` (``k`` a Gaussian), pixel map likewise.

**PDM+** (section 2.6, ``variant="pdm+"``, the paper's choice for industrial images): the fields deform
the *input* towards the prototype, ``x' = x (.) O_1 ... (.) O_K``, which is compressed and
reconstructed, ``xhat = g(PE(phi(f(x'))))``; backward fields ``O^T_k`` from the same estimator must
undo the warp, ``L_cyc = ||x - x' (.) O^T_K ... (.) O^T_1||^2``;
``L+ = Dis(x', xhat) + gamma1 L_com + gamma2 L+_df + gamma3 L_cyc`` with ``L+_df`` over both
directions.  Scores: ``A+_rec = Dis(x', xhat)`` carried back to the input frame by the backward
fields, ``A+_df`` = forward magnitudes (each carried along the later forward fields, then back)
plus backward magnitudes (each carried along the earlier backward fields), all in the input frame.

**PPDM** (``variant="ppdm"``): the design of the official MVTec code, which the paper's MVTec numbers
(99.5 image AUROC) measure; the seed does not describe it.  The input is deformed as in PDM+ and then
reconstructed *in feature space* by reverse distillation (Deng & Li, CVPR 2022): a frozen pretrained
encoder ``E`` gives maps ``E_1 .. E_L`` of ``x'``; the deepest is quantised by the memory (``N`` items of
its channel width); every map is reduced to ``bottleneck_channels`` at the deepest stride, concatenated
with the quantised one and fused one stride further down (the bottleneck); a reverse decoder ``D``
reconstructs every ``E_l`` from it.  ``Dis`` is the per-position cosine distance,
``L_rec = sum_l mean_hw (1 - cos(E_l(h, w), D_l(h, w)))`` (the RD paper's Eq. 2; ``feature_loss="flatten"``
is the official code's cosine of the whole flattened maps), and ``A_rec = sum_l up(1 - cos_l)`` is carried
back to the input frame by the backward fields; ``L_df``, ``L_cyc``, ``A_df`` and the scores are PDM+'s.
``L_rec`` reaches the fields *through* the frozen encoder; the encoder's weights never change.

Choices where the seed is silent, and departures:

* Encoder/decoder/estimator are small plain CNNs (widths ``channels``) trained from scratch, as the
  seed's sample-space formulation asks.  **The official MVTec code differs**: it builds "PPDM" on
  reverse distillation (frozen WRN-50 encoder, VQ on layer-3 features, a reverse WRN-50 decoder,
  cosine feature distance as ``Dis``) and has no foreground/background template.  Its deformation
  module (coarse 1/8 field, +-8 px; fine 1/2 field, +-3 px at 256 px; inverse fields; cycle MSE)
  is what ``field_strides`` / ``max_offsets`` default to.
* PDM+ has no foreground/background selection (the seed's variant loss has none).
* PPDM's encoder is the offline EfficientNet-Lite0 (layers ``blocks.1, blocks.2, blocks.4``, strides 4-16)
  instead of WRN-50 (``backbone="wide_resnet50_2"`` when its weights are available); its bottleneck fuses
  with two convolutions instead of three attention blocks, and its decoder has one two-convolution stage
  per encoder map (widths twice the map's) instead of a reversed WRN-50; group normalisation throughout.
* Scores: the official code min-max normalises both maps over the *test set* and reports the better
  of the AUROCs with and without the deformation term.  We do neither: after training, each term is
  divided by its mean image-level maximum on the training images (``rec_scale``, ``df_scale``) so
  the fixed ``alpha`` weighs two unit-free quantities (``normalize=False`` gives the seed's raw sum).
* Offsets are in pixels of the working image (``image_size``); ``max_offsets`` are given at 256 px
  and scaled.  The losses on the fields use ``grid_sample`` units so ``gamma2`` does not depend on
  the image size.  Inputs of another size are resized to ``image_size``; maps are resized back.
* Encoder, decoder and estimator use group normalisation (not in the seed): from-scratch image
  autoencoders train several times faster with it in the few CPU epochs available.
* Defaults follow the official code where it has one (N = 200, beta = 0.25, loss weights 1, AdamW
  lr 0.005 betas (0.5, 0.999), cosine schedule, 400 epochs, sigma 4, alpha 0.05 for non-geometric
  classes).  Small settings for this project's CPU budget (module-level override dicts):
  ``CPU_PRESET`` (PDM, 64 px, encoder stride 4, 15 epochs, lr 0.003, ``gamma_df = 0.01``: with the
  paper's weight 1 the fields stay below 0.001 px in so few epochs), ``CPU_PRESET_PLUS`` (same, PDM+),
  ``CPU_PRESET_PPDM`` (PPDM, 128 px, 200 memory items, 8 epochs) and ``DIGITS_PRESET`` (32 px one-class
  digits, stride 8, 30 epochs).  They were set on a
  generated dataset with another seed (seed 1), not on the evaluated test images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vadlab.backbones import FeatureExtractor, upsample_to
from vadlab.methods.ae_ssim import epoch_batches, gather_images
from vadlab.methods.base import AnomalyMethod, check_images
from vadlab.nn.filters import gaussian_blur, sigma_for
from vadlab.nn.vq import VectorQuantizer
from vadlab.nn.warp import (
    magnitude, smoothness_loss, strength_loss, to_grid_units, transport, upsample_field, warp, warp_sequence,
)

VARIANTS = ("pdm", "pdm+", "ppdm")


@dataclass
class DMADConfig:
    """DMAD hyperparameters; defaults follow the official code's deformation module and training schedule."""

    variant: str = "pdm"  # "pdm" (deform the reference, 2.3), "pdm+" (deform the input, 2.6), "ppdm" (official MVTec)
    image_size: int = 256  # working resolution; offsets are in its pixels
    channels: tuple[int, ...] = (32, 64, 128)  # encoder stage widths (each stage halves the size)
    latent_dim: int = 64  # D, size of z_e and of the memory items
    n_memory: int = 200  # N memory items
    beta: float = 0.25  # commitment weight in L_com
    field_strides: tuple[int, ...] = (8, 2)  # resolution of each deformation head, coarse to fine
    max_offsets: tuple[float, ...] = (8.0, 3.0)  # tanh bound of each head, pixels at 256 px
    estimator_channels: int = 32  # width of the deformation estimator h
    foreground_mask: bool = True  # foreground/background selection (PDM only)
    gamma_com: float = 1.0  # gamma1
    gamma_df: float = 1.0  # gamma2 (fields in grid_sample units)
    gamma_cyc: float = 1.0  # gamma3 (PDM+ only)
    alpha: float = 0.05  # weight of the deformation term in the scores
    sigma: float = 4.0  # Gaussian smoothing k* of the maps, pixels at 256 px
    normalize: bool = True  # divide A_rec and A_df by their mean image maximum on the training images
    epochs: int = 400
    lr: float = 0.005
    betas: tuple[float, ...] = (0.5, 0.999)
    weight_decay: float = 0.01
    # PPDM only: frozen pretrained encoder, VQ on its deepest map, reverse-distillation decoder
    backbone: str = "efficientnet_lite0"  # offline default; the official code uses wide_resnet50_2
    layers: tuple[str, ...] = ()  # encoder layers shallow to deep (empty: the backbone's default three)
    weights: str = "imagenet"
    bottleneck_channels: int = 64  # each layer's width after reduction in the bottleneck (official 64)
    bottleneck_stride: int = 2  # the fused embedding's stride relative to the deepest map (official 2)
    feature_loss: str = "position"  # "position": mean over positions of 1 - cos (RD4AD Eq. 2); "flatten": official
    batch_size: int = 8  # chunk size in predict
    seed: int = 111
    device: str = "cpu"


#: small-CPU preset (industrial, ~25 s fit + predict for 200 + 80 images on one core); 15 epochs: with 20,
#: every generated category's training loss had made 99 % of its decrease by epoch 15 (PDM and PDM+)
CPU_PRESET: dict[str, Any] = {
    "image_size": 64, "channels": (16, 32), "latent_dim": 32, "n_memory": 64, "estimator_channels": 16,
    "epochs": 15, "lr": 0.003, "gamma_df": 0.01,
}
#: small-CPU preset for the PDM+ variant
CPU_PRESET_PLUS: dict[str, Any] = {**CPU_PRESET, "variant": "pdm+"}
#: small-CPU preset for the PPDM variant: 128 px (the frozen encoder's stride-4 map is then 32 x 32),
#: 200 memory items of the deepest map as in the official code, 8 epochs (set on the seed-1 generated data)
CPU_PRESET_PPDM: dict[str, Any] = {
    **CPU_PRESET, "variant": "ppdm", "image_size": 128, "n_memory": 200, "epochs": 8,
}
#: small preset for the one-class digits protocol (32 px images)
DIGITS_PRESET: dict[str, Any] = {
    "image_size": 32, "channels": (16, 32, 64), "latent_dim": 32, "n_memory": 32, "estimator_channels": 16,
    "max_offsets": (24.0, 8.0), "epochs": 30, "lr": 0.003, "sigma": 8.0,
}


# ----------------------------------------------------------------------------- networks


def add_coords(x: torch.Tensor) -> torch.Tensor:
    """Positional embedding PE: append x and y coordinate channels in [-1, 1] (CoordConv)."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([x, xs, ys], dim=1)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, group normalisation (batch-size independent, fast to train), leaky ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(4 if cout % 4 == 0 else 1, cout),
                         nn.LeakyReLU(0.1))


class Encoder(nn.Module):
    """f: image [B, 3, H, W] -> z_e [B, D, H/2^s, W/2^s] (s = number of stages)."""

    def __init__(self, channels: tuple[int, ...], latent_dim: int) -> None:
        super().__init__()
        layers, cin = [], 3
        for c in channels:
            layers += [_conv(cin, c, 2), _conv(c, c)]
            cin = c
        layers.append(nn.Conv2d(cin, latent_dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """g: PE(z_q) -> image in [0, 1]; the coordinate channels let position-free memory items be placed."""

    def __init__(self, channels: tuple[int, ...], latent_dim: int) -> None:
        super().__init__()
        widths = list(reversed(channels))
        self.stem = _conv(latent_dim + 2, widths[0])
        self.ups = nn.ModuleList()
        cin = widths[0]
        for c in widths[1:] + [widths[-1] // 2]:
            self.ups.append(nn.Sequential(_conv(cin, c), _conv(c, c)))
            cin = c
        self.out = nn.Conv2d(cin, 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.stem(add_coords(z))
        for block in self.ups:
            h = block(F.interpolate(h, scale_factor=2, mode="nearest"))
        return torch.sigmoid(self.out(h))


class DeformationEstimator(nn.Module):
    """h (and f_m): PE(x) -> K offset fields at the heads' strides (+ K backward fields, + a mask).

    A small feature pyramid (strides 1, 2, 4, ... up to the coarsest head) with a top-down pass, so
    a fine head also sees the coarse context.  Heads start at zero: training begins from the
    identity warp.  Each head is ``max_offset * tanh(.)``, in pixels of the working image.
    """

    def __init__(self, width: int, strides: tuple[int, ...], max_offsets: tuple[float, ...],
                 backward: bool, mask: bool) -> None:
        super().__init__()
        self.strides = tuple(int(s) for s in strides)
        self.base = 1 if min(self.strides) == 1 else 2  # no full-resolution features unless a head needs them
        self.levels = max(self.strides).bit_length() - self.base  # pyramid levels above the stem
        self.register_buffer("max_offsets", torch.tensor(max_offsets, dtype=torch.float32), persistent=False)
        self.stem = nn.Sequential(_conv(5, width, self.base), _conv(width, width))
        self.down = nn.ModuleList(nn.Sequential(_conv(width, width, 2), _conv(width, width)) for _ in range(self.levels))
        self.heads = nn.ModuleList(self._head(width, 2) for _ in self.strides)
        self.back_heads = nn.ModuleList(self._head(width, 2) for _ in self.strides) if backward else None
        self.mask_head = nn.Conv2d(width, 1, 3, 1, 1) if mask else None
        if self.mask_head is not None:
            nn.init.zeros_(self.mask_head.weight)
            nn.init.constant_(self.mask_head.bias, 2.0)  # start mostly foreground

    @staticmethod
    def _head(width: int, out: int) -> nn.Conv2d:
        head = nn.Conv2d(width, out, 3, 1, 1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return head

    def _level(self, stride: int) -> int:
        """Index in the feature pyramid of the level at ``stride``."""
        return stride.bit_length() - 1 - (self.base - 1)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        feats = [self.stem(add_coords(x))]
        for block in self.down:
            feats.append(block(feats[-1]))
        for i in range(len(feats) - 2, -1, -1):  # top-down: add the coarser level
            feats[i] = feats[i] + F.interpolate(feats[i + 1], size=feats[i].shape[-2:], mode="bilinear",
                                                align_corners=False)
        size = x.shape[-2:]
        out: dict[str, Any] = {}
        out["fields"] = [upsample_field(self.max_offsets[k] * torch.tanh(head(feats[self._level(s)])), size)
                         for k, (head, s) in enumerate(zip(self.heads, self.strides))]
        if self.back_heads is not None:
            out["backward"] = [
                upsample_field(self.max_offsets[k] * torch.tanh(head(feats[self._level(s)])), size)
                for k, (head, s) in enumerate(zip(self.back_heads, self.strides))]
        if self.mask_head is not None:
            out["mask"] = torch.sigmoid(self.mask_head(feats[self._level(min(2, max(self.strides)))]))
            out["mask"] = F.interpolate(out["mask"], size=size, mode="bilinear", align_corners=False)
        return out


class FeatureBottleneck(nn.Module):
    """PPDM's bottleneck: every encoder map reduced to ``width`` channels at the deepest map's stride,
    concatenated with the *quantised* deepest map, then fused one stride further down (RD4AD's one-class
    bottleneck embedding with DMAD's memory in front of it)."""

    def __init__(self, channels: list[int], strides: list[int], width: int, out_channels: int,
                 stride: int = 2) -> None:
        super().__init__()
        deepest = strides[-1]
        self.reduce = nn.ModuleList()
        for c, s in zip(channels, strides):
            steps = (deepest // s).bit_length() - 1  # stride-2 convolutions down to the deepest stride
            layers, cin = [], c
            for _ in range(steps):
                layers.append(_conv(cin, width, 2))
                cin = width
            layers.append(_conv(cin, width))
            self.reduce.append(nn.Sequential(*layers))
        self.fuse = nn.Sequential(_conv(channels[-1] + width * len(channels), out_channels, stride),
                                  _conv(out_channels, out_channels))

    def forward(self, feats: list[torch.Tensor], quantised: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([quantised] + [r(f) for r, f in zip(self.reduce, feats)], dim=1))


class ReverseDecoder(nn.Module):
    """PPDM's decoder D: from the bottleneck embedding back up to every encoder map, deepest first
    (reverse distillation); each level ends in a linear 1x1 head with the encoder map's channels."""

    def __init__(self, channels: list[int], strides: list[int], in_channels: int, first: int = 2) -> None:
        super().__init__()
        self.ratios = [first] + [strides[i + 1] // strides[i] for i in range(len(strides) - 1)][::-1]
        widths = [max(2 * c, 64) for c in channels][::-1]  # deepest first
        self.stages, self.heads = nn.ModuleList(), nn.ModuleList()
        cin = in_channels
        for w, c in zip(widths, channels[::-1]):
            self.stages.append(nn.Sequential(_conv(cin, w), _conv(w, w)))
            self.heads.append(nn.Conv2d(w, c, 1))
            cin = w

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        outs, h = [], z
        for ratio, stage, head in zip(self.ratios, self.stages, self.heads):
            h = stage(F.interpolate(h, scale_factor=ratio, mode="nearest") if ratio > 1 else h)
            outs.append(head(h))
        return outs[::-1]  # shallow to deep, like the encoder's maps


def feature_distance(encoded: torch.Tensor, decoded: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position map ``1 - cos(E(h, w), D(h, w))`` ``[B, H, W]`` and its loss: the mean of that map (RD4AD's
    Eq. 2, ``mode="position"``) or ``1 - cos`` of the whole flattened maps (the official code, ``"flatten"``)."""
    local = 1 - F.cosine_similarity(encoded, decoded, dim=1)
    if mode == "flatten":
        return local, (1 - F.cosine_similarity(encoded.flatten(1), decoded.flatten(1), dim=1)).mean()
    return local, local.mean()


# ----------------------------------------------------------------------------- the method


class DMAD(AnomalyMethod):
    """Diversity-measurable anomaly detection: VQ prototype reconstruction + pyramid deformation fields."""

    name = "dmad"
    Config = DMADConfig

    def __init__(self, config: DMADConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        if cfg.variant not in VARIANTS:
            raise ValueError(f"variant={cfg.variant!r}: choose 'pdm', 'pdm+' or 'ppdm'")
        if len(cfg.field_strides) != len(cfg.max_offsets) or not cfg.field_strides:
            raise ValueError(f"field_strides {cfg.field_strides} and max_offsets {cfg.max_offsets} must be "
                             "non-empty and of the same length (one per deformation head)")
        if any(s < 1 or s & (s - 1) for s in cfg.field_strides):
            raise ValueError(f"field_strides {cfg.field_strides} must be powers of two")
        encoder_stride = 1 if cfg.variant == "ppdm" else 2 ** len(cfg.channels)  # PPDM's encoder is checked below
        multiple = max(encoder_stride, max(cfg.field_strides))
        if cfg.image_size % multiple:
            raise ValueError(f"image_size={cfg.image_size} must be a multiple of {multiple} "
                             f"(encoder stride {encoder_stride}, coarsest field stride {max(cfg.field_strides)})")
        if cfg.feature_loss not in ("position", "flatten"):
            raise ValueError(f"feature_loss={cfg.feature_loss!r}: choose 'position' (RD4AD's paper) or 'flatten' "
                             "(the official code)")
        plus = cfg.variant in ("pdm+", "ppdm")  # both deform the input and carry maps back with inverse fields
        px = cfg.image_size / 256.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if cfg.variant == "ppdm":
                self.teacher = FeatureExtractor(cfg.backbone, cfg.layers or None, cfg.weights)  # frozen
                chans, strides = self.teacher.channels, self.teacher.strides
                if cfg.bottleneck_stride not in (1, 2):
                    raise ValueError(f"bottleneck_stride={cfg.bottleneck_stride}: choose 1 or 2 (official)")
                if cfg.image_size % (cfg.bottleneck_stride * strides[-1]):
                    raise ValueError(f"image_size={cfg.image_size} must be a multiple of "
                                     f"{cfg.bottleneck_stride * strides[-1]} (bottleneck_stride times the deepest "
                                     f"stride of {cfg.backbone}'s layers {self.teacher.layers})")
                self.vq = VectorQuantizer(cfg.n_memory, chans[-1], cfg.beta)
                embed = max(2 * chans[-1], 128)
                self.bottleneck = FeatureBottleneck(chans, strides, cfg.bottleneck_channels, embed,
                                                    cfg.bottleneck_stride)
                self.decoder = ReverseDecoder(chans, strides, embed, cfg.bottleneck_stride)
            else:
                self.encoder = Encoder(tuple(cfg.channels), cfg.latent_dim)
                self.vq = VectorQuantizer(cfg.n_memory, cfg.latent_dim, cfg.beta)
                self.decoder = Decoder(tuple(cfg.channels), cfg.latent_dim)
            self.estimator = DeformationEstimator(cfg.estimator_channels, tuple(cfg.field_strides),
                                                  tuple(m * px for m in cfg.max_offsets), backward=plus,
                                                  mask=cfg.foreground_mask and not plus)
        self.background = (nn.Parameter(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
                           if cfg.foreground_mask and not plus else None)  # logit of x_bg (0.5 grey at start)
        self.register_buffer("rec_scale", None)
        self.register_buffer("df_scale", None)
        self.history: list[dict[str, float]] = []
        self.to(self.device, memory_format=torch.channels_last)  # CPU fit 1.37x (PDM), 1.16x (PDM+); rounding only

    # -- model ---------------------------------------------------------------------
    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        s = self.config.image_size
        if images.shape[-2:] == (s, s):
            return images
        return F.interpolate(images, size=(s, s), mode="bilinear", align_corners=False, antialias=True)

    def compress(self, x: torch.Tensor):
        """phi(f(x)) -> (z_q straight-through, L_com, indices); then g(PE(z_q)) is the reference."""
        return self.vq(self.encoder(x))

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        """All intermediate quantities for images ``x`` at the working size; the losses included."""
        cfg = self.config
        out = self.estimator(x)
        fields = out["fields"]
        if cfg.variant == "pdm":
            q = self.compress(x)
            reference = self.decoder(q.z_q)
            mask = out.get("mask")
            background = torch.sigmoid(self.background) if self.background is not None else None
            recs, xbar = [], reference
            for field in fields:
                xbar = warp(xbar, field)
                recs.append(xbar if mask is None else mask * xbar + (1 - mask) * background)
            l_rec = sum((x - r).pow(2).mean() for r in recs)
            l_df = sum(smoothness_loss(to_grid_units(o)) + strength_loss(to_grid_units(o)) for o in fields)
            l_cyc = x.new_zeros(())
            a_rec = (x - recs[-1]).pow(2).mean(1)
            a_df = sum(magnitude(o) for o in fields)
            out.update(reference=reference, reconstructions=recs, background=background, target=x)
        else:
            backward = out["backward"]
            warped = warp_sequence(x, fields)  # x' = x (.) O_1 ... (.) O_K
            if cfg.variant == "pdm+":
                q = self.compress(warped)
                reference = self.decoder(q.z_q)
                l_rec = (warped - reference).pow(2).mean()
                residual = (warped - reference).pow(2).mean(1)
            else:
                q, l_rec, residual = self.distill(warped)
                reference = None
            l_df = sum(smoothness_loss(to_grid_units(o)) + strength_loss(to_grid_units(o))
                       for o in fields + backward)
            undo = list(reversed(backward))  # O^T_K, ..., O^T_1: reference frame -> input frame
            l_cyc = (x - warp_sequence(warped, undo)).pow(2).mean()
            a_rec = transport(residual, undo)
            forward_mag = sum(transport(magnitude(o), fields[k + 1:]) for k, o in enumerate(fields))
            backward_mag = sum(transport(magnitude(backward[k]), list(reversed(backward[:k])))
                               for k in range(len(backward)))
            a_df = transport(forward_mag, undo) + backward_mag
            out.update(reference=reference, reconstructions=[] if reference is None else [reference],
                       warped_input=warped, target=warped, mask=None)
        loss = l_rec + cfg.gamma_com * q.loss + cfg.gamma_df * l_df + cfg.gamma_cyc * l_cyc
        out.update(indices=q.indices, A_rec=a_rec, A_df=a_df, loss=loss, L_rec=l_rec, L_com=q.loss, L_df=l_df,
                   L_cyc=l_cyc)
        return out

    def distill(self, warped: torch.Tensor):
        """PPDM's reconstruction of ``x'`` in feature space: the frozen encoder's maps ``E_l(x')``, the deepest
        one quantised, the reverse decoder's ``D_l``; returns (quantisation, ``sum_l`` loss of ``1 - cos``, the
        per-position distance summed over layers at the working size, still in the frame of ``x'``)."""
        feats = self.teacher(warped)
        q = self.vq(feats[-1])
        decoded = self.decoder(self.bottleneck(feats, q.z_q))
        l_rec, residual = warped.new_zeros(()), warped.new_zeros(warped.shape[0], *warped.shape[-2:])
        for e, d in zip(feats, decoded):
            local, loss = feature_distance(e, d, self.config.feature_loss)
            l_rec = l_rec + loss
            residual = residual + upsample_to(local, warped.shape[-2:])
        return q, l_rec, residual

    # -- training ------------------------------------------------------------------
    def fit(self, train_loader: Iterable) -> "DMAD":
        cfg = self.config
        trained = [p for p in self.parameters() if p.requires_grad]  # PPDM's encoder is frozen
        optimizer = torch.optim.AdamW(trained, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
        generator = torch.Generator().manual_seed(cfg.seed)
        # read and resized once, reused every epoch (decoding the files every epoch took 29 % of a 64-px
        # CPU fit); batches of the loader's size in a seeded order of their own
        data = gather_images(train_loader, cfg.image_size, self.device)
        batch_size = getattr(train_loader, "batch_size", None) or len(data)
        order = torch.Generator().manual_seed(cfg.seed + 1)
        self.history = []
        initialised = False
        self.train()
        for _ in tqdm(range(cfg.epochs), desc="dmad fit", leave=False):
            totals: dict[str, float] = {}
            n = 0
            for index in epoch_batches(len(data), batch_size, order):
                x = data[index]
                if not initialised:  # memory items start as random encodings of the first batch
                    with torch.no_grad():
                        queries = self.teacher(x)[-1] if cfg.variant == "ppdm" else self.encoder(x)
                        self.vq.init_from(queries, generator)
                    initialised = True
                out = self(x)
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                optimizer.step()
                for key in ("loss", "L_rec", "L_com", "L_df", "L_cyc"):
                    totals[key] = totals.get(key, 0.0) + float(out[key].detach()) * len(x)
                n += len(x)
            schedule.step()
            self.history.append({k: v / n for k, v in totals.items()})
        self.eval()
        self.rec_scale, self.df_scale = None, None
        if cfg.normalize:  # unit-free terms, from the training images only
            rec_max, df_max = [], []
            with torch.no_grad():
                for x in data.split(batch_size):
                    rec, df = self._smoothed(self(x))
                    rec_max.append(rec.flatten(1).amax(1))
                    df_max.append(df.flatten(1).amax(1))
            self.rec_scale = torch.cat(rec_max).mean().clamp_min(1e-8).reshape(1)
            self.df_scale = torch.cat(df_max).mean().clamp_min(1e-3).reshape(1)
        return self

    # -- scoring -------------------------------------------------------------------
    def _smoothed(self, out: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``A_rec * k`` and ``A_df * k`` (Gaussian k, sigma scaled to the working size)."""
        sigma = sigma_for(self.config.sigma, self.config.image_size)
        return gaussian_blur(out["A_rec"], sigma), gaussian_blur(out["A_df"], sigma)

    def _scales(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        if not self.config.normalize:
            return 1.0, 1.0
        if self.rec_scale is None or self.df_scale is None:
            raise RuntimeError("DMAD is not fitted: call fit(train_loader) (or AnomalyMethod.load) before predict")
        return self.rec_scale, self.df_scale

    def _check_fitted(self) -> None:
        self._scales()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores ``max(A_rec*k)/s_rec + alpha max(A_df*k)/s_df`` and pixel maps, at the input size."""
        images = check_images(images).to(self.device)
        s_rec, s_df = self._scales()
        self.eval()
        scores, maps = [], []
        for chunk in images.split(self.config.batch_size):
            rec, df = self._smoothed(self(self._resize(chunk)))
            rec, df = rec / s_rec, df / s_df
            scores.append(rec.flatten(1).amax(1) + self.config.alpha * df.flatten(1).amax(1))
            m = rec + self.config.alpha * df
            if m.shape[-2:] != chunk.shape[-2:]:
                m = F.interpolate(m[:, None], size=chunk.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            maps.append(m)
        return torch.cat(scores), torch.cat(maps)

    @torch.no_grad()
    def inspect(self, images: torch.Tensor) -> dict[str, Any]:
        """The separately inspectable parts, at the working size, for figures.

        Keys: ``input``, ``reference`` (decoder output g(PE(z_q))), ``fields`` (list of [B, 2, H, W], pixels),
        ``backward_fields`` (PDM+ only, else None), ``mask`` ([B, 1, H, W], PDM only, else None),
        ``background`` (x_bg or None), ``warped_input`` (PDM+ only), ``reconstructions`` (list),
        ``indices`` (memory item per latent position), ``A_rec``, ``A_df`` (raw, [B, H, W]; for PPDM ``A_rec``
        is the summed ``1 - cos`` of the feature maps and ``reference`` is None, ``reconstructions`` empty),
        ``scores`` and ``maps`` (as :meth:`predict`, at the working size).
        """
        images = check_images(images).to(self.device)
        self.eval()
        x = self._resize(images)
        out = self(x)
        s_rec, s_df = self._scales()
        rec, df = self._smoothed(out)
        rec, df = rec / s_rec, df / s_df
        return {
            "input": x, "reference": out["reference"], "fields": out["fields"],
            "backward_fields": out.get("backward"), "mask": out.get("mask"), "background": out.get("background"),
            "warped_input": out.get("warped_input"), "reconstructions": out["reconstructions"],
            "indices": out["indices"], "A_rec": out["A_rec"], "A_df": out["A_df"],
            "scores": rec.flatten(1).amax(1) + self.config.alpha * df.flatten(1).amax(1),
            "maps": rec + self.config.alpha * df,
        }


__all__ = ["CPU_PRESET", "CPU_PRESET_PLUS", "CPU_PRESET_PPDM", "DIGITS_PRESET", "DMAD", "DMADConfig", "VARIANTS",
           "add_coords"]
