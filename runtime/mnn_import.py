"""Import MNN where glibc refuses its extension modules.

MNN's x86_64 wheels (3.6.1) mark `_mnncengine` and `_tools` as needing an executable stack (PT_GNU_STACK with
PF_X); glibc 2.41 and later refuse to dlopen such a library ("cannot enable executable stack"). The code does
not need one, so when that is the failure the extension is copied to a private per-user cache with PF_X cleared,
checked against the wheel's RECORD hash, and that copy is imported under the module's own name. The installed
package is only read; nothing else in the process loses its non-executable stack.
"""
from __future__ import annotations

import base64
import contextlib
import csv
import glob
import hashlib
import importlib.machinery
import importlib.util
import os
import struct
import sys
import tempfile

from .errors import EdgeRuntimeError

EXECSTACK_FAILURE = "cannot enable executable stack"
TUNABLE_FIX = "set GLIBC_TUNABLES=glibc.rtld.execstack=2 before starting Python"
CACHE_ENV = "EDGEPORT_CACHE"
PT_GNU_STACK = 0x6474E551
PF_X = 1
# MNN's extensions find their bundled libgomp through RPATH $ORIGIN/lib:$ORIGIN/mnn.libs: the patched copy gets
# links to these directories of the installed package.
ORIGIN_DIRS = ("lib", "mnn.libs")


