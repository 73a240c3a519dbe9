"""The Debian package: build, lintian, contents, systemd unit, install into a
clean bookworm, and the installed agent run with exactly the unit's
capabilities and sandbox rules on this machine's kernel."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
import urllib.request
import warnings
from pathlib import Path

import pytest
import yaml

import cwpkg
from cwpkg_fixtures import deb_path, deb_tree, installed_root  # noqa: F401  (fixtures)
from cwpkg import ROOT, run

# a cold cache debootstraps and downloads every dependency inside the first
# test that needs the clean root (pytest-timeout counts fixture set-up)
pytestmark = pytest.mark.timeout(1500)

VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "agent/connwatch/__init__.py").read_text())[1]
SECURITY_DOC = ROOT / "docs" / "security.md"

# pyproject's run-time requirements -> the Debian packages the .deb depends on
DEBIAN_NAMES = {
    "prometheus-client": "python3-prometheus-client",
    "pyyaml": "python3-yaml",
    "bcrypt": "python3-bcrypt",
    "cheroot": "python3-cheroot",
    "rich": "python3-rich",
    "python-prctl": "python3-prctl",
}


def _depends(deb: Path) -> set[str]:
    text = run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
    return {re.split(r"[\s(:]", d.strip())[0] for d in text.split(",") if d.strip()}


# ---- the package itself ------------------------------------------------------------


def test_changelog_version_is_the_agent_version():
    v = run(["dpkg-parsechangelog", "-l", str(ROOT / "packaging/debian/changelog"), "-S", "Version"]).stdout.strip()
    assert v == VERSION


def test_build_output_name(deb_path):
    arch = run(["dpkg", "--print-architecture"]).stdout.strip()
    assert deb_path.name == f"connwatch_{VERSION}_{arch}.deb"


def test_lintian_clean(deb_path):
    # errors and warnings fail; the overrides (with reasons) are in
    # packaging/debian/connwatch.lintian-overrides
    p = run(["lintian", "--fail-on", "error,warning", "--pedantic", "--info", str(deb_path)],
            check=False, timeout=300)
    tags = [line for line in p.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    assert p.returncode == 0 and not tags, p.stdout + p.stderr


def test_depends_on_debian_packages_only(deb_path):
    deps = _depends(deb_path)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ ;\[]", r)[0].lower() for r in requires}
    missing = {n for n in names if DEBIAN_NAMES.get(n) not in deps}
    assert not missing, f"pyproject requirements without a Debian Depends: {missing} (add to DEBIAN_NAMES and control)"
    assert {"libbpf1", "adduser", "python3"} <= deps
    # each one is a package of the configured Debian archive (apt-cache fails on any unknown name)
    p = run(["apt-cache", "show", "--no-all-versions", *sorted(deps)], check=False)
    assert p.returncode == 0, p.stderr
    assert sorted(re.findall(r"^Package: (\S+)$", p.stdout, re.M)) == sorted(deps)


def test_contents(deb_path, deb_tree):
    files = {str(p.relative_to(deb_tree)) for p in deb_tree.rglob("*") if p.is_file()}
    site = "usr/lib/python3/dist-packages/connwatch"
    agent = {str(p.relative_to(ROOT / "agent/connwatch")) for p in (ROOT / "agent/connwatch").rglob("*.py")
             if "__pycache__" not in p.parts}
    assert {f"{site}/{m}" for m in agent} <= files
    assert not any(f.startswith(site + "/bpf/") for f in files), "the BPF object belongs in /usr/share"
    for f in ("usr/bin/connwatch", "usr/share/connwatch/bpf/connwatch.bpf.o", "etc/connwatch/connwatch.yml",
              "lib/systemd/system/connwatch.service", "usr/share/man/man1/connwatch.1.gz"):
        assert f in files, f
    assert os.access(deb_tree / "usr/bin/connwatch", os.X_OK)
    # the unit's Documentation= points into the package
    for ref in re.findall(r"file://(\S+)", (deb_tree / "lib/systemd/system/connwatch.service").read_text()):
        assert ref.lstrip("/") in files, ref
    # a BPF ELF object (e_machine 247 = EM_BPF); not compared byte for byte
    # with the tree's, which a concurrent `make bpf` may have rebuilt since
    obj = (deb_tree / "usr/share/connwatch/bpf/connwatch.bpf.o").read_bytes()
    assert obj[:4] == b"\x7fELF" and int.from_bytes(obj[18:20], "little") == 247
    # dashboards and alert rules: exactly what the tree had at build time
    dashboards = {p.name for p in (ROOT / "dashboards/json").glob("*.json")}
    rules = {p.name for p in (ROOT / "dashboards/alerts").glob("*.rules.yml")}
    assert {f.rsplit("/", 1)[1] for f in files if f.startswith("usr/share/connwatch/dashboards/")} == dashboards
    assert {f.rsplit("/", 1)[1] for f in files if f.startswith("usr/share/connwatch/alerts/")} == rules
    conffiles = run(["dpkg-deb", "--ctrl-tarfile", str(deb_path)], text=False).stdout
    import io
    import tarfile
    with tarfile.open(fileobj=io.BytesIO(conffiles)) as t:
        member = t.extractfile("./conffiles")
        assert member is not None
        assert member.read().decode().split() == ["/etc/connwatch/connwatch.yml"]
        postinst = t.extractfile("./postinst").read().decode()
    assert "adduser --system" in postinst and "connwatch" in postinst


def test_builds_without_dashboards_or_docs(tmp_path):
    """A tree without generated dashboards, alert rules or docs still builds
    (the rules install whatever exists at build time)."""
    tree = tmp_path / "tree"
    for part in ("agent", "packaging"):
        shutil.copytree(ROOT / part, tree / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    deb = cwpkg.run([str(tree / "packaging/build-deb.sh")], timeout=300,
                    env=dict(os.environ, CONNWATCH_DEB_OUT=str(tmp_path / "out"))).stdout.split()[-1]
    listing = run(["dpkg-deb", "-c", deb]).stdout
    assert "usr/share/connwatch/bpf/connwatch.bpf.o" in listing
    assert "usr/share/connwatch/dashboards" not in listing and "usr/share/connwatch/alerts" not in listing
    assert not any(p.exists() for p in (tree / "dashboards", tree / "docs"))


def test_default_config_documents_every_key(deb_tree):
    import dataclasses

    from connwatch import config

    text = (deb_tree / "etc/connwatch/connwatch.yml").read_text()
    assert config.parse(text) == config.Config(), "the shipped config must spell out the defaults"
    data = yaml.safe_load(text)

    def keys(cls, prefix=""):
        out = set()
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            out |= keys(type(default), prefix + f.name + ".") if dataclasses.is_dataclass(default) else {prefix + f.name}
        return out

    def present(d, prefix=""):
        out = set()
        for k, v in d.items():
            out |= present(v, prefix + k + ".") if isinstance(v, dict) else {prefix + k}
        return out

    assert present(data) == keys(config.Config)


# ---- the systemd unit -----------------------------------------------------------------


@pytest.fixture(scope="module")
def unit_root(deb_tree, tmp_path_factory):
    """The package's files plus this machine's systemd units, as a --root."""
    root = tmp_path_factory.mktemp("unitroot")
    shutil.copytree(deb_tree, root, dirs_exist_ok=True, symlinks=True)
    units = root / "lib/systemd/system"
    for u in Path("/lib/systemd/system").iterdir():
        if not (units / u.name).exists():
            if u.is_symlink():
                (units / u.name).symlink_to(os.readlink(u))
            elif u.is_file():
                shutil.copy2(u, units / u.name)
            elif u.is_dir():
                shutil.copytree(u, units / u.name, symlinks=True)
    return root


def test_systemd_analyze_verify(unit_root):
    # --man=no: man(1) would look for the page on this host, not in the root
    p = run(["systemd-analyze", "verify", "--man=no", f"--root={unit_root}", "connwatch.service"], check=False)
    assert p.returncode == 0 and not p.stderr.strip() and not p.stdout.strip(), p.stdout + p.stderr


def security_score(unit_root) -> float:
    p = run(["systemd-analyze", "security", "--offline=true", f"--root={unit_root}", "--no-pager",
             "connwatch.service"], check=False)
    m = re.search(r"Overall exposure level for connwatch\.service: (\d+\.\d)", p.stdout)
    assert m, p.stdout + p.stderr
    return float(m[1])


def test_systemd_security_score_is_documented(unit_root):
    score = security_score(unit_root)
    cwpkg.log(f"systemd-analyze security exposure: {score}")
    assert score <= 3.0, f"exposure {score}: the sandbox got weaker"
    doc = SECURITY_DOC.read_text()
    assert f"exposure level for connwatch.service: {score}" in doc, \
        f"docs/security.md must record the current score {score}"


def test_unit_runs_as_unprivileged_user_with_sandbox():
    s = cwpkg.unit_settings()
    assert s["User"] == ["connwatch"] and s["Group"] == ["connwatch"]
    assert s["ExecStart"][0].startswith("/usr/bin/connwatch run --web.listen-address :9476 "
                                        "--config.file /etc/connwatch/connwatch.yml")
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "ProtectControlGroups": "yes", "ProtectKernelModules": "yes",
                       "ProtectKernelTunables": "yes", "SystemCallArchitectures": "native",
                       "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
                       "RestrictNamespaces": "yes"}.items():
        assert s.get(key) == [value], key
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    # a private user namespace would make the capabilities useless for bpf()
    assert "PrivateUsers" not in s
    caps = cwpkg.unit_capabilities()
    assert {"CAP_BPF", "CAP_PERFMON"} <= set(caps)
    assert "CAP_SYS_ADMIN" not in caps


# ---- installed into a clean Debian 12 ----------------------------------------------------


def test_installs_into_clean_bookworm(installed_root):
    r = installed_root
    status = r.run("dpkg-query", "-W", "-f=${Status} ${Version}", "connwatch").stdout
    assert status == f"install ok installed {VERSION}"
    user = r.run("getent", "passwd", "connwatch").stdout.split(":")
    assert int(user[2]) < 1000 and user[6].strip() == "/usr/sbin/nologin"
    assert (r.path / "etc/systemd/system/multi-user.target.wants/connwatch.service").is_symlink()
    assert (r.path / "usr/share/connwatch/bpf/connwatch.bpf.o").is_file()


def test_version_in_chroot(installed_root):
    p = installed_root.run("connwatch", "--version")
    assert p.stdout.strip() == f"connwatch {VERSION}"


def test_doctor_json_in_chroot(installed_root):
    if not (installed_root.path / "usr/lib/python3/dist-packages/connwatch/doctor.py").exists():
        pytest.skip("connwatch doctor (agent/connwatch/doctor.py) is not in the tree yet")
    # exits non-zero when a limit is short of the default target; the JSON is what counts
    p = installed_root.run("connwatch", "doctor", "--json", check=False)
    assert p.returncode in (0, 1), p.stderr  # 1: a limit is short of the target
    report = json.loads(p.stdout)
    assert "Traceback" not in p.stderr
    assert report["target_connections"] == 100000
    assert report["verdict"] in ("OK", "SHORT") and (p.returncode == 1) == (report["verdict"] == "SHORT")
    checks = {c["id"]: c for c in report["checks"]}
    # read through the chroot's /proc: the host's kernel limits
    assert checks["fs.file-max"]["current"] == int(Path("/proc/sys/fs/file-max").read_text())
    assert checks["net.core.somaxconn"]["current"] == int(Path("/proc/sys/net/core/somaxconn").read_text())


def test_listing_other_users_fds_needs_cap_dac_read_search(installed_root):
    """Why the unit grants CAP_DAC_READ_SEARCH: on kernels before 6.2 the
    agent counts a process's fds by listing /proc/<pid>/fd (0500, owned by the
    process's user); as the connwatch user that needs this capability."""
    probe = f"import os; print(len(os.listdir('/proc/{os.getpid()}/fd')))"

    def listing(caps: list[str]) -> subprocess.CompletedProcess:
        c = cwpkg.setpriv_caps(caps)
        return installed_root.run("setpriv", "--reuid=connwatch", "--regid=connwatch", "--init-groups",
                                  f"--inh-caps={c}", f"--ambient-caps={c}", f"--bounding-set={c}",
                                  "--no-new-privs", "python3", "-c", probe, check=False)

    caps = cwpkg.unit_capabilities()
    assert "CAP_DAC_READ_SEARCH" in caps
    ok = listing(caps)
    assert ok.returncode == 0 and int(ok.stdout) > 0, ok.stderr
    denied = listing([c for c in caps if c != "CAP_DAC_READ_SEARCH"])
    assert denied.returncode != 0 and "Permission denied" in denied.stderr


