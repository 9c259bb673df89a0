# SPDX-License-Identifier: MIT
"""What the running kernel can do, found by asking it (tiny loads), not by its version number.

Each probe is cached; `summary()` is what the tools' `status` shows."""

import contextlib
import errno
import fcntl
import functools
import os
import platform
import select
import socket
import struct
import termios
import threading
import time
from pathlib import Path

from .errors import LibbpfError
from .libbpf import ffi, lib
from .types import AttachType, MapType, ProgType

FUNC_PROBE_WRITE_USER = 36
ATTACH = {"getsockname4": AttachType.CGROUP_INET4_GETSOCKNAME, "getpeername4": AttachType.CGROUP_INET4_GETPEERNAME,
          "sock_release": AttachType.CGROUP_INET_SOCK_RELEASE, "bind4": AttachType.CGROUP_INET4_BIND}
# (code, dst | src << 4, off, imm)
_RETURN_ONE = [(0xB7, 0, 0, 1), (0x95, 0, 0, 0)]  # r0 = 1; exit
_WRITE_USER = [(0x7A, 10, -8, 0),          # *(u64 *)(r10 - 8) = 0
               (0xB7, 1, 0, 0),            # r1 = 0 (the user address: never reached, only verified)
               (0xBF, 2 | 10 << 4, 0, 0),  # r2 = r10
               (0x07, 2, 0, -8),           # r2 += -8
               (0xB7, 3, 0, 8),            # r3 = 8
               (0x85, 0, 0, FUNC_PROBE_WRITE_USER), (0xB7, 0, 0, 0), (0x95, 0, 0, 0)]  # call; r0 = 0; exit


def _load(prog_type, attach_type, program=_RETURN_ONE):
    insns = ffi.new("struct bpf_insn[]", [{"code": c, "regs": r, "off": o, "imm": i} for c, r, o, i in program])
    opts = ffi.new("struct bpf_prog_load_opts *", {"sz": ffi.sizeof("struct bpf_prog_load_opts"),
                                                   "expected_attach_type": attach_type})
    return lib.bpf_prog_load(prog_type, b"netbpf_probe", b"GPL", insns, len(program), opts)


def _refused(err):
    """False: the kernel lacks the feature. A refusal for want of privileges is no answer about
    the kernel and raises LibbpfError (EPERM, saying what is needed)."""
    if -err == errno.EPERM:
        raise LibbpfError("probe the kernel's BPF features", err)
    return False


def _loads(prog_type, attach_type=0, program=_RETURN_ONE):
    """Whether the kernel takes the program."""
    fd = _load(prog_type, attach_type, program)
    if fd < 0:
        return _refused(fd)
    os.close(fd)
    return True


@functools.lru_cache(maxsize=None)
def cgroup_hook(name):
    """Whether the kernel has the cgroup hook `name` (getsockname4: 5.8, sock_release: 5.9)."""
    prog_type = ProgType.CGROUP_SOCK if name == "sock_release" else ProgType.CGROUP_SOCK_ADDR
    return _loads(prog_type, ATTACH[name])


@functools.lru_cache(maxsize=None)
def sockmap_link():
    """Whether sk_msg programs attach to a sockmap with a bpf_link (6.10+)."""
    prog = _load(ProgType.SK_MSG, AttachType.SK_MSG_VERDICT)
    if prog < 0:
        return _refused(prog)
    sockhash = lib.bpf_map_create(MapType.SOCKHASH, b"netbpf_probe", 8, 8, 1, ffi.NULL)
    try:
        if sockhash < 0:
            return False
        link = lib.bpf_link_create(prog, sockhash, AttachType.SK_MSG_VERDICT, ffi.NULL)
        if link < 0:
            return False
        os.close(link)
        return True
    finally:
        os.close(prog)
        if sockhash >= 0:
            os.close(sockhash)


FUNC_MSG_REDIRECT_MAP, BPF_F_INGRESS, BPF_PSEUDO_MAP_FD = 60, 1, 1


