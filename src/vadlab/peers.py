"""Side by side with anomalib: its PaDiM, PatchCore and CFLOW on exactly the inputs vadlab's methods get.

anomalib (pinned to 2.7.0, not a requirement of vadlab) is the library most users would reach for, and
the only one of the surveyed toolkits that implements three of vadlab's methods.  This module drives
anomalib's own torch models (``PadimModel``, ``PatchcoreModel``, and the ``Cflow`` Lightning module's
``training_step``) directly, without a Lightning Trainer, so its speed is not charged for trainer
overhead, and scores their raw anomaly maps with :mod:`vadlab.metrics` (anomalib's post-processor,
which normalises scores with statistics of a validation set that defaults to the test set, is not used).

What is the same for both libraries (see :func:`peer_settings`):

- the images: the same tensors, already resized to the run's image size, fed in the same order and in
  the same batch sizes; anomalib's models get them normalised the way the backbone expects
  (mean = std = 0.5 for EfficientNet-Lite0), which vadlab's extractor does internally;
- the backbone and weights: timm's ``tf_efficientnet_lite0``, the same vadlab offline ImageNet weights
  copied into anomalib's feature extractor (no hub download), the same layers;
- the method settings that anomalib exposes: PaDiM's channel count *and* channel subset, PatchCore's
  coreset ratio and neighbour count, CFLOW's coupling blocks, condition width, clamp, fiber batch,
  learning rate and number of passes over the training fibers; the Gaussian blur of the maps
  (anomalib's own blur class, given vadlab's sigma scaled to the image size).

What differs is listed per method in :data:`DIFFERENCES` (the book prints it).  Timings and peak
memory are measured identically for both (:class:`PeakMemory`, ``time.perf_counter`` around the
model calls only).
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    import pandas as pd

ANOMALIB_VERSION = "2.7.0"
INSTALL_HINT = f"pip install anomalib=={ANOMALIB_VERSION}"
PEER_METHODS = ("padim", "patchcore", "cflow")
#: anomalib's (timm's) name of vadlab's default backbone, and its input statistics
TIMM_LITE0 = "tf_efficientnet_lite0"
LITE0_MEAN = LITE0_STD = 0.5

#: what anomalib does differently from vadlab even with matched settings (one line each)
DIFFERENCES: dict[str, list[str]] = {
    "padim": [
        "covariance: anomalib adds 0.01 I + 1e-5 I and inverts per position after storing every training "
        "embedding; vadlab streams sums and adds ridge I (0.01)",
        "channel subset: anomalib draws its own random subset; here it is given vadlab's subset (its `idx` "
        "buffer), so both model the same channels",
        "vadlab runs the backbone in channels-last memory format (faster on CPU, same numbers up to rounding)",
    ],
    "patchcore": [
        "coreset projection: anomalib projects to the Johnson-Lindenstrauss dimension of eps = 0.9 (sparse "
        "random matrix), vadlab to 128 dimensions (dense); both run exact greedy k-center on the projection",
        "first coreset centre: anomalib draws it from torch's global generator (seeded here), vadlab from "
        "its own seed, so the two coresets differ",
        "anomaly map: anomalib upsamples the patch scores with nearest-neighbour interpolation, vadlab "
        "bilinearly (then both blur with the same sigma)",
        "vadlab runs the backbone in channels-last memory format (faster on CPU, same numbers up to rounding)",
    ],
    "cflow": [
        "decoder: anomalib's FrEIA-style AllInOneBlock (learnt global affine per block, softplus), vadlab an "
        "actnorm layer initialised on the training fibers, then affine couplings with fixed permutations",
        "loss: anomalib minimises -logsigmoid(log p / D) (as the official code), vadlab -log p / D (the paper)",
        "schedule: anomalib keeps the learning rate constant; vadlab warms up and decays it (cosine)",
        "held-out images: with val_fraction > 0 (the CPU preset: 0.2) vadlab fits only the other training images "
        "and keeps the sub-epoch with the best held-out NLL; anomalib fits all and keeps the last",
        "fibers: anomalib recomputes the encoder every step and shuffles fibers within each image batch, one "
        "scale after the other; vadlab caches the features and shuffles over all images, scales interleaved",
        "scoring: anomalib's forward normalises each scale by the maximum log-likelihood of the *current "
        "test batch* (scores depend on which images share a batch); here its per-scale log-likelihoods are "
        "normalised by their maximum over the training fibers instead, exactly as vadlab does, and "
        "anomalib's own batch-normalised forward is reported beside it with the whole test set as one batch",
        "upsampling: anomalib bilinear with align_corners=True, vadlab align_corners=False",
    ],
}


class AnomalibMissingError(ImportError):
    """anomalib is not installed (it is deliberately not one of vadlab's requirements)."""


def require_anomalib() -> Any:
    """Import and return the anomalib package, or raise :class:`AnomalibMissingError` saying how to install it."""
    try:
        return importlib.import_module("anomalib")
    except ImportError as err:
        raise AnomalibMissingError(
            "the side-by-side comparison needs anomalib, which is not installed (it is not in vadlab's "
            f"requirements): {INSTALL_HINT}  (vadlab's numbers were measured against {ANOMALIB_VERSION}; "
            f"other versions may differ)") from err


def anomalib_available() -> bool:
    """True when anomalib can be imported."""
    try:
        require_anomalib()
    except AnomalibMissingError:
        return False
    return True


# ------------------------------------------------------------------------------------ measurement


def _rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; falls back to 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the next run starts from a clean floor."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak resident memory *added* while the block runs (MiB), sampled every ``interval`` seconds.

    Both libraries run in the same process, so the process-wide maximum (``ru_maxrss``) would charge
    the second run for the first; this samples the resident size in a background thread instead and
    reports the peak above the level at entry (after :func:`release_memory`).
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        release_memory()
        self.start = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.start) / 2**20


