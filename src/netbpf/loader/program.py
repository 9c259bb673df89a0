# SPDX-License-Identifier: MIT
"""Program: one program of an Object, and the ways to attach it (each returns a Link)."""

import errno
import os

from ..errors import LibbpfError, NotSupportedError, check, check_ptr, libbpf_error
from ..libbpf import ffi, has, lib
from ..mounts import ensure_tracefs
from ..types import CGROUP_PROG_TYPES, AttachType, ProgType, named
from .kernel import obj_info, run_stats
from .link import Link, ProgAttachment
from .tc import TcFilter


class Program:
    """One program of an Object (a view of it: it raises once the object is closed)."""

    def __init__(self, obj, ptr):
        self.object, self._prog = obj, ptr
        self.name = ffi.string(lib.bpf_program__name(ptr)).decode()
        self.section = ffi.string(lib.bpf_program__section_name(ptr)).decode()

    @property
    def _ptr(self):
        self.object._alive(f"program {self.name}")
        return self._prog

    @property
    def type(self):
        """A ProgType."""
        return named(ProgType, lib.bpf_program__type(self._ptr))

    @property
    def attach_type(self):
        """An AttachType."""
        return named(AttachType, lib.bpf_program__expected_attach_type(self._ptr))

    @property
    def fd(self):
        fd = lib.bpf_program__fd(self._ptr)
        if fd < 0:
            raise ValueError(f"program {self.name} is not loaded")
        return fd

    def set_autoload(self, load):
        """Whether Object.load() loads this program (before load only)."""
        self.object._edit("autoload", self.name, bool(load))
        check(lib.bpf_program__set_autoload(self._ptr, bool(load)), f"set autoload of {self.name}")

    @property
    def id(self):
        return obj_info(self.fd, "bpf_prog_info").id

    @property
    def run_stats(self):
        """(run_time_ns, run_cnt): the kernel's count of this program's runs while a RunStats
        was open (both only grow)."""
        return run_stats(self.fd)

    def pin(self, path):
        check(lib.bpf_obj_pin(self.fd, str(path).encode()), f"pin program {self.name} at {path}")

    def _track(self, link):
        self.object._links.append(link)
        return link

    def attach_cgroup(self, cgroup):
        """Attach to a cgroup v2 directory (path, or an object with `.path`) with a bpf_link."""
        if self.type not in CGROUP_PROG_TYPES:
            raise TypeError(f"program {self.name} ({self.section}) is not a cgroup program")
        path = str(getattr(cgroup, "path", cgroup))
        try:
            cg_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise LibbpfError(f"open cgroup {path}", exc.errno) from None
        try:
            fd = lib.bpf_link_create(self.fd, cg_fd, self.attach_type, ffi.NULL)
            if fd < 0:
                raise LibbpfError(f"attach {self.name} ({self.section}) to cgroup {path}", fd)
        finally:
            os.close(cg_fd)
        return self._track(Link(fd, self.name))

    def attach_sockmap(self, sockmap, use_link=None):
        """Attach an sk_msg program to a SOCKMAP/SOCKHASH.

        A real bpf_link when the kernel has sockmap links (6.10+): through libbpf's
        bpf_program__attach_sockmap() where libbpf has it (1.5+), else bpf_link_create(). Without
        sockmap links, the older bpf_prog_attach wrapped in a ProgAttachment with the same
        interface. use_link=True/False forces one kind.
        """
        target_fd = sockmap.fd
        attach_type = AttachType.SK_MSG_VERDICT if self.type == ProgType.SK_MSG else self.attach_type
        if use_link is not False:
            if has("bpf_program__attach_sockmap"):
                ptr = lib.bpf_program__attach_sockmap(self._ptr, target_fd)
                fd = lib.bpf_link__fd(ptr) if ptr != ffi.NULL else -(ffi.errno or errno.EINVAL)
                if fd >= 0:
                    return self._track(Link(fd, self.name, libbpf_link=ptr))
            else:
                fd = lib.bpf_link_create(self.fd, target_fd, attach_type, ffi.NULL)
                if fd >= 0:
                    return self._track(Link(fd, self.name))
            error = libbpf_error(f"attach {self.name} to map {sockmap.name} with a bpf_link", fd)
            if use_link or not isinstance(error, NotSupportedError):
                raise error
        check(lib.bpf_prog_attach(self.fd, target_fd, attach_type, 0),
              f"attach {self.name} to map {sockmap.name}")
        return self._track(ProgAttachment(self.fd, target_fd, attach_type, self.name))

    def attach_iter(self, map=None):
        """Attach an iterator program (SEC("iter/...")); the Link's run_iter() runs a pass. An
        iterator over a map's elements (iter/bpf_map_elem, iter/bpf_sk_storage_map, ...) takes
        the Map it walks."""
        opts = ffi.NULL
        if map is not None:
            info = ffi.new("struct bpf_iter_link_info *", {"map_fd": map.fd})
            opts = ffi.new("struct bpf_iter_attach_opts *", {"sz": ffi.sizeof("struct bpf_iter_attach_opts"),
                                                             "link_info": info,
                                                             "link_info_len": ffi.sizeof(info[0])})
        ptr = lib.bpf_program__attach_iter(self._ptr, opts)
        check_ptr(ptr, f"attach iterator {self.name}")
        return self._track(Link(lib.bpf_link__fd(ptr), self.name, libbpf_link=ptr))

    def attach_tc(self, ifindex, use_tcx=None):
        """Attach a tc program (SEC("tc")) to the ingress of network device `ifindex` of this
        thread's network namespace, after the programs already there. A tcx bpf_link where the
        kernel has them (6.6+); else a netlink tc filter on the device's clsact qdisc, behind the
        same interface (TcFilter). use_tcx=True/False forces one kind."""
        if use_tcx is not False:
            fd = lib.bpf_link_create(self.fd, ifindex, AttachType.TCX_INGRESS, ffi.NULL)
            if fd >= 0:
                return self._track(Link(fd, self.name))
            error = libbpf_error(f"attach {self.name} to the ingress of device {ifindex} with a tcx link", fd)
            if use_tcx or not isinstance(error, NotSupportedError):
                raise error
        return self._track(TcFilter.attach(self.fd, ifindex, self.name))

    def attach_trace(self):
        """Attach an fentry/fexit program to the kernel function its section names."""
        ptr = lib.bpf_program__attach_trace(self._ptr)
        check_ptr(ptr, f"attach {self.name} ({self.section})")
        return self._track(Link(lib.bpf_link__fd(ptr), self.name, libbpf_link=ptr))

    def attach_tracepoint(self, category=None, name=None):
        """Attach to a tracepoint; by default the one in the section name (tracepoint/CAT/NAME)."""
        if category is None:
            parts = self.section.split("/")
            if len(parts) != 3 or parts[0] not in ("tracepoint", "tp"):
                raise ValueError(f"program {self.name}: section {self.section} names no tracepoint")
            category, name = parts[1], parts[2]
        ensure_tracefs()
        ptr = lib.bpf_program__attach_tracepoint(self._ptr, category.encode(), name.encode())
        check_ptr(ptr, f"attach {self.name} to tracepoint {category}:{name}")
        return self._track(Link(lib.bpf_link__fd(ptr), self.name, libbpf_link=ptr))
