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
            hint = " (BPF needs root: CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)"
        OSError.__init__(self, err, f"{what}: {strerror(err)}{hint}")

    def __str__(self):
        return self.strerror


class VerifierError(LibbpfError):
    """The kernel's verifier refused a program. `log` holds its complete log."""

    SUMMARY_LINES = 6

    def __init__(self, program, err, log):
        self.program = program
        self.log = log
        super().__init__(f"verifier rejected program '{program}'", err, log)

    def __str__(self):
        lines = [line for line in self.log.splitlines() if line.strip()]
        tail = lines[-self.SUMMARY_LINES:]
        more = f"\n  ... {len(lines) - len(tail)} earlier lines in .log" if len(lines) > len(tail) else ""
        return f"{self.strerror}{more}\n  " + "\n  ".join(tail)


def check(ret, what):
    """Raise LibbpfError for a negative return code (libbpf 1.x returns -errno)."""
    if ret < 0:
        raise LibbpfError(what, ret)
    return ret


def check_ptr(ptr, what):
    """Raise LibbpfError for a NULL pointer return (libbpf 1.x then sets errno)."""
    if ptr == ffi.NULL:
        raise LibbpfError(what, ffi.errno or _errno.EINVAL)
    return ptr
