"""Helpers for the packaging tests: build the .deb, a cached clean bookworm
root made with debootstrap, chroot runs, the unit's capability list.

Everything here talks only to the Debian mirror this machine's apt is
configured with (parsed from /etc/apt/sources.list*) and to loopback.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"
UNIT = PACKAGING / "debian" / "connwatch.service"
INSTALL_SCRIPT = PACKAGING / "install-deb.sh"
SUITE = "bookworm"
CACHE = Path(os.environ.get("CONNWATCH_TEST_CACHE", "/var/cache/connwatch-test"))
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def log(msg: str) -> None:
    print(f"[packaging {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- the Debian mirror apt uses here ------------------------------------------


def _sources_entries() -> list[tuple[str, list[str]]]:
    """(uri, suites) of every enabled apt source on this machine."""
    entries: list[tuple[str, list[str]]] = []
    files = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text(errors="replace")
        if f.name.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
                if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
                    continue
                for uri in fields.get("uris", "").split():
                    entries.append((uri, fields.get("suites", "").split()))
        elif f.name.endswith(".list"):
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(parts) >= 3 and parts[0] == "deb":
                    entries.append((parts[1], [parts[2]]))
    return entries


def debian_mirror() -> str:
    """The URI this machine's apt gets Debian bookworm (main archive) from."""
    for uri, suites in _sources_entries():
        if SUITE in suites:
            return uri.rstrip("/")
    raise RuntimeError(f"no apt source for suite {SUITE} in /etc/apt/sources.list*")


# ---- locking and caching ------------------------------------------------------------


@contextlib.contextmanager
def flock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run(cmd: list[str], timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    p = subprocess.run(cmd, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}\n"
                             f"--- stdout\n{p.stdout[-4000:] if p.stdout else ''}\n"
                             f"--- stderr\n{p.stderr[-4000:] if p.stderr else ''}")
    return p


def build_deb(outdir: Path) -> Path:
    """`packaging/build-deb.sh` into outdir; the path of the .deb."""
    env = dict(os.environ, CONNWATCH_DEB_OUT=str(outdir))
    p = run([str(PACKAGING / "build-deb.sh")], env=env, timeout=300)
    deb = Path(p.stdout.strip().splitlines()[-1])
    assert deb.is_file(), p.stdout
    return deb


def bookworm_tarball() -> Path:
    """A debootstrapped bookworm minbase root with fresh apt lists, as a tar.

    Cached under CACHE keyed by the UTC date, so repeated runs the same day
    only unpack it; a fresh machine (or a new day) debootstraps from the
    configured mirror. Older tarballs are removed.
    """
    key = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
    tarball = CACHE / f"{SUITE}-minbase-{key}.tar"
    if tarball.is_file():
        return tarball
    with flock(CACHE / ".debootstrap.lock"):
        if tarball.is_file():  # built by a concurrent run while we waited
            return tarball
        mirror = debian_mirror()
        work = Path(tempfile.mkdtemp(prefix="debootstrap.", dir=CACHE))
        try:
            rootfs = work / "root"
            t0 = time.monotonic()
            log(f"debootstrap --variant=minbase {SUITE} from {mirror} (cold cache)")
            run(["debootstrap", "--variant=minbase", SUITE, str(rootfs), mirror], timeout=1500)
            shutil.copy("/etc/resolv.conf", rootfs / "etc" / "resolv.conf")
            run(["chroot", str(rootfs), "apt-get", "update", "-q"], env={"PATH": CLEAN_PATH}, timeout=600)
            tmp_tar = work / "root.tar"
            run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tmp_tar), "."], timeout=600)
            os.replace(tmp_tar, tarball)
            log(f"cached {tarball} ({time.monotonic() - t0:.0f}s)")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for old in CACHE.glob(f"{SUITE}-minbase-*.tar"):
            if old != tarball:
                old.unlink(missing_ok=True)
    return tarball


