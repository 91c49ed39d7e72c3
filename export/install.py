"""Where an export is built and how it replaces the previous one.

A build happens in OUT/MODEL/.build-<pid>-XXXX and is renamed into place only whole, under the destination's
lock (`destination_lock`, the one lock every writer of an export directory takes: this install and
`python -m export.parity --write`), so concurrent runs end with one complete directory whose manifest matches
its files. A destination that is not an export (a user's file or directory) is refused, never moved aside.
A failed export (parity breach) never replaces a passing one: it goes beside it as <tag>.failed. Build
directories of processes that died (SIGKILL, power loss) are swept by the next run. An environment failure
(disk full, quota, read-only, ...) is one line (`environment_failure`), not a bug.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from models.errors import EdgeportError
from runtime.atomic import umask

from .manifest import MANIFEST

BUILD_PREFIX = ".build-"
FAILED_SUFFIX = ".failed"
STALE_AFTER_S = 24 * 3600  # a build dir without a readable pid is swept once this old


# What ran out, and what the user can do: the environment failing is bad input (exit 2), not a bug of ours.
_RAN_OUT = {  # errno: (what ran out, the fix; {elsewhere}: where else the command can write)
    errno.ENOSPC: ("no space left on device", "free space or {elsewhere}"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota or {elsewhere}"),
    errno.EROFS: ("read-only file system", "{elsewhere} on a writable file system"),
    errno.EACCES: ("permission denied", "check the permissions or {elsewhere}"),
    errno.EPERM: ("operation not permitted", "check the permissions or {elsewhere}"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) or close other programs"),
    errno.ENFILE: ("too many open files on the system", "close other programs"),
    errno.ENOMEM: ("out of memory", "use a smaller model, batch or --img-size, or free memory"),
    errno.EIO: ("input/output error", "check the disk"),
}


def environment_failure(e: BaseException, doing: str, elsewhere: str = "use --out elsewhere") -> str | None:
    """One line saying what ran out while `doing` and what to do, for an OSError of the environment (ENOSPC,
    EDQUOT, EROFS, EACCES, EMFILE, ENOMEM, ...) or a MemoryError; None for anything else (a bug: re-raise)."""
    if isinstance(e, MemoryError):
        return f"out of memory while {doing}; {_RAN_OUT[errno.ENOMEM][1]}"
    if not isinstance(e, OSError) or e.errno not in _RAN_OUT:
        return None
    what, fix = _RAN_OUT[e.errno]
    where = f" ({e.filename})" if e.filename else ""
    return f"{what} while {doing}{where}; {fix.format(elsewhere=elsewhere)}"


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
def destination_lock(dest: Path, waiting: Callable[[str], None] | None = None):
    """The exclusive lock of one destination directory (a lock file beside it, .<name>.lock), held by every
    writer while it reads and replaces the directory. `waiting(message)` is told when another writer holds it."""
    dest = Path(dest)
    lock = FileLock(dest.with_name(f".{dest.name}.lock"), preserve_lock_file=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if waiting:
            waiting(f"waiting for another writer of {dest} to finish")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _status(directory: Path) -> str | None:
    from .schemas import ManifestStatus, read_manifest

    try:
        return read_manifest(directory, ManifestStatus).get("status")
    except EdgeportError:
        return None


def check_replaceable(dest: Path) -> None:
    """EdgeportError unless `dest` is absent or an export directory (it holds a manifest.json, or nothing): a
    user's file or directory there is never moved aside or deleted."""
    if not os.path.lexists(dest):
        return
    if dest.is_symlink() or not dest.is_dir():
        kind = "a symbolic link" if dest.is_symlink() else "a file"
        raise EdgeportError(f"{dest} is {kind}, not an export directory; move it away or choose another --out")
    try:
        if (dest / MANIFEST).is_file() or not any(dest.iterdir()):
            return
    except OSError as e:
        raise EdgeportError(f"cannot read {dest}: {e.strerror or e}; check its permissions") from None
    raise EdgeportError(f"{dest} is a directory without an export's {MANIFEST}; it is not replaced: move it away "
                        "or choose another --out")


def install(build: Path, dest: Path, status: str) -> Path:
    """Move `build` to `dest` (replacing it whole), or, when `status` is "failed" and `dest` holds a passing
    export, to `dest`.failed beside it. Returns where it went."""
    for f in build.iterdir():  # temp-file helpers create 0600 files
        os.chmod(f, 0o666 & ~umask())
    try:
        with destination_lock(dest):
            failed = dest.with_name(dest.name + FAILED_SUFFIX)
            check_replaceable(dest)
            check_replaceable(failed)
            if status == "failed" and _status(dest) == "passed":
                dest = failed
            elif os.path.lexists(failed):  # superseded by this export
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
