#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# make kernel: Debian's 6.1 kernel source (the linux-source-6.1 package) with kernel/patches
# applied, built small for the VM: virtme-ng's minimal config plus kernel/config (BPF, BTF,
# cgroups, sockmap, syscall tracepoints). Cached under build/kernel by the hash of the patches
# and the config; an interrupted build resumes in its source tree. Prints the path of the image
# (`make vmtest KERNEL=that path`).
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

src=$cache/src-$key
start=$(date +%s)
if [ ! -f "$src/.netbpf-configured" ]; then  # else: resume an interrupted build
    rm -rf "$src"
    mkdir -p "$src"
    tar xJf /usr/src/linux-source-6.1.tar.xz -C "$src" --strip-components=1
    for patch in kernel/patches/*.patch; do
        patch -p1 -d "$src" --quiet < "$patch"
        echo "applied $(basename "$patch")" >&2
    done
    (
        cd "$src"
        vng --kconfig >&2
        scripts/kconfig/merge_config.sh -m .config "$OLDPWD/kernel/config" >&2
        make olddefconfig >&2
        for option in $(grep -o '^CONFIG_[A-Z0-9_]*=y' "$OLDPWD/kernel/config" | cut -d= -f1); do
            grep -q "^$option=y" .config || { echo "build.sh: $option did not stay on" >&2; exit 1; }
        done
        touch .netbpf-configured
    )
fi
make -C "$src" -j"$(nproc)" bzImage >&2
cp "$src/arch/x86/boot/bzImage" "$image"
echo "built $(basename "$image") in $(( $(date +%s) - start )) s" >&2
rm -rf "$src"
echo "$image"
