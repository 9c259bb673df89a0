#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# make selftests [KVER=6.12]: the BPF selftests that the kernel series adds, built as the
# kernel's own test_progs runner holding only those tests. make kernel's source tree carries
# the series (build/kernel/src-$KVER); this builds, from that tree, libbpf, the bootstrap
# bpftool (for the skeletons), the tests' BPF objects with clang, and test_progs.c with its
# helpers and a tests.h that lists the series' prog_tests. The selftests Makefile would build
# every one of its several hundred BPF programs first; the result is the same runner, with the
# same flags, minus the tests the series does not touch. Prints the path of test_progs, which
# `make selftests` runs inside the kernel under test (tests/vm/run.sh, VM_COMMAND).
set -euo pipefail
cd "$(dirname "$0")/.."
kver=${KVER:-6.12}
src=${KERNEL_SRC:-$PWD/build/kernel/src-$kver}
series=kernel/patches/$kver
selftests=$src/tools/testing/selftests/bpf
[ -d "$selftests" ] || { echo "selftests.sh: no kernel tree at $src (make kernel KVER=$kver first)" >&2; exit 2; }

# The series' tests: the prog_tests and progs files its patches add.
tests=($(sed -n 's|^+++ b/tools/testing/selftests/bpf/prog_tests/\(.*\)\.c$|\1|p' "$series"/*.patch | sort -u))
progs=($(sed -n 's|^+++ b/tools/testing/selftests/bpf/progs/\(.*\)\.c$|\1|p' "$series"/*.patch | sort -u))
[ ${#tests[@]} -gt 0 ] || { echo "selftests.sh: $series adds no prog_tests" >&2; exit 2; }

need=()
command -v clang >/dev/null || need+=(clang)
command -v llvm-strip >/dev/null || need+=(llvm)
[ -f /usr/include/libelf.h ] || need+=(libelf-dev)
[ -f /usr/include/zlib.h ] || need+=(zlib1g-dev)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2
fi

out=$PWD/build/selftests-$kver
mkdir -p "$out/include" "$out/libbpf" "$out/bpftool" "$out/prog_tests"
make -s -C "$src/tools/lib/bpf" OUTPUT="$out/libbpf/" DESTDIR="$out" prefix= \
    "$out/libbpf/libbpf.a" install_headers >&2
make -s -C "$src/tools/bpf/bpftool" OUTPUT="$out/bpftool/" bootstrap >&2
bpftool=$out/bpftool/bootstrap/bpftool

api=$src/tools/include/uapi
cd "$selftests"
for prog in "${progs[@]}"; do
    clang -g -O2 --target=bpf -mcpu=v3 -D__TARGET_ARCH_x86 -Wall -Werror \
        -I"$out/include" -I. -I"$api" -idirafter /usr/include -idirafter /usr/include/x86_64-linux-gnu \
        -c "progs/$prog.c" -o "$out/$prog.bpf.o"
    "$bpftool" gen skeleton "$out/$prog.bpf.o" name "$prog" > "$out/$prog.skel.h"
done
{
    echo '/* Generated header, do not edit */'
    for test in "${tests[@]}"; do
        sed -n -E 's/^void (serial_)?test_([a-zA-Z0-9_]+)\((void)?\).*/DEFINE_TEST(\2)/p' "prog_tests/$test.c"
    done | sort
} > "$out/prog_tests/tests.h"

# test_progs.c includes <prog_tests/tests.h>: the one written above comes first on the path.
sources=(test_progs.c cgroup_helpers.c trace_helpers.c network_helpers.c testing_helpers.c
         btf_helpers.c cap_helpers.c unpriv_helpers.c netlink_helpers.c jit_disasm_helpers.c
         test_loader.c xsk.c disasm_helpers.c json_writer.c "$src/kernel/bpf/disasm.c")
for test in "${tests[@]}"; do sources+=("prog_tests/$test.c"); done
gcc -g -O0 -rdynamic -Wall -Werror -fno-omit-frame-pointer \
    -I"$out" -I. -I"$out/include" -I"$src/tools/lib" -I"$src/tools/include" -I"$src/tools/arch/x86/include" -I"$api" \
    "${sources[@]}" "$out/libbpf/libbpf.a" -lelf -lz -lrt -lpthread -o "$out/test_progs"
echo "built test_progs with: ${tests[*]}" >&2
echo "$out/test_progs"
