# SPDX-License-Identifier: MIT
"""multiport in the running kernel: real binds, connects and datagrams in child cgroups."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from netbpf import features, multiport
from netbpf.errors import LibbpfError
from netbpf.multiport import Multiport
from netbpf.testing import free_port

from clitools import attached_programs, run_cli, run_cli_as
from conftest import run_in, sync

SERVER = str(Path(__file__).with_name("mpserver.py"))


class Servers:
    """mpserver.py processes started in a cgroup; stopped (stdin closed) on exit."""

    def __init__(self, group):
        self.group, self.procs, self.info = group, [], []

    def start(self, proto, host, port, *options):
        proc = self.group.popen([sys.executable, SERVER, proto, host, str(port), *options], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        line = proc.stdout.readline()
        assert line, f"server {proto} {host} {port} did not start"
        self.info.append(json.loads(line))
        return self.info[-1]

    def stop(self):
        for proc in self.procs:
            proc.stdin.close()
        for proc in self.procs:
            proc.wait(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def ss_listening_ports(pids):
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    ports = {}
    for line in out.splitlines():
        for pid in pids:
            if f"pid={pid}," in line:
                ports[pid] = int(line.split()[3].rpartition(":")[2])
    return ports


def connect_and_ask(family, host, port):
    """Connect, read the server's hello line, echo a byte; return (hello, getpeername port)."""
    with socket.socket(family, socket.SOCK_STREAM) as c:
        c.settimeout(5)
        c.connect((host, port))
        hello = json.loads(c.makefile().readline())
        c.sendall(b"x")
        assert c.recv(1) == b"x"
        return hello, c.getpeername()[1]


@pytest.fixture
def vport():
    return free_port(udp_too=True)


def test_three_processes_bind_the_same_port(cg, vport, pin_dir):
    pins = pin_dir / "mp"
    assert run_cli("multiport", "attach", "--cgroup", cg.path, "--pin-dir", pins, "--port", vport).returncode == 0
    try:
        with Servers(cg) as servers:
            for _ in range(3):
                assert servers.start("tcp", "127.0.0.1", vport)["port"] == vport
            pids = [s["pid"] for s in servers.info]
            real = ss_listening_ports(pids)
            assert len(set(real.values())) == 3 and vport not in real.values()
            status = json.loads(run_cli("multiport", "status", "--json", "--pin-dir", pins).stdout)
            assert status["attached"] and status["ports"] == [vport] and status["cgroup"] == str(cg.path)
            by_pid = {m["pid"]: m for m in status["mappings"]}
            assert set(by_pid) == set(pids)
            for pid in pids:
                m = by_pid[pid]
                assert (m["virtual_port"], m["real_port"], m["protocol"], m["family"]) == (vport, real[pid], "tcp", "ipv4")
                assert m["comm"].startswith("python") and m["cgroup"] == str(cg.path)
        status = json.loads(run_cli("multiport", "status", "--json", "--pin-dir", pins).stdout)
        assert status["mappings"] == []
    finally:
        assert run_cli("multiport", "detach", "--pin-dir", pins).returncode == 0
    assert attached_programs(cg.path) == {} and not pins.exists()


def test_clients_reach_listeners_through_the_virtual_port_and_spread(cg, vport):
    with Multiport(str(cg.path), [vport]) as mp, Servers(cg) as servers:
        for _ in range(3):
            servers.start("tcp", "127.0.0.1", vport)

        def clients():
            return [connect_and_ask(socket.AF_INET, "127.0.0.1", vport) for _ in range(60)]

        answers = run_in(cg, clients)
        assert all(peer == vport and hello["accepted_port"] == vport for hello, peer in answers)
        served = {hello["pid"] for hello, _ in answers}
        assert served == {s["pid"] for s in servers.info}  # every listener got clients
        assert mp.stats()["connects_redirected"] == 60
        with pytest.raises(ConnectionRefusedError):  # this process is in another cgroup
            connect_and_ask(socket.AF_INET, "127.0.0.1", vport)


def test_ipv6_and_dual_stack(cg, vport):
    with Multiport(str(cg.path), [vport]), Servers(cg) as servers:
        assert servers.start("tcp", "::1", vport)["port"] == vport
        assert servers.start("tcp", "::", vport)["port"] == vport

        def clients():
            v6 = {connect_and_ask(socket.AF_INET6, "::1", vport)[1] for _ in range(20)}
            v4 = [connect_and_ask(socket.AF_INET, "127.0.0.1", vport) for _ in range(10)]
            return v6, {hello["pid"] for hello, _ in v4}, {peer for _, peer in v4}

        v6_peers, v4_servers, v4_peers = run_in(cg, clients)
        assert v6_peers == {vport} and v4_peers == {vport}
        assert v4_servers == {servers.info[1]["pid"]}  # only the dual-stack "::" listener takes IPv4


