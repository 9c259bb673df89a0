# SPDX-License-Identifier: MIT
"""Fixtures shared by every test: a child cgroup, a bpffs pin directory, running code inside the cgroup.

Safety: nothing attaches to the cgroup v2 root (the host's own services talk over loopback). Each test gets its own child cgroup and
its own pin directory, and both are removed in teardown even when the test fails.
"""

import ctypes
import itertools
import os
import pickle
import select
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Test this checkout's package, whichever checkout the editable install points at; child
# processes (the CLI tests) inherit it through PYTHONPATH.
sys.path.insert(0, str(REPO / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
TEST_OBJECTS = REPO / "build" / "tests"
_counter = itertools.count()

from netbpf import cgroup, mounts  # noqa: E402  (after the path set-up above)
from netbpf.loader import Link  # noqa: E402
from netbpf.types import Capability  # noqa: E402


def pytest_report_header(config):
    import platform

    import netbpf
    from netbpf import features

    return [f"netbpf: libbpf {netbpf.libbpf_version()}, kernel {platform.release()}",
            f"netbpf: kernel features {features.summary()}"]


def pytest_configure(config):
    if os.geteuid() != 0:
        pytest.exit("the netbpf tests load BPF programs into the running kernel: run them as root", 2)


def built_object(name):
    path = TEST_OBJECTS / f"{name}.bpf.o"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make` first")
    return path


def child_cgroup(prefix="netbpf-test"):
    """A fresh child cgroup of the cgroup v2 root, removed afterwards (a fixture's body)."""
    group = cgroup.Cgroup.create(f"{prefix}-{os.getpid()}-{next(_counter)}")
    try:
        yield group
    finally:
        group.remove()


@pytest.fixture
def cg():
    """A fresh child cgroup of the cgroup v2 root, removed afterwards."""
    yield from child_cgroup()


@pytest.fixture
def bypass(cg):
    """The bypass attached to the test's cgroup, with its agent (tests/bypassutil.py), keeping
    blocking readers on plain TCP whatever the kernel (tests that let them join say so)."""
    from bypassutil import attached

    with attached(cg, allow_blocking_readers=False) as attached_bypass:
        yield attached_bypass


@pytest.fixture
def host_ipv4():
    """One of this host's own IPv4 addresses other than loopback (what `--scope host` takes). A
    host without one (a VM guest) gets a dummy interface with 192.0.2.77 for the test."""
    import socket
    import subprocess

    from netbpf.bypass import host_addresses

    for family, packed in host_addresses():
        if family == socket.AF_INET and packed[0] != 127:
            yield socket.inet_ntoa(packed[:4])
            return
    subprocess.run(["ip", "link", "add", "nbtest0", "type", "dummy"], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "addr", "add", "192.0.2.77/32", "dev", "nbtest0"], check=True)
        subprocess.run(["ip", "link", "set", "nbtest0", "up"], check=True)
        yield "192.0.2.77"
    finally:
        subprocess.run(["ip", "link", "del", "nbtest0"], capture_output=True)


@pytest.fixture
def pin_dir():
    """A per-test directory in bpffs; whatever is pinned there is removed afterwards."""
    mounts.ensure_bpffs()
    path = Path(mounts.BPFFS) / f"netbpf-test-{os.getpid()}-{next(_counter)}"
    path.mkdir()
    try:
        yield path
    finally:
        remove_pins(path)


def remove_pins(path):
    """Unlink every pin below `path` (deepest first), then the directories. A tool's detach may
    have removed `path` itself already (it removes pin directories it leaves empty). A netlink tc
    filter is no link that ends with its last pin: a pinned one (a directory with a `filter`
    symlink, loader.TcFilter) is detached first."""
    if not Path(path).exists():
        return
    for named in Path(path).rglob("filter"):
        if named.is_symlink():
            Link.open_pinned(named.parent).detach()
    for sub in sorted(Path(path).rglob("*"), key=lambda p: len(p.parts), reverse=True):
        sub.rmdir() if sub.is_dir() and not sub.is_symlink() else sub.unlink()
    Path(path).rmdir()


_sync_fds = None  # in a run_in child: (request write end, answer read end)


def sync():
    """In a run_in child: block until the parent's on_sync() has returned (for example until the
    bypass has taken this child's sockets into its map). Without on_sync, or outside a run_in
    child, it returns at once."""
    if _sync_fds is None:
        return
    request, answer = _sync_fds
    os.write(request, b"s")
    if os.read(answer, 1) != b"g":
        raise AssertionError("the parent did not answer sync()")


def drop_privileges(privileges):
    """In a forked child: "nobody" becomes uid/gid 65534; "root-without-bpf" stays root and
    drops every netbpf.types.Capability the tools need from its effective set (a container's
    root)."""
    if privileges == "nobody":
        os.setgid(65534)
        os.setuid(65534)
        return
    assert privileges == "root-without-bpf", privileges
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # {effective, permitted, inheritable} x 2 words
    assert libc.capget(header, data) == 0
    for cap in Capability:
        data[3 * (cap // 32)] &= ~(1 << cap % 32)
    assert libc.capset(header, data) == 0, os.strerror(ctypes.get_errno())


def run_in(group, fn, *args, on_sync=None, privileges=None):
    """Run fn(*args) in a forked child that first joins `group` (None: stays where the test
    is) and drops `privileges` (see drop_privileges); return its result or re-raise. Each sync()
    in the child runs on_sync() here, in the parent, while the child waits; when on_sync()
    fails, the child is killed and the failure raised."""
    global _sync_fds
    read_fd, write_fd = os.pipe()
    request_r, request_w = os.pipe()
    answer_r, answer_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        _sync_fds = (request_w, answer_r)
        try:
            if group is not None:
                group.add(os.getpid())
            if privileges:
                drop_privileges(privileges)
            result = ("ok", fn(*args))
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        with os.fdopen(write_fd, "wb") as out:
            pickle.dump(result, out)
        os._exit(0)
    for fd in (write_fd, request_w, answer_r):
        os.close(fd)
    chunks, failure, watch = [], None, [read_fd, request_r]
    try:
        while True:
            ready, _, _ = select.select(watch, [], [])
            if request_r in ready:
                if not os.read(request_r, 1):
                    watch.remove(request_r)
                    continue
                try:
                    if on_sync is not None:
                        on_sync()
                except BaseException as exc:  # noqa: BLE001 - the child cannot go on without it
                    failure = exc
                    os.kill(pid, signal.SIGKILL)  # what it waits for will not come: do not hang
                    break
                os.write(answer_w, b"g")
            if read_fd in ready:
                chunk = os.read(read_fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        for fd in (read_fd, request_r, answer_w):
            os.close(fd)
        os.waitpid(pid, 0)
    if failure is not None:
        raise failure
    status, value = pickle.loads(b"".join(chunks))
    if status == "error":
        raise AssertionError(f"child in {group.path if group else 'the test cgroup'} failed: {value}")
    return value


def wait_for(predicate, timeout=5.0, interval=0.02):
    """Poll predicate() until it is true or the deadline passes; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()
