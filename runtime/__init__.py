"""Torch-free inference for edgeport artifacts (.mnn via MNN, .onnx via onnxruntime); numpy + Pillow."""
from .errors import EdgeRuntimeError
from .predictor import Predictor, load

__all__ = ["EdgeRuntimeError", "Predictor", "load"]