def test_a_v6only_listener_takes_no_ipv4_clients(cg, vport):
    """"::" with IPV6_V6ONLY takes IPv6 only: an IPv4 client of the virtual port is refused, as
    with that listener alone on a real port, instead of being sent where the kernel drops it."""
    with Multiport(str(cg.path), [vport]), Servers(cg) as servers:
        assert servers.start("tcp", "::", vport, "v6only")["port"] == vport

        def clients():
            v6 = connect_and_ask(socket.AF_INET6, "::1", vport)[1]
            try:
                connect_and_ask(socket.AF_INET, "127.0.0.1", vport)
            except ConnectionRefusedError:
                return v6, "refused"
            return v6, "connected"

        assert run_in(cg, clients) == (vport, "refused")


def test_a_client_finding_no_listener_is_refused_not_sent_to_an_outsider(cg, vport):
    """A process outside the cgroup listens on the virtual port's number itself. A client of the
    cgroup connecting there on loopback while no listener of the cgroup is up is refused, as if
    nothing listened: it never reaches the outsider."""
    outsider = socket.socket()
    outsider.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    outsider.bind(("127.0.0.1", vport))
    outsider.listen()
    outsider.setblocking(False)

    def client():
        try:
            socket.create_connection(("127.0.0.1", vport), timeout=5).close()
        except ConnectionRefusedError:
            return "refused"
        return "connected"

    try:
        with Multiport(str(cg.path), [vport]) as mp:
            assert run_in(cg, client) == "refused"
            with pytest.raises(BlockingIOError):
                outsider.accept()
            assert mp.stats()["connects_no_listener"] == 1
    finally:
        outsider.close()


def test_udp_bind_getsockname_and_echo_through_the_virtual_port(cg, vport):
    with Multiport(str(cg.path), [vport]) as mp, Servers(cg) as servers:
        assert servers.start("udp", "127.0.0.1", vport)["port"] == vport

        def udp_client():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.settimeout(5)
                u.sendto(b"ping", ("127.0.0.1", vport))
                data, addr = u.recvfrom(100)
                return data, addr[1]

        assert run_in(cg, udp_client) == (b"ping", vport)
        stats = mp.stats()
        assert stats["datagrams_redirected"] == 1
        assert [(m["protocol"], m["virtual_port"]) for m in stats["mappings"]] == [("udp", vport)]


def test_only_datagrams_from_the_remapped_socket_show_the_virtual_port(cg, vport):
    """A datagram from the remapped socket's own address and real port reads as coming from the
    virtual port; one from another address that happens to use the same port number (another
    host, or here 127.0.0.2) keeps its real source."""
    with Multiport(str(cg.path), [vport]) as mp:
        sent_from = {}

        def send_from_elsewhere():
            [mapping] = mp.mappings()
            sent_from["port"] = mapping["real_port"]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                other.bind(("127.0.0.2", mapping["real_port"]))
                other.sendto(b"elsewhere", ("127.0.0.1", mapping["real_port"]))

        def receiver():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.settimeout(5)
                u.bind(("127.0.0.1", vport))
                sync()
                got = [u.recvfrom(100)]
                u.sendto(b"itself", ("127.0.0.1", vport))
                got.append(u.recvfrom(100))
                return got

        got = run_in(cg, receiver, on_sync=send_from_elsewhere)
    assert got == [(b"elsewhere", ("127.0.0.2", sent_from["port"])), (b"itself", ("127.0.0.1", vport))]


@pytest.mark.parametrize("probe_first", [False, True])
def test_root_without_bpf_capabilities_is_told_so_not_that_hooks_are_missing(cg, pin_dir, probe_first):
    """Root in a container without CAP_BPF & co: the CLI says which capabilities are missing (one
    line, status 2), and the feature probes say "needs root" instead of "no such hook"."""
    if probe_first:
        def attach():
            features.cgroup_hook.cache_clear()
            try:
                Multiport(str(cg.path), [3000]).attach()
            except LibbpfError as exc:
                return str(exc)
            return "attached"

        message = run_in(None, attach, privileges="root-without-bpf")
        assert "needs root" in message and "hook" not in message
    else:
        code, stderr = run_cli_as("root-without-bpf", lambda: multiport.run_cli(
            ["attach", "--cgroup", str(cg.path), "--port", "3000", "--pin-dir", str(pin_dir / "mp")]))
        assert code == 2 and len(stderr.strip().splitlines()) == 1
        assert "without CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_ADMIN" in stderr
    assert attached_programs(cg.path) == {} and not (pin_dir / "mp").exists()


