# SPDX-License-Identifier: MIT
"""python -m netbpf TOOL ...: the same as the `netbpf` command."""

from .cli import console

console()
