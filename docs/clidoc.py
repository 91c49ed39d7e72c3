"""The command reference and the target registry as Markdown, read from the code itself: each command's argparse
parser (captured while its `main` builds it, so nothing is retyped) and the records of export/targets.py.

Used by the MkDocs hook (docs/hooks.py) at build time and by tests/test_docs_commands.py, which checks every
documented command line against the same parsers.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import signal
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Every command the docs describe: (how a user types it, its module, what it is for). A module that does not exist
# yet (a feature still being built) is listed on the reference index with a note, and gets no page.
COMMANDS = (
    ("python -m export", "export.__main__", "export a model: ONNX, MNN, int8 files, manifest, parity report"),
    ("python -m export.parity", "export.parity", "re-run the parity suite on an export directory"),
    ("python -m runtime.infer", "runtime.infer", "classify images with an exported model (board: edgeport-infer)"),
    ("python -m runtime.detect", "runtime.detect", "detect objects with an exported detector (edgeport-detect)"),
    ("python -m runtime.bench", "runtime.bench", "measure an artifact on the board (edgeport-bench)"),
    ("python -m runtime.evaluate", "runtime.evaluate", "accuracy of an artifact on a labelled set (edgeport-eval)"),
    ("python -m benchmarks", "benchmarks.__main__", "latency of every form, operator table, roofline (make bench)"),
    ("python -m benchmarks.profile", "benchmarks.profile", "time per op type, slowest nodes, layout conversions"),
    ("python -m benchmarks.runtime_bench", "benchmarks.runtime_bench", "load time, memory and latency of the "
                                                                      "torch-free runtime"),
    ("python -m benchmarks.devices", "benchmarks.devices", "measurements from several boards side by side"),
    ("python -m benchmarks.arm.parity", "benchmarks.arm.parity", "parity of an export under aarch64 emulation"),
    ("python -m benchmarks.arm.cost", "benchmarks.arm.cost", "aarch64 instruction counts per inference"),
    ("python -m benchmarks.arm.board", "benchmarks.arm.board", "the board bench, OpenVINO parity and instruction "
                                                              "counts under aarch64 emulation"),
)


@dataclass(frozen=True)
class Command:
    name: str       # "python -m export"
    module: str     # "export.__main__"
    summary: str

    @property
    def slug(self) -> str:
        return self.name.removeprefix("python -m ").replace(".", "-").replace("_", "-")

    def exists(self) -> bool:
        """Its source is in this checkout (not importlib's view: an editable install elsewhere may answer)."""
        path = REPO.joinpath(*self.module.split("."))
        return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def commands() -> list[Command]:
    return [Command(*c) for c in COMMANDS]


def command_for(module: str) -> Command | None:
    """The Command a `python -m MODULE` line runs (a package runs its __main__)."""
    for c in commands():
        if module in (c.module, c.module.removesuffix(".__main__")):
            return c
    return None


class _Captured(BaseException):
    """Raised from inside parse_args: a BaseException, so the commands' own `except Exception` lets it through."""


@contextlib.contextmanager
def _keep_sigint():
    handler = signal.getsignal(signal.SIGINT)  # export/__main__ installs its own at import
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


def parser_of(command: Command) -> argparse.ArgumentParser:
    """The parser `main` builds: module.build_parser() if it has one, else the first parser `main([])` parses
    with (stopped at that point, before it does any work)."""
    with _keep_sigint():
        module = importlib.import_module(command.module)
        if hasattr(module, "build_parser"):
            parser = module.build_parser()
        else:
            captured = []
            original = argparse.ArgumentParser.parse_known_args

            def capture(self, args=None, namespace=None):
                captured.append(self)
                raise _Captured

            argparse.ArgumentParser.parse_known_args = capture
            try:
                module.main([])
            except _Captured:
                pass
            finally:
                argparse.ArgumentParser.parse_known_args = original
            if not captured:
                raise RuntimeError(f"{command.module}.main([]) never parsed its arguments")
            parser = captured[0]
    parser.prog = command.name
    return parser


class _Rejected(Exception):
    pass


def check_argv(command: Command, argv: list[str]) -> str | None:
    """None if the command's parser accepts argv (or argv asks for --help), else its one-line error, e.g.
    "unrecognized arguments: --pconf slicing" after a flag was renamed. Parses only: runs nothing."""
    parser = parser_of(command)

    def reject(message):
        raise _Rejected(message)

    def leave(status=0, message=None):
        if status:
            raise _Rejected(message or f"exit status {status}")
        raise _Rejected("")  # --help / --version: accepted

    parser.error, parser.exit = reject, leave
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except _Rejected as e:
        return str(e).strip() or None
    return None


def _cell(text) -> str:
    """Text for a Markdown table cell: no pipes, no newlines, and <...> shown, not taken for HTML."""
    return str(text).replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    metavar = ""
    if action.nargs != 0:
        metavar = action.metavar or (("{" + ",".join(map(str, action.choices)) + "}") if action.choices
                                     else action.dest.upper())
        metavar = " " + (f"{metavar} ..." if action.nargs in ("+", "*") else metavar)
    return ", ".join(f"`{o}{metavar}`" for o in action.option_strings)


def command_page(command: Command) -> str:
    """One command's reference page: usage, description, every option, the epilog as written in --help."""
    parser = parser_of(command)
    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action) if action.help else ""
        if not text and action.default not in (None, False, argparse.SUPPRESS):
            text = f"default {str(action.default).replace(str(REPO) + '/', '')}"  # no machine paths in the docs
        if action.choices and "choose" not in text and action.nargs != 0:
            text += f" (one of {', '.join(f'`{c}`' for c in action.choices)})"
        rows.append(f"| {_flags(action)} | {_cell(text)} |")
    usage = parser.format_usage().removeprefix("usage: ").strip()
    parts = [f"# `{command.name}`", "",
             "<!-- generated by docs/clidoc.py from the command's argparse parser: edit the parser, not this -->",
             "", f"What it is for: {command.summary}.", "",
             "```text", usage, "```", ""]
    if parser.description:
        parts += ["```text", parser.description.strip(), "```", ""]
    parts += ["| argument | what it does |", "|---|---|", *rows, ""]
    if parser.epilog:
        parts += ["```text", parser.epilog.strip(), "```", ""]
    return "\n".join(parts)


