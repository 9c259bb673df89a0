# SPDX-License-Identifier: MIT
"""The Python face of libbpf: Object, Program, Map, Link.

    with Object("build/x.bpf.o") as obj:          # open
        obj.maps["counts"].max_entries = 4096      # adjust before load
        obj.rodata.verbose = 1                     # a `const volatile` setting, before load
        obj.load()                                 # VerifierError carries the verifier log
        link = obj.programs["on_bind"].attach_cgroup("/sys/fs/cgroup/unified/test")
        print(dict(obj.maps["counts"]))            # keys/values decoded from BTF
    # leaving the block closes the object and detaches every link it made that is not pinned

Links: `close()` detaches, `pin(path)` makes the attachment outlive the process, and
`open_pinned(path)` gets it back later so that `detach()` can remove it. Programs and maps of an
object are views of it: once the object is closed they raise instead of touching freed memory.
"""

import errno
import functools
import logging
import os
import re
import stat
import threading
from collections.abc import MutableMapping

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from . import btf as _btf
from .errors import LibbpfError, ObjectFileError, VerifierError, check, check_ptr
from .libbpf import ffi, has, lib, libc
from .mounts import ensure_tracefs
from .types import (BATCH_MAP_TYPES, CGROUP_PROG_TYPES, PERCPU_MAP_TYPES, AttachType, LinkType, MapType,
                    ProgType, TcAttachPoint, UpdateFlags, named)

ANY, NOEXIST, EXIST = UpdateFlags.ANY, UpdateFlags.NOEXIST, UpdateFlags.EXIST
NOT_SUPPORTED = (errno.EINVAL, errno.EOPNOTSUPP, 524)  # 524: the kernel's internal ENOTSUPP

# The verifier log buffer of a load starts small; a log that does not fit (ENOSPC) is read again
# with a buffer this many times larger, up to the kernel's limit.
VERIFIER_LOG_START = 64 * 1024
VERIFIER_LOG_GROWTH = 16
VERIFIER_LOG_MAX = (1 << 30) - 1
GLOBAL_SECTIONS = (".rodata", ".data", ".bss")

# --- libbpf's own messages go to logging; during a load they are also collected for the error ---

log = logging.getLogger("netbpf.libbpf")
_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
_collected = threading.local()


@ffi.callback("int(int, const char *, void *)")
def _libbpf_print(level, fmt, va_list_ap):
    buf = ffi.new("char[]", 4096)
    libc.vsnprintf(buf, len(buf), fmt, va_list_ap)
    text = ffi.string(buf).decode(errors="replace").rstrip("\n")
    lines = getattr(_collected, "lines", None)
    if lines is not None and level == 0:
        lines.append(text)
        log.debug("%s", text)
    else:
        log.log(_LEVELS.get(level, logging.DEBUG), "%s", text)
    return 0


lib.libbpf_set_print(_libbpf_print)


def _bpf_obj_get(path):
    fd = lib.bpf_obj_get(str(path).encode())
    if fd < 0:
        raise LibbpfError(f"open pinned object {path}", ffi.errno or errno.ENOENT)
    return fd


def _obj_info(fd, ctype):
    info = ffi.new(f"struct {ctype} *")
    size = ffi.new("uint32_t *", ffi.sizeof(info[0]))
    check(lib.bpf_obj_get_info_by_fd(fd, info, size), f"read {ctype}")
    return info


def _check_elf(path_or_bytes):
    """A clear error for a file that is not a BPF object, before libbpf sees it."""
    import io

    try:
        stream = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else open(path_or_bytes, "rb")
    except FileNotFoundError:
        raise ObjectFileError(f"BPF object {path_or_bytes} not found (run `make`)") from None
    except OSError as exc:
        raise ObjectFileError(f"cannot read BPF object {path_or_bytes}: {exc.strerror}") from None
    with stream:
        try:
            machine = ELFFile(stream).header["e_machine"]
        except ELFError as exc:
            raise ObjectFileError(f"{_describe(path_or_bytes)} is not an ELF file: {exc}") from None
    if machine != "EM_BPF":
        raise ObjectFileError(f"{_describe(path_or_bytes)} is not a BPF object (ELF machine {machine})")


