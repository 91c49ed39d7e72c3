"""Which machine a timing came from, and the board-results JSON contract (schema "edgeport.board-results").

`fingerprint()` describes the CPU as Linux reports it: model, on ARM the core names decoded from the MIDR
(/proc/cpuinfo "CPU implementer" + "CPU part"), ISA features, clusters (CPUs sharing a max frequency) with
their governor, OS, glibc, Python, engine versions, and whether the process runs under emulation.

Emulation (qemu-user) is detected from what it cannot hide, any one of:
  - the userland's architecture (os.uname/platform.machine, reported by qemu as the guest's) disagrees with
    the ISA /proc/cpuinfo describes (qemu-user passes the host's x86 /proc/cpuinfo through: "flags",
    "vendor_id"), or /proc/cpuinfo is missing on an ARM userland (some qemu versions hide it);
  - an aarch64 userland whose /proc/cpuinfo has a "model name: ARMv8 Processor ..." line: qemu-user >= 8
    synthesises a cpuinfo for the emulated CPU (its MIDR, e.g. Cortex-A76) in the 32-bit format, while arm64
    kernels print "model name" only to 32-bit (compat) processes;
  - the process's kernel name (/proc/self/comm, which qemu-user does not emulate) is qemu's, e.g. qemu-aarch64
    (run as `qemu-aarch64 python3 ...`; under binfmt_misc the kernel names it after the guest's program);
  - QEMU_* variables in the environment (QEMU_CPU, QEMU_LD_PREFIX, ... as qemu-user and binfmt wrappers set);
  - "qemu" in /proc/self/maps or in the auxiliary vector's AT_PLATFORM/execfn (older qemu leaks its own maps).
EDGEPORT_EMULATED=1 forces it (e.g. a VM with a virtual CPU), =0 clears it.

The results file is declared ONCE, below, as msgspec Structs; `write_results` and `read_results` both go
through them (a file another tool wrote is validated field by field).
"""
from __future__ import annotations

import os
import platform
import re
import time
from importlib import metadata
from pathlib import Path

import msgspec

from .atomic import write_atomic
from .documents import check_document, decode_json, read_bytes
from .errors import EdgeRuntimeError

SCHEMA_NAME = "edgeport.board-results"
SCHEMA_VERSION = 1
MAX_RESULTS_BYTES = 16 << 20  # a results file is tens of kB; this keeps /dev/zero or a video from being read

# MIDR implementer → {part: core name} (Linux arch/arm64/include/asm/cputype.h; Arm TRMs).
ARM_CORES = {
    0x41: {  # Arm Ltd
        0xd03: "Cortex-A53", 0xd04: "Cortex-A35", 0xd05: "Cortex-A55", 0xd07: "Cortex-A57",
        0xd08: "Cortex-A72", 0xd09: "Cortex-A73", 0xd0a: "Cortex-A75", 0xd0b: "Cortex-A76",
        0xd0c: "Neoverse-N1", 0xd0d: "Cortex-A77", 0xd0e: "Cortex-A76AE", 0xd40: "Neoverse-V1",
        0xd41: "Cortex-A78", 0xd42: "Cortex-A78AE", 0xd44: "Cortex-X1", 0xd46: "Cortex-A510",
        0xd47: "Cortex-A710", 0xd48: "Cortex-X2", 0xd49: "Neoverse-N2", 0xd4a: "Neoverse-E1",
        0xd4b: "Cortex-A78C", 0xd4d: "Cortex-A715", 0xd4e: "Cortex-X3", 0xd4f: "Neoverse-V2",
        0xd80: "Cortex-A520", 0xd81: "Cortex-A720", 0xd82: "Cortex-X4", 0xd85: "Cortex-X925",
        0xd87: "Cortex-A725", 0xd8e: "Neoverse-N3",
    },
    0x51: {0x800: "Kryo 2xx Gold", 0x801: "Kryo 2xx Silver", 0x802: "Kryo 3xx Gold", 0x803: "Kryo 3xx Silver",
           0x804: "Kryo 4xx Gold", 0x805: "Kryo 4xx Silver", 0xc00: "Falkor", 0x001: "Oryon"},  # Qualcomm
    0x61: {0x022: "Apple M1 Icestorm", 0x023: "Apple M1 Firestorm", 0x032: "Apple M2 Blizzard",
           0x033: "Apple M2 Avalanche"},
    0x48: {0xd01: "HiSilicon TaiShan v110"},
    0xc0: {0xac3: "Ampere-1", 0xac4: "Ampere-1A"},
}
IMPLEMENTERS = {0x41: "Arm", 0x42: "Broadcom", 0x43: "Cavium", 0x48: "HiSilicon", 0x4e: "NVIDIA",
                0x51: "Qualcomm", 0x61: "Apple", 0xc0: "Ampere"}
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile",  # x86
             "asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2")  # arm
