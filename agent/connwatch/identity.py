"""Which container, and which Kubernetes pod, a process runs in: read from
the name of its cgroup.

Container runtimes and the kubelet name the cgroups they create after the
container and the pod, so /proc/<pid>/cgroup tells both without asking any
runtime's API (the agent talks to none). docs/kubernetes.md ("Container and
pod identity") lists every recognised shape with an example path; the
decoder is pure and tests/test_identity.py runs it over that table, on
strings and on real cgroups.

A cgroup path is read relative to the reader's cgroup namespace: it may sit
below anything (a nested runtime, a kind node's container, a test's parent
cgroup), and for a process outside the reader's namespace it climbs out with
".." (a DaemonSet pod on cgroup v2 has a namespace of its own, so every other
pod looks like /../../../burstable/pod<uid>/<id> to it). So the shapes are
looked for in every component and the innermost wins: a pod component starts
a new identity (the pod, no container yet), a container component below it
names the container. Helpers that share a pod's cgroup but are not the
container (CRI-O's and podman's conmon, nspawn's supervisor, LXC's monitor)
match nothing and leave the identity as it was.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """The `container` and `pod_uid` labels of a process; "" where not applicable.

    container: the runtime's 64-hex container id (containerd, CRI-O, Docker,
        podman), or the machine name (systemd-nspawn) or container name (LXC).
    pod_uid: the Kubernetes pod's UID as the API shows it (`metadata.uid`,
        dashed), or a static pod's 32-hex config hash (see docs/kubernetes.md).
    """

    container: str = ""
    pod_uid: str = ""


HOST = Identity()

_HEX64 = "[0-9a-f]{64}"
_UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# the kubelet's systemd driver writes "_" for "-": a dash separates slice levels
_UUID_SYSTEMD = "[0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12}"
# static pods (manifests in the kubelet's staticPodPath) run under the
# kubelet's hash of the manifest instead of an API-server UID
_STATIC_POD_HASH = "[0-9a-f]{32}"

# kubepods[-<qos>]-pod<uid>.slice, also below a --cgroup-root slice
# (kubelet-kubepods-burstable-pod<uid>.slice)
_POD_SLICE = re.compile(rf"(?:.+-)?kubepods(?:-burstable|-besteffort)?-pod({_UUID_SYSTEMD}|{_STATIC_POD_HASH})\.slice")
# cgroupfs driver: /kubepods[/<qos>]/pod<uid>, recognised only below "kubepods"
# or below a ".." that hides it
_POD_DIR = re.compile(rf"pod({_UUID}|{_STATIC_POD_HASH})")
# <runtime>-<id>.scope is the systemd driver's scope per container; CRI-O's
# and podman's cgroupfs layouts use the same name without ".scope". The
# conmon scopes (crio-conmon-<id>, libpod-conmon-<id>) do not match.
_RUNTIME_SCOPE = re.compile(rf"(?:cri-containerd|crio|docker|libpod)-({_HEX64})(?:\.scope)?")
# podman --cgroups=split (quadlet units): the unit's cgroup holds runtime/
# (conmon) and libpod-payload-<id> (the container)
_PODMAN_PAYLOAD = re.compile(rf"libpod-payload-({_HEX64})")
# cgroupfs drivers name a container's cgroup by its bare id: /docker/<id>,
# /kubepods/burstable/pod<uid>/<id>, containerd's /<namespace>/<id>
_BARE_ID = re.compile(f"({_HEX64})")
# machined's scope for a registered machine: systemd-nspawn, also libvirt's guests
_MACHINE_SCOPE = re.compile(r"machine-(.+)\.scope")
# systemd-nspawn@<name>.service (machinectl start): nspawn --keep-unit splits
# the unit's cgroup into supervisor/ (nspawn) and payload/ (the container)
_NSPAWN_SERVICE = re.compile(r"systemd-nspawn@(.+)\.service")
# LXC >= 4.0: /lxc.payload.<name> (and /lxc.monitor.<name> for the monitor)
_LXC_PAYLOAD = re.compile(r"lxc\.payload\.(.+)")
# LXC 3.1-3.2: /lxc.payload/<name>; LXC < 3.1 (and old LXD): /lxc/<name>
_LXC_PARENTS = frozenset({"lxc.payload", "lxc"})


def _systemd_unescape(name: str) -> str:
    r"""A unit-name component as the user wrote it: systemd escapes "-" and
    bytes outside [A-Za-z0-9:_.] as \xNN (`systemd-escape`). A literal "-"
    is left alone: systemd would mean "/", which no machine name contains,
    and scopes not made by machined use it as a plain dash."""
    raw = re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]), name.encode())
    return raw.decode("utf-8", errors="replace")


def from_cgroup_path(path: str) -> Identity:
    """The identity a cgroup path names (HOST if it names none)."""
    # ":" splits too: on some cgroup v1 nodes the systemd driver's
    # unexpanded form "<pod slice>:cri-containerd:<id>" is the path itself
    parts = [p for p in re.split(r"[/:]", path) if p]
    ident = HOST
    below_kubepods = False
    for i, part in enumerate(parts):
        after = parts[i + 1] if i + 1 < len(parts) else None
        if part in ("kubepods", ".."):  # ".." hides the ancestors, kubepods among them
            below_kubepods = True
        if m := _POD_SLICE.fullmatch(part):
            ident = Identity(pod_uid=m.group(1).replace("_", "-"))
        elif below_kubepods and (m := _POD_DIR.fullmatch(part)):
            ident = Identity(pod_uid=m.group(1))
        elif m := (_RUNTIME_SCOPE.fullmatch(part) or _PODMAN_PAYLOAD.fullmatch(part)
                   or _BARE_ID.fullmatch(part)):
            ident = dataclasses.replace(ident, container=m.group(1))
        elif m := _MACHINE_SCOPE.fullmatch(part):
            ident = dataclasses.replace(ident, container=_systemd_unescape(m.group(1)))
        elif (m := _NSPAWN_SERVICE.fullmatch(part)) and after != "supervisor":
            ident = dataclasses.replace(ident, container=_systemd_unescape(m.group(1)))
        elif m := _LXC_PAYLOAD.fullmatch(part):
            ident = dataclasses.replace(ident, container=m.group(1))
        elif part in _LXC_PARENTS and after is not None:
            ident = dataclasses.replace(ident, container=after)
    return ident


def from_proc_cgroup(text: str) -> Identity:
    """The identity in the text of /proc/<pid>/cgroup.

    The cgroup v2 line ("0::<path>") decides when it names something. On v1
    and hybrid hosts a runtime with the cgroupfs driver may place containers
    in the v1 hierarchies only, so then the first v1 line that names one does.
    """
    v2: list[str] = []
    v1: list[str] = []
    for line in text.splitlines():
        fields = line.split(":", 2)  # hierarchy-ID:controller-list:path; the path may hold ":"
        if len(fields) == 3:
            (v2 if fields[0] == "0" and not fields[1] else v1).append(fields[2])
    for path in v2 + v1:
        ident = from_cgroup_path(path)
        if ident != HOST:
            return ident
    return HOST


def identity(pid: int) -> Identity | None:
    """The identity of a live process; None if it is gone."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            text = f.read()
    except OSError:
        return None
    return from_proc_cgroup(text)