def _describe(path_or_bytes):
    return f"<{len(path_or_bytes)} bytes>" if isinstance(path_or_bytes, bytes) else str(path_or_bytes)


class Object:
    """A BPF ELF object: opened on construction, `load()`ed into the kernel, closed on exit.

    Its global variables are `rodata`, `data` and `bss` (Globals; None when the object has no
    such section)."""

    def __init__(self, source):
        _check_elf(source)
        self.source = source
        if isinstance(source, bytes):
            self._keep = ffi.from_buffer(source)  # libbpf keeps a pointer until load
            ptr = lib.bpf_object__open_mem(self._keep, len(source), ffi.NULL)
        else:
            ptr = lib.bpf_object__open_file(str(source).encode(), ffi.NULL)
        self._obj = check_ptr(ptr, f"open BPF object {_describe(source)}")
        self.name = ffi.string(lib.bpf_object__name(self._obj)).decode()
        btf_ptr = lib.bpf_object__btf(self._obj)
        self.btf = _btf.BTF(btf_ptr) if btf_ptr != ffi.NULL else None
        self.programs = _Named("program", self._iter(lib.bpf_object__next_program, Program))
        self.maps = _Named("map", self._iter(lib.bpf_object__next_map, Map._of_object))
        sections = {m.section: m for m in self.maps.values() if m.section in GLOBAL_SECTIONS}
        self.rodata, self.data, self.bss = (Globals(sections[name]) if name in sections else None
                                            for name in GLOBAL_SECTIONS)
        self.loaded = False
        self._links = []
        self._edits = []  # changes before load, replayed on a copy to read a long verifier log

    def _iter(self, next_fn, wrap):
        items, ptr = [], next_fn(self._obj, ffi.NULL)
        while ptr != ffi.NULL:
            items.append(wrap(self, ptr))
            ptr = next_fn(self._obj, ptr)
        return {item.name: item for item in items}

    def _alive(self):
        if self._obj is None:
            raise LibbpfError(f"BPF object {self.name} is closed", errno.EBADF)
        return self._obj

    def _edit(self, kind, name, value):
        if self.loaded:
            raise LibbpfError(f"BPF object {self.name} is loaded already: set {kind} of {name} before load",
                              errno.EBUSY)
        self._edits.append((kind, name, value))

    def load(self):
        """Load every program and create every map. A refused program raises VerifierError with
        the verifier's whole log."""
        failure = self._load_with_log(VERIFIER_LOG_START)
        size = VERIFIER_LOG_START
        while isinstance(failure, VerifierError) and failure.errno == errno.ENOSPC and size < VERIFIER_LOG_MAX:
            size = min(size * VERIFIER_LOG_GROWTH, VERIFIER_LOG_MAX)
            with self._copy() as copy:  # libbpf loads an object once, so the log is read from a copy
                failure = copy._load_with_log(size) or failure
        if failure is not None:
            raise failure
        return self

    def _copy(self):
        """A fresh open of the same object with the same changes before load."""
        copy = Object(self.source)
        for kind, name, value in self._edits:
            if kind == "autoload":
                copy.programs[name].set_autoload(value)
            elif kind == "max_entries":
                copy.maps[name].max_entries = value
            else:
                copy.maps[name].initial_value = value
        return copy

    def _load_with_log(self, log_size):
        """Load; None on success, else the error to raise."""
        log_buf = ffi.new("char[]", log_size)
        for prog in self.programs.values():
            lib.bpf_program__set_log_buf(prog._ptr, log_buf, log_size)
        _collected.lines = []
        try:
            err = lib.bpf_object__load(self._alive())
        finally:
            warnings, _collected.lines = _collected.lines, None
            for prog in self.programs.values():
                lib.bpf_program__set_log_buf(prog._ptr, ffi.NULL, 0)
        self.loaded = True  # libbpf's rule: an object is loaded once, whatever the outcome
        if err >= 0:
            return None
        verifier_log = ffi.string(log_buf).decode(errors="replace")
        failed = [m.group(1) for w in warnings for m in [re.search(r"prog '([^']+)': .*(fail|error)", w)] if m]
        if failed:  # the log is empty when the kernel refused the program before verifying it
            return VerifierError(failed[0], err, verifier_log or "\n".join(warnings))
        reason = warnings[-1].strip() if warnings else ""
        return LibbpfError(f"load BPF object {self.name}" + (f" ({reason})" if reason else ""),
                           err, "\n".join(warnings))

    def close(self):
        """Detach every link this object made that is not pinned, then unload. Its programs and
        maps raise from here on; pinned maps and links stay in the kernel."""
        for link in self._links:
            link.close()
        self._links.clear()
        if self._obj is not None:
            lib.bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_obj", None) is not None:
            self.close()


