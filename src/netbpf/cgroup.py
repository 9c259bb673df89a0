"""The kernel file systems the tools attach through: cgroup v2, bpffs and tracefs.

cgroup v2 may be mounted at /sys/fs/cgroup (unified layout) or elsewhere (hybrid layouts put it at
/sys/fs/cgroup/unified): it is always looked up in /proc/self/mounts.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

from .errors import UsageError

BPFFS = "/sys/fs/bpf"
TRACEFS = "/sys/kernel/tracing"


def _mounts(fstype):
    with open("/proc/self/mounts") as mounts:
        return [line.split()[1] for line in mounts if line.split()[2] == fstype]


def cgroup2_root():
    """Where cgroup v2 is mounted; UsageError when it is not."""
    found = _mounts("cgroup2")
    if not found:
        raise UsageError("no cgroup v2 file system is mounted (mount -t cgroup2 none /sys/fs/cgroup)")
    return Path(found[0])


def resolve(path=None):
    """A cgroup directory given by the user: absolute, or relative to the cgroup v2 root."""
    root = cgroup2_root()
    if path is None:
        return root
    path = Path(path)
    if not path.is_absolute():
        path = root / path
    path = Path(os.path.normpath(path))
    if not (path == root or root in path.parents) or not (path / "cgroup.procs").exists():
        raise UsageError(f"{path} is not a cgroup v2 directory (cgroup v2 is mounted at {root})")
    return path


def ensure_bpffs(path=BPFFS):
    """Mount bpffs at `path` when it is not mounted there (needs root)."""
    _ensure_mounted("bpf", path)


def ensure_tracefs(path=TRACEFS):
    """Mount tracefs (libbpf finds tracepoint ids there) when it is not mounted (needs root)."""
    _ensure_mounted("tracefs", path)


def _ensure_mounted(fstype, path):
    if path in _mounts(fstype):
        return
    try:
        os.makedirs(path, exist_ok=True)
        subprocess.run(["mount", "-t", fstype, fstype, path], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise UsageError(f"{fstype} is not mounted at {path} and mounting it failed: {detail.strip()}") from None


def is_bpffs(path):
    """Whether `path` lies on a bpffs mount."""
    path = os.path.realpath(path)
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in _mounts("bpf"))


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
