# SPDX-License-Identifier: MIT
"""The `netbpf` console command: `netbpf bypass ...` and `netbpf multiport ...` are
`python -m netbpf.bypass ...` and `python -m netbpf.multiport ...`."""

import importlib
import sys

from . import libbpf_version

TOOLS = {"bypass": "local TCP connections skip the TCP/IP stack, and no program can tell",
         "multiport": "many processes bind one port; each gets a free real one, and nobody can tell"}
USAGE = "usage: netbpf {bypass,multiport} [ARGS...]   (netbpf TOOL --help for a tool's arguments)"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        for name, what in TOOLS.items():
            print(f"  {name:10} {what}")
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"netbpf {version('netbpf')}, libbpf {libbpf_version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in TOOLS:
        print(f"netbpf: no tool named {name!r} (have: {', '.join(TOOLS)})", file=sys.stderr)
        return 2
    return importlib.import_module(f".{name}", __package__).run_cli(rest, prog=f"netbpf {name}")


def console():
    sys.exit(main())
