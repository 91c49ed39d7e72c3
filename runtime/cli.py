"""What every edgeport command line shares: argparse errors on one line, integer options with bounds, and a
`main` wrapper that turns warnings into one line each and never shows a traceback."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from .errors import EdgeRuntimeError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors on one stderr line (no usage block), still exit status 2."""

    def error(self, message):
        # a control character the user typed (\r, \x1e, ...) is shown escaped: the line stays one line
        message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
        self.exit(2, f"error: {message} (see --help)\n")


def int_in(lo: int, hi: int | None = None):
    """argparse type: an integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def for_each_image(paths, handle, show, quiet: bool) -> tuple[list[dict], int]:
    """(results, failures): `handle(path)` → a result dict per image; an image that fails with
    EdgeRuntimeError gets {"image", "error"} and one `error:` line, and the rest still run. Unless `quiet`
    (JSON output), `show(result)` prints each success as it comes."""
    results, failed = [], 0
    for path in paths:
        try:
            result = handle(path)
        except EdgeRuntimeError as e:
            result, failed = {"image": path, "error": str(e)}, failed + 1
            print(f"error: {e}", file=sys.stderr)
        results.append(result)
        if not quiet and "error" not in result:
            print(show(result), flush=True)
    return results, failed


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def cli_main(main, argv=None) -> int:
    """main(argv) for a `python -m` entry point: its exit status, warnings as one "warning:" line each, and
    never a traceback (Ctrl-C 130; a closed stdout pipe 0; out of memory 2; anything else, a bug, 1)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", RuntimeWarning)
            warnings.showwarning = _one_line_warning
            return main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `| head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MemoryError:
        print("error: out of memory; use a smaller model, batch or run count", file=sys.stderr)
        return 2
    except Exception as e:  # a bug of ours: still one line, and a status unlike bad input's
        print(f"internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]} (please report it)",
              file=sys.stderr)
        return 1


MAX_LABELS_BYTES = 16 << 20  # 1000 ImageNet names take 30 KB; this keeps /dev/zero or a video from being read


def read_labels(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise EdgeRuntimeError(f"{path}: no such labels file (or not a regular file)")
    if os.path.getsize(path) > MAX_LABELS_BYTES:
        raise EdgeRuntimeError(f"{path}: {os.path.getsize(path)} bytes, too large for a labels file "
                               "(one class name a line)")
    try:
        with open(path, encoding="utf-8") as f:
            labels = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeRuntimeError(f"{path}: cannot read labels ({e})") from None
    while labels and not labels[-1]:
        labels.pop()
    return labels


def expand_images(args: list[str]) -> list[str]:
    """Directories → their image files (sorted); files, even missing ones, are kept to get their own error."""
    paths = []
    for arg in args:
        if os.path.isdir(arg):
            try:
                names = os.listdir(arg)
            except OSError as e:
                raise EdgeRuntimeError(f"{arg}: cannot list directory ({e.strerror})") from None
            found = sorted(os.path.join(arg, n) for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
            if not found:
                kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
                raise EdgeRuntimeError(f"{arg}: directory has no image files ({kinds})")
            paths.extend(found)
        else:
            paths.append(arg)
    return paths
