#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# make vmtest: the test suite on another kernel. Boots one of Debian's kernels under QEMU with
# software emulation (virtme-ng, the host's root file system read-only) and runs the tests inside,
# leaving out the ones marked slow (bulk transfers and 10,000-cycle churn take 10-50x longer under
# emulation; they run on the host kernel). Installs what it needs.
#   VM_SERIES=6.1 (default: linux-image-amd64 of Debian 12) or 6.12 (linux-image-6.12-amd64)
#   VM_KERNEL=IMAGE    any other kernel image (make kernel's)
#   VM_TESTS           the test files (default: tests, all of them)
#   PYTEST_ARGS, NETBPF_REFUSE   passed to the tests in the guest
#   VM_COMMAND         a command to run in the guest instead of the tests (make selftests)
# Prints the kernel and the pytest summary; exits non-zero when a test fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
python=$(python3 -c 'import sys; print(sys.executable)')
export PATH="$(dirname "$python"):$PATH"  # virtme-ng's commands live beside the interpreter

series=${VM_SERIES:-6.1}
case "$series" in
    6.1) package=linux-image-amd64 ;;
    6.12) package=linux-image-6.12-amd64 ;;
    *) echo "vmtest: VM_SERIES is 6.1 or 6.12, not $series" >&2; exit 2 ;;
esac
newest_image() { ls /boot/vmlinuz-"$series".* 2>/dev/null | sort -V | tail -n 1 || true; }  # 6.1. is not 6.12.
kernel=${VM_KERNEL:-$(newest_image)}
if [ -z "$kernel" ] || ! command -v qemu-system-x86_64 >/dev/null || ! command -v busybox >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-system-x86 "$package" busybox-static >/dev/null
    kernel=${VM_KERNEL:-$(newest_image)}
fi
command -v vng >/dev/null || PIP_BREAK_SYSTEM_PACKAGES=1 "$python" -m pip install -q virtme-ng

log=$(mktemp)
trap 'rm -f "$log"' EXIT
started=$(date +%s)
# The guest writes the exit status of the tests where the host can read it: a file in /tmp would
# stay inside the guest, so it goes to the console and is picked out of the log.
tests="$python -m pytest -p no:cacheprovider -q -m 'not slow' --benchmark-disable -rsxX --durations=5 ${PYTEST_ARGS:-} ${VM_TESTS:-tests}"
command=${VM_COMMAND:-$tests}
vng --disable-kvm -r "$kernel" --cpus 2 --memory 4G --exec \
    "cd $repo && echo \"vm kernel: \$(uname -r), lockdown: \$(cat /sys/kernel/security/lockdown 2>/dev/null)\" && \
     NETBPF_REFUSE='${NETBPF_REFUSE:-}' $command; \
     echo \"vm exit status: \$?\"" 2>&1 | tee "$log"
echo "vm run time: $(( $(date +%s) - started )) s"
status=$(sed -n 's/^vm exit status: \([0-9]*\).*/\1/p' "$log" | tail -n 1)
[ "$status" = 0 ] || { echo "vmtest: tests failed in the VM (status ${status:-unknown})" >&2; exit 1; }
