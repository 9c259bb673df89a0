#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# make kernel: Debian's 6.1 kernel source (the linux-source-6.1 package) with kernel/patches
# applied, built small for the VM: virtme-ng's minimal config plus kernel/config (BPF, BTF,
# cgroups, sockmap, syscall tracepoints). Prints the path of the image (`make vmtest
# KERNEL=that path`), cached under build/kernel by the hash of the patches and the config.
#
# One source tree is kept (build/kernel/src, about 1.6 GB): when only the patches change, the
# patches it carries are taken out, the new ones go in, and make rebuilds what they touch (a
# few minutes instead of half an hour). A new config or source package starts a fresh tree.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${KERNEL_CACHE:-$PWD/build/kernel}
key=$(cat kernel/patches/*.patch kernel/config | sha256sum | cut -c1-12)
image=$cache/bzImage-6.1-netbpf-$key
if [ -f "$image" ]; then echo "$image"; exit 0; fi

python=$(python3 -c 'import sys; print(sys.executable)')
export PATH="$(dirname "$python"):$PATH"  # virtme-ng's vng lives beside the interpreter
need=()
[ -f /usr/src/linux-source-6.1.tar.xz ] || need+=(linux-source-6.1)
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

src=$cache/src
applied=$src/.netbpf-patches  # the patches the tree carries, in order
tree_key=$( (dpkg-query -W -f='${Version}' linux-source-6.1; cat kernel/config) | sha256sum | cut -c1-12)

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
    tar xJf /usr/src/linux-source-6.1.tar.xz -C "$src" --strip-components=1
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
for patch in kernel/patches/*.patch; do
    patch --dry-run -p1 -d "$src" --quiet < "$patch" >&2  # a patch that fails changes nothing
    patch -p1 -d "$src" --quiet < "$patch"
    cp "$patch" "$applied/"
    echo "applied $(basename "$patch")" >&2
done
make -C "$src" -j"$(nproc)" bzImage >&2
cp "$src/arch/x86/boot/bzImage" "$image"
echo "built $(basename "$image") in $(( $(date +%s) - start )) s" >&2
echo "$image"
