#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# make kernel [KVER=6.1|6.12]: Debian's kernel source of that series (the linux-source-$KVER
# package) with kernel/patches/$KVER applied, built small for the VM: virtme-ng's minimal config
# plus kernel/config (BPF, BTF, cgroups, sockmap, syscall tracepoints). Prints the path of the
# image (`make vmtest KERNEL=that path`), cached under build/kernel by the hash of the patches
# and the config. KVER=6.12 UNPATCHED=1 builds the same tree without the patches (the
# selftests' reference); WITHOUT=0003 builds it with every patch but that one (kernel/needed.sh).
#
# One source tree per series is kept (build/kernel/src-$KVER, 1.6-2 GB): when only the patches
# change, the patches it carries are taken out, the new ones go in, and make rebuilds what they
# touch (a few minutes instead of half an hour). A new config or source package starts a fresh tree.
set -euo pipefail
cd "$(dirname "$0")/.."
kver=${KVER:-6.1}
[ -d "kernel/patches/$kver" ] || { echo "build.sh: no patches for KVER=$kver (kernel/patches/: $(ls kernel/patches | xargs))" >&2; exit 2; }
patches=()  # the series, in order; the cover letter (0000-) is no patch
for patch in kernel/patches/"$kver"/*.patch; do [[ $patch == */0000-* ]] || patches+=("$patch"); done
flavour=netbpf
if [ -n "${UNPATCHED:-}" ]; then patches=(); flavour=unpatched; fi
if [ -n "${WITHOUT:-}" ]; then
    kept=()
    for patch in "${patches[@]}"; do [[ $(basename "$patch") == "$WITHOUT"-* ]] || kept+=("$patch"); done
    [ ${#kept[@]} -lt ${#patches[@]} ] || { echo "build.sh: kernel/patches/$kver has no patch $WITHOUT-*" >&2; exit 2; }
    patches=("${kept[@]}"); flavour=without-$WITHOUT
fi
cache=${KERNEL_CACHE:-$PWD/build/kernel}
key=$(cat "${patches[@]}" kernel/config | sha256sum | cut -c1-12)
image=$cache/bzImage-$kver-$flavour-$key
if [ -f "$image" ]; then echo "$image"; exit 0; fi

python=$(python3 -c 'import sys; print(sys.executable)')
export PATH="$(dirname "$python"):$PATH"  # virtme-ng's vng lives beside the interpreter
need=()
source_tar=/usr/src/linux-source-$kver.tar.xz
[ -f "$source_tar" ] || need+=("linux-source-$kver")
for tool in gcc:gcc make:make flex:flex bison:bison bc:bc pahole:dwarves perl:perl; do
    command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
[ -f /usr/include/libelf.h ] || need+=(libelf-dev)
[ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2
fi
command -v vng >/dev/null || PIP_BREAK_SYSTEM_PACKAGES=1 "$python" -m pip install -q virtme-ng >&2

src=$cache/src-$kver
applied=$src/.netbpf-patches  # the patches the tree carries, in order
tree_key=$( (dpkg-query -W -f='${Version}' "linux-source-$kver"; cat kernel/config) | sha256sum | cut -c1-12)

take_patches_out() {
    local patch
    for patch in $(ls -r "$applied"/*.patch 2>/dev/null); do
        patch -R -p1 -d "$src" --quiet < "$patch" || return 1
        rm "$patch"
    done
}

start=$(date +%s)
if [ "$(cat "$src/.netbpf-tree" 2>/dev/null)" != "$tree_key" ] || ! take_patches_out; then
    rm -rf "$src"
    mkdir -p "$src"
    tar xJf "$source_tar" -C "$src" --strip-components=1
    (
        cd "$src"
        vng --kconfig >&2
        scripts/kconfig/merge_config.sh -m .config "$OLDPWD/kernel/config" >&2
        make olddefconfig >&2
        for option in $(grep -o '^CONFIG_[A-Z0-9_]*=y' "$OLDPWD/kernel/config" | cut -d= -f1); do
            grep -q "^$option=y" .config || { echo "build.sh: $option did not stay on" >&2; exit 1; }
        done
    )
    echo "$tree_key" > "$src/.netbpf-tree"
fi
mkdir -p "$applied"
for patch in "${patches[@]}"; do
    patch --dry-run -p1 -d "$src" --quiet < "$patch" >&2  # a patch that fails changes nothing
    patch -p1 -d "$src" --quiet < "$patch"
    cp "$patch" "$applied/"
    echo "applied $(basename "$patch")" >&2
done
make -C "$src" -j"$(nproc)" bzImage >&2
cp "$src/arch/x86/boot/bzImage" "$image"
echo "built $(basename "$image") in $(( $(date +%s) - start )) s" >&2
echo "$image"