def commands_index(pages: dict[str, str]) -> str:
    """The index of the command reference: a row per command, a note for those not in this checkout."""
    rows = []
    for c in commands():
        if c.slug in pages:
            rows.append(f"| [`{c.name}`]({c.slug}.md) | {c.summary} |")
        else:
            rows.append(f"| `{c.name}` | {c.summary}. *Not in this checkout yet.* |")
    return "\n".join([
        "# Commands", "",
        "Every option of every command, generated from the command's own argparse parser when the site is built "
        "(`docs/clidoc.py`), so this reference cannot drift from `--help`. On a board the runtime's commands are "
        "installed as `edgeport-infer`, `edgeport-detect`, `edgeport-bench` and `edgeport-eval` "
        "(`python -m edgeport_runtime.infer` ...), with the same options.", "",
        "| command | what it is for |", "|---|---|", *rows, ""])


def command_pages() -> dict[str, str]:
    """{slug: Markdown} for every command whose module exists."""
    return {c.slug: command_page(c) for c in commands() if c.exists()}


def _gate_text(gates) -> str:
    return ", ".join(f"{k} {'≥' if k in ('cosine', 'top1', 'min_iou') else '≤'} {v:g}" for k, v in gates.items())


def targets_page() -> str:
    """The target registry (export/targets.py) as tables: files, how each runs, its gates."""
    from export import targets

    rows, det_rows = [], []
    for t in targets.TARGETS:
        if t.default:
            default = "yes" if t.for_detectors else "yes (not detectors)"
        elif t.default_when_trained:
            default = "with --weights, if it passes (not detectors)"
        else:
            default = "only with --targets"
        runs = t.engine + (f", precision {t.precision}" if t.precision != "fp32" else "")
        rows.append(f"| `{t.name}` | {f'`{t.file}`' if t.file else '–'} | {_cell(t.description)} | {runs} | "
                    f"{t.compute} | {t.gelu} | `{t.made_from}` | {_gate_text(t.gates)} | {t.inputs} | {default} |")
        det_rows.append(f"| `{t.name}` | {_gate_text(t.detection_gates)} |")
    return "\n".join([
        "# Artifact targets and their gates", "",
        "<!-- generated by docs/clidoc.py from export/targets.py: edit the registry, not this -->", "",
        "Every file an export can ship is one `Target` record in `export/targets.py`; this page is generated from "
        "those records when the site is built. `python -m export --targets a,b` picks a subset; each target is "
        "judged against the PyTorch model by its own gates (`export.parity.judge`). Metrics: `max_rel` = "
        "max|Δ| / max|ref| over the parity set; `cosine` and `top1` against the float model on held-out images; "
        "see [parity](../guides/parity.md).", "",
        "| target | file | what it is | runs as | arithmetic | GELU | made from | gate (classifiers) | judged on "
        "| in the default export |",
        "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        "## Detectors", "",
        "Detectors are judged after NMS instead (`export/detection_parity.py`): box error in pixels, score error, "
        "minimum IoU of matched detections, no unmatched detection and no class change.", "",
        "| target | gate (detectors) |", "|---|---|", *det_rows, "",
        f"Default export of a classifier: `{','.join(targets.default_targets('classification'))}`; of a "
        f"detector: `{','.join(targets.default_targets('detection'))}`.", ""])
