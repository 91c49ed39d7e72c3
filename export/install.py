"""Where an export is built and how it replaces the previous one.

A build happens in OUT/MODEL/.build-<pid>-XXXX and is renamed into place only whole, under a per-destination
lock, so concurrent runs end with one complete directory. A failed export (parity breach) never replaces a
passing one: it goes beside it as <tag>.failed. Build directories of processes that died (SIGKILL, power
loss) are swept by the next run.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from models.errors import EdgeportError
from runtime.atomic import umask

BUILD_PREFIX = ".build-"
FAILED_SUFFIX = ".failed"
STALE_AFTER_S = 24 * 3600  # a build dir without a readable pid is swept once this old


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale_builds(parent: Path) -> list[Path]:
    """Remove build directories whose process is gone; returns what was removed."""
    removed = []
    for d in parent.glob(f"{BUILD_PREFIX}*"):
        pid = d.name[len(BUILD_PREFIX):].split("-", 1)[0]
        try:
            dead = not _alive(int(pid)) if pid.isdigit() else time.time() - d.stat().st_mtime > STALE_AFTER_S
        except OSError:
            continue
        if dead and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def make_build_dir(out: Path, model: str) -> Path:
    parent = Path(out) / model
    created = not parent.exists()
    try:
        parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_builds(parent)
        build = Path(tempfile.mkdtemp(prefix=f"{BUILD_PREFIX}{os.getpid()}-", dir=parent))
        os.chmod(build, 0o777 & ~umask())  # mkdtemp makes it private; the artifact dir should not be
        return build
    except OSError as e:
        if created:
            remove_if_empty(parent)
        reason = e.strerror or str(e)
        raise EdgeportError(f"cannot write to --out {out}: {reason}; choose a writable directory") from None


def remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass


@contextmanager
def destination_lock(dest: Path):
    """An exclusive lock on one destination directory (a lock file beside it), held while it is replaced."""
    lock_path = dest.with_name(f".{dest.name}.lock")
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _status(directory: Path) -> str | None:
    try:
        return json.loads((directory / "manifest.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def install(build: Path, dest: Path, status: str) -> Path:
    """Move `build` to `dest` (replacing it whole), or, when `status` is "failed" and `dest` holds a passing
    export, to `dest`.failed beside it. Returns where it went."""
    for f in build.iterdir():  # temp-file helpers create 0600 files
        os.chmod(f, 0o666 & ~umask())
    try:
        with destination_lock(dest):
            failed = dest.with_name(dest.name + FAILED_SUFFIX)
            if status == "failed" and _status(dest) == "passed":
                dest = failed
            elif failed.is_dir():  # superseded by this export
                shutil.rmtree(failed, ignore_errors=True)
            _replace(build, dest)
    except OSError as e:
        raise EdgeportError(f"cannot install the export at {dest}: {e.strerror or e}; check permissions of "
                            f"{dest.parent}") from None
    return dest


def _replace(build: Path, dest: Path) -> None:
    """Rename, never copy, so readers see the old or the new directory whole."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    try:
        os.replace(build, dest)
    except OSError:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
