# SPDX-License-Identifier: MIT
"""PinDir: a tool's attachment pinned on bpffs, and the one place that knows that layout.

    pins = PinDir(Bypass, "/sys/fs/bpf/netbpf/bypass")
    if pins.attached():
        with pins.maps() as maps: ...

In the directory: one pin per link, named as the tool names its links; one per map of the
tool's MAPS, named as the map without a section's dot ('.rodata' -> 'rodata'); and notes, symlinks
whose target is their text (bypass: "mechanisms")."""

import contextlib
import os
from pathlib import Path

from . import mounts, object_file
from .errors import NetbpfError, UsageError
from .loader import Link, Map


def pin_name(map_name):
    return map_name.lstrip(".")


def check_pin_dir(path):
    """A pin directory must be on bpffs (mounted on demand at /sys/fs/bpf)."""
    path = Path(path)
    if str(path).startswith(mounts.BPFFS):
        mounts.ensure_bpffs()
    parent = path if path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not mounts.is_bpffs(parent):
        raise UsageError(f"pin directory {path} is not on a bpffs mount")
    return path


class PinDir:
    """The pins of one tool (an Attachment subclass: its NAME, MAPS and PIN_CHECK) in `path`."""

    def __init__(self, tool, path):
        self.tool, self.path = tool, Path(path)

    def __repr__(self):
        return f"<PinDir {self.tool.NAME} {self.path}>"

    def occupied(self):
        """Whether anything is pinned here: a whole attachment, or what is left of one."""
        return self.path.is_dir() and any(self.path.iterdir())

    def attached(self):
        """Whether the tool is attached with these pins: its PIN_CHECK link is there (the link
        that goes last when it detaches)."""
        return self.has(self.tool.PIN_CHECK)

    def has(self, name):
        return os.path.lexists(self.path / name)

    def link(self, name):
        """A pinned link, reopened (to detach it, or read its info)."""
        return Link.open_pinned(self.path / name)

    def note(self, name):
        return os.readlink(self.path / name)

    def write_note(self, name, text):
        os.symlink(text, self.path / name)

    @contextlib.contextmanager
    def maps(self):
        """The tool's pinned maps by name, decoded with its object file's BTF; closed afterwards."""
        obj, opened = object_file(self.tool.NAME), {}
        try:
            for name in self.tool.MAPS:
                opened[name] = Map.open_pinned(self.path / pin_name(name), like=obj.maps[name])
            yield opened
        finally:
            for pinned in opened.values():
                pinned.close()

    def match_object(self):
        """Whether the pinned maps have the key and value sizes of this netbpf's object file (an
        older or newer netbpf may have pinned other layouts)."""
        obj = object_file(self.tool.NAME)
        for name in self.tool.MAPS:
            try:
                pinned = Map.open_pinned(self.path / pin_name(name))
            except NetbpfError:
                return False
            with pinned:
                ours = obj.maps[name]
                if (pinned.key_codec.size, pinned.value_codec.size) != (ours.key_codec.size, ours.value_codec.size):
                    return False
        return True

    def pin(self, maps, links):
        """Pin the tool's maps (of a loaded Object) and its links {name: Link}; on failure remove
        what was pinned."""
        if self.occupied():
            raise UsageError(f"{self.tool.NAME} is already attached with pins in {self.path} (detach it first)")
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            for name in self.tool.MAPS:
                maps[name].pin(self.path / pin_name(name))
            for name, link in links.items():
                link.pin(self.path / name)
        except BaseException:
            self.remove()
            raise

    def detach(self, *names):
        """Detach these pinned links now (whoever else holds them) and remove their pins."""
        for name in names:
            if self.has(name):
                self.link(name).detach()

    def remove(self):
        """Detach every pinned link, remove every pin and note, then the directory and the
        parents left empty below the bpffs mount. False when nothing was pinned."""
        if not self.occupied():
            return False
        maps = {pin_name(name) for name in self.tool.MAPS}
        for entry in sorted(self.path.iterdir()):
            if entry.is_symlink():  # a note
                entry.unlink()
            elif entry.name not in maps:
                self.detach(entry.name)
        for name in maps:
            if self.has(name):
                (self.path / name).unlink()
        for directory in (self.path, *self.path.parents):
            if str(directory) == mounts.BPFFS or not mounts.is_bpffs(directory):
                break
            try:
                directory.rmdir()
            except OSError:  # not empty: someone else's pins live there
                break
        return True
