"""Checkpoint loading: file formats, wrappers and strict key checking. Layout conversion (official repos,
timm) lives with each family and is registered through `register_checkpoint_converter`."""
from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from ._registry import build_model, checkpoint_converter
from .errors import EdgeportError

_WRAPPER_KEYS = ("state_dict", "model", "model_ema", "module")


def read_state_dict(path_or_state_dict) -> dict[str, torch.Tensor]:
    """A flat name → tensor dict from a .pth/.pt/.bin/.safetensors file or an (optionally wrapped) dict."""
    sd = path_or_state_dict
    if isinstance(sd, (str, os.PathLike)):
        sd = _read_file(os.fspath(sd))
    for _ in range(3):  # {"model": {...}}, {"state_dict": {"model": ...}} and similar nestings
        key = next((k for k in _WRAPPER_KEYS if isinstance(sd, Mapping) and isinstance(sd.get(k), Mapping)), None)
        if key is None:
            break
        sd = sd[key]
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EdgeportError("checkpoint holds no state_dict of tensors (expected a dict, optionally under "
                            "'state_dict' or 'model')")
    return {k.removeprefix("module."): v for k, v in sd.items()}


# A checkpoint's format is decided by its first bytes, never by its name: torch.save writes a zip archive (or,
# before PyTorch 1.6, a pickle), safetensors an 8-byte little-endian header length and a JSON header.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOLS = range(2, 6)


def sniff_format(path: str) -> str:
    """"torch-zip", "torch-pickle" or "safetensors" from the file's content; EdgeportError naming what it is
    instead (empty, text, unknown binary)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip"
    if len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS:
        return "torch-pickle"
    if len(head) >= 10 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    expected = "expected PyTorch weights (.pth/.pt from torch.save) or a .safetensors file"
    if not head:
        raise EdgeportError(f"{path}: checkpoint file is empty; {expected}")
    text = head.decode("utf-8", "replace")  # a cut multi-byte character at the end becomes U+FFFD, printable
    if b"\0" not in head and all(c.isprintable() or c in "\r\n\t" for c in text):
        lines = text.splitlines()[:2]
        kind = "CSV text" if len(lines) == 2 and lines[0].count(",") == lines[1].count(",") > 0 else "text"
        raise EdgeportError(f"{path}: checkpoint is a {kind} file, not weights; {expected}")
    raise EdgeportError(f"{path}: checkpoint is not in a known weights format (first bytes {head[:8].hex()}); "
                        f"{expected}")


def _read_file(path: str):
    if not os.path.isfile(path):
        raise EdgeportError(f"checkpoint file not found: {path}")
    if sniff_format(path) == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise EdgeportError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    from .ultralytics_ckpt import is_ultralytics_checkpoint, read_ultralytics

    if is_ultralytics_checkpoint(path):  # pickled modules: only the restricted unpickler may read it
        return read_ultralytics(path)[0]
    try:
        # A file object: torch.load would pick a reader by the name's extension. Its warning about the pickle
        # protocol of hand-made files says nothing the user can act on.
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises re-running with weights_only=False, i.e. executing the file: never pass that on
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" (such as {found.group(1)})" if found else ""
        raise EdgeportError(f"{path}: holds Python objects{what} that we refuse to unpickle; convert it to a plain "
                            "state_dict (torch.save(model.state_dict(), ...)) or .safetensors") from None
    except Exception as e:  # torch.load's unpickler raises IndexError, KeyError... on foreign bytes
        raise EdgeportError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}); re-save it with "
                            "torch.save(model.state_dict(), ...) or as .safetensors") from None


def check_state_dict(model: nn.Module, state_dict: Mapping, source: str = "checkpoint") -> None:
    """EdgeportError unless every tensor the model would take is floating point where the model's parameter or
    buffer is (an int64 copy of real weights loads without complaint and makes a garbage reference that every
    backend agrees with) and every float tensor is finite."""
    own = model.state_dict()
    name = getattr(model, "model_name", type(model).__name__)
    not_float = [k for k, v in state_dict.items()
                 if k in own and own[k].is_floating_point() and not v.is_floating_point()]
    if not_float:
        k = not_float[0]
        raise EdgeportError(
            f"{source} has {len(not_float)} non-float tensors where {name} has float weights (first: {k} "
            f"{str(state_dict[k].dtype).removeprefix('torch.')}); it is not a float checkpoint: re-save the "
            "trained float weights")
    for k, v in state_dict.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int(v.numel() - torch.isfinite(v).sum())
            raise EdgeportError(f"{source}: tensor {k} has {bad} of {v.numel()} values NaN/Inf; the weights are "
                                "corrupt or from a diverged run: use a finite checkpoint")


def rename_key(key: str, rules) -> str:
    """Apply every (regex, replacement) rule in order, each at most once: how family converters map layouts."""
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key, count=1)
    return key


def _fit_pointwise(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """fc-shaped [out, in] ⇄ conv-shaped [out, in, 1, 1] weights, and [C] ⇄ [C, 1, 1] layer scales."""
    if value.shape != target.shape and value.numel() == target.numel():
        squeeze = [d for d in value.shape if d != 1]
        if squeeze == [d for d in target.shape if d != 1]:
            return value.reshape(target.shape)
    return value


def _describe(keys, shapes, n=4):
    items = [f"{k} {tuple(shapes[k].shape)}" if k in shapes else k for k in keys[:n]]
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(items) + more


def convert_state_dict(state_dict: Mapping, model: nn.Module) -> dict[str, torch.Tensor]:
    """Map any supported layout of `model`'s family to our key names and weight shapes."""
    family = getattr(model, "default_cfg", {}).get("family", "")
    convert = checkpoint_converter(family)
    sd = convert(dict(state_dict), model) if convert else dict(state_dict)
    own = model.state_dict()
    return {k: _fit_pointwise(v, own[k]) if k in own else v for k, v in sd.items()}


