# SPDX-License-Identifier: MIT
"""python -m netbpf.bypass as a user types it: run, attach, status, detach, and every bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from netbpf import bypass

from clitools import bpf_loaded, run_cli, run_cli_as
from conftest import run_in, sync, wait_for
from netutil import PATTERN, close_all, joinable_pair, recv_exactly
from test_transparency import splice_reader


def exchange():
    srv, cli, conn = joinable_pair()
    cli.sendall(b"through the bypass")
    got = recv_exactly(conn, 18)
    close_all(srv, cli, conn)
    return got


def pinned_sockets(pins):
    """How many sockets the pinned bypass has in its map (read the way `status` reads it)."""
    with bypass.Bypass.pins(pins).maps() as maps:
        return len(maps["sock_map"])


def joined_in(pins, count=2):
    """An on_sync: wait until the background agent has joined `count` sockets (it starts as a new
    Python process: seconds under emulation in the VM)."""
    def wait():
        assert wait_for(lambda: pinned_sockets(pins) >= count, timeout=60), "the agent did not join the sockets"

    return wait


def agent_alive(pid):
    return bypass.agent_running(pid)


def test_help_names_the_commands():
    result = run_cli("bypass", "--help")
    assert result.returncode == 0
    for word in ("run", "attach", "status", "detach", "--cgroup", "--scope", "--ports", "--pin-dir"):
        assert word in result.stdout


def test_attach_status_detach_leave_nothing_behind(cg, pin_dir):
    pins = pin_dir / "netbpf" / "bypass"  # nested, like the default /sys/fs/bpf/netbpf/bypass
    result = run_cli("bypass", "attach", "--cgroup", cg.path, "--pin-dir", pins, "--ports", "1-65535")
    assert result.returncode == 0, result.stderr
    assert run_in(cg, exchange, on_sync=joined_in(pins)) == b"through the bypass"  # the agent joined them

    status = run_cli("bypass", "status", "--json", "--pin-dir", pins)
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["attached"] is True and info["cgroup"] == str(cg.path) and info["detaching"] is False
    assert info["agent"]["running"] is True
    assert info["allow_blocking_readers"] is info["kernel"]["blocking_reads_like_tcp"]  # the default follows the probe
    assert info["redirected_msgs"] >= 1 and info["redirected_bytes"] >= 18
    assert info["passed_msgs"] == info["passed_not_reading"] <= 1 and info["sockets_inserted"] == 2
    assert info["join"]["sweep"] in ("iter/task_file", "iter/tcp") and info["join"]["event"] in ("tc", None)
    assert info["join"]["sk_msg"] in ("sk_msg/direct", "sk_msg/probe-read")
    assert info["ports"] == list(range(1, 65536)) and info["sk_msg_attach"] in ("bpf_link", "prog_attach")
    assert wait_for(lambda: json.loads(run_cli("bypass", "status", "--json", "--pin-dir", pins).stdout)["sockets"] == 0)
    text = run_cli("bypass", "status", "--pin-dir", pins)
    assert f"attached to {cg.path}" in text.stdout and "running" in text.stdout and "sockets join " in text.stdout
    agent = info["agent"]["pid"]

    again = run_cli("bypass", "attach", "--cgroup", cg.path, "--pin-dir", pins)
    assert again.returncode == 2 and "already attached" in again.stderr
    elsewhere = run_cli("bypass", "attach", "--cgroup", cg.path, "--pin-dir", pin_dir / "other")
    assert elsewhere.returncode == 2 and "already attached" in elsewhere.stderr
    assert not (pin_dir / "other").exists()

    result = run_cli("bypass", "detach", "--pin-dir", pins)
    assert result.returncode == 0, result.stderr
    assert not agent_alive(agent)
    assert wait_for(lambda: not bpf_loaded("bypass_"))
    assert not pins.exists() and not pins.parent.exists()  # no empty directory left either
    bpftool = subprocess.run(["bpftool", "cgroup", "show", str(cg.path)], capture_output=True, text=True)
    assert "bypass" not in bpftool.stdout
    status = json.loads(run_cli("bypass", "status", "--json", "--pin-dir", pins).stdout)
    assert status["attached"] is False
    assert run_cli("bypass", "detach", "--pin-dir", pins).returncode == 2


def test_splice_readers_are_seen_after_the_attach_command_has_exited(cg, pin_dir):
    """The splice watch (fentry or the tracepoints) is a pinned link: it keeps firing once
    `attach` has exited."""
    pins = pin_dir / "bypass"
    result = run_cli("bypass", "attach", "--cgroup", cg.path, "--pin-dir", pins)
    assert result.returncode == 0, result.stderr
    try:
        assert run_in(cg, splice_reader, False, False) == (b"", 200000, True)
        info = json.loads(run_cli("bypass", "status", "--json", "--pin-dir", pins).stdout)
        assert info["spliced"] == 1 and info["redirected_msgs"] == 0
    finally:
        assert run_cli("bypass", "detach", "--pin-dir", pins).returncode == 0


def test_status_of_an_attachment_pinned_before_the_splice_watch_choice_names_the_tracepoints():
    """A bypass pinned by an older netbpf recorded no splice watch: it ran the tracepoints."""
    join = {"event": None, "sweep": "iter/tcp", "sk_msg": "sk_msg/direct", "sk_msg_attach": "bpf_link",
            "refused": {}}
    assert bypass.report.join_lines(join) == [
        "sockets join by the sweep alone (every 20 ms while sockets may join) (iter/tcp); sk_msg/direct attached "
        "with bpf link; splice readers seen by the splice and sendfile syscall tracepoints"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_run_shows_live_counters_and_detaches_on_signal(cg, sig):
    proc = subprocess.Popen([sys.executable, "-m", "netbpf.bypass", "--cgroup", str(cg.path),
                             "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "attached to" in proc.stdout.readline()

        def joined_per_live_line():
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if proc.stdout.readline().split()[:2] == ["sockets", "2"]:
                    return
            raise AssertionError("the live line never showed the two sockets joined")

        assert run_in(cg, exchange, on_sync=joined_per_live_line) == b"through the bypass"
        line = ""
        deadline = time.monotonic() + 10
        while "total 1 redirected" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
        assert "total 1 redirected" in line
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "detached" in out
    assert not bpf_loaded("bypass_")


def test_detach_waits_for_a_reader_that_has_not_read_and_says_so(cg, pin_dir):
    """detach stops redirecting, then waits for readers to take what was redirected to them;
    at the timeout it names the connections, keeps the pins, and a later detach finishes."""
    pins = pin_dir / "bypass"
    assert run_cli("bypass", "attach", "--cgroup", cg.path, "--pin-dir", pins).returncode == 0
    detached = {}

    def first_detach():
        result = run_cli("bypass", "detach", "--timeout", "0.5", "--pin-dir", pins)
        detached["first"] = result
        assert result.returncode == 1, result.stderr
        assert "1 connections still hold redirected data" in result.stderr  # the server end
        assert "pins kept" in result.stderr and pins.exists()
        info = json.loads(run_cli("bypass", "status", "--json", "--pin-dir", pins).stdout)
        assert info["detaching"] is True and info["sockets"] == 1 and not info["agent"]["running"]

    def unread_then_read():
        srv, cli, conn = joinable_pair()
        cli.sendall(PATTERN[:100000])
        sync()  # the parent tries to detach now
        got = recv_exactly(conn, 100000)
        cli.sendall(b"after")
        got += recv_exactly(conn, 5)
        close_all(srv, cli, conn)
        return got

    steps = [joined_in(pins), first_detach]
    assert run_in(cg, unread_then_read, on_sync=lambda: steps.pop(0)()) == PATTERN[:100000] + b"after"
    second = run_cli("bypass", "detach", "--pin-dir", pins)
    assert second.returncode == 0, second.stderr
    assert not pins.exists()


@pytest.mark.parametrize("args, message", [
    (["--ports", "0"], "out of range"),
    (["--ports", "70000"], "out of range"),
    (["--ports", "10-5"], "runs backwards"),
    (["--ports", "http"], "not a number"),
    (["--ports", "80,,81"], "empty port"),
    (["--scope", "galaxy"], "invalid choice"),
    (["--cgroup", "/nonexistent/cgroup"], "not a cgroup v2 directory"),
    (["--cgroup", "/tmp"], "not a cgroup v2 directory"),
    (["--pin-dir", "/tmp/netbpf-not-bpffs"], "not on a bpffs mount"),
    (["--max-sockets", "1"], "out of range"),
    (["--queue-floor", "-1"], "out of range"),
    (["--queue-floor", "2147483648"], "out of range"),
    (["frobnicate"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(cg, pin_dir, args, message):
    if "--cgroup" not in args:
        args = args + ["--cgroup", str(cg.path)]
    if "--pin-dir" not in args:
        args = args + ["--pin-dir", str(pin_dir / "bypass")]
    result = run_cli("bypass", "attach", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""
    assert not bpf_loaded("bypass_")
    assert not (pin_dir / "bypass").exists()
    assert not os.path.exists("/tmp/netbpf-not-bpffs")


def test_unbuilt_objects_are_bad_input(cg, pin_dir, tmp_path):
    env = dict(os.environ, NETBPF_OBJECT_DIR=str(tmp_path))
    result = run_cli("bypass", "attach", "--cgroup", cg.path, "--pin-dir", pin_dir / "b", env=env)
    assert result.returncode == 2 and "run `make`" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not bpf_loaded("bypass_") and not (pin_dir / "b").exists()


def test_non_root_is_bad_input(cg, pin_dir):
    code, stderr = run_cli_as("nobody", lambda: bypass.run_cli(
        ["attach", "--cgroup", str(cg.path), "--pin-dir", str(pin_dir / "b")]))
    assert code == 2 and "must run as root" in stderr
    assert not bpf_loaded("bypass_")


def test_no_cgroup_v2_is_bad_input(monkeypatch, capsys):
    from netbpf import mounts

    real = mounts.mount_points
    monkeypatch.setattr(mounts, "mount_points", lambda fstype: [] if fstype == "cgroup2" else real(fstype))
    assert bypass.run_cli(["attach"]) == 2
    err = capsys.readouterr().err
    assert "no cgroup v2 file system is mounted" in err and len(err.strip().splitlines()) == 1