@dataclass
class RunResult:
    """One library's run of one method on one category: raw outputs and costs."""

    library: str
    method: str
    scores: np.ndarray  # [N] image scores, higher = more anomalous
    maps: np.ndarray  # [N, H, W] anomaly maps at the input size
    fit_seconds: float
    predict_seconds_per_image: float
    peak_memory_mb: float  # peak resident memory added during fit + predict
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. anomalib's native CFLOW scoring


def load_category(root: str | Path, category: str, image_size: int) -> dict[str, torch.Tensor]:
    """Train images and test images, labels and masks of one category as tensors (images in [0, 1])."""
    from vadlab.data import MVTecDataset

    train = MVTecDataset(root, category, "train", image_size)
    test = [item for item in MVTecDataset(root, category, "test", image_size)]
    return {"train": torch.stack([item["image"] for item in train]),
            "test": torch.stack([t["image"] for t in test]),
            "labels": torch.tensor([int(t["label"]) for t in test]),
            "masks": torch.stack([t["mask"][0] for t in test]).to(torch.uint8)}


# ------------------------------------------------------------------------------------ vadlab side


def run_vadlab(method: str, train: torch.Tensor, test: torch.Tensor, overrides: dict[str, Any] | None = None,
               batch_size: int = 16, seed: int = 0) -> tuple[RunResult, torch.nn.Module]:
    """Fit vadlab's ``method`` on ``train`` (in batches of ``batch_size``, in order) and predict ``test``.

    Returns the result and the fitted model (its config and channel subset set the peer's settings).
    """
    from vadlab.evaluate import build_method, seed_everything

    seed_everything(seed)
    with PeakMemory() as mem:
        start = time.perf_counter()
        model = build_method(method, overrides)
        model.fit(list(train.split(batch_size)))
        fit_s = time.perf_counter() - start
        model.eval()
        scores, maps, predict_s = [], [], 0.0
        with torch.no_grad():
            for chunk in test.split(batch_size):
                start = time.perf_counter()
                s, m = model.predict(chunk)
                predict_s += time.perf_counter() - start
                scores.append(s.float().cpu().numpy())
                maps.append(m.float().cpu().numpy())
    return RunResult("vadlab", method, np.concatenate(scores), np.concatenate(maps), fit_s,
                     predict_s / len(test), mem.peak_mb), model


