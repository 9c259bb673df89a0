# SPDX-License-Identifier: MIT
"""Benchmark (not a timed assertion): bind() + getsockname() with and without multiport.

A worker process in the cgroup runs the loop; each benchmark round is one request to it over a
pipe. Run with `make bench` (pytest --benchmark-only) to compare the two side by side."""

import os
import socket

import pytest

from netbpf.multiport import Multiport
from netbpf.testing import free_port

ROUND = 200  # bind+getsockname pairs per benchmark round


class Worker:
    """A forked child in `group` that runs ROUND bind+getsockname pairs on each request."""

    def __init__(self, group, port):
        self.req_r, self.req_w = os.pipe()
        self.rep_r, self.rep_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            group.add(os.getpid())
            while os.read(self.req_r, 1) == b"g":
                ok = 0
                for _ in range(ROUND):
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", port))
                        ok += s.getsockname()[1] == port or port == 0
                os.write(self.rep_w, b"y" if ok == ROUND else b"n")
            os._exit(0)

    def round(self):
        os.write(self.req_w, b"g")
        return os.read(self.rep_r, 1) == b"y"

    def close(self):
        os.write(self.req_w, b"q")
        os.waitpid(self.pid, 0)


@pytest.mark.parametrize("variant", ["plain", "multiport"])
def test_bench_bind_getsockname(benchmark, cg, variant):
    benchmark.group = f"bind+getsockname x{ROUND}"
    port = free_port()
    mp = Multiport(str(cg.path), [port]).attach() if variant == "multiport" else None
    # without multiport, repeated binds of one fixed port may hit TIME_WAIT-free reuse rules;
    # port 0 (the kernel picks) is what multiport turns a bind into, so it is the fair baseline
    worker = Worker(cg, port if mp else 0)
    try:
        assert benchmark(worker.round)
        if mp:
            assert mp.stats()["binds_remapped"] >= ROUND
    finally:
        worker.close()
        if mp:
            mp.close()
