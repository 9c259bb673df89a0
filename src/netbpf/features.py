# SPDX-License-Identifier: MIT
"""What the running kernel can do, found by asking it (tiny loads), not by its version number.

Each probe is cached; `summary()` is what the tools' `status` shows."""

import errno
import functools
import os
import platform
from pathlib import Path

from .errors import LibbpfError
from .libbpf import ffi, lib
from .types import AttachType, MapType, ProgType

FUNC_PROBE_WRITE_USER = 36
ATTACH = {"getsockname4": AttachType.CGROUP_INET4_GETSOCKNAME, "getpeername4": AttachType.CGROUP_INET4_GETPEERNAME,
          "sock_release": AttachType.CGROUP_INET_SOCK_RELEASE, "bind4": AttachType.CGROUP_INET4_BIND}
# (code, dst | src << 4, off, imm)
_RETURN_ONE = [(0xB7, 0, 0, 1), (0x95, 0, 0, 0)]  # r0 = 1; exit
_WRITE_USER = [(0x7A, 10, -8, 0),          # *(u64 *)(r10 - 8) = 0
               (0xB7, 1, 0, 0),            # r1 = 0 (the user address: never reached, only verified)
               (0xBF, 2 | 10 << 4, 0, 0),  # r2 = r10
               (0x07, 2, 0, -8),           # r2 += -8
               (0xB7, 3, 0, 8),            # r3 = 8
               (0x85, 0, 0, FUNC_PROBE_WRITE_USER), (0xB7, 0, 0, 0), (0x95, 0, 0, 0)]  # call; r0 = 0; exit


def _load(prog_type, attach_type, program=_RETURN_ONE):
    insns = ffi.new("struct bpf_insn[]", [{"code": c, "regs": r, "off": o, "imm": i} for c, r, o, i in program])
    opts = ffi.new("struct bpf_prog_load_opts *", {"sz": ffi.sizeof("struct bpf_prog_load_opts"),
                                                   "expected_attach_type": attach_type})
    return lib.bpf_prog_load(prog_type, b"netbpf_probe", b"GPL", insns, len(program), opts)


def _refused(err):
    """False: the kernel lacks the feature. A refusal for want of privileges is no answer about
    the kernel and raises LibbpfError (EPERM, saying what is needed)."""
    if -err == errno.EPERM:
        raise LibbpfError("probe the kernel's BPF features", err)
    return False


def _loads(prog_type, attach_type=0, program=_RETURN_ONE):
    """Whether the kernel takes the program."""
    fd = _load(prog_type, attach_type, program)
    if fd < 0:
        return _refused(fd)
    os.close(fd)
    return True


@functools.lru_cache(maxsize=None)
def cgroup_hook(name):
    """Whether the kernel has the cgroup hook `name` (getsockname4: 5.8, sock_release: 5.9)."""
    prog_type = ProgType.CGROUP_SOCK if name == "sock_release" else ProgType.CGROUP_SOCK_ADDR
    return _loads(prog_type, ATTACH[name])


@functools.lru_cache(maxsize=None)
def sockmap_link():
    """Whether sk_msg programs attach to a sockmap with a bpf_link (6.10+)."""
    prog = _load(ProgType.SK_MSG, AttachType.SK_MSG_VERDICT)
    if prog < 0:
        return _refused(prog)
    sockhash = lib.bpf_map_create(MapType.SOCKHASH, b"netbpf_probe", 8, 8, 1, ffi.NULL)
    try:
        if sockhash < 0:
            return False
        link = lib.bpf_link_create(prog, sockhash, AttachType.SK_MSG_VERDICT, ffi.NULL)
        if link < 0:
            return False
        os.close(link)
        return True
    finally:
        os.close(prog)
        if sockhash >= 0:
            os.close(sockhash)


@functools.lru_cache(maxsize=None)
def probe_write_user():
    """Whether tracing programs may call bpf_probe_write_user (refused under kernel lockdown)."""
    return _loads(ProgType.TRACEPOINT, 0, _WRITE_USER)


def lockdown():
    try:
        text = Path("/sys/kernel/security/lockdown").read_text()
    except OSError:
        return "unknown (securityfs not mounted)"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


def summary():
    return {"kernel": platform.release(), "lockdown": lockdown(), "sockmap_link": sockmap_link(),
            "cgroup_getsockname": cgroup_hook("getsockname4"), "cgroup_sock_release": cgroup_hook("sock_release"),
            "probe_write_user": probe_write_user()}