# ------------------------------------------------------------------------------------ settings


def peer_settings(method: str, config: Any, image_size: int) -> dict[str, Any]:
    """anomalib keyword settings equal to vadlab's ``config`` (a method Config dataclass) at ``image_size``.

    Raises ValueError for a vadlab setting anomalib cannot express (rather than comparing unlike runs).
    """
    from vadlab.nn.filters import sigma_for

    if method not in PEER_METHODS:
        raise ValueError(f"anomalib has no counterpart of {method!r}; compare one of {PEER_METHODS}")
    if config.backbone != "efficientnet_lite0":
        raise ValueError(f"the comparison copies vadlab's EfficientNet-Lite0 weights into anomalib; "
                         f"backbone {config.backbone!r} is not supported here: use efficientnet_lite0")
    layers = list(config.layers)
    if method == "padim":
        return {"layers": layers, "n_features": int(config.n_features),
                "sigma": float(sigma_for(config.sigma, image_size))}
    if method == "patchcore":
        if config.patch_size != 3:
            raise ValueError(f"anomalib's PatchCore averages 3 x 3 neighbourhoods; patch_size={config.patch_size} "
                             "cannot be compared: use patch_size=3")
        if config.image_score == "max":  # anomalib's num_neighbors=1 returns the plain maximum
            neighbours = 1
        else:
            neighbours = int(config.num_neighbors)
        return {"layers": layers, "coreset_ratio": float(config.coreset_ratio), "num_neighbors": neighbours,
                "sigma": float(sigma_for(config.sigma, image_size)), "embed_dim": int(config.embed_dim)}
    return {"layers": layers, "coupling_blocks": int(config.coupling_blocks),
            "condition_vector": int(config.condition_channels), "clamp_alpha": float(config.clamp),
            "fiber_batch_size": int(config.fiber_batch), "lr": float(config.lr),
            "epochs": int(config.meta_epochs * config.sub_epochs)}


# ------------------------------------------------------------------------------------ anomalib side


