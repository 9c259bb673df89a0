# SPDX-License-Identifier: MIT
"""python -m netbpf.bypass"""

from .cli import main

main()
