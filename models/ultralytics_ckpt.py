"""Ultralytics `.pt` checkpoints without Ultralytics: a restricted unpickler that rebuilds only tensors, plain
containers and inert stand-ins for the pickled module objects, never running their code.

An Ultralytics checkpoint pickles whole modules (`ultralytics.nn.tasks.DetectionModel`, its `Conv`, `C3k2`, ...
and torch.nn layers). Each such class is replaced by `ModuleStub`, which only keeps the pickled `__dict__`
(`_modules`, `_parameters`, `_buffers`, `yaml`, `names`, `stride`, ...). Any other global — `os.system`,
`builtins.eval`, `subprocess.Popen`, a numpy or pathlib object — is refused with a one-line EdgeportError
naming it, before anything from the file runs.

    read_ultralytics(path) -> (state_dict, yaml, info)  for models.load_checkpoint and
                                                        models.yolo11.load_ultralytics
    is_ultralytics_checkpoint(path) -> bool
"""
from __future__ import annotations

import collections
import os
import pickle
import types
import zipfile
from typing import Annotated, Any

import msgspec
import torch

from runtime.documents import check_document

from .errors import EdgeportError

# Globals a checkpoint may name, and what they become. Modules from these packages become stubs.
_STUB_PACKAGES = ("ultralytics.", "torch.nn.modules.")  # module classes only: their code never runs
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
}


MAX_REPEATS, MAX_ARG = 64, 8192  # Ultralytics' largest: 6 repeats (x scale), 1536 channels; beyond is a typo
Repeats = Annotated[int, msgspec.Meta(ge=1, le=MAX_REPEATS)]
Layer = tuple[int | list[int], Repeats, str, list[Any]]  # [from, repeats, module, args]
Multiplier = Annotated[float, msgspec.Meta(gt=0, le=16)]
Scale = tuple[Multiplier, Multiplier, Annotated[float, msgspec.Meta(gt=0)]]  # [depth, width, max_channels]


class ModelYaml(msgspec.Struct):
    """An Ultralytics model YAML (a file, a checkpoint's pickled dict or one of ours), as parse_model reads it;
    other keys (yaml_file, ch, ...) are ignored."""
    backbone: Annotated[list[Layer], msgspec.Meta(min_length=1, max_length=1000)]
    head: Annotated[list[Layer], msgspec.Meta(max_length=1000)] = []
    nc: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 80
    scales: dict[str, Scale] | None = None
    scale: str | None = None
    depth_multiple: Multiplier = 1.0
    width_multiple: Multiplier = 1.0
    activation: str | None = None
    reg_max: Annotated[int, msgspec.Meta(ge=1, le=64)] = 16
    end2end: bool | None = None


def check_yaml(cfg, what: str = "model YAML") -> None:
    """EdgeportError naming the first field of `cfg` that is not a model YAML's."""
    check_document(cfg, ModelYaml, what, "fix the model YAML or re-save the checkpoint with Ultralytics",
                   error=EdgeportError)


ClassName = Annotated[str, msgspec.Meta(max_length=1000)]
ClassIndex = Annotated[int, msgspec.Meta(ge=0, le=100_000)]
Size = Annotated[int, msgspec.Meta(ge=1)]


class Names(msgspec.Struct):
    """The class names a checkpoint's model carries: {index: name} (Ultralytics) or a list."""
    names: dict[ClassIndex, ClassName] | list[ClassName] | None = None


class TrainArgs(msgspec.Struct):
    """The training arguments a checkpoint carries, of which the export reads two (others are ignored)."""
    imgsz: Size | Annotated[list[Size], msgspec.Meta(min_length=1, max_length=2)] | None = None
    task: str | None = None


def _checked(path: str, obj, schema, what: str):
    return check_document(obj, schema, f"{path}: {what}", "re-save the checkpoint with Ultralytics",
                          error=EdgeportError)


class ModuleStub:
    """What a pickled module object becomes: its instance dict, and nothing that could execute."""

    pickled_class = "?"

    def __init__(self, *args, **kwargs):  # REDUCE on the class: keep the arguments, run nothing
        self.__dict__["_stub_args"] = (args, kwargs)

    def __setstate__(self, state):  # BUILD: (dict) or (dict, slots)
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)

    def __repr__(self):
        return f"<stub of {self.pickled_class}>"


_STUBS: dict[str, type] = {}


