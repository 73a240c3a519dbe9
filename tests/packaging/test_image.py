"""The container image, built and run for real: packaging/container/Containerfile
built with buildah on a base made here from a debootstrapped bookworm (no
registry), run by podman with the DaemonSet's pod spec translated flag by
flag from packaging/kubernetes/daemonset.yaml (podspec.py), scraped on the
host network, counting a real server on the host exactly. Then, read from the
kernel: the container's capability sets are the manifest's list, its root
filesystem is read-only, it is not privileged.
"""

from __future__ import annotations

import copy
import json
import socket
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

import cwimage
import cwpkg
import podspec
from conftest import Metrics, close_ends_the_server_closed, free_port, wait_for
from connwatch import caps
from connwatch.identity import Identity, identity
from cwpkg import ROOT
from cwpkg_fixtures import deb_path  # noqa: F401  (fixture)

DAEMONSET = ROOT / "packaging" / "kubernetes" / "daemonset.yaml"
KUSTOMIZATION = ROOT / "packaging" / "kubernetes" / "kustomization.yaml"


@pytest.fixture(scope="session")
def image(deb_path) -> str:  # noqa: F811
    return cwimage.build_image(deb_path)


@pytest.fixture(scope="module")
def daemonset() -> dict:
    return yaml.safe_load(DAEMONSET.read_text())


def manifest_capabilities(daemonset: dict) -> set[str]:
    (c,) = daemonset["spec"]["template"]["spec"]["containers"]
    sc = c["securityContext"]["capabilities"]
    assert sc["drop"] == ["ALL"]
    return {f"CAP_{name}" for name in sc["add"]}


@pytest.fixture(scope="module")
def config_maps(tmp_path_factory) -> dict[str, Path]:
    """The kustomization's configMapGenerator output as the kubelet mounts it:
    one directory per ConfigMap, one file per key."""
    kust = yaml.safe_load(KUSTOMIZATION.read_text())
    dirs = {}
    for gen in kust["configMapGenerator"]:
        d = tmp_path_factory.mktemp(gen["name"])
        d.chmod(0o755)
        for item in gen["files"]:
            key, _, source = item.partition("=")
            (d / key).write_bytes((KUSTOMIZATION.parent / (source or key)).read_bytes())
            (d / key).chmod(0o644)
        dirs[gen["name"]] = d
    return dirs


class Pod:
    """The DaemonSet's container under podman; removed, with its cgroups, by remove()."""

    def __init__(self, daemonset: dict, image: str, config_maps: dict[str, Path], seccomp: Path):
        self.name = f"cwtest-image-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self.spec = podspec.podman_run(daemonset, podspec.Node(
            image=image, container_name=self.name, config_maps=config_maps,
            runtime_default_seccomp=seccomp, listen_address=f"127.0.0.1:{self.port}"))
        self.id = ""
        t0 = time.monotonic()
        try:
            self.id = cwimage.podman(*self.spec.argv("--detach", *cwimage.engine_options(self.name))).stdout.strip()
        except BaseException:
            self.remove()  # a container podman created but could not start
            raise
        cwpkg.log(f"container {self.name} started in {time.monotonic() - t0:.1f}s")

    def inspect(self, fmt: str) -> str:
        return cwimage.podman("inspect", "--format", fmt, self.name).stdout.strip()

    @property
    def pid(self) -> int:
        return int(self.inspect("{{.State.Pid}}"))

    def logs(self) -> str:
        p = cwimage.podman("logs", self.name, check=False)
        return p.stdout + p.stderr

    def exec(self, *cmd: str, check: bool = True):
        return cwimage.podman("exec", self.name, *cmd, check=check)

    def scrape(self) -> Metrics | None:
        try:
            with urllib.request.urlopen(self.url, timeout=10) as r:
                return Metrics(r.read().decode())
        except OSError:
            return None

    def wait_ready(self) -> Metrics:
        """/metrics answers within the startupProbe's budget; then the probes attach."""
        t0 = time.monotonic()
        wait_for(self.scrape, timeout=self.spec.startup_budget_seconds,
                 what=lambda: f"/metrics of {self.name} (startupProbe)\n{self.logs()}")

        def ready() -> Metrics | None:
            m = self.scrape()
            return m if m and m.value("connwatch_ready") == 1 else None

        m = wait_for(ready, timeout=120, what=lambda: f"connwatch_ready 1 in {self.name}\n{self.logs()}")
        cwpkg.log(f"agent in {self.name} ready in {time.monotonic() - t0:.1f}s")
        return m

    def wait_for_value(self, name: str, expected: float, **labels) -> Metrics:
        last = {}

        def check():
            m = self.scrape()
            last["value"] = m and m.value(name, **labels)
            return m if last["value"] == expected else None

        return wait_for(check, timeout=30, what=lambda: f"{name}{labels} == {expected} (last {last.get('value')})")

    def remove(self) -> None:
        cwimage.podman("rm", "--force", "--time", "10", self.name, check=False)
        # conmon can outlive `podman rm` by a moment, in its cgroup below ours
        left: list[Path] = []

        def removed() -> bool:
            left[:] = cwimage.remove_cgroup_trees(self.name)
            return not left

        wait_for(removed, timeout=15, what=lambda: f"cgroups left behind: {left}")
        assert cwimage.podman("ps", "--all", "--quiet", "--filter", f"name={self.name}").stdout.strip() == ""
        assert not self.id or self.id not in Path("/proc/self/mountinfo").read_text(), "a container mount is left"


