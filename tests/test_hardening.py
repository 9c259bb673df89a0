# SPDX-License-Identifier: MIT
"""The service surface: what the tools run as root, where they keep their pins, what they read
back from them. Each test builds what another user could have put in the tools' way and checks
that nothing of it is run, followed or acted on."""

import json
import os
import subprocess
import sys

from netbpf import Map, mounts
from netbpf.types import MapType

from clitools import attached_programs, bpf_loaded, run_cli
from conftest import REPO, run_in, sync, wait_for
from netutil import close_all, pair

NOBODY = 65534


def command_ran(marker):
    return marker.exists()


def test_the_agent_imports_netbpf_from_where_the_command_did_not_the_working_directory(cg, pin_dir, tmp_path):
    """`attach` started from a directory holding a package named netbpf (anyone's /tmp): the
    agent it starts as root imports the netbpf the command runs, never that one."""
    planted, marker = tmp_path / "netbpf", tmp_path / "imported"
    planted.mkdir()
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n")
    pins = pin_dir / "b"
    # -P: the command itself, as a console script would, does not put its directory on the path
    result = subprocess.run([sys.executable, "-P", "-m", "netbpf.bypass", "attach", "--cgroup", cg.path,
                             "--pin-dir", pins], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    try:
        assert result.returncode == 0, result.stderr
        assert not command_ran(marker), "the agent imported the planted package"
        info = json.loads(run_cli("bypass", "status", "--json", "--pin-dir", pins).stdout)
        assert info["agent"]["running"] is True
    finally:
        run_cli("bypass", "detach", "--pin-dir", pins)


def test_system_commands_come_from_the_system_not_the_callers_path(cg, pin_dir, tmp_path):
    """ip, tc and mount planted first on PATH are never run: the tools find them in the
    system's own directories."""
    fake_bin, marker = tmp_path / "bin", tmp_path / "ran"
    fake_bin.mkdir()
    for name in ("ip", "tc", "mount"):
        (fake_bin / name).write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
        (fake_bin / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}")
    pins = pin_dir / "b"
    attach = run_cli("bypass", "attach", "--cgroup", cg.path, "--pin-dir", pins, env=env)
    try:
        assert attach.returncode == 0, attach.stderr
        assert run_cli("bypass", "status", "--pin-dir", pins, env=env).returncode == 0
    finally:
        detach = run_cli("bypass", "detach", "--pin-dir", pins, env=env)
    assert detach.returncode == 0, detach.stderr
    assert not command_ran(marker)


def refused_in_one_line(result, words):
    lines = result.stderr.strip().splitlines()
    return result.returncode == 2 and len(lines) == 1 and words in lines[0]


def test_a_pin_directory_another_user_owns_or_can_write_is_refused(cg, pin_dir):
    """A directory on the way to the pins that another user owns, that others may write, or a
    symlink there: attach refuses in one line (exit 2) and attaches nothing, and detach acts on
    nothing it finds there."""
    foreign = pin_dir / "foreign"
    foreign.mkdir()
    os.chown(foreign, NOBODY, NOBODY)
    open_to_all = pin_dir / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    (pin_dir / "real").mkdir()
    (pin_dir / "link").symlink_to(pin_dir / "real")
    for where, words in ((foreign / "bypass", f"belongs to uid {NOBODY}"), (open_to_all / "bypass", "writable by others"),
                         (pin_dir / "link" / "bypass", "is a symlink")):
        result = run_cli("bypass", "attach", "--cgroup", cg.path, "--pin-dir", where)
        assert refused_in_one_line(result, words), result
        assert not bpf_loaded("bypass_") and not attached_programs(cg.path)
    assert not any((pin_dir / "real").iterdir())

    planted = foreign / "bypass"  # what another user could leave there for a later detach
    planted.mkdir()
    os.chown(planted, NOBODY, NOBODY)
    (planted / "sweep").symlink_to("anything")
    result = run_cli("bypass", "detach", "--pin-dir", planted)
    assert refused_in_one_line(result, f"belongs to uid {NOBODY}"), result
    assert (planted / "sweep").is_symlink()


def test_pin_directories_are_made_root_s_alone(cg, pin_dir):
    pins = pin_dir / "netbpf" / "bypass"
    result = run_cli("bypass", "attach", "--cgroup", cg.path, "--pin-dir", pins)
    try:
        assert result.returncode == 0, result.stderr
        for directory in (pin_dir / "netbpf", pins):
            st = os.lstat(directory)
            assert st.st_uid == 0 and st.st_mode & 0o777 == 0o700, (directory, oct(st.st_mode))
    finally:
        run_cli("bypass", "detach", "--pin-dir", pins)


def test_bpffs_is_mounted_for_root_alone(tmp_path):
    """Where netbpf mounts bpffs itself, only root may write it (a bare mount is 1777)."""
    where = tmp_path / "bpf"
    mounts.ensure_bpffs(str(where))
    try:
        assert os.stat(where).st_mode & 0o777 == 0o700  # bpffs adds the sticky bit to its root
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_pins_of_another_layout_are_refused_in_one_line(pin_dir):
    """Pins another build of netbpf made (here: a sock_info with other sizes): status reads
    none of them with this build's layouts, and says so in one line."""
    pins = pin_dir / "b"
    pins.mkdir()
    (pins / "sweep").symlink_to("a link pin in a real attachment")
    with Map.create(MapType.SOCKHASH, 8, 8, 16) as sock_map:
        sock_map.pin(pins / "sock_map")
    with Map.create(MapType.HASH, 40, 128, 16) as sock_info:
        sock_info.pin(pins / "sock_info")
    result = run_cli("bypass", "status", "--pin-dir", pins)
    assert refused_in_one_line(result, "another build of netbpf"), result
    assert "sock_info" in result.stderr


def test_the_agent_runs_python_isolated_with_netbpf_from_its_own_tree(tmp_path):
    """The agent's command names the directory this netbpf was imported from, and runs Python
    isolated (-I: no working directory, user site or PYTHON* variables)."""
    from netbpf.bypass.agent import agent_command

    command = agent_command(tmp_path)
    assert command[1] == "-I" and command[4] == str(REPO / "src")


def three_joinable_pairs():
    """Three non-blocking pairs that have each exchanged a byte both ways; sync() while open."""
    pairs = [pair() for _ in range(3)]
    for _, cli, conn in pairs:
        cli.settimeout(10)
        conn.settimeout(10)
        cli.sendall(b"x")
        conn.recv(1)
        conn.sendall(b"y")
        cli.recv(1)
    sync()
    for ends in pairs:
        close_all(*ends)


def test_a_full_map_is_counted_and_named_in_status(cg, pin_dir):
    """Three pairs where the maps hold two sockets: the third and later entries are refused, and
    status says by which map (a full map costs a chance to join, never a byte)."""
    pins = pin_dir / "b"
    assert run_cli("bypass", "attach", "--cgroup", cg.path, "--pin-dir", pins, "--max-sockets", "2").returncode == 0

    def refused():
        status = run_cli("bypass", "status", "--json", "--pin-dir", pins)
        assert status.returncode == 0, status.stderr
        info = json.loads(status.stdout)
        return info["map_full"]["sock_info"] >= 1 and info["sockets_inserted"] == 2

    try:
        run_in(cg, three_joinable_pairs, on_sync=lambda: wait_for(refused, 20))
        assert refused()
        text = run_cli("bypass", "status", "--pin-dir", pins).stdout
        assert "entries refused by full maps: sock_info" in text, text
    finally:
        run_cli("bypass", "detach", "--pin-dir", pins)
