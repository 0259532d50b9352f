"""Every method under one interface (see :mod:`vadlab.methods.base`), found by its lower-case name."""

from __future__ import annotations

import importlib

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


__all__ = ["AnomalyMethod", "apply_overrides", "available_methods", "get_method"]
