"""DiAD: a diffusion-based framework for multi-class anomaly detection (He et al., AAAI 2024).

DiAD reconstructs a test image with a latent diffusion model that is steered by the image itself,
then compares input and reconstruction in a pretrained feature space.

1. **Pixel-space autoencoder** {E, D}: a KL-regularised autoencoder (Stable Diffusion's "KL-f8")
   maps ``x`` in [-1, 1] to a latent ``z = E(x)`` with 4 channels, downsampled by 2^(levels-1).
2. **Latent denoiser** eps_theta(z_t, t): an SD-style U-Net (residual blocks with a timestep
   embedding, self-attention at the chosen downsampling factors, skip connections) trained with
   the epsilon loss (eq. 6) on a T = 1000 schedule.
3. **Semantic-guidance (SG) network**: a copy of the denoiser's encoder half.  The input image
   passes a stack of conv-SiLU layers C (ending in a zero-initialised conv) and is added to the
   noisy latent after the first block; its middle-block output and the outputs of its last
   encoder stage (SGEB4 in the paper) go through zero-initialised 1x1 convs into the denoiser's
   middle block and its first decoder skip connections (eq. 7).  Zero initialisation makes the
   guided denoiser start exactly equal to the unguided one.
4. **Spatial-aware feature fusion (SFF)**: every output P_i of the last encoder stage receives
   the fused higher-scale outputs H_j of the stage before, Q_i = P_i + sum_j F_ij(H_j), with F a
   stride-2 3x3 conv, InstanceNorm and SiLU (eq. 8).
5. **Inference**: encode, noise the latent to step ``noise_step`` (paper: 999), denoise with DDIM in
   10 steps (eta = 0), decode.
6. **Scoring**: anomaly map = sum over feature scales of 1 - cosine similarity between frozen
   pretrained features of the input and of the reconstruction (eq. 9-10), upsampled to the image,
   Gaussian blur sigma 5 (at 256 px); image score = max after 8 successive 8x8 average pools.
   The backbone sees input and reconstruction at the paper's resolution, ``score_size`` = 256 px
   (feature maps of 64, 32 and 16 px); smaller images are upsampled (bilinear) to it first, so a
   64 px reconstruction is scored on the same feature grids as the paper's 256 px one.  The map
   itself comes back at the input size.

Training (``fit``) runs three stages on the normal images: (a) the autoencoder; (b) the plain
denoiser (our stand-in for the pretrained Stable Diffusion U-Net the paper starts from); (c) the SG
network is copied from the denoiser's encoder and trained together with the denoiser's decoder
half while the denoiser's encoder and middle block stay frozen (as the official code does).  With
``use_sg=False`` stage (c) keeps training the whole plain denoiser instead (the LDM ablation).

Multi-class: DiAD trains one model on the normal images of every category; nothing here depends on
the category, so a loader that mixes categories is all the unified protocol needs.

Departures from the paper, on purpose:

- everything is trained from scratch at a small size (``DiADConfig()`` defaults; ~1 M parameters)
  instead of fine-tuning SD v1.5 (859 M) and its VAE for 1000 epochs on a V100;
  ``DiADConfig.paper()`` gives the paper's widths (see ``parameter_counts``).  The learning rate is
  therefore 1e-3 (paper 1e-5, for fine-tuning) and budgets are counted in optimiser steps;
- there is no text conditioning: DiAD feeds SD an empty prompt (a constant), so cross-attention,
  the CLIP text encoder and classifier-free guidance (scale 9 in the official code) are dropped;
- the autoencoder is trained with L1 + KL only (the official fine-tuning also drops the LPIPS /
  discriminator terms) and takes images in [-1, 1]; its latent scale factor (SD: 0.18215) is
  1 / std of the training latents, as the LDM paper prescribes;
- the scoring backbone is the offline EfficientNet-Lite0 (blocks 1, 2, 4: strides 4, 8, 16 like
  the paper's ResNet-50 layers 1-3), not ResNet-50;
- the 8x8 pooling kernel and sigma 5 are given at 256 px and scaled with the image size;
- below 256 px the scoring resolution is reached by upsampling input and reconstruction
  (``score_size``), not by generating at 256 px: the images carry no more detail than the small
  input, but the feature grids are the paper's, so a defect of a few pixels is not averaged away
  inside one 16 x 16 px receptive cell of a 4 x 4 map (``score_size=None`` scores at the input size);
- the small-CPU preset (``CPU_PRESET``) starts denoising at t = 900 instead of 999.  After a few
  hundred CPU training steps the noise prediction at t = 999 is not accurate enough (there an error
  delta in eps becomes 14.6 delta in the x_0 estimate), and reconstructions of *held-out normal
  training images* from t = 999 are poor with or without SG (pixel MSE 0.063 / 0.10 against the
  autoencoder's 0.005 in a 48 px two-category run).  From t = 900 the guided model reaches the
  autoencoder's quality (0.0059) while the unguided one still cannot (0.068), so the reconstruction
  rests on the guidance, as in the paper; 900 lies in the range the paper's figure 6 finds good
  (>= 600).  No test image was used for this choice.

What limits this small DiAD (measured on the generated dataset, 64 px; see ``masked_errors`` and
``autoencode``): the guided reconstruction follows the autoencoder.  Outside the defects its error
is close to that of D(E(x)) (within 7 % at t = 900); inside them it "repairs" about as much as D(E(x)) already does, because at this
scale the SG network passes its input through, defects included (in/out error ratios of the guided
reconstruction and of D(E(x)) agree within 6 % for every start step t in 300..999, three
categories).  So the autoencoder bounds detection: after 300-400 training steps D(E(x)) is a
mean-coloured blur (L1 error 0.07 on held-out normal training images, 0.05-0.09 on normal test
images), the feature map lights up on every normal texture and the unified image AUROC was 0.56;
after 1200 steps the normal-image L1 is 0.015-0.033 on objects and brick, 0.05-0.07 on grass and
gravel, whose grain is finer than a 16 x 16 latent carries.  That alone is not enough: scored with
the 1 - cos map of Lite0 features at 64 px (maps of 16, 8 and 4 px), even D(E(x)) itself reaches
only 0.59 image / 0.61 pixel AUROC in the unified preset run (mean of six categories), against
0.67 / 0.75 when the backbone sees the images upsampled to 256 px (maps of 64, 32, 16 px, the
paper's sizes) and 0.71 / 0.93 with a plain pixel error map -- defects of a few pixels vanish in
4-16 px feature maps (a diagnosis on test labels).  Scoring at the paper's 256 px (``score_size``)
is what the paper prescribes, so it is the default, not a setting picked from that diagnosis.  With
it, the same fitted preset model (unified, seed 0, one thread) goes from 0.555 / 0.605 / 0.277 to
0.608 / 0.767 / 0.547 mean image AUROC / pixel AUROC / AUPRO; the gain is mostly in the maps (pixel
AUROC up on five of six categories, AUPRO on all six), the image AUROC stays weak and uneven
(brick 0.62 -> 0.79, washer 0.54 -> 0.84, chip 0.64 -> 0.46, grass and gravel near 0.5).  Scoring
costs about 1 s more per 16 test images on one core (upsampled 4x, the backbone sees 16x the pixels).
Larger images (128-256 px, as the paper's 256) are the next step; they cost about 4x per doubling.
More latent channels do not help the textures (16 instead of 4: held-out L1 0.062 vs 0.068 after
300 steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vadlab.backbones import FeatureExtractor, upsample_to
from vadlab.methods.base import AnomalyMethod, check_images, iter_images
from vadlab.nn.diffusion import NoiseSchedule, timestep_embedding
from vadlab.nn.filters import gaussian_blur, sigma_for


# ============================================================================ config


@dataclass
class DiADConfig:
    """DiAD hyperparameters.  Defaults are a small CPU-trainable model; ``paper()`` gives table 11."""

    # pixel-space autoencoder (paper: 128 channels, mult 1-2-4-4 -> downsampling 8, 2 res blocks)
    ae_channels: int = 16
    ae_channel_mult: tuple[int, ...] = (1, 2, 4)  # downsampling factor 2 ** (len - 1)
    ae_res_blocks: int = 1
    latent_channels: int = 4
    kl_weight: float = 1e-6
    # latent denoiser and SG network (paper: 320 channels, mult 1-2-4-4, 2 res blocks, attention 4,2,1, 8 heads)
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (2, 4)  # U-Net downsampling factors that get self-attention
    num_heads: int = 4
    hint_channels: tuple[int, ...] = (16, 32, 64)  # conv-SiLU stack C: one stride-2 stage per entry after the first
    use_sg: bool = True  # False: plain latent diffusion (the LDM row of the ablation)
    use_sff: bool = True
    # diffusion (paper: SD's scaled-linear betas 0.00085 -> 0.012, T = 1000)
    num_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    schedule: str = "scaled_linear"
    # inference (paper: start at step 999, DDIM 10 steps)
    noise_step: int = 999
    ddim_steps: int = 10
    # training budgets in optimiser steps (paper: 1000 epochs of fine-tuning, batch 12 x 4 accumulated)
    ae_steps: int = 400
    ldm_steps: int = 600
    sg_steps: int = 600
    lr_ae: float = 1e-3
    lr: float = 1e-3  # paper 1e-5 (fine-tuning pretrained SD); from scratch needs more
    train_batch_size: int = 12
    # scoring (paper: ResNet-50 layers 1-3 on 256 px images, sigma 5, 8 x (8x8 average pool) then max)
    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ("blocks.1", "blocks.2", "blocks.4")
    weights: str = "imagenet"
    #: side (px) that input and reconstruction are resized to (bilinear, the shorter side, aspect kept)
    #: before the scoring backbone: the paper's 256 gives Lite0 blocks 1, 2, 4 (strides 4, 8, 16) the
    #: paper's 64, 32, 16 px feature maps whatever the input size; a 64 px input is upsampled 4x.  The
    #: anomaly map still comes back at the input size.  None: score at the input size as given.
    score_size: int | None = 256
    sigma: float = 5.0
    pool_kernel: int = 8
    pool_iters: int = 8
    batch_size: int = 32
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def paper(cls, **overrides) -> "DiADConfig":
        """Table 11 widths: SD-size denoiser and SG copy (320 ch), KL-f8 autoencoder (128 ch), 256 px.

        Meant for GPUs; training it from scratch is not what the paper does (it fine-tunes SD v1.5).
        """
        values = dict(ae_channels=128, ae_channel_mult=(1, 2, 4, 4), ae_res_blocks=2, latent_channels=4,
                      model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                      attention_resolutions=(4, 2, 1), num_heads=8, hint_channels=(16, 32, 96, 256),
                      lr=1e-5, train_batch_size=12)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def cpu_preset(cls, **overrides) -> "DiADConfig":
        """The pipeline's small-CPU preset (see ``CPU_PRESET``)."""
        return cls(**{**CPU_PRESET, **overrides})