class Globals:
    """The global variables of one section of an object, by name, decoded from BTF:

        obj.rodata.queue_floor = 4096    # `const volatile` settings: before load only
        obj.bss.hits                     # after load: read from the kernel's map
        obj.data.limit = 10              # .data and .bss: before load, and in the kernel after

    Before load a write changes the values libbpf loads; after load .data and .bss are read and
    written in the kernel's map; .rodata is frozen at load (the verifier relied on its values)."""

    def __init__(self, section_map):
        object.__setattr__(self, "_map", section_map)

    def values(self):
        """All variables at once, as a namedtuple."""
        section = self._map
        if not section.object.loaded:
            return _btf.decode(section.value_codec, section.initial_value)
        return section[0]

    def __getattr__(self, name):
        values = self.values()
        if name not in values._fields:
            raise AttributeError(f"{self._map.section} has no variable {name!r} "
                                 f"(have: {', '.join(values._fields) or 'none'})")
        return getattr(values, name)

    def __setattr__(self, name, value):
        section = self._map
        if name not in section.value_codec.type._fields:
            raise AttributeError(f"{section.section} has no variable {name!r}")
        if not section.object.loaded:
            raw = bytearray(section.initial_value)
            _btf.encode_field(section.value_codec, name, value, raw)
            section.initial_value = bytes(raw)
        elif section.section == ".rodata":
            raise AttributeError(f"{section.section} of {section.object.name} is read-only after load "
                                 f"(set {name} before load)")
        else:
            current = section[0]._replace(**{name: value})
            section[0] = current

    def __dir__(self):
        return list(self._map.value_codec.type._fields)

    def __repr__(self):
        return f"<Globals {self._map.section} of {self._map.object.name}>"


class _Named(dict):
    """programs/maps by name; global-data maps also by section ('.rodata', whatever libbpf named
    the map); a missing name says which names exist."""

    def __init__(self, kind, items):
        super().__init__(items)
        self.kind = kind

    def __missing__(self, name):
        for item in self.values():
            if name in GLOBAL_SECTIONS and getattr(item, "section", None) == name:
                return item
        raise KeyError(f"no {self.kind} named {name!r} (have: {', '.join(sorted(self)) or 'none'})")


