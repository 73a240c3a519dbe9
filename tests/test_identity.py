"""Container and pod identity from cgroup paths (agent/connwatch/identity.py).

The table below holds cgroup paths as runtimes really write them, copied
from the sources named beside each row. Every row is decoded twice: as a
string, and on the real kernel — the test creates that very cgroup tree
(cgroup v2) below a throwaway parent, moves a real `sleep` into the leaf and
reads back /proc/<pid>/cgroup through identity(). The v1 fallback is proven
the same way in a real v1 hierarchy where the host has one. Nothing about
the kernel is faked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import wait_for
from connwatch import procinfo
from connwatch.identity import HOST, Identity, from_cgroup_path, from_proc_cgroup, identity

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Shape:
    what: str
    path: str  # as the 0:: line of /proc/<pid>/cgroup shows it
    expected: Identity

    def __str__(self) -> str:
        return self.what


def pod(uid: str, container: str = "") -> Identity:
    return Identity(container=container, pod_uid=uid)


def ctr(container: str) -> Identity:
    return Identity(container=container)


SHAPES = [
    # -- Kubernetes, systemd cgroup driver (the kubelet writes the pod UID with "_" for "-")
    # netdata/netdata#4868 (systemd-cgls of a containerd node)
    Shape("containerd, systemd driver, burstable",
          "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice/"
          "cri-containerd-2032491dcae31e6746f47daa0ac74564f2843a1bd847c5e6c4eb501ca132ac36.scope",
          pod("55c6c714-b240-4dec-9a45-57b61696ab6e",
              "2032491dcae31e6746f47daa0ac74564f2843a1bd847c5e6c4eb501ca132ac36")),
    # netdata/netdata#4868: a static pod runs under the kubelet's 32-hex manifest hash
    Shape("containerd, systemd driver, static pod",
          "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8daa50c3a64c9ff60bb9eab7b44b56fd.slice/"
          "cri-containerd-2884d57c0e100d7a9a2f9487ce0bc2986bca3430e988af7a4865aff061f51ac5.scope",
          pod("8daa50c3a64c9ff60bb9eab7b44b56fd",
              "2884d57c0e100d7a9a2f9487ce0bc2986bca3430e988af7a4865aff061f51ac5")),
    # kubelet pkg/kubelet/cm: guaranteed pods sit directly under kubepods.slice;
    # the pod UID from a kubectl session in the wild, the id from the row above
    Shape("containerd, systemd driver, guaranteed",
          "/kubepods.slice/kubepods-pod16e6a747_9d40_4120_bbac_ca7cd274fdd9.slice/"
          "cri-containerd-2032491dcae31e6746f47daa0ac74564f2843a1bd847c5e6c4eb501ca132ac36.scope",
          pod("16e6a747-9d40-4120-bbac-ca7cd274fdd9",
              "2032491dcae31e6746f47daa0ac74564f2843a1bd847c5e6c4eb501ca132ac36")),
    # opencontainers/runc#4620 (a calico-node container under CRI-O)
    Shape("CRI-O, systemd driver",
          "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-poda5c1f8d5_1919_434d_add7_4afaafdaef89.slice/"
          "crio-5eed917563583925ffdbd40a64efb2aaffe58638e57add8becaf460fe74f5b1c.scope",
          pod("a5c1f8d5-1919-434d-add7-4afaafdaef89",
              "5eed917563583925ffdbd40a64efb2aaffe58638e57add8becaf460fe74f5b1c")),
    # cri-o internal/config/cgmgr/systemd_linux.go: conmon gets crio-conmon-<id>.scope
    # in the pod's slice; it is charged to the pod but is not the container
    Shape("CRI-O, systemd driver, conmon",
          "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-poda5c1f8d5_1919_434d_add7_4afaafdaef89.slice/"
          "crio-conmon-5eed917563583925ffdbd40a64efb2aaffe58638e57add8becaf460fe74f5b1c.scope",
          pod("a5c1f8d5-1919-434d-add7-4afaafdaef89")),
    # kubernetes/minikube#11280: CRI-O, besteffort, in a minikube node that is a Docker container
    Shape("CRI-O in a Docker container (minikube node)",
          "/docker/d6701ec289c56e4391acb11d07474b3139466857a305490575508a8b7a9fcf22/kubepods.slice/"
          "kubepods-besteffort.slice/kubepods-besteffort-pod2ca4a155_3599_498d_bb9d_4446693fa3ea.slice/"
          "crio-358607a37e7ada357032e7f5729c9ae6a3efdb7962acbcbe47ff6a3c5506cb1c.scope",
          pod("2ca4a155-3599-498d-bb9d-4446693fa3ea",
              "358607a37e7ada357032e7f5729c9ae6a3efdb7962acbcbe47ff6a3c5506cb1c")),
    # kontena/pharos-cluster#440: dockershim, besteffort
    Shape("Docker under the kubelet, systemd driver",
          "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod9692aa0e_748e_11e8_8dfa_76d458035df6.slice/"
          "docker-abddff03dfd7710c79a750ce3e730365cbb2c8247a974170c1062683bc3e9152.scope",
          pod("9692aa0e-748e-11e8-8dfa-76d458035df6",
              "abddff03dfd7710c79a750ce3e730365cbb2c8247a974170c1062683bc3e9152")),
    # kind in a Prow pod, from a kubernetes CI script: the kubelet's
    # --cgroup-root=/kubelet prefixes every slice; the innermost pod wins
    Shape("containerd in kind in a pod (--cgroup-root, nested)",
          "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod79251c5f_6128_4462_920c_7f59851b1ef0.slice/"
          "prowparent.slice/8649fc57370b7efca6895b1436f35fba427134114b9f97bbcc61ef49f76a0034/kubelet.slice/"
          "kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
          "kubelet-kubepods-besteffort-pod0a111b9c_2cca_4ea5_a1e8_b6f9abd91662.slice/"
          "cri-containerd-5bceb708305ca363d62bf870877cee45bef716e04d9cbdf0cacdea2fd166adcf.scope/system.slice/kubelet.service",
          pod("0a111b9c-2cca-4ea5-a1e8-b6f9abd91662",
              "5bceb708305ca363d62bf870877cee45bef716e04d9cbdf0cacdea2fd166adcf")),
    # open-telemetry/opentelemetry-java#4507: cgroup v1 controllers showing the
    # systemd driver's unexpanded "<slice>:<prefix>:<id>"
    Shape("containerd, cgroup v1, unexpanded slice:prefix:id",
          "/system.slice/containerd.service/kubepods-besteffort-pod0125ec2f_b64a_4868_8f5b_94b56cbab864.slice:"
          "cri-containerd:ee4b20e90ac7f42a10bd004d05646b13d8ab5e2c5e7cbc01abf8006bac016459",
          pod("0125ec2f-b64a-4868-8f5b-94b56cbab864",
              "ee4b20e90ac7f42a10bd004d05646b13d8ab5e2c5e7cbc01abf8006bac016459")),
    # -- Kubernetes, cgroupfs driver
    # containers/crun#729 (mountinfo of a container: its cgroup root)
    Shape("cgroupfs driver, besteffort",
          "/kubepods/besteffort/pod85401dd3-38cd-47b6-a90a-e16c0e1c06e6/"
          "dbc9f149296cec5d12b78385eb5b2c0cfe20b476f117c15c76d981cff44053c1",
          pod("85401dd3-38cd-47b6-a90a-e16c0e1c06e6",
              "dbc9f149296cec5d12b78385eb5b2c0cfe20b476f117c15c76d981cff44053c1")),
    # google/cadvisor#2540 (pod), netdata/netdata#3369 (static pod hash and container)
    Shape("cgroupfs driver, burstable",
          "/kubepods/burstable/pod1ff47ee6-9685-4726-ac6f-0ff070c452d6/"
          "902093a5baef883ae52ad163ff157a2bc5d579d446d044735aa6c6a7de274a7e",
          pod("1ff47ee6-9685-4726-ac6f-0ff070c452d6",
              "902093a5baef883ae52ad163ff157a2bc5d579d446d044735aa6c6a7de274a7e")),
    Shape("cgroupfs driver, static pod",
          "/kubepods/burstable/pod16a4a44fea21553f3c41d03e478379f0/"
          "902093a5baef883ae52ad163ff157a2bc5d579d446d044735aa6c6a7de274a7e",
          pod("16a4a44fea21553f3c41d03e478379f0",
              "902093a5baef883ae52ad163ff157a2bc5d579d446d044735aa6c6a7de274a7e")),
    # kubelet pkg/kubelet/cm: guaranteed pods directly under kubepods
    Shape("cgroupfs driver, guaranteed",
          "/kubepods/pod85401dd3-38cd-47b6-a90a-e16c0e1c06e6/"
          "dbc9f149296cec5d12b78385eb5b2c0cfe20b476f117c15c76d981cff44053c1",
          pod("85401dd3-38cd-47b6-a90a-e16c0e1c06e6",
              "dbc9f149296cec5d12b78385eb5b2c0cfe20b476f117c15c76d981cff44053c1")),
    # cri-o internal/config/cgmgr/cgroupfs_linux.go: crio-<id> and crio-conmon-<id>
    Shape("CRI-O, cgroupfs driver",
          "/kubepods/burstable/pod1ff47ee6-9685-4726-ac6f-0ff070c452d6/"
          "crio-5eed917563583925ffdbd40a64efb2aaffe58638e57add8becaf460fe74f5b1c",
          pod("1ff47ee6-9685-4726-ac6f-0ff070c452d6",
              "5eed917563583925ffdbd40a64efb2aaffe58638e57add8becaf460fe74f5b1c")),
    Shape("CRI-O, cgroupfs driver, conmon",
          "/kubepods/burstable/pod1ff47ee6-9685-4726-ac6f-0ff070c452d6/"
          "crio-conmon-5eed917563583925ffdbd40a64efb2aaffe58638e57add8becaf460fe74f5b1c",
          pod("1ff47ee6-9685-4726-ac6f-0ff070c452d6")),
    # a 32-hex name outside kubepods is no pod (this machine's own memory cgroup)
    Shape("32 hex outside kubepods", "/process_api/c5fdb1528152c1db1267e0ed2641b6ec", HOST),
    # kubelet on cgroup v2: every container (the DaemonSet's too) has a cgroup
    # namespace of its own, so other pods' paths climb out of it with ".." and
    # the cgroupfs driver's "kubepods" is out of sight (cgroup_namespaces(7);
    # produced for real by test_identity_read_from_another_pods_cgroup_namespace)
    Shape("cgroupfs driver, read from another pod's cgroup namespace",
          "/../../../burstable/pod1ff47ee6-9685-4726-ac6f-0ff070c452d6/"
          "902093a5baef883ae52ad163ff157a2bc5d579d446d044735aa6c6a7de274a7e",
          pod("1ff47ee6-9685-4726-ac6f-0ff070c452d6",
              "902093a5baef883ae52ad163ff157a2bc5d579d446d044735aa6c6a7de274a7e")),
    Shape("systemd driver, read from another pod's cgroup namespace",
          "/../../../kubepods-burstable.slice/kubepods-burstable-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice/"
          "cri-containerd-2032491dcae31e6746f47daa0ac74564f2843a1bd847c5e6c4eb501ca132ac36.scope",
          pod("55c6c714-b240-4dec-9a45-57b61696ab6e",
              "2032491dcae31e6746f47daa0ac74564f2843a1bd847c5e6c4eb501ca132ac36")),
    Shape("host service read from a pod's cgroup namespace", "/../../../../system.slice/ssh.service", HOST),
    # -- Docker
    # moby/moby#33352 and ctrsploit/ctrsploit#280 (cgroupfs driver)
    Shape("Docker, cgroupfs driver",
          "/docker/2403ccfe427f1dc7b6120dccb9ac58c2f8456950380d587a9f33ea7f00dd303d",
          ctr("2403ccfe427f1dc7b6120dccb9ac58c2f8456950380d587a9f33ea7f00dd303d")),
    # lxc/lxc#3890 (the id), Docker's systemd driver names the scope docker-<id>.scope
    Shape("Docker, systemd driver",
          "/system.slice/docker-d0b3604b67ac7930dd34ba3a796627e3e4717d12309e90a4afe3f38b6816ac98.scope",
          ctr("d0b3604b67ac7930dd34ba3a796627e3e4717d12309e90a4afe3f38b6816ac98")),
    Shape("dockerd itself", "/system.slice/docker.service", HOST),
    # -- podman
    # `podman inspect` CgroupPath of a rootful container (systemd manager)
    Shape("podman, systemd manager",
          "/machine.slice/libpod-55ea3863351726184e26ca7418f577d04c96dac0009e1f088f6c0c7a1dc2ed7c.scope",
          ctr("55ea3863351726184e26ca7418f577d04c96dac0009e1f088f6c0c7a1dc2ed7c")),
    # containers/podman#8290: crun's run.oci.systemd.subgroup puts the payload in .../container
    Shape("podman, crun subgroup",
          "/machine.slice/libpod-55ea3863351726184e26ca7418f577d04c96dac0009e1f088f6c0c7a1dc2ed7c.scope/container",
          ctr("55ea3863351726184e26ca7418f577d04c96dac0009e1f088f6c0c7a1dc2ed7c")),
    Shape("podman, conmon",
          "/machine.slice/libpod-conmon-55ea3863351726184e26ca7418f577d04c96dac0009e1f088f6c0c7a1dc2ed7c.scope",
          HOST),
    # `podman pod inspect` CgroupPath and InfraContainerID: a podman pod's slice
    # is named machine-…, but it is a .slice and no machine scope
    Shape("podman pod, systemd manager",
          "/machine.slice/machine-libpod_pod_0a7c8532b5e0fb5064b894cc1381a62b53253dd450ad088ef0822ce37efceb04.slice/"
          "libpod-c8eb89e97020858cda3a86bce68dc2a2e33f4aca26f6bac88d0feaa4b4a50f04.scope",
          ctr("c8eb89e97020858cda3a86bce68dc2a2e33f4aca26f6bac88d0feaa4b4a50f04")),
    # rootless, systemd manager (user@.service delegates the user's tree)
    Shape("podman rootless",
          "/user.slice/user-1000.slice/user@1000.service/user.slice/"
          "libpod-55ea3863351726184e26ca7418f577d04c96dac0009e1f088f6c0c7a1dc2ed7c.scope",
          ctr("55ea3863351726184e26ca7418f577d04c96dac0009e1f088f6c0c7a1dc2ed7c")),
    # containers/podman#826: cgroupfs manager (also what this machine's podman uses)
    Shape("podman, cgroupfs manager",
          "/libpod_parent/libpod-55ea3863351726184e26ca7418f577d04c96dac0009e1f088f6c0c7a1dc2ed7c",
          ctr("55ea3863351726184e26ca7418f577d04c96dac0009e1f088f6c0c7a1dc2ed7c")),
    # quadlet / --cgroups=split: `systemctl status` of podman services in the wild
    Shape("podman --cgroups=split (quadlet)",
          "/system.slice/nginx.service/libpod-payload-9687bac58d5c4d1606aa46af33d1a21c1d1652e0ac9fb3fc0fc86e3495f42869",
          ctr("9687bac58d5c4d1606aa46af33d1a21c1d1652e0ac9fb3fc0fc86e3495f42869")),
    Shape("podman --cgroups=split, rootless",
          "/user.slice/user-1000.slice/user@1000.service/app.slice/redis.service/"
          "libpod-payload-e8c29da1a2f6c4bb032304f7dfbc5a767e026092c4a2fcbc830e58565f972f54",
          ctr("e8c29da1a2f6c4bb032304f7dfbc5a767e026092c4a2fcbc830e58565f972f54")),
    Shape("podman --cgroups=split, conmon", "/system.slice/nginx.service/runtime", HOST),
    # -- systemd-nspawn and other machined machines
    # systemd-nspawn(1): a registered container runs in machine-<name>.scope; the
    # name is unit-escaped (systemd-escape): "debian-12" -> debian\x2d12
    Shape("systemd-nspawn, scope",
          r"/machine.slice/machine-debian\x2d12.scope/system.slice/systemd-journald.service",
          ctr("debian-12")),
    # systemd-nspawn@.service (machinectl start): payload/ is the container,
    # supervisor/ is nspawn (systemd's own tests; `systemctl status` of a jammy machine)
    Shape("systemd-nspawn@.service, payload",
          "/machine.slice/systemd-nspawn@jammy.service/payload/init.scope",
          ctr("jammy")),
    Shape("systemd-nspawn@.service, supervisor",
          "/machine.slice/systemd-nspawn@jammy.service/supervisor",
          HOST),
    # a libvirt guest's QEMU is a machined machine too (a /proc/<pid>/cgroup in the wild)
    Shape("libvirt guest (machined)",
          r"/machine.slice/machine-qemu\x2d6\x2dvm1.scope/libvirt/emulator",
          ctr("qemu-6-vm1")),
    # -- LXC
    # liske/needrestart#215: LXC >= 4.0 flattens to lxc.payload.<name>
    Shape("LXC >= 4.0", "/lxc.payload.container1/system.slice/cron.service", ctr("container1")),
    Shape("LXC >= 4.0, monitor", "/lxc.monitor.container1", HOST),
    # htop-dev/htop#217: LXC 3.1-3.2, and the monitor
    Shape("LXC 3.1-3.2", "/lxc.payload/example/init.scope", ctr("example")),
    Shape("LXC 3.1-3.2, monitor", "/lxc.monitor/example", HOST),
    # puppetlabs/libwhereami#10: LXC < 3.1
    Shape("LXC < 3.1", "/lxc/example/init.scope", ctr("example")),
    # -- the host
    Shape("host service", "/system.slice/ssh.service", HOST),
    Shape("user session", "/user.slice/user-1000.slice/session-3.scope", HOST),
    Shape("root", "/", HOST),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_decoder(shape: Shape):
    assert from_cgroup_path(shape.path) == shape.expected
    assert from_proc_cgroup(f"0::{shape.path}\n") == shape.expected


# /proc/<pid>/cgroup of cgroup v1 and hybrid hosts, whole
V1_FILES = [
    # ctrsploit/ctrsploit#280: hybrid host, Docker with the cgroupfs driver:
    # the v2 line names containerd's service, the container is in the v1 lines
    ("hybrid, Docker cgroupfs", """\
