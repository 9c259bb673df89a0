# SPDX-License-Identifier: MIT
"""The agent of a pinned bypass: the process that `attach` starts (or `serve` is) to run the
sweep's rounds, and how other commands find, start and stop it."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .. import cgroup
from ..errors import NetbpfError, UsageError
from .constants import MECHANISMS_PIN
from .join import Sweep, agent_step, run_paced


def pinned_mechanisms(pins):
    """What Bypass.mechanisms() said when the bypass pinned in `pins` (a PinDir) was attached."""
    return json.loads(pins.note(MECHANISMS_PIN))


@contextlib.contextmanager
def pinned_sweep(pins, maps):
    """The Sweep of a pinned bypass (its link closed afterwards)."""
    config = maps[".rodata"][0]
    with pins.link("sweep") as link:
        yield Sweep(link, pinned_mechanisms(pins)["sweep"], cgroup.path_of_id(config.cgroup_id),
                    maps["netns_seen"])


# How `attach` starts the agent: Python isolated (-I: no current directory, user site or
# PYTHON* variables on its path) and importing netbpf from where this process did, from /. A
# plain `python -m netbpf.bypass` would import a netbpf/ found in the current directory first,
# and the agent runs as root.
AGENT_CODE = "import sys; sys.path.insert(0, sys.argv.pop(1)); from netbpf.bypass.cli import main; main()"


def agent_command(pin_dir):
    package_root = str(Path(__file__).resolve().parents[2])  # the directory that holds netbpf/
    return [sys.executable, "-I", "-c", AGENT_CODE, package_root, "agent", "--pin-dir", str(pin_dir)]


def start_agent(pins, timeout=60.0):
    """The background process that runs the sweep of a pinned bypass, once it has said in the
    control map that it runs (so that a `status` right after `attach` sees it)."""
    agent = subprocess.Popen(agent_command(pins.path), cwd="/", stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                             close_fds=True)
    deadline = time.monotonic() + timeout
    with pins.maps() as maps:
        while maps["control"][0].agent_pid != agent.pid and time.monotonic() < deadline:
            if agent.poll() is not None:
                raise NetbpfError(f"the agent exited at its start (status {agent.returncode}); "
                                  f"run `python -m netbpf.bypass agent --pin-dir {pins.path}` to see why")
            time.sleep(0.01)
    return agent


def agent_running(pid):
    """Whether pid is a live netbpf bypass agent: `agent`, or `serve` (not some other process
    that got the number)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    bypass = b"netbpf.bypass" in cmdline or b"bypass" in cmdline or AGENT_CODE.encode() in cmdline
    return bool(pid) and bypass and (b"agent" in cmdline or b"serve" in cmdline)


def stop_agent(control, timeout=5.0):
    pid = control[0].agent_pid
    if pid and agent_running(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while agent_running(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    control[0] = control[0]._replace(agent_pid=0)




def run_agent(pins, stop=None):
    """The agent of a pinned bypass (`pins`, a PinDir): run the sweep until `stop` (a
    threading.Event; by default set by SIGTERM or SIGINT) is set or the pins are gone."""
    if stop is None:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: stop.set())
    with pins.maps() as maps, pinned_sweep(pins, maps) as sweep:
        control = maps["control"]
        control[0] = control[0]._replace(agent_pid=os.getpid())

        def step(count_only=False):
            if not pins.attached() or control[0].detaching:
                stop.set()
            return agent_step(sweep, maps, count_only)

        try:
            run_paced(step, stop)
        finally:
            if pins.attached():
                control[0] = control[0]._replace(agent_pid=0)
    return 0


def serve_agent(pins, stop):
    """What `serve` does while attached: be the agent, after stopping one that `attach` started
    (a second agent would only repeat the work); another `serve` on the same pins is an error."""
    with pins.maps() as maps:
        pid = maps["control"][0].agent_pid
        if pid and pid != os.getpid() and agent_running(pid):
            if b"serve" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                raise UsageError(f"another netbpf bypass serve (pid {pid}) runs the pins in {pins.path}")
            stop_agent(maps["control"])
    run_agent(pins, stop)
