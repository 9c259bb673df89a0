# SPDX-License-Identifier: MIT
"""The kernel file systems netbpf works through, found in /proc/self/mounts and mounted on
demand: bpffs (pins), tracefs (libbpf finds tracepoint ids there) and cgroup v2."""

import os
import subprocess

from . import system
from .errors import UsageError

BPFFS = "/sys/fs/bpf"
TRACEFS = "/sys/kernel/tracing"


def mount_points(fstype):
    """Where file systems of `fstype` are mounted, in mount order."""
    with open("/proc/self/mounts") as mounts:
        return [line.split()[1] for line in mounts if line.split()[2] == fstype]


def ensure_bpffs(path=BPFFS):
    """Mount bpffs at `path` when it is not mounted there (needs root), root's alone (mode
    0700): bpffs mounted without a mode is writable by every user (1777), who could then make
    directories and notes where a tool's pins go."""
    _ensure_mounted("bpf", path, "-o", "mode=0700")


def ensure_tracefs(path=TRACEFS):
    """Mount tracefs when it is not mounted (needs root)."""
    _ensure_mounted("tracefs", path)


def _ensure_mounted(fstype, path, *options):
    if path in mount_points(fstype):
        return
    try:
        os.makedirs(path, exist_ok=True)
        system.run("mount", "-t", fstype, *options, fstype, path, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise UsageError(f"{fstype} is not mounted at {path} and mounting it failed: {detail.strip()}") from None


def bpffs_mount_of(path):
    """The bpffs mount point that `path` (absolute, normalized) lies on, read as written (no
    symlink followed), or None."""
    path = str(path)
    found = [m for m in mount_points("bpf") if path == m or path.startswith(m.rstrip("/") + "/")]
    return max(found, key=len) if found else None


def is_bpffs(path):
    """Whether `path` lies on a bpffs mount."""
    path = os.path.realpath(path)
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mount_points("bpf"))
