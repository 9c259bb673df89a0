"""The loader against the running kernel: every program type attached to a child cgroup, the
event caused from a process inside it, the effect read back from a map."""

import errno
import os
import socket

import pytest

import netbpf
from netbpf import Link, Object, features
from netbpf.loader import ProgAttachment

from conftest import run_in, built_object

EV_BIND, EV_POST_BIND, EV_CONNECT, EV_GETSOCKNAME, EV_GETPEERNAME, EV_RELEASE = range(6)
EV_SOCKOPS_ESTABLISHED, EV_SK_MSG, EV_TRACEPOINT = 6, 7, 8
AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6


@pytest.fixture
def probe():
    with Object(built_object("probe")) as obj:
        obj.load()
        yield obj


def count(obj, event, family):
    try:
        return obj.maps["events"][{"event": event, "family": family}].count
    except KeyError:
        return 0


def bind_and_name(family, host, port):
    """bind, listen, getsockname; returns the port getsockname reports."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return s.getsockname()[1]


def connect_pair(family, host, payload=b""):
    """A listener and a connected client; the client sends `payload`; returns what arrived."""
    with socket.socket(family, socket.SOCK_STREAM) as srv:
        srv.bind((host, 0))
        srv.listen()
        with socket.create_connection(srv.getsockname()[:2]) as cli:
            conn, _ = srv.accept()
            with conn:
                cli.getpeername()
                cli.sendall(payload)
                cli.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := conn.recv(65536):
                    got += chunk
                return got


# --- open, load, names, errors ---

def test_open_names_programs_and_maps_with_sections(probe):
    assert probe.programs["on_bind4"].section == "cgroup/bind4"
    assert probe.programs["on_sk_msg"].section == "sk_msg"
    assert {"events", "percpu_counts", "socks", "remap_config"} <= set(probe.maps)
    assert probe.programs["on_bind4"].id > 0 and probe.maps["events"].id > 0


def test_open_from_bytes_loads_the_same_object():
    data = built_object("probe").read_bytes()
    with Object(data) as obj:
        obj.load()
        assert set(obj.programs) == {p for p in Object(built_object("probe")).programs}


def test_missing_map_or_program_name_says_what_exists(probe):
    with pytest.raises(KeyError, match="no map named 'nope'.*events"):
        probe.maps["nope"]
    with pytest.raises(KeyError, match="no program named 'nope'.*on_bind4"):
        probe.programs["nope"]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(netbpf.ObjectFileError, match="not found"):
        Object(tmp_path / "absent.bpf.o")


@pytest.mark.parametrize("content, message", [
    (b"this is not an ELF file at all" * 4, "not an ELF file"),
    (open("/bin/true", "rb").read(), "not a BPF object .ELF machine EM_X86_64|not a BPF object"),
])
def test_corrupt_or_foreign_object_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.bpf.o"
    path.write_bytes(content)
    with pytest.raises(netbpf.ObjectFileError, match=message):
        Object(path)


def test_truncated_bpf_object_fails_in_libbpf_with_its_message():
    data = built_object("probe").read_bytes()
    with pytest.raises((netbpf.ObjectFileError, netbpf.LibbpfError)) as info:
        Object(data[: len(data) // 2]).load()
    assert str(info.value)


def test_verifier_rejection_carries_the_full_log():
    obj = Object(built_object("rejected"))
    with pytest.raises(netbpf.VerifierError) as info:
        obj.load()
    err = info.value
    assert err.program == "unchecked_lookup"
    assert err.errno == errno.EACCES
    assert "invalid mem access 'map_value_or_null'" in err.log
    assert "processed" in err.log.splitlines()[-1] or "processed" in err.log
    summary = str(err)
    assert "unchecked_lookup" in summary and len(summary.splitlines()) <= netbpf.VerifierError.SUMMARY_LINES + 2
    obj.close()


def test_non_root_caller_gets_a_clear_permission_error():
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        message = b"loaded"
        try:
            os.setgid(65534)
            os.setuid(65534)  # nobody
            Object(built_object("probe")).load()
        except netbpf.LibbpfError as exc:
            message = f"{type(exc).__name__}|{exc.errno}|{exc}".encode()
        except BaseException as exc:  # noqa: BLE001
            message = f"other|{exc!r}".encode()
        os.write(write_fd, message)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        kind, code, text = f.read().decode().split("|", 2)
    os.waitpid(pid, 0)
    assert kind == "LibbpfError"
    assert int(code) == errno.EPERM
    assert "needs root" in text


# --- maps ---

def test_map_is_a_dict_with_btf_field_names(probe):
    events = probe.maps["events"]
    key = {"event": EV_BIND, "family": 99}
    with pytest.raises(KeyError):
        events[key]
    events[key] = {"count": 7, "last_pid": 42, "comm": "hello"}
    value = events[key]
    assert value.count == 7 and value.last_pid == 42 and value.comm == "hello" and value.last_port == 0
    assert type(value).__name__ == "event_value"
    assert list(events) == [(EV_BIND, 99)] and len(events) == 1
    with pytest.raises(netbpf.LibbpfError, match="EEXIST"):
        events.put(key, {"count": 1}, netbpf.NOEXIST)
    with pytest.raises(KeyError):
        events.put({"event": 1, "family": 1}, {"count": 1}, netbpf.EXIST)
    events.put(key, (8, 1, 2, "x"), netbpf.EXIST)
    assert events[key] == (8, 1, 2, "x")
    del events[key]
    with pytest.raises(KeyError):
        del events[key]
    assert dict(events) == {}


def test_map_items_uses_batch_lookup_and_matches_key_by_key(probe):
    events = probe.maps["events"]
    for i in range(40):
        events[(i, i + 1)] = {"count": i * 3}
    batched = dict(events.items())
    walked = {k: events[k] for k in events}
    assert len(batched) == 40 and batched == walked
    assert batched[(5, 6)].count == 15


def test_percpu_map_gives_one_value_per_cpu_and_sums(probe):
    counts = probe.maps["percpu_counts"]
    ncpus = counts.ncpus
    assert ncpus == netbpf.libbpf.lib.libbpf_num_possible_cpus() >= 1
    counts[3] = list(range(1, ncpus + 1))
    assert counts[3] == list(range(1, ncpus + 1))
    assert counts.sum(3) == ncpus * (ncpus + 1) // 2


def test_max_entries_is_set_before_load():
    with Object(built_object("probe")) as obj:
        obj.maps["events"].max_entries = 3
        obj.load()
        events = obj.maps["events"]
        for i in range(3):
            events[(i, 0)] = {"count": 1}
        with pytest.raises(netbpf.LibbpfError, match="E2BIG"):
            events[(9, 0)] = {"count": 1}


def test_pinned_map_reopens_with_the_same_btf_codecs(probe, pin_dir):
    probe.maps["events"][(1, 2)] = {"count": 11, "comm": "pinned"}
    probe.maps["events"].pin(pin_dir / "events")
    again = netbpf.Map.open_pinned(pin_dir / "events", like=probe.maps["events"])
    assert again[(1, 2)].comm == "pinned" and again[(1, 2)].count == 11
    raw = netbpf.Map.open_pinned(pin_dir / "events")
    assert len(raw[(2 << 32) | 1]) == 32  # without BTF: key as int, value as bytes
    again.close()
    raw.close()


# --- every program type attached to a child cgroup, its effect observed ---

def test_cgroup_programs_see_their_events(probe, cg):
    names = ["on_bind4", "on_bind6", "on_post_bind4", "on_post_bind6", "on_connect4", "on_connect6",
             "on_getsockname4", "on_getsockname6", "on_getpeername4", "on_getpeername6", "on_release"]
    links = [probe.programs[n].attach_cgroup(cg) for n in names]
    assert all(link.info()["type"] == "cgroup" for link in links)

    def exercise():
        connect_pair(AF_INET, "127.0.0.1")
        connect_pair(AF_INET6, "::1")
        return os.getpid()

    pid = run_in(cg, exercise)
    for event in (EV_BIND, EV_POST_BIND, EV_CONNECT, EV_GETSOCKNAME, EV_GETPEERNAME, EV_RELEASE):
        for family in (AF_INET, AF_INET6):
            assert count(probe, event, family) >= 1, (event, family)
    assert probe.maps["events"][(EV_CONNECT, AF_INET)].last_pid == pid
    with open("/proc/self/comm") as f:  # the forked child keeps our comm
        assert probe.maps["events"][(EV_CONNECT, AF_INET)].comm == f.read().strip()
    for link in links:
        link.close()


def test_programs_do_not_see_processes_outside_the_cgroup(probe, cg):
    link = probe.programs["on_connect4"].attach_cgroup(cg)
    connect_pair(AF_INET, "127.0.0.1")  # this process is not in cg
    assert count(probe, EV_CONNECT, AF_INET) == 0
    link.close()


def test_bind4_rewrite_is_visible_and_stops_on_close(probe, cg):
    free = bind_and_name(AF_INET, "127.0.0.1", 0)
    probe.maps["remap_config"][0] = {"from": 1, "to": free}
    link = probe.programs["on_bind4"].attach_cgroup(cg)
    assert run_in(cg, bind_and_name, AF_INET, "127.0.0.1", 1) == free
    link.close()
    assert link.closed
    assert run_in(cg, bind_and_name, AF_INET, "127.0.0.1", 1) == 1
    assert count(probe, EV_BIND, AF_INET) == 1  # the bind after close() was not seen


def test_closing_the_object_detaches_its_links(cg):
    free = bind_and_name(AF_INET, "127.0.0.1", 0)
    obj = Object(built_object("probe")).load()
    obj.maps["remap_config"][0] = {"from": 2, "to": free}
    obj.programs["on_bind4"].attach_cgroup(cg)
    assert run_in(cg, bind_and_name, AF_INET, "127.0.0.1", 2) == free
    obj.close()
    assert run_in(cg, bind_and_name, AF_INET, "127.0.0.1", 2) == 2


def test_pinned_link_outlives_the_object_and_detaches_later(cg, pin_dir):
    free = bind_and_name(AF_INET, "127.0.0.1", 0)
    with Object(built_object("probe")) as obj:
        obj.load()
        obj.maps["remap_config"][0] = {"from": 3, "to": free}
        obj.programs["on_bind4"].attach_cgroup(cg).pin(pin_dir / "bind4")
    # the object is gone; the pinned link keeps the program attached
    assert run_in(cg, bind_and_name, AF_INET, "127.0.0.1", 3) == free
    link = Link.open_pinned(pin_dir / "bind4")
    assert link.program == "on_bind4" and link.info()["type"] == "cgroup"
    link.detach()
    assert not (pin_dir / "bind4").exists()
    assert run_in(cg, bind_and_name, AF_INET, "127.0.0.1", 3) == 3
    assert attached_prog_ids(cg, 8) == []  # BPF_CGROUP_INET4_BIND


def attached_prog_ids(group, attach_type):
    ids = netbpf.libbpf.ffi.new("uint32_t[64]")
    cnt = netbpf.libbpf.ffi.new("uint32_t *", 64)
    fd = os.open(group.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert netbpf.libbpf.lib.bpf_prog_query(fd, attach_type, 0, netbpf.libbpf.ffi.NULL, ids, cnt) == 0
    finally:
        os.close(fd)
    return list(ids[0:cnt[0]])


@pytest.mark.parametrize("use_link", [True, False], ids=["bpf_link", "prog_attach"])
def test_sockops_and_sk_msg_attach_pin_reopen_detach(cg, pin_dir, use_link):
    if use_link and not features.sockmap_link():
        pytest.skip("kernel has no sockmap bpf_link (Linux 6.10+): sk_msg attaches with bpf_prog_attach")
    with Object(built_object("probe")) as obj:
        obj.load()
        sockops = obj.programs["on_sockops"].attach_cgroup(cg)
        msg = obj.programs["on_sk_msg"].attach_sockmap(obj.maps["socks"], use_link=use_link)
        assert isinstance(msg, ProgAttachment) != use_link
        assert msg.kind == ("bpf_link" if use_link else "prog_attach")
        msg.pin(pin_dir / "sk_msg")
        sockops.pin(pin_dir / "sockops")
        assert run_in(cg, connect_pair, AF_INET, "127.0.0.1", b"x" * 1000) == b"x" * 1000
        assert count(obj, EV_SOCKOPS_ESTABLISHED, AF_INET) == 2  # both ends
        assert count(obj, EV_SK_MSG, AF_INET) >= 1
        events = obj.maps["events"]
        events_pin = pin_dir / "events"
        events.pin(events_pin)
    # reopen both attachments from their pins in "another process's" view and detach them
    for name in ("sk_msg", "sockops"):
        link = Link.open_pinned(pin_dir / name)
        assert isinstance(link, ProgAttachment) == (name == "sk_msg" and not use_link)
        link.detach()
        assert not (pin_dir / name).exists()
    assert attached_prog_ids(cg, 3) == []  # BPF_CGROUP_SOCK_OPS
    events = netbpf.Map.open_pinned(events_pin)
    before = len(events)
    assert run_in(cg, connect_pair, AF_INET, "127.0.0.1", b"after") == b"after"
    assert len(events) == before
    events.close()


def test_tracepoint_program_counts_syscalls(probe):
    with probe.programs["on_getsockname_tp"].attach_tracepoint() as link:
        assert link.info()["type"] == "perf_event"
        bind_and_name(AF_INET, "127.0.0.1", 0)
        seen = count(probe, EV_TRACEPOINT, 0)
        assert seen >= 1
    bind_and_name(AF_INET, "127.0.0.1", 0)
    after_close = count(probe, EV_TRACEPOINT, 0)
    bind_and_name(AF_INET, "127.0.0.1", 0)
    assert count(probe, EV_TRACEPOINT, 0) == after_close


def test_default_sk_msg_attach_uses_what_the_kernel_has(probe):
    with probe.programs["on_sk_msg"].attach_sockmap(probe.maps["socks"]) as link:
        assert link.kind == ("bpf_link" if features.sockmap_link() else "prog_attach")


def test_feature_probes_agree_with_real_loads():
    summary = features.summary()
    assert summary["cgroup_getsockname"] and summary["cgroup_sock_release"]  # the probe object needs them
    with Object(built_object("probe")) as obj:
        obj.load()  # would fail without the hooks the probes report


def test_libbpf_version_names_the_library():
    text = netbpf.libbpf_version()
    major, minor = netbpf.libbpf.version()
    assert text.startswith(f"{major}.{minor} (") and major >= 1
