"""MKD: multiresolution knowledge distillation (Salehi et al., CVPR 2021, "KDAD").

A frozen network pretrained on ImageNet (the *expert*/teacher) describes every image at several
depths.  A smaller *cloner*/student, trained on normal images only, learns to reproduce those
descriptions; on an anomaly it was never shown how to imitate the teacher, so the two disagree.

1. Layers: the teacher's outputs at strides 4, 8, 16, 32 (VGG16: pool2..pool5).
2. Student: a thin VGG-like net (``student_width`` channels per 3x3 conv, BN + ReLU, max-pools); the
   convolution before each matched pool is widened to the teacher's channel count.
3. Loss per image:  ``L = sum_l L_dir,l + lambda * sum_l L_val,l`` with the value loss
   ``L_val,l = mean((C_l - T_l)^2)`` and the direction loss ``L_dir,l = 1 - cos(vec(C_l), vec(T_l))``
   (cosine between the whole flattened maps); ``lambda = 0.5`` (MVTec).
4. Image score: that loss, per test image.
5. Localisation (``localization="gradient"``, the paper's): the gradient of the loss with respect to
   the input image, averaged over colour channels, absolute value, Gaussian-smoothed (sigma 4 at
   128 px).  The cheaper option ``localization="discrepancy"`` (not the paper's) sums the per-position
   ``1 - cos`` over channels plus ``lambda`` times the per-position mean squared difference of every
   layer, upsampled.

Departures, on purpose: the teacher defaults to the offline EfficientNet-Lite0 (blocks 1, 2, 4, 6:
strides 4, 8, 16, 32) instead of VGG16; ``backbone="vgg16"`` gives VGG16 pool2..pool5 when its weights
are available (timm's feature points after the ReLU, max-pooled here), fed ImageNet-normalised input
(the official code feeds raw [0, 1] tensors).  The official code scores images on pool3..pool5 only
and uses guided back-propagation with per-image min-max normalisation of the maps; we score with the
loss over all distilled layers as the paper states, use vanilla gradients (the paper lists them among
its options) and keep maps un-normalised so they compare across images.  A fixed number of epochs,
no test-set model selection.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vadlab.backbones import FeatureExtractor, upsample_to
from vadlab.methods.ae_ssim import epoch_batches, epoch_record, gather_images, random_flips, resize_images, seeded
from vadlab.methods.base import AnomalyMethod, check_images
from vadlab.nn.filters import sigma_for, upsample_blur

#: teacher layers at strides 4, 8, 16, 32, and whether a 2x2 max-pool follows the feature point
TEACHER_LAYERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "efficientnet_lite0": (("blocks.1", "blocks.2", "blocks.4", "blocks.6"), False),
    "vgg16": (("features.8", "features.15", "features.22", "features.29"), True),  # -> pool2..pool5
}


@dataclass
class MKDConfig:
    """MKD hyperparameters; defaults follow the official code for MVTec (128 px, lambda 0.5, Adam 1e-3)."""

    image_size: int = 128  # images are resized to this
    backbone: str = "efficientnet_lite0"  # frozen teacher ("vgg16" = the paper's, needs its weights)
    weights: str = "imagenet"
    student_width: int = 16  # channels of the student's thin convolutions (cloner "B")
    convs_per_stage: int = 2
    lamda: float = 0.5  # weight of the value (MSE) loss; 0.5 for MVTec, 0.01 elsewhere
    epochs: int = 601
    batch_size: int = 64
    lr: float = 1e-3
    flips: bool = False
    localization: str = "gradient"  # "gradient" (paper) or "discrepancy" (cheap per-layer maps)
    sigma: float = 4.0  # Gaussian blur of the map, in pixels at sigma_reference px
    sigma_reference: int = 128
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def cpu_preset(cls) -> "MKDConfig":
        """Small-CPU preset: 128 px, 30 epochs at lr 1e-2, per-layer discrepancy maps (about two minutes per
        category on one core).  128 px, not 64: a defect of a few pixels at 256 px stays visible to the stride-4
        layer; 30 epochs is what the pipeline's time budget allows (the loss still falls slowly at 30)."""
        return cls(image_size=128, epochs=30, batch_size=16, lr=1e-2, localization="discrepancy")


