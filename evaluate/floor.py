# SPDX-License-Identifier: MIT
"""What the kernel charges an sk_msg program per message on this machine, beside the bypass's own.

    sudo python3 -m evaluate.floor [--object BYPASS.bpf.o] [--rounds N] [--placement same|cross] [--messages N]

Each round runs the event-driven 1 KiB ping-pong in one child cgroup made here three times, with
the kernel's run-time statistics on, through
  pass      floor_pass of evaluate/msg_floor.bpf.c: SK_PASS, what running any sk_msg program costs;
  redirect  its floor_redirect: the peer's cookie by port and bpf_msg_redirect_hash, the least a
            program that redirects through a sockhash can do;
  bypass    the bypass's sk_msg program.
Reported: ns per message and the round trip's p50 of each, medians over the rounds [min-max], and
what the bypass's program costs above the redirect floor, per round.
"""

import argparse
import functools
import sys
from pathlib import Path

from netbpf import OBJECT_DIR
from netbpf.loader import Object

from .ab import add_run_arguments, compare, pingpong, refusal, run_once, summary

REPO = Path(__file__).resolve().parent.parent
FLOOR_OBJECT = REPO / "build" / "evaluate" / "msg_floor.bpf.o"


def run_floor(group, placement, messages, program):
    """pingpong() through one sk_msg program of msg_floor.bpf.o, its sockops program on group."""
    with Object(str(FLOOR_OBJECT)) as obj:
        obj.load()
        obj.programs["floor_sockops"].attach_cgroup(group)
        obj.programs[program].attach_sockmap(obj.maps["floor_map"])
        return pingpong(group, obj.programs[program], placement, messages)


def main():
    parser = argparse.ArgumentParser(prog="python -m evaluate.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--object", type=Path, help="another build of the bypass's BPF object (default: make's)")
    add_run_arguments(parser)
    args = parser.parse_args()
    why = refusal(args, (FLOOR_OBJECT, args.object or OBJECT_DIR / "bypass.bpf.o"))
    if why:
        print(f"evaluate.floor: {why}", file=sys.stderr)
        return 2
    results = compare("floor", [("pass", functools.partial(run_floor, program="floor_pass")),
                                ("redirect", functools.partial(run_floor, program="floor_redirect")),
                                ("bypass", functools.partial(run_once, object_file=args.object))], args)
    above = [bypass[0] - redirect[0] for redirect, bypass in zip(results["redirect"], results["bypass"])]
    print(f"bypass above the redirect floor: {summary(above)} ns per message (per round)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
