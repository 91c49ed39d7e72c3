"""edgeport model zoo: FasterNet, ConvNeXt, InceptionNeXt, EfficientNetV2 and YOLO11 detectors (PyTorch, timm-style
registry)."""
from ._registry import ModelCfg, get_cfg, list_models, register_model
from .calibrate import calibrate_bn, make_realistic, scale_head
from .checkpoint import create_model, load_checkpoint, read_state_dict, save_checkpoint
from .errors import EdgeportError
from .inference import (
                        assert_equivalent,
                        fold_batchnorm,
                        fold_layer_scale,
                        remove_droppath,
                        set_mlp_form,
                        set_pconv_form,
                        to_inference,
)

# Importing a family module registers its models.
from . import fasternet, convnext, inceptionnext, efficientnetv2, yolo11  # noqa: E402,F401  isort: skip

__all__ = ["EdgeportError", "ModelCfg", "assert_equivalent", "calibrate_bn", "create_model", "fold_batchnorm",
           "fold_layer_scale", "get_cfg", "list_models", "load_checkpoint", "make_realistic", "read_state_dict",
           "register_model", "remove_droppath", "save_checkpoint", "scale_head", "set_mlp_form", "set_pconv_form",
           "to_inference"]
