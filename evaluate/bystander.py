# SPDX-License-Identifier: MIT
"""What an attached bypass costs the host's other loopback traffic: a plain event-driven 1 KiB
ping-pong in a cgroup the bypass is not attached to, with no netbpf loaded and with a bypass
attached to another cgroup, alternating.

    sudo python3 -m evaluate.bystander [--rounds N] [--messages N] [--object bypass.bpf.o]

The bypass's tc program runs on every loopback segment of the namespace, the bystander's too;
where its splice watch is the two syscall tracepoints (the kernel refused fentry), every syscall
of every task takes the kernel's slow path while they are attached. Reported: the bystander's
round-trip p50 without netbpf, with a bypass attached elsewhere, and with its splice watch alone
loaded and attached, medians over the rounds [min-max]; the ratios per round; and what the tc
program cost per segment (from one more run each round, with the kernel's run-time statistics on).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from netbpf import cgroup, object_path
from netbpf.bypass import Bypass
from netbpf.bypass.constants import SPLICE_TRACEPOINTS, SPLICE_WATCH
from netbpf.loader import Object, RunStats

from .ab import PINGPONG, summary

WATCH_PROGRAMS = {"fentry": (SPLICE_WATCH.alternatives[0].program,), "tracepoint": tuple(SPLICE_TRACEPOINTS.values())}


def round_trip_p50(group, messages):
    proc = group.popen([str(PINGPONG), "-t", "tcp", "-m", "rtt", "-s", "1024", "-n", str(messages), "-p", "same",
                        "-j", "200", "-e"], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=600)
    if proc.returncode:
        raise RuntimeError(f"pingpong failed (status {proc.returncode})")
    return json.loads(out)["p50_us"]


def tc_cost(bypass, bystander, messages):
    """[ns per run of the tc program] over one more ping-pong of the bystander ([] if it ran none)."""
    tc = bypass.obj.programs["bypass_join_tc"]
    with RunStats():
        before = tc.run_stats
        round_trip_p50(bystander, messages)
        ns, runs = (now - then for now, then in zip(tc.run_stats, before))
    return [ns / runs] if runs else []


def splice_watch_alone(object_file, watch):
    """The bypass object's splice watch (Bypass.mechanisms()["splice_watch"]) loaded and attached
    without the rest of the bypass; closing the Object detaches it."""
    obj = Object(str(object_file))
    try:
        for program in obj.programs.values():
            program.set_autoload(program.name in WATCH_PROGRAMS[watch])
        obj.load()
        for name in WATCH_PROGRAMS[watch]:
            program = obj.programs[name]
            program.attach_trace() if watch == "fentry" else program.attach_tracepoint()
    except BaseException:
        obj.close()
        raise
    return obj


def main():
    parser = argparse.ArgumentParser(prog="python -m evaluate.bystander", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=30000)
    parser.add_argument("--object", type=Path, help="another build of the bypass's BPF object")
    args = parser.parse_args()
    problem = ("rounds and messages must be positive" if args.rounds < 1 or args.messages < 1
               else f"no object file {args.object}" if args.object and not args.object.is_file() else None)
    if problem:
        print(f"evaluate.bystander: {problem}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("evaluate.bystander: must run as root (it loads BPF programs)", file=sys.stderr)
        return 2
    bypassed = cgroup.Cgroup.create(f"netbpf-bystander-bypassed-{os.getpid()}")
    bystander = cgroup.Cgroup.create(f"netbpf-bystander-{os.getpid()}")
    without, with_bypass, with_watch, tc_ns = [], [], [], []
    try:
        for round_ in range(args.rounds):
            if round_ % 2 == 0:
                without.append(round_trip_p50(bystander, args.messages))
            bypass = Bypass(str(bypassed.path))
            if args.object:
                bypass.object_file = args.object
            with bypass:
                with_bypass.append(round_trip_p50(bystander, args.messages))
                if bypass.mechanisms()["event"] == "tc":  # else nothing runs on the bystander's segments
                    tc_ns += tc_cost(bypass, bystander, args.messages)
                watch = bypass.mechanisms()["splice_watch"]
            with splice_watch_alone(args.object or object_path("bypass"), watch):
                with_watch.append(round_trip_p50(bystander, args.messages))
            if round_ % 2 == 1:
                without.append(round_trip_p50(bystander, args.messages))
    finally:
        bystander.remove()
        bypassed.remove()
    print(f"kernel {platform.release()}, {args.rounds} rounds of {args.messages} round trips, same CPU")
    print(f"bystander p50 µs: no netbpf {summary(without, 2)}, bypass attached elsewhere {summary(with_bypass, 2)}, "
          f"its splice watch alone ({watch}) {summary(with_watch, 2)}")
    print(f"with/without: {summary([b / a for a, b in zip(without, with_bypass)], 3)}; splice watch alone/without: "
          f"{summary([w / a for a, w in zip(without, with_watch)], 3)} (per round)")
    print(f"tc program per segment: {summary(tc_ns, 1) if tc_ns else '- (it ran on none)'} ns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