12:net_cls,net_prio:/docker/2403ccfe427f1dc7b6120dccb9ac58c2f8456950380d587a9f33ea7f00dd303d
11:freezer:/docker/2403ccfe427f1dc7b6120dccb9ac58c2f8456950380d587a9f33ea7f00dd303d
10:rdma:/
9:blkio:/docker/2403ccfe427f1dc7b6120dccb9ac58c2f8456950380d587a9f33ea7f00dd303d
8:memory:/docker/2403ccfe427f1dc7b6120dccb9ac58c2f8456950380d587a9f33ea7f00dd303d
1:name=systemd:/docker/2403ccfe427f1dc7b6120dccb9ac58c2f8456950380d587a9f33ea7f00dd303d
0::/system.slice/containerd.service
""", ctr("2403ccfe427f1dc7b6120dccb9ac58c2f8456950380d587a9f33ea7f00dd303d")),
    # moby/moby#33352: v1 only; name=systemd says "/" but the controllers know
    ("v1, Docker cgroupfs", """\
13:pids:/
10:perf_event:/docker/5dace3de0735f73d2b5048f12d41a71741a02e49668de921fdae62f7e65dc498
8:freezer:/docker/5dace3de0735f73d2b5048f12d41a71741a02e49668de921fdae62f7e65dc498
1:name=systemd:/
""", ctr("5dace3de0735f73d2b5048f12d41a71741a02e49668de921fdae62f7e65dc498")),
    # opencontainers/runc#4620: v1, CRI-O with the systemd driver
    ("v1, CRI-O systemd", """\