# ---- the installed agent, with exactly the unit's capabilities ------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families
    return [(s.labels, s.value) for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == name]


class InstalledAgent:
    """`chroot <root> setpriv ... python3 mdwe_run.py /usr/bin/connwatch run`.

    uid/gid connwatch (the user the package's postinst created), no new
    privileges, the given capabilities as inheritable+ambient+bounding set
    (so permitted and effective = exactly those), and the kernel's own
    MemoryDenyWriteExecute (PR_SET_MDWE) in force: the unit's User=,
    NoNewPrivileges=, AmbientCapabilities=, CapabilityBoundingSet= and
    MemoryDenyWriteExecute=. `as_root` runs it as uid 0 with only the
    bounding set, no ambient set: the Kubernetes DaemonSet's model.
    """

    def __init__(self, root, caps: list[str], as_root: bool = False, strace_to: Path | None = None):
        self.port = _free_port()
        helper = root.path / "usr/local/lib/connwatch-test/mdwe_run.py"
        if not helper.exists():
            helper.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(__file__).parent / "mdwe_run.py", helper)
        if caps is None:  # root with whatever this test runs with
            ids = []
        elif as_root:
            c = cwpkg.setpriv_caps(caps)
            ids = ["--reuid=0", "--regid=0", "--clear-groups", f"--inh-caps={c}", f"--bounding-set={c}"]
        else:
            c = cwpkg.setpriv_caps(caps)
            ids = ["--reuid=connwatch", "--regid=connwatch", "--init-groups",
                   f"--inh-caps={c}", f"--ambient-caps={c}", f"--bounding-set={c}"]
        cmd = ["chroot", str(root.path), "setpriv", *ids, "--no-new-privs",
               "python3", "/usr/local/lib/connwatch-test/mdwe_run.py", "/usr/bin/connwatch", "run",
               "--web.listen-address", f"127.0.0.1:{self.port}",
               "--config.file", "/etc/connwatch/connwatch.yml"]
        if strace_to is not None:
            cmd = ["strace", "-f", "-qq", "-o", str(strace_to), *cmd]
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={"PATH": cwpkg.CLEAN_PATH, "LANG": "C.UTF-8"})

    def wait_ready(self, timeout: float = 60) -> str | None:
        """The first scrape with connwatch_ready 1, or None if the agent exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return None
            text = _scrape(self.port)
            if text and re.search(r"^connwatch_ready 1(\.0)?$", text, re.M):
                return text
            time.sleep(0.2)
        raise AssertionError(f"agent not ready after {timeout}s:\n{self.output()}")

    def agent_pid(self) -> int | None:
        """The agent's python process (Popen's pid, or strace's child)."""
        for pid in [self.proc.pid] + _descendants(self.proc.pid):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip().startswith("python3"):
                    return pid
            except OSError:
                continue
        return None

    def status(self, name: str) -> str:
        """A line of the agent's /proc/<pid>/status."""
        pid = self.agent_pid()
        assert pid is not None, "agent process not found"
        text = Path(f"/proc/{pid}/status").read_text()
        return re.search(rf"^{name}:\s*(.*)$", text, re.M)[1]

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            # the agent itself: strace, if tracing, ends with it
            pid = self.agent_pid() or self.proc.pid
            os.kill(pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pid = self.agent_pid()
                if pid:
                    os.kill(pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def _cap_mask(caps: list[str]) -> int:
    # setpriv lists the capability names in the kernel's numbering order
    names = run(["setpriv", "--list-caps"]).stdout.split()
    return sum(1 << names.index(c.removeprefix("CAP_").lower()) for c in caps)


def _probes(text: str) -> dict[str, float]:
    return {lbl["probe"]: v for lbl, v in _samples(text, "connwatch_probe_enabled")}


@pytest.fixture(scope="module")
def probes_as_root(installed_root) -> dict[str, float]:
    """What the installed agent attaches with every capability (uid 0): a probe
    the verifier rejects for everyone is the BPF code's problem, not the unit's."""
    agent = InstalledAgent(installed_root, caps=None, as_root=True)
    try:
        text = agent.wait_ready()
        assert text is not None, f"agent exited {agent.proc.returncode} as root:\n{agent.output()}"
        return _probes(text)
    finally:
        agent.stop()


def _prove_attached_and_counting(agent: InstalledAgent, caps: list[str], as_root: dict[str, float]) -> None:
    text = agent.wait_ready()
    assert text is not None, f"agent exited {agent.proc.returncode}:\n{agent.output()}"
    probes = _probes(text)
    # the unit's capabilities attach everything full root attaches ...
    assert probes == as_root, f"with {caps}: {probes}; as root: {as_root}\n{agent.output()}"
    # ... which is every probe. A program this kernel's verifier refuses even to
    # root is reported, not fatal (DESIGN.md), and is the BPF code's matter,
    # not the package's: it is a warning here; tests/test_core.py owns it.
    assert probes and probes.get("accept") == 1 and probes.get("connection_state") == 1, probes
    refused = sorted(p for p, v in probes.items() if v != 1)
    if refused:
        warnings.warn(f"probes refused for root too (not a capability problem): {refused}")
    # a real loopback connection, accepted by this test process
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        port = srv.getsockname()[1]
        cli = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        try:
            deadline = time.monotonic() + 20
            found = []
            while time.monotonic() < deadline:
                found = [(lbl, v) for lbl, v in _samples(_scrape(agent.port) or "", "connwatch_connections")
                         if lbl.get("port") == str(port)]
                if found and sum(v for _, v in found) >= 1:
                    break
                time.sleep(0.2)
            assert found and sum(v for _, v in found) >= 1, \
                f"loopback connection to :{port} not counted: {found}\n{agent.output()}"
            assert any(lbl.get("pid") == str(os.getpid()) for lbl, _ in found), found
        finally:
            conn.close()
            cli.close()
    # the kernel's view of the agent: none but these capabilities (the agent
    # may drop some once attached), no new privileges
    for s in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(agent.status(s), 16) & ~_cap_mask(caps) == 0, (s, agent.status(s))
    assert agent.status("NoNewPrivs") == "1"


def test_installed_agent_attaches_with_exactly_the_units_capabilities(installed_root, probes_as_root, tmp_path):
    caps = cwpkg.unit_capabilities()
    trace = tmp_path / "strace.out"
    agent = InstalledAgent(installed_root, caps, strace_to=trace)
    try:
        _prove_attached_and_counting(agent, caps, probes_as_root)
        uid = installed_root.run("id", "-u", "connwatch").stdout.strip()
        assert agent.status("Uid").split()[:2] == [uid, uid]
    finally:
        rc = agent.stop()
    assert rc == 0, agent.output()
    assert "Traceback" not in agent.output(), agent.output()
    # every system call the agent made is allowed by the unit's SystemCallFilter=
    # (from python3's execve on: before it, chroot and setpriv stand in for systemd)
    used, started = set(), False
    for line in trace.read_text().splitlines():
        if not started:
            started = bool(re.match(r'^\d+\s+execve\("/usr/bin/python3"', line))
            continue
        m = re.match(r"^\d+\s+(?:<\.\.\. )?([a-z0-9_]+)[( ]", line)
        if m:
            used.add(m[1])
    assert started and used, "strace recorded nothing"
    allowed = cwpkg.expand_syscall_filter(" ".join(cwpkg.unit_settings()["SystemCallFilter"]).split())
    assert not (used - allowed), f"system calls outside SystemCallFilter=: {sorted(used - allowed)}"


def test_installed_agent_as_root_uid_with_only_the_bounding_set(installed_root, probes_as_root):
    """The DaemonSet's model: uid 0, capabilities drop ALL + add the unit's
    list, on a read-only root filesystem with a writable /tmp only
    (readOnlyRootFilesystem + the emptyDir; the unit's ProtectSystem=strict +
    PrivateTmp= is the same for the agent)."""
    caps = cwpkg.unit_capabilities()
    # make sure the helper is in the root before it turns read-only
    (installed_root.path / "usr/local/lib/connwatch-test").mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).parent / "mdwe_run.py", installed_root.path / "usr/local/lib/connwatch-test/mdwe_run.py")
    with installed_root.readonly_view() as view:
        assert run(["chroot", str(view.path), "touch", "/usr/probe"], check=False).returncode != 0, \
            "the view is not read-only"
        agent = InstalledAgent(view, caps, as_root=True)
        try:
            _prove_attached_and_counting(agent, caps, probes_as_root)
        finally:
            agent.stop()
        assert "Read-only file system" not in agent.output(), agent.output()