def clear_exec_stack(elf: bytes) -> bytes:
    """The ELF file with PF_X cleared in its PT_GNU_STACK program header; every other byte unchanged."""
    if elf[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    elf_class, data = elf[4], elf[5]
    if elf_class not in (1, 2) or data not in (1, 2):
        raise ValueError(f"unknown ELF class {elf_class} / data encoding {data}")
    end = "<" if data == 1 else ">"
    if elf_class == 2:  # ELF64: e_phoff at 32, e_phentsize/e_phnum at 54; p_flags right after p_type
        (phoff,) = struct.unpack_from(end + "Q", elf, 32)
        phentsize, phnum = struct.unpack_from(end + "HH", elf, 54)
        flags_at = 4
    else:  # ELF32: e_phoff at 28, e_phentsize/e_phnum at 42; p_flags is the seventh word
        (phoff,) = struct.unpack_from(end + "I", elf, 28)
        phentsize, phnum = struct.unpack_from(end + "HH", elf, 42)
        flags_at = 24
    out = bytearray(elf)
    for i in range(phnum):
        at = phoff + i * phentsize
        if at + phentsize > len(elf):
            raise ValueError("program header table runs past the end of the file")
        (p_type,) = struct.unpack_from(end + "I", elf, at)
        if p_type == PT_GNU_STACK:
            (flags,) = struct.unpack_from(end + "I", elf, at + flags_at)
            struct.pack_into(end + "I", out, at + flags_at, flags & ~PF_X)
            return bytes(out)
    raise ValueError("no PT_GNU_STACK program header")


def has_exec_stack(elf: bytes) -> bool:
    """True if the PT_GNU_STACK header asks for an executable stack (what glibc ≥ 2.41 refuses to dlopen)."""
    return clear_exec_stack(elf) != elf


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def recorded_sha256(path: str) -> str | None:
    """The file's sha256 in the RECORD of the wheel that installed it (hex), or None if no RECORD lists it."""
    site, name = os.path.split(os.path.abspath(path))
    for record in glob.glob(os.path.join(site, "*.dist-info", "RECORD")):
        with contextlib.suppress(OSError, csv.Error), open(record, newline="") as f:
            for row in csv.reader(f):
                if len(row) >= 2 and row[0] == name and row[1].startswith("sha256="):
                    digest = row[1][len("sha256="):]
                    return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    return None


def cache_root() -> str:
    """$EDGEPORT_CACHE, else $XDG_CACHE_HOME/edgeport, else ~/.cache/edgeport."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "edgeport")


def write_atomically(path: str, data: bytes, mode: int = 0o755) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def link_atomically(target: str, path: str) -> None:
    if os.path.islink(path) and os.readlink(path) == target:
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, path)


def patched_copy(source: str, root: str | None = None) -> str:
    """Path of a copy of the extension `source` with PF_X cleared, in a per-install directory under `root`
    (default: cache_root()). Raises OSError if the cache cannot be written, ValueError if the source is not the
    file its wheel installed or not a patchable ELF file."""
    with open(source, "rb") as f:
        original = f.read()
    source_hash = sha256(original)
    expected = recorded_sha256(source)
    if expected is not None and expected != source_hash:
        raise ValueError(f"{source} differs from its wheel's RECORD (sha256 {source_hash[:12]}…, "
                         f"recorded {expected[:12]}…); reinstall MNN")
    patched = clear_exec_stack(original)
    patched_hash = sha256(patched)
    site = os.path.dirname(os.path.realpath(source))
    key = sha256(f"{source_hash} {site}".encode())[:16]  # one directory per installation and file content
    directory = os.path.join(root or cache_root(), f"mnn-{key}")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    target = os.path.join(directory, os.path.basename(source))
    try:
        with open(target, "rb") as f:
            current = sha256(f.read())
    except FileNotFoundError:
        current = None
    if current != patched_hash:
        write_atomically(target, patched)
        with open(target, "rb") as f:
            if sha256(f.read()) != patched_hash:
                raise OSError(f"{target}: written copy does not read back with the expected hash")
    for name in ORIGIN_DIRS:
        if os.path.isdir(os.path.join(site, name)):
            link_atomically(os.path.join(site, name), os.path.join(directory, name))
    return target


def load_extension(name: str, path: str):
    """Import the extension module file `path` as top-level module `name` (what `import name` then returns)."""
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)  # dlopen + PyInit_<name>
    sys.modules[name] = module
    try:
        loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def import_patched(name: str, root: str | None = None):
    """Import extension module `name` from a patched copy (see patched_copy). EdgeRuntimeError naming the fix if
    the copy cannot be made or loaded."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        raise EdgeRuntimeError(f"MNN is installed but its extension {name} was not found; {TUNABLE_FIX}")
    where = root or cache_root()
    try:
        path = patched_copy(spec.origin, root)
    except (OSError, ValueError) as e:
        raise EdgeRuntimeError(
            f"MNN cannot load: {os.path.basename(spec.origin)} asks for an executable stack (refused by glibc ≥ 2.41)"
            f" and no patched copy could be made in {where} ({e}); {TUNABLE_FIX}, or point {CACHE_ENV} at a "
            f"writable directory") from None
    try:
        return load_extension(name, path)
    except ImportError as e:
        raise EdgeRuntimeError(
            f"MNN cannot load: the patched copy {path} failed too ({str(e).splitlines()[0]}); {TUNABLE_FIX}, or point"
            f" {CACHE_ENV} at a directory on a filesystem mounted with exec") from None


def import_extension(name: str, root: str | None = None):
    """Import one of MNN's extension modules (e.g. `_tools`, the converter), through a patched copy when glibc
    refuses its executable stack."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        raise EdgeRuntimeError(f"MNN's {name} is not installed; pip install MNN") from None
    except ImportError as e:
        if EXECSTACK_FAILURE not in str(e):
            raise EdgeRuntimeError(f"MNN's {name} cannot load ({str(e).splitlines()[0]}); reinstall it: "
                                   "pip install --force-reinstall MNN") from None
    return import_patched(name, root)


def import_mnn(root: str | None = None):
    """`import MNN`, through a patched `_mnncengine` when glibc refuses the installed one's executable stack."""
    try:
        import MNN
        return MNN
    except ModuleNotFoundError as e:
        if e.name in ("MNN", "_mnncengine"):
            raise EdgeRuntimeError("MNN is not installed; pip install MNN") from None
        raise EdgeRuntimeError(f"MNN is installed but cannot load ({e}); pip install {e.name}") from None
    except ImportError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if EXECSTACK_FAILURE not in reason:
            raise EdgeRuntimeError(f"MNN is installed but cannot load ({reason}); reinstall it: "
                                   "pip install --force-reinstall MNN") from None
    import_patched("_mnncengine", root)
    import MNN
    return MNN
