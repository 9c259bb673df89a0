# SPDX-License-Identifier: MIT
"""Encode and decode map keys and values from the object's BTF.

The C header is the one layout: a `struct sock_key` in bpf/bypass.h becomes, in Python, a
namedtuple `sock_key` with the same field names, read at the offsets BTF records. Integers become
ints, `char[N]` becomes str, other arrays lists, nested structs nested namedtuples. A global-data
section (.rodata, .data, .bss: a DATASEC) reads as a namedtuple of its variables.
"""

import collections
import contextlib
import enum
import sys

from .libbpf import ffi, lib

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = 14, 15, 16, 17, 18, 19
_MODIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)
_INT_SIGNED, _INT_CHAR = 1, 2


class IntCodec:
    def __init__(self, size, signed=False, bits=None, bit_offset=0):
        self.size, self.signed = size, signed
        self.bits, self.bit_offset = bits, bit_offset

    def decode(self, buf, offset=0):
        value = int.from_bytes(buf[offset:offset + self.size], sys.byteorder, signed=self.signed)
        if self.bits is not None:
            value = (value >> self.bit_offset) & ((1 << self.bits) - 1)
        return value

    def encode_into(self, value, buf, offset=0):
        value = int(value)
        if self.bits is not None:
            mask = ((1 << self.bits) - 1) << self.bit_offset
            old = int.from_bytes(buf[offset:offset + self.size], sys.byteorder)
            value = (old & ~mask) | ((value << self.bit_offset) & mask)
            buf[offset:offset + self.size] = value.to_bytes(self.size, sys.byteorder)
            return
        buf[offset:offset + self.size] = value.to_bytes(self.size, sys.byteorder, signed=self.signed)


class BytesCodec:
    """Opaque bytes: maps without BTF for a key/value of odd size."""

    def __init__(self, size):
        self.size = size

    def decode(self, buf, offset=0):
        return bytes(buf[offset:offset + self.size])

    def encode_into(self, value, buf, offset=0):
        value = bytes(value)
        if len(value) != self.size:
            raise ValueError(f"expected {self.size} bytes, got {len(value)}")
        buf[offset:offset + self.size] = value


class CharArrayCodec(BytesCodec):
    def decode(self, buf, offset=0):
        raw = bytes(buf[offset:offset + self.size])
        return raw.split(b"\0", 1)[0].decode(errors="replace")

    def encode_into(self, value, buf, offset=0):
        raw = value.encode() if isinstance(value, str) else bytes(value)
        if len(raw) > self.size:
            raise ValueError(f"string longer than {self.size} bytes")
        buf[offset:offset + self.size] = raw.ljust(self.size, b"\0")


class ArrayCodec:
    def __init__(self, elem, count):
        self.elem, self.count = elem, count
        self.size = elem.size * count

    def decode(self, buf, offset=0):
        return [self.elem.decode(buf, offset + i * self.elem.size) for i in range(self.count)]

    def encode_into(self, value, buf, offset=0):
        if isinstance(value, (bytes, bytearray)) and len(value) == self.size:
            buf[offset:offset + self.size] = value
            return
        value = list(value)
        if len(value) > self.count:
            raise ValueError(f"array of {self.count} elements, got {len(value)}")
        for i, item in enumerate(value):
            self.elem.encode_into(item, buf, offset + i * self.elem.size)


class StructCodec:
    """A struct or union: a namedtuple type with the C member names."""

    def __init__(self, name, size, members, union=False):
        self.size, self.union = size, union
        self.members = members  # [(name, byte_offset, codec)]
        self.type = collections.namedtuple(name or "anon", [m[0] for m in members], rename=True)
        self.type.__doc__ = f"BTF {'union' if union else 'struct'} {name}"

    def decode(self, buf, offset=0):
        return self.type(*(codec.decode(buf, offset + off) for _, off, codec in self.members))

    def encode_into(self, value, buf, offset=0):
        if isinstance(value, (bytes, bytearray)) and len(value) == self.size:
            buf[offset:offset + self.size] = value
            return
        if isinstance(value, dict):
            unknown = set(value) - {m[0] for m in self.members}
            if unknown:
                raise KeyError(f"{self.type.__name__} has no field {sorted(unknown)[0]!r}")
            items = [(m, value[m[0]]) for m in self.members if m[0] in value]
        else:
            items = list(zip(self.members, value))
        for (_, off, codec), item in items:
            codec.encode_into(item, buf, offset + off)


def encode(codec, value):
    buf = bytearray(codec.size)
    codec.encode_into(value, buf)
    return bytes(buf)


def encode_field(codec, name, value, buf):
    """Write one member of a struct codec's value into buf in place."""
    for member, offset, member_codec in codec.members:
        if member == name:
            member_codec.encode_into(value, buf, offset)
            return
    raise KeyError(f"{codec.type.__name__} has no field {name!r}")


def decode(codec, buf):
    return codec.decode(memoryview(buf))


def plain_codec(size):
    """The codec for a key or value with no BTF: an unsigned int if it fits, else bytes."""
    return IntCodec(size) if size in (1, 2, 4, 8) else BytesCodec(size)


def layout(codec):
    """What a codec reads, as a comparable value: sizes, offsets, member names, nesting."""
    if isinstance(codec, StructCodec):
        return ("union" if codec.union else "struct", codec.size,
                tuple((name, offset, layout(member)) for name, offset, member in codec.members))
    if isinstance(codec, ArrayCodec):
        return ("array", codec.count, layout(codec.elem))
    return (type(codec).__name__, codec.size)


