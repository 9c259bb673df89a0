# SPDX-License-Identifier: MIT
"""python -m netbpf.bypass: the bypass's command line."""

import argparse
import sys

from .. import command
from ..errors import UsageError
from ..pins import check_pin_dir
from ..privileges import require_root
from .agent import run_agent, serve_agent, start_agent
from .attachment import Bypass, status
from .constants import DEFAULT_PIN_DIR, DEFAULT_QUEUE_FLOOR, DRAIN_TIMEOUT, SCOPES
from .report import format_line, metric_families, show_draining, show_status, stats


class BypassCommand(command.Command):
    TOOL = Bypass

    def make(self):
        args = self.args
        return Bypass(args.cgroup, args.scope, self.ports, args.max_sockets, args.queue_floor,
                      args.allow_blocking_readers, args.timeout)

    def status(self, pins):
        return status(pins.path)

    show_status = staticmethod(show_status)
    metric_families = staticmethod(metric_families)
    pinned_stats = staticmethod(stats)

    def live_line(self, bypass, stats, previous, elapsed):
        bypass.refresh_host_addrs()
        return format_line(stats, previous, elapsed, bypass.allow_blocking_readers)

    def detach(self, pins):
        remaining = Bypass.detach_pinned(pins.path, self.args.timeout, self.args.force)
        if remaining:
            show_draining(self.prog, remaining, pinned=not self.args.force)
        return bool(remaining) and not self.args.force

    def after_attach(self, bypass, pins):
        start_agent(pins)

    def after_close(self, bypass):
        if bypass.still_draining:
            show_draining(self.prog, bypass.still_draining, pinned=False)

    def serve_loop(self, pins, stop):
        serve_agent(pins, stop)


def build_parser(prog="python -m netbpf.bypass"):
    parser = command.Parser(prog=prog,
                         description="Local TCP connections skip the TCP/IP stack (sockops + sk_msg).")
    parser.add_argument("command", nargs="?", default="run",
                        choices=("run", "attach", "status", "detach", "serve", "agent"),
                        help="run (default): attach, join sockets and show live counters until Ctrl-C, "
                             "then detach; attach: attach, pin, and start a background agent; status: "
                             "show a pinned bypass; detach: drain and remove it; serve: the service form "
                             "(attach with pins or take over a previous instance's, be the agent, detach "
                             "on SIGTERM); agent: internal")
    command.common_arguments(parser, DEFAULT_PIN_DIR)
    parser.add_argument("--scope", choices=tuple(SCOPES), default="host",
                        help="which peers count as local: loopback, host (loopback and this host's "
                             "addresses, default) or all")
    parser.add_argument("--ports", action="append", metavar="LIST",
                        help="only connections with an end on these ports (80,443,8000-8010; repeatable)")
    parser.add_argument("--max-sockets", type=int, default=65536, metavar="N",
                        help="capacity of the socket map (default 65536)")
    parser.add_argument("--queue-floor", type=int, default=DEFAULT_QUEUE_FLOOR, metavar="BYTES",
                        help="bytes a receiver may have queued before sends fall back to TCP, at least "
                             "(the receiver's SO_RCVBUF when larger; default 1048576)")
    parser.add_argument("--allow-blocking-readers", action=argparse.BooleanOptionalAction, default=None,
                        help="also bypass sockets read with blocking calls. Default: only where the kernel "
                             "reads them as TCP does (a probe; kernel/patches); elsewhere allowing them "
                             "accepts the kernel's deviations: a blocking recv() fails with EAGAIN after a "
                             "signal, stop/continue or a wake-up without data, and MSG_WAITALL returns short")
    parser.add_argument("--timeout", type=float, default=DRAIN_TIMEOUT, metavar="S",
                        help=f"detach: seconds to wait for readers to take redirected data (default {DRAIN_TIMEOUT:g})")
    parser.add_argument("--force", action="store_true",
                        help="detach: remove the pins even if connections still hold redirected data")
    return parser




def cli(argv=None, prog="python -m netbpf.bypass"):
    args = build_parser(prog).parse_args(argv)
    command.setup_logging(args.verbose)
    ports = command.parse_ports(args.ports)
    if args.timeout < 0:
        raise UsageError(f"--timeout {args.timeout} is negative")
    if args.command == "agent":
        require_root()
        return run_agent(Bypass.pins(check_pin_dir(args.pin_dir)))
    return command.run_command(BypassCommand(args, ports))


def run_cli(argv, prog="python -m netbpf.bypass"):
    """The command line: its exit status (bad input: one line on stderr and 2)."""
    return command.main("netbpf.bypass", lambda: cli(argv, prog))


def main():
    sys.exit(run_cli(sys.argv[1:]))
