"""Least privilege: after attaching, the agent keeps exactly caps.AFTER_ATTACH,
plus CAP_BPF on kernels where every bpf() call needs it (with
kernel.unprivileged_bpf_disabled set, on older kernels: measured on Debian's
5.10, not on its 6.1 or later; docs/kernels.md).

1. The running agent: every thread's CapEff/CapPrm/CapBnd equal the keep-set,
   CapInh/CapAmb are empty, NoNewPrivs is set; and it still counts new
   connections afterwards.
2. The keep-set is measured, not guessed: in child processes that drop to
   the keep-set (or the keep-set minus one capability, or plus
   CAP_SYS_PTRACE), the /proc reads the agent does after attach succeed with
   all of it and fail without each member, and the reads it does not do
   (fd links, fdinfo: CAP_SYS_PTRACE) fail; a BPF iterator created before
   the drop can be re-run (BPF_ITER_CREATE) with no capability at all, and
   so can map reads.
3. Run as a non-root user with only CAP_BPF, CAP_PERFMON and
   CAP_DAC_READ_SEARCH (what the systemd unit grants, no CAP_SETPCAP), the
   agent starts, serves, and ends with CapEff = CapPrm = {CAP_DAC_READ_SEARCH}.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

from conftest import deadline, stop_process, wait_for
from connwatch import caps
from connwatch.probes import kernel_version

ROOT = Path(__file__).resolve().parent.parent


def _mask(names) -> int:
    return sum(1 << caps.NUMBERS[n] for n in names)


def _thread_status(pid: int) -> dict[int, dict[str, str]]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        out[int(tid)] = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    return out


def _capless_bpf_calls_work() -> bool:
    """Does this kernel let a thread with no capability use a BPF map fd it
    holds? Measured in a child that creates a map, drops everything and reads it."""
    code = ("import ctypes, os, sys\n"
            "from connwatch import caps, libbpf\n"
            "lib = libbpf._lib\n"
            "lib.bpf_map_create.restype = ctypes.c_int\n"
            "lib.bpf_map_create.argtypes = [ctypes.c_int, ctypes.c_char_p] + [ctypes.c_uint32] * 3 + [ctypes.c_void_p]\n"
            "fd = lib.bpf_map_create(2, b'probe', 4, 4, 1, None)\n"  # BPF_MAP_TYPE_ARRAY
            "caps.drop_all_but(set())\n"
            "k, v = ctypes.c_uint32(0), ctypes.c_uint32()\n"
            "print(lib.bpf_map_lookup_elem(fd, ctypes.byref(k), ctypes.byref(v)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "agent")})
    return int(out.stdout) == 0


def expected_keep() -> set[str]:
    return set(caps.AFTER_ATTACH) | (set() if _capless_bpf_calls_work() else {"CAP_BPF"})


def test_agent_keeps_exactly_the_keep_set(agent):
    pid = agent.proc.pid
    keep = _mask(expected_keep())

    def all_threads_dropped():
        st = _thread_status(pid)
        return st if all(int(s["CapEff"], 16) == keep for s in st.values()) else None

    # every thread starts after the drop, so the first look finds them all dropped
    status = wait_for(all_threads_dropped, timeout=5, what="every agent thread to drop its capabilities")
    for tid, s in status.items():
        assert int(s["CapEff"], 16) == keep, (tid, s["CapEff"])
        assert int(s["CapPrm"], 16) == keep, (tid, s["CapPrm"])
        assert int(s["CapBnd"], 16) == keep, (tid, s["CapBnd"])
        assert int(s["CapInh"], 16) == 0 and int(s["CapAmb"], 16) == 0, (tid, s)
        assert s["NoNewPrivs"].strip() == "1", tid
    print(f"agent pid {pid}: {len(status)} threads, CapEff=CapPrm=CapBnd={keep:016x} "
          f"({', '.join(sorted(expected_keep()))})")


def test_agent_still_counts_connections_after_the_drop(agent):
    """The BPF programs keep running and the maps stay readable without the load-time capabilities."""
    assert int(_thread_status(agent.proc.pid)[agent.proc.pid]["CapEff"], 16) == _mask(expected_keep())
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        clients, accepted = [], []
        try:
            for n in (3, 7):
                while len(clients) < n:
                    clients.append(socket.create_connection(("127.0.0.1", port)))
                    accepted.append(listener.accept()[0])
                agent.wait_for_value("connwatch_connections", n, pid=os.getpid(), port=port)
        finally:
            for s in clients + accepted:
                s.close()
        agent.wait_for_value("connwatch_connections", 0, pid=os.getpid(), port=port)


# ---- measuring the keep-set ----------------------------------------------------------

_CHILD = r"""
import json, os, sys
from connwatch import caps
keep, other_pid, other_fd, root_pid = json.loads(sys.argv[1])
caps.drop_all_but(keep)
def attempt(f):
    try:
        f()
        return "ok"
    except OSError as e:
        return os.strerror(e.errno)
