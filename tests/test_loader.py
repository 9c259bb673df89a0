# SPDX-License-Identifier: MIT
"""The loader against the running kernel: every program type attached to a child cgroup, the
event caused from a process inside it, the effect read back from a map."""

import errno
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import netbpf
import netbpf.loader.object
from netbpf import Link, Object, features
from netbpf.loader import ProgAttachment

from conftest import built_object, run_in, wait_for

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
    assert len(summary.splitlines()) <= netbpf.VerifierError.SUMMARY_LINES + 1
    first, *context = summary.splitlines()
    assert "'unchecked_lookup'" in first and first.endswith("R0 invalid mem access 'map_value_or_null'")
    assert any("*value += 1;" in line for line in context)  # the source line that failed
    obj.close()


@pytest.mark.parametrize("privileges", ["nobody", "root-without-bpf"])
def test_a_caller_without_privileges_gets_a_clear_permission_error(privileges):
    def load():
        try:
            Object(built_object("probe")).load()
        except netbpf.LibbpfError as exc:
            return type(exc).__name__, exc.errno, str(exc)
        return "loaded", 0, ""

    kind, code, text = run_in(None, load, privileges=privileges)
    assert (kind, code) == ("LibbpfError", errno.EPERM)
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


def test_a_pinned_map_of_another_layout_is_refused_not_misread(probe, pin_dir):
    """A map opened `like` one of the object must be that one's type, sizes and BTF layout:
    reading another with this object's codecs and buffers would misread every entry."""
    events = probe.maps["events"]
    with netbpf.Map.create(netbpf.types.MapType.HASH, events.key_codec.size, events.value_codec.size + 8, 16) as other:
        other.pin(pin_dir / "bigger")
    with netbpf.Map.create(netbpf.types.MapType.ARRAY, 4, events.value_codec.size, 16) as array:
        array.pin(pin_dir / "array")
    with pytest.raises(netbpf.errors.LayoutError, match="values here"):
        netbpf.Map.open_pinned(pin_dir / "bigger", like=events)
    with pytest.raises(netbpf.errors.LayoutError, match="array map here"):
        netbpf.Map.open_pinned(pin_dir / "array", like=events)
    with Object(built_object("globals")) as other_object:  # an array of 4-byte values, laid out otherwise
        other_object.load()
        other_object.maps["globals.data"].pin(pin_dir / "data")
    counts = netbpf.object_file("bypass").maps["cgroup_ports"]  # __u32 -> __u32, an int where .data has a struct
    with pytest.raises(netbpf.errors.LayoutError, match="lays its values out otherwise"):
        netbpf.Map.open_pinned(pin_dir / "data", like=counts)


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


# --- global data: .rodata, .data, .bss ---

@pytest.fixture
def globals_obj():
    with Object(built_object("globals")) as obj:
        yield obj


def test_rodata_is_set_before_load_and_bss_counts_in_the_kernel(globals_obj):
    obj = globals_obj
    assert obj.rodata.values()._asdict() == {"target_pid": 0, "step": 1}
    assert (obj.data.enabled, obj.bss.calls) == (1, 0)
    obj.rodata.target_pid = os.getpid()
    obj.rodata.step = 3
    obj.load()
    with obj.programs["count_getsockname"].attach_tracepoint(), socket.socket() as s:
        before = obj.bss.calls
        s.getsockname()
        s.getsockname()
        assert obj.bss.calls == before + 6
        subprocess.run([sys.executable, "-c", "import socket; socket.socket().getsockname()"], check=True)
        assert obj.bss.calls == before + 6  # another pid: the .rodata filter held
        obj.data.enabled = 0  # .data is written in the kernel's map after load
        s.getsockname()
        assert obj.bss.calls == before + 6
    assert obj.rodata.step == 3
    with pytest.raises(AttributeError, match="read-only after load"):
        obj.rodata.step = 1


def test_a_global_that_does_not_exist_names_those_that_do(globals_obj):
    with pytest.raises(AttributeError, match="have: target_pid, step"):
        globals_obj.rodata.nothing
    with pytest.raises(AttributeError, match="no variable 'nothing'"):
        globals_obj.bss.nothing = 1
    assert Object(built_object("rejected")).rodata is None


def test_settings_made_before_load_cannot_follow_it(globals_obj):
    globals_obj.load()
    with pytest.raises(ValueError, match="loaded already: set max_entries of globals.bss before load"):
        globals_obj.maps["globals.bss"].max_entries = 2


# --- handles after their owner is gone ---

