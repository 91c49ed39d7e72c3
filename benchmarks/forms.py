"""Every inference form of a model — PConv {split_cat, slice_cat, slicing, full, fused} × MLP {fc, conv}, where
the network has them — built with the project's own export code, then timed: PyTorch with the forms
interleaved, the runtime's engines (ONNX Runtime, MNN, OpenVINO) with every (engine, form) pair interleaved in
the same rounds, so each form has a paired ratio to its baseline form and to ONNX Runtime on the same form.

Exports are cached under a directory keyed by the code that produces them, so a second run re-times without
re-exporting; a change to models/ or export/ (or to a tool version) starts a fresh cache."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import runtime
from export import targets
from export.build import build_artifact
from export.bundle import form_grid
from export.inputs import sample_batch
from export.install import destination_lock
from export.manifest import tool_versions
from export.source import artifact_meta, build_models, form_tag, make_source
from models.errors import EdgeportError
from models.inference import to_inference
from models.metrics import max_rel
from runtime.atomic import write_json

from .timing import interleaved, summarize

ENGINES = ("torch", "ort", "mnn", "openvino")
PAIRED_BASE = "ort"  # the runtime engines' rows also carry a paired ratio to this engine on the same form
ROOT = Path(__file__).resolve().parent.parent
# What an exported file depends on besides its source record: a change in any of these invalidates the cache.
CODE = ("models", "export")


@dataclass
class Form:
    tag: str
    pconv: str | None
    mlp: str | None
    module: nn.Module
    meta: dict
    macs: int = 0
    files: dict[str, Path] = field(default_factory=dict)  # engine → exported file
    build: dict = field(default_factory=dict)  # what build_artifact reported (per-target records)


def code_fingerprint() -> str:
    h = hashlib.sha256(repr(sorted(tool_versions().items())).encode())
    for package in CODE:
        for path in sorted((ROOT / package).glob("*.py")):
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:12]


def prune_cache(cache: Path, keep: str) -> None:
    """Exports of other code versions are never read again (hundreds of MB each): remove them."""
    for old in Path(cache).glob("?" * len(keep)):
        if old.is_dir() and old.name != keep and all(c in "0123456789abcdef" for c in old.name):
            shutil.rmtree(old, ignore_errors=True)


def counted_macs(module: nn.Module, x: torch.Tensor) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() // 2


def build_forms(model: str, img_size: int | None = None,
                only: set[str] | None = None) -> tuple[list[Form], dict]:
    """Every form of `model` (or those tagged in `only`, plus the baseline) as an eval nn.Module, not yet
    exported, and the ones that could not be built {tag: reason}. Weights are the calibrated random init
    `make export` uses: uncalibrated ones give tiny activations that hide real costs (exact GELU's erf)."""
    source = make_source(model, img_size=img_size)
    reference, _, _ = build_models(source)
    x = torch.zeros(1, 3, source["img_size"], source["img_size"])
    forms, skipped = [], {}
    for pconv, mlp in form_grid(reference):
        meta = artifact_meta(reference, {**source, "pconv": pconv, "mlp": mlp})
        tag = form_tag(meta)
        if only and forms and tag not in only:
            continue
        try:
            module = to_inference(reference, pconv=pconv or "split_cat", mlp=mlp or "conv")
        except EdgeportError as e:  # e.g. "fused" where no PConv feeds an MLP
            skipped[tag] = str(e)
            continue
        forms.append(Form(tag, pconv, mlp, module, meta, macs=counted_macs(module, x)))
    return forms, skipped


def reference_form(model: str, img_size: int | None = None) -> Form:
    """`model`'s default form under its own name as tag: a line of another model's table (plain yolo11n
    beside the zoo-backbone detectors), timed interleaved with that model's forms."""
    source = make_source(model, img_size=img_size)
    reference, inference, meta = build_models(source)
    x = torch.zeros(1, 3, source["img_size"], source["img_size"])
    return Form(model, meta["pconv"], meta["mlp"], inference, meta, macs=counted_macs(inference, x))


TIMED_TARGETS = {"ort": "ort", "mnn": "mnn_fp32", "openvino": "openvino"}  # engine → the artifact target it times
TIMED_TARGET_NAMES = tuple(TIMED_TARGETS.values())
BUILD_RECORD = "bench_build.json"  # build_artifact's report, kept beside the cached files


def export_form(form: Form, directory: Path, target_names=TIMED_TARGET_NAMES, **build_options) -> dict[str, Path]:
    """{target: file} of the named targets (built like `make export` builds them), reused when all are present;
    built in a temporary sibling and moved into place whole. `form.build` gets build_artifact's report.
    `build_options`: build_artifact's keyword options (e.g. calib_dir, held_out_dir)."""
    files = {name: directory / targets.get(name).file for name in target_names}
    if not all(f.is_file() for f in files.values()):
        directory.parent.mkdir(parents=True, exist_ok=True)
        with destination_lock(directory):  # one writer per cached directory (two benchmark runs share it)
            if not all(f.is_file() for f in files.values()):  # unless the other writer just built it
                _build_into(form, directory, target_names, build_options)
    try:
        form.build = json.loads((directory / BUILD_RECORD).read_text())
    except (OSError, ValueError):
        form.build = {}
    form.files.update({engine: files[name] for engine, name in TIMED_TARGETS.items() if name in files})
    return files


def _build_into(form: Form, directory: Path, target_names, build_options: dict) -> None:
    build = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        # every target already there is built again too: one directory, one build, one record
        have = [t.name for t in targets.ARTIFACTS if (directory / t.file).is_file()]
        record = build_artifact(form.module, form.meta, build, tuple(dict.fromkeys([*have, *target_names])),
                                **build_options)
        write_json(build / BUILD_RECORD, record)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(build, directory)
    finally:
        shutil.rmtree(build, ignore_errors=True)


@contextmanager
def export_root(cache: Path | None):
    """Where exports go: cache/<code fingerprint>/ (older fingerprints pruned), or a temporary directory."""
    if cache is None:
        tmp = Path(tempfile.mkdtemp(prefix="edgeport-bench-"))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    fingerprint = code_fingerprint()
    prune_cache(cache, keep=fingerprint)
    yield Path(cache) / fingerprint


def export_dir(root: Path, form: Form) -> Path:
    return root / f"{form.meta['model']}-{form.meta['input_shape'][-1]}" / form.tag


def runner(form: Form, engine: str, threads: int, x: np.ndarray):
    """A no-argument callable running one forward pass of `form` on `engine`."""
    if engine == "torch":
        xt = torch.from_numpy(x)

        def run():
            with torch.inference_mode():
                return form.module(xt)
        return run
    target = targets.get(TIMED_TARGETS[engine])
    predictor = runtime.load(form.files[engine], engine=target.engine, threads=threads, precision=target.precision)
    return lambda: predictor.run(x)


def torch_outputs(module: nn.Module, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        out = module(torch.from_numpy(x))
    return {n: o.numpy() for n, o in zip(names, out if isinstance(out, (tuple, list)) else [out])}


def check_outputs(forms: list[Form], engines, x: np.ndarray) -> dict:
    """{engine: {tag: max_rel of engine against torch, worst output}}: a form that computes something else is
    not timed as if it were the same network."""
    errors = {}
    for form in forms:
        ref = torch_outputs(form.module, x, form.meta["output_names"])
        for engine in engines:
            if engine != "torch":
                out = runner(form, engine, 1, x)()
                errors.setdefault(engine, {})[form.tag] = max(max_rel(r, out[n]) for n, r in ref.items())
    return errors


def time_engines(forms: list[Form], engines, threads: int, x: np.ndarray, iters: int, warmup: int,
                 budget_s: float | None = None) -> dict[str, dict]:
    """{engine: summarize() rows per form tag}: every (engine, form) pair interleaved in the same rounds. Rows
    have the paired ratio to the engine's baseline form ("ratio") and, beside PAIRED_BASE, to PAIRED_BASE on the
    same form ("vs_ort", with p10/p90). `budget_s` is per engine: the group gets it once per engine."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fns = {f"{engine}/{form.tag}": runner(form, engine, threads, x) for engine in engines for form in forms}
        times = interleaved(fns, iters=iters, warmup=warmup,
                            max_seconds=budget_s * len(engines) if budget_s else budget_s)
    finally:
        torch.set_num_threads(prev)
    tags = [form.tag for form in forms]
    out = {}
    for engine in engines:
        out[engine] = summarize({tag: times[f"{engine}/{tag}"] for tag in tags}, baseline=tags[0])
        if engine != PAIRED_BASE and PAIRED_BASE in engines:
            for tag in tags:
                paired = times[f"{engine}/{tag}"] / times[f"{PAIRED_BASE}/{tag}"]
                out[engine][tag].update(vs_ort=float(np.median(paired)),
                                        vs_ort_p10=float(np.percentile(paired, 10)),
                                        vs_ort_p90=float(np.percentile(paired, 90)))
    return out


def bench_model(model: str, engines, threads, iters: int, warmup: int, img_size: int | None = None,
                cache: Path | None = None, only: set[str] | None = None,
                budget_s: float | None = None, log=print, references: tuple[str, ...] = ()) -> dict:
    """One model's forms table: per engine, per thread count, per form tag: latency and ratio to baseline.
    `budget_s` caps each (engine, threads) group's warm-up + rounds (see timing.interleaved). `references`:
    other models (default form, tagged by their name) timed in the same rounds, e.g. plain yolo11n."""
    clock = {"start": time.perf_counter()}
    forms, skipped = build_forms(model, img_size, only)
    size = forms[0].meta["input_shape"][-1]
    forms += [reference_form(name, size) for name in references]
    clock["build"] = time.perf_counter()
    with export_root(cache) as root:
        if any(e != "torch" for e in engines):
            for form in list(forms):
                log(f"  export {form.meta['model']} {form.tag}")
                try:
                    export_form(form, export_dir(root, form))
                except Exception as e:  # one broken form should not cost the others' numbers
                    if form is forms[0]:
                        raise
                    skipped[form.tag] = f"export failed: {type(e).__name__}: {str(e).strip()[:200]}"
                    forms.remove(form)
        clock["export"] = time.perf_counter()
        x = sample_batch(forms[0].meta, n_images=1, n_random=0)  # a photo: realistic activations
        result = {
            "family": forms[0].module.default_cfg["family"], "img_size": size, "baseline": forms[0].tag,
            "forms": {f.tag: {"pconv": f.pconv, "mlp": f.mlp, "macs": f.macs, "model": f.meta["model"],
                              "params": sum(p.numel() for p in f.module.parameters())} for f in forms},
            "references": list(references),
            "skipped": skipped, "max_rel_err": check_outputs(forms, engines, x), "timings": {},
        }
        clock["check"] = time.perf_counter()
        # PyTorch alone (its own thread pool and set_num_threads); the runtime's engines in one interleaved group
        groups = [[e] for e in engines if e == "torch"] + [[e for e in engines if e != "torch"]]
        for t in threads:
            for group in filter(None, groups):
                log(f"  time {model} {'+'.join(group)} {t} thread{'s' * (t > 1)} "
                    f"({len(group)} engines × {len(forms)} forms × {iters})")
                for engine, rows in time_engines(forms, group, t, x, iters, warmup, budget_s).items():
                    result["timings"].setdefault(engine, {})[str(t)] = rows
        clock["time"] = time.perf_counter()
    stages = list(clock)
    result["seconds"] = {b: round(clock[b] - clock[a], 1) for a, b in zip(stages, stages[1:])}
    return result
