# SPDX-License-Identifier: MIT
"""Attachment: what both tools are as a library: a BPF object loaded, attached to one cgroup,
pinned on request, detached and unloaded on close."""

from . import cgroup, object_path
from .errors import UsageError
from .loader import Object, programs_on_cgroup
from .pins import PinDir


class Attachment:
    """A tool's BPF object attached to one cgroup. A subclass names

        NAME       the tool, and its object file NAME.bpf.o
        MAPS       the maps pinned beside the links, which status reads back
        MARKER     (attach type, program name): seeing it on a cgroup means "already attached"
        PIN_CHECK  the link whose pin exists exactly while the tool is attached with pins

    and fills in _prepare(obj) before load (or all of _load_object()), _configure(maps) after
    load, _attach_links(), which yields (link name, function that attaches and returns the Link,
    or None for an optional one the kernel refused) in attach order, and pinned_settings(maps,
    pins), which reads settings() back from a pinned attachment."""

    NAME = MAPS = MARKER = PIN_CHECK = None

    def __init__(self, cgroup_dir=None):
        self.cgroup = cgroup.resolve(cgroup_dir)
        self.object_file = None  # another build of the tool's object than make's (evaluate.ab)
        self.obj = None
        self.links = {}

    def _prepare(self, obj):
        pass

    def _configure(self, maps):
        pass

    def _attach_links(self):
        raise NotImplementedError

    def _new_object(self):
        """The tool's object, opened and _prepare()d, not loaded."""
        obj = Object(self.object_file or object_path(self.NAME))
        try:
            self._prepare(obj)
        except BaseException:
            obj.close()
            raise
        return obj

    def _load_object(self):
        """The tool's object, prepared and loaded (a subclass may choose among its programs here)."""
        obj = self._new_object()
        try:
            obj.load()
        except BaseException:
            obj.close()
            raise
        return obj

    def settings(self):
        """What defines this attachment, under the keys `status` reports them: `serve` takes
        over pins that hold the same."""
        return {"cgroup": str(self.cgroup)}

    @classmethod
    def pinned_settings(cls, pins, maps):
        """settings() of the attachment pinned in `pins` (a PinDir; `maps`: its open maps)."""
        raise NotImplementedError

    @classmethod
    def pins(cls, path):
        """The PinDir of this tool at path."""
        return PinDir(cls, path)

    def feature_notes(self):
        """One line for each kernel feature the attachment had to do without."""
        return []

    def _already_attached(self):
        """Whether this tool is attached to self.cgroup already (its MARKER program is there)."""
        attach_type, program = self.MARKER
        return program in programs_on_cgroup(self.cgroup, attach_type)

    def attach(self):
        if self._already_attached():
            raise UsageError(f"{self.NAME} is already attached to {self.cgroup} (detach it first)")
        try:
            self.obj = self._load_object()
            self._configure(self.obj.maps)
            for name, attach in self._attach_links():
                link = attach()
                if link is not None:  # an optional attachment the kernel refused
                    self.links[name] = link
        except BaseException:
            self.close()
            raise
        return self

    def pin(self, pin_dir):
        """Make the attachment outlive this process: links and maps pinned under pin_dir."""
        self.pins(pin_dir).pin(self.obj.maps, self.links)

    def close(self):
        """Detach everything this process attached and was not pinned, and unload."""
        for name in reversed(list(self.links)):
            self.links.pop(name).close()
        if self.obj is not None:
            self.obj.close()
            self.obj = None

    def __enter__(self):
        return self.attach() if self.obj is None else self

    def __exit__(self, *exc):
        self.close()

    @classmethod
    def detach_pinned(cls, pin_dir):
        """Remove every link and map `attach` pinned in pin_dir. False when nothing was there."""
        return cls.pins(pin_dir).remove()