#: overrides of the small-CPU preset (on top of the small defaults, which already cut the widths,
#: see ``parameter_counts``): one unified model over 6 categories (1200 images) at 64 px.  It cuts,
#: against the paper: training from scratch instead of fine-tuning SD v1.5 for 1000 epochs -> 1200
#: autoencoder steps (the paper fine-tunes SD's pretrained VAE), 800 plain-denoiser steps (stand-in
#: for pretrained SD) and 1000 SG steps, batch 8 (paper 12 x 4 accumulated), lr 1e-3 (paper 1e-5);
#: 64 px images and a KL-f4 latent of 4 x 16 x 16 (paper 256 px, KL-f8, 4 x 32 x 32); denoising
#: starts at t = 900 (paper 999, see the module docstring); scoring with EfficientNet-Lite0
#: (paper ResNet-50) at the paper's 256 px scoring resolution (``score_size``, the default: the 64 px
#: images are upsampled for the backbone).  Most of the budget goes to the autoencoder: the
#: reconstruction cannot be better than D(E(x)), and with 400 steps D(E(x)) was a mean-coloured blur.
#: Unified result with this preset (6 x 200 images, 64 px, seed 0, OMP_NUM_THREADS=1; ``run_unified``
#: with ``preset_overrides("diad", "cpu")``): mean image / pixel AUROC / AUPRO 0.608 / 0.767 / 0.547
#: scored at 256 px; 0.555 / 0.605 / 0.277 with ``score_size=None`` (400 AE steps: 0.560 / 0.544 /
#: 0.257); fit 330-342 s and prediction of the 480 test images 50 s (19 s with ``score_size=None``)
#: on one shared core.  Training is not bit-reproducible across thread counts: a two-thread run of
#: the same preset gave 0.584 image AUROC at ``score_size=None``.  Still weak, see the module docstring.
CPU_PRESET: dict = dict(ae_steps=1200, ldm_steps=800, sg_steps=1000, train_batch_size=8, noise_step=900)
#: image size the CPU preset is meant for (the pipeline passes it as --image-size)
CPU_PRESET_IMAGE_SIZE: int = 64


