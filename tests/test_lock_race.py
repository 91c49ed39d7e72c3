"""Two writers, one export directory (issue 24): `python -m export.parity DIR --write` racing an export that
installs into DIR. Both take the destination's lock (export.install.destination_lock), so whichever order
they end in, the directory's manifest lists exactly its files (before the lock, the new model files ended up
under the old manifest, 2 runs of 2; with parity's lock removed, this test fails: parity exits 1 as the files
change under it)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL, TAG = "fasternet_t0", "split_cat-fc"
BASE = ["--img-size", "64", "--pconv", "split_cat", "--mlp", "fc", "--targets", "ort,mnn_fp32"]


def start(module: str, *argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=900)
    return proc.returncode, err


@pytest.mark.parametrize("first", ["parity", pytest.param("export", marks=pytest.mark.slow)])
def test_parity_write_racing_an_export_leaves_a_consistent_directory(first, tmp_path):
    from export.parity import verify_files
    from export.schemas import read_manifest

    code, err = finish(start("export", MODEL, "--out", str(tmp_path), *BASE))
    assert code == 0, err
    d = tmp_path / MODEL / TAG
    parity = ["export.parity", str(d), "--write", "--no-bisect", "--n-images", "48"]
    export = ["export", MODEL, "--out", str(tmp_path), *BASE, "--seed", "7", "--no-parity"]
    procs = []
    for argv in (parity, export) if first == "parity" else (export, parity):
        procs.append(start(*argv))
        time.sleep(1.0)
    results = [finish(p) for p in procs]
    for code, err in results:
        assert code == 0, err
    manifest = read_manifest(d)
    assert verify_files(d, manifest) is None  # every listed file is there with its sha256
    assert manifest["source"]["seed"] in (0, 7)
    assert not list(d.parent.glob(".build-*")) and not list(d.parent.glob(f".{TAG}.old-*"))
