# SPDX-License-Identifier: MIT
"""A BPF ELF object checked before libbpf reads it: libbpf trusts the file's offsets, sizes and
type ids, and a damaged or hostile object can crash it (and the interpreter with it). check()
raises ObjectFileError naming the first thing that is out of bounds or malformed:

  - the ELF header, section header table, section names and contents within the file;
  - the symbol table (names, sections, values within their section), relocations (symbols,
    offsets within the section they patch);
  - .BTF: header, string section, every type's size and kind, every type id it refers to, no
    modifier chain or by-value nesting that never ends;
  - .BTF.ext: header, and each func_info, line_info and CO-RE relocation record's strings and
    type ids.

The checks are those of the kernel's and libbpf's own parsers, written out plainly; they judge
shape, not meaning (a well-formed object the verifier refuses passes here)."""

import struct

from ..errors import ObjectFileError

EM_BPF = 247
SHT_NULL, SHT_SYMTAB, SHT_STRTAB, SHT_NOBITS, SHT_REL = 0, 2, 3, 8, 9
SHN_LORESERVE, SHN_ABS, SHN_COMMON = 0xff00, 0xfff1, 0xfff2
BTF_MAGIC = 0xEB9F
# BTF kinds: the size of what follows each `struct btf_type` (12 bytes), per vlen item or fixed
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
FIXED_EXTRA = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
PER_ITEM = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}
REFERS = {PTR, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, VAR, DECL_TAG, TYPE_TAG}  # size_or_type is a type id
MODIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG, VAR}
MAX_CHAIN = 32  # libbpf's MAX_RESOLVE_DEPTH


class _Reader:
    """Bounds-checked little- or big-endian reads of one byte string."""

    def __init__(self, data, order, what):
        self.data, self.order, self.what = data, order, what

    def fail(self, message):
        raise ObjectFileError(f"{self.what}: {message}")

    def unpack(self, fmt, offset):
        size = struct.calcsize(self.order + fmt)
        if offset < 0 or offset + size > len(self.data):
            self.fail(f"a read of {size} bytes at {offset} runs past its end ({len(self.data)} bytes)")
        return struct.unpack_from(self.order + fmt, self.data, offset)