print(json.dumps({
    "stat other user's /proc/pid/fd (fd count)": attempt(lambda: os.stat(f"/proc/{other_pid}/fd")),
    "list other user's /proc/pid/fd": attempt(lambda: os.listdir(f"/proc/{other_pid}/fd")),
    "list a root process's /proc/pid/fd": attempt(lambda: os.listdir(f"/proc/{root_pid}/fd")),
    "read other user's /proc/pid/limits": attempt(lambda: open(f"/proc/{other_pid}/limits").read()),
    "read other user's /proc/pid/cgroup": attempt(lambda: open(f"/proc/{other_pid}/cgroup").read()),
    "read other user's /proc/pid/stat": attempt(lambda: open(f"/proc/{other_pid}/stat").read()),
    "readlink other user's /proc/pid/fd/N": attempt(lambda: os.readlink(f"/proc/{other_pid}/fd/{other_fd}")),
    "read other user's /proc/pid/fdinfo/N": attempt(lambda: open(f"/proc/{other_pid}/fdinfo/{other_fd}").read()),
    "readlink a root process's /proc/pid/fd/N": attempt(
        lambda: [os.readlink(f"/proc/{root_pid}/fd/{n}") for n in os.listdir(f"/proc/{root_pid}/fd")]),
    "sets": {k: sorted(v) for k, v in caps.current().items()},
}))
"""

# What the agent does after attach -> the capabilities it needs (all of them), measured on 6.18.
# fds.py counts fds with stat() (kernel >= 6.2) and lists the directory on older kernels.
AGENT_NEEDS = {
    "stat other user's /proc/pid/fd (fd count)": set(),
    "list other user's /proc/pid/fd": {"CAP_DAC_READ_SEARCH"},
    "list a root process's /proc/pid/fd": set(),
    "read other user's /proc/pid/limits": set(),
    "read other user's /proc/pid/cgroup": set(),
    "read other user's /proc/pid/stat": set(),
}
# What the agent does NOT do, and what it would take: CAP_SYS_PTRACE, deliberately not kept.
NOT_DONE_NEEDS = {
    "readlink other user's /proc/pid/fd/N": {"CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"},
    # a ptrace check guards fdinfo since a kernel between 5.10 and 6.1 (measured:
    # Debian's 5.10 lets CAP_DAC_READ_SEARCH read it, 6.1 does not)
    "read other user's /proc/pid/fdinfo/N": (
        {"CAP_SYS_PTRACE"} if kernel_version() >= (6, 1)
        else {"CAP_DAC_READ_SEARCH"}),
    # a root process has every capability: reading its fd links needs ptrace rights over it
    "readlink a root process's /proc/pid/fd/N": {"CAP_SYS_PTRACE"},
}


@pytest.fixture(scope="module")
def other_users_process():
    """A process of `nobody` holding a listening socket, and a root process."""
    code = ("import socket,sys,time; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen();"
            "print(s.fileno(), flush=True); sys.stdin.read()")
    other = subprocess.Popen(["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
                              sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    root = subprocess.Popen(["sleep", "120"])
    fd = int(other.stdout.readline())
    yield other.pid, fd, root.pid
    other.kill()
    root.kill()
    other.wait()
    root.wait()


def _as(keep: set[str], other) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([sorted(keep), *other])],
                         capture_output=True, text=True, timeout=deadline(30), check=True)
    return json.loads(out.stdout)


def _expect(result: dict, have: set[str]) -> None:
    for op, need in {**AGENT_NEEDS, **NOT_DONE_NEEDS}.items():
        assert result[op] == ("ok" if need <= have else "Permission denied"), (sorted(have), op, result[op])


def test_keep_set_is_sufficient_and_minimal(other_users_process):
    keep = set(caps.AFTER_ATTACH)
    with_keep = _as(keep, other_users_process)
    assert with_keep["sets"]["effective"] == sorted(keep)
    assert with_keep["sets"]["bounding"] == sorted(keep)
    _expect(with_keep, keep)  # every agent operation works; none of the ptrace ones do
    for op in AGENT_NEEDS:
        assert with_keep[op] == "ok", op
    for dropped in sorted(keep):
        assert any(dropped in need for need in AGENT_NEEDS.values()), f"nothing the agent does needs {dropped}"
        _expect(_as(keep - {dropped}, other_users_process), keep - {dropped})
    # and the ptrace-gated reads do work with CAP_SYS_PTRACE: the table is not vacuous
    _expect(_as(keep | {"CAP_SYS_PTRACE"}, other_users_process), keep | {"CAP_SYS_PTRACE"})
    _expect(_as(set(), other_users_process), set())


_ITER_SRC = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
char LICENSE[] SEC("license") = "Dual BSD/GPL";
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1); __type(key, __u32); __type(value, __u64); }
    files SEC(".maps");
SEC("iter/task_file")
int count_files(struct bpf_iter__task_file *ctx)
{
    struct seq_file *seq = ctx->meta->seq;
    struct task_struct *task = ctx->task;
    struct file *file = ctx->file;
    __u32 k = 0, fd = ctx->fd;
    __u64 *v;

    if (!task || !file)
        return 0;
    v = bpf_map_lookup_elem(&files, &k);
    if (v)
        __sync_fetch_and_add(v, 1);
    BPF_SEQ_PRINTF(seq, "%d %d\n", task->tgid, fd);
    return 0;
}
"""


