"""`python -m export MODEL --bundle`: every inference form of a model, exported and gated as a normal export,
described by OUT/MODEL/bundle.json and packed into OUT/MODEL.bundle.tar.gz for the board.

The board runs `edgeport-bench MODEL.bundle.tar.gz --json board.json` (runtime.bench, which also reads this
file's schema), and `python -m export MODEL --device board.json` exports the form it measured fastest.
"""
from __future__ import annotations

import io
import os
import tarfile
import tempfile
from dataclasses import replace
from pathlib import Path

import msgspec
from rich.console import Console
from rich.markup import escape

from models.errors import EdgeportError
from models.inference import DEFAULT_MLP, DEFAULT_PCONV, MLP_FORMS, PCONV_FORMS
from runtime import load
from runtime.atomic import umask, write_atomic
from runtime.bench import BUNDLE_JSON, BUNDLE_SCHEMA, Bundle, BundleFile, BundleForm
from runtime.device import Schema, fingerprint, now

from . import targets
from ._console import make_console
from .manifest import MANIFEST
from .pipeline import ExportOptions, export_name, run_export
from .source import ULTRALYTICS, model_forms

TARBALL_SUFFIX = ".bundle.tar.gz"


def form_grid(reference) -> list[tuple[str | None, str | None]]:
    """(pconv, mlp) pairs that mean something for this network; the baseline (split_cat, fc) comes first."""
    has_pconv, has_mlp = model_forms(reference)
    pconvs = sorted(PCONV_FORMS, key=lambda f: f != DEFAULT_PCONV) if has_pconv else [None]
    mlps = sorted(MLP_FORMS, key=lambda f: f != DEFAULT_MLP) if has_mlp else [None]
    return [(p, m) for p in pconvs for m in mlps]


def model_grid(opts: ExportOptions) -> list[tuple[str | None, str | None]]:
    """The form grid of opts.model, from an uninitialised network (its structure is all the grid needs)."""
    import models

    if opts.model == ULTRALYTICS:
        from .source import build_models, make_source

        reference = build_models(make_source(opts.model, opts.weights, opts.img_size))[0]
    else:
        reference = models.create_model(opts.model, features_only=opts.features_only)
    return form_grid(reference)


def gate_status(manifest: dict, target: str) -> str:
    """passed | failed | unchecked for one target of an installed export (parity breaches name their target)."""
    if manifest["status"] == "unchecked":
        return "unchecked"
    breaches = manifest.get("parity", {}).get("breaches") or []
    return "failed" if any(b.startswith((f"{target}:", f"{target}[")) for b in breaches) else "passed"


def output_shapes(directory: Path, manifest: dict) -> dict[str, list[int]]:
    """{output: shape} from running the export's first file once on zeros (the bench checks every file against
    it on the board)."""
    name = next(targets.get(t).file for t in manifest["export"]["targets"])
    predictor = load(directory / name)
    import numpy as np

    shape = [d if d > 0 else 1 for d in predictor.input_shape]
    return {k: list(v.shape) for k, v in predictor.run(np.zeros(shape, np.float32), check_finite=False).items()}


def bundle_form(directory: Path, manifest: dict) -> BundleForm:
    meta, tag = manifest["metadata"], manifest["form_tag"]
    files = {}
    for t in manifest["export"]["targets"]:
        target = targets.get(t)
        files[t] = BundleFile(file=f"{tag}/{target.file}", sha256=manifest["files"][target.file]["sha256"],
                              engine=target.engine, precision=target.precision, gate=gate_status(manifest, t),
                              size=manifest["files"][target.file]["size"])
    return BundleForm(tag=tag, pconv=meta.get("pconv"), mlp=meta.get("mlp"), status=manifest["status"],
                      input_shape=list(meta["input_shape"]), outputs=output_shapes(directory, manifest), files=files)


def build_bundle(opts: ExportOptions, console: Console | None = None) -> tuple[Path, Bundle]:
    """Export every form (each installed under OUT/MODEL/TAG as `python -m export` installs it), then write
    bundle.json and the tarball. Returns (tarball, bundle). A form the network cannot take (e.g. "fused" with
    no PConv before an MLP) is skipped with a note; the baseline must build."""
    console = console or make_console()
    if opts.pconv != "auto" or opts.mlp != "auto":
        raise EdgeportError("--bundle builds every form; drop --pconv/--mlp")
    grid = model_grid(opts)
    forms, skipped, source = [], {}, None
    for i, (pconv, mlp) in enumerate(grid, 1):
        label = "-".join(f for f in (pconv, mlp) if f) or "default"
        console.rule(f"[bold]bundle {opts.model}: form {i}/{len(grid)} {label}"
                     + (" (baseline)" if i == 1 else ""))
        try:
            manifest = run_export(replace(opts, pconv=pconv or "auto", mlp=mlp or "auto"), console)
        except EdgeportError as e:
            if i == 1:
                raise EdgeportError(f"baseline form {label}: {e}") from None
            skipped[label] = str(e)
            console.print(f"[yellow]form {label} skipped:[/yellow] {e}")
            continue
        source = source or manifest["source"]
        directory = Path(opts.out) / export_name(manifest["source"]) / manifest["form_tag"]
        forms.append(bundle_form(directory, manifest))
    root = Path(opts.out) / export_name(source)
    bundle = Bundle(schema=Schema(*BUNDLE_SCHEMA), model=opts.model, baseline=forms[0].tag, forms=forms,
                    source={k: v for k, v in source.items() if k not in ("pconv", "mlp")}, host=fingerprint(),
                    created=now())
    data = msgspec.json.format(msgspec.json.encode(bundle), indent=2) + b"\n"
    write_atomic(root / BUNDLE_JSON, data)
    tarball = write_tarball(root, bundle, data)
    for label, why in skipped.items():
        console.print(f"[yellow]not in the bundle:[/yellow] {label} ({why})")
    size = tarball.stat().st_size / 1e6
    console.print(f"[bold]bundle[/bold] {len(forms)} forms, baseline {bundle.baseline}: {root / BUNDLE_JSON}, "
                  f"{tarball} ({size:.1f} MB)")
    console.print(escape(f"on the board: pip install 'edgeport-runtime[all]'; edgeport-bench {tarball.name} "
                         f"--json board.json; here: python -m export {opts.model} --device board.json"))
    return tarball, bundle


def write_tarball(root: Path, bundle: Bundle, bundle_json: bytes) -> Path:
    """ROOT.bundle.tar.gz holding ROOT_NAME/bundle.json, every bundled file and each form's manifest.json;
    written to a temporary file beside it and renamed."""
    tarball = root.parent / f"{root.name}{TARBALL_SUFFIX}"
    members = sorted({f.file for form in bundle.forms for f in form.files.values()}
                     | {f"{form.tag}/{MANIFEST}" for form in bundle.forms if (root / form.tag / MANIFEST).is_file()})
    fd, tmp = tempfile.mkstemp(prefix=f".{tarball.name}.", suffix=".tmp", dir=root.parent)
    try:
        # float weights barely compress: the fastest level
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w:gz", compresslevel=1) as tar:
            info = tarfile.TarInfo(f"{root.name}/{BUNDLE_JSON}")
            info.size, info.mode, info.mtime = len(bundle_json), 0o644, int(os.path.getmtime(root / BUNDLE_JSON))
            tar.addfile(info, io.BytesIO(bundle_json))
            for name in members:
                tar.add(root / name, arcname=f"{root.name}/{name}", recursive=False)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, tarball)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tarball