@pytest.fixture(scope="module")
def pod(daemonset, image, config_maps, tmp_path_factory):
    seccomp = cwimage.runtime_default_seccomp(tmp_path_factory.mktemp("seccomp") / "runtime-default.json")
    p = Pod(daemonset, image, config_maps, seccomp)
    try:
        p.wait_ready()
        yield p
    finally:
        p.remove()


# ---- the translation ----------------------------------------------------------------------


def test_every_field_of_the_pod_spec_is_translated(daemonset):
    node = podspec.Node(image="img", container_name="c", config_maps={"connwatch-config": Path("/etc")},
                        runtime_default_seccomp=Path("/p.json"), listen_address="127.0.0.1:1")
    opts = podspec.podman_run(daemonset, node).options
    for flag in ("--pid=host", "--network=host", "--user=0:0", "--cap-drop=ALL", "--read-only",
                 "--read-only-tmpfs=false", "--security-opt=no-new-privileges", "--security-opt=seccomp=/p.json"):
        assert flag in opts
    assert {o.removeprefix("--cap-add=") for o in opts if o.startswith("--cap-add=")} == \
        {c.removeprefix("CAP_") for c in manifest_capabilities(daemonset)}
    assert "--privileged" not in opts
    # a field the translation does not know fails it, wherever it is
    for where, key in [(("spec", "template", "spec"), "shareProcessNamespace"),
                       (("spec", "template", "spec", "securityContext"), "sysctls"),
                       (("spec", "template", "spec", "containers", 0, "securityContext"), "procMount"),
                       (("spec", "template", "spec", "containers", 0), "env")]:
        changed = copy.deepcopy(daemonset)
        target = changed
        for k in where:
            target = target[k]
        target[key] = "x"
        with pytest.raises(podspec.UnknownField, match=key):
            podspec.podman_run(changed, node)


# ---- the running container ------------------------------------------------------------------


def test_counts_a_host_servers_connections_exactly(pod, server):
    srv = server()
    port = srv.ports[0]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(7)]
    try:
        assert srv.command("accept 7") == "accepted 7"
        m = pod.wait_for_value("connwatch_connections", 7, pid=srv.pid, port=port)
        assert m.value("connwatch_connections", pid=srv.pid, port=port, kind="tcp") == 7
        assert srv.command("close 7") == "closed 7"
        clients = close_ends_the_server_closed(clients, 7)
        pod.wait_for_value("connwatch_connections", 0, pid=srv.pid, port=port)
    finally:
        for c in clients:
            c.close()


def proc_status(text: str) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def cap_set(mask: str) -> set[str]:
    bits = int(mask, 16)
    return {name for i, name in enumerate(caps.NAMES) if bits >> i & 1}


