"""The container image for tests/packaging/test_image.py: built with
packaging/container/build-image.sh (what `make image` runs, cached by the
hash of its inputs), the seccomp profile that stands for RuntimeDefault, and
the few podman options that come from this machine rather than from the
DaemonSet (podspec.py derives those).
"""

from __future__ import annotations

import json
import resource
import subprocess
import time
from pathlib import Path

import cwpkg
from cwpkg import ROOT, run

IMAGE = "localhost/connwatch:test"
BUILD_SCRIPT = ROOT / "packaging" / "container" / "build-image.sh"
# Debian 12's podman default profile (golang-github-containers-common 0.50.1)
BOOKWORM_SECCOMP = Path("/usr/share/containers/seccomp.json")


def build_image(deb: Path) -> str:
    """The image id of IMAGE, built from deb on the debootstrapped bookworm."""
    tarball = cwpkg.bookworm_tarball()
    t0 = time.monotonic()
    p = run([str(BUILD_SCRIPT), str(tarball), str(deb), IMAGE], timeout=1200)
    how = "reused (inputs unchanged)" if "inputs unchanged" in p.stderr else "built"
    cwpkg.log(f"image {IMAGE} {how} in {time.monotonic() - t0:.1f}s")
    return p.stdout.strip().splitlines()[-1]


def bpf_rules(profile: dict) -> list[dict]:
    return [r for r in profile["syscalls"] if "bpf" in r["names"]]


def runtime_default_seccomp(dest: Path) -> Path:
    """Debian 12's podman default profile with the one change containers/common
    made in v0.60.0 (commit 6dd328a2, "seccomp: allow bpf() if CAP_BPF"):
    bpf(2) is allowed to CAP_BPF as well as to CAP_SYS_ADMIN, as the
    RuntimeDefault of containerd (>= 1.6.9, 1.7) and Docker (>= 23) has it.
    Nothing else differs (docs/kubernetes.md, "seccompProfile")."""
    profile = json.loads(BOOKWORM_SECCOMP.read_text())
    errno_without_sys_admin = [r for r in bpf_rules(profile) if r["action"] == "SCMP_ACT_ERRNO"]
    assert len(errno_without_sys_admin) == 1 and errno_without_sys_admin[0]["excludes"] == {"caps": ["CAP_SYS_ADMIN"]}, \
        "Debian's podman seccomp profile changed: re-check the finding in docs/kubernetes.md"
    errno_without_sys_admin[0]["names"].remove("bpf")
    profile["syscalls"] += [
        {"names": ["bpf"], "action": "SCMP_ACT_ERRNO", "args": [], "comment": "", "includes": {},
         "excludes": {"caps": ["CAP_SYS_ADMIN", "CAP_BPF"]}, "errnoRet": 1, "errno": "EPERM"},
        {"names": ["bpf"], "action": "SCMP_ACT_ALLOW", "args": [], "comment": "",
         "includes": {"caps": ["CAP_BPF"]}, "excludes": {}},
    ]
    dest.write_text(json.dumps(profile, indent=1))
    return dest


# podman 4.3 lowers its own RLIMIT_NPROC to this before it starts conmon
# (seen with strace); the container cannot get more
PODMAN_NPROC = 32768


def podman_global_options() -> list[str]:
    # cgroupfs: this machine has no systemd as init; said explicitly because
    # the cleanup below expects cgroupfs paths
    return ["--cgroup-manager=cgroupfs", "--events-backend=file"]


def engine_options(cgroup_parent: str) -> list[str]:
    """`podman run` options that come from this machine, not from the manifest."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)
    return [
        # bookworm's crun 1.8 refuses hosts with cgroup v1 and v2 both mounted
        # (hybrid, like this one); runc is also containerd's default runtime
        "--runtime=runc",
        # podman 4.3 asks the runtime for RLIMIT_NOFILE and RLIMIT_NPROC of
        # 1048576, above the hard limits of a root without CAP_SYS_RESOURCE
        # (this machine; podman >= 5 clamps them). Kubernetes sets no rlimit
        # at all: the container keeps the runtime's, as here.
        f"--ulimit=nofile={nofile[0]}:{nofile[1]}",
        f"--ulimit=nproc={min(nproc[0], PODMAN_NPROC)}:{min(nproc[1], PODMAN_NPROC)}",
        # a parent cgroup of its own (the kubelet's would be the pod's), so that
        # cleanup can remove it with podman's conmon cgroup in it
        f"--cgroup-parent=/{cgroup_parent}",
    ]


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return run(["podman", *podman_global_options(), *args], timeout=timeout, check=check)


def cgroup_hierarchies() -> list[Path]:
    """Mount points of every cgroup v1 hierarchy and the v2 one."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        if right.split()[0] in ("cgroup", "cgroup2"):
            found.append(Path(left.split()[4]))
    return found


def remove_cgroup_trees(name: str) -> list[Path]:
    """rmdir <hierarchy>/<name> and everything below it in every hierarchy,
    deepest first; the cgroups still there afterwards (not empty)."""
    left = []
    for h in cgroup_hierarchies():
        top = h / name
        if not top.is_dir():
            continue
        for d in sorted([p for p in top.rglob("*") if p.is_dir()] + [top], key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()
            except OSError:
                left.append(d)
    return left
