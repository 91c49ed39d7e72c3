"""runtime.mnn_import: the PT_GNU_STACK edit, the hash checks, the error that names the fix, and that the
installed package is only ever read."""
from __future__ import annotations

import base64
import hashlib
import importlib.machinery
import importlib.util
import os
import struct
import subprocess
import sys

import pytest

from runtime.errors import EdgeRuntimeError
from runtime.mnn_import import (
    PT_GNU_STACK,
    TUNABLE_FIX,
    clear_exec_stack,
    has_exec_stack,
    import_mnn,
    import_patched,
    patched_copy,
)

PT_LOAD = 1
RWE, RW = 7, 6
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_elf(elf_class: int = 2, big_endian: bool = False, stack_flags: int = RWE) -> bytes:
    """An ELF header and a two-entry program header table (PT_LOAD, PT_GNU_STACK), as a linker writes them."""
    end = ">" if big_endian else "<"
    ident = b"\x7fELF" + bytes([elf_class, 2 if big_endian else 1, 1]) + bytes(9)
    if elf_class == 2:
        header = ident + struct.pack(end + "HHIQQQIHHHHHH", 3, 62, 1, 0, 64, 0, 0, 64, 56, 2, 64, 0, 0)
        phdr = lambda typ, flags: struct.pack(end + "IIQQQQQQ", typ, flags, 0, 0, 0, 0, 0, 16)  # noqa: E731
    else:
        header = ident + struct.pack(end + "HHIIIIIHHHHHH", 3, 40, 1, 0, 52, 0, 0, 52, 32, 2, 40, 0, 0)
        phdr = lambda typ, flags: struct.pack(end + "IIIIIIII", typ, 0, 0, 0, 0, 0, flags, 16)  # noqa: E731
    return header + phdr(PT_LOAD, 5) + phdr(PT_GNU_STACK, stack_flags) + b"code" * 8


def stack_flags(elf: bytes) -> int:
    end = "<" if elf[5] == 1 else ">"
    if elf[4] == 2:
        return struct.unpack_from(end + "I", elf, 64 + 56 + 4)[0]
    return struct.unpack_from(end + "I", elf, 52 + 32 + 24)[0]


@pytest.mark.parametrize("elf_class,big_endian", [(2, False), (2, True), (1, False), (1, True)])
def test_clear_exec_stack_clears_pf_x_only(elf_class, big_endian):
    elf = synthetic_elf(elf_class, big_endian)
    assert stack_flags(elf) == RWE and has_exec_stack(elf)
    patched = clear_exec_stack(elf)
    assert stack_flags(patched) == RW and not has_exec_stack(patched)
    assert len(patched) == len(elf) and sum(a != b for a, b in zip(elf, patched)) == 1


def test_clear_exec_stack_rejects_what_it_cannot_patch():
    with pytest.raises(ValueError, match="not an ELF"):
        clear_exec_stack(b"MZ" + bytes(100))
    no_stack = synthetic_elf().replace(struct.pack("<I", PT_GNU_STACK), struct.pack("<I", 4))
    with pytest.raises(ValueError, match="no PT_GNU_STACK"):
        clear_exec_stack(no_stack)


def fake_site(tmp_path, content: bytes, recorded: bytes | None = None) -> str:
    """A site-packages with one 'extension' and the RECORD its wheel would have written."""
    site = tmp_path / "site"
    (site / "mnn.libs").mkdir(parents=True)
    (site / "fake-1.0.dist-info").mkdir()
    so = site / ("_fakeengine" + importlib.machinery.EXTENSION_SUFFIXES[0])
    so.write_bytes(content)
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded or content).digest()).rstrip(b"=").decode()
    (site / "fake-1.0.dist-info" / "RECORD").write_text(f"{so.name},sha256={digest},{len(content)}\n")
    os.chmod(so, 0o444)
    return str(so)


def snapshot(path: str):
    st = os.stat(path)
    with open(path, "rb") as f:
        return f.read(), st.st_mtime_ns, st.st_mode