def check(data, what):
    """Raise ObjectFileError unless `data` (the bytes of an object file called `what`) is a
    well-formed BPF ELF object."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise ObjectFileError(f"{what} is not an ELF file")
    if data[4] != 2 or data[5] not in (1, 2):
        raise ObjectFileError(f"{what} is not a 64-bit ELF object")
    elf = _Reader(data, "<" if data[5] == 1 else ">", what)
    machine, = elf.unpack("H", 18)
    if machine != EM_BPF:
        raise ObjectFileError(f"{what} is not a BPF object (ELF machine {machine})")
    sections = _sections(elf)
    names = {index: _section_name(elf, sections, index) for index in range(len(sections))}
    symbols = _symbols(elf, sections)
    _relocations(elf, sections, len(symbols))
    btf = next((i for i, name in names.items() if name == ".BTF"), None)
    if btf is not None:
        strings_len, types = _btf(_Reader(_contents(data, sections[btf]), elf.order, f"{what}: .BTF"))
        ext = next((i for i, name in names.items() if name == ".BTF.ext"), None)
        if ext is not None:
            _btf_ext(_Reader(_contents(data, sections[ext]), elf.order, f"{what}: .BTF.ext"), strings_len, types)


def _contents(data, section):
    return data[section["offset"]:section["offset"] + section["size"]]


def _sections(elf):
    shoff, = elf.unpack("Q", 40)
    shentsize, shnum, shstrndx = elf.unpack("HHH", 58)
    if shnum == 0 or shentsize != 64:
        elf.fail(f"section header table of {shnum} entries of {shentsize} bytes")
    if shstrndx >= shnum:
        elf.fail(f"section name table {shstrndx} is not among its {shnum} sections")
    if shoff + shnum * 64 > len(elf.data):
        elf.fail("the section header table runs past the end of the file")
    sections = []
    for index in range(shnum):
        name, kind, _, _, offset, size, link, info, _, entsize = elf.unpack("IIQQQQIIQQ", shoff + index * 64)
        if kind not in (SHT_NULL, SHT_NOBITS) and offset + size > len(elf.data):
            elf.fail(f"section {index} ({size} bytes at {offset}) runs past the end of the file")
        if link >= shnum:
            elf.fail(f"section {index} links to section {link}, of {shnum}")
        sections.append({"name": name, "type": kind, "offset": offset, "size": size, "link": link, "info": info,
                         "entsize": entsize})
    if sections[shstrndx]["type"] != SHT_STRTAB:
        elf.fail("the section name table is no string table")
    return sections


def _string(elf, table, offset, what):
    """The NUL-terminated string at `offset` of string table section `table`."""
    if offset >= table["size"]:
        elf.fail(f"{what} starts at {offset}, past its string table ({table['size']} bytes)")
    start = table["offset"] + offset
    end = elf.data.find(b"\0", start, table["offset"] + table["size"])
    if end < 0:
        elf.fail(f"{what} runs past the end of its string table")
    return elf.data[start:end].decode("utf-8", errors="replace")


def _section_name(elf, sections, index):
    shstrndx, = elf.unpack("H", 62)
    return _string(elf, sections[shstrndx], sections[index]["name"], f"the name of section {index}")


def _symbols(elf, sections):
    tables = [i for i, s in enumerate(sections) if s["type"] == SHT_SYMTAB]
    if len(tables) != 1:
        elf.fail(f"{len(tables)} symbol tables (a BPF object has one)")
    table = sections[tables[0]]
    if table["entsize"] != 24 or table["size"] % 24:
        elf.fail(f"symbol table entries of {table['entsize']} bytes in {table['size']}")
    strings = sections[table["link"]]
    if strings["type"] != SHT_STRTAB:
        elf.fail("the symbol table's names are no string table")
    symbols = []
    for number in range(table["size"] // 24):
        name, _, _, shndx, value, size = elf.unpack("IBBHQQ", table["offset"] + number * 24)
        _string(elf, strings, name, f"the name of symbol {number}")
        if SHN_LORESERVE <= shndx and shndx not in (SHN_ABS, SHN_COMMON):
            elf.fail(f"symbol {number} is in reserved section {shndx:#x}")
        if shndx and shndx < SHN_LORESERVE:
            if shndx >= len(sections):
                elf.fail(f"symbol {number} is in section {shndx}, of {len(sections)}")
            if value + size > sections[shndx]["size"]:
                elf.fail(f"symbol {number} ({size} bytes at {value}) runs past its section")
        symbols.append((name, shndx, value, size))
    return symbols


def _relocations(elf, sections, symbol_count):
    for index, section in enumerate(sections):
        if section["type"] != SHT_REL:
            continue
        if section["entsize"] != 16 or section["size"] % 16:
            elf.fail(f"relocation section {index} has entries of {section['entsize']} bytes in {section['size']}")
        if sections[section["link"]]["type"] != SHT_SYMTAB or section["info"] >= len(sections):
            elf.fail(f"relocation section {index} names no symbol table or target section")
        target = sections[section["info"]]
        for entry in range(section["size"] // 16):
            offset, info = elf.unpack("QQ", section["offset"] + entry * 16)
            if info >> 32 >= symbol_count:
                elf.fail(f"relocation {entry} of section {index} names symbol {info >> 32}, of {symbol_count}")
            if offset >= target["size"]:
                elf.fail(f"relocation {entry} of section {index} patches offset {offset}, past its target")


def _btf(btf):
    """Check .BTF; returns (the length of its string section, its types as (kind, vlen, ref))."""
    magic, version, flags, hdr_len = btf.unpack("HBBI", 0)
    if magic != BTF_MAGIC or version != 1 or flags:
        btf.fail(f"header magic {magic:#x} version {version} flags {flags}")
    type_off, type_len, str_off, str_len = btf.unpack("IIII", 8)
    body = len(btf.data) - hdr_len
    if hdr_len < 24 or body < 0 or type_off % 4 or type_off + type_len > body or str_off + str_len > body:
        btf.fail("its header's sections do not fit in it")
    if type_off < str_off + str_len and str_off < type_off + type_len:
        btf.fail("its type and string sections overlap")
    strings = btf.data[hdr_len + str_off:hdr_len + str_off + str_len]
    if not strings or strings[0] != 0 or strings[-1] != 0:
        btf.fail("its string section does not start and end with NUL")
    types, offset, end = [None], hdr_len + type_off, hdr_len + type_off + type_len
    while offset < end:
        name_off, info, size_or_type = btf.unpack("III", offset)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        if not INT <= kind <= ENUM64 or info & 0x60FF0000:
            btf.fail(f"type {len(types)} has kind {kind} (info {info:#x})")
        if name_off >= str_len:
            btf.fail(f"type {len(types)} is named past the string section")
        extra = FIXED_EXTRA.get(kind, 0) + PER_ITEM.get(kind, 0) * vlen
        if offset + 12 + extra > end:
            btf.fail(f"type {len(types)} runs past the type section")
        types.append((kind, vlen, size_or_type, offset + 12, name_off))
        offset += 12 + extra
    for number, (kind, vlen, size_or_type, items, _) in enumerate(types[1:], 1):
        _btf_type(btf, number, kind, vlen, size_or_type, items, len(types), str_len)
    _btf_no_endless_types(btf, types)
    return str_len, types


def _btf_type(btf, number, kind, vlen, size_or_type, items, count, str_len):
    def refer(type_id, what):
        if type_id >= count:
            btf.fail(f"type {number}'s {what} is type {type_id}, of {count - 1}")

    def named(name_off, what):
        if name_off >= str_len:
            btf.fail(f"type {number}'s {what} is named past the string section")

    if kind in REFERS:
        refer(size_or_type, "target")
    elif kind == INT and size_or_type not in (1, 2, 4, 8, 16):
        btf.fail(f"integer type {number} of {size_or_type} bytes")
    elif kind == ARRAY:
        element, index, _ = btf.unpack("III", items)
        refer(element, "element")
        refer(index, "index")
    elif kind in (STRUCT, UNION, DATASEC, FUNC_PROTO):
        if kind == FUNC_PROTO:
            refer(size_or_type, "return type")
        step = PER_ITEM[kind]
        for i in range(vlen):
            first, second = btf.unpack("II", items + i * step)
            if kind == DATASEC:
                refer(first, "variable")  # offsets: libbpf fixes them up from the symbols
            else:
                named(first, f"member {i}")
                refer(second, f"member {i}")
    elif kind in (ENUM, ENUM64):
        for i in range(vlen):
            named(btf.unpack("I", items + i * PER_ITEM[kind])[0], f"value {i}")


def _btf_no_endless_types(btf, types):
    """Every chain of modifiers ends within MAX_CHAIN steps, and no struct, union or array holds
    itself by value: libbpf and the codecs would resolve them forever."""
    for number in range(1, len(types)):
        seen, current = 0, number
        while current and types[current][0] in MODIFIERS:
            current, seen = types[current][2], seen + 1
            if seen > MAX_CHAIN:
                btf.fail(f"type {number} is a chain of more than {MAX_CHAIN} modifiers")
    state = {}  # 1: being walked, 2: done

    def holds(number):
        """Walk the types `number` holds by value (iteratively: no recursion limit to meet)."""
        stack = [(number, iter(_held(btf, types, number)))]
        state[number] = 1
        while stack:
            current, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[current] = 2
                stack.pop()
            elif state.get(child) == 1:
                btf.fail(f"type {child} holds itself by value")
            elif child not in state:
                state[child] = 1
                stack.append((child, iter(_held(btf, types, child))))

    for number in range(1, len(types)):
        if number not in state:
            holds(number)


def _held(btf, types, number):
    """The type ids type `number` contains by value (not through a pointer)."""
    kind, vlen, size_or_type, items, _ = types[number]
    if kind in MODIFIERS:
        return [size_or_type] if size_or_type else []
    if kind == ARRAY:
        return [btf.unpack("I", items)[0]]
    if kind in (STRUCT, UNION):
        return [btf.unpack("I", items + i * 12 + 4)[0] for i in range(vlen)]
    if kind == DATASEC:
        return [btf.unpack("I", items + i * 12)[0] for i in range(vlen)]
    return []


def _btf_ext(ext, str_len, types):
    magic, version, flags, hdr_len = ext.unpack("HBBI", 0)
    if magic != BTF_MAGIC or version != 1 or flags:
        ext.fail(f"header magic {magic:#x} version {version} flags {flags}")
    if hdr_len < 24 or hdr_len > len(ext.data):
        ext.fail(f"header of {hdr_len} bytes")
    parts = [("func_info", 8, 8), ("line_info", 16, 16)] + ([("core_relo", 24, 16)] if hdr_len >= 32 else [])
    for name, at, smallest in parts:
        offset, length = ext.unpack("II", at)
        if not length:
            continue
        start, end = hdr_len + offset, hdr_len + offset + length
        if offset % 4 or end > len(ext.data):
            ext.fail(f"{name} does not fit in it")
        _btf_ext_records(_Reader(ext.data[start:end], ext.order, f"{ext.what} {name}"), name, smallest, str_len,
                         len(types))


def _btf_ext_records(part, name, smallest, str_len, type_count):
    record_size, = part.unpack("I", 0)
    if record_size < smallest or record_size % 4:
        part.fail(f"records of {record_size} bytes")
    offset = 4
    while offset < len(part.data):
        section_name, count = part.unpack("II", offset)
        if section_name >= str_len or not count or offset + 8 + count * record_size > len(part.data):
            part.fail(f"a section's records at {offset} do not fit")
        for record in range(count):
            at = offset + 8 + record * record_size
            if name == "func_info":
                _, type_id = part.unpack("II", at)
                strings = ()
            elif name == "line_info":
                _, file_name, line, _ = part.unpack("IIII", at)
                type_id, strings = 0, (file_name, line)
            else:
                _, type_id, access, _ = part.unpack("IIII", at)
                strings = (access,)
            if type_id >= type_count or any(s >= str_len for s in strings):
                part.fail(f"record {record} at {at} names a type or string that does not exist")
        offset += 8 + count * record_size
