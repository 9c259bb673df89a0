# SPDX-License-Identifier: MIT
"""Link: an attachment of a program. close() detaches unless pinned, detach() always does,
pin(path) makes it outlive the process and Link.open_pinned(path) gets it back. Attachments that
are no bpf_link of their own (bpf_prog_attach, a netlink tc filter) take the same interface and
pin as a bpffs directory."""

import errno
import os
import stat

from ..errors import LibbpfError, NotSupportedError, check, libbpf_error
from ..libbpf import ffi, lib
from ..types import AttachType, LinkType, ProgType, named
from .kernel import obj_get, obj_info, prog_name


class Link:
    """An attachment held by a bpf_link fd. close() detaches unless pinned; detach() always does.
    An iterator link (Program.attach_iter) runs its program with run_iter()."""

    kind = "bpf_link"

    def __init__(self, fd, program="?", libbpf_link=None, pin_path=None):
        self._fd, self.program = fd, program
        self._libbpf_link = libbpf_link
        self.pin_path = pin_path

    @property
    def fd(self):
        if self._fd is None:
            raise ValueError(f"link of {self.program} is closed")
        return self._fd

    @property
    def closed(self):
        return self._fd is None

    def info(self):
        """id, type and program id; for a cgroup link also the cgroup id (its directory's inode)."""
        info = obj_info(self.fd, "bpf_link_info")
        link_type = named(LinkType, info.type)
        kind = link_type.name.lower() if isinstance(link_type, LinkType) else str(link_type)
        out = {"id": info.id, "type": kind, "prog_id": info.prog_id}
        if kind == "cgroup":
            out["cgroup_id"] = info.data[0]
        return out

    def pin(self, path):
        check(lib.bpf_obj_pin(self.fd, str(path).encode()), f"pin link of {self.program} at {path}")
        self.pin_path = str(path)

    def run_iter(self):
        """One pass of an iterator link: the kernel runs the program once per object (socket,
        task, map element ...) while this reads; returns what the program wrote."""
        fd = lib.bpf_iter_create(self.fd)
        if fd < 0:
            raise LibbpfError(f"create an iterator from the link of {self.program}", fd)
        chunks = []
        try:
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks)

    def unpin(self):
        if self.pin_path:
            os.unlink(self.pin_path)
            self.pin_path = None

    def close(self):
        """Drop this handle. The attachment ends here unless it is pinned."""
        if self._fd is None:
            return
        if self._libbpf_link is not None and self.pin_path:
            # libbpf's destroy would end the attachment (a perf-event link disables its event);
            # disconnected, it frees its record and closes nothing (a perf-event link's event fd
            # stays open until this process ends: libbpf does not hand it out)
            lib.bpf_link__disconnect(self._libbpf_link)
            lib.bpf_link__destroy(self._libbpf_link)
            os.close(self._fd)
        elif self._libbpf_link is not None:
            lib.bpf_link__destroy(self._libbpf_link)
        else:
            os.close(self._fd)
        self._fd = None

    def detach(self):
        """End the attachment now, pinned or not, and remove the pin. Links without a detach
        operation (perf-event links before 6.x) end when the pin and this handle are gone."""
        ret = lib.bpf_link_detach(self.fd)
        if ret < 0:
            error = libbpf_error(f"detach link of {self.program}", ret)
            if not isinstance(error, NotSupportedError):
                raise error
        self.unpin()
        self.close()

    @staticmethod
    def open_pinned(path):
        """Reopen a pinned Link, or a pinned ProgAttachment or TcFilter directory, so that it can
        be detached."""
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise LibbpfError(f"open pinned link {path}", errno.ENOENT) from None
        if stat.S_ISDIR(mode):
            return _PinnedAsDirectory.open_directory(path)
        fd = obj_get(path)
        prog_fd = lib.bpf_prog_get_fd_by_id(obj_info(fd, "bpf_link_info").prog_id)
        name = "?"
        if prog_fd >= 0:
            name = prog_name(prog_fd)
            os.close(prog_fd)
        return Link(fd, name, pin_path=str(path))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<{type(self).__name__} {self.program} {state} pin={self.pin_path}>"


class _PinnedAsDirectory(Link):
    """An attachment that is no kernel object of its own: pinned as a bpffs directory holding
    its program ('prog') and TARGET, the entry that names what it is attached to (_pin_target).
    A subclass reopens its directory with _open_pinned(path)."""

    TARGET = None

    def _pin_target(self, path):
        raise NotImplementedError

    @classmethod
    def _open_pinned(cls, path):
        raise NotImplementedError

    @staticmethod
    def open_directory(path):
        """The pinned attachment of whichever kind wrote this directory (its TARGET is there)."""
        for kind in _PinnedAsDirectory.__subclasses__():
            if os.path.lexists(f"{path}/{kind.TARGET}"):
                return kind._open_pinned(path)
        raise LibbpfError(f"{path} holds no pinned attachment", errno.ENOENT)

    def pin(self, path):
        os.mkdir(path)
        try:
            check(lib.bpf_obj_pin(self.fd, f"{path}/prog".encode()), f"pin program {self.program}")
            self._pin_target(path)
        except (LibbpfError, OSError):
            self._remove_pin_dir(path)
            raise
        self.pin_path = str(path)

    def unpin(self):
        if self.pin_path:
            self._remove_pin_dir(self.pin_path)
            self.pin_path = None

    def _remove_pin_dir(self, path):
        for entry in ("prog", self.TARGET):
            try:
                os.unlink(f"{path}/{entry}")
            except FileNotFoundError:
                pass
        os.rmdir(path)


class ProgAttachment(_PinnedAsDirectory):
    """A bpf_prog_attach() attachment behind the Link interface (kernels without sockmap links).

    Pinned as a bpffs directory holding the program ('prog') and the map it is attached to
    ('target'), so that a later process can bpf_prog_detach2() it.
    """

    kind = "prog_attach"
    TARGET = "target"

    def __init__(self, prog_fd, target_fd, attach_type, program="?", pin_path=None):
        super().__init__(os.dup(prog_fd), program, pin_path=pin_path)
        self.target_fd = os.dup(target_fd)
        self.attach_type = attach_type

    def info(self):
        return {"id": None, "type": "prog_attach", "prog_id": obj_info(self.fd, "bpf_prog_info").id}

    def _pin_target(self, path):
        check(lib.bpf_obj_pin(self.target_fd, f"{path}/{self.TARGET}".encode()), f"pin target of {self.program}")

    def close(self):
        if self._fd is None:
            return
        if not self.pin_path:
            lib.bpf_prog_detach2(self._fd, self.target_fd, self.attach_type)
        os.close(self._fd)
        os.close(self.target_fd)
        self._fd = None

    def detach(self):
        check(lib.bpf_prog_detach2(self.fd, self.target_fd, self.attach_type), f"detach {self.program}")
        self.unpin()
        self.close()

    @classmethod
    def _open_pinned(cls, path):
        prog_fd = obj_get(f"{path}/prog")
        target_fd = obj_get(f"{path}/{cls.TARGET}")
        try:
            info = obj_info(prog_fd, "bpf_prog_info")
            if info.type != ProgType.SK_MSG:
                raise TypeError(f"{path}: pinned attachment of program type {info.type} is not sk_msg")
            return cls(prog_fd, target_fd, AttachType.SK_MSG_VERDICT, ffi.string(info.name).decode(),
                       pin_path=str(path))
        finally:
            os.close(prog_fd)
            os.close(target_fd)