def test_bpf_iterator_and_map_reads_without_capabilities(tmp_path):
    """BPF_ITER_CREATE on an iterator link made before the drop, its read(2),
    and map lookups: with every capability dropped they work where the
    kernel checks capabilities only to create BPF objects (Debian's 6.1 and
    later, the development host), and fail with EPERM where it checks them
    on every bpf() call (Debian's 5.10) — which is why the agent keeps
    CAP_BPF there."""
    arch = {"x86_64": "x86", "aarch64": "arm64"}[os.uname().machine]
    vmlinux = ROOT / "bpf" / "vmlinux" / arch / "vmlinux.h"
    src, obj_path = tmp_path / "iter.bpf.c", tmp_path / "iter.bpf.o"
    src.write_text(_ITER_SRC)
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I{vmlinux.parent}", "-c", str(src),
                    "-o", str(obj_path)], check=True, timeout=deadline(120))
    from connwatch import libbpf

    lib = libbpf._lib
    lib.bpf_link__fd.restype, lib.bpf_link__fd.argtypes = ctypes.c_int, [ctypes.c_void_p]
    lib.bpf_iter_create.restype, lib.bpf_iter_create.argtypes = ctypes.c_int, [ctypes.c_int]
    with libbpf.BpfObject(str(obj_path)) as obj:
        obj.load()
        prog = obj.programs["count_files"]
        prog.attach()
        link_fd = lib.bpf_link__fd(prog._link)
        map_fd = obj.maps["files"].fd
        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # drop everything, then re-run the iterator and read the map
            os.close(r)
            result = {}
            try:
                result["sets"] = {k: sorted(v) for k, v in caps.drop_all_but(set()).items()}
                fd = lib.bpf_iter_create(link_fd)
                result["iter_create"] = "ok" if fd >= 0 else os.strerror(-fd)
                if fd >= 0:
                    data = b""
                    while chunk := os.read(fd, 65536):
                        data += chunk
                    result["iter_lines"] = data.count(b"\n")
                key, value = ctypes.c_uint32(0), ctypes.c_uint64()
                ret = lib.bpf_map_lookup_elem(map_fd, ctypes.byref(key), ctypes.byref(value))
                result["map_lookup"] = "ok" if ret == 0 else os.strerror(ctypes.get_errno())
                result["map_value"] = value.value
            except Exception as e:  # report, never raise in the forked child
                result["error"] = repr(e)
            os.write(w, json.dumps(result).encode())
            os._exit(0)
        os.close(w)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.close(r)
        os.waitpid(child, 0)
    result = json.loads(data)
    assert "error" not in result, result
    assert all(not v for v in result["sets"].values()), result["sets"]
    if _capless_bpf_calls_work():
        assert result["iter_create"] == "ok"
        assert result["iter_lines"] > 10  # every open file of every task on the host
        assert result["map_lookup"] == "ok" and result["map_value"] >= result["iter_lines"]
    else:
        assert result["iter_create"] == result["map_lookup"] == os.strerror(errno.EPERM), result