def _redirect_to_key_0(map_fd):
    """An sk_msg program: every message goes to the ingress of the socket at key 0 of map_fd."""
    return [(0x18, 2 | BPF_PSEUDO_MAP_FD << 4, 0, map_fd), (0, 0, 0, 0),  # r2 = the map (ld_imm64)
            (0xB7, 3, 0, 0), (0xB7, 4, 0, BPF_F_INGRESS),                # r3 = key 0; r4 = BPF_F_INGRESS
            (0x85, 0, 0, FUNC_MSG_REDIRECT_MAP), (0x95, 0, 0, 0)]        # call; exit with its verdict


@contextlib.contextmanager
def _redirecting_pair(redirect=True):
    """(receiver, sender): a blocking loopback pair of this process in a SOCKMAP whose sk_msg
    program redirects every send into the receiver (redirect=False: passes every send to TCP).
    None when the kernel refuses a step."""
    sockmap = lib.bpf_map_create(MapType.SOCKMAP, b"netbpf_probe", 4, 4, 2, ffi.NULL)
    if sockmap < 0:
        _refused(sockmap)
        yield None
        return
    prog, pair = -1, []
    try:
        prog = _load(ProgType.SK_MSG, AttachType.SK_MSG_VERDICT, _redirect_to_key_0(sockmap) if redirect
                     else _RETURN_ONE)  # SK_PASS
        attached = prog >= 0 and lib.bpf_prog_attach(prog, sockmap, AttachType.SK_MSG_VERDICT, 0) == 0
        if not attached:
            _refused(prog)
        pair = _loopback_pair() if attached else []
        inserted = attached and all(
            lib.bpf_map_update_elem(sockmap, ffi.new("uint32_t *", key), ffi.new("uint32_t *", sock.fileno()), 0) == 0
            for key, sock in enumerate(pair))
        yield pair if inserted else None
    finally:
        for sock in pair:
            sock.close()
        if prog >= 0:
            lib.bpf_prog_detach2(prog, sockmap, AttachType.SK_MSG_VERDICT)
            os.close(prog)
        os.close(sockmap)


@functools.lru_cache(maxsize=None)
def blocking_reads_like_tcp():
    """Whether a blocking reader of a socket in a sockmap sees TCP's behaviour (kernel/patches
    0001: without it tcp_bpf_recvmsg() answers a wake-up without data with EAGAIN and ignores
    MSG_WAITALL). The experiment: 6 bytes are redirected to the receiver, which blocks in a
    12-byte recv(MSG_WAITALL); 6 more are redirected: TCP's answer is all 12."""
    with _redirecting_pair() as pair:
        if pair is None:
            return False
        receiver, sender = pair
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 2, 0))
        sender.sendall(b"012345")
        got, tid = [], []

        def read():
            tid.append(threading.get_native_id())
            got.append(receiver.recv(12, socket.MSG_WAITALL))

        reader = threading.Thread(target=read)
        reader.start()
        # an unfixed kernel answers with the 6 bytes at once; a fixed one blocks for the rest
        deadline = time.monotonic() + 5
        while not got and not (tid and blocked_in_recv(os.getpid(), tid[0])) and time.monotonic() < deadline:
            time.sleep(0.005)
        sender.sendall(b"abcdef")
        reader.join()
        return got == [b"012345abcdef"]


@functools.lru_cache(maxsize=None)
def close_resets_like_tcp():
    """Whether closing a socket of a sockmap that holds redirected data it never read resets
    the connection, and the peer's sends then fail as on TCP (kernel/patches 0002 and 0004;
    without them the close sends FIN, the peer's next send vanishes, and a send fails with the
    same error ever after). The experiment: 6 bytes are redirected to the receiver, which
    closes; the sender sends twice: TCP answers ECONNRESET, then EPIPE."""
    with _redirecting_pair() as pair:
        if pair is None:
            return False
        receiver, sender = pair
        sender.sendall(b"012345")  # queued at the receiver when sendall returns
        receiver.close()
        select.select([sender], [], [], 2)  # the reset, or the end of the stream, has arrived
        outcomes = []
        for _ in range(2):
            try:
                outcomes.append(sender.send(b"x", socket.MSG_NOSIGNAL))
            except OSError as exc:
                outcomes.append(exc.errno)
        return outcomes == [errno.ECONNRESET, errno.EPIPE]


