#!/usr/bin/env bash
# Debian 13 (trixie: glibc 2.41, CPython 3.13) userlands for x86_64 (run natively through its own dynamic loader)
# and aarch64 (qemu-aarch64 -L), from Debian's archive and the Python package registry only.  Same approach as
# benchmarks/arm/setup.sh (private APT configuration, `dpkg -x`, `pip install --target`); idempotent.
#
#   setup.sh CACHE_DIR HOST_PYTHON
#
# CACHE_DIR/
#   apt/             private APT configuration and lists for trixie, amd64 + arm64 (the host's dpkg is untouched)
#   ARCH/sysroot/    glibc, libstdc++, CPython 3.13 unpacked from trixie's .debs (ARCH = amd64, arm64)
#   ARCH/site/       cp313 wheels: MNN, numpy, Pillow, onnxruntime (+ its dependencies), installed with --target
#   image.png        the test photo (scikit-image's chelsea.png, a tabby cat)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../private_apt.sh"

CACHE=$(realpath -m "${1:?usage: setup.sh CACHE_DIR HOST_PYTHON}")
HOST_PY=${2:?usage: setup.sh CACHE_DIR HOST_PYTHON}
RELEASE=trixie
WHEELS="MNN==3.6.1 numpy==2.4.6 pillow==13.0.0 onnxruntime==1.32.0 msgspec==0.22.0"
# Every library the runtime's imports map comes from these (guest_check.py lists the mapped libraries; libcrypto
# needs libzstd).
DEBS="libc6 libgcc-s1 libstdc++6 zlib1g libexpat1 libffi8 libssl3t64 libzstd1 libbz2-1.0 liblzma5 libmpdec4 libuuid1
      python3.13-minimal libpython3.13-minimal libpython3.13-stdlib"
APT_HOST=(apt-get -q -o DPkg::Lock::Timeout=600)

say() { printf "[debian13-setup %3ds] %s\n" "$SECONDS" "$*"; }
die() { printf '[debian13-setup] error: %s\n' "$*" >&2; exit 2; }
mkdir -p "$CACHE"

# 1. Host tool: qemu-user for the aarch64 userland (root installs it when missing).
if ! command -v qemu-aarch64 >/dev/null; then
    [ "$(id -u)" = 0 ] || die "qemu-user missing; run: sudo apt-get update && sudo apt-get install qemu-user"
    say "installing qemu-user"
    "${APT_HOST[@]}" update >/dev/null
    DEBIAN_FRONTEND=noninteractive "${APT_HOST[@]}" install -y --no-install-recommends qemu-user
fi

# 2. Private APT configuration: the host's Debian mirrors, with the host's release renamed to trixie.
APT=$CACHE/apt
export APT_CONFIG=$APT/apt.conf
if [ ! -s "$APT/lists.ok" ]; then
    mkdir -p "$APT"/{lists/partial,archives/partial,parts,prefs,cache}
    host_release=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    src=$(APT_CONFIG=/dev/null apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' \
        'Identifier: Packages' 'Origin: Debian' | sort -u)
    [ -n "$src" ] || src="http://deb.debian.org/debian/ $RELEASE main"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    : >"$APT/sources.list"
    while read -r uri release component; do
        [ -n "$host_release" ] && release=${release/#$host_release/$RELEASE}
        printf 'deb [signed-by=%s] %s %s %s\n' "$keyring" "$uri" "$release" "$component" >>"$APT/sources.list"
    done <<<"$src"
    write_apt_conf "$APT" amd64 "amd64 arm64"
    say "apt-get update (private $RELEASE amd64+arm64 lists under $APT)"
    apt-get -q update | sed 's/^/    /'
    date -u +%FT%TZ >"$APT/lists.ok"
fi

for arch in amd64 arm64; do
    case $arch in
        amd64) plat=x86_64 ;;
        arm64) plat=aarch64 ;;
    esac
    # 3. Sysroot: the .debs unpacked without dpkg's database; merged-/usr links as trixie's base-files makes them.
    SYSROOT=$CACHE/$arch/sysroot
    if [ "$(cat "$SYSROOT/.debs" 2>/dev/null)" != "$(echo $DEBS)" ]; then
        DEBDIR=$APT/debs-$arch
        mkdir -p "$DEBDIR"
        say "downloading $RELEASE $arch packages"
        # shellcheck disable=SC2086
        (cd "$DEBDIR" && apt-get -q download $(printf "%s:$arch " $DEBS) | sed 's/^/    /')
        tmp=$(mktemp -d "$CACHE/sysroot.tmp.XXXX")
        mkdir -p "$tmp/usr/lib" "$tmp/usr/lib64"
        ln -s usr/lib "$tmp/lib" && ln -s usr/lib64 "$tmp/lib64" && ln -s usr/bin "$tmp/bin"
        for pkg in $DEBS; do
            dpkg -x "$(ls -t "$DEBDIR/${pkg}_"*"_$arch.deb" | head -1)" "$tmp"
        done
        echo $DEBS >"$tmp/.debs"
        mkdir -p "$CACHE/$arch" && rm -rf "$SYSROOT" && mv "$tmp" "$SYSROOT"
        say "$arch sysroot ready: $(du -sh "$SYSROOT" | cut -f1)"
    fi
    # 4. The board's site-packages: cp313 wheels for this architecture, apart from the host's environment.
    SITE=$CACHE/$arch/site
    stamp=".ok-$(echo "$WHEELS" | tr ' =' '_-')"
    if [ ! -f "$SITE/$stamp" ]; then
        say "installing $WHEELS (cp313 $plat wheels) into $SITE"
        tmp=$(mktemp -d "$CACHE/site.tmp.XXXX")
        # shellcheck disable=SC2086
        "$HOST_PY" -m pip install --quiet --disable-pip-version-check --no-compile \
            --platform "manylinux2014_$plat" --platform "manylinux_2_17_$plat" --platform "manylinux_2_27_$plat" \
            --platform "manylinux_2_28_$plat" --python-version 3.13 --implementation cp --only-binary=:all: \
            --target "$tmp" $WHEELS
        touch "$tmp/$stamp"
        rm -rf "$SITE" && mv "$tmp" "$SITE"
    fi
done

# 5. A real photo, so the top-1 comparison is not decided by a near tie on noise.
if [ ! -f "$CACHE/image.png" ]; then
    "$HOST_PY" -c 'import shutil, sys, skimage.data as d, os; shutil.copy(os.path.join(os.path.dirname(d.__file__),
"chelsea.png"), sys.argv[1])' "$CACHE/image.png"
fi
say "ready: $CACHE/{amd64,arm64}"
