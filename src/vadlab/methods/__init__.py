"""Every method under one interface (see :mod:`vadlab.methods.base`), found by its lower-case name."""

from __future__ import annotations

import importlib
import sys
from dataclasses import fields
from typing import Any

from vadlab.methods.base import AnomalyMethod, apply_overrides

#: method name -> "module:Class"; modules are imported only when asked for
_REGISTRY: dict[str, str] = {
    "padim": "vadlab.methods.padim:Padim",
    "semi_orthogonal": "vadlab.methods.semi_orthogonal:SemiOrthogonal",
    "patchcore": "vadlab.methods.patchcore:PatchCore",
    "cflow": "vadlab.methods.cflow:CFlow",
    "pyramidflow": "vadlab.methods.pyramidflow:PyramidFlow",
    "ae_ssim": "vadlab.methods.ae_ssim:AESSIM",
    "riad": "vadlab.methods.riad:RIAD",
    "favae": "vadlab.methods.favae:FAVAE",
    "mkd": "vadlab.methods.mkd:MKD",
    "dmad": "vadlab.methods.dmad:DMAD",
    "diad": "vadlab.methods.diad:DiAD",
}


def available_methods() -> list[str]:
    """Names of the methods whose module is present in this installation."""
    names = []
    for name, target in _REGISTRY.items():
        if importlib.util.find_spec(target.split(":")[0]) is not None:
            names.append(name)
    return names


def get_method(name: str) -> type[AnomalyMethod]:
    """The class of method ``name`` (e.g. ``"padim"``)."""
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(available_methods())}")
    module_name, class_name = _REGISTRY[key].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise ValueError(f"method {name!r} is not implemented in this version; "
                             f"available: {', '.join(available_methods())}") from None
        raise
    return getattr(module, class_name)


PRESETS = ("paper", "cpu")


def preset_overrides(name: str, preset: str | None = "paper") -> dict[str, Any]:
    """Hyperparameters of a named preset that differ from the paper's defaults.

    ``paper`` (or None) is the Config dataclass as it is; ``cpu`` is the method's documented small-CPU
    preset (``Config.cpu_preset()`` or the module's ``CPU_PRESET`` dict).
    """
    if preset in (None, "paper"):
        return {}
    if preset != "cpu":
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    cls = get_method(name)
    if hasattr(cls.Config, "cpu_preset"):
        chosen, default = cls.Config.cpu_preset(), cls.Config()
        return {f.name: getattr(chosen, f.name) for f in fields(chosen)
                if getattr(chosen, f.name) != getattr(default, f.name)}
    module = sys.modules[cls.__module__]
    if hasattr(module, "CPU_PRESET"):
        return dict(module.CPU_PRESET)
    raise ValueError(f"method {name!r} defines no CPU preset; use the paper preset")


def run_settings(run: str, methods: dict[str, Any]) -> tuple[str, dict[str, Any], int]:
    """(method, hyperparameter overrides, image size) of run ``run`` in params.yaml's ``methods:`` block.

    A run is named after its method unless its settings say ``method:`` (``dmad_plus`` = DMAD with the
    PDM+ variant); overrides are its ``preset`` with its ``set:`` entries on top.
    """
    if run not in methods:
        raise KeyError(f"params.yaml has no settings for run {run!r} under `methods:`; it has {sorted(methods)}")
    settings = methods[run]
    name = settings.get("method", run)
    overrides = {**preset_overrides(name, settings.get("preset", "paper")), **(settings.get("set") or {})}
    return name, overrides, int(settings["image_size"])


__all__ = ["AnomalyMethod", "PRESETS", "apply_overrides", "available_methods", "get_method", "preset_overrides",
           "run_settings"]
