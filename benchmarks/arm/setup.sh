#!/usr/bin/env bash
# Build the aarch64 guest environment used by `make arm` / `make arm-cost`, from Debian's archive and the
# Python package registry only.  Idempotent: every step is skipped when its output is already in place.
#
#   setup.sh CACHE_DIR HOST_PYTHON [--counting]
#
# CACHE_DIR/
#   apt/       private APT configuration, lists and archives (APT::Architecture arm64; the host's dpkg is untouched)
#   sysroot/   arm64 .debs unpacked with `dpkg -x`: glibc, libstdc++, CPython 3.11  (qemu-aarch64 -L sysroot)
#   site/      MNN + numpy + onnxruntime aarch64 wheels installed with pip --target (the guest's PYTHONPATH)
#   plugin/    qemu-plugin.h (from Debian's qemu source package) and libinsncount.so, for the host's qemu (MNN)
#   apt-trixie/  private APT configuration for Debian 13 (trixie), amd64 + deb-src
#   qemu10/    trixie's qemu-user .deb unpacked: static qemu-aarch64 10.0, no plugins (onnxruntime's parity)
#   qemu-count/  --counting only: qemu-aarch64 10.0 built from trixie's source with TCG plugins, its qemu-plugin.h
#              and libinsncount.so (onnxruntime's instruction counts); built once (~15-30 min), then kept
#   versions.json  qemu, glibc, Python, MNN, numpy and onnxruntime versions as seen by the guest
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../private_apt.sh"

CACHE=$(realpath -m "${1:?usage: setup.sh CACHE_DIR HOST_PYTHON}")
HOST_PY=${2:?usage: setup.sh CACHE_DIR HOST_PYTHON [--counting]}
BUILD_COUNTING=0
[ "${3:-}" = --counting ] && BUILD_COUNTING=1
HERE=$(cd "$(dirname "$0")" && pwd)
MNN_VERSION=3.6.1
NUMPY_VERSION=2.4.6
ORT_VERSION=1.32.0
DEBS="libc6 libgcc-s1 libstdc++6 zlib1g libexpat1 libffi8 python3.11-minimal libpython3.11-minimal libpython3.11-stdlib"
APT_HOST=(apt-get -q -o DPkg::Lock::Timeout=600)

say() { printf "[arm-setup %3ds] %s\n" "$SECONDS" "$*"; }
die() { printf '[arm-setup] error: %s\n' "$*" >&2; exit 2; }
mkdir -p "$CACHE"