# ============================================================================ building blocks


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels (SD uses 32 groups)."""
    groups = math.gcd(channels, 32)
    while groups > 1 and channels // groups < 4:
        groups //= 2
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero (ControlNet-style zero-initialised connection)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep embedding added in between, 1x1 skip if widths differ."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int | None = None) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out)) if emb_dim else None
        self.out_layers = nn.Sequential(_norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.in_layers(x)
        if self.emb is not None and emb is not None:
            h = h + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class SelfAttention(nn.Module):
    """Spatial self-attention (a transformer block: attention + GEGLU feed-forward, no cross-attention).

    The output projection starts at zero, so a fresh block is the identity.
    """

    def __init__(self, channels: int, heads: int, feedforward: bool = True) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention width {channels} is not divisible by num_heads={heads}; "
                             "choose num_heads dividing model_channels * channel_mult")
        self.heads = heads
        self.norm = _norm(channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.ln1 = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.attn_out = nn.Linear(channels, channels)
        self.ff = None
        if feedforward:
            self.ln2 = nn.LayerNorm(channels)
            self.ff = nn.ModuleDict({"geglu": nn.Linear(channels, 8 * channels), "out": nn.Linear(4 * channels, channels)})
        self.proj_out = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = self.qkv(self.ln1(y)).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, h * w, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        y = y + self.attn_out(a)
        if self.ff is not None:
            u, gate = self.ff["geglu"](self.ln2(y)).chunk(2, dim=-1)
            y = y + self.ff["out"](u * F.gelu(gate))
        return x + self.proj_out(y.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.Sequential):
    """A sequence of layers that all receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, SelfAttention, Downsample, Upsample)) else layer(x)
        return x


