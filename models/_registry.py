"""Model registry: names → constructors with default configs (timm-style)."""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Callable

from torch import nn

from .errors import EdgeportError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelCfg:
    """How a model expects its input; exported into every artifact's metadata."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    num_classes: int = 1000
    family: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Entry:
    fn: Callable[..., nn.Module]
    cfg: ModelCfg


_MODELS: dict[str, _Entry] = {}
_CONVERTERS: dict[str, Callable[[dict, nn.Module], dict]] = {}


def register_model(cfg: ModelCfg):
    """Decorator: register `fn(**kwargs) -> nn.Module` under its function name."""

    def wrap(fn):
        if fn.__name__ in _MODELS:
            raise ValueError(f"model {fn.__name__} registered twice")
        _MODELS[fn.__name__] = _Entry(fn, cfg)
        return fn

    return wrap


def register_checkpoint_converter(family: str):
    """Decorator: `fn(state_dict, model) -> state_dict` mapping every known layout of a family to ours."""

    def wrap(fn):
        _CONVERTERS[family] = fn
        return fn

    return wrap


def checkpoint_converter(family: str):
    return _CONVERTERS.get(family)


def list_models(pattern: str | None = None) -> list[str]:
    names = sorted(_MODELS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def get_cfg(name: str) -> ModelCfg:
    return _entry(name).cfg


def _entry(name: str) -> _Entry:
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _MODELS, n=5, cutoff=0.4) or list_models()[:8]
        raise EdgeportError(f"unknown model '{name}'; closest: {', '.join(close)}") from None


def build_model(name: str, features_only: bool = False, **overrides) -> nn.Module:
    """Build a registered model with fresh weights (models.create_model also loads a checkpoint)."""
    entry = _entry(name)
    model = entry.fn(features_only=features_only, **overrides)
    cfg = entry.cfg
    if "num_classes" in overrides:
        cfg = ModelCfg(**{**cfg.to_dict(), "num_classes": overrides["num_classes"]})
    model.default_cfg = {**cfg.to_dict(), "architecture": name}
    model.model_name = name
    return model
