"""Smoke test of the benchmark harness (bench/): its smallest configuration
(`python -m bench --smoke`) must run end to end, produce sane numbers (not
timing thresholds: this machine is shared) and leave nothing behind.

The smoke profile takes ~22 s here (four agent start-ups of ~0.5 s included).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "build" / "bench" / "loadgen"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the bench loads BPF programs: needs root"),
    pytest.mark.skipif(not os.path.exists("/sys/kernel/btf/vmlinux"), reason="no kernel BTF"),
    pytest.mark.skipif(not (ROOT / "agent/connwatch/bpf/connwatch.bpf.o").exists(), reason="run `make bpf` first"),
]


def _loadgens() -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.readlink(d / "exe") == str(LOADGEN):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _tracefs_mounted() -> bool:
    return os.path.isdir("/sys/kernel/tracing/events")


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.timeout(600)
def test_bench_smoke(tmp_path):
    stats_before = Path("/proc/sys/kernel/bpf_stats_enabled").read_text()
    tracefs_before = _tracefs_mounted()
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--json", str(out),
                           "--markdown", str(tmp_path / "results.md")],
                          cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    r = json.loads(out.read_text())

    # it printed the table, with every benchmark of the profile in it
    for b in ("1 churn", "2 syscall", "3 BPF cost", "4/5 scale"):
        assert b in proc.stdout, proc.stdout
    assert r["machine"]["nproc"] >= 1 and r["machine"]["kernel"]

    c = r["churn"]
    assert _finite_positive(c["rate_off"]["median"]) and _finite_positive(c["rate_on"]["median"])
    assert 0.05 < c["ratio"]["median"] < 20  # a ratio, of two real measurements
    assert c["agent_alive_after_load"] and all(c["agent_alive_after_load"])
    n = c["no_syscall_tracing"]  # the same, with the agent's syscall hook switched off
    assert _finite_positive(n["rate_on"]["median"]) and all(n["agent_alive_after_load"])

    s = r["syscall"]
    for mode in ("getppid", "pipe"):
        for cond in ("none", "agent", "agent_no_syscalls", "cw_sys_exit", "empty", "alt"):
            assert _finite_positive(s[mode][cond]["ns_per_iter"]["median"]), (mode, cond)
    # a pipe round trip is two syscalls that move data: dearer than one getppid
    assert s["pipe"]["none"]["ns_per_iter"]["median"] > s["getppid"]["none"]["ns_per_iter"]["median"]

    b = r["bpfcost"]
    agent, empty, alt = b["agent"]["programs"], b["empty"]["programs"], b["alt"]["programs"]
    assert agent["sys_exit"]["runs"] > 1000  # from the agent's connwatch_bpf_program_* metrics
    assert _finite_positive(agent["sys_exit"]["ns_per_event"])
    assert agent["inet_sock_set_state"]["runs"] > 0
    assert empty["bench_empty_exit"]["runs"] > 1000
    assert "alt_accept4" in alt and alt["alt_accept4"]["runs"] > 0
    for who in ("agent", "empty", "alt"):
        assert _finite_positive(b[who]["bpf_ns_per_connection"]), who
    assert b["bpf_stats_enabled_after"] == b["bpf_stats_enabled_before"]

    lv = r["scale"]["levels"][0]
    assert lv["counts_agree"] and sum(lv["per_process"].values()) == lv["connections"]
    sc = lv["scrape_seconds"]
    assert _finite_positive(sc["median"]) and sc["p99"] >= sc["median"]
    assert lv["agent_memory"]["VmRSS"] > 10 * 2**20
    assert lv["bpf_map_memory_bytes"] > 0 and lv["bpf_map_entries"]["procs"] > 0
    for name, t in lv["baselines"].items():
        assert _finite_positive(t["median"]), name
    assert _finite_positive(lv["speedup_vs_fastest"])

    # nothing left behind
    assert Path("/proc/sys/kernel/bpf_stats_enabled").read_text() == stats_before
    assert _tracefs_mounted() == tracefs_before
    assert _loadgens() == []