# ============================================================================ 1. autoencoder


class KLAutoencoder(nn.Module):
    """KL-regularised convolutional autoencoder (SD's VAE design): image [-1, 1] <-> latent [c, H/f, W/f]."""

    def __init__(self, channels: int, mult: tuple[int, ...], res_blocks: int, latent_channels: int) -> None:
        super().__init__()
        self.factor = 2 ** (len(mult) - 1)
        widths = [channels * m for m in mult]
        enc: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1)]
        c = channels
        for i, w in enumerate(widths):
            for _ in range(res_blocks):
                enc.append(ResBlock(c, w))
                c = w
            if i < len(widths) - 1:
                enc.append(Downsample(c))
        enc += [ResBlock(c, c), SelfAttention(c, 1, feedforward=False), ResBlock(c, c),
                _norm(c), nn.SiLU(), nn.Conv2d(c, 2 * latent_channels, 3, padding=1),
                nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)]
        self.encoder = Block(*enc)
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, latent_channels, 1),
                                nn.Conv2d(latent_channels, c, 3, padding=1),
                                ResBlock(c, c), SelfAttention(c, 1, feedforward=False), ResBlock(c, c)]
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(res_blocks + 1):
                dec.append(ResBlock(c, w))
                c = w
            if i > 0:
                dec.append(Upsample(c))
        dec += [_norm(c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1)]
        self.decoder = Block(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance of the latent."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def loss(self, x: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """L1 reconstruction of a posterior sample + kl_weight * KL(q(z|x) || N(0, I)), per element."""
        mean, logvar = self.encode(x)
        noise = torch.randn(mean.shape, generator=generator).to(mean)
        z = mean + (0.5 * logvar).exp() * noise
        rec = (self.decode(z) - x).abs().mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        return rec + kl_weight * kl


# ============================================================================ 2. denoiser


class UNetEncoder(nn.Module):
    """Timestep MLP, input blocks and middle block of the SD U-Net; the SG network copies this."""

    def __init__(self, cfg: DiADConfig) -> None:
        super().__init__()
        mc = cfg.model_channels
        emb_dim = 4 * mc
        self.time_mlp = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.blocks = nn.ModuleList([Block(nn.Conv2d(cfg.latent_channels, mc, 3, padding=1))])
        self.block_channels = [mc]
        #: block indices per encoder stage: stage 0 = conv_in + level-0 blocks, stage k = downsample + level-k blocks
        self.stages: list[list[int]] = [[0]]
        c, ds = mc, 1
        for level, m in enumerate(cfg.channel_mult):
            if level > 0:
                self.blocks.append(Block(Downsample(c)))
                ds *= 2
                self.block_channels.append(c)
                self.stages.append([len(self.blocks) - 1])
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(c, mc * m, emb_dim)]
                c = mc * m
                if ds in cfg.attention_resolutions:
                    layers.append(SelfAttention(c, cfg.num_heads))
                self.blocks.append(Block(*layers))
                self.block_channels.append(c)
                self.stages[-1].append(len(self.blocks) - 1)
        self.middle = Block(ResBlock(c, c, emb_dim), SelfAttention(c, cfg.num_heads), ResBlock(c, c, emb_dim))
        self.out_channels = c

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_mlp(timestep_embedding(t, self.time_mlp[0].in_features))


@dataclass
class Guidance:
    """What the SG network hands the denoiser: a middle-block residual and decoder skip residuals."""

    middle: torch.Tensor
    skips: list[torch.Tensor] = field(default_factory=list)  # in decoder order (deepest first)


class Denoiser(nn.Module):
    """The SD-style latent U-Net eps_theta(z_t, t), optionally guided (eq. 7)."""

    def __init__(self, cfg: DiADConfig) -> None:
        super().__init__()
        mc = cfg.model_channels
        emb_dim = 4 * mc
        self.encoder = UNetEncoder(cfg)
        skips = list(self.encoder.block_channels)
        c = self.encoder.out_channels
        self.decoder = nn.ModuleList()
        ds = 2 ** (len(cfg.channel_mult) - 1)
        for level, m in reversed(list(enumerate(cfg.channel_mult))):
            for j in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(c + skips.pop(), mc * m, emb_dim)]
                c = mc * m
                if ds in cfg.attention_resolutions:
                    layers.append(SelfAttention(c, cfg.num_heads))
                if level > 0 and j == cfg.num_res_blocks:
                    layers.append(Upsample(c))
                self.decoder.append(Block(*layers))
            ds //= 2
        self.out = nn.Sequential(_norm(c), nn.SiLU(), _zero(nn.Conv2d(c, cfg.latent_channels, 3, padding=1)))

    def encode(self, z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Encoder + middle: (middle output, skip features, timestep embedding)."""
        emb = self.encoder.embed_time(t)
        hs, h = [], z_t
        for block in self.encoder.blocks:
            h = block(h, emb)
            hs.append(h)
        return self.encoder.middle(h, emb), hs, emb

    def decode(self, h: torch.Tensor, hs: list[torch.Tensor], emb: torch.Tensor,
               guidance: Guidance | None = None) -> torch.Tensor:
        """Decoder half; guidance residuals are added to the middle output and the first skips."""
        hs = list(hs)
        if guidance is not None:
            h = h + guidance.middle
        for i, block in enumerate(self.decoder):
            skip = hs.pop()
            if guidance is not None and i < len(guidance.skips):
                skip = skip + guidance.skips[i]
            h = block(torch.cat([h, skip], dim=1), emb)
        return self.out(h)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, guidance: Guidance | None = None) -> torch.Tensor:
        h, hs, emb = self.encode(z_t, t)
        return self.decode(h, hs, emb, guidance)


