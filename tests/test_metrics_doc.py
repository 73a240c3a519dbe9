"""docs/metrics.md's tables are generated from the declarations in
agent/connwatch/metrics.py and must be fresh; every name a declaration,
every declaration documented. Needs no root and no kernel."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from connwatch import metrics, metrics_doc

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "metrics.md"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "connwatch.metrics_doc", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_committed_tables_are_fresh():
    r = run("--check")
    assert r.returncode == 0, r.stderr + "\ndocs/metrics.md is stale: run `make dashboards` and commit"


def test_check_fails_on_a_stale_copy_and_writing_fixes_it(tmp_path):
    stale = tmp_path / "metrics.md"
    stale.write_text(DOC.read_text().replace("| `connwatch_ready` |", "| `connwatch_readyy` |"))
    r = run("--check", "--file", str(stale))
    assert r.returncode == 1 and "is stale" in r.stderr
    assert run("--file", str(stale)).returncode == 0
    assert stale.read_text() == DOC.read_text()


def test_a_missing_block_is_an_error():
    with pytest.raises(ValueError, match="metrics: agent"):
        metrics_doc.render(DOC.read_text().replace("<!-- metrics: agent -->", ""))


def test_every_declared_metric_is_in_a_table_once_and_nothing_else_is():
    in_tables = re.findall(r"^\| `(connwatch_\w+)` \|", DOC.read_text(), re.M)
    assert sorted(in_tables) == sorted(m.name for m in metrics.ALL)


def test_declarations_are_consistent():
    assert len(metrics.BY_NAME) == len(metrics.ALL)
    for m in metrics.ALL:
        assert m.name.startswith("connwatch_") and m.help and m.source, m.name
        assert m.family().type == m.type
        if m.labels[: len(metrics.NETNS)] == metrics.NETNS:
            continue  # per network namespace: its inode and its pod, no process
        if set(metrics.PROCESS) & set(m.labels):
            assert m.labels[: len(metrics.PROCESS)] == metrics.PROCESS, m.name
