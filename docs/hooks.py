"""MkDocs hooks (mkdocs.yml `hooks:`): generate the command and target reference from the code at build time, and
drop nav entries whose page does not exist in this checkout (pages other branches add appear once merged)."""
from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.structure.files import File

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
sys.path[:0] = [str(REPO), str(DOCS)]

import clidoc  # noqa: E402

COMMANDS_DIR = "reference/commands"
# Files outside docs/ that pages show, copied in at build time: {site path: repository path}.
ASSETS = {"measurements/latency.png": "benchmarks/results/latency.png"}

_generated: dict[str, str] = {}


def _generate() -> dict[str, str]:
    pages = clidoc.command_pages()
    out = {f"{COMMANDS_DIR}/{slug}.md": text for slug, text in pages.items()}
    out[f"{COMMANDS_DIR}/index.md"] = clidoc.commands_index(pages)
    out["reference/targets.md"] = clidoc.targets_page()
    return out


def _exists(path: str) -> bool:
    return path in _generated or (DOCS / path).is_file() or "://" in path


def _prune(items: list) -> list:
    """The nav without entries whose file is missing; a section left empty goes too."""
    kept = []
    for item in items:
        if isinstance(item, str):
            if _exists(item):
                kept.append(item)
            continue
        (title, value), = item.items()
        if isinstance(value, list):
            value = _prune(value)
            if value:
                kept.append({title: value})
        elif _exists(value):
            kept.append({title: value})
    return kept


def _expand_commands(items: list) -> list:
    """The `reference/commands/index.md` entry becomes a section: the index, then a page per command."""
    out = []
    for item in items:
        if isinstance(item, dict):
            (title, value), = item.items()
            if isinstance(value, list):
                item = {title: _expand_commands(value)}
            elif value == f"{COMMANDS_DIR}/index.md":
                pages = [{c.name.removeprefix("python -m "): f"{COMMANDS_DIR}/{c.slug}.md"}
                         for c in clidoc.commands() if f"{COMMANDS_DIR}/{c.slug}.md" in _generated]
                item = {title: [value, *pages]}
        out.append(item)
    return out


def on_config(config):
    _generated.clear()
    _generated.update(_generate())
    config["nav"] = _expand_commands(_prune(config["nav"]))
    return config


def on_files(files, config):
    for path, text in _generated.items():
        files.append(File.generated(config, path, content=text))
    for path, source in ASSETS.items():
        if (REPO / source).is_file():
            files.append(File.generated(config, path, abs_src_path=str(REPO / source)))
    return files