def test_patched_copy_leaves_the_installed_file_alone(tmp_path):
    elf = synthetic_elf()
    source = fake_site(tmp_path, elf)
    before = snapshot(source)
    copy = patched_copy(source, str(tmp_path / "cache"))
    assert snapshot(source) == before
    assert not copy.startswith(str(tmp_path / "site"))
    with open(copy, "rb") as f:
        assert stack_flags(f.read()) == RW
    assert os.readlink(os.path.join(os.path.dirname(copy), "mnn.libs")) == str(tmp_path / "site" / "mnn.libs")
    assert patched_copy(source, str(tmp_path / "cache")) == copy  # reused
    assert [p for p in os.listdir(os.path.dirname(copy)) if p.startswith(".tmp")] == []


def test_patched_copy_is_rewritten_when_its_hash_is_wrong(tmp_path):
    source = fake_site(tmp_path, synthetic_elf())
    copy = patched_copy(source, str(tmp_path / "cache"))
    with open(copy, "wb") as f:
        f.write(synthetic_elf())  # a stale or tampered copy that still asks for an executable stack
    patched_copy(source, str(tmp_path / "cache"))
    with open(copy, "rb") as f:
        assert stack_flags(f.read()) == RW


def test_source_that_differs_from_its_record_is_refused(tmp_path):
    source = fake_site(tmp_path, synthetic_elf(), recorded=b"what the wheel shipped")
    with pytest.raises(ValueError, match="differs from its wheel's RECORD"):
        patched_copy(source, str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.so"))


@pytest.mark.parametrize("blocked", ["under_a_file", "read_only"])
def test_unwritable_cache_error_names_the_fix(tmp_path, monkeypatch, blocked):
    source = fake_site(tmp_path, synthetic_elf())
    monkeypatch.syspath_prepend(os.path.dirname(source))
    if blocked == "under_a_file":
        (tmp_path / "file").write_text("")
        root = tmp_path / "file" / "cache"  # NotADirectoryError even for root
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only directories")
        root = tmp_path / "ro"
        root.mkdir(mode=0o500)
    with pytest.raises(EdgeRuntimeError) as e:
        import_patched("_fakeengine", str(root))
    message = str(e.value)
    assert "\n" not in message and TUNABLE_FIX in message and "EDGEPORT_CACHE" in message
    assert "glibc.rtld.execstack=2" in message


def test_mnn_not_installed_is_told_apart(monkeypatch):
    monkeypatch.setitem(sys.modules, "MNN", None)  # import MNN → ModuleNotFoundError(name="MNN")
    with pytest.raises(EdgeRuntimeError, match="MNN is not installed"):
        import_mnn()


def test_the_real_mnn_runs_from_a_patched_copy(tmp_path):
    """The installed MNN's _mnncengine, patched into a cache, imported in a fresh process: MNN computes with it and
    the installed files are byte-identical afterwards. (x86_64 wheels ask for an executable stack; any glibc
    loads the patched copy.)"""
    pytest.importorskip("MNN")
    code = f"""
import sys
from runtime.mnn_import import import_patched
engine = import_patched("_mnncengine", {str(tmp_path)!r})
import MNN
assert sys.modules["_mnncengine"] is engine and engine.__file__.startswith({str(tmp_path)!r}), engine.__file__
x = MNN.expr.const([1.0, 2.0], [2])
print(float(MNN.expr.reduce_sum(x).read()))
"""
    origin = importlib.util.find_spec("_mnncengine").origin
    before = snapshot(origin)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "3.0"
    assert snapshot(origin) == before


@pytest.mark.slow
def test_debian13_userlands():
    """make debian13: the runtime under Debian 13's glibc 2.41 and CPython 3.13 (x86_64 native, aarch64 qemu)."""
    cache = os.path.join(REPO, ".cache", "debian13")
    models = os.path.join(REPO, "artifacts", "fasternet_t0")
    dirs = [os.path.join(models, d) for d in sorted(os.listdir(models))] if os.path.isdir(models) else []
    dirs = [d for d in dirs if os.path.isfile(os.path.join(d, "model.fp16.mnn"))]
    if not os.path.isdir(os.path.join(cache, "amd64", "site")) or not dirs:
        pytest.skip("run make debian13-setup and make export MODEL=fasternet_t0 first")
    r = subprocess.run([sys.executable, "-m", "benchmarks.debian13.run", "--cache", cache, dirs[0]],
                       cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout + r.stderr