ENGINE_PACKAGES = {"mnn": "MNN", "onnxruntime": "onnxruntime", "openvino": "openvino", "numpy": "numpy"}
ARM_MACHINES = ("aarch64", "arm64", "armv7l", "armv8l")
SYSFS_CPU = Path("/sys/devices/system/cpu")


# ---- the contract -------------------------------------------------------------------------------------------
class Schema(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    version: int


class Cluster(msgspec.Struct):
    cpus: list[int]                 # logical CPU numbers
    core: str                       # decoded core name (ARM), else the CPU model
    max_mhz: float | None = None    # cpuinfo_max_freq
    governor: str | None = None     # scaling_governor


class Device(msgspec.Struct):
    emulated: bool
    machine: str                    # platform.machine(): aarch64, x86_64, ...
    cpu_model: str
    cores: list[str]                # one name per logical CPU (ARM: from the MIDR)
    isa: list[str]                  # the ISA_FLAGS the CPU reports
    cpus: int
    clusters: list[Cluster]
    os: str
    kernel: str
    glibc: str | None
    python: str
    engines: dict[str, str]         # package → version ("not installed" left out)
    emulation_evidence: str | None = None
    hostname: str = ""


class Result(msgspec.Struct):
    form: str                       # e.g. split_cat-fc
    target: str                     # export target, e.g. mnn_fp16w_low ("" for a plain file)
    file: str                       # path inside the bundle (or as given)
    engine: str                     # mnn | onnxruntime | openvino
    precision: str                  # fp32 | low
    median_ms: float
    p10_ms: float
    p90_ms: float
    ratio_to_baseline: float | None  # median of per-round ratios to the baseline form's same target/engine
    ratio_p10: float | None = None
    ratio_p90: float | None = None
    baseline: bool = False          # this entry is the fc baseline itself
    gate: str = "unchecked"         # the bundle's gate status of this target: passed | failed | unchecked
    rounds: int = 0
    load_ms: float = 0.0
    first_ms: float = 0.0           # first inference after load (allocation, kernel selection)
    rss_load_mb: float = 0.0        # resident memory added by loading it
    sha256: str = ""


class Drift(msgspec.Struct):
    first_ms: float                 # median over the first rounds of every entry, summed
    last_ms: float                  # same, last rounds
    ratio: float                    # last / first: > 1.05 suggests throttling
    freq_mhz_start: dict[str, float] = {}   # cpu → scaling_cur_freq at the start (where readable)
    freq_mhz_end: dict[str, float] = {}
    temp_c_start: float | None = None        # hottest thermal zone
    temp_c_end: float | None = None


class Run(msgspec.Struct):
    threads: int
    cores: list[int]                # CPU affinity the timings ran on
    rounds: int                     # rounds done (budget may stop early)
    warmup: int
    budget_s: float | None
    seconds: float
    peak_rss_mb: float
    date: str
    bundle: str = ""
    model: str = ""
    baseline_form: str = ""


class BoardResults(msgspec.Struct):
    schema: Schema
    device: Device
    run: Run
    results: list[Result]
    drift: Drift | None = None


def new_schema() -> Schema:
    return Schema(SCHEMA_NAME, SCHEMA_VERSION)


def write_results(path, results: BoardResults) -> Path:
    return write_atomic(path, msgspec.json.format(msgspec.json.encode(results), indent=2) + b"\n")


def read_results(path) -> BoardResults:
    """A results file, validated: EdgeRuntimeError (one line naming the file and the field) on anything else."""
    what, fix = f"board results {os.fspath(path)}", "make it with edgeport-bench --json"
    raw = decode_json(read_bytes(path, "board results", MAX_RESULTS_BYTES), what, fix)
    schema = check_document(raw, _SchemaOnly, what, fix).schema  # the version first: its fields may differ
    if schema.name != SCHEMA_NAME or schema.version != SCHEMA_VERSION:
        raise EdgeRuntimeError(f"{os.fspath(path)}: schema {schema.name} v{schema.version}; this edgeport reads "
                               f"{SCHEMA_NAME} v{SCHEMA_VERSION} (re-run edgeport-bench of this version)")
    return check_document(raw, BoardResults, what, fix)


class _SchemaOnly(msgspec.Struct):
    schema: Schema


# ---- the fingerprint ----------------------------------------------------------------------------------------
def _read(path, default=None):
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return default


def cpuinfo_blocks(text: str | None = None) -> list[dict[str, str]]:
    """/proc/cpuinfo as one {key: value} per processor block (plus any trailing global block)."""
    text = _read("/proc/cpuinfo", "") if text is None else text
    blocks, current = [], {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
            current = {}
            continue
        key, _, value = line.partition(":")
        current[key.strip()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def arm_core_name(implementer: str | int, part: str | int) -> str:
    """MIDR implementer + part number → "Cortex-A76"; unknown ones → "Arm part 0xd99" style names."""
    imp = int(implementer, 0) if isinstance(implementer, str) else implementer
    num = int(part, 0) if isinstance(part, str) else part
    name = ARM_CORES.get(imp, {}).get(num)
    return name or f"{IMPLEMENTERS.get(imp, f'implementer {imp:#x}')} part {num:#05x}"


def core_names(blocks: list[dict[str, str]]) -> dict[int, str]:
    """{cpu: core name}: ARM's MIDR decoded per processor, else the "model name" line."""
    names = {}
    for block in blocks:
        if "processor" not in block or not block["processor"].isdigit():
            continue
        cpu = int(block["processor"])
        if "CPU part" in block and "CPU implementer" in block:
            try:
                names[cpu] = arm_core_name(block["CPU implementer"], block["CPU part"])
                continue
            except ValueError:
                pass
        names[cpu] = block.get("model name") or block.get("cpu model") or ""
    return names


def cpu_freq_mhz(cpu: int, which: str = "cpuinfo_max_freq") -> float | None:
    text = _read(SYSFS_CPU / f"cpu{cpu}" / "cpufreq" / which)
    return round(int(text) / 1000, 1) if text and text.isdigit() else None


def online_cpus() -> list[int]:
    text = _read(SYSFS_CPU / "online")
    if text:
        return parse_cpu_list(text)
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def parse_cpu_list(text: str) -> list[int]:
    """"0-3,6" → [0, 1, 2, 3, 6]."""
    cpus = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if lo.isdigit():
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def clusters(names: dict[int, str] | None = None) -> list[Cluster]:
    """CPUs grouped by (core name, max frequency), fastest first: a big.LITTLE board gives two or three."""
    names = core_names(cpuinfo_blocks()) if names is None else names
    groups: dict[tuple, list[int]] = {}
    for cpu in online_cpus():
        groups.setdefault((names.get(cpu, ""), cpu_freq_mhz(cpu)), []).append(cpu)
    out = [Cluster(cpus=cpus, core=core, max_mhz=mhz,
                   governor=_read(SYSFS_CPU / f"cpu{cpus[0]}" / "cpufreq" / "scaling_governor"))
           for (core, mhz), cpus in groups.items()]
    return sorted(out, key=lambda c: (-(c.max_mhz or 0), c.cpus[0]))


def fastest_cluster_cpus() -> list[int]:
    """The CPUs of the fastest cluster (by cpuinfo_max_freq) that this process may run on; all of them on a
    CPU without cpufreq (VMs, x86 servers report one cluster)."""
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = set(range(os.cpu_count() or 1))
    for cluster in clusters():
        usable = [c for c in cluster.cpus if c in allowed]
        if usable:
            return usable
    return sorted(allowed)


def emulation_evidence(machine: str | None = None, blocks: list[dict[str, str]] | None = None,
                       environ=None, maps: str | None = None, comm: str | None = None) -> str | None:
    """Why this process looks emulated (see the module docstring), or None."""
    environ = os.environ if environ is None else environ
    forced = environ.get("EDGEPORT_EMULATED")
    if forced in ("0", "1"):
        return "EDGEPORT_EMULATED=1" if forced == "1" else None
    machine = (machine or platform.machine()).lower()
    blocks = cpuinfo_blocks() if blocks is None else blocks
    keys = {k for b in blocks for k in b}
    arm_userland = machine in ARM_MACHINES
    if arm_userland and ("flags" in keys or "vendor_id" in keys):
        return f"{machine} userland on a CPU /proc/cpuinfo describes as x86 (qemu-user passes the host's through)"
    if not arm_userland and machine in ("x86_64", "i686", "amd64") and "CPU part" in keys:
        return f"{machine} userland on a CPU /proc/cpuinfo describes as ARM"
    if arm_userland and not blocks:
        return f"{machine} userland without /proc/cpuinfo (qemu-user hides it)"
    if machine in ("aarch64", "arm64") and any(b.get("model name", "").startswith("ARMv8 Processor") for b in blocks):
        return (f"{machine} userland with a 32-bit style /proc/cpuinfo 'model name' (qemu-user synthesises it; "
                "arm64 kernels print it only to 32-bit processes)")
    comm = _read("/proc/self/comm", "") if comm is None else comm
    if comm.startswith("qemu-"):
        return f"process named {comm.strip()} (/proc/self/comm)"
    qemu_vars = sorted(k for k in environ if k.startswith("QEMU_"))
    if qemu_vars:
        return f"environment has {', '.join(qemu_vars)}"
    maps = _read("/proc/self/maps", "") if maps is None else maps
    if "qemu" in maps.lower():
        return "qemu mapped in /proc/self/maps"
    return None


def isa_flags(blocks: list[dict[str, str]]) -> list[str]:
    flags = set()
    for block in blocks:
        for key in ("flags", "Features"):
            flags.update(block.get(key, "").split())
    return [f for f in ISA_FLAGS if f in flags]


def engine_versions() -> dict[str, str]:
    versions = {}
    for key, package in ENGINE_PACKAGES.items():
        try:
            versions[key] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def os_name() -> str:
    text = _read("/etc/os-release", "")
    match = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', text, re.M)
    return match.group(1) if match else f"{platform.system()} {platform.release()}"


def fingerprint() -> Device:
    blocks = cpuinfo_blocks()
    names = core_names(blocks)
    machine = platform.machine()
    model = next((b[k] for b in blocks for k in ("model name", "Hardware", "cpu model") if b.get(k)), "")
    if not model and names:  # ARM boards often have no "model name": summarise the decoded cores
        counts: dict[str, int] = {}
        for name in names.values():
            counts[name] = counts.get(name, 0) + 1
        model = " + ".join(f"{n}× {name}" for name, n in counts.items())
    evidence = emulation_evidence(machine, blocks)
    libc, libc_version = platform.libc_ver()
    return Device(
        emulated=evidence is not None, emulation_evidence=evidence, machine=machine,
        cpu_model=model or platform.processor() or machine, cores=[names[c] for c in sorted(names)],
        isa=isa_flags(blocks), cpus=os.cpu_count() or 1, clusters=clusters(names), os=os_name(),
        kernel=platform.release(), glibc=libc_version if libc == "glibc" else None,
        python=platform.python_version(), engines=engine_versions(), hostname=platform.node())


def cpu_state() -> tuple[dict[str, float], float | None]:
    """({cpu: current MHz}, hottest thermal zone °C) from sysfs, where readable: drift is visible in both."""
    freqs = {str(c): f for c in online_cpus() if (f := cpu_freq_mhz(c, "scaling_cur_freq")) is not None}
    temps = []
    for zone in Path("/sys/class/thermal").glob("thermal_zone*"):
        text = _read(zone / "temp")
        if text and text.lstrip("-").isdigit():
            temps.append(int(text) / 1000)
    return freqs, (max(temps) if temps else None)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def describe(device: Device) -> str:
    """One line for consoles and reports: "Cortex-A76 ×4 @ 2400 MHz (aarch64, asimdhp asimddp), emulated"."""
    parts = [", ".join(f"{c.core} ×{len(c.cpus)}" + (f" @ {c.max_mhz:.0f} MHz" if c.max_mhz else "")
                       for c in device.clusters) or device.cpu_model]
    parts.append(f"({device.machine}" + (f", {' '.join(device.isa)}" if device.isa else "") + ")")
    if device.emulated:
        parts.append("EMULATED")
    return " ".join(parts)
