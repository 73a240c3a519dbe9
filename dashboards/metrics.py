"""Every metric name the dashboards and alert rules use, in one place.

This is the contract with the agent (docs/metrics.md): queries are written
against these constants only, so a rename is one edit here. CONTRACT is the
full list of names a query may reference; tests/test_dashboards.py and
tests/test_alerts.py check every query against it.
"""

# --- agent core (issue 2) -----------------------------------------------------
CONNECTIONS = "connwatch_connections"  # {pid,comm,container,port,kind}
CONNECTIONS_CLOSE_WAIT = "connwatch_connections_close_wait"  # {pid,comm,container,port,kind} of those, CLOSE_WAIT
ACCEPTED = "connwatch_connections_accepted_total"  # {pid,comm,container,port}
CLOSED = "connwatch_connections_closed_total"  # {pid,comm,container,port}
FD_ALLOC_FAILURES = "connwatch_fd_alloc_failures_total"  # {pid,comm,container,syscall,errno}
PORT_EXHAUSTION_FAILURES = "connwatch_port_exhaustion_failures_total"  # {pid,comm,container,syscall}
LISTEN_BACKLOG_REQUESTED = "connwatch_listen_backlog_requested"  # {pid,comm,container,port}
LISTEN_OVERFLOW_DROPS = "connwatch_listen_overflow_drops_total"  # {port}
BPF_MAP_ENTRIES = "connwatch_bpf_map_entries"  # {map}
BPF_MAP_CAPACITY = "connwatch_bpf_map_capacity"  # {map}
BPF_MAP_FULL = "connwatch_bpf_map_full_total"  # {map}
BPF_MAP_MEMORY = "connwatch_bpf_map_memory_bytes"  # {map}
PROBE_ENABLED = "connwatch_probe_enabled"  # {probe}
BUILD_INFO = "connwatch_build_info"  # {version,kernel}
READY = "connwatch_ready"
SCRAPE_DURATION = "connwatch_scrape_duration_seconds"
SNAPSHOT_DURATION = "connwatch_snapshot_duration_seconds"
SNAPSHOT_TIMESTAMP = "connwatch_snapshot_timestamp_seconds"
BPF_PROGRAM_RUN_SECONDS = "connwatch_bpf_program_run_seconds_total"  # {program}
BPF_PROGRAM_RUNS = "connwatch_bpf_program_runs_total"  # {program}

# --- WebSocket awareness (issue 3) --------------------------------------------
WEBSOCKET_UPGRADES = "connwatch_websocket_upgrades_total"  # {pid,comm,container,port,status}
CONNECTION_DURATION = "connwatch_connection_duration_seconds"  # histogram {port,kind}
CONNECTION_DURATION_BUCKET = CONNECTION_DURATION + "_bucket"
CONNECTION_DURATION_SUM = CONNECTION_DURATION + "_sum"
CONNECTION_DURATION_COUNT = CONNECTION_DURATION + "_count"
PEER_CONNECTIONS = "connwatch_peer_connections"  # {port,peer}
PEERS = "connwatch_peers"  # {port}
PEER_CONNECTIONS_MAX = "connwatch_peer_connections_max"  # {port}

# --- listeners (issue 4) ------------------------------------------------------
LISTEN_QUEUE_LENGTH = "connwatch_listen_queue_length"  # {pid,comm,container,port}
LISTEN_BACKLOG = "connwatch_listen_backlog"  # {pid,comm,container,port} effective
LISTEN_DROPS = "connwatch_listen_drops_total"  # {pid,comm,container,port} sk_drops

# --- headroom (issue 4) -------------------------------------------------------
PROCESS_OPEN_FDS = "connwatch_process_open_fds"  # {pid,comm,container}
PROCESS_MAX_FDS = "connwatch_process_max_fds"  # {pid,comm,container} soft RLIMIT_NOFILE
SYSTEM_OPEN_FILES = "connwatch_system_open_files"
SYSTEM_OPEN_FILES_LIMIT = "connwatch_system_open_files_limit"  # fs.file-max
SYSTEM_NR_OPEN = "connwatch_system_nr_open"  # fs.nr_open
SYSTEM_CONNTRACK_ENTRIES = "connwatch_system_conntrack_entries"
SYSTEM_CONNTRACK_LIMIT = "connwatch_system_conntrack_entries_limit"
SYSTEM_EPHEMERAL_PORTS = "connwatch_system_ephemeral_ports"  # size of ip_local_port_range
SYSTEM_EPHEMERAL_IN_USE = "connwatch_system_ephemeral_ports_in_use"
SYSTEM_EPHEMERAL_IN_USE_MAX_DEST = "connwatch_system_ephemeral_ports_in_use_max_destination"
SYSTEM_TIME_WAIT = "connwatch_system_tcp_time_wait"
SYSTEM_TIME_WAIT_LIMIT = "connwatch_system_tcp_time_wait_limit"  # tcp_max_tw_buckets
SYSTEM_ORPHANS = "connwatch_system_tcp_orphans"
SYSTEM_ORPHANS_LIMIT = "connwatch_system_tcp_orphans_limit"
SYSTEM_TCP_MEMORY = "connwatch_system_tcp_memory_pages"
SYSTEM_TCP_MEMORY_LIMIT = "connwatch_system_tcp_memory_pages_limit"  # {threshold=min|pressure|max}
SYSTEM_PAGE_SIZE = "connwatch_system_page_size_bytes"  # turns *_pages into bytes
SYSTEM_SOMAXCONN = "connwatch_system_somaxconn"
SYSTEM_TCP_MAX_SYN_BACKLOG = "connwatch_system_tcp_max_syn_backlog"
SYSTEM_LISTEN_OVERFLOWS = "connwatch_system_listen_overflows_total"
SYSTEM_LISTEN_DROPS = "connwatch_system_listen_drops_total"

# --- Prometheus itself --------------------------------------------------------
UP = "up"

CONTRACT: frozenset[str] = frozenset(
    v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str)
)


# --- which metrics does a PromQL expression read? ---------------------------------

import re as _re  # noqa: E402

_KEYWORDS = frozenset("""
    sum min max avg count stddev stdvar topk bottomk quantile count_values group
    by without on ignoring group_left group_right bool and or unless offset
    inf nan
""".split())
_STRINGS = _re.compile(r'"(?:[^"\\]|\\.)*"|`[^`]*`|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = _re.compile(r"\{[^{}]*\}")
_RANGES = _re.compile(r"\[[^\]]*\]")
_LABEL_LISTS = _re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLES = _re.compile(r"\$\{?\w+\}?")
_DURATION_OR_NUMBER = _re.compile(r"\b\d[\w.]*")
_IDENT = _re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def referenced(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords and labels removed).

    Grafana's `label_values(metric, label)` template queries are understood too.
    """
    lv = _re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", expr, _re.S)
    if lv:
        expr = lv.group(1)
    s = _STRINGS.sub(" ", expr)
    s = _MATCHERS.sub(" ", s)
    s = _RANGES.sub(" ", s)
    s = _LABEL_LISTS.sub(" ", s)
    s = _VARIABLES.sub(" ", s)
    s = _DURATION_OR_NUMBER.sub(" ", s)
    names = set()
    for match in _IDENT.finditer(s):
        word, rest = match.group(0), s[match.end():].lstrip()
        if rest.startswith("(") or word in _KEYWORDS:
            continue  # a function call or an operator keyword
        names.add(word)
    return names