13:freezer:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-poda5c1f8d5_1919_434d_add7_4afaafdaef89.slice/crio-5eed917563583925ffdbd40a64efb2aaffe58638e57add8becaf460fe74f5b1c.scope
11:files:/
""", pod("a5c1f8d5-1919-434d-add7-4afaafdaef89", "5eed917563583925ffdbd40a64efb2aaffe58638e57add8becaf460fe74f5b1c")),
    # htop-dev/htop#217: LXC, every hierarchy agreeing
    ("hybrid, LXC", """\
11:cpuset:/lxc.payload/example
2:memory:/lxc.payload/example/init.scope
1:name=systemd:/lxc.payload/example/init.scope
0::/lxc.payload/example/init.scope
""", ctr("example")),
    # this machine's own processes: hybrid, a memory cgroup of the VM's init
    ("hybrid, host", """\
9:name=systemd:/
4:memory:/process_api/c5fdb1528152c1db1267e0ed2641b6ec
0::/
""", HOST),
]


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in V1_FILES], ids=[n for n, _, _ in V1_FILES])
def test_decoder_proc_cgroup_files(text: str, expected: Identity):
    assert from_proc_cgroup(text) == expected


def test_docs_table_matches_the_decoder():
    """docs/kubernetes.md lists every recognised shape with an example path and
    the labels it gives: each example decodes to exactly what the row says."""
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    section = doc.split("## Container and pod identity", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| [^|]+ \| `([^`]+)` \| `([^`]*)` \| `([^`]*)` \|$", section, re.M)
    assert len(rows) >= 15, "the shapes table of docs/kubernetes.md was not found"
    for path, container, pod_uid in rows:
        assert from_cgroup_path(path) == Identity(container, pod_uid), path


# ---- on the real kernel ----------------------------------------------------------------


def mounts(fstype: str) -> list[tuple[Path, str]]:
    """(mount point, super options) of every mount of fstype, from /proc/self/mountinfo."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fs, _source, options = right.split(" ", 2)
        if fs == fstype:
            found.append((Path(left.split()[4]), options))
    return found