def _stub_class(module: str, name: str) -> type:
    qual = f"{module}.{name}"
    if qual not in _STUBS:
        _STUBS[qual] = type(name, (ModuleStub,), {"pickled_class": qual, "__module__": __name__})
    return _STUBS[qual]


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class resolves only the allow-list; torch.load adds storages and
    persistent loads around it."""

    def find_class(self, module, name):
        module = {"__builtin__": "builtins"}.get(module, module)  # protocol-2 pickles use Python 2's name
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith(_STUB_PACKAGES):
            return _stub_class(module, name)
        raise EdgeportError(f"refused to load the checkpoint: it pickles '{module}.{name}', which is not a tensor, "
                            "container or model class (a foreign or malicious file?); re-save it as a state_dict")


def _restricted_pickle_module() -> types.ModuleType:
    mod = types.ModuleType("edgeport_restricted_pickle")
    mod.Unpickler = RestrictedUnpickler
    mod.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()
    mod.UnpicklingError = pickle.UnpicklingError
    return mod


def read_pickle(path) -> object:
    """torch.load with the restricted unpickler; EdgeportError for unreadable or refused files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EdgeportError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", pickle_module=_restricted_pickle_module(), weights_only=False)
    except EdgeportError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, TypeError,
            AttributeError, KeyError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EdgeportError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {first})") from None


def is_ultralytics_checkpoint(path) -> bool:
    """A zip-format torch checkpoint whose pickle names Ultralytics classes (read without unpickling)."""
    try:
        with zipfile.ZipFile(os.fspath(path)) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            return pkl is not None and b"ultralytics" in z.read(pkl)
    except (OSError, zipfile.BadZipFile):
        return False


def _state_of(stub, prefix="") -> dict[str, torch.Tensor]:
    """A module stub's state_dict, as nn.Module.state_dict would list it."""
    d = stub.__dict__
    sd = {}
    for name, p in (d.get("_parameters") or {}).items():
        if p is not None:
            sd[prefix + name] = p
    skip = d.get("_non_persistent_buffers_set") or set()
    for name, b in (d.get("_buffers") or {}).items():
        if b is not None and name not in skip:
            sd[prefix + name] = b
    for name, child in (d.get("_modules") or {}).items():
        if child is not None:
            sd.update(_state_of(child, f"{prefix}{name}."))
    return sd


def _float32(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.float() if t.is_floating_point() else t


def read_ultralytics(path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(state_dict in float32, model YAML dict, info) from an Ultralytics checkpoint (EMA weights if saved);
    info["stub"] is the stand-in of the pickled model (its activations, names, strides)."""
    path = os.fspath(path)
    ckpt = read_pickle(path)
    if isinstance(ckpt, ModuleStub):  # torch.save(model) instead of a trainer dict
        ckpt = {"model": ckpt}
    if not isinstance(ckpt, dict):
        raise EdgeportError(f"{path}: not an Ultralytics checkpoint (top level is {type(ckpt).__name__}, not a dict)")
    model = ckpt.get("ema") or ckpt.get("model")
    if not isinstance(model, ModuleStub):
        raise EdgeportError(f"{path}: not an Ultralytics checkpoint (no 'ema' or 'model' module in it)")
    yaml_cfg = model.__dict__.get("yaml")
    if not isinstance(yaml_cfg, dict) or "backbone" not in yaml_cfg:
        raise EdgeportError(f"{path}: the checkpoint's model carries no model YAML dict ({model.pickled_class})")
    check_yaml(yaml_cfg, f"{path}: model YAML")
    sd = {k: _float32(v) for k, v in _state_of(model).items()}
    names = _checked(path, {"names": model.__dict__.get("names")}, Names, "model").names
    stride = model.__dict__.get("stride")
    train_args = ckpt.get("train_args")
    train_args = msgspec.to_builtins(_checked(path, train_args, TrainArgs, "train_args")) if train_args else {}
    imgsz = train_args.get("imgsz")
    if isinstance(imgsz, list):
        if len(set(imgsz)) > 1:
            raise EdgeportError(f"{path}: train_args field imgsz is {imgsz}, not square; pass --img-size")
        imgsz = imgsz[0]
    info = {
        "path": path,
        "class": model.pickled_class,
        "weights": "ema" if ckpt.get("ema") is not None else "model",
        "dtype": str(next(iter(_state_of(model).values())).dtype).replace("torch.", "") if sd else None,
        "names": ([names[i] for i in sorted(names)] if isinstance(names, dict) else names) or None,
        "stride": [float(s) for s in stride] if isinstance(stride, torch.Tensor) else None,
        "ultralytics_version": ckpt.get("version"),
        "date": ckpt.get("date"),
        "imgsz": imgsz,
        "task": train_args.get("task") or "detect",
        "stub": model,
    }
    return sd, yaml_cfg, info
