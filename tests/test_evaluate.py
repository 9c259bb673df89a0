# SPDX-License-Identifier: MIT
"""The README's main command ends in evaluate.bench: it writes its tables and the two plots
(matplotlib comes with `make`), with a number or '-' in every cell. Numbers are not judged here:
performance is measured by the benchmark, not asserted by tests."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_writes_tables_and_plots(tmp_path):
    stats_switch = Path("/proc/sys/kernel/bpf_stats_enabled")
    stats_before = stats_switch.read_text()
    result = subprocess.run([sys.executable, "-m", "evaluate.bench", "--quick", "--reps", "1", "--only", "latency",
                             "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for plot in ("latency.png", "ratio.png"):
        assert (tmp_path / plot).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    table = (tmp_path / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| RTT")]
    assert rows and not any("nan" in row.lower() for row in rows)
    # every event-driven round trip was redirected: the sk_msg program's cost is in the last column
    assert all(float(row.rstrip(" |").rsplit("|", 1)[1].split()[0]) > 0 for row in rows), rows
    assert stats_switch.read_text() == stats_before  # the run-time statistics are off again
    assert json.loads((tmp_path / "results.json").read_text())


def test_floor_measures_three_programs_and_restores_the_statistics_switch():
    """evaluate.floor runs the ping-pong through SK_PASS, the bare redirect and the bypass: each
    row carries a cost per message from the kernel's run-time statistics, which are off again."""
    stats_switch = Path("/proc/sys/kernel/bpf_stats_enabled")
    stats_before = stats_switch.read_text()
    result = subprocess.run([sys.executable, "-m", "evaluate.floor", "--rounds", "1", "--messages", "2000"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {line.split(":")[0]: line for line in result.stdout.splitlines() if "sk_msg ns/msg" in line}
    assert set(rows) == {"pass", "redirect", "bypass"}, result.stdout
    assert all(float(row.split("sk_msg ns/msg ")[1].split()[0]) > 0 for row in rows.values()), rows
    assert stats_switch.read_text() == stats_before


@pytest.mark.parametrize("args", [["--rounds", "0"], ["--object", "/nonexistent.bpf.o"]])
def test_floor_refuses_bad_input_in_one_line(args):
    result = subprocess.run([sys.executable, "-m", "evaluate.floor", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result
    assert result.stderr.startswith("evaluate.floor: ")