def test_programs_maps_and_globals_raise_once_their_object_is_closed():
    obj = Object(built_object("globals"))
    obj.load()
    prog, bss, globals_bss = obj.programs["count_getsockname"], obj.maps["globals.bss"], obj.bss
    obj.close()
    for use in (lambda: prog.fd, lambda: prog.type, lambda: bss.fd, lambda: bss.max_entries,
                lambda: bss[0], lambda: globals_bss.calls, lambda: prog.attach_tracepoint()):
        with pytest.raises(ValueError, match="is closed"):
            use()


def test_btf_of_a_closed_object_raises_instead_of_reading_freed_memory():
    """obj.btf points into libbpf's object: once closed, it raises (in a child: a crash would
    show as the child's death)."""

    def use_after_close():
        obj = Object(built_object("globals"))
        btf = obj.btf
        obj.close()
        failures = []
        for use in (lambda: btf.enum("nope"), lambda: btf.codec(1), lambda: btf.type_name(1)):
            try:
                use()
            except ValueError as exc:
                failures.append("is closed" in str(exc))
        return failures

    assert run_in(None, use_after_close) == [True, True, True]


def test_a_failed_open_raises_once_and_nothing_at_collection(monkeypatch):
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(netbpf.ObjectFileError):
        Object(b"\x7fELF" + b"\0" * 200)
    import gc
    gc.collect()
    assert unraisable == []


def mutated(data, rng):
    """`data` with a few random bytes overwritten."""
    damaged = bytearray(data)
    for _ in range(rng.choice((1, 2, 4, 8, 16))):
        damaged[rng.randrange(len(damaged))] = rng.randrange(256)
    return bytes(damaged)


