# SPDX-License-Identifier: MIT
"""Network namespaces: which one a process is in, and doing a step inside another one.

A namespace is named by its inode number (what `readlink /proc/PID/ns/net` shows as net:[N]),
as the BPF programs read it from a socket. Entering one changes only the calling thread."""

import contextlib
import ctypes
import os

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def inode_of(pid="thread-self"):
    """The network namespace of a process (default: this thread), or None when it is gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def find_process(inode, pids):
    """One of `pids` that lives in network namespace `inode`, or None."""
    return next((pid for pid in pids if inode_of(pid) == inode), None)


def _setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def enter(path):
    """This thread into the network namespace at `path` (/run/netns/NAME, /proc/PID/ns/net) for good."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _setns(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def entered(pid):
    """This thread in the network namespace of process `pid` while the block runs, then back in
    its own. Raises OSError when the process is gone."""
    target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)
