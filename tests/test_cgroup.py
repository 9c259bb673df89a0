# SPDX-License-Identifier: MIT
"""cgroup v2 and bpffs discovery against this machine's real mounts."""

import os

import pytest

from netbpf import cgroup, mounts
from netbpf.errors import UsageError

from conftest import run_in


def test_cgroup2_root_is_the_mount_in_proc_mounts():
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f if line.split()[2] == "cgroup2"]
    assert str(cgroup.cgroup2_root()) == mounts[0]


def test_resolve_accepts_relative_and_absolute_and_rejects_the_rest(cg, tmp_path):
    assert cgroup.resolve(cg.path.name) == cg.path
    assert cgroup.resolve(str(cg.path)) == cg.path
    assert cgroup.resolve(None) == cgroup.cgroup2_root()
    for bad in (str(tmp_path), "no-such-cgroup-here", "../../etc"):
        with pytest.raises(UsageError, match="not a cgroup v2 directory"):
            cgroup.resolve(bad)


def test_child_cgroup_runs_processes_and_is_removed(cg):
    proc = cg.popen(["sleep", "30"])
    try:
        assert cg.pids() == [proc.pid]
        assert cgroup.cgroup_of(proc.pid) == cg.path
        assert run_in(cg, lambda: cgroup.cgroup_of(os.getpid())) == cg.path
        assert cg.id == os.stat(cg.path).st_ino
    finally:
        path = cg.path
        cg.remove()
        proc.wait()
    assert not path.exists()


def test_bpffs_is_mounted_on_demand(pin_dir):
    assert mounts.is_bpffs(pin_dir)
    assert not mounts.is_bpffs("/tmp")