def _normalise(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> EfficientNet-Lite0 input statistics (what vadlab's extractor does itself)."""
    return (images - LITE0_MEAN) / LITE0_STD


def _load_lite0(timm_features: torch.nn.Module, layers: Sequence[str]) -> None:
    """Copy vadlab's offline EfficientNet-Lite0 ImageNet weights into anomalib's timm features-only model."""
    from vadlab.backbones import FeatureExtractor

    # the unfolded network (a frozen extractor folds its batch norms into its convolutions; timm's has them)
    source = FeatureExtractor("efficientnet_lite0", tuple(layers), trainable=True).body.state_dict()
    target = timm_features.state_dict()
    if set(source) != set(target):
        differ = sorted(set(source) ^ set(target))[:3]
        raise RuntimeError("anomalib's EfficientNet-Lite0 feature extractor does not match vadlab's "
                           f"(keys differ, e.g. {differ}); use anomalib=={ANOMALIB_VERSION}")
    timm_features.load_state_dict(source)


def _predict_batches(fn, test: torch.Tensor, batch_size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Apply ``fn(images) -> (scores, maps)`` batch by batch; returns scores, maps and seconds per image."""
    scores, maps, seconds = [], [], 0.0
    with torch.no_grad():
        for chunk in test.split(batch_size):
            start = time.perf_counter()
            s, m = fn(chunk)
            seconds += time.perf_counter() - start
            scores.append(s.reshape(len(chunk)).float().cpu().numpy())
            maps.append(m.reshape(len(chunk), *chunk.shape[-2:]).float().cpu().numpy())
    return np.concatenate(scores), np.concatenate(maps), seconds / len(test)


def _anomalib_predictor(model: Any) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``images -> (scores, maps)`` of an anomalib torch model in eval mode (its ``InferenceBatch`` output)."""

    def predict(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(_normalise(x))
        return out.pred_score, out.anomaly_map

    return predict


def anomalib_padim(train: torch.Tensor, test: torch.Tensor, layers: Sequence[str], n_features: int,
                   sigma: float, channel_index: torch.Tensor | None = None, batch_size: int = 16,
                   seed: int = 0) -> RunResult:
    """anomalib's ``PadimModel`` fitted on ``train`` and applied to ``test``.

    Same weights, layers and channel count as vadlab; ``channel_index`` (vadlab's random subset) replaces
    anomalib's own draw so that both model the same channels; the map blur is anomalib's
    ``AnomalyMapGenerator`` with vadlab's sigma.  anomalib keeps every training embedding until
    ``fit()`` (memory grows with the training set); its covariance gets 0.01 I + 1e-5 I.
    """
    require_anomalib()
    from anomalib.models.image.padim.anomaly_map import AnomalyMapGenerator
    from anomalib.models.image.padim.torch_model import PadimModel

    from vadlab.evaluate import seed_everything

    seed_everything(seed)
    settings = {"layers": list(layers), "n_features": n_features, "sigma": sigma}
    with PeakMemory() as mem:
        start = time.perf_counter()
        model = PadimModel(backbone=TIMM_LITE0, layers=list(layers), pre_trained=False, n_features=n_features)
        _load_lite0(model.feature_extractor.feature_extractor, layers)
        if channel_index is not None:
            if channel_index.shape != model.idx.shape:
                raise ValueError(f"channel_index has {tuple(channel_index.shape)} entries, anomalib's PaDiM "
                                 f"expects {tuple(model.idx.shape)} (n_features)")
            model.idx.copy_(channel_index)
        model.anomaly_map_generator = AnomalyMapGenerator(sigma=sigma)
        model.train()
        with torch.no_grad():
            for chunk in train.split(batch_size):  # Padim.training_step: embeddings into the memory bank
                model(_normalise(chunk))
            model.fit()  # Padim.fit: Gaussian per position
        fit_s = time.perf_counter() - start
        model.eval()

        scores, maps, per_image = _predict_batches(_anomalib_predictor(model), test, batch_size)
    return RunResult("anomalib", "padim", scores, maps, fit_s, per_image, mem.peak_mb, settings)


def anomalib_patchcore(train: torch.Tensor, test: torch.Tensor, layers: Sequence[str], coreset_ratio: float,
                       num_neighbors: int, sigma: float, embed_dim: int = 1024, batch_size: int = 16,
                       seed: int = 0) -> RunResult:
    """anomalib's ``PatchcoreModel`` fitted on ``train`` and applied to ``test``.

    Same weights, layers, 3 x 3 neighbourhood averaging, coreset ratio, neighbour count b of Eq. 7 and
    map blur (anomalib's ``AnomalyMapGenerator`` with vadlab's sigma).  anomalib never pools channels,
    so ``embed_dim`` must be at least the concatenated channel count (vadlab then does not pool either).
    Its coreset projection dimension (JL bound at eps = 0.9) and nearest-neighbour map upsampling are
    fixed; its first coreset centre comes from torch's global generator, seeded with ``seed``.
    """
    require_anomalib()
    from anomalib.models.image.patchcore.anomaly_map import AnomalyMapGenerator
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    from vadlab.evaluate import seed_everything

    seed_everything(seed)  # its projection draws from torch and NumPy, its first centre from torch
    settings = {"layers": list(layers), "coreset_ratio": coreset_ratio, "num_neighbors": num_neighbors,
                "sigma": sigma}
    with PeakMemory() as mem:
        start = time.perf_counter()
        model = PatchcoreModel(layers=list(layers), backbone=TIMM_LITE0, pre_trained=False,
                               num_neighbors=num_neighbors)
        _load_lite0(model.feature_extractor.feature_extractor, layers)
        channels = sum(model.feature_extractor.out_dims)
        if channels > embed_dim:
            raise ValueError(f"layers {list(layers)} give {channels} channels; vadlab pools them to "
                             f"embed_dim={embed_dim} but anomalib cannot: use embed_dim >= {channels}")
        model.anomaly_map_generator = AnomalyMapGenerator(sigma=sigma)
        model.train()
        with torch.no_grad():
            for chunk in train.split(batch_size):  # Patchcore.training_step: patch features stored
                model(_normalise(chunk))
            model.subsample_embedding(coreset_ratio)  # Patchcore.fit: greedy coreset
        fit_s = time.perf_counter() - start
        model.eval()

        scores, maps, per_image = _predict_batches(_anomalib_predictor(model), test, batch_size)
    settings["memory_bank"] = int(model.memory_bank.shape[0])
    return RunResult("anomalib", "patchcore", scores, maps, fit_s, per_image, mem.peak_mb, settings)


def _cflow_scale_logp(model: Any, images: torch.Tensor) -> list[torch.Tensor]:
    """Per-dimension log-likelihood maps ``[B, h, w]`` per scale from anomalib's ``CflowModel``.

    The same computation as ``CflowModel.forward`` (its encoder, positional encoding, decoders,
    ``get_logp``, chunks of ``fiber_batch_size`` fibers) stopped before its batch-dependent normalisation.
    """
    from anomalib.models.image.cflow.utils import get_logp, positional_encoding_2d

    features = model.encoder(images)
    out = []
    for k, layer in enumerate(model.pool_layers):
        f = features[layer]
        b, d, h, w = f.shape
        fibers = f.permute(0, 2, 3, 1).reshape(-1, d)  # (b h w) x d, as its einops rearrange
        cond = positional_encoding_2d(model.condition_vector, h, w).flatten(1).T.repeat(b, 1).to(f.device)
        logp = []
        for z, c in zip(fibers.split(model.fiber_batch_size), cond.split(model.fiber_batch_size)):
            u, log_det = model.decoders[k](z, [c])
            logp.append(get_logp(d, u, log_det) / d)
        out.append(torch.cat(logp).reshape(b, h, w))
    return out


def anomalib_cflow(train: torch.Tensor, test: torch.Tensor, layers: Sequence[str], coupling_blocks: int,
                   condition_vector: int, clamp_alpha: float, fiber_batch_size: int, lr: float, epochs: int,
                   batch_size: int = 16, seed: int = 0) -> RunResult:
    """anomalib's ``Cflow``: its own ``training_step`` for ``epochs`` passes over ``train``, then scoring.

    Training calls ``Cflow.training_step`` (anomalib's loss, optimiser and fiber sampling) on image
    batches of ``batch_size`` in a seeded random order each epoch (a short last batch joins the one
    before: anomalib's step fails with fewer fibers than a fiber batch), without a Lightning Trainer.  The
    image order, the fiber permutations and the decoder initialisation come from torch's global
    generator, seeded with ``seed``.  Scoring: see :data:`DIFFERENCES` -- the per-scale log-likelihoods of
    anomalib's decoders are normalised by their maximum over the training fibers (computed at the end
    of fit, counted in fit time), not by the test batch's maximum as anomalib's forward does; that
    native, batch-normalised scoring is also run once with the whole test set as one batch and returned
    in ``extra`` (``native_scores``, ``native_maps``, ``native_seconds_per_image``).
    """
    require_anomalib()
    from anomalib.models import Cflow

    from vadlab.evaluate import seed_everything

    seed_everything(seed)
    settings = {"layers": list(layers), "coupling_blocks": coupling_blocks, "condition_vector": condition_vector,
                "clamp_alpha": clamp_alpha, "fiber_batch_size": fiber_batch_size, "lr": lr, "epochs": epochs}
    with PeakMemory() as mem:
        start = time.perf_counter()
        module = Cflow(backbone=TIMM_LITE0, layers=list(layers), pre_trained=False,
                       fiber_batch_size=fiber_batch_size, condition_vector=condition_vector,
                       coupling_blocks=coupling_blocks, clamp_alpha=clamp_alpha, lr=lr,
                       pre_processor=False, post_processor=False, evaluator=False, visualizer=False)
        model = module.model
        _load_lite0(model.encoder.feature_extractor, layers)
        optimizer = module.configure_optimizers()
        # what the Lightning Trainer would provide to the manual-optimisation training_step
        module.optimizers = lambda: optimizer
        module.manual_backward = lambda loss: loss.backward()
        module.log = lambda *args, **kwargs: None
        model.decoders.train()
        for _ in range(epochs):
            batches = list(torch.randperm(len(train)).split(batch_size))
            if len(batches) > 1 and len(batches[-1]) < batch_size:  # its step needs >= fiber_batch_size fibers
                batches[-2:] = [torch.cat(batches[-2:])]
            for index in batches:
                loss = module.training_step(SimpleNamespace(image=_normalise(train[index])))["loss"]
                if not torch.isfinite(loss).all():
                    raise FloatingPointError(f"anomalib's Cflow diverged (loss {loss.item()}); lower lr ({lr})")
        model.decoders.eval()
        with torch.no_grad():  # training-data normalisation, as vadlab
            maxima = torch.full((len(layers),), -math.inf)
            for chunk in train.split(batch_size):
                for k, logp in enumerate(_cflow_scale_logp(model, _normalise(chunk))):
                    maxima[k] = torch.maximum(maxima[k], logp.max())
        fit_s = time.perf_counter() - start

        def predict(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            size = x.shape[-2:]
            prob = torch.zeros(len(x), *size)
            for k, logp in enumerate(_cflow_scale_logp(model, _normalise(x))):
                prob += torch.nn.functional.interpolate(torch.exp(logp - maxima[k])[:, None], size=size,
                                                        mode="bilinear", align_corners=True)[:, 0]
            maps = len(layers) - prob
            return maps.flatten(1).amax(1), maps

        scores, maps, per_image = _predict_batches(predict, test, batch_size)
    # anomalib's own forward, the whole test set as one batch (test-set normalisation, as the official code)
    with torch.no_grad():
        start = time.perf_counter()
        native = model(_normalise(test))
        native_s = (time.perf_counter() - start) / len(test)
    extra = {"native_scores": native.pred_score.reshape(-1).float().numpy(),
             "native_maps": native.anomaly_map.reshape(len(test), *test.shape[-2:]).float().numpy(),
             "native_seconds_per_image": native_s}
    return RunResult("anomalib", "cflow", scores, maps, fit_s, per_image, mem.peak_mb, settings, extra)


def run_anomalib(method: str, train: torch.Tensor, test: torch.Tensor, settings: dict[str, Any],
                 channel_index: torch.Tensor | None = None, batch_size: int = 16, seed: int = 0) -> RunResult:
    """Dispatch to the anomalib run of ``method`` with :func:`peer_settings`' output."""
    require_anomalib()
    if method == "padim":
        return anomalib_padim(train, test, settings["layers"], settings["n_features"], settings["sigma"],
                              channel_index=channel_index, batch_size=batch_size, seed=seed)
    if method == "patchcore":
        return anomalib_patchcore(train, test, settings["layers"], settings["coreset_ratio"],
                                  settings["num_neighbors"], settings["sigma"], settings["embed_dim"],
                                  batch_size=batch_size, seed=seed)
    if method == "cflow":
        keys = ("layers", "coupling_blocks", "condition_vector", "clamp_alpha", "fiber_batch_size", "lr", "epochs")
        return anomalib_cflow(train, test, **{k: settings[k] for k in keys}, batch_size=batch_size, seed=seed)
    raise ValueError(f"anomalib has no counterpart of {method!r}; compare one of {PEER_METHODS}")


def warm_up(method: str, train: torch.Tensor, test: torch.Tensor, overrides: dict[str, Any] | None,
            image_size: int, n_images: int = 8) -> None:
    """One tiny fit + predict of both libraries on ``n_images`` images, results discarded.

    The first run in a process pays one-off costs (imports, kernel selection, allocator growth) that
    would otherwise be charged to whichever library happens to run first.
    """
    overrides = dict(overrides or {})
    if method == "cflow":
        overrides.update(meta_epochs=1, sub_epochs=1, warmup_epochs=0)
    tiny_train, tiny_test = train[:n_images], test[:n_images]
    _, model = run_vadlab(method, tiny_train, tiny_test, overrides, batch_size=n_images)
    settings = peer_settings(method, model.config, image_size)
    run_anomalib(method, tiny_train, tiny_test, settings, channel_index=getattr(model, "channel_index", None),
                 batch_size=n_images)
    release_memory()


# ------------------------------------------------------------------------------------ comparison


ACCURACY_KEYS = ("image_auroc", "pixel_auroc", "aupro")
COST_KEYS = ("fit_seconds", "infer_ms_per_image", "peak_memory_mb")


def result_metrics(result: RunResult, labels: Any, masks: Any) -> dict[str, float]:
    """vadlab.metrics of a run (image AUROC, pixel AUROC, AUPRO) plus its costs, for one table row."""
    from vadlab.metrics import evaluate_all

    m = evaluate_all(labels, result.scores, masks, result.maps)
    return {**{k: float(m[k]) for k in ACCURACY_KEYS}, "fit_seconds": float(result.fit_seconds),
            "infer_ms_per_image": 1000.0 * float(result.predict_seconds_per_image),
            "peak_memory_mb": float(result.peak_memory_mb)}


def comparison_table(records: list[dict[str, Any]]) -> "pd.DataFrame":
    """One row per (method, category) with both libraries' numbers side by side, plus a mean row per method.

    ``records`` are dicts with ``method``, ``category``, ``library`` ("vadlab" or "anomalib") and the
    :data:`ACCURACY_KEYS` and :data:`COST_KEYS`.  Added columns: ``<accuracy>_diff`` = vadlab - anomalib
    (positive: vadlab more accurate) and ``<cost>_ratio`` = anomalib / vadlab (above 1: vadlab faster or
    smaller).  Mean rows average each column over categories (ratios of means would hide a slow
    category; means of ratios are what is shown).
    """
    import pandas as pd

    if not records:
        raise ValueError("no comparison records: run at least one (method, category) with both libraries")
    frame = pd.DataFrame(records)
    missing = {"method", "category", "library", *ACCURACY_KEYS, *COST_KEYS} - set(frame.columns)
    if missing:
        raise ValueError(f"comparison records lack {sorted(missing)}")
    libraries = set(frame["library"])
    if libraries != {"vadlab", "anomalib"}:
        raise ValueError(f"records must come from both 'vadlab' and 'anomalib', got {sorted(libraries)}")
    keys = [*ACCURACY_KEYS, *COST_KEYS]
    wide = frame.pivot_table(index=["method", "category"], columns="library", values=keys, aggfunc="first")
    if wide.isna().any().any():
        incomplete = wide[wide.isna().any(axis=1)].index.tolist()
        raise ValueError(f"(method, category) pairs without both libraries' numbers: {incomplete}")
    pairs = list(dict.fromkeys(zip(frame["method"], frame["category"])))
    wide = wide.reindex(pd.MultiIndex.from_tuples(pairs, names=["method", "category"]))
    rows = pd.DataFrame(index=wide.index)
    for k in ACCURACY_KEYS:
        rows[f"vadlab_{k}"] = wide[(k, "vadlab")]
        rows[f"anomalib_{k}"] = wide[(k, "anomalib")]
        rows[f"{k}_diff"] = wide[(k, "vadlab")] - wide[(k, "anomalib")]
    for k in COST_KEYS:
        rows[f"vadlab_{k}"] = wide[(k, "vadlab")]
        rows[f"anomalib_{k}"] = wide[(k, "anomalib")]
        rows[f"{k}_ratio"] = wide[(k, "anomalib")] / wide[(k, "vadlab")].clip(lower=1e-9)
    out = []
    for method, block in rows.groupby(level="method", sort=False):
        out.append(block)
        mean = block.mean().to_frame().T
        mean.index = pd.MultiIndex.from_tuples([(method, "mean")], names=["method", "category"])
        out.append(mean)
    return pd.concat(out).reset_index()


__all__ = ["ACCURACY_KEYS", "ANOMALIB_VERSION", "AnomalibMissingError", "COST_KEYS", "DIFFERENCES", "INSTALL_HINT",
           "PEER_METHODS", "PeakMemory", "RunResult", "anomalib_available", "anomalib_cflow", "anomalib_padim",
           "anomalib_patchcore", "comparison_table", "load_category", "peer_settings", "require_anomalib",
           "result_metrics", "run_anomalib", "run_vadlab", "warm_up"]
