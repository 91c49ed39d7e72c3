"""CLI output: timed steps with a rich spinner, and fd-level silencing of C/C++ libraries (MNN prints its
converter log and "The device supports ..." straight to fd 1/2, below Python's sys.stdout)."""
from __future__ import annotations

import ctypes
import os
import sys
import time
from contextlib import contextmanager

from rich.console import Console


def _flush_c_stdio():
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no libc symbols to reach (non-glibc platforms)
        pass


@contextmanager
def redirect_fds(log_path, enabled: bool = True):
    """Send everything written to fds 1 and 2 (Python and C alike) to `log_path` (appended) while active."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    _flush_c_stdio()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log_path, "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                _flush_c_stdio()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


def make_console(quiet: bool = False) -> Console:
    """A console on a private duplicate of stdout, so `redirect_fds` never swallows our own progress lines."""
    try:
        stream = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    except (AttributeError, OSError, ValueError):  # stdout without a real fd (e.g. pytest capsys)
        stream = sys.stdout
    return Console(file=stream, quiet=quiet, highlight=False, soft_wrap=True)


class Steps:
    """Runs named steps, shows a spinner while each one works and a ✓ line with its duration when it ends."""

    def __init__(self, console: Console):
        self.console = console
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str):
        """Yields `progress(detail)`, which shows what a long step is doing beside its spinner."""
        start = time.perf_counter()
        with self.console.status(f"{name} …", spinner="dots") as status:
            try:
                yield lambda detail: status.update(f"{name} … {detail}")
            except BaseException:
                self.console.print(f"[red]✗[/red] {name}")
                raise
        elapsed = time.perf_counter() - start
        self.timings[name] = round(elapsed, 3)
        self.console.print(f"[green]✓[/green] {name:<34} {elapsed:6.2f} s")

    def note(self, text: str):
        self.console.print(f"  {text}")