def test_capabilities_are_the_manifests(pod, daemonset):
    wanted = manifest_capabilities(daemonset)
    # any process the runtime starts in the container (podman exec gets the
    # container's process spec): exactly the list, no ambient set
    given = proc_status(pod.exec("cat", "/proc/self/status").stdout)
    for s in ("CapEff", "CapPrm", "CapBnd"):
        assert cap_set(given[s]) == wanted, s
    assert cap_set(given["CapAmb"]) == cap_set(given["CapInh"]) == set()
    # the agent itself: the same bounding set, and after attaching it keeps
    # only what it reads with (caps.AFTER_ATTACH)
    agent = proc_status(Path(f"/proc/{pod.pid}/status").read_text())
    assert cap_set(agent["CapBnd"]) == wanted
    assert cap_set(agent["CapEff"]) == cap_set(agent["CapPrm"]) == set(caps.AFTER_ATTACH)
    assert cap_set(agent["CapAmb"]) == set()
    assert agent["Uid"].split() == ["0"] * 4 and agent["Gid"].split() == ["0"] * 4  # runAsUser/Group 0
    assert agent["NoNewPrivs"] == "1"  # allowPrivilegeEscalation: false
    assert agent["Seccomp"] == "2"  # RuntimeDefault: a filter


def mountinfo(pid: int) -> dict[str, tuple[str, str, str]]:
    """mount point -> (mount options, fs type, super options), the last mount on each point."""
    mounts = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fields, (fstype, _source, super_opts) = left.split(), right.split(" ", 2)
        mounts[fields[4]] = (fields[5], fstype, super_opts)
    return mounts


def test_root_filesystem_is_read_only(pod):
    mounts = mountinfo(pod.pid)
    assert "ro" in mounts["/"][0].split(",")
    denied = pod.exec("touch", "/probe", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    # the manifest's emptyDir: a writable 16 MiB tmpfs on /tmp
    assert mounts["/tmp"][1] == "tmpfs" and "size=16384k" in mounts["/tmp"][2]
    assert "rw" in mounts["/tmp"][0].split(",")
    pod.exec("touch", "/tmp/probe")
    for path in ("/etc/connwatch", "/sys/kernel/btf"):  # the read-only volumes
        assert "ro" in mounts[path][0].split(","), path


def test_not_privileged(pod):
    assert pod.inspect("{{.HostConfig.Privileged}}") == "false"
    mounts = mountinfo(pod.pid)
    # what --privileged would change, seen in the container: /sys and
    # /proc/sys read-only, the runtime's masked paths covered, no host devices
    for path in ("/sys", "/proc/sys"):
        assert "ro" in mounts[path][0].split(","), path
    masked = [p for p in ("/proc/keys", "/proc/timer_list", "/proc/kcore", "/sys/firmware") if Path(p).exists()]
    assert masked and all(p in mounts for p in masked), masked
    host_disks = {p.name for p in Path("/sys/class/block").iterdir()}
    assert host_disks and not host_disks & set(pod.exec("ls", "/dev").stdout.split())


def test_identity_of_the_container_from_the_cgroup_podman_made(pod):
    assert identity(pod.pid) == Identity(container=pod.id)


# ---- the seccomp finding ------------------------------------------------------------------


def test_bookworms_podman_seccomp_profile_refuses_bpf_to_cap_bpf(daemonset, image, config_maps):
    """Debian 12's podman default profile allows bpf(2) only with
    CAP_SYS_ADMIN: the DaemonSet's container, otherwise unchanged, cannot load
    a single BPF program and says so (exit 2). That is why the pod above runs
    with the same profile plus containers/common's later CAP_BPF rule."""
    rules = cwimage.bpf_rules(json.loads(cwimage.BOOKWORM_SECCOMP.read_text()))
    assert [(r["action"], r["includes"], r["excludes"]) for r in rules] == [
        ("SCMP_ACT_ALLOW", {"caps": ["CAP_SYS_ADMIN"]}, {}),
        ("SCMP_ACT_ERRNO", {}, {"caps": ["CAP_SYS_ADMIN"]}),
    ]
    p = Pod(daemonset, image, config_maps, cwimage.BOOKWORM_SECCOMP)
    try:
        rc = int(cwimage.podman("wait", p.name, timeout=120).stdout.strip())
        out = p.logs()
        assert rc == 2, out
        assert "loading BPF programs was refused (EPERM)" in out, out
    finally:
        p.remove()