def create_model(name: str, weights=None, features_only: bool = False, **overrides) -> nn.Module:
    """Build a registered model; `weights` is a checkpoint path or state_dict in any supported layout."""
    model = build_model(name, features_only=features_only, **overrides)
    if weights is not None:
        load_checkpoint(model, weights)
    return model


def load_checkpoint(model: nn.Module, path_or_state_dict, strict: bool = True) -> dict:
    """Load weights in any supported layout. Returns a report {missing, unexpected, mismatched}.

    strict=True raises EdgeportError naming the first offending keys and their shapes; strict=False loads
    what fits and returns the report. Non-float or non-finite weights are refused either way (check_state_dict).
    Head weights are ignored for features_only models.
    """
    sd = convert_state_dict(read_state_dict(path_or_state_dict), model)
    own = model.state_dict()
    if getattr(model, "features_only", False):
        sd = {k: v for k, v in sd.items() if k in own or not k.startswith(("head", "classifier", "fc."))}
    mismatched = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    report = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    if strict and (missing or unexpected or mismatched):
        parts = []
        if mismatched:
            parts.append("mis-shaped: " + ", ".join(
                f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:3]))
        if missing:
            parts.append("missing: " + _describe(missing, own))
        if unexpected:
            parts.append("unexpected: " + _describe(unexpected, sd))
        name = getattr(model, "model_name", type(model).__name__)
        raise EdgeportError(f"checkpoint does not fit {name}: " + "; ".join(parts)
                            + " (wrong model name, or pass strict=False to load what fits)")
    loadable = {k: v for k, v in sd.items() if k in own and k not in mismatched}
    is_path = isinstance(path_or_state_dict, (str, os.PathLike))
    check_state_dict(model, loadable, os.fspath(path_or_state_dict) if is_path else "checkpoint")
    model.load_state_dict(loadable, strict=False)
    return report


def save_checkpoint(model: nn.Module, path: str) -> None:
    """Write our own layout (.safetensors or torch.save), atomically."""
    tmp = f"{path}.tmp"
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, tmp)
    else:
        torch.save(sd, tmp)
    os.replace(tmp, path)
