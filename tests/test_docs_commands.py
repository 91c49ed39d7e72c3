"""The commands in README.md and the guides (docs/index.md, docs/guides/*.md, docs/reference/make.md) are run,
so a renamed flag breaks the tests, not a newcomer's first copy-paste.

Every line of a fenced ```sh block is a command. The HTML comment right before a block says what it costs:

    (none)                   cheap: run in `make test`
    <!-- cmd: slow -->       run only with the slow marker (exports, benchmarks: minutes)
    <!-- cmd: manual -->     never run here (needs a board, the network or a file we cannot make); still checked

An export, parity or benchmark command is slow whatever its block says (SLOW_MODULES), unless it asks for --help.
Whatever the marker, every edgeport command line is parsed by its own argparse parser (cheap, nothing runs), and
every `make` line is dry-run (`make -n`, with EXPORT_ARGS / BENCH_ARGS / PARITY_ARGS parsed too). Placeholders
in commands are bound to real files made once per session: `model.mnn` / `model.onnx` (a 64² fasternet_t0
export; a detector's for runtime.detect), `artifacts/...` (that export's directory), images (`cat.jpg`, ...),
image folders (`photos/`), a labelled tree (`val/`: the digits split), `ckpt.pth` (a state_dict),
`imagenet_classes.txt`. Commands of features other
branches are still building are "pending": skipped while their module or flag does not exist, run once it does.
The docs site itself is built with `mkdocs build --strict` (any warning, e.g. a broken link, fails).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))
import clidoc  # noqa: E402

DOCUMENTS = [ROOT / "README.md", ROOT / "docs" / "index.md", ROOT / "docs" / "reference" / "make.md",
             *sorted((ROOT / "docs" / "guides").glob("*.md"))]
MARKERS = {"cheap", "slow", "manual"}
# Flags of features being built in other branches: a command using one is skipped while its parser lacks it.
PENDING_FLAGS = {"--bundle", "--device", "--engine"}
# Console scripts of the board's runtime package, as modules of this checkout.
SCRIPTS = {"edgeport-infer": "runtime.infer", "edgeport-detect": "runtime.detect", "edgeport-bench": "runtime.bench",
           "edgeport-eval": "runtime.evaluate"}
OUR_PACKAGES = {"export", "runtime", "benchmarks", "models"}
# Commands that take minutes whatever their block says (an export, a parity run, a benchmark): run as slow.
SLOW_MODULES = {"export", "export.parity", "benchmarks", "benchmarks.arm.parity", "benchmarks.arm.cost",
                "runtime.bench", "runtime.evaluate"}
GATED_MODULES = {"export", "export.parity", "benchmarks.arm.parity"}
MAKE_ARGS = {"EXPORT_ARGS": "export", "BENCH_ARGS": "benchmarks", "PARITY_ARGS": "export.parity"}
BLOCK = re.compile(r"(?:<!--\s*cmd:\s*(?P<marker>[\w-]+)\s*-->\s*\n)?```sh\n(?P<body>.*?)```", re.S)


@dataclass(frozen=True)
class DocCommand:
    source: str          # "README.md:42"
    marker: str
    argv: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.source} {' '.join(self.argv)}"[:120]

    @property
    def module(self) -> str | None:
        """The edgeport module this line runs (python -m X, or a board script), else None."""
        if self.argv[0] in SCRIPTS:
            return SCRIPTS[self.argv[0]]
        if self.argv[0] in ("python", "python3") and len(self.argv) > 2 and self.argv[1] == "-m":
            module = re.sub(r"^edgeport_runtime\b", "runtime", self.argv[2])
            if module.split(".")[0] in OUR_PACKAGES:
                return module
        return None  # git, pip, scp, python3 -m venv, ...: not ours, never run

    @property
    def cost(self) -> str:
        if self.marker == "cheap" and self.module in SLOW_MODULES and "--help" not in self.args:
            return "slow"
        return self.marker

    @property
    def args(self) -> list[str]:
        return list(self.argv[1:] if self.argv[0] in SCRIPTS else self.argv[3:])


def extract(path: Path) -> list[DocCommand]:
    text = path.read_text()
    found = []
    for block in BLOCK.finditer(text):
        line = text.count("\n", 0, block.start("body")) + 1
        body = block["body"].replace("\\\n", " ")
        for offset, raw in enumerate(body.splitlines()):
            argv = shlex.split(raw, comments=True)
            if argv:
                found.append(DocCommand(f"{path.relative_to(ROOT)}:{line + offset}", block["marker"] or "cheap",
                                        tuple(argv)))
    return found


COMMANDS = [c for doc in DOCUMENTS for c in extract(doc)]


def _params(commands):
    return [pytest.param(c, id=c.id) for c in commands]


def _command(module: str) -> clidoc.Command | None:
    command = clidoc.command_for(module)
    if command is None:
        pytest.fail(f"`python -m {module}` is not in docs/clidoc.py COMMANDS: add it there")
    return command


def parse_error(module: str, args: list[str]) -> str | None:
    """The parser's complaint about a documented command line; skips a pending feature's line."""
    command = _command(module)
    if not command.exists():
        pytest.skip(f"pending: {command.name} is not in this checkout yet")
    error = clidoc.check_argv(command, args)
    pending = [f for f in PENDING_FLAGS if f in args]
    if error and pending and any(f in error for f in pending):
        pytest.skip(f"pending: {command.name} {' '.join(pending)} is not in this checkout yet")
    return error


def make_variables(argv) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv[1:] if "=" in a)


def test_the_docs_have_commands_and_known_markers():
    markers = {c.marker for c in COMMANDS}
    assert markers <= MARKERS, f"unknown <!-- cmd: ... --> markers {markers - MARKERS}; use one of {MARKERS}"
    readme = [c for c in COMMANDS if c.source.startswith("README.md")]
    assert len(readme) >= 10, "the README's tour lost its commands (or the extractor broke)"
    assert {c.module for c in COMMANDS} >= {"export", "export.parity", "runtime.infer", "runtime.detect"}


@pytest.mark.parametrize("cmd", _params([c for c in COMMANDS if c.module]))
def test_documented_command_line_parses(cmd):
    error = parse_error(cmd.module, cmd.args)
    assert error is None, f"{cmd.source}: `{' '.join(cmd.argv)}` is refused by its parser: {error}"


@pytest.mark.parametrize("cmd", _params([c for c in COMMANDS if c.argv[0] == "make"]))
def test_documented_make_line_exists_and_its_args_parse(cmd):
    for variable, value in make_variables(cmd.argv).items():
        if variable in MAKE_ARGS:
            error = parse_error(MAKE_ARGS[variable], shlex.split(value) + (
                ["artifacts/x"] if variable == "PARITY_ARGS" else []))
            assert error is None, f"{cmd.source}: {variable}={value!r} is refused: {error}"
    dry = subprocess.run(["make", "-n", *cmd.argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, f"{cmd.source}: `{' '.join(cmd.argv)}`: {dry.stderr.strip()}"


def test_a_renamed_flag_fails_the_check(monkeypatch):
    """The gate above catches a real defect: rename --topk in runtime.infer's parser, and the documented
    `--topk 3` line is refused."""
    documented = [c for c in COMMANDS if c.module == "runtime.infer" and "--topk" in c.args]
    assert documented, "no documented runtime.infer line uses --topk any more: pick another flag here"
    assert parse_error("runtime.infer", documented[0].args) is None
    original = argparse.ArgumentParser.add_argument

    def renamed(self, *names, **kwargs):
        return original(self, *("--top-k" if n == "--topk" else n for n in names), **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "add_argument", renamed)
    error = parse_error("runtime.infer", documented[0].args)
    assert error is not None and "--topk" in error


# ---- running them ---------------------------------------------------------------------------------------------

def _export(out: Path, *args: str) -> Path:
    run = subprocess.run([sys.executable, "-m", "export", *args, "--out", str(out)], cwd=out,
                         env=_env(), capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-2000:]
    return next(p.parent for p in out.glob("*/*/manifest.json"))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NO_MKDOCS_2_WARNING": "1"}


class Placeholders:
    """Real files for the documented placeholders, each made on first use."""

    def __init__(self, root: Path):
        self.root = root
        self._made: dict[str, Path] = {}

    def _once(self, key, make):
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def photo(self) -> Path:
        def make():
            from PIL import Image
            from skimage import data

            path = self.root / "photo.jpg"
            Image.fromarray(data.chelsea()).save(path)
            return path
        return self._once("photo", make)

    def photos(self) -> Path:
        def make():
            from PIL import Image
            from skimage import data

            folder = self.root / "photos"
            folder.mkdir()
            for name in ("chelsea", "astronaut", "coffee"):
                Image.fromarray(getattr(data, name)()).save(folder / f"{name}.jpg")
            return folder
        return self._once("photos", make)

    def classifier(self) -> Path:
        return self._once("classifier", lambda: _export(self._dir("classifier"), "fasternet_t0", "--img-size",
                                                        "64", "--targets", "ort,mnn_fp32", "--no-parity"))

    def detector(self) -> Path:
        return self._once("detector", lambda: _export(self._dir("detector"), "yolo11n_fasternet_t0",
                                                      "--img-size", "128", "--no-parity"))

    def bundle(self, name: str) -> Path:
        """A board bundle (python -m export MODEL --bundle): the one a documented command made in the work
        directory, else a small one of fasternet_t0."""
        made = sorted((self.root / "work").glob(f"**/{name}"))
        if made:
            return made[0]
        return self._once("bundle", lambda: next(_export(self._dir("bundle"), "fasternet_t0", "--bundle",
                                                         "--img-size", "64", "--targets", "ort,mnn_fp32")
                                                 .parent.parent.glob("*.bundle.tar.gz")))

    def checkpoint(self) -> Path:
        def make():
            import torch

            import models

            path = self.root / "ckpt.pth"
            torch.save(models.create_model("fasternet_t0").state_dict(), path)
            return path
        return self._once("checkpoint", make)

    def labels(self) -> Path:
        def make():
            path = self.root / "labels.txt"
            path.write_text("".join(f"class {i}\n" for i in range(1000)))
            return path
        return self._once("labels", make)

    def _dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        return path

    def bind(self, cmd: DocCommand) -> list[str]:
        """The command line with its placeholders replaced by real files."""
        detector = cmd.module == "runtime.detect"
        bound = []
        for arg in cmd.args:
            name = Path(arg).name
            if re.fullmatch(r"model(\.\w+)?\.(mnn|onnx)", name):
                export = self.detector() if detector else self.classifier()
                arg = str(export / name if (export / name).exists() else export / ("model" + Path(arg).suffix))
            elif name.endswith(".bundle.tar.gz"):
                arg = str(self.bundle(name))
            elif arg.startswith("artifacts/") and not Path(arg).suffix:
                arg = str(self.classifier())
            elif re.fullmatch(r"[\w-]+\.(jpg|jpeg|png)", arg):
                arg = str(self.photo())
            elif arg in ("photos/", "my_photos/"):
                arg = str(self.photos())
            elif arg == "val/":  # a labelled ImageFolder tree: the trained test model's validation split
                from models import digits

                arg = str(digits.make_imagefolder() / "val")
            elif arg.endswith((".pth", ".pt")) and arg != "best.pt":
                arg = str(self.checkpoint())
            elif arg.endswith("classes.txt"):
                arg = str(self.labels())
            bound.append(arg)
        return bound


@pytest.fixture(scope="session")
def placeholders(tmp_path_factory):
    return Placeholders(tmp_path_factory.mktemp("docs-commands"))


def _run(cmd: DocCommand, placeholders: Placeholders, timeout: int):
    if parse_error(cmd.module, cmd.args) is not None:
        pytest.fail(f"{cmd.source}: refused by its parser (see test_documented_command_line_parses)")
    argv = [sys.executable, "-m", _command(cmd.module).module.removesuffix(".__main__"), *placeholders.bind(cmd)]
    work = placeholders.root / "work"
    work.mkdir(exist_ok=True)
    run = subprocess.run(argv, cwd=work, env=_env(), capture_output=True, text=True, timeout=timeout)
    # Exit 1 of an export or parity run is a gate's verdict on the placeholder's synthetic weights (e.g. required
    # int8 files on random init), not a wrong command line: that is exit 2, and a crash is anything else.
    allowed = (0, 1) if cmd.module in GATED_MODULES else (0,)
    assert run.returncode in allowed, \
        f"{cmd.source}: `{' '.join(argv)}` exited {run.returncode}: {run.stderr[-2000:]}"
    assert run.stdout.strip() or run.stderr.strip(), f"{cmd.source}: printed nothing"


RUNNABLE = [c for c in COMMANDS if c.module]


@pytest.mark.parametrize("cmd", _params([c for c in RUNNABLE if c.cost == "cheap"]))
def test_documented_command_runs(cmd, placeholders):
    _run(cmd, placeholders, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("cmd", _params([c for c in RUNNABLE if c.cost == "slow"]))
def test_documented_slow_command_runs(cmd, placeholders):
    _run(cmd, placeholders, timeout=3600)


def test_docs_site_builds_without_a_warning(tmp_path):
    """`make docs`: the generated reference, every link and anchor; --strict turns any warning into a failure."""
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "WARNING" not in build.stderr, build.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "commands" / "export" / "index.html").is_file()
    assert "--pconv" in (tmp_path / "site" / "reference" / "commands" / "export" / "index.html").read_text()


def test_the_nav_drops_pages_not_in_this_checkout():
    """Pages other branches add (docs/guides/board.md, ...) are listed in mkdocs.yml and appear once merged."""
    import hooks

    nav = [{"Guides": [{"Export": "guides/export.md"}, {"Board": "guides/not-yet-merged.md"}]},
           {"Design": [{"Trust": "design/not-yet-merged.md"}]}, "index.md"]
    assert hooks._prune(nav) == [{"Guides": [{"Export": "guides/export.md"}]}, "index.md"]


def test_docs_site_build_fails_on_a_broken_link(tmp_path):
    """The strict build catches a real defect: a copy of the site with one link to a page that does not exist."""
    import shutil

    shutil.copytree(ROOT / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    for package in ("models", "export", "runtime", "benchmarks"):
        (tmp_path / package).symlink_to(ROOT / package)
    index = tmp_path / "docs" / "guides" / "export.md"
    index.write_text(index.read_text() + "\nSee [the renamed page](renamed-page.md).\n")
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert build.returncode != 0
    warnings = [line for line in build.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "renamed-page.md" in warnings[0], build.stderr[-3000:]
