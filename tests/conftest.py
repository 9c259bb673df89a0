"""Fixtures shared by every test: a child cgroup, a bpffs pin directory, running code inside the cgroup.

Safety (DESIGN.md): nothing attaches to the cgroup v2 root. Each test gets its own child cgroup and
its own pin directory, and both are removed in teardown even when the test fails.
"""

import itertools
import os
import pickle
import sys
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

from netbpf import cgroup  # noqa: E402  (after the path set-up above)


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


@pytest.fixture
def cg():
    """A fresh child cgroup of the cgroup v2 root, removed afterwards."""
    group = cgroup.Cgroup.create(f"netbpf-test-{os.getpid()}-{next(_counter)}")
    try:
        yield group
    finally:
        group.remove()


@pytest.fixture
def pin_dir():
    """A per-test directory in bpffs; whatever is pinned there is removed afterwards."""
    cgroup.ensure_bpffs()
    path = Path(cgroup.BPFFS) / f"netbpf-test-{os.getpid()}-{next(_counter)}"
    path.mkdir()
    try:
        yield path
    finally:
        remove_pins(path)


def remove_pins(path):
    """Unlink every pin below `path` (deepest first), then the directories. A tool's detach may
    have removed `path` itself already (it removes pin directories it leaves empty)."""
    if not Path(path).exists():
        return
    for sub in sorted(Path(path).rglob("*"), key=lambda p: len(p.parts), reverse=True):
        sub.rmdir() if sub.is_dir() else sub.unlink()
    Path(path).rmdir()


def run_in(group, fn, *args):
    """Run fn(*args) in a forked child that first joins `group`; return its result or re-raise."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            group.add(os.getpid())
            result = ("ok", fn(*args))
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        with os.fdopen(write_fd, "wb") as out:
            pickle.dump(result, out)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as inp:
        data = inp.read()
    os.waitpid(pid, 0)
    status, value = pickle.loads(data)
    if status == "error":
        raise AssertionError(f"child in {group.path} failed: {value}")
    return value