def test_non_root_agent_with_only_the_units_capabilities(tmp_path):
    """Like the systemd unit: user nobody, ambient CAP_BPF CAP_PERFMON CAP_DAC_READ_SEARCH, no CAP_SETPCAP."""
    from conftest import CONNWATCH, Metrics, free_port

    granted = "+bpf,+perfmon,+dac_read_search"
    with tempfile.TemporaryDirectory(prefix="connwatch-caps-") as tmp:  # readable by nobody
        os.chmod(tmp, 0o755)
        cfg = Path(tmp) / "c.yml"
        cfg.write_text("refresh_interval_seconds: 0.2\n")
        cfg.chmod(0o644)
        port = free_port()
        log_path = tmp_path / "agent.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                # kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK: the
                # LimitMEMLOCK=infinity drop-in docs/security.md asks for there
                [*(["prlimit", "--memlock=unlimited:unlimited"] if kernel_version() < (5, 11) else []),
                 "setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
                 f"--inh-caps=-all,{granted}", f"--ambient-caps=-all,{granted}", f"--bounding-set=-all,{granted}",
                 CONNWATCH, "run", f"--web.listen-address=127.0.0.1:{port}", f"--config.file={cfg}"],
                stdout=log, stderr=subprocess.STDOUT)
            try:
                def scrape():
                    assert proc.poll() is None, log_path.read_text()[-3000:]
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=deadline(5)) as r:
                            return Metrics(r.read().decode())
                    except OSError:
                        return None

                wait_for(lambda: (m := scrape()) and m.value("connwatch_ready") == 1, timeout=90, what="ready")
                keep = _mask({"CAP_DAC_READ_SEARCH"} | (expected_keep() & {"CAP_BPF"}))
                st = wait_for(lambda: (s := _thread_status(proc.pid)) and all(
                    int(t["CapEff"], 16) == keep for t in s.values()) and s, timeout=5, what="the drop")
                for t in st.values():
                    assert int(t["CapPrm"], 16) == keep and int(t["CapAmb"], 16) == 0
                    assert t["NoNewPrivs"].strip() == "1"
                    assert t["Uid"].split()[0] == "65534"
                # and it still sees connections: this (root) test process accepting two
                with socket.create_server(("127.0.0.1", 0)) as listener:
                    lport = listener.getsockname()[1]
                    pairs = []
                    for _ in range(2):
                        c = socket.create_connection(("127.0.0.1", lport))
                        pairs += [c, listener.accept()[0]]
                    wait_for(lambda: (m := scrape()) and m.value("connwatch_connections", pid=os.getpid(),
                                                                  port=lport) == 2,
                             timeout=20, what="2 connections counted by the non-root agent")
                    for s in pairs:
                        s.close()
            finally:
                stop_process(proc, 10)
