# SPDX-License-Identifier: MIT
"""Real servers and clients through the bypass, unchanged: redis with redis-benchmark, asyncio,
and CPython's own network test suites."""

import asyncio
import csv
import io
import os
import random
import shutil
import socket
import subprocess
import sys

import pytest

from netbpf.cgroup import Cgroup
from netbpf.testing import free_port

from bypassutil import joined
from conftest import run_in, sync, wait_for


def need(program):
    path = shutil.which(program)
    if not path:
        pytest.fail(f"{program} is not installed (Debian: apt-get install redis-server redis-tools; "
                    f".ci/run installs it)")
    return path


def accepts(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def redis_server(cg):
    need("redis-server")
    port = free_port()
    proc = cg.popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--protected-mode", "no"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: accepts(port), 10), "redis-server did not start listening"
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def test_redis_benchmark_runs_through_the_bypass_with_no_errors(bypass, cg, redis_server):
    need("redis-benchmark")
    bench = cg.popen(["redis-benchmark", "-h", "127.0.0.1", "-p", str(redis_server), "-n", "20000",
                      "-c", "20", "-d", "512", "-t", "set,get", "--csv"],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = bench.communicate(timeout=120)
    assert bench.returncode == 0, err
    rows = {row[0]: float(row[1]) for row in csv.reader(io.StringIO(out)) if row and row[0] in ("SET", "GET")}
    assert set(rows) == {"SET", "GET"} and all(rps > 0 for rps in rows.values())
    stats = bypass.stats()
    # The agent joins connections after it has seen them read (and finds a burst after a pause
    # up to a second late), so the first requests of each run take plain TCP and a run of half a
    # second may finish before its connections join: at least one run's connections joined and
    # carried most of its requests and replies.
    assert stats["sockets_inserted"] >= 40  # 20 connections, both ends
    assert stats["redirected_msgs"] >= 20000

    def check_values():
        """A value written and read back through redis-cli: byte for byte."""
        value = "".join(random.Random(7).choice("abcdefghij") for _ in range(100000))
        subprocess.run(["redis-cli", "-p", str(redis_server), "SET", "netbpf", value], check=True,
                       capture_output=True)
        return subprocess.run(["redis-cli", "-p", str(redis_server), "GET", "netbpf"], check=True,
                              capture_output=True, text=True).stdout.strip() == value

    assert run_in(cg, check_values)


def asyncio_echo(clients, messages):
    """An asyncio echo server and its clients. After each client's first message the program
    waits (sync) until the bypass has taken the connections, then runs the load."""

    async def handle(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def exchange(reader, writer, payload):
        writer.write(payload)
        await writer.drain()
        return await reader.readexactly(len(payload)) == payload

    async def client(port, seed, all_connected):
        rng = random.Random(seed)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        ok = await exchange(reader, writer, b"first")
        await all_connected
        for i in range(messages):
            ok &= await exchange(reader, writer, bytes([seed % 256]) * rng.randint(1, 20000))
        writer.write_eof()
        ok &= await reader.read() == b""
        writer.close()
        return ok

    async def main():
        loop = asyncio.get_running_loop()
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        all_connected = loop.create_future()
        clients_done = asyncio.gather(*(client(port, s, all_connected) for s in range(clients)))
        while sum(1 for t in asyncio.all_tasks() if "handle" in repr(t.get_coro())) < clients:
            await asyncio.sleep(0.01)
        await loop.run_in_executor(None, sync)
        all_connected.set_result(None)
        results = await clients_done
        server.close()
        await server.wait_closed()
        return sum(results)

    return asyncio.run(main())


def test_asyncio_server_and_clients_run_through_the_bypass(bypass, cg):
    assert run_in(cg, asyncio_echo, 50, 100, on_sync=joined(bypass, 100, timeout=20)) == 50
    stats = bypass.stats()
    assert stats["sockets_inserted"] == 100
    assert stats["redirected_msgs"] >= 2 * 50 * 100


# CPython's own tests of its network modules: thousands of small programs, written without the
# bypass in mind, which check bytes, return values and errors (and are run on plain TCP first)
CPYTHON_NETWORK_SUITES = ("test_socket", "test_asyncio", "test_selectors", "test_httplib",
                          "test_httpservers", "test_urllib2_localnet", "test_xmlrpc", "test_wsgiref",
                          "test_ftplib", "test_smtplib", "test_poplib", "test_imaplib", "test_ssl")


def run_cpython_suites(group):
    """regrtest over the network suites, its workers in `group`: (exit status, the lines that name
    failures, then its last lines)."""
    # the AF_VSOCK cases wait for the hypervisor's vsock, which a VM guest may have and not answer;
    # -w runs a failed file once more (some asyncio cases time out on a busy machine, plain TCP too)
    proc = group.popen([sys.executable, "-m", "test", "-j2", "-w", "--timeout", "600", "--ignore", "*VSOCK*",
                        *CPYTHON_NETWORK_SUITES],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=1800)
    lines = out.splitlines()
    failures = [line for line in lines if line.startswith(("FAIL:", "ERROR:", "Timeout ", "Traceback"))]
    return proc.returncode, failures[:20] + lines[-25:]


@pytest.mark.slow
def test_cpython_network_suites_pass_through_the_bypass(bypass, cg):
    plain_cg = Cgroup.create(f"netbpf-plain-{os.getpid()}")
    try:
        status, tail = run_cpython_suites(plain_cg)
        assert status == 0, "the suites fail on plain TCP already:\n" + "\n".join(tail)
    finally:
        plain_cg.remove()
    status, tail = run_cpython_suites(cg)
    stats = bypass.stats()
    print(f"\nCPython network suites through the bypass: {stats['redirected_bytes']} bytes in "
          f"{stats['redirected_msgs']} messages redirected, {stats['sockets_inserted']} sockets joined")
    assert status == 0, "\n".join(tail)
    assert stats["redirected_bytes"] >= 1 << 20, stats