class Program:
    """One program of an Object (a view of it: it raises once the object is closed)."""

    def __init__(self, obj, ptr):
        self.object, self._prog = obj, ptr
        self.name = ffi.string(lib.bpf_program__name(ptr)).decode()
        self.section = ffi.string(lib.bpf_program__section_name(ptr)).decode()

    @property
    def _ptr(self):
        if self.object._obj is None:
            raise LibbpfError(f"program {self.name}: its object {self.object.name} is closed", errno.EBADF)
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
            raise LibbpfError(f"program {self.name} is not loaded", errno.EBADF)
        return fd

    def set_autoload(self, load):
        """Whether Object.load() loads this program (before load only)."""
        self.object._edit("autoload", self.name, bool(load))
        check(lib.bpf_program__set_autoload(self._ptr, bool(load)), f"set autoload of {self.name}")

    @property
    def id(self):
        return _obj_info(self.fd, "bpf_prog_info").id

    def pin(self, path):
        check(lib.bpf_obj_pin(self.fd, str(path).encode()), f"pin program {self.name} at {path}")

    def _track(self, link):
        self.object._links.append(link)
        return link

    def attach_cgroup(self, cgroup):
        """Attach to a cgroup v2 directory (path, or an object with `.path`) with a bpf_link."""
        if self.type not in CGROUP_PROG_TYPES:
            raise LibbpfError(f"program {self.name} ({self.section}) is not a cgroup program", errno.EINVAL)
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
            if use_link or -fd not in NOT_SUPPORTED:
                raise LibbpfError(f"attach {self.name} to map {sockmap.name} with a bpf_link", fd)
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
            if use_tcx or -fd not in NOT_SUPPORTED:
                raise LibbpfError(f"attach {self.name} to the ingress of device {ifindex} with a tcx link", fd)
        return self._track(TcFilter.attach(self.fd, ifindex, self.name))

    def attach_tracepoint(self, category=None, name=None):
        """Attach to a tracepoint; by default the one in the section name (tracepoint/CAT/NAME)."""
        if category is None:
            parts = self.section.split("/")
            if len(parts) != 3 or parts[0] not in ("tracepoint", "tp"):
                raise LibbpfError(f"program {self.name}: section {self.section} names no tracepoint", errno.EINVAL)
            category, name = parts[1], parts[2]
        ensure_tracefs()
        ptr = lib.bpf_program__attach_tracepoint(self._ptr, category.encode(), name.encode())
        check_ptr(ptr, f"attach {self.name} to tracepoint {category}:{name}")
        return self._track(Link(lib.bpf_link__fd(ptr), self.name, libbpf_link=ptr))


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
            raise LibbpfError(f"link of {self.program} is closed", errno.EBADF)
        return self._fd

    @property
    def closed(self):
        return self._fd is None

    def info(self):
        """id, type and program id; for a cgroup link also the cgroup id (its directory's inode)."""
        info = _obj_info(self.fd, "bpf_link_info")
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
        if ret < 0 and -ret not in NOT_SUPPORTED:
            raise LibbpfError(f"detach link of {self.program}", ret)
        self.unpin()
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<{type(self).__name__} {self.program} {state} pin={self.pin_path}>"


class _PinnedAsDirectory(Link):
    """An attachment that is no kernel object of its own: pinned as a bpffs directory holding
    its program ('prog') and what names its target (_pin_target)."""

    def _pin_target(self, path):
        raise NotImplementedError

    def pin(self, path):
        os.mkdir(path)
        try:
            check(lib.bpf_obj_pin(self.fd, f"{path}/prog".encode()), f"pin program {self.program}")
            self._pin_target(path)
        except (LibbpfError, OSError):
            _remove_pin_dir(path)
            raise
        self.pin_path = str(path)

    def unpin(self):
        if self.pin_path:
            _remove_pin_dir(self.pin_path)
            self.pin_path = None


class ProgAttachment(_PinnedAsDirectory):
    """A bpf_prog_attach() attachment behind the Link interface (kernels without sockmap links).

    Pinned as a bpffs directory holding the program ('prog') and the map it is attached to
    ('target'), so that a later process can bpf_prog_detach2() it.
    """

    kind = "prog_attach"

    def __init__(self, prog_fd, target_fd, attach_type, program="?", pin_path=None):
        super().__init__(os.dup(prog_fd), program, pin_path=pin_path)
        self.target_fd = os.dup(target_fd)
        self.attach_type = attach_type

    def info(self):
        return {"id": None, "type": "prog_attach", "prog_id": _obj_info(self.fd, "bpf_prog_info").id}

    def _pin_target(self, path):
        check(lib.bpf_obj_pin(self.target_fd, f"{path}/target".encode()), f"pin target of {self.program}")

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
        prog_fd = _bpf_obj_get(f"{path}/prog")
        target_fd = _bpf_obj_get(f"{path}/target")
        try:
            info = _obj_info(prog_fd, "bpf_prog_info")
            if info.type != ProgType.SK_MSG:
                raise LibbpfError(f"{path}: pinned attachment of program type {info.type} is not sk_msg", errno.EINVAL)
            return cls(prog_fd, target_fd, AttachType.SK_MSG_VERDICT, ffi.string(info.name).decode(),
                       pin_path=str(path))
        finally:
            os.close(prog_fd)
            os.close(target_fd)


