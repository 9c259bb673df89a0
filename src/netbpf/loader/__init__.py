# SPDX-License-Identifier: MIT
"""The Python face of libbpf: Object, Program, Map, Link (one module each).

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

from ..types import UpdateFlags
from .kernel import RunStats, loaded_programs, programs_on_cgroup
from .link import Link, ProgAttachment
from .map import Map
from .object import Globals, Object
from .program import Program
from .tc import TcFilter

ANY, NOEXIST, EXIST = UpdateFlags.ANY, UpdateFlags.NOEXIST, UpdateFlags.EXIST

__all__ = ["Object", "Globals", "Program", "Map", "Link", "ProgAttachment", "TcFilter", "ANY", "NOEXIST",
           "EXIST", "RunStats", "loaded_programs", "programs_on_cgroup"]
