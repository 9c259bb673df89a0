# SPDX-License-Identifier: MIT
"""One exception hierarchy for everything the loader and the tools raise."""

import errno as _errno

from .libbpf import ffi, lib


def strerror(err):
    """libbpf's text for an error code (it knows its own codes >= 4000 as well as errno)."""
    err = abs(err)
    buf = ffi.new("char[]", 256)
    lib.libbpf_strerror(err, buf, len(buf))
    text = ffi.string(buf).decode(errors="replace")
    name = _errno.errorcode.get(err)
    return f"{text} ({name})" if name else text


class NetbpfError(Exception):
    """Base of every netbpf error."""


class UsageError(NetbpfError):
    """Bad input from the user: the CLI prints it in one line and exits 2."""


class MissingFeatureError(UsageError):
    """The running kernel lacks (or its verifier refuses) every way to do a job the tool needs:
    one line and exit 2, as for bad input, and nothing stays attached."""


class LayoutError(UsageError):
    """A pinned map does not have the layout this netbpf's object gives it (another build pinned
    it): reading it would misread every entry."""


class ObjectFileError(NetbpfError):
    """A BPF object file is missing, unreadable or not a BPF ELF object."""


class LibbpfError(NetbpfError, OSError):
    """A libbpf call or bpf() syscall failed; `errno` holds the positive error code."""

    def __init__(self, what, err, details=""):
        err = abs(err)
        self.what = what
        self.details = details
        hint = ""
        if err == _errno.EPERM and not isinstance(self, VerifierError):
            hint = " (BPF needs root: CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and CAP_SYS_ADMIN)"
        OSError.__init__(self, err, f"{what}: {strerror(err)}{hint}")

    def __str__(self):
        return self.strerror


class NotSupportedError(LibbpfError):
    """The kernel has no such operation or attachment (EINVAL, EOPNOTSUPP, or its internal
    ENOTSUPP): the caller may fall back to an older way."""

    ERRNOS = (_errno.EINVAL, _errno.EOPNOTSUPP, 524)  # 524: the kernel's ENOTSUPP, leaked by bpf()


def libbpf_error(what, err, details=""):
    """The LibbpfError for a failed call: NotSupportedError where the errno says "not here"."""
    kind = NotSupportedError if abs(err) in NotSupportedError.ERRNOS else LibbpfError
    return kind(what, err, details)


class VerifierError(LibbpfError):
    """The kernel refused to load a program. `log` holds the verifier's complete log; `reason` the
    line that says why (the last one before the statistics), which the message leads with,
    followed by the source line and instructions just before it. `verified` is False when the
    kernel refused the program before its verifier ran (EPERM for a program type this kernel's
    policy forbids even root): `log` then holds libbpf's messages."""

    SUMMARY_LINES = 6
    _STATISTICS = ("processed ", "verification time", "stack depth", "-- END")

    def __init__(self, program, err, log, verified=True):
        self.program = program
        self.log = log
        self.verified = verified
        super().__init__(f"verifier rejected program '{program}'", err, log)

    def _explaining_lines(self):
        return [line for line in self.log.splitlines() if line.strip() and not line.startswith(self._STATISTICS)]

    @property
    def reason(self):
        lines = self._explaining_lines()
        return lines[-1].strip() if lines else ""

    def __str__(self):
        lines = self._explaining_lines()
        context = lines[-self.SUMMARY_LINES:-1]
        more = f"\n  ... {len(lines) - len(context) - 1} earlier lines in .log" if len(lines) > len(context) + 1 else ""
        head = f"{self.strerror}: {self.reason}" if self.reason else self.strerror
        return head + more + "".join(f"\n  {line}" for line in context)


def check(ret, what):
    """Raise LibbpfError for a negative return code (libbpf 1.x returns -errno)."""
    if ret < 0:
        raise libbpf_error(what, ret)
    return ret


def check_ptr(ptr, what):
    """Raise LibbpfError for a NULL pointer return (libbpf 1.x then sets errno)."""
    if ptr == ffi.NULL:
        raise libbpf_error(what, ffi.errno or _errno.EINVAL)
    return ptr