class Chroot:
    """A throwaway copy of the cached root, /proc mounted while in use."""

    def __init__(self, parent: Path):
        self.path = Path(tempfile.mkdtemp(prefix="bookworm-root.", dir=parent))
        tarball = bookworm_tarball()
        self._mounts: list[Path] = []
        # in memory: unpacking is faster, and removing it is one umount
        run(["mount", "-t", "tmpfs", "-o", "size=3g,mode=0755", "tmpfs", str(self.path)])
        self._mounts.append(self.path)
        try:
            run(["tar", "--numeric-owner", "-C", str(self.path), "-xf", str(tarball)], timeout=600)
            shutil.copy("/etc/resolv.conf", self.path / "etc" / "resolv.conf")
        except BaseException:
            self.close()
            raise

    def mount_proc(self) -> None:
        target = self.path / "proc"
        run(["mount", "-t", "proc", "proc", str(target)])
        self._mounts.append(target)

    def run(self, *cmd: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return run(["chroot", str(self.path), *cmd], timeout=timeout, check=check,
                   env={"PATH": CLEAN_PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"})

    # apt's downloaded packages are kept between runs (copied in and out, so
    # concurrent runs never share apt's lock on one archives directory)
    def restore_archives(self) -> None:
        src = CACHE / "archives"
        dst = self.path / "var" / "cache" / "apt" / "archives"
        if src.is_dir():
            for deb in src.glob("*.deb"):
                shutil.copy2(deb, dst / deb.name)

    def save_archives(self) -> None:
        dst = CACHE / "archives"
        dst.mkdir(parents=True, exist_ok=True)
        for deb in (self.path / "var" / "cache" / "apt" / "archives").glob("*.deb"):
            if not (dst / deb.name).exists():
                tmp = dst / f".{deb.name}.{os.getpid()}"
                shutil.copy2(deb, tmp)
                os.replace(tmp, dst / deb.name)

    @contextlib.contextmanager
    def readonly_view(self):
        """The same root (with its /proc and /sys) read-only, a fresh tmpfs on /tmp."""
        view = Path(tempfile.mkdtemp(prefix="bookworm-ro.", dir=self.path.parent))
        try:
            run(["mount", "--rbind", str(self.path), str(view)])
            # private: the /tmp mount below must not propagate back into self.path
            run(["mount", "--make-rprivate", str(view)])
            run(["mount", "-o", "remount,bind,ro", str(view)])
            run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=1777", "tmpfs", str(view / "tmp")])
            yield type("View", (), {"path": view})()
        finally:
            subprocess.run(["umount", "-R", "-l", str(view)], capture_output=True)
            if not any(line.split()[1].startswith(str(view))
                       for line in Path("/proc/mounts").read_text().splitlines()):
                view.rmdir()

    def close(self) -> None:
        for m in reversed(self._mounts):
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
        self._mounts.clear()
        # never delete through a mount point that is still there
        mounted = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                   if line.split()[1].startswith(str(self.path))]
        if not mounted:
            shutil.rmtree(self.path, ignore_errors=True)


# ---- the unit's capabilities -------------------------------------------------------------


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """Key -> values (later lines append) of the unit's [Service] section."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]" and "=" in line:
            k, v = line.split("=", 1)
            values.setdefault(k.strip(), []).append(v.strip())
    return values


def unit_capabilities(path: Path = UNIT) -> list[str]:
    """The unit's capabilities (CAP_* names); ambient and bounding sets must agree."""
    s = unit_settings(path)
    ambient = sorted({c for v in s.get("AmbientCapabilities", []) for c in v.split()})
    bounding = sorted({c for v in s.get("CapabilityBoundingSet", []) for c in v.split()})
    assert ambient == bounding, f"AmbientCapabilities {ambient} != CapabilityBoundingSet {bounding}"
    return ambient


def setpriv_caps(caps: list[str]) -> str:
    """CAP_BPF, CAP_PERFMON -> '-all,+bpf,+perfmon' for setpriv."""
    return ",".join(["-all"] + [f"+{c.removeprefix('CAP_').lower()}" for c in caps])


def syscall_groups() -> dict[str, list[str]]:
    """systemd's syscall groups (@name -> members, members may be groups)."""
    out = run(["systemd-analyze", "syscall-filter"]).stdout
    groups: dict[str, list[str]] = {}
    cur = None
    for line in out.splitlines():
        if line.startswith("@"):
            cur = line.strip()
            groups[cur] = []
        elif cur and line.startswith("    ") and not line.strip().startswith("#"):
            groups[cur].append(line.strip())
    return groups


def expand_syscall_filter(entries: list[str]) -> set[str]:
    groups = syscall_groups()

    def expand(name: str, seen: frozenset = frozenset()) -> set[str]:
        if not name.startswith("@"):
            return {name}
        out: set[str] = set()
        for m in groups.get(name, []):
            if m not in seen:
                out |= expand(m, seen | {name})
        return out

    allowed: set[str] = set()
    for e in entries:
        allowed |= expand(e)
    return allowed


if __name__ == "__main__":
    # `make image` takes the same cached root as its base: cwpkg.py bookworm-tarball
    import sys

    if sys.argv[1:] != ["bookworm-tarball"]:
        sys.exit("usage: cwpkg.py bookworm-tarball")
    print(bookworm_tarball())
