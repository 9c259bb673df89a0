# SPDX-License-Identifier: MIT
"""Kernel objects by file descriptor, pin or id: what every part of the loader asks the kernel."""

import errno
import os

from ..errors import LibbpfError, check, libbpf_error
from ..libbpf import ffi, lib


def obj_get(path):
    """A file descriptor of the object pinned at path."""
    fd = lib.bpf_obj_get(str(path).encode())
    if fd < 0:
        raise LibbpfError(f"open pinned object {path}", ffi.errno or errno.ENOENT)
    return fd


def obj_info(fd, ctype):
    """The kernel's `struct ctype` (bpf_prog_info, bpf_map_info, bpf_link_info) of fd."""
    info = ffi.new(f"struct {ctype} *")
    size = ffi.new("uint32_t *", ffi.sizeof(info[0]))
    check(lib.bpf_obj_get_info_by_fd(fd, info, size), f"read {ctype}")
    return info


class RunStats:
    """The kernel counting each program's runs and run time (kernel.bpf_stats_enabled) while open:
    the count stops when this closes, or when the process that opened it ends."""

    def __init__(self):
        self.fd = lib.bpf_enable_stats(0)  # BPF_STATS_RUN_TIME
        if self.fd < 0:
            raise libbpf_error("enable BPF run statistics", ffi.errno or errno.EPERM)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_stats(fd):
    """(run_time_ns, run_cnt) of program fd: what it cost while RunStats was on."""
    info = obj_info(fd, "bpf_prog_info")
    return info.run_time_ns, info.run_cnt


def prog_name(fd):
    return ffi.string(obj_info(fd, "bpf_prog_info").name).decode()


def loaded_programs():
    """(id, name, [ids of the maps it uses]) of every BPF program loaded in the kernel."""
    found, prog_id = [], ffi.new("uint32_t *", 0)
    while lib.bpf_prog_get_next_id(prog_id[0], prog_id) == 0:
        fd = lib.bpf_prog_get_fd_by_id(prog_id[0])
        if fd < 0:
            continue  # unloaded meanwhile
        try:
            count = obj_info(fd, "bpf_prog_info").nr_map_ids
            info = ffi.new("struct bpf_prog_info *")
            map_ids = ffi.new("uint32_t[]", max(count, 1))
            info.nr_map_ids, info.map_ids = count, int(ffi.cast("uintptr_t", map_ids))
            size = ffi.new("uint32_t *", ffi.sizeof(info[0]))
            check(lib.bpf_obj_get_info_by_fd(fd, info, size), "read bpf_prog_info")
            found.append((prog_id[0], ffi.string(info.name).decode(), list(map_ids[0:min(count, info.nr_map_ids)])))
        finally:
            os.close(fd)
    return found



def programs_on_cgroup(cgroup_path, attach_type):
    """Names of the programs attached to a cgroup for one attach type."""
    ids = ffi.new("uint32_t[64]")
    count = ffi.new("uint32_t *", 64)
    fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if lib.bpf_prog_query(fd, attach_type, 0, ffi.NULL, ids, count) < 0:
            return []
    finally:
        os.close(fd)
    names = []
    for prog_id in ids[0:count[0]]:
        prog_fd = lib.bpf_prog_get_fd_by_id(prog_id)
        if prog_fd >= 0:
            try:
                names.append(prog_name(prog_fd))
            finally:
                os.close(prog_fd)
    return names
