"""Model registry: architectures register a builder by name (after timm's ``_registry.py``).

``create_model("resnet18", num_classes=7)`` builds an untrained model from keyword config; every builder
returns an :class:`~fer_models.models.base.FERModel`, so the config (and with it the preprocessing) travels with it.
"""
from __future__ import annotations

from typing import Callable

_MODEL_BUILDERS: dict[str, Callable] = {}


def register_model(fn: Callable) -> Callable:
    """Decorator: register ``fn`` under its function name. Duplicate names are a bug and raise."""
    name = fn.__name__
    if name in _MODEL_BUILDERS:
        raise ValueError(f"model {name!r} is already registered")
    _MODEL_BUILDERS[name] = fn
    return fn


def list_models(include_tiny: bool = True) -> list[str]:
    """Names of all registered architectures (``*_tiny`` variants exist for tests)."""
    names = sorted(_MODEL_BUILDERS)
    return names if include_tiny else [n for n in names if not n.endswith("_tiny")]


def is_model(name: str) -> bool:
    return name in _MODEL_BUILDERS


def create_model(name: str, **cfg):
    """Build an untrained model ``name`` with config overrides ``cfg`` (e.g. ``num_classes``, ``class_names``)."""
    if name not in _MODEL_BUILDERS:
        known = ", ".join(list_models())
        raise ValueError(f"unknown model {name!r}; known models: {known}")
    return _MODEL_BUILDERS[name](**cfg)
