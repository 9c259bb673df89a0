# SPDX-License-Identifier: MIT
"""The systemd units in deploy/systemd, run the way systemd runs them: their command line from
ExecStart and the environment file, started, killed with SIGKILL, started again (it takes its
pins over), and stopped with SIGTERM (it detaches), while a connection keeps carrying data."""

import hashlib
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from netbpf import bypass, mechanisms, multiport
from netbpf.loader import loaded_programs

from clitools import attached_programs
from conftest import run_in, sync, wait_for
from netutil import PATTERN, close_all, joinable_pair
from test_cli import console_command
from test_metrics import free_port, scrape

UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
INSTALLED = "/usr/local/bin/netbpf"  # where the units expect the command (pip's place for root on Debian)


def environment_file(path):
    """KEY=value lines as systemd's EnvironmentFile= reads them (quotes removed)."""
    values = {}
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = " ".join(shlex.split(value))
    return values


def exec_start(unit, environment):
    """ExecStart as argv: $VAR becomes its words, ${VAR} one word, as systemd expands them."""
    line = next(l for l in (UNITS / unit).read_text().splitlines() if l.startswith("ExecStart="))
    argv = []
    for word in shlex.split(line[len("ExecStart="):]):
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            argv += environment.get(whole.group(1), "").split()
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: environment.get(m.group(1), ""), word))
    if argv[0] == INSTALLED and not os.path.exists(INSTALLED):
        argv[0] = console_command()  # pip put it elsewhere for this interpreter
    return argv


@pytest.mark.parametrize("unit", ["netbpf-bypass.service", "netbpf-multiport.service"])
def test_the_units_pass_systemd_analyze_verify(unit, tmp_path):
    text = (UNITS / unit).read_text()
    if not os.path.exists(INSTALLED):
        text = text.replace(INSTALLED, console_command())
    (tmp_path / unit).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("unit, tool", [("netbpf-bypass", bypass), ("netbpf-multiport", multiport)])
def test_the_shipped_environment_files_are_valid_options(unit, tool):
    options = environment_file(UNITS / f"{unit}.env")
    argv = exec_start(f"{unit}.service", options)
    assert argv[1:3] == [tool.Bypass.NAME if tool is bypass else tool.Multiport.NAME, "serve"]
    args = tool.build_parser().parse_args(argv[2:])
    assert args.command == "serve" and args.metrics