@functools.lru_cache(maxsize=None)
def send_after_shutdown_refused():
    """Whether the kernel itself refuses a send on a socket of a sockmap whose sending side is
    shut down, as TCP does with EPIPE (kernel/patches 0004; without it the sk_msg program runs
    and a redirect delivers the data: netbpf's program passes such sends to TCP)."""
    with _redirecting_pair() as pair:
        if pair is None:
            return False
        receiver, sender = pair
        sender.shutdown(socket.SHUT_WR)
        try:
            sender.send(b"x", socket.MSG_NOSIGNAL)
        except BrokenPipeError:
            return True
        return False


@functools.lru_cache(maxsize=None)
def splice_reads_like_tcp():
    """Whether splice(2) from a socket of a sockmap reads the data redirected to it, as it reads
    TCP's (kernel/patches 0003; without it tcp_splice_read() looks only at the TCP receive queue
    and finds nothing). The experiment: 6 bytes are redirected to the receiver, which splices
    into a pipe without blocking: TCP's answer is the 6 bytes."""
    with _redirecting_pair() as pair:
        if pair is None:
            return False
        receiver, sender = pair
        sender.sendall(b"012345")  # queued at the receiver when sendall returns
        receiver.setblocking(False)
        pipe_r, pipe_w = os.pipe()
        try:
            return os.splice(receiver.fileno(), pipe_w, 64) == 6 and os.read(pipe_r, 64) == b"012345"
        except BlockingIOError:
            return False
        finally:
            os.close(pipe_r)
            os.close(pipe_w)


def inq(sock):
    """What FIONREAD says is waiting to be read on a socket."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"))[0]


def _fionread_counts(redirect):
    with _redirecting_pair(redirect) as pair:
        if pair is None:
            return False
        receiver, sender = pair
        sender.sendall(b"012345")
        select.select([receiver], [], [], 2)
        return inq(receiver) == 6


@functools.lru_cache(maxsize=None)
def fionread_counts_redirected():
    """Whether FIONREAD on a socket of a sockmap counts the data redirected to it (6.18 does;
    6.1 counts only its TCP receive queue)."""
    return _fionread_counts(redirect=True)


@functools.lru_cache(maxsize=None)
def fionread_counts_tcp_data():
    """Whether FIONREAD on a socket of a sockmap counts what came to it the TCP way (6.1 does;
    6.18's tcp_bpf_ioctl counts only the redirected queue)."""
    return _fionread_counts(redirect=False)


SYSCALL_RECVFROM = {"x86_64": 45, "aarch64": 207}.get(platform.machine())


def blocked_in_recv(pid, tid=None):
    """Whether thread tid (default: the main thread) of process pid sleeps in recvfrom(2), as
    its /proc syscall file says."""
    try:
        fields = open(f"/proc/{pid}/task/{tid or pid}/syscall").read().split()
    except OSError:
        return False
    return bool(fields) and fields[0] == str(SYSCALL_RECVFROM)


def _loopback_pair():
    """(server end, client end) of a TCP connection on 127.0.0.1, both blocking."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return [server, client]


@functools.lru_cache(maxsize=None)
def probe_write_user():
    """Whether tracing programs may call bpf_probe_write_user (refused under kernel lockdown)."""
    return _loads(ProgType.TRACEPOINT, 0, _WRITE_USER)


def lockdown():
    try:
        text = Path("/sys/kernel/security/lockdown").read_text()
    except OSError:
        return "unknown (securityfs not mounted)"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


def summary():
    return {"kernel": platform.release(), "lockdown": lockdown(), "sockmap_link": sockmap_link(),
            "cgroup_getsockname": cgroup_hook("getsockname4"), "cgroup_sock_release": cgroup_hook("sock_release"),
            "probe_write_user": probe_write_user(), "blocking_reads_like_tcp": blocking_reads_like_tcp(),
            "close_resets_like_tcp": close_resets_like_tcp(), "splice_reads_like_tcp": splice_reads_like_tcp(),
            "send_after_shutdown_refused": send_after_shutdown_refused(),
            "fionread_counts_redirected": fionread_counts_redirected(),
            "fionread_counts_tcp_data": fionread_counts_tcp_data()}
