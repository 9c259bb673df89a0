"""The Python face of libbpf: Object, Program, Map, Link.

    with Object("build/x.bpf.o") as obj:          # open
        obj.maps["counts"].max_entries = 4096      # adjust before load
        obj.load()                                 # VerifierError carries the verifier log
        link = obj.programs["on_bind"].attach_cgroup("/sys/fs/cgroup/unified/test")
        print(dict(obj.maps["counts"]))            # keys/values decoded from BTF
    # leaving the block closes the object and detaches every link it made that is not pinned

Links: `close()` detaches, `pin(path)` makes the attachment outlive the process, and
`open_pinned(path)` gets it back later so that `detach()` can remove it.
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
from .cgroup import ensure_tracefs
from .errors import LibbpfError, ObjectFileError, VerifierError, check, check_ptr
from .libbpf import ffi, has, lib, libc

# enum bpf_prog_type / bpf_map_type / bpf_attach_type values used here (uapi, stable)
PROG_TRACEPOINT, PROG_SOCK_OPS, PROG_SK_MSG = 5, 13, 16
CGROUP_PROG_TYPES = {8, 9, 13, 15, 18, 23, 25}  # cgroup_skb, cgroup_sock, sock_ops, device, sock_addr, sysctl, sockopt
SK_MSG_VERDICT = 7
PERCPU_MAP_TYPES = {5, 6, 10, 21}  # percpu hash/array, lru percpu hash, percpu cgroup storage
BATCH_MAP_TYPES = {1, 2, 5, 6, 9, 10}  # hash, array, their per-CPU and LRU variants
LINK_TYPE_NAMES = {1: "raw_tracepoint", 2: "tracing", 3: "cgroup", 4: "iter", 5: "netns", 6: "xdp",
                   7: "perf_event", 14: "sockmap"}

ANY, NOEXIST, EXIST = 0, 1, 2  # map update flags

_VERIFIER_LOG_SIZE = 16 * 1024 * 1024

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
    """A BPF ELF object: opened on construction, `load()`ed into the kernel, closed on exit."""

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
        self.loaded = False
        self._links = []

    def _iter(self, next_fn, wrap):
        items, ptr = [], next_fn(self._obj, ffi.NULL)
        while ptr != ffi.NULL:
            items.append(wrap(self, ptr))
            ptr = next_fn(self._obj, ptr)
        return {item.name: item for item in items}

    def load(self):
        log_buf = ffi.new("char[]", _VERIFIER_LOG_SIZE)
        for prog in self.programs.values():
            lib.bpf_program__set_log_buf(prog._prog, log_buf, _VERIFIER_LOG_SIZE)
        _collected.lines = []
        try:
            err = lib.bpf_object__load(self._obj)
        finally:
            warnings, _collected.lines = _collected.lines, None
            for prog in self.programs.values():
                lib.bpf_program__set_log_buf(prog._prog, ffi.NULL, 0)
        if err < 0:
            verifier_log = ffi.string(log_buf).decode(errors="replace")
            failed = [m.group(1) for w in warnings for m in [re.search(r"prog '([^']+)': .*(fail|error)", w)] if m]
            if verifier_log and failed:
                raise VerifierError(failed[0], err, verifier_log)
            reason = warnings[-1].strip() if warnings else ""
            raise LibbpfError(f"load BPF object {self.name}" + (f" ({reason})" if reason else ""),
                              err, "\n".join(warnings))
        self.loaded = True
        return self

    def close(self):
        """Detach every link this object made that is not pinned, then unload."""
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


class _Named(dict):
    """programs/maps by name; a missing name says which names exist."""

    def __init__(self, kind, items):
        super().__init__(items)
        self.kind = kind

    def __missing__(self, name):
        raise KeyError(f"no {self.kind} named {name!r} (have: {', '.join(sorted(self)) or 'none'})")


class Program:
    def __init__(self, obj, ptr):
        self.object, self._prog = obj, ptr
        self.name = ffi.string(lib.bpf_program__name(ptr)).decode()
        self.section = ffi.string(lib.bpf_program__section_name(ptr)).decode()

    @property
    def type(self):
        return lib.bpf_program__type(self._prog)

    @property
    def attach_type(self):
        return lib.bpf_program__expected_attach_type(self._prog)

    @property
    def fd(self):
        fd = lib.bpf_program__fd(self._prog)
        if fd < 0:
            raise LibbpfError(f"program {self.name} is not loaded", errno.EBADF)
        return fd

    def set_autoload(self, load):
        """Whether Object.load() loads this program (before load only)."""
        check(lib.bpf_program__set_autoload(self._prog, bool(load)), f"set autoload of {self.name}")

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
        attach_type = SK_MSG_VERDICT if self.type == PROG_SK_MSG else self.attach_type
        if use_link is not False:
            if has("bpf_program__attach_sockmap"):
                ptr = lib.bpf_program__attach_sockmap(self._prog, target_fd)
                fd = lib.bpf_link__fd(ptr) if ptr != ffi.NULL else -(ffi.errno or errno.EINVAL)
                if fd >= 0:
                    return self._track(Link(fd, self.name, libbpf_link=ptr))
            else:
                fd = lib.bpf_link_create(self.fd, target_fd, attach_type, ffi.NULL)
                if fd >= 0:
                    return self._track(Link(fd, self.name))
            if use_link or -fd not in (errno.EINVAL, errno.EOPNOTSUPP, 524):  # 524: ENOTSUPP
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
        ptr = lib.bpf_program__attach_iter(self._prog, opts)
        check_ptr(ptr, f"attach iterator {self.name}")
        return self._track(Link(lib.bpf_link__fd(ptr), self.name, libbpf_link=ptr))

    def attach_tracepoint(self, category=None, name=None):
        """Attach to a tracepoint; by default the one in the section name (tracepoint/CAT/NAME)."""
        if category is None:
            parts = self.section.split("/")
            if len(parts) != 3 or parts[0] not in ("tracepoint", "tp"):
                raise LibbpfError(f"program {self.name}: section {self.section} names no tracepoint", errno.EINVAL)
            category, name = parts[1], parts[2]
        ensure_tracefs()
        ptr = lib.bpf_program__attach_tracepoint(self._prog, category.encode(), name.encode())
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
        kind = LINK_TYPE_NAMES.get(info.type, str(info.type))
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
        if self._libbpf_link is not None:
            lib.bpf_link__destroy(self._libbpf_link)
        else:
            os.close(self._fd)
        self._fd = None

    def detach(self):
        """End the attachment now, pinned or not, and remove the pin. Links without a detach
        operation (perf-event links before 6.x) end when the pin and this handle are gone."""
        ret = lib.bpf_link_detach(self.fd)
        if ret < 0 and -ret not in (errno.EOPNOTSUPP, errno.EINVAL, 524):
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


class ProgAttachment(Link):
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

    def pin(self, path):
        os.mkdir(path)
        try:
            check(lib.bpf_obj_pin(self.fd, f"{path}/prog".encode()), f"pin program {self.program}")
            check(lib.bpf_obj_pin(self.target_fd, f"{path}/target".encode()), f"pin target of {self.program}")
        except LibbpfError:
            _remove_pin_dir(path)
            raise
        self.pin_path = str(path)

    def unpin(self):
        if self.pin_path:
            _remove_pin_dir(self.pin_path)
            self.pin_path = None

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
            if info.type != PROG_SK_MSG:
                raise LibbpfError(f"{path}: pinned attachment of program type {info.type} is not sk_msg", errno.EINVAL)
            return cls(prog_fd, target_fd, SK_MSG_VERDICT, ffi.string(info.name).decode(), pin_path=str(path))
        finally:
            os.close(prog_fd)
            os.close(target_fd)


def _remove_pin_dir(path):
    for entry in ("prog", "target"):
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
    """Reopen a pinned Link (or pinned ProgAttachment directory) so that it can be detached."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise LibbpfError(f"open pinned link {path}", errno.ENOENT) from None
    if stat.S_ISDIR(mode):
        return ProgAttachment._open_pinned(path)
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

    Per-CPU maps return a list with one value per possible CPU; `sum(key)` adds them up.
    """

    def __init__(self, name, fd_source, map_type, key_codec, value_codec, max_entries):
        self.name, self.type = name, map_type
        self._fd_source = fd_source
        self.key_codec, self.value_codec = key_codec, value_codec
        self._max_entries = max_entries
        self.percpu = map_type in PERCPU_MAP_TYPES
        self.ncpus = lib.libbpf_num_possible_cpus() if self.percpu else 1
        self._slot = (value_codec.size + 7) // 8 * 8 if self.percpu else value_codec.size

    @classmethod
    def _of_object(cls, obj, ptr):
        def codec(type_id, size):
            return obj.btf.codec(type_id) if (type_id and obj.btf) else _btf.plain_codec(size)

        self = cls(ffi.string(lib.bpf_map__name(ptr)).decode(), lambda: lib.bpf_map__fd(ptr),
                   lib.bpf_map__type(ptr),
                   codec(lib.bpf_map__btf_key_type_id(ptr), lib.bpf_map__key_size(ptr)),
                   codec(lib.bpf_map__btf_value_type_id(ptr), lib.bpf_map__value_size(ptr)), None)
        self._map = ptr
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
    def _of_fd(cls, fd, like):
        info = _obj_info(fd, "bpf_map_info")
        key = like.key_codec if like is not None else _btf.plain_codec(info.key_size)
        value = like.value_codec if like is not None else _btf.plain_codec(info.value_size)
        self = cls(ffi.string(info.name).decode(), lambda: fd, info.type, key, value, info.max_entries)
        self._owned_fd = fd
        return self

    def close(self):
        fd = getattr(self, "_owned_fd", None)
        if fd is not None:
            os.close(fd)
            self._owned_fd = None

    @property
    def fd(self):
        fd = self._fd_source()
        if fd is None or fd < 0:
            raise LibbpfError(f"map {self.name} is not loaded", errno.EBADF)
        return fd

    @property
    def max_entries(self):
        if self._max_entries is not None:
            return self._max_entries
        return lib.bpf_map__max_entries(self._map)

    @max_entries.setter
    def max_entries(self, value):
        check(lib.bpf_map__set_max_entries(self._map, int(value)), f"set max_entries of {self.name}")

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
        size = self.key_codec.size
        prev, nxt = ffi.NULL, ffi.new("char[]", size)
        while lib.bpf_map_get_next_key(self.fd, prev, nxt) == 0:
            raw = ffi.buffer(nxt)[:]
            yield raw
            prev = ffi.new("char[]", raw)

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
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, 524):
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
        for raw in list(self._raw_keys()):
            lib.bpf_map_delete_elem(self.fd, ffi.from_buffer(raw))

    def __repr__(self):
        return f"<Map {self.name} type={self.type} key={self.key_codec.size}B value={self.value_codec.size}B>"

