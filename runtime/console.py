"""Keeping C libraries' own console output (MNN on stdout, libtiff/libjpeg on stderr) off ours.

`fd_captured(fd)` points the file descriptor at a temporary file for the duration and hands back what was
written there. Redirection is process-wide, so it is reference-counted under a lock: nested and concurrent users
share one redirection, and the descriptor is restored when the last leaves (each reads only its own span)."""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
import threading

MAX_CAPTURED_BYTES = 64 << 10
_LOCK = threading.Lock()
_ACTIVE: dict[int, list] = {}  # fd → [users, saved descriptor, sink file]


def _flush_c_stdio() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def fd_captured(fd: int, captured: list | None = None):
    """Redirect `fd` (1 or 2) to a temporary file; append what was written meanwhile to `captured` if given."""
    stream = {1: sys.stdout, 2: sys.stderr}.get(fd)
    with _LOCK:
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()
        state = _ACTIVE.get(fd)
        if state is None:
            try:
                saved = os.dup(fd)
            except OSError:  # no such descriptor: nothing to protect
                saved = None
            if saved is not None:
                sink = tempfile.TemporaryFile()
                os.dup2(sink.fileno(), fd)
                state = _ACTIVE[fd] = [0, saved, sink]
        if state is not None:
            state[0] += 1
            start = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        yield
    finally:
        if state is not None:
            with _LOCK:
                _flush_c_stdio()
                end = os.lseek(fd, 0, os.SEEK_CUR)
                if captured is not None:
                    n = min(end - start, MAX_CAPTURED_BYTES)
                    captured.append(os.pread(state[2].fileno(), n, start).decode("utf-8", "replace") if n > 0 else "")
                state[0] -= 1
                if state[0] == 0:
                    os.dup2(state[1], fd)
                    os.close(state[1])
                    state[2].close()
                    del _ACTIVE[fd]


def stdout_silenced(captured: list | None = None):
    """MNN's C code prints banners, load errors and failed forwards' reasons straight to stdout."""
    return fd_captured(1, captured)


def stderr_silenced(captured: list | None = None):
    """libtiff and libjpeg print warnings about corrupt files straight to stderr, beside Pillow's exception."""
    return fd_captured(2, captured)


def last_words(text: str) -> str:
    """A library's console output as one short line: its lines that mention an error (else its last line)."""
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return "; ".join(errors[:2] or lines[-1:])[:200]
