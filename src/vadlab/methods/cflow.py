"""CFLOW-AD: conditional normalizing flows on pretrained features (Gudovskiy et al., WACV 2022).

1. **Encoder.**  A frozen ImageNet CNN gives K feature maps ("pooled scales").  Every position i of
   scale k carries a feature vector ("fiber") ``z_i`` of D_k channels.
2. **Decoders.**  Per scale, a conditional normalizing flow ``u = g_k^{-1}(z, c)``: a chain of affine
   couplings (soft-clamped log-scale, alpha = 1.9) separated by fixed channel mixings.  The coupling subnets see
   the kept half of the fiber concatenated with the condition ``c_i``, a 2-D sinusoidal positional
   encoding of the fiber's grid position (P = 128 channels).
3. **Loss.**  Maximum likelihood with a standard normal base:
   ``log p(z|c) = -1/2 ||u||^2 - D/2 log(2 pi) + log|det J|``, divided by D (per dimension) and
   averaged over random mini-batches of N = 256 fibers drawn from all positions of all images.
4. **Scoring.**  Per scale the per-dimension log-likelihood of every test fiber becomes a
   probability ``p = exp(log p - m_k)``, is upsampled bilinearly to the image and the K maps are
   summed; the anomaly map is ``K - sum_k p_k`` (higher = more anomalous), the image score its max.

Departures from the paper / the official code, on purpose:

- **Normalisation of the probabilities uses training data only.**  The official code subtracts the
  maximum log-likelihood over the *whole test set*, so a test image's score depends on which images
  are tested with it.  Here ``m_k`` is the maximum per-dimension log-likelihood over the training
  fibers of scale k, stored at the end of ``fit``: predictions are per-image and reproducible.
- The loss is the plain per-dimension negative log-likelihood of the paper (Eq. 7); the official code
  wraps it in ``-logsigmoid``.  The learning rate follows the code's schedule (warm-up over the first
  2 of 25 meta-epochs from lr/10, then cosine to lr * 1e-3).
- **Which weights are kept.**  The official code evaluates after every meta-epoch and reports the
  epoch with the best *test* AUROC, which uses test images and their labels to choose the model.
  Here, by default (``val_fraction = 0``), the final weights are used.  With ``val_fraction > 0`` a
  seeded share of the *normal training images* is held out (never fitted, never used for the actnorm
  initialisation or for ``m_k``); after every sub-epoch the mean per-dimension negative log-likelihood
  of their fibers (averaged over the scales) is measured, the weights with the lowest held-out NLL are
  kept, and training stops once it has not improved for ``patience`` evaluations (0: run the whole
  schedule, still keep the best).  ``history`` records the training loss and the held-out NLL of each
  sub-epoch (training curves); ``val_indices`` are the held-out images' positions in the loader's order.
  ``m_k`` stays the maximum over the fitted training fibers only.
- Default encoder: the offline EfficientNet-Lite0, blocks 2, 4, 6 (strides 8, 16, 32 like WRN-50
  layers 2-4) instead of WRN-50.  Features are computed once and cached (no rotation augmentation).
- The official decoder is FrEIA's ``SequenceINN`` of ``AllInOneBlock(affine_clamping=1.9,
  global_affine_type='SOFTPLUS', permute_soft=True)`` [cflow-ad ``model.py``].  Each such block is an
  affine coupling, then a learnt per-channel global affine (scale ``0.1 * softplus_{beta=0.5}(g)``,
  initialised to 1, plus an offset), then a fixed **soft permutation**: a random orthogonal matrix
  drawn once from SO(D) (``scipy.stats.special_ortho_group``; not trained, ``log|det| = 0``).  Here
  instead: one actnorm layer, initialised to standardise the training fibers, opens each decoder (in
  place of the per-block global affines), and the couplings are separated by **hard** random
  permutations (:class:`~vadlab.nn.flows.FixedPermutation`), which mix no channels, only reorder them.
- **Soft clamp.**  ``AllInOneBlock`` scales the whole subnet output by 0.1 and clamps the log-scale as
  ``alpha * tanh(0.1 * a)`` (shift ``0.1 * a``): bounded by ``alpha``, slope ``0.1 * alpha`` = 0.19 at
  zero.  vadlab's :func:`~vadlab.nn.flows.soft_clamp` is ``alpha * (2/pi) * atan(s / alpha)`` (FrEIA's
  ``"ATAN"`` clamp of its GLOW / RealNVP coupling blocks, ``alpha * 0.636 * atan(s / alpha)``; the same
  form as PyramidFlow's), also bounded by ``alpha`` but with slope 2/pi = 0.64 at zero and no 0.1 on
  the shift.  Both are smooth and bounded; they differ in the subnet output scale they start from.
- The subnet is Linear -> ReLU -> Linear with hidden width 2 x input, as in the code (the paper's text
  is ambiguous).

If training diverges (a non-finite loss), :class:`FlowDivergenceError` names the step and the scale.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from vadlab.backbones import FeatureExtractor, upsample_to
from vadlab.methods.base import AnomalyMethod, check_images, iter_images
from vadlab.nn.flows import (ActNorm, AffineCoupling, FixedPermutation, FlowDivergenceError, SequentialFlow,
                             positional_encoding_2d, standard_normal_logprob)


@dataclass
class CFlowConfig:
    """CFLOW-AD hyperparameters; defaults follow the official code (8 blocks, P = 128, N = 256, lr 2e-4)."""

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ("blocks.2", "blocks.4", "blocks.6")
    weights: str = "imagenet"
    backbone_precision: str = "float32"  # or "bfloat16": the frozen backbone under bfloat16 autocast
    coupling_blocks: int = 8
    clamp: float = 1.9  # soft clamp alpha of the log-scale
    condition_channels: int = 128  # P, the positional encoding width
    hidden_ratio: float = 2.0  # subnet hidden width = ratio x its input width
    fiber_batch: int = 256  # N fibers per optimiser step
    lr: float = 2e-4
    meta_epochs: int = 25
    sub_epochs: int = 8  # passes over all training fibers per meta-epoch
    warmup_epochs: int = 2  # meta-epochs of linear warm-up from lr / 10
    lr_decay: float = 1e-3  # final lr = lr * lr_decay (cosine)
    batch_size: int = 32  # images per encoder batch
    val_fraction: float = 0.0  # share of the training images held out for early stopping (0: off, the paper)
    patience: int = 0  # stop after this many evaluations without a better held-out NLL (0: never stop early)
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def cpu_preset(cls) -> "CFlowConfig":
        """Small-CPU preset (~1 min for 200 + 80 images at 128 px on one core): 3 scales, 8 blocks, P = 64."""
        return cls(**CPU_PRESET)


#: overrides of :class:`CFlowConfig` for the small-CPU preset (use at 128 px)
#: (at 128 px the paper-like strides 8/16/32 leave 16x16 grids or less, so the preset takes strides 4/8/16).
#: Chosen by the held-out NLL of 20 % of the normal training images, never by a test result
#: (benchmarks/cflow_presets.py, results in benchmarks/results/cflow_presets_*): of 4 -> 8 couplings, 3x2 -> 7x2
#: epochs with early stopping, lr 1e-3 -> 2e-4 and P = 64 -> 128 (each alone, within ~2.5x the old fit time),
#: 8 couplings gave the lowest held-out NLL on every generated category.  The held-out images stay out of
#: the fit (``val_fraction``); the weights of the sub-epoch with the best held-out NLL are kept.
CPU_PRESET: dict = {"layers": ("blocks.1", "blocks.2", "blocks.4"), "coupling_blocks": 8, "condition_channels": 64,
                    "meta_epochs": 3, "sub_epochs": 2, "warmup_epochs": 1, "lr": 1e-3, "val_fraction": 0.2}


def build_decoder(channels: int, cfg: CFlowConfig, seed: int) -> SequentialFlow:
    """One conditional flow: actnorm, then ``coupling_blocks`` x (affine coupling + fixed hard permutation).

    The official code's FrEIA ``AllInOneBlock`` mixes with a fixed random *rotation* instead (``permute_soft``).
    """
    layers: list = [ActNorm(channels)]
    for b in range(cfg.coupling_blocks):
        in_ch = channels - channels // 2 + cfg.condition_channels
        layers.append(AffineCoupling(channels, cfg.condition_channels, hidden=int(cfg.hidden_ratio * in_ch),
                                     clamp=cfg.clamp, subnet="mlp"))
        layers.append(FixedPermutation(channels, seed=seed * 1000 + b))
    return SequentialFlow(layers)


class CFlow(AnomalyMethod):
    """Frozen encoder + one conditional flow per scale; likelihood maps summed over scales."""

    name = "cflow"
    Config = CFlowConfig

    def __init__(self, config: CFlowConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        if cfg.condition_channels % 4:
            raise ValueError(f"condition_channels={cfg.condition_channels} must be a multiple of 4")
        if not 0 <= cfg.val_fraction < 1:
            raise ValueError(f"val_fraction={cfg.val_fraction} must be in [0, 1) (0 = no held-out images)")
        if cfg.patience < 0:
            raise ValueError(f"patience={cfg.patience} must be >= 0 (0 = never stop early)")
        torch.manual_seed(cfg.seed)
        self.backbone = FeatureExtractor(cfg.backbone, cfg.layers, cfg.weights, precision=cfg.backbone_precision)
        self.backbone.cache_features = True  # it embeds the data's images (vadlab.backbones.FeatureCache)
        self.decoders = nn.ModuleList(build_decoder(c, cfg, cfg.seed + k) for k, c in enumerate(self.backbone.channels))
        # per-scale max per-dimension log-likelihood over the training fibers (set in fit)
        self.register_buffer("train_max_logp", None)
        self.to(self.device)

    # -- model ----------------------------------------------------------------------
    def condition(self, height: int, width: int) -> torch.Tensor:
        """Positional encodings ``[H*W, P]`` of a grid, row-major like ``flatten``."""
        pe = positional_encoding_2d(self.config.condition_channels, height, width)
        return pe.flatten(1).T.to(self.device)

    def log_likelihood(self, scale: int, fibers: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Per-dimension log-likelihood ``log p(z|c) / D`` of fibers ``[N, D]`` under decoder ``scale``."""
        u, logdet = self.decoders[scale](fibers, cond)
        return (standard_normal_logprob(u) + logdet) / fibers.shape[1]

    def _scale_logp(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-dimension log-likelihood maps ``[B, H_k, W_k]`` for each scale."""
        out = []
        for k, f in enumerate(features):
            b, d, h, w = f.shape
            fibers = f.permute(0, 2, 3, 1).reshape(-1, d)
            cond = self.condition(h, w).repeat(b, 1)
            out.append(self.log_likelihood(k, fibers, cond).reshape(b, h, w))
        return out

    # -- training ---------------------------------------------------------------------
    def _lr(self, progress: float) -> float:
        """Learning rate at ``progress`` meta-epochs: linear warm-up from lr/10, then cosine to lr*decay."""
        cfg = self.config
        if progress < cfg.warmup_epochs:
            return cfg.lr * (0.1 + 0.9 * progress / cfg.warmup_epochs)
        span = max(cfg.meta_epochs - cfg.warmup_epochs, 1e-8)
        t = min((progress - cfg.warmup_epochs) / span, 1.0)
        low = cfg.lr * cfg.lr_decay
        return low + 0.5 * (cfg.lr - low) * (1 + math.cos(math.pi * t))

    def split_images(self, n_images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded split of ``n_images`` training images into (fitted, held-out) index tensors, each sorted.

        ``round(val_fraction * n_images)`` images are held out; with ``val_fraction = 0`` all are fitted.
        """
        cfg = self.config
        n_val = round(cfg.val_fraction * n_images)
        if cfg.val_fraction > 0 and not 1 <= n_val < n_images:
            raise ValueError(f"val_fraction={cfg.val_fraction} of {n_images} training images holds out {n_val}: "
                             "need at least one held-out and one fitted image (more images or another fraction)")
        perm = torch.randperm(n_images, generator=torch.Generator().manual_seed(cfg.seed))
        return perm[n_val:].sort().values, perm[:n_val].sort().values

    def _fibers(self, feats: list[torch.Tensor], images: torch.Tensor) -> tuple[list, list]:
        """Per scale, the fibers ``[N, D]`` of the images ``images`` (indices) and their conditions ``[N, P]``."""
        fibers, conds = [], []
        for f in feats:
            f = f[images]
            b, d, h, w = f.shape
            fibers.append(f.permute(0, 2, 3, 1).reshape(-1, d))
            conds.append(self.condition(h, w).repeat(b, 1))
        return fibers, conds

    @torch.no_grad()
    def _log_likelihoods(self, k: int, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``log_likelihood`` of scale ``k`` for many fibers, in chunks of 4096 (bounded memory)."""
        return torch.cat([self.log_likelihood(k, zz, cc) for zz, cc in zip(z.split(4096), c.split(4096))])

    def _mean_nll(self, fibers: list[torch.Tensor], conds: list[torch.Tensor]) -> float:
        """Mean per-dimension negative log-likelihood of the fibers, averaged over the scales."""
        per_scale = [-self._log_likelihoods(k, z, c).mean() for k, (z, c) in enumerate(zip(fibers, conds))]
        return torch.stack(per_scale).mean().item()

    def fit(self, train_loader: Iterable) -> "CFlow":
        cfg = self.config
        with torch.no_grad():
            feats = [torch.cat(f) for f in zip(*(self.backbone(x) for x in
                                                 tqdm(iter_images(train_loader, self.device), desc="cflow features",
                                                      leave=False)))]
        if not feats:
            raise ValueError("the training loader yielded no images")
        fit_idx, val_idx = self.split_images(len(feats[0]))
        self.val_indices = val_idx.tolist()  # positions in the loader's order of the held-out images
        fibers, conds = self._fibers(feats, fit_idx)
        val_fibers, val_conds = self._fibers(feats, val_idx) if len(val_idx) else (None, None)
        for decoder, z in zip(self.decoders, fibers):
            decoder.layers[0].initialize(z)  # standardise each scale's channels before training
        gen = torch.Generator().manual_seed(cfg.seed)
        # fused: one kernel for the ~100 small tensors of the flows (the step 3.9 -> 0.8 ms on one CPU thread)
        optimizer = torch.optim.Adam(self.decoders.parameters(), lr=cfg.lr, fused=True)
        self.decoders.train()
        step = 0
        total = cfg.meta_epochs * cfg.sub_epochs
        #: per sub-epoch: mean training loss (per-dimension NLL) over all scales' steps, the learning rate and,
        #: with held-out images, their mean per-dimension NLL ``val_nll`` (not saved)
        self.history: list[dict[str, float]] = []
        best_nll, best_state, self.best_epoch = math.inf, None, None
        for epoch in tqdm(range(total), desc="cflow fit", leave=False):
            epoch_loss, epoch_steps = 0.0, 0
            # one sub-epoch: every fiber of every scale once, scales interleaved step by step as in the code
            orders = [torch.randperm(len(z), generator=gen) for z in fibers]
            n_steps = max(math.ceil(len(z) / cfg.fiber_batch) for z in fibers)
            for i in range(n_steps):
                lr = self._lr((epoch + i / n_steps) / cfg.sub_epochs)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                for k, (z, c, order) in enumerate(zip(fibers, conds, orders)):
                    idx = order[i * cfg.fiber_batch:(i + 1) * cfg.fiber_batch]
                    if len(idx) == 0:
                        continue
                    loss = -self.log_likelihood(k, z[idx], c[idx]).mean()
                    if not torch.isfinite(loss):
                        raise FlowDivergenceError(
                            f"CFLOW training diverged at step {step} (epoch {epoch}) on scale {k} "
                            f"({cfg.layers[k]}): loss = {loss.item()}; lower lr (now {lr:.3g}) or clamp ({cfg.clamp})")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    epoch_loss, epoch_steps = epoch_loss + loss.item(), epoch_steps + 1
            record = {"epoch": epoch, "loss": epoch_loss / max(epoch_steps, 1), "lr": lr}
            self.history.append(record)
            if val_fibers is None:
                continue
            # early stopping on the held-out normal images (never test images)
            self.decoders.eval()
            record["val_nll"] = self._mean_nll(val_fibers, val_conds)
            self.decoders.train()
            if record["val_nll"] < best_nll:
                best_nll, self.best_epoch = record["val_nll"], epoch
                best_state = copy.deepcopy(self.decoders.state_dict())
            elif cfg.patience and epoch - self.best_epoch >= cfg.patience:
                break
        if best_state is not None:
            self.decoders.load_state_dict(best_state)  # the weights with the lowest held-out NLL
        self.decoders.eval()
        # training-data normalisation of the probabilities (never the test set)
        with torch.no_grad():
            maxima = []
            for k, (z, c) in enumerate(zip(fibers, conds)):
                logp = self._log_likelihoods(k, z, c)
                if not torch.isfinite(logp).all():
                    raise FlowDivergenceError(f"CFLOW produced non-finite training log-likelihoods on scale {k} "
                                              f"({cfg.layers[k]}) after {step} steps; lower lr or clamp")
                maxima.append(logp.max())
            self.train_max_logp = torch.stack(maxima)
        return self

    # -- scoring ---------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.train_max_logp is None:
            raise RuntimeError("CFlow.predict called before fit(); fit on defect-free images first")
        images = check_images(images).to(self.device)
        self.eval()
        scores, maps = [], []
        for chunk in images.split(self.config.batch_size):
            size = chunk.shape[-2:]
            prob = torch.zeros(len(chunk), *size, device=self.device)
            for k, logp in enumerate(self._scale_logp(self.backbone(chunk))):
                prob += upsample_to(torch.exp(logp - self.train_max_logp[k]), size)
            m = len(self.decoders) - prob
            maps.append(m)
            scores.append(m.flatten(1).amax(1))
        return torch.cat(scores), torch.cat(maps)


__all__ = ["CFlow", "CFlowConfig", "CPU_PRESET", "FlowDivergenceError", "build_decoder"]
