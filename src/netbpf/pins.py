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
import stat
from pathlib import Path

from . import mounts, object_file
from .errors import LayoutError, NetbpfError, UsageError
from .loader import Link, Map


def pin_name(map_name):
    return map_name.lstrip(".")


def check_pin_dir(path):
    """A pin directory must be on bpffs (mounted on demand at /sys/fs/bpf), and safe to act on
    (trusted_below_mount)."""
    path = Path(os.path.normpath(path))
    if not path.is_absolute():
        raise UsageError(f"pin directory {path} is not an absolute path")
    if str(path).startswith(mounts.BPFFS):
        mounts.ensure_bpffs()
    trusted_below_mount(path)
    return path


def trusted_below_mount(path):
    """Check that every directory of `path` below its bpffs mount that exists is a directory
    (not a symlink), this user's (root's) and writable by nobody else: whoever can write one of
    them can plant notes and pins there that a later detach would act on (a tc filter of any
    interface, a link). Returns the mount point."""
    mount = mounts.bpffs_mount_of(path)
    if mount is None:
        raise UsageError(f"pin directory {path} is not on a bpffs mount")
    directory = Path(mount)
    for part in path.relative_to(mount).parts:
        directory = directory / part
        try:
            st = os.lstat(directory)
        except FileNotFoundError:
            break
        _check_trusted(directory, st)
    return mount


def _check_trusted(directory, st):
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"pin directory: {directory} is a symlink; netbpf does not follow links there")
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"pin directory: {directory} is not a directory")
    if st.st_uid != os.geteuid():
        raise UsageError(f"pin directory: {directory} belongs to uid {st.st_uid}, not to this user "
                         f"(uid {os.geteuid()}); remove it or choose another --pin-dir")
    if st.st_mode & 0o022:
        raise UsageError(f"pin directory: {directory} is writable by others (mode {st.st_mode & 0o7777:o}); "
                         "remove it or choose another --pin-dir")


def make_pin_dir(path):
    """Create the directories of `path` that are missing, 0700, checking each that exists (one
    made by someone else meanwhile included)."""
    mount = trusted_below_mount(path)
    directory = Path(mount)
    for part in path.relative_to(mount).parts:
        directory = directory / part
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        _check_trusted(directory, os.lstat(directory))


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
        """The tool's pinned maps by name, decoded with its object file's BTF; closed afterwards.
        Pins of another layout (another build of netbpf pinned them) raise LayoutError."""
        obj, opened = object_file(self.tool.NAME), {}
        trusted_below_mount(self.path)
        try:
            for name in self.tool.MAPS:
                try:
                    opened[name] = Map.open_pinned(self.path / pin_name(name), like=obj.maps[name])
                except LayoutError as exc:
                    raise LayoutError(f"the pins in {self.path} were made by another build of netbpf: {exc} "
                                      "(detach them with that build, or remove the directory)") from None
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
                Map.open_pinned(self.path / pin_name(name), like=obj.maps[name]).close()
            except NetbpfError:  # LayoutError among them
                return False
        return True

    def pin(self, maps, links):
        """Pin the tool's maps (of a loaded Object) and its links {name: Link}; on failure remove
        what was pinned."""
        if self.occupied():
            raise UsageError(f"{self.tool.NAME} is already attached with pins in {self.path} (detach it first)")
        make_pin_dir(self.path)
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
        trusted_below_mount(self.path)
        for name in names:
            if self.has(name):
                self.link(name).detach()

    def remove(self):
        """Detach every pinned link, remove every pin and note, then the directory and the
        parents left empty below the bpffs mount. False when nothing was pinned."""
        if not self.occupied():
            return False
        trusted_below_mount(self.path)
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
