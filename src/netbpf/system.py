# SPDX-License-Identifier: MIT
"""The system commands netbpf runs as root (ip, tc, mount), found in the system's own
directories and never through the caller's PATH: a root tool that runs `ip` from a directory
another user can write runs that user's code."""

import functools
import os
import subprocess

from .errors import UsageError

TRUSTED_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
PACKAGES = {"ip": "iproute2", "tc": "iproute2", "mount": "mount"}


@functools.cache
def command(name):
    """The absolute path of system command `name`: the first executable of that name in
    TRUSTED_DIRS, which must be root's and writable by nobody else."""
    for directory in TRUSTED_DIRS:
        path = os.path.join(directory, name)
        try:
            st = os.stat(path)
        except OSError:
            continue
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise UsageError(f"{path} is not root's alone (owner uid {st.st_uid}, mode {st.st_mode & 0o7777:o}): "
                             "netbpf does not run it")
        if os.access(path, os.X_OK):
            return path
    package = PACKAGES.get(name, name)
    raise UsageError(f"{name} not found in {', '.join(TRUSTED_DIRS)} (Debian: apt-get install {package})")


def run(name, *args, **kwargs):
    """subprocess.run() of system command `name` with `args` (found by command())."""
    return subprocess.run([command(name), *args], **kwargs)
