# SPDX-License-Identifier: MIT
"""Map: a BPF map as a dict whose keys and values are decoded from BTF."""

import errno
import functools
import os
from collections.abc import MutableMapping

from .. import btf as _btf
from ..errors import LayoutError, LibbpfError, NotSupportedError, check, libbpf_error
from ..libbpf import ffi, lib
from ..types import BATCH_MAP_TYPES, PERCPU_MAP_TYPES, MapType, UpdateFlags, named
from .kernel import obj_get, obj_info

ANY, EXIST = UpdateFlags.ANY, UpdateFlags.EXIST


def _add(a, b):
    """Field by field: ints, namedtuples of ints, and arrays of either."""
    if isinstance(a, tuple) and hasattr(a, "_fields"):
        return type(a)(*(_add(x, y) for x, y in zip(a, b)))
    if isinstance(a, (list, tuple)):
        return [_add(x, y) for x, y in zip(a, b)]
    return a + b


def _check_like(info, like):
    """A map opened `like` one of an object is read with that one's codecs and buffer sizes: its
    type, key and value sizes, and (where both carry BTF) the layout of its keys and values must
    be that map's. LayoutError says what differs."""
    where = f"map {like.name}"
    if info.type != like.type:
        raise LayoutError(f"{where} is a {named(MapType, info.type).name.lower()} map here, "
                          f"a {like.type.name.lower()} map in this build")
    sizes = (info.key_size, info.value_size)
    if sizes != (like.key_codec.size, like.value_codec.size):
        raise LayoutError(f"{where} has {sizes[0]}-byte keys and {sizes[1]}-byte values here, "
                          f"{like.key_codec.size} and {like.value_codec.size} in this build")
    if not info.btf_id or like.object is None or like.object.btf is None:
        return
    try:
        with _btf.kernel_btf(info.btf_id) as btf:
            for what, type_id, codec in (("keys", info.btf_key_type_id, like.key_codec),
                                         ("values", info.btf_value_type_id, like.value_codec)):
                if type_id and _btf.layout(btf.codec(type_id)) != _btf.layout(codec):
                    raise LayoutError(f"{where} lays its {what} out otherwise here than this build does")
    except LookupError:  # the kernel freed that BTF (no program holds it): the sizes are what is left
        return


class Map(MutableMapping):
    """A BPF map as a dict: keys and values are encoded/decoded from BTF.

    Per-CPU maps return a list with one value per possible CPU; `sum(key)` adds them up. A map of
    an Object is a view of it (it raises ValueError once the object is closed); one opened from a
    pin or an id owns its file descriptor until close(). Kernel errors raise LibbpfError (errno
    set); a missing key raises KeyError."""

    def __init__(self, name, map_type, key_codec, value_codec, section=""):
        self.name, self.type, self.section = name, named(MapType, map_type), section
        self.key_codec, self.value_codec = key_codec, value_codec
        self.percpu = map_type in PERCPU_MAP_TYPES
        self.ncpus = lib.libbpf_num_possible_cpus() if self.percpu else 1
        self._slot = (value_codec.size + 7) // 8 * 8 if self.percpu else value_codec.size
        self.object = self._map = self._owned_fd = self._max_entries = None
        self._closed = False

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
        return cls._of_fd(obj_get(path), like)

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
        info = obj_info(fd, "bpf_map_info")
        if like is not None:
            try:
                _check_like(info, like)
            except BaseException:
                os.close(fd)
                raise
        key = like.key_codec if like is not None else _btf.plain_codec(info.key_size)
        value = like.value_codec if like is not None else _btf.plain_codec(info.value_size)
        self = cls(ffi.string(info.name).decode(), info.type, key, value, like.section if like is not None else "")
        self._owned_fd, self._max_entries = fd, info.max_entries
        return self

    def close(self):
        """Close the file descriptor this Map owns (one opened from a pin or an id); once is
        enough, twice does nothing."""
        if self._owned_fd is not None:
            os.close(self._owned_fd)
            self._owned_fd, self._closed = None, True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def _ptr(self):
        if self.object is None:
            raise TypeError(f"map {self.name} was opened from a pin or an id: what it has is in the kernel already")
        self.object._alive(f"map {self.name}")
        return self._map

    @property
    def fd(self):
        if self.object is None:
            if self._closed:
                raise ValueError(f"map {self.name} is closed")
            return self._owned_fd
        fd = lib.bpf_map__fd(self._ptr)
        if fd < 0:
            raise ValueError(f"map {self.name} is not loaded")
        return fd

    @property
    def max_entries(self):
        if self.object is None:
            return self._max_entries
        return lib.bpf_map__max_entries(self._ptr)

    @max_entries.setter
    def max_entries(self, value):
        if self.object is None:
            raise ValueError(f"map {self.name} is loaded: max_entries is set before load")
        self.object._edit("max_entries", self.name, int(value))
        check(lib.bpf_map__set_max_entries(self._ptr, int(value)), f"set max_entries of {self.name}")

    @property
    def initial_value(self):
        """The bytes libbpf loads into a global-data map (.rodata, .data, .bss) at load."""
        size = ffi.new("size_t *")
        ptr = lib.bpf_map__initial_value(self._ptr, size)
        if ptr == ffi.NULL:
            raise TypeError(f"map {self.name} has no initial value (not a global-data map)")
        return ffi.buffer(ptr, size[0])[:]

    @initial_value.setter
    def initial_value(self, raw):
        self.object._edit("initial_value", self.name, bytes(raw))
        check(lib.bpf_map__set_initial_value(self._ptr, ffi.from_buffer(bytes(raw)), len(raw)),
              f"set the initial value of {self.name}")

    @property
    def id(self):
        return obj_info(self.fd, "bpf_map_info").id

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
            except NotSupportedError:
                pass
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
                raise libbpf_error(f"batch lookup in map {self.name}", ret)
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
