#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# make needed [KVER=6.12]: is each fix of the series needed? For each fix, the kernel is built
# with every patch but that one (build.sh WITHOUT=), and the series' selftests run on it under
# QEMU (make selftests). The subtests that the fix's commit message names ("Checked by
# sockmap_tcp_like/...") must fail there, and every other subtest must pass. Prints one line
# per fix and exits non-zero when any fix is not needed or another fix's test breaks without it.
set -euo pipefail
cd "$(dirname "$0")/.."
kver=${KVER:-6.12}
series=kernel/patches/$kver
selftest=$(grep -l '^+++ b/tools/testing/selftests/bpf/prog_tests/' "$series"/*.patch | head -n 1)
[ -n "$selftest" ] || { echo "needed.sh: $series adds no selftest" >&2; exit 2; }
subtests=($(sed -n 's/^+\t{ "\([a-z_]*\)", case_.*/\1/p' "$selftest"))
test=$(sed -n 's|^+++ b/tools/testing/selftests/bpf/prog_tests/\(.*\)\.c$|\1|p' "$selftest")

log=$(mktemp)
trap 'rm -f "$log"' EXIT
failed=0
for patch in "$series"/*.patch; do
    case $patch in */0000-*|"$selftest") continue ;; esac
    number=$(basename "$patch" | cut -d- -f1)
    message=$(sed '/^---$/q' "$patch")
    named=()
    for subtest in "${subtests[@]}"; do grep -qw "$subtest" <<<"$message" && named+=("$subtest"); done
    image=$(KVER=$kver WITHOUT=$number kernel/build.sh)
    make -s selftests KVER="$kver" KERNEL="$image" >"$log" 2>&1 || true
    verdict="needed" broken=()
    for subtest in "${subtests[@]}"; do
        result=$(sed -n "s|^#[0-9/]* *$test/$subtest:\([A-Z]*\).*|\1|p" "$log" | tail -n 1)
        if [[ " ${named[*]} " == *" $subtest "* ]]; then
            [ "$result" = FAIL ] || verdict="NOT NEEDED ($subtest: ${result:-no result})"
        elif [ "$result" != OK ]; then
            broken+=("$subtest:${result:-no result}")
        fi
    done
    [ ${#named[@]} -gt 0 ] || verdict="names no subtest"
    grep -q "^#[0-9/]* *$test/" "$log" || { echo "needed.sh: no $test result on $image:" >&2; tail -n 20 "$log" >&2; }
    [ "$verdict" = needed ] && [ ${#broken[@]} -eq 0 ] || failed=1
    echo "without $(basename "$patch"): ${named[*]} fail: $verdict${broken[*]:+; also failing: ${broken[*]}}"
done
exit $failed
