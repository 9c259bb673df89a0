# SPDX-License-Identifier: MIT
"""deploy/: the Kubernetes manifest, checked offline against what the code expects, and the
container image recipe, built where a container engine answers."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from netbpf import bypass, metrics, mounts
from netbpf.types import Capability

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def manifest():
    return list(yaml.safe_load_all((DEPLOY / "kubernetes" / "netbpf-bypass.yaml").read_text()))


def daemonset():
    [found] = [doc for doc in manifest() if doc["kind"] == "DaemonSet"]
    return found


def test_the_manifest_is_a_namespace_and_a_daemonset_in_it():
    kinds = {(doc["apiVersion"], doc["kind"]): doc for doc in manifest()}
    assert set(kinds) == {("v1", "Namespace"), ("apps/v1", "DaemonSet")}
    ds = kinds[("apps/v1", "DaemonSet")]
    assert ds["metadata"]["namespace"] == kinds[("v1", "Namespace")]["metadata"]["name"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()


def test_the_container_runs_serve_with_options_the_tool_accepts():
    [container] = daemonset()["spec"]["template"]["spec"]["containers"]
    args = bypass.build_parser().parse_args(container["args"][1:])
    assert container["args"][0] == "bypass" and args.command == "serve"
    assert args.scope == "all"  # pods talk over their own addresses
    host, port = metrics.parse_address(args.metrics)
    assert host == ""  # every address of the pod: the probe and Prometheus come from outside
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == port
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/metrics" and probe["port"] in ("metrics", port)
    spec = daemonset()["spec"]["template"]
    assert spec["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert args.timeout < spec["spec"]["terminationGracePeriodSeconds"]  # stop drains, then exits


def test_privileges_are_the_capabilities_the_tool_checks_for_and_no_more():
    pod = daemonset()["spec"]["template"]["spec"]
    [container] = pod["containers"]
    security = container["securityContext"]
    assert security["privileged"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) == {cap.name for cap in Capability}
    assert pod["hostPID"] is True  # the join iterator sees the processes of the pid namespace it runs in
    assert not pod.get("hostNetwork")


def test_the_mounts_are_where_the_code_looks():
    pod = daemonset()["spec"]["template"]["spec"]
    [container] = pod["containers"]
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    mounted = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    args = bypass.build_parser().parse_args(container["args"][1:])
    assert mounted[mounts.BPFFS] == mounts.BPFFS and args.pin_dir.startswith(mounts.BPFFS + "/")
    assert mounted[mounts.TRACEFS] == mounts.TRACEFS
    cgroup_mount = next(path for path in mounted if args.cgroup.startswith(path + "/"))
    assert mounted[cgroup_mount] == "/sys/fs/cgroup"


def container_engine():
    for engine in ("podman", "docker"):
        path = shutil.which(engine)
        if path and subprocess.run([path, "info"], capture_output=True, timeout=60).returncode == 0:
            return path
    return None


def test_the_image_builds_and_runs_without_a_compiler():
    engine = container_engine()
    if engine is None:
        pytest.skip("no container engine answers here (podman or docker with a running daemon)")
    repo = DEPLOY.parent
    build = subprocess.run([engine, "build", "-f", str(DEPLOY / "Containerfile"), "-t", "netbpf:test", str(repo)],
                           capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([engine, "run", "--rm", "netbpf:test", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "bypass" in run.stdout
    compilers = subprocess.run([engine, "run", "--rm", "--entrypoint", "sh", "netbpf:test", "-c",
                                "command -v clang gcc cc || true"], capture_output=True, text=True, timeout=120)
    assert compilers.stdout.strip() == ""


def instructions(containerfile):
    """[(stage number, INSTRUCTION, argument)] with continuation lines joined."""
    text = containerfile.read_text().replace("\\\n", " ")
    found, stage = [], -1
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, argument = line.partition(" ")
        stage += instruction == "FROM"
        found.append((stage, instruction, " ".join(argument.split())))
    return found


def test_the_recipe_steps_build_a_package_that_runs_here(tmp_path):
    """Where no engine runs the recipe, its build steps run here (all but apt-get, whose packages
    `make deps` installed): the files it copies, its make and pip lines; the package they
    produce carries the BPF objects and runs with what the final stage installs."""
    steps = instructions(DEPLOY / "Containerfile")
    build = [(i, arg) for stage, i, arg in steps if stage == 0 and i in ("COPY", "RUN")]
    final = " ".join(arg for stage, i, arg in steps if stage == 1 and i == "RUN")
    work, target = tmp_path / "src", tmp_path / "opt"
    work.mkdir()
    for instruction, argument in build:
        if instruction == "COPY":
            *sources, dest = argument.split()
            for source in sources:
                origin = DEPLOY.parent / source
                copy = shutil.copytree if origin.is_dir() else shutil.copy
                copy(origin, work / (source if dest == "./" else dest))
        elif "apt-get" not in argument:
            # this interpreter: the image's python3 is Debian's, here python3 may be another one
            command = argument.replace("/opt/netbpf", str(target)).replace("python3 -m pip", f"{sys.executable} -m pip")
            result = subprocess.run(["sh", "-c", command], cwd=work, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (target / "netbpf" / "bpf").glob("*.bpf.o")) == ["bypass.bpf.o", "multiport.bpf.o"]
    for package in ("python3-cffi", "python3-prometheus-client", "libbpf1"):
        assert package in final
    assert "clang" not in final and "gcc" not in final
    run = subprocess.run([sys.executable, "-m", "netbpf", "--help"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert run.returncode == 0 and "bypass" in run.stdout, run.stderr