# 1. Host tools: qemu-user (root installs it; only done when missing), gcc for the plugin.
missing=()
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
command -v gcc >/dev/null || missing+=(gcc)
command -v xz >/dev/null || missing+=(xz-utils)
if ((${#missing[@]})); then
    [ "$(id -u)" = 0 ] || die "${missing[*]} missing; run: sudo apt-get update && sudo apt-get install ${missing[*]}"
    say "installing host packages: ${missing[*]}"
    "${APT_HOST[@]}" update
    DEBIAN_FRONTEND=noninteractive "${APT_HOST[@]}" install -y --no-install-recommends "${missing[@]}"
fi
say "host: $(qemu-aarch64 --version | head -1)"

# 2. Private APT configuration: the host's Debian sources, read as an arm64 machine.
APT=$CACHE/apt
export APT_CONFIG=$APT/apt.conf
debian_sources() {
    apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 'Identifier: Packages' 'Origin: Debian' |
        sort -u
}
if [ ! -s "$APT/lists.ok" ]; then
    mkdir -p "$APT"/{lists/partial,archives/partial,parts,prefs}
    src=$(APT_CONFIG=/dev/null debian_sources)
    if [ -z "$src" ]; then
        say "no Debian package lists on the host yet; running apt-get update"
        APT_CONFIG=/dev/null "${APT_HOST[@]}" update >/dev/null
        src=$(APT_CONFIG=/dev/null debian_sources)
    fi
    [ -n "$src" ] || die "no Debian archive in the host's APT sources; add one to /etc/apt/sources.list.d"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    : >"$APT/sources.list"
    while read -r uri release component; do
        printf 'deb [signed-by=%s] %s %s %s\ndeb-src [signed-by=%s] %s %s %s\n' \
            "$keyring" "$uri" "$release" "$component" "$keyring" "$uri" "$release" "$component" >>"$APT/sources.list"
    done <<<"$src"
    write_apt_conf "$APT" arm64 "arm64"
    say "apt-get update (private arm64 lists under $APT)"
    apt-get -q update | sed 's/^/    /'
    date -u +%FT%TZ >"$APT/lists.ok"
fi

# 3. arm64 sysroot: glibc + CPython 3.11, unpacked without dpkg's database.
SYSROOT=$CACHE/sysroot
if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
    DEBDIR=$APT/debs
    mkdir -p "$DEBDIR"
    say "downloading arm64 packages: $DEBS"
    # shellcheck disable=SC2086
    (cd "$DEBDIR" && apt-get -q download $DEBS | sed 's/^/    /')
    tmp=$(mktemp -d "$CACHE/sysroot.tmp.XXXX")
    for pkg in $DEBS; do
        deb=$(ls -t "$DEBDIR/${pkg}_"*_arm64.deb | head -1)
        dpkg -x "$deb" "$tmp"
    done
    rm -rf "$SYSROOT" && mv "$tmp" "$SYSROOT"
    say "sysroot ready: $(du -sh "$SYSROOT" | cut -f1)"
fi

# 4. Guest site-packages: aarch64 wheels, kept apart from the host's environment.
SITE=$CACHE/site
stamp=".ok-$MNN_VERSION-$NUMPY_VERSION-$ORT_VERSION"
if [ ! -f "$SITE/$stamp" ]; then
    say "installing MNN==$MNN_VERSION numpy==$NUMPY_VERSION onnxruntime==$ORT_VERSION (aarch64 cp311 wheels) into $SITE"
    tmp=$(mktemp -d "$CACHE/site.tmp.XXXX")
    "$HOST_PY" -m pip install --quiet --disable-pip-version-check --no-compile \
        --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
        --python-version 3.11 --implementation cp --only-binary=:all: --target "$tmp" \
        "MNN==$MNN_VERSION" "numpy==$NUMPY_VERSION" "onnxruntime==$ORT_VERSION"
    touch "$tmp/$stamp"
    rm -rf "$SITE" && mv "$tmp" "$SITE"
fi

# 5. TCG plugin: qemu-plugin.h comes from Debian's source package of the installed qemu (Debian ships no
#    plugins and no plugin header); only that one file is kept.
PLUGIN=$CACHE/plugin
mkdir -p "$PLUGIN"
if [ ! -f "$PLUGIN/qemu-plugin.h" ]; then
    srcver=$(dpkg-query -W -f='${source:Version}' qemu-user 2>/dev/null || true)
    srcpkg=$(dpkg-query -W -f='${source:Package}' qemu-user 2>/dev/null || echo qemu)
    say "fetching qemu-plugin.h from Debian source package $srcpkg ${srcver:-(candidate)}"
    tmp=$(mktemp -d "$CACHE/qemu-src.tmp.XXXX")
    (cd "$tmp" && apt-get -q source --download-only "$srcpkg${srcver:+=$srcver}" | sed 's/^/    /') ||
        (cd "$tmp" && apt-get -q source --download-only "$srcpkg" | sed 's/^/    /')
    orig=$(ls "$tmp"/*.orig.tar.* | head -1)
    tar -xf "$orig" -C "$tmp" --wildcards '*/include/qemu/qemu-plugin.h'
    cp "$(find "$tmp" -path '*/include/qemu/qemu-plugin.h' | head -1)" "$PLUGIN/qemu-plugin.h.tmp"
    mv "$PLUGIN/qemu-plugin.h.tmp" "$PLUGIN/qemu-plugin.h"
    rm -rf "$tmp"
fi
if [ ! -f "$PLUGIN/libinsncount.so" ] || [ "$HERE/insncount.c" -nt "$PLUGIN/libinsncount.so" ]; then
    say "building TCG plugin libinsncount.so"
    gcc -O2 -shared -fPIC -Wall -I"$PLUGIN" \
        -o "$PLUGIN/libinsncount.so.tmp" "$HERE/insncount.c"
    mv "$PLUGIN/libinsncount.so.tmp" "$PLUGIN/libinsncount.so"
fi

# 6. qemu 10 for onnxruntime: ORT's aarch64 wheel segfaults under Debian 12's qemu-user 7.2 with every -cpu and
#    runs under trixie's 10.0.  Trixie's qemu-user .deb ships static binaries (no plugin support): unpacked, it
#    runs the parity of ONNX files.  Its source package is what step 8 builds the counting qemu from.
TRIXIE=$CACHE/apt-trixie
if [ ! -s "$TRIXIE/lists.ok" ]; then
    mkdir -p "$TRIXIE"/{lists/partial,archives/partial,parts,prefs}
    host_release=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    src=$(env -u APT_CONFIG apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' \
        'Identifier: Packages' 'Origin: Debian' | sort -u)
    [ -n "$src" ] || src="http://deb.debian.org/debian/ trixie main"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    : >"$TRIXIE/sources.list"
    while read -r uri release component; do
        [ -n "$host_release" ] && release=${release/#$host_release/trixie}
        printf 'deb [signed-by=%s] %s %s %s\ndeb-src [signed-by=%s] %s %s %s\n' \
            "$keyring" "$uri" "$release" "$component" "$keyring" "$uri" "$release" "$component" >>"$TRIXIE/sources.list"
    done <<<"$src"
    write_apt_conf "$TRIXIE" amd64 "amd64"
    say "apt-get update (private trixie lists under $TRIXIE)"
    APT_CONFIG=$TRIXIE/apt.conf apt-get -q update | sed 's/^/    /'
    date -u +%FT%TZ >"$TRIXIE/lists.ok"
fi
QEMU10=$CACHE/qemu10
if [ ! -x "$QEMU10/usr/bin/qemu-aarch64" ]; then
    say "downloading trixie's qemu-user (static qemu-aarch64 10.x, for onnxruntime's parity)"
    tmp=$(mktemp -d "$CACHE/qemu10.tmp.XXXX")
    (cd "$tmp" && APT_CONFIG=$TRIXIE/apt.conf apt-get -q download qemu-user:amd64 | sed 's/^/    /')
    dpkg -x "$(ls "$tmp"/qemu-user_*_amd64.deb | head -1)" "$tmp/root"
    [ -x "$tmp/root/usr/bin/qemu-aarch64" ] || die "trixie's qemu-user has no usr/bin/qemu-aarch64"
    rm -rf "$QEMU10" && mv "$tmp/root" "$QEMU10" && rm -rf "$tmp"
fi
say "qemu for onnxruntime: $("$QEMU10/usr/bin/qemu-aarch64" --version | head -1)"

# 7. The counting qemu (`setup.sh ... --counting`, i.e. `make arm-setup`): user-mode aarch64 only, with TCG plugin
#    support, built once from trixie's qemu source package (Debian's patches applied) and kept under qemu-count/.
#    Needs glib's headers (installed as root when missing) and meson >= 1.5 (PyPI, in a build venv: Debian's
#    repacked source drops qemu's bundled meson wheel).  ~15-30 min of compiling on 2 cores, once.
COUNT=$CACHE/qemu-count
if [ "$BUILD_COUNTING" = 1 ] && [ ! -x "$COUNT/bin/qemu-aarch64" ]; then
    if ! pkg-config --exists glib-2.0 || ! command -v ninja >/dev/null || ! command -v dpkg-source >/dev/null; then
        [ "$(id -u)" = 0 ] || die "building qemu needs libglib2.0-dev ninja-build dpkg-dev; run: sudo apt-get install libglib2.0-dev ninja-build dpkg-dev"
        say "installing host packages: libglib2.0-dev ninja-build dpkg-dev"
        "${APT_HOST[@]}" update >/dev/null
        DEBIAN_FRONTEND=noninteractive "${APT_HOST[@]}" install -y --no-install-recommends libglib2.0-dev ninja-build dpkg-dev
    fi
    BUILD=$CACHE/qemu-build
    rm -rf "$BUILD" && mkdir -p "$BUILD/src"
    say "fetching trixie's qemu source package"
    (cd "$BUILD/src" && APT_CONFIG=$TRIXIE/apt.conf apt-get -q source --download-only qemu | sed 's/^/    /')
    (cd "$BUILD/src" && dpkg-source --no-check -x ./*.dsc qemu >/dev/null)
    py=$(command -v /usr/bin/python3 || command -v python3)
    "$py" -m venv "$BUILD/venv"
    "$BUILD/venv/bin/pip" install --quiet --disable-pip-version-check "meson==1.5.0" "pycotap==1.3.1"
    say "configuring qemu $(cd "$BUILD/src/qemu" && dpkg-parsechangelog -S Version 2>/dev/null) (aarch64-linux-user, plugins)"
    mkdir -p "$BUILD/src/qemu/build"
    (cd "$BUILD/src/qemu/build" && ../configure --python="$BUILD/venv/bin/python" --prefix="$COUNT.tmp" \
        --target-list=aarch64-linux-user --enable-plugins --without-default-features --disable-docs \
        --disable-werror --disable-download --disable-install-blobs >"$BUILD/configure.log" 2>&1) ||
        die "qemu's configure failed; see $BUILD/configure.log"
    say "building qemu-aarch64 (nice -n 10 make -j2; log: $BUILD/make.log)"
    (cd "$BUILD/src/qemu/build" && nice -n 10 make -j2 qemu-aarch64 >"$BUILD/make.log" 2>&1) ||
        die "building qemu failed; see $BUILD/make.log"
    rm -rf "$COUNT.tmp" && mkdir -p "$COUNT.tmp/bin" "$COUNT.tmp/include"
    cp "$BUILD/src/qemu/build/qemu-aarch64" "$COUNT.tmp/bin/"
    cp "$BUILD/src/qemu/include/qemu/qemu-plugin.h" "$COUNT.tmp/include/"
    rm -rf "$COUNT" && mv "$COUNT.tmp" "$COUNT" && rm -rf "$BUILD"
fi
if [ -x "$COUNT/bin/qemu-aarch64" ]; then
    if [ ! -f "$COUNT/libinsncount.so" ] || [ "$HERE/insncount.c" -nt "$COUNT/libinsncount.so" ]; then
        say "building TCG plugin libinsncount.so for the counting qemu"
        gcc -O2 -shared -fPIC -Wall -I"$COUNT/include" $(pkg-config --cflags glib-2.0) \
            -o "$COUNT/libinsncount.so.tmp" "$HERE/insncount.c"
        mv "$COUNT/libinsncount.so.tmp" "$COUNT/libinsncount.so"
    fi
    say "counting qemu: $("$COUNT/bin/qemu-aarch64" --version | head -1)"
fi

# 8. Smoke test + versions, as the guest sees them. This first guest run also writes the .pyc caches of the
#    modules the guest imports (Debian's stdlib .debs ship none), so later runs start faster.
if [ ! -s "$CACHE/versions.json" ] || [ "$HERE/setup.sh" -nt "$CACHE/versions.json" ] ||
    [ "$COUNT/bin/qemu-aarch64" -nt "$CACHE/versions.json" ]; then
    say "checking the guest (guest_infer.py --versions under qemu-aarch64)"
    (cd "$HERE/../.." && "$HOST_PY" -c 'import sys; from benchmarks.arm.run import main; sys.exit(main(sys.argv[1:]))' \
        --versions --cache "$CACHE") >"$CACHE/versions.json.tmp"
    mv "$CACHE/versions.json.tmp" "$CACHE/versions.json"
fi
say "ready: $(tr -d '\n' <"$CACHE/versions.json")"