class BTF:
    """Codecs for the types of one BTF (a `struct btf *` its owner frees: an object, or
    kernel_btf()). `alive()` raises once the owner has freed it: every read checks first."""

    def __init__(self, btf_ptr, alive=lambda: None):
        self._ptr, self._alive = btf_ptr, alive
        self._cache = {}

    @property
    def _btf(self):
        self._alive()
        return self._ptr

    def _type(self, type_id):
        t = lib.btf__type_by_id(self._btf, type_id)
        if t == ffi.NULL:
            raise ValueError(f"no BTF type {type_id}")
        return t

    def name(self, t):
        return ffi.string(lib.btf__name_by_offset(self._btf, t.name_off)).decode()

    def codec(self, type_id):
        if type_id not in self._cache:
            self._cache[type_id] = self._build(type_id)
        return self._cache[type_id]

    def _build(self, type_id):
        t = self._type(type_id)
        kind = (t.info >> 24) & 0x1F
        vlen = t.info & 0xFFFF
        kind_flag = t.info >> 31
        extra = ffi.cast("uint32_t *", t + 1)  # kind-specific data follows the btf_type
        if kind in _MODIFIERS:
            return self.codec(t.size_or_type)
        if kind == INT:
            encoding = (extra[0] >> 24) & 0x0F
            return IntCodec(t.size_or_type, signed=bool(encoding & _INT_SIGNED))
        if kind in (ENUM, ENUM64):
            return IntCodec(t.size_or_type, signed=bool(kind_flag))
        if kind == PTR:
            return IntCodec(ffi.sizeof("void *"))
        if kind == FLOAT:
            return BytesCodec(t.size_or_type)
        if kind == ARRAY:
            elem_id, _, count = extra[0], extra[1], extra[2]
            elem = self.codec(elem_id)
            if isinstance(elem, IntCodec) and elem.size == 1 and self._is_char(elem_id):
                return CharArrayCodec(count)
            return ArrayCodec(elem, count)
        if kind in (STRUCT, UNION):
            return self._struct(t, vlen, kind_flag, union=(kind == UNION))
        if kind == VAR:
            return self.codec(t.size_or_type)
        if kind == DATASEC:
            return self._datasec(t, vlen)
        raise ValueError(f"BTF kind {kind} cannot be a map key or value")

    def _is_char(self, type_id):
        t = self._type(type_id)
        while ((t.info >> 24) & 0x1F) in _MODIFIERS:
            t = self._type(t.size_or_type)
        encoding = (ffi.cast("uint32_t *", t + 1)[0] >> 24) & 0x0F
        return bool(encoding & _INT_CHAR) or self.name(t) == "char"

    def _struct(self, t, vlen, kind_flag, union):
        raw = ffi.cast("uint32_t *", t + 1)  # btf_member: name_off, type, offset
        members = []
        for i in range(vlen):
            name_off, member_type, offset = raw[3 * i], raw[3 * i + 1], raw[3 * i + 2]
            bit_offset, bitfield = (offset & 0xFFFFFF, offset >> 24) if kind_flag else (offset, 0)
            codec = self.codec(member_type)
            if bitfield:
                byte = (bit_offset // 8) & ~(codec.size - 1)
                codec = IntCodec(codec.size, codec.signed, bitfield, bit_offset - byte * 8)
                bit_offset = byte * 8
            name = ffi.string(lib.btf__name_by_offset(self._btf, name_off)).decode()
            if not name and isinstance(codec, StructCodec):
                # anonymous struct/union: its members read as if they were ours
                members += [(n, bit_offset // 8 + off, c) for n, off, c in codec.members]
            else:
                members.append((name or f"_{i}", bit_offset // 8, codec))
        return StructCodec(self.name(t), t.size_or_type, members, union)

    def _datasec(self, t, vlen):
        """A section's variables as the members of a struct named after the section."""
        raw = ffi.cast("uint32_t *", t + 1)  # btf_var_secinfo: type (a VAR), offset, size
        members = []
        for i in range(vlen):
            var_id, offset = raw[3 * i], raw[3 * i + 1]
            members.append((self.name(self._type(var_id)), offset, self.codec(var_id)))
        return StructCodec(self.name(t).lstrip(".").replace(".", "_"), t.size_or_type, members)

    def enum(self, name, prefix=""):
        """The C `enum name` as an IntEnum, its members named as in C without `prefix`
        (enum('sock_state', 'STATE_').JOINED)."""
        type_id = lib.btf__find_by_name_kind(self._btf, name.encode(), ENUM)
        if type_id < 0:
            raise KeyError(f"no enum {name} in this BTF")
        t = self._type(type_id)
        raw = ffi.cast("int32_t *", t + 1)  # btf_enum: name_off, val
        members = {}
        for i in range(t.info & 0xFFFF):
            member = ffi.string(lib.btf__name_by_offset(self._btf, raw[2 * i])).decode()
            members[member.removeprefix(prefix)] = raw[2 * i + 1]
        return enum.IntEnum(name, members)

    def type_name(self, type_id):
        """The name of a BTF type ('.rodata' for a section), '' when it has none."""
        return self.name(self._type(type_id)) if type_id else ""


@contextlib.contextmanager
def kernel_btf(btf_id):
    """The BTF the kernel holds as `btf_id` (a pinned map's), freed when the block ends."""
    ptr = lib.btf__load_from_kernel_by_id(btf_id)
    if ptr == ffi.NULL:
        raise LookupError(f"no BTF {btf_id} in the kernel")
    freed = []

    def alive():
        if freed:
            raise ValueError(f"BTF {btf_id} is freed")

    try:
        yield BTF(ptr, alive)
    finally:
        freed.append(True)
        lib.btf__free(ptr)
