"""fds.py and the headroom source against real processes holding real fds."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from connwatch import fds
from connwatch.config import Config
from connwatch.snapshot import Snapshot
from connwatch.sources.base import Process, ProcessSeries, Scrape
from connwatch.sources.headroom import REIDENTIFY_ROUNDS, Headroom, HeadroomSource, ProcessFds
from connwatch.sources.system import System, SystemSource
from connwatch.system import read_system

HARD_LIMIT = resource.getrlimit(resource.RLIMIT_NOFILE)[1]


@contextmanager
def fd_holder(extra_fds: int, soft_limit: int | None = None) -> Iterator[tuple[int, int]]:
    """A child holding `extra_fds` more fds than it started with.

    Yields (pid, exact fd count). The child counts its own starting fds,
    dups /dev/null, reports, then sleeps until killed.
    """
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery from here on
        try:
            os.close(ready_r)
            # what the test process holds (many more fds in a VM) is not ours to count
            os.closerange(3, ready_w)
            os.closerange(ready_w + 1, HARD_LIMIT)
            limit = soft_limit or min(HARD_LIMIT, extra_fds + 64)
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, HARD_LIMIT))
            base = os.open("/dev/null", os.O_RDONLY)
            # listdir's own directory fd is open while it lists: minus one
            start = len(os.listdir("/proc/self/fd")) - 1
            for _ in range(extra_fds - 1):  # `base` is already one of them
                os.dup(base)
            os.write(ready_w, str(start + extra_fds - 1).encode() + b"\n")
            signal.pause()
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        with os.fdopen(ready_r) as ready:
            total = int(ready.readline())
        yield pid, total
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_open_fds_of_a_process_holding_15000_is_exact():
    with fd_holder(15000, soft_limit=min(HARD_LIMIT, 20000)) as (pid, total):
        assert total >= 15000
        assert fds.open_fds(pid) == total
        assert fds.open_fds(pid) == len(os.listdir(f"/proc/{pid}/fd"))
        # the directory count (kernels before 6.2) agrees with st_size
        assert fds._count_entries(f"/proc/{pid}/fd") == total
        assert fds.max_fds(pid) == min(HARD_LIMIT, 20000)


def test_max_fds_is_the_soft_limit_and_limits_give_both():
    with fd_holder(10, soft_limit=1234) as (pid, _):
        assert fds.max_fds(pid) == 1234
        assert fds.nofile_limits(pid) == (1234, HARD_LIMIT)


def test_counting_100000_fds_over_several_processes_is_exact_and_fast():
    per_process = min(HARD_LIMIT - 64, 20000)
    count = -(-100_000 // per_process)
    with _several(count, per_process) as holders:
        t0 = time.perf_counter()
        counted = {pid: fds.open_fds(pid) for pid, _ in holders}
        elapsed = time.perf_counter() - t0
        assert counted == dict(holders)
        assert sum(counted.values()) >= 100_000
        # st_size: one stat per process, not one dirent per fd (listing
        # 100,000 entries takes ~150 ms here)
        assert elapsed < 0.05, f"{elapsed:.3f}s to count {sum(counted.values())} fds"


@contextmanager
def _several(count: int, per_process: int):
    with ExitStack() as stack:
        yield [stack.enter_context(fd_holder(per_process, soft_limit=HARD_LIMIT)) for _ in range(count)]


def test_a_vanished_process_gives_none():
    with fd_holder(5) as (pid, _):
        pass  # killed and reaped on exit
    assert fds.open_fds(pid) is None
    assert fds.max_fds(pid) is None
    assert fds.nofile_limits(pid) is None


def test_parse_limits_handles_unlimited_on_a_real_limits_file():
    with open("/proc/self/limits") as f:
        text = f.read()
    assert fds.parse_limits(text) == resource.getrlimit(resource.RLIMIT_NOFILE)
    # RLIMIT_FSIZE is unlimited by default; the same parser reads it
    if resource.getrlimit(resource.RLIMIT_FSIZE) == (resource.RLIM_INFINITY, resource.RLIM_INFINITY):
        assert fds.parse_limits(text, "Max file size") == (None, None)
    assert fds.parse_limits("Max open files            unlimited            unlimited            files") == (None, None)


def test_read_headroom_skips_vanished_pids_and_reads_the_live_ones():
    with fd_holder(300, soft_limit=2000) as (pid, total):
        with fd_holder(5) as (gone, _):
            pass
        census = {u.pid: (u.open, u.limit) for u in fds.FdCensus().read()}
    assert census[pid] == (total, 2000)
    assert gone not in census
    assert os.getpid() in census
    assert read_system(with_socket_table=False).open_files_limit is not None


def _samples(metrics, name):
    return {tuple(sorted(s.labels.items())): s.value for m in metrics for s in m.samples if s.name == name}


def test_process_metrics_sum_pids_that_share_labels():
    # 11 and 12 past a series cap of 1 (13 nearest its limit keeps its own)
    nginx = Process(13, "nginx", "abc", "uid-13")
    h = Headroom((ProcessFds(Process(11, "a"), 100, 1024), ProcessFds(Process(12, "b"), 50, 2048),
                  ProcessFds(nginx, 7, 4096)), None)
    series = ProcessSeries({}, [p.process for p in h.processes], fd_usage={11: 0.0, 12: 0.0, 13: 1.0}, cap=1)
    metrics = list(HeadroomSource(Config()).families(h, Scrape(Snapshot(ready=True), series)))
    open_fds = _samples(metrics, "connwatch_process_open_fds")
    max_fds = _samples(metrics, "connwatch_process_max_fds")
    other = (("comm", "other"), ("container", ""), ("pid", ""), ("pod_uid", ""))
    nginx = (("comm", "nginx"), ("container", "abc"), ("pid", "13"), ("pod_uid", "uid-13"))
    assert open_fds == {other: 150, nginx: 7}
    assert max_fds == {other: 3072, nginx: 4096}


def system_families(s):
    return SystemSource(Config()).families(System(s, os.sysconf("SC_PAGE_SIZE")),
                                           Scrape(Snapshot(ready=True), ProcessSeries({})))


def test_system_metric_names_types_and_values():
    s = read_system()
    metrics = {m.name: m for m in system_families(s)}
    gauges = {
        "connwatch_system_open_files": s.open_files,
        "connwatch_system_open_files_limit": s.open_files_limit,
        "connwatch_system_nr_open": s.nr_open,
        "connwatch_system_ephemeral_ports": s.ephemeral_ports,
        "connwatch_system_ephemeral_ports_in_use": s.ephemeral_ports_in_use,
        "connwatch_system_ephemeral_ports_in_use_max_destination": s.port_destinations[0][1] if s.port_destinations else 0,
        "connwatch_system_tcp_time_wait": s.tcp_time_wait,
        "connwatch_system_tcp_time_wait_limit": s.tcp_time_wait_limit,
        "connwatch_system_tcp_orphans": s.tcp_orphans,
        "connwatch_system_tcp_orphans_limit": s.tcp_orphans_limit,
        "connwatch_system_tcp_memory_pages": s.tcp_memory_pages,
        "connwatch_system_page_size_bytes": os.sysconf("SC_PAGE_SIZE"),
        "connwatch_system_somaxconn": s.somaxconn,
        "connwatch_system_tcp_max_syn_backlog": s.tcp_max_syn_backlog,
    }
    if s.conntrack_entries_limit is not None:
        gauges["connwatch_system_conntrack_entries"] = s.conntrack_entries
        gauges["connwatch_system_conntrack_entries_limit"] = s.conntrack_entries_limit
    for name, value in gauges.items():
        assert metrics[name].type == "gauge", name
        assert [x.value for x in metrics[name].samples] == [value], name
    # counters: the family drops _total, the sample keeps it
    for family, value in (("connwatch_system_listen_overflows", s.listen_overflows),
                          ("connwatch_system_listen_drops", s.listen_drops)):
        assert metrics[family].type == "counter"
        assert [(x.name, x.value) for x in metrics[family].samples] == [(family + "_total", value)]
    thresholds = {x.labels["threshold"]: x.value for x in metrics["connwatch_system_tcp_memory_pages_limit"].samples}
    assert thresholds == {"min": s.tcp_memory_pages_limit.min, "pressure": s.tcp_memory_pages_limit.pressure,
                          "max": s.tcp_memory_pages_limit.max}
    # the busiest destination's address is never a label
    assert all(not x.labels for name in gauges for x in metrics[name].samples)


def test_processes_without_sockets_are_reported_past_half_their_limit(start_agent):
    """Host-wide fd headroom: with no top-N at all (fd_headroom_processes: 0),
    a process holding 90 % of a small RLIMIT_NOFILE, which owns no socket the
    BPF side could know it by, is reported exactly; one at 10 % is not."""
    agent = start_agent("fd_headroom_processes: 0\n")
    with fd_holder(180, soft_limit=200) as (near, near_total), fd_holder(20, soft_limit=1000) as (far, _):
        assert near_total / 200 >= 0.9
        m = agent.wait_for_value("connwatch_process_open_fds", near_total, pid=near)
        assert m.value("connwatch_process_max_fds", pid=near) == 200
        (series,) = m.select("connwatch_process_open_fds", pid=near)
        assert set(series.labels) == {"pid", "comm", "container", "pod_uid"}
        assert not m.select("connwatch_process_open_fds", pid=far)


def test_the_fd_census_caches_limits_and_rereads_them_near_the_limit():
    """A limit changed by prlimit is seen at once by a process past half of its
    cached limit. Any other process's limit is read again in the census after
    it was first seen (processes set their limit at start-up), then at
    doubling intervals of at most FdCensus.RECHECK_ROUNDS censuses."""
    census = fds.FdCensus()
    with fd_holder(100, soft_limit=150) as (near, near_total), fd_holder(20, soft_limit=1000) as (far, _):
        first = {u.pid: u for u in census.read()}
        assert (first[near].open, first[near].limit) == (near_total, 150)
        assert first[far].limit == 1000
        subprocess.run(["prlimit", f"--pid={far}", f"--nofile=900:{HARD_LIMIT}"], check=True)
        assert {u.pid: u for u in census.read()}[far].limit == 900  # young: read again at once
        for pid, soft in ((near, near_total + 5), (far, 500)):
            subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:{HARD_LIMIT}"], check=True)
        again = {u.pid: u for u in census.read()}
        assert again[near].limit == near_total + 5
        assert again[far].limit == 900  # cached: the next read is 2 censuses after the last
        for _ in range(fds.FdCensus.RECHECK_ROUNDS):
            later = {u.pid: u for u in census.read()}
        assert later[far].limit == 500


def test_a_reported_process_moved_to_a_container_cgroup_gets_its_label(start_agent):
    """Who a socket-less process is (comm, container, pod) is cached, and read
    again every REIDENTIFY_ROUNDS refreshes: a process moved into a Docker
    scope after it was first reported is relabelled, not stuck at the host."""
    from test_identity import CgroupSandbox, cgroup2_root

    container = "abddff03dfd7710c79a750ce3e730365cbb2c8247a974170c1062683bc3e9152"
    agent = start_agent("fd_headroom_processes: 0\n")
    # the holder exits first: the sandbox removes only empty cgroups
    with CgroupSandbox(cgroup2_root()) as cg, fd_holder(180, soft_limit=200) as (pid, total):
        agent.wait_for_value("connwatch_process_open_fds", total, pid=pid, container="")
        leaf = cg.mkdir(f"system.slice/docker-{container}.scope")
        (leaf / "cgroup.procs").write_text(str(pid))
        # 0.1 s refreshes: REIDENTIFY_ROUNDS of them, with a wide margin
        agent.wait_for_value("connwatch_process_open_fds", total, pid=pid, container=container,
                             timeout=REIDENTIFY_ROUNDS * 0.1 + 20)
