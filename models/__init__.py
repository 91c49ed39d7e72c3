"""edgeport model zoo: FasterNet, ConvNeXt, InceptionNeXt, EfficientNetV2 (PyTorch, timm-style registry)."""
from ._registry import ModelCfg, create_model, get_cfg, list_models, register_model
from .checkpoint import load_checkpoint, read_state_dict, save_checkpoint
from .errors import EdgeportError

# Importing a family module registers its models.
from . import fasternet, convnext, inceptionnext, efficientnetv2  # noqa: E402,F401  isort: skip

__all__ = ["EdgeportError", "ModelCfg", "create_model", "get_cfg", "list_models", "load_checkpoint",
           "read_state_dict", "register_model", "save_checkpoint"]
