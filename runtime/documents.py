"""Documents read from outside (a manifest, parity.json, an artifact's metadata, a checkpoint's model YAML):
each is declared once as a msgspec schema and read only through `read_document` / `check_document`, so a
hand-edited, truncated, hostile or merely odd document is one line naming the field, never a traceback.

Reading is bounded: only a regular file (a FIFO or a device would hang or never end), at most `max_bytes`, and
msgspec's own nesting limit (a few hundred levels; a 200,000-deep document is a RecursionError it raises
cleanly, turned into one line here). Torch-free, like the rest of runtime/, so every layer can use it."""
from __future__ import annotations

import errno
import hashlib
import os
import stat

import msgspec

from .errors import EdgeRuntimeError

MAX_DOCUMENT_BYTES = 16 << 20  # the largest manifest (int8 records of efficientnetv2_s) is ~100 kB


def _field(error: msgspec.ValidationError) -> tuple[str, str]:
    """("source.img_size", "Expected `int`, got `str`") from msgspec's "... - at `$.source.img_size`"."""
    text = str(error)
    problem, _, where = text.partition(" - at `$")
    field = where.rstrip("`").lstrip(".") or "(top level)"
    return field, problem


def check_document(obj, schema, what: str, fix: str = "", error: type[Exception] = EdgeRuntimeError):
    """`obj` (already parsed: a dict from a pickle or JSON) validated against `schema`; returns the schema
    instance. A violation raises `error` with one line: "<what>: field <name>: <problem>; <fix>"."""
    try:
        return msgspec.convert(obj, type=schema, strict=True)
    except msgspec.ValidationError as e:
        field, problem = _field(e)
        raise error(f"{what}: field {field}: {problem}" + (f"; {fix}" if fix else "")) from None
    except RecursionError:
        raise error(f"{what}: nested too deeply to be a real document" + (f"; {fix}" if fix else "")) from None


def read_bytes(path, what: str, max_bytes: int = MAX_DOCUMENT_BYTES,
               error: type[Exception] = EdgeRuntimeError) -> bytes:
    """The contents of the regular file `path` (≤ max_bytes), or `error` in one line saying why not."""
    path = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading must not wait for a writer; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        reason = "not found" if e.errno == errno.ENOENT else (e.strerror or str(e)).lower()
        raise error(f"{what} {path}: {reason}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {path}: not a regular file")
        if st.st_size > max_bytes:
            raise error(f"{what} {path}: {st.st_size} bytes, more than the {max_bytes} such a document can have")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{what} {path}: cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # it grew while being read
        raise error(f"{what} {path}: more than the {max_bytes} bytes such a document can have")
    return data


def read_document(path, schema, what: str, fix: str = "", max_bytes: int = MAX_DOCUMENT_BYTES,
                  error: type[Exception] = EdgeRuntimeError) -> dict:
    """The JSON document at `path`, validated against `schema` (a msgspec.Struct), as plain Python data (dicts
    and lists: fields the schema does not declare are kept, e.g. for rewriting the document). One line
    naming the field on any violation."""
    raw = decode_json(read_bytes(path, what, max_bytes, error), f"{what} {os.fspath(path)}", fix, error)
    check_document(raw, schema, f"{what} {os.fspath(path)}", fix, error)
    return raw


def decode_json(data, what: str, fix: str = "", error: type[Exception] = EdgeRuntimeError):
    """JSON text or bytes → plain Python data, or `error` in one line: not JSON, or nested too deeply (msgspec
    recurses: a 200,000-deep document raises RecursionError, caught here)."""
    suffix = f"; {fix}" if fix else ""
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError as e:
        raise error(f"{what}: not JSON ({str(e).split(' - ')[0]}){suffix}") from None
    except RecursionError:
        raise error(f"{what}: nested too deeply to be a real document{suffix}") from None


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks (what manifests and bundles record)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