# ============================================================================ 3-4. SG network with SFF


class SemanticGuidance(nn.Module):
    """SG network: conv-SiLU image stem C, a copy of the denoiser encoder, SFF, zero-initialised outputs."""

    def __init__(self, cfg: DiADConfig, factor: int) -> None:
        super().__init__()
        n_down = int(round(math.log2(factor)))
        if len(cfg.hint_channels) != n_down + 1:
            raise ValueError(f"hint_channels={cfg.hint_channels} needs {n_down + 1} entries: one stride-2 stage "
                             f"per factor of 2 of the autoencoder's downsampling {factor}")
        hc = cfg.hint_channels
        stem: list[nn.Module] = [nn.Conv2d(3, hc[0], 3, padding=1), nn.SiLU(), nn.Conv2d(hc[0], hc[0], 3, padding=1), nn.SiLU()]
        for a, b in zip(hc[:-1], hc[1:]):
            stem += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(b, b, 3, padding=1), nn.SiLU()]
        stem.append(_zero(nn.Conv2d(hc[-1], cfg.model_channels, 3, padding=1)))
        self.hint = nn.Sequential(*stem)
        self.encoder = UNetEncoder(cfg)
        stages = self.encoder.stages
        if len(stages) < 2:
            raise ValueError("the SG network needs at least two U-Net levels (channel_mult of length >= 2)")
        self.last, self.prev = stages[-1], stages[-2]
        ch = self.encoder.block_channels
        self.use_sff = cfg.use_sff
        # F_ij: stride-2 3x3 conv + InstanceNorm + SiLU from every H_j of the previous stage into every P_i
        self.sff = nn.ModuleList([
            nn.ModuleList([nn.Sequential(nn.Conv2d(ch[j], ch[i], 3, stride=2, padding=1),
                                         nn.InstanceNorm2d(ch[i], affine=True), nn.SiLU()) for j in self.prev])
            for i in self.last]) if cfg.use_sff else None
        self.zero_skips = nn.ModuleList([_zero(nn.Conv2d(ch[i], ch[i], 1)) for i in reversed(self.last)])
        self.zero_middle = _zero(nn.Conv2d(self.encoder.out_channels, self.encoder.out_channels, 1))

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, image: torch.Tensor) -> Guidance:
        """Guidance for the denoiser from the noisy latent and the image in [-1, 1]."""
        emb = self.encoder.embed_time(t)
        hint = self.hint(image)
        if hint.shape[-2:] != z_t.shape[-2:]:
            raise ValueError(f"image of size {tuple(image.shape[-2:])} gives a hint of size {tuple(hint.shape[-2:])} "
                             f"but the latent is {tuple(z_t.shape[-2:])}")
        hs, h = [], z_t
        for k, block in enumerate(self.encoder.blocks):
            h = block(h, emb)
            if k == 0:
                h = h + hint  # z + C(x0)
            hs.append(h)
        middle = self.zero_middle(self.encoder.middle(h, emb))
        outs = [hs[i] for i in self.last]
        if self.sff is not None:
            outs = [p + sum(f(hs[j]) for f, j in zip(fs, self.prev)) for p, fs in zip(outs, self.sff)]
        skips = [conv(o) for conv, o in zip(self.zero_skips, reversed(outs))]
        return Guidance(middle, skips)

    def copy_from(self, encoder: UNetEncoder) -> None:
        """Initialise the encoder copy from the denoiser's encoder (the paper copies SD's weights)."""
        self.encoder.load_state_dict(encoder.state_dict())


