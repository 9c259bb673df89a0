# SPDX-License-Identifier: MIT
"""The tools' counters for Prometheus: read at scrape time and written in the exposition format
by prometheus-client (the `metrics` extra; Debian: python3-prometheus-client).

A tool describes its metrics with `metric_families(stats)`: (kind, name, help, samples), where
samples maps a tuple of (label, value) pairs to a number. Every sample also gets a `cgroup`
label: the cgroup the tool is attached to."""

import ipaddress
import socket
import threading
from http.server import ThreadingHTTPServer

from .errors import UsageError

COUNTER, GAUGE = "counter", "gauge"


def _client():
    try:
        import prometheus_client
        import prometheus_client.core  # noqa: F401  (the metric families)
        import prometheus_client.exposition  # noqa: F401  (the HTTP handler)
    except ImportError:
        raise UsageError("metrics need the prometheus-client package (pip install 'netbpf[metrics]'; "
                         "Debian: apt-get install python3-prometheus-client)") from None
    return prometheus_client


def parse_address(text):
    """'127.0.0.1:9464', '[::1]:9464', ':9464' (every address) -> (host, port)."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--metrics {text!r} is not ADDR:PORT (127.0.0.1:9464, [::1]:9464, :9464)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise UsageError(f"--metrics {text!r}: {host!r} is not an IP address") from None
    return host, int(port)


def format_address(address):
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host or '0.0.0.0'}:{port}"


class _Collector:
    """A prometheus-client collector that reads the tool's stats when scraped."""

    def __init__(self, read, families):
        self.read, self.families = read, families

    def collect(self):
        client = _client().core
        cgroup, stats = self.read()
        for kind, name, help_text, samples in self.families(stats):
            labels = sorted({label for key in samples for label, _ in key} | {"cgroup"})
            family_type = client.CounterMetricFamily if kind == COUNTER else client.GaugeMetricFamily
            family = family_type(name, help_text, labels=labels)
            for key, value in samples.items():
                values = dict(key, cgroup=cgroup)
                family.add_metric([values.get(label, "") for label in labels], value)
            yield family


def registry(read, families):
    """A registry whose one collector calls read() -> (cgroup, stats) at each scrape."""
    client = _client()
    reg = client.CollectorRegistry(auto_describe=False)
    reg.register(_Collector(read, families))
    return reg


def text(reg):
    """The exposition text, once."""
    return _client().generate_latest(reg).decode()


class _BoundedServer(ThreadingHTTPServer):
    """At most MAX_CLIENTS requests at a time, each with READ_TIMEOUT seconds for every read: a
    client that connects and says nothing (or too many of them) costs a thread for a moment, not
    the endpoint. Connections beyond the limit are closed at once."""

    MAX_CLIENTS = 8
    READ_TIMEOUT = 5.0
    daemon_threads = True

    def __init__(self, *args, **kwargs):
        self.slots = threading.BoundedSemaphore(self.MAX_CLIENTS)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        request.settimeout(self.READ_TIMEOUT)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _BoundedServer6(_BoundedServer):
    address_family = socket.AF_INET6


class Server:
    """The registry served over HTTP on (host, port) in a background thread until close()
    (_BoundedServer: a few clients at a time, each read with a deadline)."""

    def __init__(self, reg, address):
        handler = _client().exposition.MetricsHandler.factory(reg)
        host, port = address
        server_class = _BoundedServer
        if host and ipaddress.ip_address(host).version == 6:
            server_class = _BoundedServer6
        try:
            self.http = server_class((host, port), handler)
        except OSError as exc:
            raise UsageError(f"cannot serve metrics on {host or '*'}:{port}: {exc.strerror}") from None
        self.thread = threading.Thread(target=self.http.serve_forever, name="netbpf-metrics", daemon=True)
        self.thread.start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()
        self.thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def counter(name, help_text, value):
    return COUNTER, name, help_text, {(): value}


def gauge(name, help_text, value):
    return GAUGE, name, help_text, {(): value}


def by_label(kind, name, help_text, label, values):
    """A family with one sample per entry of values ({label value: number})."""
    return kind, name, help_text, {((label, key),): value for key, value in values.items()}
