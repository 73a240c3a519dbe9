"""The DaemonSet's pod as `podman run` flags, derived field by field from
packaging/kubernetes/daemonset.yaml, so that the image test runs the
container exactly as the manifest asks and cannot drift from it.

Every field of the pod template is either translated into the flag that
gives a container the same thing under podman, or listed in IGNORED with the
reason it does not apply to one container on one node; any other field
raises UnknownField. A setting added to the manifest (a new securityContext
field, a volume type) therefore fails the image test until it is translated
here, instead of silently not being run.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

# Fields that have no counterpart for one container on this node, and why.
IGNORED = {
    "spec.template.spec.serviceAccountName": "no API server here; the agent never talks to one",
    "spec.template.spec.dnsPolicy": "with the host network podman gives the node's resolv.conf; "
                                    "the agent resolves no names",
    "spec.template.spec.tolerations": "scheduling onto tainted nodes",
    "containers[].imagePullPolicy": "the image is local (--pull=never)",
    "containers[].ports": "host network: the port is the node's, published by the agent's own listen address",
    "containers[].livenessProbe": "the kubelet's HTTP GET of /metrics: the test scrapes it throughout",
    "containers[].readinessProbe": "the kubelet's HTTP GET of /metrics: the test scrapes it throughout",
    "containers[].resources.requests.memory": "scheduling only (no cgroup setting without MemoryQoS)",
}


class UnknownField(Exception):
    """A manifest field this translation does not know: translate it, or
    add it to IGNORED with the reason."""


class _Fields:
    """A mapping whose every key must be taken (or be in IGNORED) by close()."""

    def __init__(self, mapping: dict, where: str, ignore_as: str | None = None):
        self._left = dict(mapping)
        self.where = where
        self._ignore_as = ignore_as or where

    def take(self, key: str, default=None):
        return self._left.pop(key, default)

    def close(self) -> None:
        for key in self._left:
            if f"{self._ignore_as}.{key}" not in IGNORED:
                raise UnknownField(f"{self.where}.{key}: {self._left[key]!r}")


@dataclasses.dataclass(frozen=True)
class Node:
    """What the node provides that the manifest only names."""

    image: str  # what the kustomize image name `connwatch` resolves to
    container_name: str  # the kubelet derives one from the pod; the test needs a unique one
    config_maps: dict[str, Path]  # ConfigMap name -> a directory holding its files
    runtime_default_seccomp: Path  # the profile `RuntimeDefault` means on this node
    listen_address: str  # replaces --web.listen-address (host network: a free port here)


@dataclasses.dataclass(frozen=True)
class PodmanRun:
    options: list[str]  # `podman run` options
    image: str
    args: list[str]  # the container's args (the image's ENTRYPOINT stays)
    startup_budget_seconds: float  # startupProbe: periodSeconds x failureThreshold

    def argv(self, *extra_options: str) -> list[str]:
        """`run ...` for the podman command line (after its global options)."""
        return ["run", *self.options, *extra_options, self.image, *self.args]


_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def _bytes(quantity: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", str(quantity))
    if not m:
        raise UnknownField(f"memory quantity {quantity!r}")
    return int(m.group(1)) * _BINARY.get(m.group(2) or "", 1)


def _millicpu(quantity: str) -> int:
    q = str(quantity)
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def _security_context(sc: dict, where: str) -> list[str]:
    f = _Fields(sc, where, "containers[].securityContext")
    opts: list[str] = []
    if f.take("privileged", False):
        opts.append("--privileged")
    if f.take("allowPrivilegeEscalation", True) is False:
        opts.append("--security-opt=no-new-privileges")  # no_new_privs, as runc does for Kubernetes
    if f.take("readOnlyRootFilesystem", False):
        # podman's --read-only also mounts tmpfs on /run, /tmp, /var/tmp;
        # Kubernetes mounts nothing the pod does not ask for
        opts += ["--read-only", "--read-only-tmpfs=false"]
    if f.take("runAsNonRoot", False):
        raise UnknownField(f"{where}.runAsNonRoot: the kubelet's check is not translated")
    user, group = f.take("runAsUser"), f.take("runAsGroup")
    if user is not None:
        opts.append(f"--user={user}" + (f":{group}" if group is not None else ""))
    caps = _Fields(f.take("capabilities", {}), f"{where}.capabilities", "containers[].securityContext.capabilities")
    opts += [f"--cap-drop={c}" for c in caps.take("drop", [])]
    opts += [f"--cap-add={c}" for c in caps.take("add", [])]
    caps.close()
    f.close()
    return opts


def _resources(res: dict, where: str) -> list[str]:
    f = _Fields(res, where, "containers[].resources")
    limits = _Fields(f.take("limits", {}), f"{where}.limits", "containers[].resources.limits")
    requests = _Fields(f.take("requests", {}), f"{where}.requests", "containers[].resources.requests")
    opts: list[str] = []
    if (mem := limits.take("memory")) is not None:
        opts.append(f"--memory={_bytes(mem)}")
    if (cpu := limits.take("cpu")) is not None:
        opts.append(f"--cpus={_millicpu(cpu) / 1000}")  # the kubelet's CFS quota
    if (cpu := requests.take("cpu")) is not None:
        opts.append(f"--cpu-shares={max(2, _millicpu(cpu) * 1024 // 1000)}")  # the kubelet's MilliCPUToShares
    limits.close()
    requests.close()
    f.close()
    return opts


def _volume_mounts(mounts: list[dict], volumes: list[dict], node: Node) -> list[str]:
    by_name = {v["name"]: v for v in volumes}
    used: set[str] = set()
    opts: list[str] = []
    for m in mounts:
        mf = _Fields(m, f"volumeMounts[{m.get('name')}]", "containers[].volumeMounts[]")
        name, target, ro = mf.take("name"), mf.take("mountPath"), mf.take("readOnly", False)
        mf.close()
        used.add(name)
        vf = _Fields(by_name[name], f"volumes[{name}]", "spec.template.spec.volumes[]")
        vf.take("name")
        if (hp := vf.take("hostPath")) is not None:
            hpf = _Fields(hp, f"volumes[{name}].hostPath", "spec.template.spec.volumes[].hostPath")
            source, kind = Path(hpf.take("path")), hpf.take("type", "")
            hpf.close()
            if kind == "Directory" and not source.is_dir():  # the kubelet refuses to start the pod
                raise FileNotFoundError(f"hostPath {source} (type Directory) is not a directory on this node")
            opts.append(f"--mount=type=bind,source={source},destination={target},ro={str(bool(ro)).lower()}")
        elif (cm := vf.take("configMap")) is not None:
            cmf = _Fields(cm, f"volumes[{name}].configMap", "spec.template.spec.volumes[].configMap")
            source = node.config_maps[cmf.take("name")]
            cmf.close()
            # the kubelet always mounts a configMap volume read-only
            opts.append(f"--mount=type=bind,source={source},destination={target},ro=true")
        elif (ed := vf.take("emptyDir")) is not None:
            edf = _Fields(ed, f"volumes[{name}].emptyDir", "spec.template.spec.volumes[].emptyDir")
            if edf.take("medium") != "Memory":
                raise UnknownField(f"volumes[{name}].emptyDir: only medium: Memory (a tmpfs) is translated")
            size = edf.take("sizeLimit")
            edf.close()
            # a memory emptyDir is a tmpfs of sizeLimit, mode 0777, writable
            opts.append(f"--mount=type=tmpfs,destination={target},tmpfs-mode=0777"
                        + (f",tmpfs-size={_bytes(size)}" if size is not None else ""))
        vf.close()
    unused = set(by_name) - used
    if unused:
        raise UnknownField(f"volumes not mounted by the container: {sorted(unused)}")
    return opts


def podman_run(daemonset: dict, node: Node) -> PodmanRun:
    """The `podman run` that gives the DaemonSet's single container what the
    manifest asks of a node (a kubelet with containerd or CRI-O)."""
    pod = _Fields(daemonset["spec"]["template"]["spec"], "spec.template.spec")
    opts: list[str] = []
    if pod.take("hostPID", False):
        opts.append("--pid=host")
    if pod.take("hostNetwork", False):
        opts.append("--network=host")
    if pod.take("automountServiceAccountToken", True) is not False:
        raise UnknownField("automountServiceAccountToken: a token mount is not translated")
    if (grace := pod.take("terminationGracePeriodSeconds")) is not None:
        opts.append(f"--stop-timeout={grace}")  # SIGTERM, then SIGKILL after the grace period
    psc = _Fields(pod.take("securityContext", {}), "spec.template.spec.securityContext")
    seccomp = _Fields(psc.take("seccompProfile", {"type": "Unconfined"}),
                      "spec.template.spec.securityContext.seccompProfile")
    kind = seccomp.take("type")
    seccomp.close()
    psc.close()
    if kind == "RuntimeDefault":
        opts.append(f"--security-opt=seccomp={node.runtime_default_seccomp}")
    elif kind == "Unconfined":
        opts.append("--security-opt=seccomp=unconfined")
    else:
        raise UnknownField(f"seccompProfile type {kind}")

    (container,) = pod.take("containers")
    volumes = pod.take("volumes", [])
    pod.close()

    c = _Fields(container, f"containers[{container.get('name')}]", "containers[]")
    opts += [f"--name={node.container_name}", f"--label=io.kubernetes.container.name={c.take('name')}"]
    if c.take("image") != "connwatch":
        raise UnknownField("containers[].image: expected the kustomize image name `connwatch`")
    opts.append("--pull=never")
    args = list(c.take("args", []))
    listen = [i for i, a in enumerate(args) if a.startswith("--web.listen-address=")]
    if len(listen) != 1:
        raise UnknownField(f"containers[].args: expected one --web.listen-address= in {args}")
    args[listen[0]] = f"--web.listen-address={node.listen_address}"
    opts += _security_context(c.take("securityContext", {}), f"{c.where}.securityContext")
    opts += _resources(c.take("resources", {}), f"{c.where}.resources")
    opts += _volume_mounts(c.take("volumeMounts", []), volumes, node)
    # the kubelet's HTTP GET of /metrics: the test polls the same path within
    # the time this probe gives (the probe's defaults: 10 s x 3)
    startup = c.take("startupProbe") or {}
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    c.close()
    return PodmanRun(options=opts, image=node.image, args=args, startup_budget_seconds=budget)
