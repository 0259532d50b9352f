"""The one small interface every anomaly-detection method implements.

A method is an ``nn.Module`` with a hyperparameter dataclass ``config``:

- ``fit(train_loader)`` learns from defect-free images only and returns ``self``;
- ``predict(images) -> (image_scores [B], anomaly_maps [B, H, W])``, maps at the
  input resolution, higher = more anomalous;
- ``save(path)`` / ``AnomalyMethod.load(path)`` round-trip to identical predictions.

Images are float tensors ``[B, 3, H, W]`` in [0, 1]; each method normalises for its
own backbone.  A loader may yield the dicts of :mod:`vadlab.data` or plain tensors.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pickle
import typing
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

import torch
from torch import nn

log = logging.getLogger("vadlab")


def batch_images(batch: Any) -> torch.Tensor:
    """Return the image tensor of a loader batch (a dict with ``image``, a tuple, or a tensor)."""
    if isinstance(batch, dict):
        return batch["image"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, torch.Tensor):
        return batch
    raise TypeError(f"cannot read images from a batch of type {type(batch).__name__}: "
                    "pass a DataLoader over vadlab.data datasets, or one that yields image tensors")


def iter_images(loader: Iterable, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """Yield checked image batches ``[B, 3, H, W]`` on ``device`` from any loader."""
    for batch in loader:
        yield check_images(batch_images(batch)).to(device)


def check_images(images: torch.Tensor) -> torch.Tensor:
    """Raise a clear error unless ``images`` is a float ``[B, 3, H, W]`` tensor in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}; "
                         "add a batch dimension with images[None] or convert to RGB")
    if images.shape[0] == 0:
        raise ValueError(f"images is an empty batch {tuple(images.shape)}: pass at least one image")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}; divide uint8 images by 255")
    if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(f"images must be in [0, 1], got values in [{images.min():.3g}, {images.max():.3g}]; "
                         "pass un-normalised images, each method normalises them itself")
    return images


def _coerce(value: str, annotation: Any, name: str) -> Any:
    """Turn the string ``value`` of ``--set name=value`` into the field's type."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}={value!r}: expected true or false")
    if annotation in (int, float, str):
        try:
            return annotation(value)
        except ValueError:
            raise ValueError(f"{name}={value!r}: expected a {annotation.__name__}") from None
    if origin in (tuple, list):
        args = typing.get_args(annotation)
        inner = args[0] if args else str
        parts = [p for p in value.strip("()[] ").split(",") if p.strip()]
        return origin(_coerce(p.strip(), inner, name) for p in parts)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value.lower() == "none":
            return None
        for a in args:
            try:
                return _coerce(value, a, name)
            except ValueError:
                continue
        raise ValueError(f"{name}={value!r}: expected one of {args}")
    return value


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of the dataclass ``config`` with fields replaced by name.

    String values (from the CLI's ``--set key=value``) are converted to the field's type.
    """
    fields = {f.name: f for f in dataclasses.fields(config)}
    hints = typing.get_type_hints(type(config))
    changes = {}
    for key, value in overrides.items():
        if key not in fields:
            raise ValueError(f"unknown hyperparameter {key!r} for {type(config).__name__}; "
                             f"valid names: {', '.join(sorted(fields))}")
        changes[key] = _coerce(value, hints[key], key) if isinstance(value, str) else value
    return dataclasses.replace(config, **changes)


#: hyperparameters with a lower bound wherever a method has them: name -> (bound, strict)
LOWER_BOUNDS: dict[str, tuple[float, bool]] = {
    "ridge": (0.0, True), "lr": (0.0, True), "lr_ae": (0.0, True), "eps": (0.0, True),
    "coreset_ratio": (0.0, True), "hidden_ratio": (0.0, True),
    "sigma": (0.0, False), "weight_decay": (0.0, False), "kl_weight": (0.0, False),
    "batch_size": (1, False), "train_batch_size": (1, False), "n_features": (1, False), "k": (1, False),
    "num_neighbors": (1, False), "fiber_batch": (1, False), "coupling_blocks": (1, False),
    "ddim_steps": (1, False), "num_timesteps": (1, False),
}
#: ``weights`` values that are not file paths
NAMED_WEIGHTS = ("imagenet", "auto", "random")


