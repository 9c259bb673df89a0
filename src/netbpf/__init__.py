# SPDX-License-Identifier: MIT
"""netbpf: eBPF tools for processes that talk on one host, and a small libbpf loader for Python."""

import functools
import os
from pathlib import Path

from . import libbpf as _libbpf
from .errors import LibbpfError, NetbpfError, ObjectFileError, UsageError, VerifierError
from .loader import ANY, EXIST, NOEXIST, Link, Map, Object, Program, ProgAttachment

__all__ = ["Object", "Program", "Map", "Link", "ProgAttachment", "ANY", "NOEXIST", "EXIST",
           "NetbpfError", "LibbpfError", "VerifierError", "ObjectFileError", "UsageError",
           "libbpf_version", "object_path", "object_file"]

OBJECT_DIR = Path(os.environ.get("NETBPF_OBJECT_DIR", Path(__file__).resolve().parent / "bpf"))


def libbpf_version():
    """'1.1 (/usr/lib/.../libbpf.so.1)': which libbpf this process loaded."""
    major, minor = _libbpf.version()
    return f"{major}.{minor} ({_libbpf.path})"


def object_path(tool):
    """The built BPF object of a tool (`make` puts them in src/netbpf/bpf/)."""
    path = OBJECT_DIR / f"{tool}.bpf.o"
    if not path.exists():
        raise ObjectFileError(f"BPF object {path} not found: run `make` in the netbpf repository first")
    return path


@functools.cache
def object_file(tool):
    """A tool's built object, opened once per process and never loaded: the BTF that its pinned
    maps are decoded with and its enums are named by."""
    return Object(object_path(tool))