def _tc_hook(ifindex):
    return ffi.new("struct bpf_tc_hook *", {"sz": ffi.sizeof("struct bpf_tc_hook"), "ifindex": ifindex,
                                            "attach_point": TcAttachPoint.INGRESS})


def _tc_filters_on(ifindex):
    """How many tc filters the device has on its clsact qdisc, ingress and egress (iproute2's view)."""
    import json
    import socket
    import subprocess

    name = socket.if_indextoname(ifindex)
    count = 0
    for direction in ("ingress", "egress"):
        out = subprocess.run(["tc", "-j", "filter", "show", "dev", name, direction],
                             capture_output=True, text=True).stdout
        count += len(json.loads(out or "[]"))
    return count


class TcFilter(_PinnedAsDirectory):
    """A netlink tc filter behind the Link interface (kernels without tcx links, before 6.6).
    close() removes the filter unless pinned, and the clsact qdisc too when attach() made it and
    nothing else uses it. Pinned as a bpffs directory holding the program ('prog') and a symlink
    ('filter') whose target names the filter: "IFINDEX HANDLE PRIORITY MADE_QDISC"."""

    kind = "tc_filter"

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
        return {"id": None, "type": "tc_filter", "prog_id": _obj_info(self.fd, "bpf_prog_info").id,
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
        os.symlink(f"{self.ifindex} {self.handle} {self.priority} {int(self.made_qdisc)}", f"{path}/filter")

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
        ifindex, handle, priority, made = (int(word) for word in os.readlink(f"{path}/filter").split())
        prog_fd = _bpf_obj_get(f"{path}/prog")
        try:
            name = ffi.string(_obj_info(prog_fd, "bpf_prog_info").name).decode()
            return cls(prog_fd, ifindex, handle, priority, bool(made), name, pin_path=str(path))
        finally:
            os.close(prog_fd)


def _tc_hook_both(ifindex):
    """The whole clsact qdisc: destroying this hook removes the qdisc."""
    hook = _tc_hook(ifindex)
    hook.attach_point = TcAttachPoint.INGRESS | TcAttachPoint.EGRESS
    return hook


def _remove_pin_dir(path):
    for entry in ("prog", "target", "filter"):
        try:
            os.unlink(f"{path}/{entry}")
        except FileNotFoundError:
            pass
    os.rmdir(path)


def loaded_programs():
    """(id, name, [ids of the maps it uses]) of every BPF program loaded in the kernel."""
    found, prog_id = [], ffi.new("uint32_t *", 0)
    while lib.bpf_prog_get_next_id(prog_id[0], prog_id) == 0:
        fd = lib.bpf_prog_get_fd_by_id(prog_id[0])
        if fd < 0:
            continue  # unloaded meanwhile
        try:
            count = _obj_info(fd, "bpf_prog_info").nr_map_ids
            info = ffi.new("struct bpf_prog_info *")
            map_ids = ffi.new("uint32_t[]", max(count, 1))
            info.nr_map_ids, info.map_ids = count, int(ffi.cast("uintptr_t", map_ids))
            size = ffi.new("uint32_t *", ffi.sizeof(info[0]))
            check(lib.bpf_obj_get_info_by_fd(fd, info, size), "read bpf_prog_info")
            found.append((prog_id[0], ffi.string(info.name).decode(), list(map_ids[0:min(count, info.nr_map_ids)])))
        finally:
            os.close(fd)
    return found


def open_pinned_link(path):
    """Reopen a pinned Link (or pinned ProgAttachment or TcFilter directory) so that it can be
    detached."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise LibbpfError(f"open pinned link {path}", errno.ENOENT) from None
    if stat.S_ISDIR(mode):
        kind = TcFilter if os.path.lexists(f"{path}/filter") else ProgAttachment
        return kind._open_pinned(path)
    fd = _bpf_obj_get(path)
    info = _obj_info(fd, "bpf_link_info")
    prog = lib.bpf_prog_get_fd_by_id(info.prog_id)
    name = "?"
    if prog >= 0:
        name = ffi.string(_obj_info(prog, "bpf_prog_info").name).decode()
        os.close(prog)
    return Link(fd, name, pin_path=str(path))


Link.open_pinned = staticmethod(open_pinned_link)


def _add(a, b):
    """Field by field: ints, namedtuples of ints, and arrays of either."""
    if isinstance(a, tuple) and hasattr(a, "_fields"):
        return type(a)(*(_add(x, y) for x, y in zip(a, b)))
    if isinstance(a, (list, tuple)):
        return [_add(x, y) for x, y in zip(a, b)]
    return a + b


class Map(MutableMapping):
    """A BPF map as a dict: keys and values are encoded/decoded from BTF.

    Per-CPU maps return a list with one value per possible CPU; `sum(key)` adds them up. A map of
    an Object is a view of it (it raises LibbpfError EBADF once the object is closed); one opened
    from a pin or an id owns its file descriptor until close(). Kernel errors raise LibbpfError
    (errno set); a missing key raises KeyError."""

    def __init__(self, name, map_type, key_codec, value_codec, section=""):
        self.name, self.type, self.section = name, named(MapType, map_type), section
        self.key_codec, self.value_codec = key_codec, value_codec
        self.percpu = map_type in PERCPU_MAP_TYPES
        self.ncpus = lib.libbpf_num_possible_cpus() if self.percpu else 1
        self._slot = (value_codec.size + 7) // 8 * 8 if self.percpu else value_codec.size
        self.object = self._map = self._owned_fd = self._max_entries = None

    @classmethod
    def _of_object(cls, obj, ptr):
        def codec(type_id, size):
            return obj.btf.codec(type_id) if (type_id and obj.btf) else _btf.plain_codec(size)

        value_type = lib.bpf_map__btf_value_type_id(ptr)
        internal = lib.bpf_map__is_internal(ptr) and obj.btf is not None
        self = cls(ffi.string(lib.bpf_map__name(ptr)).decode(), lib.bpf_map__type(ptr),
                   codec(lib.bpf_map__btf_key_type_id(ptr), lib.bpf_map__key_size(ptr)),
                   codec(value_type, lib.bpf_map__value_size(ptr)),
                   section=obj.btf.type_name(value_type) if internal else "")
        self.object, self._map = obj, ptr
        return self

    @classmethod
    def open_pinned(cls, path, like=None):
        """A pinned map; `like` (a Map from the same object file) lends its BTF codecs."""
        return cls._of_fd(_bpf_obj_get(path), like)

    @classmethod
    def open_id(cls, map_id, like=None):
        """A map loaded in the kernel, by id (see loaded_programs)."""
        fd = lib.bpf_map_get_fd_by_id(map_id)
        if fd < 0:
            raise LibbpfError(f"open map id {map_id}", fd)
        return cls._of_fd(fd, like)

    @classmethod
    def create(cls, map_type, key_size, value_size, max_entries, name=""):
        """A new map without BTF (keys and values are ints or bytes), owned by this handle."""
        fd = lib.bpf_map_create(map_type, name.encode(), key_size, value_size, max_entries, ffi.NULL)
        if fd < 0:
            raise LibbpfError(f"create map {name or named(MapType, map_type)}", fd)
        return cls._of_fd(fd, None)

    @classmethod
    def _of_fd(cls, fd, like):
        info = _obj_info(fd, "bpf_map_info")
        key = like.key_codec if like is not None else _btf.plain_codec(info.key_size)
        value = like.value_codec if like is not None else _btf.plain_codec(info.value_size)
        self = cls(ffi.string(info.name).decode(), info.type, key, value, like.section if like is not None else "")
        self._owned_fd, self._max_entries = fd, info.max_entries
        return self

    def close(self):
        """Close the file descriptor this Map owns (one opened from a pin or an id)."""
        if self._owned_fd is not None:
            os.close(self._owned_fd)
            self._owned_fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def _ptr(self):
        if self.object._obj is None:
            raise LibbpfError(f"map {self.name}: its object {self.object.name} is closed", errno.EBADF)
        return self._map

    @property
    def fd(self):
        if self.object is None:
            fd = self._owned_fd
            if fd < 0:
                raise LibbpfError(f"map {self.name} is closed", errno.EBADF)
            return fd
        fd = lib.bpf_map__fd(self._ptr)
        if fd < 0:
            raise LibbpfError(f"map {self.name} is not loaded", errno.EBADF)
        return fd

    @property
    def max_entries(self):
        if self.object is None:
            return self._max_entries
        return lib.bpf_map__max_entries(self._ptr)

    @max_entries.setter
    def max_entries(self, value):
        if self.object is None:
            raise LibbpfError(f"map {self.name} is loaded: max_entries is set before load", errno.EBUSY)
        self.object._edit("max_entries", self.name, int(value))
        check(lib.bpf_map__set_max_entries(self._ptr, int(value)), f"set max_entries of {self.name}")

    @property
    def initial_value(self):
        """The bytes libbpf loads into a global-data map (.rodata, .data, .bss) at load."""
        size = ffi.new("size_t *")
        ptr = lib.bpf_map__initial_value(self._ptr, size)
        if ptr == ffi.NULL:
            raise LibbpfError(f"map {self.name} has no initial value (not a global-data map)", errno.EINVAL)
        return ffi.buffer(ptr, size[0])[:]

    @initial_value.setter
    def initial_value(self, raw):
        self.object._edit("initial_value", self.name, bytes(raw))
        check(lib.bpf_map__set_initial_value(self._ptr, ffi.from_buffer(bytes(raw)), len(raw)),
              f"set the initial value of {self.name}")

    @property
    def id(self):
        return _obj_info(self.fd, "bpf_map_info").id

    def pin(self, path):
        check(lib.bpf_obj_pin(self.fd, str(path).encode()), f"pin map {self.name} at {path}")

    # --- encoding ---

    def _key(self, key):
        return ffi.from_buffer(_btf.encode(self.key_codec, key))

    def _value_buffer(self):
        return ffi.new("char[]", self._slot * self.ncpus)

    def _decode_value(self, buf):
        raw = ffi.buffer(buf)[:]
        if not self.percpu:
            return _btf.decode(self.value_codec, raw)
        return [_btf.decode(self.value_codec, raw[i * self._slot:(i + 1) * self._slot]) for i in range(self.ncpus)]

    def _encode_value(self, value):
        if not self.percpu:
            return _btf.encode(self.value_codec, value)
        values = value if isinstance(value, list) else [value] * self.ncpus
        return b"".join(_btf.encode(self.value_codec, v).ljust(self._slot, b"\0") for v in values)

    # --- the dict interface ---

    def __getitem__(self, key):
        buf = self._value_buffer()
        if lib.bpf_map_lookup_elem(self.fd, self._key(key), buf) < 0:
            err = ffi.errno
            if err == errno.ENOENT:
                raise KeyError(key)
            raise LibbpfError(f"lookup in map {self.name}", err)
        return self._decode_value(buf)

    def put(self, key, value, flags=ANY):
        """Update with flags ANY, NOEXIST (FileExistsError if present) or EXIST (KeyError if absent)."""
        ret = lib.bpf_map_update_elem(self.fd, self._key(key), ffi.from_buffer(self._encode_value(value)), flags)
        if ret < 0:
            if -ret == errno.ENOENT and flags == EXIST:
                raise KeyError(key)
            raise LibbpfError(f"update map {self.name}", ret)

    def __setitem__(self, key, value):
        self.put(key, value)

    def __delitem__(self, key):
        ret = lib.bpf_map_delete_elem(self.fd, self._key(key))
        if ret < 0:
            if -ret == errno.ENOENT:
                raise KeyError(key)
            raise LibbpfError(f"delete from map {self.name}", ret)

    def _raw_keys(self):
        """Each key once, at most max_entries of them. The kernel walks on from the key it is
        given, and starts again from the first key when that key was deleted meanwhile: then the
        walk goes on from the latest key it has yielded that still exists, skipping keys it has
        yielded already."""
        fd, size, limit = self.fd, self.key_codec.size, self.max_entries
        yielded, seen, back, calls = [], set(), 0, 0
        position, nxt = ffi.NULL, ffi.new("char[]", size)
        while len(yielded) < limit and calls < 4 * limit + 16:  # bounded whatever the churn
            calls += 1
            ret = lib.bpf_map_get_next_key(fd, position, nxt)
            if ret < 0:
                if -ret == errno.ENOENT:
                    return
                raise LibbpfError(f"walk the keys of map {self.name}", ret)
            raw = ffi.buffer(nxt)[:]
            if raw not in seen:
                seen.add(raw)
                yielded.append(raw)
                back = 0
                yield raw
            else:  # the walk restarted: try the keys yielded before, newest first
                back += 1
                if back < len(yielded):
                    raw = yielded[-1 - back]
            position = ffi.new("char[]", raw)

    def __iter__(self):
        for raw in self._raw_keys():
            yield _btf.decode(self.key_codec, raw)

    def __len__(self):
        return sum(1 for _ in self._raw_keys())

    def items(self):
        """All (key, value) pairs: one batch call where the kernel has it, else key by key."""
        if self.type in BATCH_MAP_TYPES:
            try:
                return self._items_batch()
            except LibbpfError as exc:
                if exc.errno not in NOT_SUPPORTED:
                    raise
        out = []
        for key in self:
            try:
                out.append((key, self[key]))
            except KeyError:  # deleted while we walked
                pass
        return out

    def _items_batch(self):
        chunk = max(1, min(self.max_entries, 4096))
        keys = ffi.new("char[]", self.key_codec.size * chunk)
        values = ffi.new("char[]", self._slot * self.ncpus * chunk)
        batch_in, batch_out = ffi.NULL, ffi.new("char[]", 8)
        opts = ffi.new("struct bpf_map_batch_opts *", {"sz": ffi.sizeof("struct bpf_map_batch_opts")})
        out, value_size = [], self._slot * self.ncpus
        while True:
            count = ffi.new("uint32_t *", chunk)
            ret = lib.bpf_map_lookup_batch(self.fd, batch_in, batch_out, keys, values, count, opts)
            if ret < 0 and -ret != errno.ENOENT:
                raise LibbpfError(f"batch lookup in map {self.name}", ret)
            kraw, vraw = ffi.buffer(keys)[:], ffi.buffer(values)[:]
            for i in range(count[0]):
                key = _btf.decode(self.key_codec, kraw[i * self.key_codec.size:(i + 1) * self.key_codec.size])
                vbuf = ffi.from_buffer(vraw[i * value_size:(i + 1) * value_size])
                out.append((key, self._decode_value(vbuf)))
            if ret < 0:
                return out
            batch_in, batch_out = ffi.new("char[]", ffi.buffer(batch_out)[:]), ffi.new("char[]", 8)

    def sum(self, key):
        """A per-CPU value added up over the CPUs (ints, or namedtuples field by field)."""
        values = self[key]
        if not self.percpu:
            return values
        return functools.reduce(_add, values)

    def clear(self):
        """Remove every key; an array map (whose keys always exist) gets zeroed values instead.
        Raises LibbpfError naming how many entries the kernel refused to remove."""
        array = self.type in (MapType.ARRAY, MapType.PERCPU_ARRAY)
        zero = ffi.from_buffer(bytes(self._slot * self.ncpus))
        failed, last_error = 0, 0
        for raw in list(self._raw_keys()):
            key = ffi.from_buffer(raw)
            ret = lib.bpf_map_update_elem(self.fd, key, zero, ANY) if array else lib.bpf_map_delete_elem(self.fd, key)
            if ret < 0 and -ret != errno.ENOENT:
                failed, last_error = failed + 1, ret
        if failed:
            raise LibbpfError(f"clear map {self.name}: {failed} entries not removed", last_error)

    def __repr__(self):
        kind = self.type.name if isinstance(self.type, MapType) else self.type
        return f"<Map {self.name} type={kind} key={self.key_codec.size}B value={self.value_codec.size}B>"