def cgroup2_root() -> Path:
    found = mounts("cgroup2")
    if not found:
        pytest.skip("no cgroup v2 hierarchy mounted")
    return found[0][0]


class CgroupSandbox:
    """Cgroups created below a throwaway parent <hierarchy>/cwtest-identity-…,
    with real processes moved into them. close() kills the processes and
    removes every cgroup it created, deepest first."""

    def __init__(self, hierarchy: Path):
        self.hierarchy = hierarchy
        self.top = hierarchy / f"cwtest-identity-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._dirs: set[Path] = set()
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> CgroupSandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def mkdir(self, path: str) -> Path:
        leaf = self.top.joinpath(*[p for p in path.split("/") if p])
        assert leaf == self.top or self.top in leaf.parents, path
        for d in [*reversed(leaf.parents), leaf]:
            if d == self.top or self.top in d.parents:
                if not d.is_dir():
                    d.mkdir()
                    self._dirs.add(d)
        return leaf

    def proc_path(self, path: str) -> str:
        """path as /proc/<pid>/cgroup shows it to a reader at the hierarchy's root."""
        return "/" + str(self.mkdir(path).relative_to(self.hierarchy))

    def spawn(self, argv: list[str], path: str, **kw) -> subprocess.Popen:
        """argv started in the cgroup path (it moves itself there before exec)."""
        leaf = self.mkdir(path)
        p = subprocess.Popen(["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(leaf), *argv], **kw)
        self._procs.append(p)
        return p

    def sleeper(self, path: str) -> int:
        p = self.spawn(["sleep", "300"], path)
        leaf = self.mkdir(path)
        wait_for(lambda: str(p.pid) in (leaf / "cgroup.procs").read_text().split(), what=f"{p.pid} in {path}")
        return p.pid

    def close(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for d in sorted(self._dirs, key=lambda d: len(d.parts), reverse=True):
            d.rmdir()  # empty now: an empty cgroup is removed with rmdir


@pytest.mark.parametrize("shape", [s for s in SHAPES if "/../" not in s.path], ids=str)
def test_identity_of_a_process_in_a_real_cgroup(shape: Shape):
    with CgroupSandbox(cgroup2_root()) as cg:
        pid = cg.sleeper(shape.path)
        # the kernel reports the path with the test's parent in front of it
        assert f"0::{cg.proc_path(shape.path)}\n" in Path(f"/proc/{pid}/cgroup").read_text()
        assert identity(pid) == shape.expected
        assert procinfo.container_id(pid) == shape.expected.container


READER = """
import dataclasses, json, sys
from connwatch.identity import identity
pid = int(sys.argv[1])
print(json.dumps({"cgroup": open(f"/proc/{pid}/cgroup").read(),
                  "identity": dataclasses.asdict(identity(pid))}))
"""


@pytest.mark.parametrize("agent_path,shape", [
    ("/kubepods/besteffort/pod2ca4a155-3599-498d-bb9d-4446693fa3ea/"
     "358607a37e7ada357032e7f5729c9ae6a3efdb7962acbcbe47ff6a3c5506cb1c",
     next(s for s in SHAPES if s.what == "cgroupfs driver, burstable")),
    ("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod2ca4a155_3599_498d_bb9d_4446693fa3ea.slice/"
     "cri-containerd-358607a37e7ada357032e7f5729c9ae6a3efdb7962acbcbe47ff6a3c5506cb1c.scope",
     next(s for s in SHAPES if s.what == "containerd, systemd driver, burstable")),
], ids=["cgroupfs", "systemd"])
def test_identity_read_from_another_pods_cgroup_namespace(agent_path: str, shape: Shape):
    """The DaemonSet on cgroup v2: the agent reads /proc/<pid>/cgroup from a
    cgroup namespace rooted at its own container's cgroup, so another pod's
    path starts with ".." (and, with the cgroupfs driver, hides "kubepods")."""
    with CgroupSandbox(cgroup2_root()) as cg:
        pid = cg.sleeper(shape.path)
        reader = cg.spawn(["unshare", "--cgroup", sys.executable, "-c", READER, str(pid)], agent_path,
                          stdout=subprocess.PIPE, text=True)
        seen = json.loads(reader.communicate(timeout=30)[0])
        assert reader.returncode == 0
        v2 = next(ln for ln in seen["cgroup"].splitlines() if ln.startswith("0::"))
        assert v2.startswith("0::/../../"), v2
        if "kubepods/" in agent_path:
            assert "kubepods" not in v2, v2
        assert Identity(**seen["identity"]) == shape.expected


@pytest.mark.parametrize("shape", [s for s in SHAPES if s.what in {
    "Docker, cgroupfs driver", "cgroupfs driver, burstable", "CRI-O, systemd driver", "LXC 3.1-3.2"}], ids=str)
def test_identity_from_a_real_cgroup_v1_hierarchy(shape: Shape):
    """Where containers are only in the v1 hierarchies (cgroupfs drivers on
    hybrid hosts) the v2 line names nothing and a v1 line decides."""
    v1 = [mnt for mnt, opts in mounts("cgroup") if "pids" in opts.split(",")]
    if not v1:
        pytest.skip("no cgroup v1 pids hierarchy on this host (pure cgroup v2)")
    if from_proc_cgroup(Path("/proc/self/cgroup").read_text()) != HOST:
        pytest.skip("the test itself runs in a container: its v2 line would decide")
    with CgroupSandbox(v1[0]) as cg:
        pid = cg.sleeper(shape.path)
        text = Path(f"/proc/{pid}/cgroup").read_text()
        assert re.search(rf"^\d+:pids:{re.escape(cg.proc_path(shape.path))}$", text, re.M), text
        assert identity(pid) == shape.expected


def test_identity_of_a_process_that_is_gone():
    p = subprocess.Popen(["true"])
    p.wait()
    assert identity(p.pid) is None
    assert procinfo.container_id(p.pid) is None


def test_no_test_cgroup_is_left_behind():
    leftovers = [p for root in [m for m, _ in mounts("cgroup2") + mounts("cgroup")]
                 for p in root.glob(f"cwtest-identity-{os.getpid()}-*")]
    assert leftovers == []


def test_pod_uid_and_container_label_every_per_process_series(agent):
    """A server in a pod's container cgroup: its connections, peers, listener
    and fd headroom series all carry the pod UID and container id, so two
    pods serving on one port never share a series."""
    import socket

    shape = next(s for s in SHAPES if s.what == "containerd, systemd driver, burstable")
    with CgroupSandbox(cgroup2_root()) as cg:
        server = cg.spawn([sys.executable, str(ROOT / "tests" / "servers" / "hold_server.py")], shape.path,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        port = int(server.stdout.readline().split()[1])
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            server.stdin.write("accept 3\n")
            server.stdin.flush()
            assert server.stdout.readline().strip() == "accepted 3"
            m = agent.wait_for_value("connwatch_connections", 3, pid=server.pid, port=port)
            want = {"container": shape.expected.container, "pod_uid": shape.expected.pod_uid}
            for name in ("connwatch_connections", "connwatch_peer_connections", "connwatch_peers",
                         "connwatch_listen_backlog", "connwatch_connections_accepted_total",
                         "connwatch_process_open_fds", "connwatch_process_max_fds"):
                found = m.select(name, pid=server.pid)
                assert found, name
                assert all({k: s.labels[k] for k in want} == want for s in found), (name, found)
        finally:
            for c in clients:
                c.close()
