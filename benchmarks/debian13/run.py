"""Run the runtime inside the Debian 13 userlands of setup.sh (x86_64 natively through trixie's own loader, aarch64
under qemu-user) and compare with the host.

  python -m benchmarks.debian13.run --cache .cache/debian13 MODEL_DIR [--arch amd64 arm64] [--n 50]

MODEL_DIR holds model.mnn, model.fp16.mnn and model.onnx (`python -m export fasternet_t0`). Per architecture:
the bare `import MNN` (shows whether glibc 2.41 refuses the wheel), the same with GLIBC_TUNABLES (the fix the
error message names), guest_check.py, `python -m runtime.infer` on the fp32 and fp16 files (top-1 against the
host's), a short `python -m benchmarks.runtime_bench`, and the sha256 of every installed MNN file before and after.
The guest starts from an empty environment (HOME, PATH, PYTHONPATH only) and an empty edgeport cache.
Writes CACHE/report.json; exit 1 if a top-1 differs, a check fails or an installed file changed.
"""
from __future__ import annotations

import argparse
import base64
import csv
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from export import targets

MNN_FILES = (targets.get("mnn_fp32").file, targets.get("mnn_fp16w").file)  # an fp32 and an fp16-weight file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
EXECSTACK_TUNABLE = "glibc.rtld.execstack=2"
EVAL_LIMIT = 40  # labelled digits evaluated by edgeport-eval from the board install (host and guest must agree)


def guest_command(cache: str, arch: str) -> list[str]:
    sysroot = os.path.join(cache, arch, "sysroot")
    python = os.path.join(sysroot, "usr/bin/python3.13")
    if arch == "amd64":  # trixie's own loader and libraries; the host's glibc is not involved
        return [os.path.join(sysroot, "lib64/ld-linux-x86-64.so.2"), "--library-path",
                os.path.join(sysroot, "usr/lib/x86_64-linux-gnu"), python]
    return ["qemu-aarch64", "-L", sysroot, python]


def guest_env(cache: str, arch: str, **extra: str) -> dict[str, str]:
    return {"HOME": os.path.join(cache, arch, "home"), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
            "PYTHONPATH": f"{REPO}:{os.path.join(cache, arch, 'site')}", **extra}


def board_wheel(cache: str) -> str:
    """runtime/ built as the board's distribution (runtime/pyproject.toml: edgeport-runtime → edgeport_runtime)."""
    out = os.path.join(cache, "board-wheel")
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:  # build from a copy: setuptools leaves build/ and egg-info behind
        src = os.path.join(tmp, "runtime")
        shutil.copytree(os.path.join(REPO, "runtime"), src, ignore=shutil.ignore_patterns("__pycache__", "build",
                                                                                            "*.egg-info"))
        r = run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
                 "--no-build-isolation", src, "-w", out])
    if r["rc"]:
        raise SystemExit(f"building the edgeport-runtime wheel failed: {last_line(r['stderr'])}")
    (wheel,) = glob.glob(os.path.join(out, "edgeport_runtime-*.whl"))
    return wheel


def install_board(cache: str, arch: str, wheel: str) -> str:
    """The wheel installed alone (its dependencies are the userland's site/): what `pip install` gives a board."""
    target = os.path.join(cache, arch, "board")
    shutil.rmtree(target, ignore_errors=True)
    r = run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--no-compile", "--target", target, wheel])
    if r["rc"]:
        raise SystemExit(f"installing {wheel} failed: {last_line(r['stderr'])}")
    return target


def run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 1800, cwd: str = REPO) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return {"rc": p.returncode, "seconds": round(time.perf_counter() - t0, 2), "stdout": p.stdout,
            "stderr": p.stderr}


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def mnn_files(site: str) -> dict[str, str]:
    """sha256 of every file MNN's wheel installed (from its RECORD), after checking them against the RECORD."""
    (record,) = glob.glob(os.path.join(site, "mnn-*.dist-info", "RECORD"))
    hashes = {}
    with open(record, newline="") as f:
        for row in csv.reader(f):
            path = os.path.normpath(os.path.join(site, row[0]))
            if not row[1] or not path.startswith(site) or not os.path.isfile(path):
                continue  # RECORD itself, and console scripts pip --target puts outside site
            with open(path, "rb") as g:
                digest = hashlib.sha256(g.read())
            recorded = row[1].split("=", 1)[1]
            if base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode() != recorded:
                raise SystemExit(f"{path} does not match MNN's RECORD: the installed package was modified")
            hashes[row[0]] = digest.hexdigest()
    return hashes


