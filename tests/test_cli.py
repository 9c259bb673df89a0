# SPDX-License-Identifier: MIT
"""The `netbpf` console command that `make` installs, beside `python -m netbpf.TOOL`."""

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest


def console_command():
    """The `netbpf` script pip installed for this interpreter (its scripts directory may not be
    on PATH: a VM, sudo)."""
    path = shutil.which("netbpf", path=os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")]))
    assert path, "the netbpf command is not installed: run make"
    return path


def netbpf(*args, module=False):
    command = [sys.executable, "-m", "netbpf"] if module else [console_command()]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("module", [False, True], ids=["console-command", "python-m"])
def test_netbpf_runs_each_tool(module, pin_dir):
    listing = netbpf("--help", module=module)
    assert listing.returncode == 0 and "bypass" in listing.stdout and "multiport" in listing.stdout
    for name in ("bypass", "multiport"):
        usage = netbpf(name, "--help", module=module)
        assert usage.returncode == 0 and usage.stdout.startswith(f"usage: netbpf {name}")
        status = netbpf(name, "status", "--pin-dir", str(pin_dir / name), module=module)
        assert status.returncode == 0 and status.stdout == f"{name}: not attached (no pins in {pin_dir / name})\n"


def test_netbpf_with_an_unknown_tool_is_one_line_and_status_2():
    result = netbpf("bypas")
    assert result.returncode == 2 and result.stderr == "netbpf: no tool named 'bypas' (have: bypass, multiport)\n"
    assert netbpf().returncode == 2


def test_a_reader_that_went_away_ends_the_command_without_a_traceback(pin_dir):
    read_end, write_end = os.pipe()
    os.close(read_end)  # `status | head` once head has exited
    try:
        done = subprocess.run([sys.executable, "-m", "netbpf.multiport", "status", "--json", "--pin-dir",
                               str(pin_dir)], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert done.returncode == 1 and done.stderr == ""