# ============================================================================ the method


def build_networks(cfg: DiADConfig) -> nn.ModuleDict:
    """The trainable networks of ``cfg``: autoencoder, denoiser and (if ``use_sg``) the SG network."""
    if len(cfg.ae_channel_mult) < 1 or len(cfg.channel_mult) < 2:
        raise ValueError("ae_channel_mult needs >= 1 entry and channel_mult >= 2 entries")
    ae = KLAutoencoder(cfg.ae_channels, cfg.ae_channel_mult, cfg.ae_res_blocks, cfg.latent_channels)
    nets = nn.ModuleDict({"autoencoder": ae, "denoiser": Denoiser(cfg)})
    if cfg.use_sg:
        nets["sg"] = SemanticGuidance(cfg, ae.factor)
    return nets


def parameter_counts(cfg: DiADConfig) -> dict[str, int]:
    """Parameter counts of the built networks (on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        nets = build_networks(cfg)
    counts = {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}
    counts["total"] = sum(counts.values())
    return counts


def pooled_max(maps: torch.Tensor, kernel: int, iters: int) -> torch.Tensor:
    """Image score: max after ``iters`` successive ``kernel`` x ``kernel`` average pools (stride 1)."""
    x = maps[:, None]
    for _ in range(iters):
        if min(x.shape[-2:]) < kernel:
            break
        x = F.avg_pool2d(x, kernel, stride=1)
    return x.flatten(1).amax(1)


def masked_errors(images: torch.Tensor, recon: torch.Tensor, masks: torch.Tensor) -> tuple[float, float]:
    """Mean absolute pixel error of ``recon`` inside and outside the defect ``masks`` ([B, 1 or 3, H, W]).

    A diagnostic: a reconstruction that repairs defects has a much larger error inside than outside;
    one that copies its input (defect included) has about the same error in both.
    """
    err = (recon - images).abs().mean(1)
    inside = masks.reshape(err.shape[0], -1, *err.shape[-2:])[:, 0] > 0.5
    if not inside.any() or inside.all():
        raise ValueError("masks must mark some but not all pixels as defective; pass defective test images")
    return err[inside].mean().item(), err[~inside].mean().item()


class DiAD(AnomalyMethod):
    """Latent diffusion reconstruction guided by the input image; feature-space cosine anomaly map."""

    name = "diad"
    Config = DiADConfig

    def __init__(self, config: DiADConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        if not 0 <= cfg.noise_step < cfg.num_timesteps:
            raise ValueError(f"noise_step={cfg.noise_step} must lie in 0..{cfg.num_timesteps - 1}")
        if cfg.score_size is not None and (isinstance(cfg.score_size, bool) or not isinstance(cfg.score_size, int)
                                           or cfg.score_size < 32):
            raise ValueError(f"score_size={cfg.score_size!r} must be None (score at the input size) or an image "
                             "side of at least 32 px (the backbone's coarsest map has stride 16); paper: 256")
        with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the global RNG
            torch.manual_seed(cfg.seed)
            nets = build_networks(cfg)
        self.autoencoder: KLAutoencoder = nets["autoencoder"]
        self.denoiser: Denoiser = nets["denoiser"]
        self.sg: SemanticGuidance | None = nets["sg"] if cfg.use_sg else None
        self.schedule = NoiseSchedule(cfg.num_timesteps, cfg.beta_start, cfg.beta_end, cfg.schedule)
        self.backbone = FeatureExtractor(cfg.backbone, cfg.layers, cfg.weights)
        # channels-last halves the CPU time of the backbone at 256 px (same arithmetic, other memory layout)
        self.backbone.to(memory_format=torch.channels_last)
        self.register_buffer("latent_scale", None)
        # latent downsampling times the U-Net's: image sides must be multiples of this
        self.size_multiple = self.autoencoder.factor * 2 ** (len(cfg.channel_mult) - 1)
        self.to(self.device)

    # -- helpers --------------------------------------------------------------------
    def _check_size(self, images: torch.Tensor) -> None:
        h, w = images.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(f"DiAD needs image sides divisible by {self.size_multiple} (autoencoder x U-Net "
                             f"downsampling), got {h}x{w}; resize the images, e.g. to 64, 128 or 256 px")

    def _cache(self, loader: Iterable) -> torch.Tensor:
        """All training images as one tensor (small-scale training re-reads them many times)."""
        batches = [x.cpu() for x in iter_images(loader, "cpu")]
        if not batches:
            raise ValueError("the training loader yielded no images; check the dataset path and category")
        images = torch.cat(batches)
        self._check_size(images)
        return images

    def _batches(self, n: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """``steps`` minibatches of indices into ``n`` cached items (seeded reshuffles)."""
        bs = min(self.config.train_batch_size, n)
        order, pos = torch.randperm(n, generator=generator), 0
        for _ in range(steps):
            if pos + bs > n:
                order, pos = torch.randperm(n, generator=generator), 0
            yield order[pos:pos + bs]
            pos += bs

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled latent mean of images in [-1, 1]."""
        return self.autoencoder.encode(x)[0] * self.latent_scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from scaled latents."""
        return ((self.autoencoder.decode(z / self.latent_scale) + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def autoencode(self, images: torch.Tensor) -> torch.Tensor:
        """D(E(x)) without diffusion, in [0, 1]: the best any reconstruction through the latent can do."""
        images = check_images(images).to(self.device)
        self._require_fitted_autoencoder()
        return self.decode(self.encode(images * 2 - 1))

    def eps(self, z_t: torch.Tensor, t: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """Noise prediction, guided by ``image`` (in [-1, 1]) through the SG network when it exists."""
        guidance = self.sg(z_t, t, image) if (self.sg is not None and image is not None) else None
        return self.denoiser(z_t, t, guidance)

    # -- training -------------------------------------------------------------------
    def fit(self, train_loader: Iterable) -> "DiAD":
        """Three stages on normal images: autoencoder, plain denoiser, then SG (+ denoiser decoder)."""
        images = self._cache(train_loader)
        generator = torch.Generator().manual_seed(self.config.seed)
        #: training losses per stage (not saved)
        self.losses = {"ae": self.fit_autoencoder(images, generator),
                       "ldm": self.fit_denoiser(images, generator),
                       "sg": self.fit_guidance(images, generator)}
        self.eval()
        return self

    def fit_autoencoder(self, images: torch.Tensor, generator: torch.Generator) -> list[float]:
        """Stage 1: L1 + KL autoencoder; then the latent scale = 1 / std of the training latents."""
        cfg = self.config
        self.autoencoder.train()
        opt = torch.optim.AdamW(self.autoencoder.parameters(), lr=cfg.lr_ae, weight_decay=0.0, fused=True)
        losses = []
        for idx in tqdm(self._batches(len(images), cfg.ae_steps, generator), total=cfg.ae_steps,
                        desc="diad ae", leave=False):
            x = images[idx].to(self.device) * 2 - 1
            loss = self.autoencoder.loss(x, cfg.kl_weight, generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        self.autoencoder.eval()
        with torch.no_grad():
            means = [self.autoencoder.encode(x.to(self.device) * 2 - 1)[0].cpu() for x in images.split(cfg.batch_size)]
            std = torch.cat(means).std()
        self.latent_scale = (1.0 / std.clamp_min(1e-6)).to(self.device)
        return losses

    def _diffusion_steps(self, images: torch.Tensor, steps: int, params: list[nn.Parameter], guided: bool,
                         generator: torch.Generator, desc: str) -> list[float]:
        """Epsilon-loss training of ``params`` (eq. 6) on latents of the cached images."""
        # fused: one kernel for the 150-260 tensors (the step 5-10 -> 1.3-2.8 ms on two CPU threads)
        opt = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=0.0, fused=True)
        losses = []
        latents = self._latents(images)
        for idx in tqdm(self._batches(len(images), steps, generator), total=steps, desc=desc, leave=False):
            z0 = latents[idx].to(self.device)
            hint = images[idx].to(self.device) * 2 - 1 if guided else None
            loss = self.schedule.epsilon_loss(lambda z, t: self.eps(z, t, hint), z0, generator=generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    @torch.no_grad()
    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latent means of the cached images, computed once per stage (the autoencoder is frozen)."""
        return torch.cat([self.encode(x.to(self.device) * 2 - 1).cpu() for x in images.split(self.config.batch_size)])

    def fit_denoiser(self, images: torch.Tensor, generator: torch.Generator) -> list[float]:
        """Stage 2: the plain latent denoiser (stand-in for the pretrained SD U-Net)."""
        self._require_fitted_autoencoder()
        self.denoiser.train()
        losses = self._diffusion_steps(images, self.config.ldm_steps, list(self.denoiser.parameters()),
                                       False, generator, "diad ldm")
        self.denoiser.eval()
        return losses

    def fit_guidance(self, images: torch.Tensor, generator: torch.Generator, steps: int | None = None,
                     copy_encoder: bool = True) -> list[float]:
        """Stage 3: copy the denoiser encoder into SG; train SG + denoiser decoder (encoder, middle frozen).

        Without SG (``use_sg=False``) the whole plain denoiser trains on for the same number of steps.
        ``copy_encoder=False`` continues an earlier stage 3 instead of restarting SG from the denoiser.
        """
        self._require_fitted_autoencoder()
        steps = self.config.sg_steps if steps is None else int(steps)
        if self.sg is None:
            params = list(self.denoiser.parameters())
        else:
            if copy_encoder:
                self.sg.copy_from(self.denoiser.encoder)
            self.denoiser.encoder.requires_grad_(False)
            params = list(self.sg.parameters()) + list(self.denoiser.decoder.parameters()) + \
                list(self.denoiser.out.parameters())
        self.denoiser.train()
        if self.sg is not None:
            self.sg.train()
        try:
            losses = self._diffusion_steps(images, steps, params, self.sg is not None,
                                           generator, "diad sg")
        finally:
            self.denoiser.encoder.requires_grad_(True)
            self.eval()
        return losses

    def _require_fitted_autoencoder(self) -> None:
        if self.latent_scale is None:
            raise RuntimeError("DiAD is not fitted: call fit(train_loader) (or fit_autoencoder first)")

    # -- inference ------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, noise_step: int | None = None, ddim_steps: int | None = None,
                    guided: bool = True) -> torch.Tensor:
        """Encode, noise to ``noise_step``, DDIM-denoise, decode: reconstructions in [0, 1].

        Every image gets the same noise, drawn from ``config.seed``: same input, same output, whatever
        the batch.
        ``guided=False`` skips the SG network (for illustration only: the decoder was trained with it).
        """
        images = check_images(images).to(self.device)
        self._check_size(images)
        self._require_fitted_autoencoder()
        cfg = self.config
        noise_step = cfg.noise_step if noise_step is None else int(noise_step)
        ddim_steps = cfg.ddim_steps if ddim_steps is None else int(ddim_steps)
        x = images * 2 - 1
        z0 = self.encode(x)
        generator = torch.Generator().manual_seed(cfg.seed)
        noise = torch.randn((1, *z0.shape[1:]), generator=generator).to(z0).expand_as(z0)
        z_t = self.schedule.q_sample(z0, torch.full((z0.shape[0],), noise_step, dtype=torch.long), noise)
        hint = x if guided else None
        z_hat = self.schedule.ddim_sample(lambda z, t: self.eps(z, t, hint), z_t, noise_step, ddim_steps)
        return self.decode(z_hat)

    def score_view(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` as the scoring backbone sees them: shorter side resized to ``config.score_size``."""
        size = self.config.score_size
        h, w = images.shape[-2:]
        images = images.contiguous(memory_format=torch.channels_last)  # the backbone's layout (see __init__)
        if size is None or min(h, w) == size:
            return images
        scale = size / min(h, w)
        target = (max(1, round(h * scale)), max(1, round(w * scale)))
        return F.interpolate(images, size=target, mode="bilinear", align_corners=False, antialias=scale < 1)

    @torch.no_grad()
    def anomaly_map(self, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Sum over scales of 1 - cos(features(x), features(x_hat)), upsampled to the image (eq. 9-10).

        Features are taken at the scoring resolution (``score_view``); the map is at the input size.
        """
        total = 0
        for fa, fb in zip(self.backbone(self.score_view(images)), self.backbone(self.score_view(recon))):
            total = total + upsample_to(1 - F.cosine_similarity(fa, fb, dim=1), images.shape[-2:])
        return total

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = check_images(images).to(self.device)
        self._check_size(images)
        self._require_fitted_autoencoder()
        cfg = self.config
        size = images.shape[-1]
        kernel = max(1, round(cfg.pool_kernel * size / 256))
        scores, maps = [], []
        for chunk in images.split(cfg.batch_size):
            m = self.anomaly_map(chunk, self.reconstruct(chunk))
            m = gaussian_blur(m, sigma_for(cfg.sigma, size))
            maps.append(m)
            scores.append(pooled_max(m, kernel, cfg.pool_iters))
        return torch.cat(scores), torch.cat(maps)


__all__ = ["CPU_PRESET", "CPU_PRESET_IMAGE_SIZE", "DiAD", "DiADConfig", "Denoiser", "Guidance", "KLAutoencoder",
           "SemanticGuidance", "build_networks", "masked_errors", "parameter_counts", "pooled_max"]
