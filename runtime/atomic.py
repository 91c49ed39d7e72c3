"""Atomic file writes: readers see the old file or the new one whole, never a half-written one.

Torch-free like the rest of runtime/, so every layer (models, export, benchmarks, the board) uses this one."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path, data: str | bytes) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it over `path` (mode 0666 & ~umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def jsonable(obj):
    """Plain JSON types: numpy scalars become Python numbers, non-finite floats their names ("inf", "nan")."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()  # numpy scalar
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def write_json(path, obj, indent: int = 2) -> Path:
    return write_atomic(path, json.dumps(jsonable(obj), indent=indent) + "\n")