class Student(nn.Module):
    """Thin VGG-like cloner whose outputs after pools 2..5 have the teacher's channels and strides."""

    def __init__(self, teacher_channels: list[int], teacher_strides: list[int], width: int = 16,
                 convs: int = 2) -> None:
        super().__init__()
        octaves = int(math.log2(max(teacher_strides)))
        matched = {int(math.log2(s)): c for s, c in zip(teacher_strides, teacher_channels)}
        self.stages = nn.ModuleList()
        self.is_output: list[bool] = []
        cin = 3
        for octave in range(1, octaves + 1):
            layers: list[nn.Module] = []
            for _ in range(convs - 1):
                layers += [nn.Conv2d(cin, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                cin = width
            cout = matched.get(octave, width)
            layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.MaxPool2d(2)]
            self.stages.append(nn.Sequential(*layers))
            self.is_output.append(octave in matched)
            cin = cout
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, (stage, is_out) in enumerate(zip(self.stages, self.is_output)):
            x = stage(x if i == 0 else F.relu(x))
            if is_out:
                outs.append(x)
        return outs


class MKD(AnomalyMethod):
    """Student distilled from a frozen teacher at four depths; score = distillation loss."""

    name = "mkd"
    Config = MKDConfig

    def __init__(self, config: MKDConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        if cfg.backbone not in TEACHER_LAYERS:
            raise ValueError(f"unsupported teacher {cfg.backbone!r}; choose one of {', '.join(TEACHER_LAYERS)}")
        if cfg.localization not in ("gradient", "discrepancy"):
            raise ValueError(f"localization must be 'gradient' or 'discrepancy', got {cfg.localization!r}")
        if cfg.image_size % 32:
            raise ValueError(f"image_size={cfg.image_size} must be a multiple of 32 (the deepest layer's stride)")
        layers, self.pool_teacher = TEACHER_LAYERS[cfg.backbone]
        self.backbone = FeatureExtractor(cfg.backbone, layers, cfg.weights)
        strides = [s * (2 if self.pool_teacher else 1) for s in self.backbone.strides]
        with seeded(cfg.seed):
            self.student = Student(self.backbone.channels, strides, cfg.student_width, cfg.convs_per_stage)
        self.student.to(memory_format=torch.channels_last)  # about 2x faster training on CPU; same up to rounding
        self.history: list[dict[str, float]] = []
        self.to(self.device)

    def teacher(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.backbone(x)
        return [F.max_pool2d(f, 2) for f in feats] if self.pool_teacher else feats

    def layer_losses(self, x: torch.Tensor, targets: list[torch.Tensor] | None = None
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-image value and direction losses, each a list over layers of ``[B]`` tensors (``targets``:
        the teacher's maps of ``x`` when already computed)."""
        targets = self.teacher(x) if targets is None else targets
        outputs = self.student(self.backbone.normalize(x))
        values = [(c - t).pow(2).flatten(1).mean(1) for c, t in zip(outputs, targets)]
        directions = [1 - F.cosine_similarity(c.flatten(1), t.flatten(1), dim=1) for c, t in zip(outputs, targets)]
        return values, directions

    def loss_per_image(self, x: torch.Tensor, targets: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``sum_l L_dir,l + lambda * sum_l L_val,l`` per image ``[B]``."""
        values, directions = self.layer_losses(x, targets)
        return sum(directions) + self.config.lamda * sum(values)

    def fit(self, train_loader: Iterable) -> "MKD":
        cfg = self.config
        data = gather_images(train_loader, cfg.image_size, self.device)
        generator = torch.Generator().manual_seed(cfg.seed)
        optimizer = torch.optim.Adam(self.student.parameters(), lr=cfg.lr)
        targets = None
        if not cfg.flips:  # the frozen teacher sees the same images every epoch: its maps are computed once
            with torch.no_grad():
                targets = [torch.cat(maps) for maps in zip(*(self.teacher(x) for x in data.split(cfg.batch_size)))]
        self.student.train()
        for epoch in tqdm(range(cfg.epochs), desc="mkd fit", leave=False):
            start, cpu, total = time.perf_counter(), time.process_time(), 0.0
            for index in epoch_batches(len(data), cfg.batch_size, generator):
                if targets is None:
                    loss = self.loss_per_image(random_flips(data[index], generator)).mean()
                else:
                    loss = self.loss_per_image(data[index], [t[index] for t in targets]).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(index)
            self.history.append(epoch_record(epoch, total / len(data), start, cpu))
        self.student.eval()
        return self

    def gradient_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``[B]`` and ``|d loss / d x|`` averaged over colour channels ``[B, S, S]``."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            scores = self.loss_per_image(x)
            (grad,) = torch.autograd.grad(scores.sum(), x)
        return scores.detach(), grad.mean(1).abs()

    @torch.no_grad()
    def discrepancy_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``[B]`` and the sum over layers of per-position ``1 - cos + lambda * MSE`` ``[B, S, S]``."""
        targets = self.teacher(x)
        outputs = self.student(self.backbone.normalize(x))
        total = x.new_zeros(x.shape[0], *x.shape[-2:])
        scores = x.new_zeros(x.shape[0])
        for c, t in zip(outputs, targets):
            local = (1 - F.cosine_similarity(c, t, dim=1)) + self.config.lamda * (c - t).pow(2).mean(1)
            total += upsample_to(local, x.shape[-2:])
            scores += 1 - F.cosine_similarity(c.flatten(1), t.flatten(1), dim=1)
            scores += self.config.lamda * (c - t).pow(2).flatten(1).mean(1)
        return scores, total

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        images = check_images(images).to(self.device)
        scores, maps = [], []
        for chunk in images.split(cfg.batch_size):
            x = resize_images(chunk, cfg.image_size)
            fn = self.gradient_map if cfg.localization == "gradient" else self.discrepancy_map
            s, m = fn(x)
            with torch.no_grad():
                m = upsample_blur(m, chunk.shape[-2:],
                                  sigma_for(cfg.sigma, chunk.shape[-1], cfg.sigma_reference))
            maps.append(m)
            scores.append(s)
        return torch.cat(scores), torch.cat(maps)