def test_what_is_left_alone(cg, vport):
    """A port not in the set, a process outside the cgroup, and a socket of the cgroup bound
    before attach keep their ports; a new bind in the cgroup is remapped even though that early
    socket holds the virtual port."""
    other = free_port(udp_too=True)
    bound_r, bound_w = os.pipe()
    go_r, go_w = os.pipe()

    def early_socket():
        with socket.socket() as early:
            early.bind(("127.0.0.1", vport))
            early.listen()
            os.write(bound_w, b"x")
            os.read(go_r, 1)  # multiport is attached now
            new = bind_port(vport)  # would be EADDRINUSE without the remap
            return early.getsockname()[1], new

    holder = {}
    t = threading.Thread(target=lambda: holder.update(result=run_in(cg, early_socket)))
    t.start()
    os.read(bound_r, 1)
    outside = socket.socket()
    with Multiport(str(cg.path), [vport]) as mp:
        os.write(go_w, b"x")
        t.join()
        assert holder["result"] == (vport, vport)
        assert mp.stats()["binds_remapped"] == 1  # the new bind only, not the early socket
        assert run_in(cg, bind_port, other) == other  # not a virtual port
        outside.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        outside.bind(("127.0.0.1", vport))  # this process is not in the cgroup
        assert outside.getsockname()[1] == vport and mp.stats()["binds_remapped"] == 1
    outside.close()


def bind_port(port, host="127.0.0.1"):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return s.getsockname()[1]


@pytest.mark.slow
def test_10000_bind_close_cycles_leave_the_maps_empty(cg, vport):
    with Multiport(str(cg.path), [vport]) as mp:
        def churn():
            return sum(bind_port(vport) == vport for _ in range(10000))

        assert run_in(cg, churn) == 10000
        stats = mp.stats()
        assert stats["binds_remapped"] == 10000 and stats["released"] == 10000
        assert len(mp.obj.maps["mappings"]) == 0 and len(mp.obj.maps["real_ports"]) == 0


@pytest.mark.slow
def test_many_live_remapped_sockets(cg, vport):
    count = 2000

    def hold():
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (count + 100, count + 100))
        socks = []
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", vport))
            socks.append(s)
        names = {s.getsockname()[1] for s in socks}
        os.write(ready_w, b"x")
        os.read(done_r, 1)
        for s in socks:
            s.close()
        return names

    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    with Multiport(str(cg.path), [vport]) as mp:
        holder = {}
        t = threading.Thread(target=lambda: holder.update(names=run_in(cg, hold)))
        t.start()
        os.read(ready_r, 1)
        mappings = mp.mappings()
        os.write(done_w, b"x")
        t.join()
        assert holder["names"] == {vport}
        assert len(mappings) == count and len({m["real_port"] for m in mappings}) == count


def test_privileged_ports_need_allow_privileged(cg, pin_dir):
    result = run_cli("multiport", "attach", "--cgroup", cg.path, "--pin-dir", pin_dir / "mp", "--port", 80)
    assert result.returncode == 2 and "--allow-privileged" in result.stderr
    assert attached_programs(cg.path) == {}
    with Multiport(str(cg.path), [80], allow_privileged=True) as mp:
        assert run_in(cg, bind_port, 80) == 80
        assert mp.stats()["binds_remapped"] == 1
    # the kernel side refuses too, should the map say otherwise
    with Multiport(str(cg.path), [free_port(udp_too=True)]) as mp:
        mp.obj.maps["virtual_ports"][81] = 1
        assert run_in(cg, bind_port, 81) == 81
        assert mp.stats()["binds_privileged_refused"] == 1 and mp.mappings() == []


def test_tracepoint_mode_refused_under_lockdown_in_one_line(cg, pin_dir, vport):
    if features.probe_write_user():
        pytest.skip("kernel allows bpf_probe_write_user (no lockdown): nothing to refuse")
    result = run_cli("multiport", "attach", "--mode", "tracepoint", "--cgroup", cg.path,
                     "--pin-dir", pin_dir / "mp", "--port", vport)
    assert result.returncode == 2
    assert "bpf_probe_write_user" in result.stderr and "--mode cgroup" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert attached_programs(cg.path) == {} and not (pin_dir / "mp").exists()


