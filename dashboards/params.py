"""Every alert threshold, `for:` duration, window and URL, in one place.

Like kubernetes-mixin's _config: the dashboards and the alert rules read these
values and nothing else, so tuning an alert is one edit here followed by
`make dashboards`. Ratios are fractions (0.8 = 80 %); durations are Prometheus
duration strings.

Tests build rules from a modified copy (`dataclasses.replace(DEFAULT, ...)`),
e.g. with every `for:` set to 0s for the end-to-end test.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Params:
    # Where runbooks live; each alert links to <runbook_base_url>/<slug>.md.
    runbook_base_url: str = "https://github.com/connwatch/connwatch/blob/main/docs/runbooks"
    # Selects the agent's own scrape job (the `up` series) for ConnwatchAgentDown.
    agent_job_selector: str = 'job="connwatch"'
    # Rule group name in the generated rules file.
    group_name: str = "connwatch"
    # How often Prometheus evaluates the group (empty = global evaluation_interval).
    group_interval: str = ""

    # Per-process file descriptors vs the soft RLIMIT_NOFILE.
    fd_usage_warning: float = 0.80
    fd_usage_critical: float = 0.95
    fd_usage_for: str = "5m"
    # Any EMFILE/ENFILE: the window over which a failure keeps the alert firing.
    fd_failures_window: str = "5m"
    fd_failures_for: str = "0s"
    # Projected fd exhaustion: predict_linear over `lookback`, `horizon` ahead.
    fd_exhaustion_lookback: str = "1h"
    fd_exhaustion_horizon_seconds: int = 3600
    fd_exhaustion_min_usage: float = 0.50  # ignore processes below this usage
    fd_exhaustion_for: str = "15m"

    # Accept queue: drops, fill, and backlogs the kernel silently capped.
    listen_drops_window: str = "5m"
    listen_drops_for: str = "0s"
    accept_queue_fill: float = 0.80
    accept_queue_for: str = "2m"
    backlog_capped_for: str = "15m"

    # CLOSE_WAIT: connections the peer closed and the owning process has not. A
    # healthy server closes within milliseconds of reading the EOF, so its count
    # goes up and down. One that is at least `close_wait_min_connections` and
    # no lower than `close_wait_window` earlier, for `close_wait_for`, is not
    # being closed: a code path without close(), one fd lost per departed client.
    close_wait_min_connections: int = 50
    close_wait_window: str = "15m"
    close_wait_for: str = "15m"

    # EADDRNOTAVAIL from connect()/bind().
    port_exhaustion_window: str = "5m"
    port_exhaustion_for: str = "0s"

    # System-wide limits.
    system_open_files: float = 0.80  # of fs.file-max
    system_open_files_for: str = "5m"
    conntrack: float = 0.80  # of nf_conntrack_max
    conntrack_for: str = "5m"
    ephemeral_ports: float = 0.80  # busiest destination, of ip_local_port_range
    ephemeral_ports_for: str = "5m"
    time_wait: float = 0.80  # of tcp_max_tw_buckets
    time_wait_for: str = "5m"
    # Orphans (sockets their process closed whose TCP close is not finished)
    # against tcp_max_orphans. The kernel resets an orphan once orphans * 2^shift exceed
    # the limit, shift counting "sent nothing for 2 x TCP_RTO_MAX" and "had an
    # ICMP error" (tcp_out_of_resources): a stuck orphan is reset from a quarter
    # of the limit on, hence thresholds far below 100 % (as netdata's).
    tcp_orphans_warning: float = 0.25
    tcp_orphans_critical: float = 0.50
    tcp_orphans_for: str = "5m"
    # TCP buffer memory against net.ipv4.tcp_mem (pages, host-wide). Above
    # `pressure` the kernel shrinks every socket's buffers until usage is back
    # under `min`; at `max` it refuses buffer memory and resets connections.
    tcp_memory_pressure: float = 1.0  # of tcp_mem pressure: 1.0 = the kernel is in pressure mode
    tcp_memory_pressure_for: str = "5m"
    tcp_memory_max: float = 0.90  # of tcp_mem max (critical)
    tcp_memory_max_for: str = "2m"

    # One peer holding more than this share of a port's connections.
    peer_share: float = 0.50
    peer_share_min_connections: int = 100  # ignore ports with fewer connections
    peer_share_for: str = "15m"

    # The agent itself.
    agent_down_for: str = "5m"
    probe_disabled_for: str = "10m"
    map_full_window: str = "10m"
    map_full_for: str = "0s"
    map_fill_warning: float = 0.80  # dashboard thresholds only
    map_fill_critical: float = 0.95

    # Dashboard colouring of system-limit usage above the warning thresholds.
    system_critical: float = 0.95
    # Dashboard colouring of headroom (fraction of the limit still free).
    headroom_warning: float = 0.20
    headroom_critical: float = 0.05

    def with_all_for(self, duration: str) -> "Params":
        """A copy with every `*_for` duration set to `duration` (tests)."""
        changes = {f.name: duration for f in dataclasses.fields(self) if f.name.endswith("_for")}
        return dataclasses.replace(self, **changes)


DEFAULT = Params()