def check_config(config: Any) -> Any:
    """Raise a ValueError naming the field when a hyperparameter is out of range; returns ``config``.

    Every float (also inside tuples) must be finite; the fields of :data:`LOWER_BOUNDS` respect their
    bound; a ``weights`` value that is not imagenet/random must be an existing file.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name}={v!r} in {type(config).__name__}: must be a finite number")
        if f.name in LOWER_BOUNDS and isinstance(value, (int, float)) and not isinstance(value, bool):
            bound, strict = LOWER_BOUNDS[f.name]
            if value < bound or (strict and value == bound):
                raise ValueError(f"{f.name}={value!r} in {type(config).__name__}: must be "
                                 f"{'>' if strict else '>='} {bound}")
        if f.name == "weights" and isinstance(value, str) and value not in NAMED_WEIGHTS:
            if not Path(os.path.expanduser(value)).is_file():
                raise ValueError(f"weights={value!r}: no such file; pass a state-dict file (.pt/.pth), "
                                 f"or one of {', '.join(NAMED_WEIGHTS)}")
    return config


def _first_line(err: BaseException) -> str:
    """The gist of ``err`` (torch's unpickling errors run to a dozen lines of advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    gist = [line for line in lines if "Unsupported global" in line or "GLOBAL" in line]
    return (gist or lines or [type(err).__name__])[0]


class AnomalyMethod(nn.Module):
    """Base class: config handling, device, save/load.  Subclasses set ``name`` and ``Config``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    #: state-dict prefixes of frozen pretrained parts: not saved, rebuilt from their weights on load
    frozen_prefixes: ClassVar[tuple[str, ...]] = ("backbone.",)

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__()
        config = self.Config() if config is None else config
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(config).__name__}")
        self.config = check_config(apply_overrides(config, overrides) if overrides else config)
        #: what prediction needs besides the weights (image size, threshold, run config, version); saved
        self.meta: dict[str, Any] = {}

    # -- the interface -------------------------------------------------------------
    def fit(self, train_loader: Iterable) -> "AnomalyMethod":  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def check_input_size(self, size: int) -> None:
        """Raise a ValueError when the method cannot work on ``size`` x ``size`` images (default: any size)."""

    @property
    def device(self) -> torch.device:
        return torch.device(getattr(self.config, "device", "cpu"))

    # -- persistence ---------------------------------------------------------------
    def save(self, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
        """Write config, learnt state and ``meta`` (merged into ``self.meta``) to ``path`` atomically.

        ``meta`` holds what prediction needs besides the weights: ``image_size``, a ``threshold`` set on
        normal images, the run's settings; the vadlab version is added. Returns the path.
        """
        from vadlab import __version__
        from vadlab.fileio import atomic_path

        path = Path(path)
        self.meta = {**self.meta, **(meta or {}), "vadlab_version": __version__}
        state = {k: v.detach().cpu() for k, v in self.state_dict().items() if not k.startswith(self.frozen_prefixes)}
        blob = {"method": self.name, "config": dataclasses.asdict(self.config), "state": state, "meta": self.meta}
        with atomic_path(path) as tmp:
            torch.save(blob, tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | None = None, **overrides: Any) -> "AnomalyMethod":
        """Rebuild a saved method; ``AnomalyMethod.load`` finds the class from the file.

        ``device`` overrides the saved one; a model saved on CUDA loads on the CPU (with a note) when this
        machine has no CUDA. ``model.meta`` is what the file recorded (empty for files before 0.1.0).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no saved model at {path}; create one with `vadlab fit`")
        try:
            # weights_only: a model file is a pickle, and only tensors, dicts, lists and primitives are
            # unpickled; anything else (code hidden in a crafted file) is refused, never run.
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(f"{path} is not a vadlab model file: it holds objects other than tensors, "
                             "dicts, lists and numbers, which vadlab refuses to load (a model file from an "
                             f"untrusted source may run code when unpickled); details: {_first_line(err)}") from None
        except Exception as err:  # noqa: BLE001 - report the file, whatever went wrong
            raise ValueError(f"{path} is not a readable vadlab model file ({err})") from err
        if not isinstance(blob, dict) or "method" not in blob:
            raise ValueError(f"{path} is not a vadlab model file (no 'method' entry)")
        from vadlab.methods import get_method

        klass = get_method(blob["method"])
        if cls is not AnomalyMethod and not issubclass(klass, cls):
            raise ValueError(f"{path} holds a {blob['method']} model, not {cls.name}")
        config_fields = {f.name for f in dataclasses.fields(klass.Config)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in blob["config"].items() if k in config_fields}
        kwargs.update(overrides)
        if device is not None:
            kwargs["device"] = device
        saved_device = str(kwargs.get("device", "cpu"))
        if device is None and saved_device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("%s was saved with device=%s, but torch sees no CUDA GPU here: loading it on the CPU "
                        "(pass --device to choose)", path, saved_device)
            kwargs["device"] = "cpu"
        model = klass(klass.Config(**kwargs))
        model.meta = dict(blob.get("meta") or {})
        if not model.meta:
            log.info("%s has no metadata (saved before vadlab 0.1.0): its image size and threshold are "
                     "unknown; refit it to record them", path)
        missing, unexpected = model.load_state_dict(blob["state"], strict=False)
        missing = [k for k in missing if not k.startswith(model.frozen_prefixes)]
        if missing or unexpected:
            raise ValueError(f"{path} does not match {klass.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.to(model.device)
        model.eval()
        return model

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Like ``nn.Module.load_state_dict``, but fitted buffers may start as ``None`` or another shape."""
        for key, value in state_dict.items():
            module_path, _, leaf = key.rpartition(".")
            module = self.get_submodule(module_path) if module_path else self
            if leaf in module._buffers:
                current = module._buffers[leaf]
                if current is None or current.shape != value.shape:
                    module._buffers[leaf] = torch.empty_like(value)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