class Service:
    """A unit's command line run as systemd would: started, killed, stopped."""

    def __init__(self, unit, options):
        self.argv = exec_start(unit, options)
        self.proc = None

    def start(self, expect):
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = []
        while not any(expect in line for line in lines):
            line = self.proc.stdout.readline()
            assert line, f"the service ended: {lines} {self.proc.stderr.read()}"
            lines.append(line)
        return lines

    def kill(self):
        self.proc.kill()  # SIGKILL: no chance to detach
        self.proc.wait(timeout=10)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)  # systemctl stop (KillSignal=SIGTERM)
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, err

    def close(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def bypass_programs_loaded():
    return sorted(name for _, name, _ in loaded_programs() if name.startswith("bypass_"))


def stream_across_restarts(blocks=24):
    """One connection sends `blocks` MiB in three parts, a sync() after each: meanwhile the
    parent kills the service and starts it again. Returns (bytes received, their sha256, the
    reader's error if it had one)."""
    # the reader waits while the parent restarts the service: a minute and more under emulation
    srv, cli, conn = joinable_pair(timeout=600)
    received, digest, error = [0], hashlib.sha256(), []

    def read():
        try:
            while chunk := conn.recv(1 << 20):
                digest.update(chunk)
                received[0] += len(chunk)
        except OSError as exc:
            error.append(repr(exc))

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(3):
        for _ in range(blocks // 3):
            cli.sendall(PATTERN)
        sync()
    cli.shutdown(socket.SHUT_WR)
    reader.join()
    close_all(srv, cli, conn)
    return received[0], digest.hexdigest(), error


def test_bypass_service_survives_sigkill_and_restart_without_loss_or_a_second_attachment(cg, pin_dir):
    pins, port = pin_dir / "bypass", free_port()
    service = Service("netbpf-bypass.service", {"NETBPF_BYPASS_OPTIONS": f"--cgroup {cg.path} --pin-dir {pins} "
                                                                         f"--metrics 127.0.0.1:{port} --timeout 10"})
    try:
        assert any("attached to" in line for line in service.start("metrics on"))
        seen = {}

        def joined():  # the two sockets in the map, as the metrics say (a new Python process
            # under emulation in the VM takes its time)
            assert wait_for(lambda: scrape(port).get(("netbpf_bypass_sockets", ()), (0, 0))[1] == 2, 120, 0.25)

        def killed():
            service.kill()
            seen["pins after kill"] = sorted(p.name for p in pins.iterdir())

        def restarted():
            seen["restart"] = service.start("metrics on")
            seen["sockops"] = attached_programs(cg.path).get("sock_ops")
            seen["programs"] = bypass_programs_loaded()

        steps = [joined, killed, restarted, lambda: None]
        count, digest, reader_error = run_in(cg, stream_across_restarts, on_sync=lambda: steps.pop(0)())
        stats = scrape(port)
        code, out, err = service.stop()
    finally:
        service.close()
    expected = hashlib.sha256(PATTERN * 24).hexdigest()
    assert (count, digest, reader_error) == (24 * len(PATTERN), expected, [])
    assert "sock_map" in seen["pins after kill"] and "sweep" in seen["pins after kill"]
    assert any("taking over the attachment pinned" in line for line in seen["restart"])
    assert not any("attached to" in line for line in seen["restart"])
    assert len(seen["sockops"]) == 1  # one attachment, not two
    # the kernel's names are at most 15 characters: bypass_sweep_tc is bypass_sweep_tcp
    event_join = [] if "tc" in mechanisms.forced_refusals() else ["bypass_join_tc"]
    assert seen["programs"] in (sorted(event_join + watch + [send, "bypass_sockops", sweep])
                                for sweep in ("bypass_sweep_fi", "bypass_sweep_tc")
                                for send in ("bypass_sk_msg", "bypass_msg_read")
                                for watch in (["bypass_splice_r"], ["bypass_sendfile", "bypass_splice"]))
    # a fast writer fills its reader now and then; sends then take TCP until it catches up
    assert stats[("netbpf_bypass_redirected_bytes_total", ())][1] >= len(PATTERN)
    assert code == 0, err
    assert out.splitlines()[-2:] == ["bypass: detaching", "bypass: detached"]
    assert wait_for(lambda: not bypass_programs_loaded()) and not pins.exists()
    assert attached_programs(cg.path) == {}


def test_multiport_service_takes_over_and_replaces_pins(cg, pin_dir):
    pins, vport = pin_dir / "multiport", free_port()
    options = f"--cgroup {cg.path} --pin-dir {pins} --port {vport} --metrics 127.0.0.1:{free_port()}"
    service = Service("netbpf-multiport.service", {"NETBPF_MULTIPORT_OPTIONS": options})
    other = Service("netbpf-multiport.service", {"NETBPF_MULTIPORT_OPTIONS": options + f" --port {vport + 1}"})
    try:
        service.start("metrics on")
        service.kill()
        assert any("taking over" in line for line in service.start("metrics on"))
        service.kill()
        lines = other.start("metrics on")
        assert any("replacing the attachment" in line for line in lines) and any("attached to" in line for line in lines)
        assert len(attached_programs(cg.path)["bind4"]) == 1
        assert multiport.status(pins)["ports"] == [vport, vport + 1]
        code, out, err = other.stop()
    finally:
        service.close()
        other.close()
    assert code == 0, err
    assert attached_programs(cg.path) == {} and not pins.exists()