# what the agent says or does without each of the unit's capabilities
# (CAP_DAC_READ_SEARCH shows in the agent only on kernels before 6.2, where
# the fd count needs a directory listing: test_listing_other_users_fds_...)
WITHOUT = {
    "CAP_BPF": "CAP_BPF",
    "CAP_PERFMON": "CAP_PERFMON",
}


@pytest.mark.parametrize("missing", [c for c in cwpkg.unit_capabilities() if c in WITHOUT])
def test_each_capability_is_needed(installed_root, missing):
    caps = [c for c in cwpkg.unit_capabilities() if c != missing]
    agent = InstalledAgent(installed_root, caps)
    try:
        text = agent.wait_ready(timeout=30)
    finally:
        rc = agent.stop()
    out = agent.output()
    assert text is None and rc != 0, f"the agent runs without {missing}: drop it from the unit\n{out}"
    assert WITHOUT[missing] in out, out


def test_every_capability_is_accounted_for():
    unexplained = set(cwpkg.unit_capabilities()) - set(WITHOUT) - {"CAP_DAC_READ_SEARCH"}
    assert not unexplained, f"capabilities in the unit with no test showing they are needed: {unexplained}"


# ---- the container image uses the same install steps ------------------------------------


def test_containerfile_installs_with_the_tested_script():
    text = (ROOT / "packaging/container/Containerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    # the published base by default; `make image` passes its own (test_image.py)
    assert lines[:2] == ["ARG BASE_IMAGE=debian:bookworm-slim", "FROM ${BASE_IMAGE}"]
    assert "COPY packaging/install-deb.sh /tmp/install-deb.sh" in lines
    run_lines = [ln for ln in lines if ln.startswith("RUN ")]
    # the only install step is the script the chroot test runs
    assert len(run_lines) == 1 and run_lines[0].startswith("RUN sh /tmp/install-deb.sh /tmp/connwatch.deb")
    assert "apt-get install" not in text.replace("install-deb.sh", "")
    assert "USER connwatch" in lines
    # the documented run command grants exactly the unit's capabilities
    added = set(re.findall(r"--cap-add=(\w+)", text))
    assert added == {c.removeprefix("CAP_") for c in cwpkg.unit_capabilities()}
    assert "--cap-drop=ALL" in text
    assert ENTRYPOINT_RE.search(text)


ENTRYPOINT_RE = re.compile(r'^ENTRYPOINT \["/usr/bin/connwatch"\]$', re.M)


def test_install_script_is_plain_apt():
    text = cwpkg.INSTALL_SCRIPT.read_text()
    assert "apt-get update" in text and "apt-get install -y -q --no-install-recommends" in text
    assert os.access(cwpkg.INSTALL_SCRIPT, os.X_OK)
