"""Fixtures for the packaging tests: the .deb (built once per session) and a
clean bookworm root with it installed.

Not a conftest.py: the other test modules do `from conftest import ...`, and
a second conftest module in this directory would shadow tests/conftest.py.
The test modules here import these fixtures by name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

import cwpkg


_built: dict[str, Path] = {}


@pytest.fixture(scope="session")
def deb_path(tmp_path_factory) -> Path:
    # imported into several modules: build once per process all the same
    if "deb" not in _built:
        t0 = time.monotonic()
        _built["deb"] = cwpkg.build_deb(tmp_path_factory.mktemp("deb"))
        cwpkg.log(f"built {_built['deb'].name} in {time.monotonic() - t0:.1f}s")
    return _built["deb"]


@pytest.fixture(scope="session")
def deb_tree(deb_path) -> Path:
    """The package's files, unpacked (world-readable, outside pytest's 0700 tmp)."""
    d = Path(tempfile.mkdtemp(prefix="connwatch-deb-tree."))
    os.chmod(d, 0o755)
    cwpkg.run(["dpkg-deb", "-x", str(deb_path), str(d)])
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def installed_root(deb_path):
    """A clean debootstrapped bookworm with the .deb installed by
    packaging/install-deb.sh (the Containerfile's install step), /proc and a
    read-only /sys mounted so the installed agent can run in it."""
    t0 = time.monotonic()
    tarball = cwpkg.bookworm_tarball()
    cwpkg.log(f"bookworm root tarball ready ({time.monotonic() - t0:.1f}s): {tarball}")
    root = cwpkg.Chroot(Path("/var/tmp"))
    try:
        root.mount_proc()
        t1 = time.monotonic()
        shutil.copy(deb_path, root.path / "tmp" / deb_path.name)
        shutil.copy(cwpkg.INSTALL_SCRIPT, root.path / "tmp" / "install-deb.sh")
        root.restore_archives()
        root.install_log = root.run("sh", "/tmp/install-deb.sh", f"/tmp/{deb_path.name}", timeout=900)
        root.save_archives()
        cwpkg.log(f"installed {deb_path.name} with its dependencies in {time.monotonic() - t1:.1f}s")
        # the agent needs the kernel's BTF: /sys, read-only
        sysdir = root.path / "sys"
        cwpkg.run(["mount", "--bind", "/sys", str(sysdir)])
        root._mounts.append(sysdir)
        cwpkg.run(["mount", "-o", "remount,bind,ro", str(sysdir)])
        yield root
    finally:
        root.close()
