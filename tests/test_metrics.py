# SPDX-License-Identifier: MIT
"""Prometheus metrics: `run --metrics` scraped by a real Prometheus server, the exposition text
read back and parsed, and `status --metrics-text`."""

import json
import shutil
import socket
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from netbpf.testing import free_port

from clitools import bpf_loaded, run_cli
from conftest import run_in, wait_for
from netutil import PATTERN, close_all, joinable_pair, recv_exactly

TRAFFIC = 3 << 20


def scrape(port):
    """{(name, labels without cgroup): (type, value)} from the metrics endpoint, or {} when it does
    not answer yet."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    return parse(text)


def parse(text):
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "cgroup"))
            found[(sample.name, labels)] = (family.type, sample.value, sample.labels.get("cgroup"))
    return found


class Running:
    """`python -m netbpf.TOOL run ... --metrics 127.0.0.1:PORT` until the block ends (SIGINT)."""

    def __init__(self, tool, *args):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", f"netbpf.{tool}", "run", *map(str, args),
                                      "--interval", "3600", "--metrics", f"127.0.0.1:{self.port}"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def __enter__(self):
        assert "attached to" in self.proc.stdout.readline(), self.proc.stderr.read()
        assert wait_for(lambda: scrape(self.port), 30), "the metrics endpoint did not answer"
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(2)
        self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0


def send_through(size):
    """A pair of the cgroup (joined: the parent waits at sync()) carries `size` bytes, in blocks
    of at most 1 MiB, each read before the next is sent."""
    srv, cli, conn = joinable_pair()
    intact, left = True, size
    while left:
        block = PATTERN[:min(left, len(PATTERN))]
        cli.sendall(block)
        intact &= recv_exactly(conn, len(block)) == block
        left -= len(block)
    close_all(srv, cli, conn)
    return intact


def sockets_joined(port):
    def wait():
        assert wait_for(lambda: scrape(port).get(("netbpf_bypass_sockets", ()), (0, 0))[1] >= 2, 60, 0.25)

    return wait


class Prometheus:
    """A Prometheus server (Debian package `prometheus`) scraping 127.0.0.1:target every second."""

    def __init__(self, tmp_path, target):
        binary = shutil.which("prometheus")
        if not binary:
            pytest.fail("prometheus is not installed (Debian: apt-get install prometheus; make deps installs it)")
        self.port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                          "scrape_configs:\n  - job_name: netbpf\n    static_configs:\n"
                          f"      - targets: ['127.0.0.1:{target}']\n")
        self.proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def api(self, path, **params):
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            return json.load(urllib.request.urlopen(url, timeout=5))["data"]
        except OSError:
            return None

    def query(self, expr):
        """The instant vector of expr: [(labels, value)]."""
        data = self.api("query", query=expr)
        return [(r["metric"], float(r["value"][1])) for r in data["result"]] if data else []

    def __enter__(self):
        assert wait_for(lambda: self.api("status/buildinfo"), 60), "prometheus did not start"
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def test_prometheus_sees_the_bytes_the_bypass_redirected(cg, tmp_path):
    with Running("bypass", "--cgroup", cg.path) as bypass, Prometheus(tmp_path, bypass.port) as prometheus:
        assert run_in(cg, send_through, TRAFFIC, on_sync=sockets_joined(bypass.port))

        def redirected():
            return [value for labels, value in prometheus.query("netbpf_bypass_redirected_bytes_total")
                    if labels.get("cgroup") == str(cg.path) and labels.get("job") == "netbpf"]

        assert wait_for(lambda: redirected() and redirected()[0] >= TRAFFIC, 60), prometheus.query("up")
        joined = prometheus.query('netbpf_bypass_sockets_joined_total{job="netbpf"}')
        assert [value for _, value in joined] == [2.0]
        def kind(metric):
            found = prometheus.api("metadata", metric=metric) or {}
            return found.get(metric, [{}])[0].get("type")

        assert wait_for(lambda: kind("netbpf_bypass_redirected_bytes") == "counter", 30)  # the family: no _total
        assert kind("netbpf_bypass_sockets") == "gauge"


def test_bypass_metrics_have_prometheus_names_types_and_labels(cg):
    with Running("bypass", "--cgroup", cg.path) as bypass:
        assert run_in(cg, send_through, 100000, on_sync=sockets_joined(bypass.port))
        found = scrape(bypass.port)
    kind, redirected, _ = found[("netbpf_bypass_redirected_bytes_total", ())]
    assert kind == "counter" and redirected >= 100000
    assert found[("netbpf_bypass_sockets", ())][0] == "gauge"
    assert found[("netbpf_bypass_sockets_joined_total", ())][1] == 2
    reasons = {dict(labels)["reason"] for name, labels in found if name == "netbpf_bypass_sockets_kept_plain_total"}
    assert {"blocking", "spliced", "peer_outside", "peer_waiting"} <= reasons
    passed = {dict(labels)["reason"] for name, labels in found if name == "netbpf_bypass_passed_messages_total"}
    assert passed == {"no_peer", "not_reading", "peer_unsafe", "unread_plain", "peer_full", "detaching", "shut_down",
                      "redirect_failed"}
    assert {cgroup for _, _, cgroup in found.values()} == {str(cg.path)}


def test_multiport_metrics_count_mappings_and_binds(cg):
    port = free_port()
    with Running("multiport", "--cgroup", cg.path, "--port", port) as multiport:
        def bind_and_ask():
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
                s.listen()
                return wait_for(lambda: scrape(multiport.port).get(
                    ("netbpf_multiport_mappings", (("protocol", "tcp"),)), (0, 0))[1] == 1, 30)

        assert run_in(cg, bind_and_ask)
        found = scrape(multiport.port)
    assert found[("netbpf_multiport_binds_remapped_total", ())][:2] == ("counter", 1)
    assert found[("netbpf_multiport_mappings", (("protocol", "udp"),))][:2] == ("gauge", 0)
    assert found[("netbpf_multiport_refusals_total", (("reason", "no_listener"),))][1] == 0


def test_status_prints_the_metrics_text_of_a_pinned_bypass(cg, pin_dir):
    pins = pin_dir / "bypass"
    assert run_cli("bypass", "attach", "--cgroup", cg.path, "--pin-dir", pins).returncode == 0
    try:
        result = run_cli("bypass", "status", "--metrics-text", "--pin-dir", pins)
        assert result.returncode == 0, result.stderr
        found = parse(result.stdout)
        assert found[("netbpf_bypass_sockets", ())] == ("gauge", 0, str(cg.path))
    finally:
        assert run_cli("bypass", "detach", "--pin-dir", pins).returncode == 0
    missing = run_cli("bypass", "status", "--metrics-text", "--pin-dir", pins)
    assert missing.returncode == 2 and "not attached" in missing.stderr


@pytest.mark.parametrize("address, message", [("9464", "is not ADDR:PORT"), ("localhost:9464", "is not an IP address"),
                                              ("127.0.0.1:99999", "is not ADDR:PORT")])
def test_a_bad_metrics_address_is_one_line_and_status_2(cg, address, message):
    result = run_cli("bypass", "--cgroup", cg.path, "--metrics", address)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1


def test_a_metrics_port_in_use_is_one_line_and_nothing_stays_attached(cg):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_cli("bypass", "--cgroup", cg.path, "--metrics", f"127.0.0.1:{taken.getsockname()[1]}")
    assert result.returncode == 2 and "cannot serve metrics" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not bpf_loaded("bypass_")  # the port is taken before anything is attached


def test_the_endpoint_answers_while_idle_clients_hold_connections_and_closes_them():
    """Clients that connect and send nothing (or more of them than the endpoint serves at once)
    neither keep a scrape from being answered nor hold their connection past the read timeout."""
    from netbpf import metrics

    reg = metrics.registry(lambda: ("/test", {"n": 1}),
                           lambda stats: [metrics.counter("netbpf_test_total", "a test", stats["n"])])
    with metrics.Server(reg, ("127.0.0.1", 0)) as server:
        port = server.http.server_address[1]
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4 * server.http.MAX_CLIENTS)]
        try:
            # the slots free up as the idle clients time out: a scrape gets its answer by then
            assert wait_for(lambda: scrape(port), server.http.READ_TIMEOUT + 10), "no answer with idle clients"
            for conn in idle:  # each was closed: at once beyond the limit, else after the read timeout
                conn.settimeout(server.http.READ_TIMEOUT + 10)
                assert conn.recv(1) == b""
        finally:
            close_all(*idle)
