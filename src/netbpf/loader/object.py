# SPDX-License-Identifier: MIT
"""Object: a BPF ELF object opened, loaded into the kernel and closed; Globals: its global
variables; libbpf's messages routed to logging (and into the error of a failed load)."""

import errno
import hashlib
import logging
import os
import re
import signal
import threading
import time

from .. import btf as _btf
from ..errors import LibbpfError, NetbpfError, ObjectFileError, VerifierError, check_ptr
from ..libbpf import ffi, lib, libc
from . import elfcheck
from .map import Map
from .program import Program

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

def _read(path_or_bytes):
    """The bytes of an object file (or the bytes given)."""
    if isinstance(path_or_bytes, bytes):
        return path_or_bytes
    try:
        with open(path_or_bytes, "rb") as stream:
            return stream.read()
    except FileNotFoundError:
        raise ObjectFileError(f"BPF object {path_or_bytes} not found (run `make`)") from None
    except OSError as exc:
        raise ObjectFileError(f"cannot read BPF object {path_or_bytes}: {exc.strerror}") from None


def _describe(path_or_bytes):
    return f"<{len(path_or_bytes)} bytes>" if isinstance(path_or_bytes, bytes) else str(path_or_bytes)


_accepted = set()  # digests of the objects that passed _check_object in this process
PREFLIGHT_TIMEOUT = 30.0


def _check_object(path_or_bytes):
    """ObjectFileError unless the object is well-formed (elfcheck) and libbpf can open it without
    crashing: the first time this process meets an object it is opened in a forked child first,
    and a child killed by a signal (or hung) means libbpf cannot parse it safely."""
    data, what = _read(path_or_bytes), _describe(path_or_bytes)
    digest = hashlib.sha256(data).digest()
    if digest in _accepted:
        return
    elfcheck.check(data, what)
    pid = os.fork()
    if pid == 0:  # only libbpf runs here: no Python callback, no lock another thread may hold
        lib.libbpf_set_print(ffi.NULL)
        obj = lib.bpf_object__open_mem(ffi.from_buffer(data), len(data), ffi.NULL)
        if obj != ffi.NULL:
            lib.bpf_object__close(obj)
        os._exit(0)
    deadline = time.monotonic() + PREFLIGHT_TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise ObjectFileError(f"libbpf did not finish reading {what} within {PREFLIGHT_TIMEOUT:g} s")
        time.sleep(0.001)
    if os.WIFSIGNALED(status):
        raise ObjectFileError(f"libbpf crashed reading {what} ({signal.Signals(os.WTERMSIG(status)).name}): "
                              "the object is damaged")
    _accepted.add(digest)


class Object:
    """A BPF ELF object: opened on construction, `load()`ed into the kernel, closed on exit.

    Its global variables are `rodata`, `data` and `bss` (Globals; None when the object has no
    such section)."""

    def __init__(self, source):
        self._obj, self._links, self._edits = None, [], []  # _edits: changes before load, replayed on a copy
        self.source, self.loaded = source, False
        _check_object(source)
        if isinstance(source, bytes):
            self._keep = ffi.from_buffer(source)  # libbpf keeps a pointer until load
            ptr = lib.bpf_object__open_mem(self._keep, len(source), ffi.NULL)
        else:
            ptr = lib.bpf_object__open_file(str(source).encode(), ffi.NULL)
        self._obj = check_ptr(ptr, f"open BPF object {_describe(source)}")
        try:
            self._describe_contents()
        except NetbpfError:
            self.close()
            raise
        except Exception as exc:  # what libbpf accepted but Python cannot read (names, BTF)
            self.close()
            raise ObjectFileError(f"BPF object {_describe(source)} cannot be read: {exc}") from None

    def _describe_contents(self):
        self.name = ffi.string(lib.bpf_object__name(self._obj)).decode(errors="replace")
        btf_ptr = lib.bpf_object__btf(self._obj)
        self.btf = _btf.BTF(btf_ptr, lambda: self._alive("its BTF")) if btf_ptr != ffi.NULL else None
        self.programs = _Named("program", self._iter(lib.bpf_object__next_program, Program))
        self.maps = _Named("map", self._iter(lib.bpf_object__next_map, Map._of_object))
        sections = {m.section: m for m in self.maps.values() if m.section in GLOBAL_SECTIONS}
        self.rodata, self.data, self.bss = (Globals(sections[name]) if name in sections else None
                                            for name in GLOBAL_SECTIONS)

    def _iter(self, next_fn, wrap):
        items, ptr = [], next_fn(self._obj, ffi.NULL)
        while ptr != ffi.NULL:
            items.append(wrap(self, ptr))
            ptr = next_fn(self._obj, ptr)
        return {item.name: item for item in items}

    def _alive(self, user=None):
        """The libbpf object; ValueError once closed (`user`: the program or map asking)."""
        if self._obj is None:
            name = getattr(self, "name", _describe(self.source))
            raise ValueError(f"{user}: its object {name} is closed" if user else f"BPF object {name} is closed")
        return self._obj

    def _edit(self, kind, name, value):
        if self.loaded:
            raise ValueError(f"BPF object {self.name} is loaded already: set {kind} of {name} before load")
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
            return VerifierError(failed[0], err, verifier_log or "\n".join(warnings), verified=bool(verifier_log))
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