def test_tracepoint_mode_rewrites_getsockname(cg, vport, pin_dir):
    """The original design: binds through the cgroup hook, getsockname() rewritten in user memory."""
    if not features.probe_write_user():
        pytest.skip("kernel lockdown refuses bpf_probe_write_user (tracepoint mode runs in the 6.1 VM)")
    pins = pin_dir / "mp"
    result = run_cli("multiport", "attach", "--mode", "tracepoint", "--cgroup", cg.path, "--pin-dir", pins,
                     "--port", vport)
    assert result.returncode == 0, result.stderr
    try:
        assert "mp_getsockname4" not in os.listdir(pins) and "mp_tp_exit_getsockname" in os.listdir(pins)
        with Servers(cg) as servers:
            names = {servers.start("tcp", "127.0.0.1", vport)["port"] for _ in range(3)}
            real = ss_listening_ports([s["pid"] for s in servers.info])
            status = json.loads(run_cli("multiport", "status", "--json", "--pin-dir", pins).stdout)
        assert names == {vport} and len(set(real.values())) == 3
        assert status["mode"] == "tracepoint" and status["names_rewritten"] >= 3
    finally:
        assert run_cli("multiport", "detach", "--pin-dir", pins).returncode == 0
    assert attached_programs(cg.path) == {}


def test_exec_gives_each_command_its_own_port_namespace(cg, vport):
    script = ("import subprocess, sys, time, urllib.request\n"
              f"server = subprocess.Popen([sys.executable, '-m', 'http.server', '{vport}', '--bind', '127.0.0.1'],"
              " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
              "for _ in range(100):\n"
              "    try:\n"
              f"        body = urllib.request.urlopen('http://127.0.0.1:{vport}/', timeout=2).read(); break\n"
              "    except OSError:\n"
              "        time.sleep(0.1)\n"
              "server.terminate(); server.wait()\n"
              "sys.exit(0 if b'Directory listing' in body else 3)\n")
    runs = [subprocess.Popen([sys.executable, "-m", "netbpf.multiport", "exec", "--cgroup", str(cg.path),
                              "--port", str(vport), "--", sys.executable, "-c", script],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in runs]
    assert results == [(0, ""), (0, "")]
    assert [p.name for p in cg.path.iterdir() if p.is_dir()] == []  # their cgroups are gone
    failing = subprocess.run([sys.executable, "-m", "netbpf.multiport", "exec", "--cgroup", str(cg.path),
                              "--port", str(vport), "--", sys.executable, "-c", "raise SystemExit(7)"])
    assert failing.returncode == 7


@pytest.mark.parametrize("args, message", [
    (["--port", "0"], "out of range"),
    (["--port", "65536"], "out of range"),
    (["--port", "9000-8000"], "runs backwards"),
    (["--port", "x"], "not a number"),
    ([], "give the virtual ports"),
    (["--port", "3000", "--cgroup", "/nonexistent"], "not a cgroup v2 directory"),
    (["--port", "3000", "--mode", "magic"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(cg, pin_dir, args, message):
    if "--cgroup" not in args:
        args = args + ["--cgroup", str(cg.path)]
    result = run_cli("multiport", "attach", "--pin-dir", pin_dir / "mp", *args)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert attached_programs(cg.path) == {} and not (pin_dir / "mp").exists()


def test_exec_without_a_command_is_bad_input():
    result = run_cli("multiport", "exec", "--port", "3000")
    assert result.returncode == 2 and "exec needs a command" in result.stderr


def test_run_prints_the_mapping_table_and_detaches_on_sigterm(cg, vport):
    proc = subprocess.Popen([sys.executable, "-m", "netbpf.multiport", "--cgroup", str(cg.path), "--port",
                             str(vport), "--interval", "0.2"], stdout=subprocess.PIPE, text=True)
    try:
        assert "attached to" in proc.stdout.readline()
        with Servers(cg) as servers:
            pid = servers.start("tcp", "127.0.0.1", vport)["pid"]
            deadline, seen = time.monotonic() + 10, False
            while not seen and time.monotonic() < deadline:
                line = proc.stdout.readline()
                seen = f"{vport}" in line and f"{pid}" in line
            assert seen
        proc.terminate()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert attached_programs(cg.path) == {}
