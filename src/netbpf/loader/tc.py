# SPDX-License-Identifier: MIT
"""TcFilter: a tc program on a device's ingress as a netlink tc filter (kernels without tcx
links, before 6.6), behind the Link interface."""

import errno
import json
import os
import socket

from .. import system
from ..errors import LibbpfError
from ..libbpf import ffi, lib
from ..types import TcAttachPoint
from .kernel import obj_get, obj_info, prog_name
from .link import _PinnedAsDirectory


def _tc_hook(ifindex):
    return ffi.new("struct bpf_tc_hook *", {"sz": ffi.sizeof("struct bpf_tc_hook"), "ifindex": ifindex,
                                            "attach_point": TcAttachPoint.INGRESS})


def _tc_filters_on(ifindex):
    """How many tc filters the device has on its clsact qdisc, ingress and egress (iproute2's view)."""
    name = socket.if_indextoname(ifindex)
    count = 0
    for direction in ("ingress", "egress"):
        out = system.run("tc", "-j", "filter", "show", "dev", name, direction, capture_output=True, text=True).stdout
        count += len(json.loads(out or "[]"))
    return count


class TcFilter(_PinnedAsDirectory):
    """A netlink tc filter behind the Link interface (kernels without tcx links, before 6.6).
    close() removes the filter unless pinned, and the clsact qdisc too when attach() made it and
    nothing else uses it. Pinned as a bpffs directory holding the program ('prog') and a symlink
    ('filter') whose target names the filter: "IFINDEX HANDLE PRIORITY MADE_QDISC"."""

    kind = "tc_filter"
    TARGET = "filter"

    def __init__(self, prog_fd, ifindex, handle, priority, made_qdisc, program="?", pin_path=None):
        super().__init__(os.dup(prog_fd), program, pin_path=pin_path)
        self.ifindex, self.handle, self.priority, self.made_qdisc = ifindex, handle, priority, made_qdisc

    @classmethod
    def attach(cls, prog_fd, ifindex, program="?"):
        hook = _tc_hook(ifindex)
        made = lib.bpf_tc_hook_create(hook)
        if made < 0 and -made != errno.EEXIST:
            raise LibbpfError(f"add a clsact qdisc to device {ifindex}", made)
        opts = ffi.new("struct bpf_tc_opts *", {"sz": ffi.sizeof("struct bpf_tc_opts"), "prog_fd": prog_fd})
        ret = lib.bpf_tc_attach(hook, opts)
        if ret < 0:
            if made == 0:
                lib.bpf_tc_hook_destroy(_tc_hook_both(ifindex))
            raise LibbpfError(f"attach {program} to the ingress of device {ifindex} with a tc filter", ret)
        return cls(prog_fd, ifindex, opts.handle, opts.priority, made == 0, program)

    def info(self):
        return {"id": None, "type": "tc_filter", "prog_id": obj_info(self.fd, "bpf_prog_info").id,
                "ifindex": self.ifindex, "handle": self.handle, "priority": self.priority}

    def _remove(self):
        opts = ffi.new("struct bpf_tc_opts *", {"sz": ffi.sizeof("struct bpf_tc_opts"), "handle": self.handle,
                                                "priority": self.priority})
        ret = lib.bpf_tc_detach(_tc_hook(self.ifindex), opts)
        if ret < 0 and -ret != errno.ENOENT:
            raise LibbpfError(f"remove the tc filter of {self.program}", ret)
        if self.made_qdisc and _tc_filters_on(self.ifindex) == 0:
            lib.bpf_tc_hook_destroy(_tc_hook_both(self.ifindex))

    def _pin_target(self, path):
        os.symlink(f"{self.ifindex} {self.handle} {self.priority} {int(self.made_qdisc)}", f"{path}/{self.TARGET}")

    def close(self):
        if self._fd is None:
            return
        if not self.pin_path:
            self._remove()
        self._close_fd()

    def _close_fd(self):
        os.close(self._fd)
        self._fd = None

    def detach(self):
        if self._fd is None:
            return
        self._remove()
        self.unpin()
        self._close_fd()

    @classmethod
    def _open_pinned(cls, path):
        ifindex, handle, priority, made = (int(word) for word in os.readlink(f"{path}/{cls.TARGET}").split())
        prog_fd = obj_get(f"{path}/prog")
        try:
            return cls(prog_fd, ifindex, handle, priority, bool(made), prog_name(prog_fd), pin_path=str(path))
        finally:
            os.close(prog_fd)


def _tc_hook_both(ifindex):
    """The whole clsact qdisc: destroying this hook removes the qdisc."""
    hook = _tc_hook(ifindex)
    hook.attach_point = TcAttachPoint.INGRESS | TcAttachPoint.EGRESS
    return hook
