# SPDX-License-Identifier: MIT
"""What the repository says about itself holds: every source names its licence, and the BPF
programs load under the licence their files state."""

import re
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from netbpf import object_path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = re.compile(r"\.(py|c|h|sh)$|^Makefile$|^\.ci/")


def tracked_sources():
    """The repository's own sources (not build output, not the vendored libbpf)."""
    skip = {".git", "build", "external", "__pycache__", ".pytest_cache", ".benchmarks"}
    found = []
    for path in ROOT.rglob("*"):
        relative = path.relative_to(ROOT)
        if path.is_file() and not skip & set(relative.parts) and not any(p.endswith(".egg-info") for p in relative.parts):
            if SOURCE.search(str(relative)) and not str(relative).startswith("src/netbpf/bpf/"):
                found.append(str(relative))
    return found


def spdx(path):
    head = (ROOT / path).read_text().splitlines()[:3]
    found = [m.group(1) for line in head for m in [re.search(r"SPDX-License-Identifier: ([\w.-]+)", line)] if m]
    return found[0] if found else None


def test_every_source_names_its_licence():
    sources = tracked_sources()
    assert len(sources) > 40
    expected = {f: "GPL-2.0" if f.startswith(("bpf/", "tests/bpf/")) or f.endswith(".bpf.c") else "MIT"
                for f in sources}
    assert {f: spdx(f) for f in sources} == expected
    assert (ROOT / "LICENSES" / "GPL-2.0.txt").read_text().startswith("                    GNU GENERAL PUBLIC LICENSE")
    assert "MIT License" in (ROOT / "LICENSE").read_text()


@pytest.mark.parametrize("tool", ["bypass", "multiport"])
def test_bpf_programs_declare_gpl_to_the_kernel(tool):
    """The licence the kernel reads (the object's "license" section) is the one the source states."""
    with open(object_path(tool), "rb") as f:
        declared = ELFFile(f).get_section_by_name("license").data()
    assert declared == b"GPL\0" and spdx(f"bpf/{tool}.bpf.c") == "GPL-2.0"