def top1(infer_json: str) -> dict:
    top = json.loads(infer_json)["results"][0]["topk"]
    return {"top1": top[0]["index"], "p1": round(top[0]["prob"], 5), "p2": round(top[1]["prob"], 5)}


def top1_counts(evaluate_json: str) -> dict:
    """What must agree between host and board: counts, and which class each wrong answer went to (the predictions,
    not only their tally)."""
    (f,) = json.loads(evaluate_json)["files"]
    return {"n": f["n"], "correct1": f["correct1"], "correct5": f["correct5"],
            "confused": sorted((c["true"], c["predicted"], c["count"]) for c in f["confused"])}


def check_arch(cache: str, arch: str, model_dir: str, image: str, host: dict, n: int, overhead: int,
               wheel: str, data: str) -> dict:
    site = os.path.join(cache, arch, "site")
    shutil.rmtree(os.path.join(cache, arch, "home"), ignore_errors=True)  # a board that never ran us
    before = mnn_files(site)
    g, env = guest_command(cache, arch), guest_env(cache, arch)
    out: dict = {"command": " ".join(g)}
    say = lambda msg: print(f"[debian13 {arch}] {msg}", flush=True)  # noqa: E731
    bare = run(g + ["-c", "import MNN"], env)
    out["bare_import_mnn"] = {"rc": bare["rc"], "seconds": bare["seconds"], "error": last_line(bare["stderr"])}
    say(f"bare `import MNN`: rc={bare['rc']} {last_line(bare['stderr'])}")
    tun = run(g + ["-c", "import MNN"], guest_env(cache, arch, GLIBC_TUNABLES=EXECSTACK_TUNABLE))
    out["bare_import_mnn_with_tunable"] = {"rc": tun["rc"], "error": last_line(tun["stderr"])}
    say(f"with GLIBC_TUNABLES={EXECSTACK_TUNABLE}: rc={tun['rc']}")
    chk = run(g + [os.path.join(HERE, "guest_check.py"), model_dir, image] + (["--onnx"] if arch == "amd64" else []),
              env)
    try:
        out["guest_check"] = json.loads(chk["stdout"])
    except json.JSONDecodeError:
        out["guest_check"] = {"failures": ["guest_check crashed"], "stderr": chk["stderr"][-2000:]}
    out["guest_check"]["seconds"] = chk["seconds"]
    say(f"guest_check: failures={out['guest_check']['failures']} ({chk['seconds']} s)")
    out["infer"] = {}
    for name in MNN_FILES:
        r = run(g + ["-m", "runtime.infer", os.path.join(model_dir, name), image, "--topk", "2", "--json"], env)
        got = top1(r["stdout"]) if r["rc"] == 0 else {"error": last_line(r["stderr"])}
        out["infer"][name] = {**got, "rc": r["rc"], "seconds": r["seconds"], "host": host[name],
                              "same_top1": got.get("top1") == host[name]["top1"]}
        say(f"runtime.infer {name}: {got} host {host[name]} ({r['seconds']} s)")
    board = install_board(cache, arch, wheel)
    r = run(g + ["-m", "edgeport_runtime.infer", os.path.join(model_dir, MNN_FILES[0]), image, "--topk", "2", "--json"],
            {**env, "PYTHONPATH": f"{board}:{site}"}, cwd=board)  # no repository on the path: the board install alone
    got = top1(r["stdout"]) if r["rc"] == 0 else {"error": last_line(r["stderr"])}
    out["board_install"] = {**got, "rc": r["rc"], "seconds": r["seconds"], "modules": sorted(os.listdir(board)),
                            "same_top1": got.get("top1") == host[MNN_FILES[0]]["top1"]}
    say(f"board install: python -m edgeport_runtime.infer {MNN_FILES[0]}: {got} ({r['seconds']} s)")
    r = run(g + ["-m", "edgeport_runtime.evaluate", os.path.join(model_dir, MNN_FILES[0]), "--data", data,
                 "--limit", str(EVAL_LIMIT), "--json"], {**env, "PYTHONPATH": f"{board}:{site}"}, cwd=board)
    got = top1_counts(r["stdout"]) if r["rc"] == 0 else {"error": last_line(r["stderr"])}
    out["board_evaluate"] = {**got, "rc": r["rc"], "seconds": r["seconds"], "host": host["evaluate"],
                             "same_counts": got == host["evaluate"]}
    say(f"board install: python -m edgeport_runtime.evaluate --limit {EVAL_LIMIT}: {got} host {host['evaluate']}")
    r = run(g + ["-m", "benchmarks.runtime_bench", os.path.join(model_dir, MNN_FILES[0]), "--n", str(n),
                 "--overhead-runs", str(overhead), "--json"], env)
    out["runtime_bench"] = json.loads(r["stdout"]) if r["rc"] == 0 else {"error": r["stderr"][-2000:]}
    out["runtime_bench"]["rc"], out["runtime_bench"]["seconds"] = r["rc"], r["seconds"]
    say(f"runtime_bench --n {n}: rc={r['rc']} ({r['seconds']} s)")
    after = mnn_files(site)
    out["mnn_files"] = {"count": len(before), "byte_identical": before == after,
                        "sha256": {k: v for k, v in before.items() if k.endswith(".so") or ".so." in k}}
    cache_dir = os.path.join(cache, arch, "home", ".cache", "edgeport")
    out["edgeport_cache"] = sorted(os.path.relpath(p, cache_dir) for p in glob.glob(os.path.join(cache_dir, "*/*")))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="an export directory (python -m export fasternet_t0)")
    p.add_argument("--cache", default=".cache/debian13", help="setup.sh's CACHE_DIR")
    p.add_argument("--arch", nargs="+", default=["amd64", "arm64"], choices=("amd64", "arm64"))
    p.add_argument("--image", help="default: CACHE/image.png")
    p.add_argument("--n", type=int, default=50, help="runtime_bench inferences (default: 50)")
    p.add_argument("--overhead-runs", type=int, default=10,
                   help="runtime_bench wrapper-overhead runs (default: 10; each is two forwards, slow under qemu)")
    args = p.parse_args(argv)
    cache, model_dir = os.path.abspath(args.cache), os.path.abspath(args.model_dir)
    image = os.path.abspath(args.image or os.path.join(cache, "image.png"))
    for name in MNN_FILES:
        if not os.path.isfile(os.path.join(model_dir, name)):
            print(f"error: {model_dir}/{name} missing; run python -m export fasternet_t0 --out DIR", file=sys.stderr)
            return 2
    if not os.path.isdir(os.path.join(cache, "amd64", "site")):
        print(f"error: no userland under {cache}; run make debian13-setup", file=sys.stderr)
        return 2
    host = {}
    for name in MNN_FILES:
        r = run([sys.executable, "-m", "runtime.infer", os.path.join(model_dir, name), image, "--topk", "2",
                 "--json"])
        if r["rc"]:
            print(f"error: host runtime.infer failed: {last_line(r['stderr'])}", file=sys.stderr)
            return 2
        host[name] = top1(r["stdout"])
    from models.digits import make_imagefolder  # a labelled tree (scikit-learn's digits), made on the host

    data = str(make_imagefolder(os.path.join(cache, "digits")) / "val")
    r = run([sys.executable, "-m", "runtime.evaluate", os.path.join(model_dir, MNN_FILES[0]), "--data", data,
             "--limit", str(EVAL_LIMIT), "--json"])
    if r["rc"]:
        print(f"error: host runtime.evaluate failed: {last_line(r['stderr'])}", file=sys.stderr)
        return 2
    host["evaluate"] = top1_counts(r["stdout"])
    report = {"host": {"python": sys.version.split()[0], "glibc": os.confstr("CS_GNU_LIBC_VERSION"),
                       "infer": host}, "model_dir": model_dir, "image": image}
    failed, wheel = [], board_wheel(cache)
    for arch in args.arch:
        t0 = time.perf_counter()
        r = report[arch] = check_arch(cache, arch, model_dir, image, host, args.n, args.overhead_runs, wheel, data)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        if r["guest_check"]["failures"]:
            failed.append(f"{arch}: checks {r['guest_check']['failures']}")
        failed += [f"{arch}: {k} top-1 {v.get('top1')} != host {v['host']['top1']}"
                   for k, v in r["infer"].items() if not v["same_top1"]]
        if not r["board_install"]["same_top1"]:
            failed.append(f"{arch}: board install top-1 {r['board_install'].get('top1')}")
        if not r["board_evaluate"].get("same_counts"):
            failed.append(f"{arch}: board edgeport-eval {r['board_evaluate']} != host {host['evaluate']}")
        if not r["mnn_files"]["byte_identical"]:
            failed.append(f"{arch}: installed MNN files changed")
        if r["runtime_bench"]["rc"]:
            failed.append(f"{arch}: runtime_bench failed")
    with open(os.path.join(cache, "report.json.tmp"), "w") as f:
        json.dump(report, f, indent=1)
    os.replace(os.path.join(cache, "report.json.tmp"), os.path.join(cache, "report.json"))
    print(f"report: {os.path.join(cache, 'report.json')}")
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