def open_in_a_child(data):
    """Open `data` as an object in a forked child: "ok", "error" (a netbpf error in one line),
    "signal N" (the child died), or what else escaped."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            with Object(data) as obj:
                [(m.name, m.value_codec.size) for m in obj.maps.values()]
            outcome = "ok"
        except netbpf.NetbpfError as exc:
            outcome = "error" if "\n" not in str(exc) and str(exc) else f"error of {str(exc).count(chr(10)) + 1} lines"
        except BaseException as exc:  # noqa: BLE001 - what escapes is the finding
            outcome = f"escaped {type(exc).__name__}: {exc}"
        os.write(write_fd, outcome.encode()[:512])
        os._exit(0)
    os.close(write_fd)
    outcome = os.read(read_fd, 512).decode()
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    return f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else outcome


@pytest.mark.slow
def test_thousands_of_damaged_objects_each_open_or_fail_in_one_line():
    """Objects with random bytes overwritten (the tools' own and the tests'), each opened in a
    child: libbpf never sees one that would crash it (netbpf.loader.elfcheck, and a first open
    in a child), and every failure is one netbpf error of one line."""
    import collections
    import random

    rng, outcomes = random.Random(2026), collections.Counter()
    sources = [netbpf.object_path("bypass"), built_object("probe"), built_object("globals")]
    for source in sources:
        data = Path(source).read_bytes()
        for _ in range(1000):
            outcomes[open_in_a_child(mutated(data, rng))] += 1
    print(f"\n3000 damaged objects: {dict(outcomes)}")
    assert set(outcomes) <= {"ok", "error"}, outcomes
    assert outcomes["error"] > 1000 and outcomes["ok"] > 100, outcomes


def test_a_map_opened_from_a_pin_raises_after_close(probe, pin_dir):
    probe.maps["events"].pin(pin_dir / "events")
    events = netbpf.Map.open_pinned(pin_dir / "events", like=probe.maps["events"])
    events.close()
    events.close()  # twice is once
    with pytest.raises(ValueError, match="is closed"):
        len(events)


def test_a_pinned_tracepoint_link_keeps_running_after_its_handle_and_object_close(globals_obj, pin_dir):
    obj = globals_obj
    obj.rodata.target_pid = os.getpid()
    obj.load()
    obj.programs["count_getsockname"].attach_tracepoint().pin(pin_dir / "link")
    bss = obj.maps["globals.bss"]
    bss.pin(pin_dir / "bss")
    calls = netbpf.Map.open_pinned(pin_dir / "bss", like=bss)
    obj.close()  # closes the link's handle; the pin holds the attachment
    with socket.socket() as s:
        before = calls[0].calls
        s.getsockname()
        assert calls[0].calls == before + 1
        Link.open_pinned(pin_dir / "link").detach()

        def counts_no_more():  # a perf-event link has no detach: it ends when the kernel frees it
            start = calls[0].calls
            s.getsockname()
            return calls[0].calls == start

        assert wait_for(counts_no_more)
    calls.close()


# --- map walks and clear ---

def hash_map(entries=64):
    return netbpf.Map.create(netbpf.types.MapType.HASH, 4, 4, entries, "netbpf_hash")


def test_a_walk_yields_each_key_once_while_keys_are_deleted_under_it():
    with hash_map() as keys:
        for i in range(64):
            keys[i] = i
        walked = []
        for key in keys:
            walked.append(key)
            if len(walked) % 2 == 0:
                del keys[key]  # the walk's own position: the kernel starts again from the first key
        assert len(walked) == len(set(walked)) == 64
        assert len(keys) == 32


def test_a_walk_reports_errors_other_than_the_end():
    queue = netbpf.Map.create(netbpf.types.MapType.QUEUE, 0, 4, 8, "netbpf_queue")
    with queue, pytest.raises(netbpf.LibbpfError, match="walk the keys of map netbpf_queue"):
        list(queue)


def test_clear_empties_a_hash_and_zeroes_an_array():
    with hash_map() as keys:
        keys.update({1: 1, 2: 2})
        keys.clear()
        assert len(keys) == 0
    array = netbpf.Map.create(netbpf.types.MapType.ARRAY, 4, 8, 4, "netbpf_array")
    with array:
        array[2] = 7
        array.clear()
        assert dict(array.items()) == {0: 0, 1: 0, 2: 0, 3: 0}


# --- the verifier log ---

def test_a_verifier_log_longer_than_the_first_buffer_arrives_whole(monkeypatch):
    with Object(built_object("rejected")) as obj, pytest.raises(netbpf.VerifierError) as full:
        obj.load()
    monkeypatch.setattr(netbpf.loader.object, "VERIFIER_LOG_START", 128)  # the least a kernel takes
    with Object(built_object("rejected")) as obj, pytest.raises(netbpf.VerifierError) as grown:
        obj.load()
    assert grown.value.errno == errno.EACCES  # the verifier's answer, not the log's ENOSPC
    assert len(full.value.log) > 128
    assert grown.value.log.splitlines()[-3:] == full.value.log.splitlines()[-3:]
    assert len(grown.value.log.splitlines()) == len(full.value.log.splitlines())


def test_types_are_enum_members(probe):
    assert probe.programs["on_getsockname_tp"].type is netbpf.types.ProgType.TRACEPOINT
    assert probe.maps["events"].type is netbpf.types.MapType.HASH


@pytest.mark.parametrize("tool, settings", [
    ("bypass", {"cgroup_id", "scope", "ports_only", "queue_floor", "allow_blocking"}),
    ("multiport", {"allow_privileged"})])
def test_the_tools_fixed_settings_are_rodata_globals_not_maps(tool, settings):
    with Object(netbpf.object_path(tool)) as obj:
        assert settings <= set(obj.rodata.values()._fields)
        assert not [name for name in obj.maps if "config" in name]


def test_a_c_enum_reads_back_from_btf_with_the_header_s_names_and_values():
    header = (Path(__file__).resolve().parent.parent / "bpf" / "bypass.h").read_text()
    body = re.search(r"enum sock_state \{(.*?)\};", header, re.S).group(1)
    declared = {name: int(value) for name, value in re.findall(r"STATE_(\w+) = (\d+)", body)}
    with Object(netbpf.object_path("bypass")) as obj:
        state = obj.btf.enum("sock_state", "STATE_")
        assert {member.name: member.value for member in state} == declared
        assert state(3) is state.JOINED
        with pytest.raises(KeyError, match="no enum nothing"):
            obj.btf.enum("nothing")


def test_misuse_raises_value_or_type_errors_and_a_missing_kernel_operation_says_so(cg):
    with Object(built_object("globals")) as obj:
        obj.load()
        with pytest.raises(TypeError, match="is not a cgroup program"):
            obj.programs["count_getsockname"].attach_cgroup(cg)
    with netbpf.Map.create(netbpf.types.MapType.ARRAY, 4, 4, 1, "netbpf_plain") as plain:
        with pytest.raises(TypeError, match="opened from a pin or an id"):
            plain.initial_value
    for err, kind in ((errno.EOPNOTSUPP, netbpf.errors.NotSupportedError), (524, netbpf.errors.NotSupportedError),
                      (errno.EPERM, netbpf.LibbpfError)):
        made = netbpf.errors.libbpf_error("attach", -err)
        assert type(made) is kind and made.errno == err
