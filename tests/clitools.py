# SPDX-License-Identifier: MIT
"""Running the tools' command lines as a user would, and checking they left nothing behind."""

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr

from netbpf.libbpf import ffi, lib

from conftest import run_in

ATTACH_TYPES = {"sock_ops": 3, "bind4": 8, "bind6": 9, "connect4": 10, "connect6": 11, "post_bind4": 12,
                "post_bind6": 13, "sendmsg4": 14, "sendmsg6": 15, "recvmsg4": 19, "recvmsg6": 20,
                "getpeername4": 29, "getpeername6": 30, "getsockname4": 31, "getsockname6": 32,
                "sock_release": 34}


def run_cli(tool, *args, timeout=60, **kwargs):
    return subprocess.run([sys.executable, "-m", f"netbpf.{tool}", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def attached_programs(cgroup_path):
    """{attach type name: [program ids]} for every cgroup hook the tools use."""
    found = {}
    fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, attach_type in ATTACH_TYPES.items():
            ids = ffi.new("uint32_t[64]")
            count = ffi.new("uint32_t *", 64)
            if lib.bpf_prog_query(fd, attach_type, 0, ffi.NULL, ids, count) == 0 and count[0]:
                found[name] = list(ids[0:count[0]])
    finally:
        os.close(fd)
    return found


def run_cli_as(privileges, fn):
    """Run fn() (a tool's main) in a forked child with `privileges` dropped (conftest's
    drop_privileges); return (exit code, what it wrote to stderr)."""

    def child():
        err = io.StringIO()
        with redirect_stderr(err):
            code = fn()
        return code, err.getvalue()

    return run_in(None, child, privileges=privileges)


def bpf_loaded(prefix):
    """Whether a BPF program whose name starts with prefix is loaded in the kernel."""
    from netbpf.loader import loaded_programs

    return any(name.startswith(prefix) for _, name, _ in loaded_programs())
