# SPDX-License-Identifier: MIT
"""Benchmark (not a timed assertion): open + load + attach + detach of a small object."""

from netbpf import Object

from conftest import built_object


def test_bench_open_load_attach_detach(benchmark, cg):
    path = built_object("probe")

    def cycle():
        with Object(path) as obj:
            obj.load()
            link = obj.programs["on_bind4"].attach_cgroup(cg)
            link.close()
        return link.closed

    assert benchmark(cycle)
