# SPDX-License-Identifier: MIT
"""cgroup v2: where it is mounted, the directories users name, and child cgroups for tests.

cgroup v2 may be mounted at /sys/fs/cgroup (unified layout) or elsewhere (hybrid layouts put it at
/sys/fs/cgroup/unified): it is always looked up in /proc/self/mounts.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

from . import mounts
from .errors import UsageError


def cgroup2_root():
    """Where cgroup v2 is mounted; UsageError when it is not."""
    found = mounts.mount_points("cgroup2")
    if not found:
        raise UsageError("no cgroup v2 file system is mounted (mount -t cgroup2 none /sys/fs/cgroup)")
    return Path(found[0])


def resolve(path=None):
    """A cgroup directory given by the user: absolute (below any cgroup v2 mount: a container
    may see the host's tree mounted beside its own), or relative to the first cgroup v2 mount."""
    root = cgroup2_root()
    if path is None:
        return root
    path = Path(path)
    if not path.is_absolute():
        path = root / path
    path = Path(os.path.normpath(path))
    roots = [Path(mount) for mount in mounts.mount_points("cgroup2")]
    if not any(path == r or r in path.parents for r in roots) or not (path / "cgroup.procs").exists():
        raise UsageError(f"{path} is not a cgroup v2 directory (cgroup v2 is mounted at "
                         f"{', '.join(map(str, roots))})")
    return path


def path_of_id(cgroup_id):
    """The cgroup directory whose inode is cgroup_id (below any cgroup v2 mount), or None."""
    for root in mounts.mount_points("cgroup2"):
        if os.stat(root).st_ino == cgroup_id:
            return root
        for dirpath, dirnames, _ in os.walk(root):
            for name in dirnames:
                full = os.path.join(dirpath, name)
                try:
                    if os.stat(full).st_ino == cgroup_id:
                        return full
                except FileNotFoundError:
                    pass
    return None


def cgroup_id(path):
    """The cgroup id the kernel reports (bpf_get_current_cgroup_id): the directory's inode."""
    return os.stat(path).st_ino


def cgroup_of(pid):
    """The cgroup v2 directory of a process."""
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return cgroup2_root() / line.strip()[3:].lstrip("/")
    raise UsageError(f"process {pid} is in no cgroup v2")


def pids_below(path):
    """Every process in the cgroup v2 directory `path` and in the cgroups below it."""
    pids = []
    for directory, _, _ in os.walk(path):
        try:
            pids += [int(p) for p in Path(directory, "cgroup.procs").read_text().split()]
        except OSError:  # removed meanwhile
            continue
    return pids


class Cgroup:
    """A child cgroup that we create and remove.

        with Cgroup.create("netbpf-test") as cg:
            proc = cg.popen(["python3", "-m", "http.server"])
    """

    def __init__(self, path):
        self.path = Path(path)

    @classmethod
    def create(cls, name, parent=None):
        parent = resolve(parent)
        path = parent / name
        path.mkdir()
        return cls(path)

    @property
    def id(self):
        return cgroup_id(self.path)

    def add(self, pid):
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def pids(self):
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def popen(self, argv, **kwargs):
        """Start a process that is already in this cgroup when it execs."""
        procs = str(self.path / "cgroup.procs")

        def enter():
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        return subprocess.Popen(argv, preexec_fn=enter, **kwargs)

    def remove(self, timeout=5.0):
        """Kill what is left inside (only our own children live here) and remove the directory."""
        deadline = time.monotonic() + timeout
        while self.path.exists():
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.path.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        return f"<Cgroup {self.path}>"
