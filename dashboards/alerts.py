"""Prometheus alert rules for connwatch, built from dashboards/params.py.

`rules(params)` returns the rule file as a Python structure, `render(params)`
as YAML text (what dashboards/generate.py writes to
dashboards/alerts/connwatch.rules.yml). Metric names come from
dashboards/metrics.py only; thresholds and durations from Params only.

Every alert carries a `severity` label and `summary`, `description` (with the
value, the limit and the labels involved) and `runbook_url` annotations;
`check_rules()` enforces that and the generator refuses to write a file that
fails it.

Counters that the agent creates on the first event (fd failures, ACK drops,
EADDRNOTAVAIL) are born with a non-zero value, so `increase()` alone would
miss the very first failure. Those alerts also fire for a series that exists
now but did not exist one window ago (`x unless x offset <window>`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

from . import metrics as m
from .params import DEFAULT, Params

SEVERITIES = ("info", "warning", "critical")
REQUIRED_ANNOTATIONS = ("summary", "description", "runbook_url")

PROC = "instance, job, pid, comm, container, pod_uid"
VALUE = '{{ $value | printf "%.0f" }}'
IF_ENFILE = '{{ if eq $labels.errno "ENFILE" }}'

# Template snippets -------------------------------------------------------------

WHO = ("{{ $labels.comm }} (pid {{ $labels.pid }}"
       "{{ if $labels.container }}, container {{ $labels.container }}{{ end }})"
       " on {{ $labels.instance }}")


def q(expr: str, *labels: str, fmt: str = '"%.0f"') -> str:
    """A template snippet printing the first value of `expr` (PromQL, with %s
    placeholders filled from the alert's labels), or "unknown"."""
    args = " ".join(f"$labels.{lab}" for lab in labels)
    return (f"{{{{ with printf `{expr}` {args} | query }}}}"
            f"{{{{ . | first | value | printf {fmt} }}}}{{{{ else }}}}unknown{{{{ end }}}}")


def pct(x: float) -> str:
    return f"{x * 100:g}%"


def new_or_increased(metric: str, window: str, by: str) -> str:
    """Series whose counter rose in `window`, or appeared within it."""
    return (f"(sum by ({by}) (increase({metric}[{window}])) > 0)\n"
            f"or\n"
            f"(sum by ({by}) ({metric} unless {metric} offset {window}) > 0)")


@dataclass(frozen=True)
class Alert:
    name: str
    slug: str  # docs/runbooks/<slug>.md
    severity: str
    expr: str
    for_: str
    summary: str
    description: str


def alerts(p: Params = DEFAULT) -> list[Alert]:
    open_fds = f'{m.PROCESS_OPEN_FDS}{{instance="%s",pid="%s"}}'
    max_fds = f'{m.PROCESS_MAX_FDS}{{instance="%s",pid="%s"}}'
    backlog = f'max({m.LISTEN_BACKLOG}{{instance="%s",port="%s"}})'
    somaxconn = f'{m.SYSTEM_SOMAXCONN}{{instance="%s"}}'
    listener_somaxconn = f'max({m.LISTEN_SOMAXCONN}{{instance="%s",pid="%s",port="%s"}})'

    I = '{instance="%s"}'
    NS = '{instance="%s",netns="%s"}'
    IPP = '{instance="%s",pid="%s",port="%s"}'
    IPEER = '{instance="%s",port="%s",peer="%s"}'
    IPORT = '{instance="%s",port="%s"}'
    IMAP = '{instance="%s",map="%s"}'

    process_connections = f'sum({m.CONNECTIONS}{{instance="%s",pid="%s"}})'
    # per process, keeping whatever else identifies it (pod_uid): only the
    # per-connection dimensions are summed away
    close_wait = f"sum without (port, kind) ({m.CONNECTIONS_CLOSE_WAIT})"
    close_wait_earlier = f"sum without (port, kind) ({m.CONNECTIONS_CLOSE_WAIT} offset {p.close_wait_window})"

    def fd_usage(severity: str, threshold: float) -> Alert:
        return Alert(
            "ConnwatchProcessFdUsageHigh", "process-fd-usage-high", severity,
            f"{m.PROCESS_OPEN_FDS} / ({m.PROCESS_MAX_FDS} > 0) > {threshold:g}",
            p.fd_usage_for,
            "{{ $labels.comm }} uses {{ $value | humanizePercentage }} of its file-descriptor limit.",
            f"{WHO} has {q(open_fds, 'instance', 'pid')} file descriptors open, "
            f"{{{{ $value | humanizePercentage }}}} of its soft RLIMIT_NOFILE of {q(max_fds, 'instance', 'pid')} "
            f"(alert above {pct(threshold)}). Every connection holds one; at the limit accept() fails with "
            f"EMFILE and new clients are dropped.")

    def tcp_orphans(severity: str, threshold: float) -> Alert:
        return Alert(
            "ConnwatchTCPOrphansHigh", "tcp-orphans-high", severity,
            f"{m.SYSTEM_ORPHANS} / ({m.SYSTEM_ORPHANS_LIMIT} > 0) > {threshold:g}",
            p.tcp_orphans_for,
            "Orphaned TCP sockets of {{ $labels.instance }} reach {{ $value | humanizePercentage }} of "
            "tcp_max_orphans.",
            f"{{{{ $labels.instance }}}} has {q(m.SYSTEM_ORPHANS + I, 'instance')} orphaned TCP sockets "
            f"(closed by their process, still finishing the close with their peer), "
            f"{{{{ $value | humanizePercentage }}}} of net.ipv4.tcp_max_orphans "
            f"{q(m.SYSTEM_ORPHANS_LIMIT + I, 'instance')} (alert above {pct(threshold)}). The kernel counts an "
            f"orphan whose peer has gone silent up to 4 times against the limit and resets it when over "
            f'("too many orphaned sockets"): the peer loses the end of the data.')

    def tcp_mem(threshold: str) -> str:
        return f'{m.SYSTEM_TCP_MEMORY_LIMIT}{{instance="%s",threshold="{threshold}"}}'

    def tcp_memory(severity: str, threshold: str, share: float, for_: str, consequence: str) -> Alert:
        return Alert(
            "ConnwatchTCPMemoryHigh", "tcp-memory-high", severity,
            f"{m.SYSTEM_TCP_MEMORY}\n  / on(instance, job)\n"
            f'({m.SYSTEM_TCP_MEMORY_LIMIT}{{threshold="{threshold}"}} > 0)\n> {share:g}',
            for_,
            f"TCP buffers of {{{{ $labels.instance }}}} use {{{{ $value | humanizePercentage }}}} of "
            f"tcp_mem {threshold}.",
            f"{{{{ $labels.instance }}}} has {q(m.SYSTEM_TCP_MEMORY + I, 'instance')} pages allocated to TCP "
            f"socket buffers, {{{{ $value | humanizePercentage }}}} of net.ipv4.tcp_mem's {threshold} threshold "
            f"(alert above {pct(share)}; tcp_mem min/pressure/max: {q(tcp_mem('min'), 'instance')}/"
            f"{q(tcp_mem('pressure'), 'instance')}/{q(tcp_mem('max'), 'instance')} pages). {consequence}")

    return [
        fd_usage("warning", p.fd_usage_warning),
        fd_usage("critical", p.fd_usage_critical),
        Alert(
            "ConnwatchFdAllocationFailures", "fd-allocation-failures", "critical",
            new_or_increased(m.FD_ALLOC_FAILURES, p.fd_failures_window, f"{PROC}, errno"),
            p.fd_failures_for,
            "{{ $labels.comm }} cannot allocate file descriptors ({{ $labels.errno }}).",
            f"{WHO}: {VALUE} syscalls failed with {{{{ $labels.errno }}}} in the last "
            f"{p.fd_failures_window}. "
            f"{IF_ENFILE}ENFILE: the host reached fs.file-max "
            f"({q(m.SYSTEM_OPEN_FILES_LIMIT + I, 'instance')})."
            f"{{{{ else }}}}EMFILE: the process reached its soft RLIMIT_NOFILE "
            f"({q(max_fds, 'instance', 'pid')}).{{{{ end }}}} "
            f"Connections are being refused (accept) or requests failing (open/socket)."),
        Alert(
            "ConnwatchProcessFdExhaustionPredicted", "process-fd-exhaustion-predicted", "warning",
            f"(\n  predict_linear({m.PROCESS_OPEN_FDS}[{p.fd_exhaustion_lookback}], "
            f"{p.fd_exhaustion_horizon_seconds})\n  > {m.PROCESS_MAX_FDS}\n)\n"
            f"and\n({m.PROCESS_OPEN_FDS} / ({m.PROCESS_MAX_FDS} > 0) > {p.fd_exhaustion_min_usage:g})",
            p.fd_exhaustion_for,
            "{{ $labels.comm }} will run out of file descriptors within "
            f"{p.fd_exhaustion_horizon_seconds // 60} minutes.",
            f"{WHO} has {q(open_fds, 'instance', 'pid')} file descriptors open; at the growth rate of the "
            f"last {p.fd_exhaustion_lookback} it will need {VALUE} in "
            f"{p.fd_exhaustion_horizon_seconds // 60} minutes, above its soft RLIMIT_NOFILE of "
            f"{q(max_fds, 'instance', 'pid')}. Raise the limit or shed load before accept() fails with EMFILE."),
        Alert(
            "ConnwatchCloseWaitAccumulating", "close-wait-accumulating", "warning",
            f"(\n  {close_wait} >= {p.close_wait_min_connections}\n)\nand\n"
            f"(\n  {close_wait}\n  >= {close_wait_earlier}\n)",
            p.close_wait_for,
            "{{ $labels.comm }} does not close connections its peers closed ("
            f"{VALUE} in CLOSE_WAIT).",
            f"{WHO} holds {VALUE} connections in CLOSE_WAIT, of its "
            f"{q(process_connections, 'instance', 'pid')} open ones: "
            f"their peers closed them and the process has not (alert at {p.close_wait_min_connections} or more, "
            f"and no fewer than {p.close_wait_window} earlier). Each keeps a file descriptor until close() "
            f"({q(open_fds, 'instance', 'pid')} open of a soft RLIMIT_NOFILE of {q(max_fds, 'instance', 'pid')}): "
            f"a code path that never closes loses one per departing client until accept() fails with EMFILE."),
        Alert(
            "ConnwatchListenQueueOverflow", "listen-queue-overflow", "warning",
            f"(sum by (instance, job, port) (increase({m.LISTEN_DROPS}[{p.listen_drops_window}])) > 0)\n"
            f"or\n" + new_or_increased(m.LISTEN_OVERFLOW_DROPS, p.listen_drops_window, "instance, job, port"),
            p.listen_drops_for,
            "Port {{ $labels.port }} drops connections: its accept queue is full.",
            f"The listener on port {{{{ $labels.port }}}} of {{{{ $labels.instance }}}} dropped "
            f"{VALUE} connection attempts in the last {p.listen_drops_window} because its "
            f"accept queue was full (effective backlog {q(backlog, 'instance', 'port')}, net.core.somaxconn "
            f"{q(somaxconn, 'instance')}). Clients see SYN retransmits (1 s, 3 s, 7 s delays) or time out."),
        Alert(
            "ConnwatchAcceptQueueFilling", "accept-queue-filling", "warning",
            f"{m.LISTEN_QUEUE_LENGTH} / ({m.LISTEN_BACKLOG} > 0) > {p.accept_queue_fill:g}",
            p.accept_queue_for,
            "Accept queue of port {{ $labels.port }} is {{ $value | humanizePercentage }} full.",
            f"{WHO}: the accept queue of port {{{{ $labels.port }}}} holds "
            f"{q(m.LISTEN_QUEUE_LENGTH + IPP, 'instance', 'pid', 'port')} "
            f"connections, {{{{ $value | humanizePercentage }}}} of its effective backlog of "
            f"{q(m.LISTEN_BACKLOG + IPP, 'instance', 'pid', 'port')} "
            f"(alert above {pct(p.accept_queue_fill)}). The process is not calling accept() fast enough; "
            f"when the queue is full the kernel drops new connections."),
        Alert(
            "ConnwatchListenBacklogCapped", "listen-backlog-capped", "warning",
            # the listener's own network namespace's somaxconn (a pod's may differ from the host's)
            f"{m.LISTEN_BACKLOG_REQUESTED}\n  > {m.LISTEN_SOMAXCONN}",
            p.backlog_capped_for,
            "{{ $labels.comm }} asked for a listen backlog above net.core.somaxconn.",
            f"{WHO} called listen() on port {{{{ $labels.port }}}} with a backlog of "
            f"{VALUE}, but net.core.somaxconn of its network namespace is "
            f"{q(listener_somaxconn, 'instance', 'pid', 'port')}: the kernel "
            f"silently capped the accept queue at somaxconn. Raise net.core.somaxconn (in that namespace) to at "
            f"least the requested backlog."),
        Alert(
            "ConnwatchPortExhaustionFailures", "port-exhaustion-failures", "critical",
            new_or_increased(m.PORT_EXHAUSTION_FAILURES, p.port_exhaustion_window, f"{PROC}, syscall"),
            p.port_exhaustion_for,
            "{{ $labels.comm }} ran out of local ports (EADDRNOTAVAIL).",
            f"{WHO}: {VALUE} {{{{ $labels.syscall }}}}() calls failed with EADDRNOTAVAIL "
            f"in the last {p.port_exhaustion_window}: no free local port towards the destination "
            f"(ip_local_port_range holds {q(m.SYSTEM_EPHEMERAL_PORTS + I, 'instance')} ports)."),
        Alert(
            "ConnwatchSystemOpenFilesHigh", "system-open-files-high", "warning",
            f"{m.SYSTEM_OPEN_FILES} / ({m.SYSTEM_OPEN_FILES_LIMIT} > 0) > {p.system_open_files:g}",
            p.system_open_files_for,
            "{{ $labels.instance }} uses {{ $value | humanizePercentage }} of fs.file-max.",
            f"{{{{ $labels.instance }}}} has {q(m.SYSTEM_OPEN_FILES + I, 'instance')} file "
            f"handles allocated, {{{{ $value | humanizePercentage }}}} of fs.file-max "
            f"{q(m.SYSTEM_OPEN_FILES_LIMIT + I, 'instance')} (alert above "
            f"{pct(p.system_open_files)}). At the limit every process gets ENFILE."),
        Alert(
            "ConnwatchConntrackTableFilling", "conntrack-table-filling", "warning",
            f"{m.SYSTEM_CONNTRACK_ENTRIES} / ({m.SYSTEM_CONNTRACK_LIMIT} > 0) > {p.conntrack:g}",
            p.conntrack_for,
            "Conntrack table of {{ $labels.instance }} is {{ $value | humanizePercentage }} full.",
            f"{{{{ $labels.instance }}}} tracks {q(m.SYSTEM_CONNTRACK_ENTRIES + I, 'instance')} "
            f"connections, {{{{ $value | humanizePercentage }}}} of nf_conntrack_max "
            f"{q(m.SYSTEM_CONNTRACK_LIMIT + I, 'instance')} (alert above {pct(p.conntrack)}). "
            f'When it is full the kernel drops new packets ("nf_conntrack: table full, dropping packet").'),
        Alert(
            "ConnwatchEphemeralPortsFilling", "ephemeral-ports-filling", "warning",
            f"{m.SYSTEM_EPHEMERAL_IN_USE_MAX_DEST}\n  / on(instance, job) group_left()\n"
            f"({m.SYSTEM_EPHEMERAL_PORTS} > 0)\n> {p.ephemeral_ports:g}",
            p.ephemeral_ports_for,
            "{{ $labels.instance }} uses {{ $value | humanizePercentage }} of its ephemeral ports "
            "towards one destination.",
            f"The busiest destination of {{{{ $labels.instance }}}} holds "
            f"{q('max(' + m.SYSTEM_EPHEMERAL_IN_USE_MAX_DEST + I + ')', 'instance')} local ports, "
            f"{{{{ $value | humanizePercentage }}}} of ip_local_port_range "
            f"({q(m.SYSTEM_EPHEMERAL_PORTS + I, 'instance')} ports; alert above "
            f"{pct(p.ephemeral_ports)}). When they run out, connect() fails with EADDRNOTAVAIL."),
        Alert(
            "ConnwatchNamespaceEphemeralPortsFilling", "ephemeral-ports-filling", "warning",
            f"{m.NETNS_EPHEMERAL_IN_USE_MAX_DEST}\n  / on(instance, job, netns, pod_uid)\n"
            f"({m.NETNS_EPHEMERAL_PORT_RANGE_SIZE} > 0)\n> {p.ephemeral_ports:g}",
            p.ephemeral_ports_for,
            "Network namespace {{ $labels.netns }}{{ if $labels.pod_uid }} (pod {{ $labels.pod_uid }}){{ end }} "
            "on {{ $labels.instance }} uses {{ $value | humanizePercentage }} of its ephemeral ports towards "
            "one destination.",
            f"The busiest destination of network namespace {{{{ $labels.netns }}}}"
            f"{{{{ if $labels.pod_uid }}}} (pod {{{{ $labels.pod_uid }}}}){{{{ end }}}} on {{{{ $labels.instance }}}} "
            f"holds {q(m.NETNS_EPHEMERAL_IN_USE_MAX_DEST + NS, 'instance', 'netns')} local ports, "
            f"{{{{ $value | humanizePercentage }}}} of that namespace's ip_local_port_range "
            f"({q(m.NETNS_EPHEMERAL_PORT_RANGE_SIZE + NS, 'instance', 'netns')} ports; alert above "
            f"{pct(p.ephemeral_ports)}). When they run out, connect() in that pod fails with EADDRNOTAVAIL."),
        Alert(
            "ConnwatchTimeWaitHigh", "time-wait-high", "warning",
            f"{m.SYSTEM_TIME_WAIT} / ({m.SYSTEM_TIME_WAIT_LIMIT} > 0) > {p.time_wait:g}",
            p.time_wait_for,
            "{{ $labels.instance }} is near tcp_max_tw_buckets.",
            f"{{{{ $labels.instance }}}} has {q(m.SYSTEM_TIME_WAIT + I, 'instance')} sockets in "
            f"TIME_WAIT, {{{{ $value | humanizePercentage }}}} of net.ipv4.tcp_max_tw_buckets "
            f"{q(m.SYSTEM_TIME_WAIT_LIMIT + I, 'instance')} (alert above {pct(p.time_wait)}). "
            f'Beyond it the kernel destroys TIME_WAIT sockets early ("time wait bucket table overflow").'),
        tcp_orphans("warning", p.tcp_orphans_warning),
        tcp_orphans("critical", p.tcp_orphans_critical),
        tcp_memory("warning", "pressure", p.tcp_memory_pressure, p.tcp_memory_pressure_for,
                   "The kernel is in memory-pressure mode: it shrinks every socket's buffers until usage is back "
                   "under min, so each connection's throughput drops."),
        tcp_memory("critical", "max", p.tcp_memory_max, p.tcp_memory_max_for,
                   "At max the kernel refuses buffer memory: sends and receives stall and orphans are reset "
                   '("out of memory -- consider tuning tcp_mem").'),
        Alert(
            "ConnwatchPeerConnectionShareHigh", "peer-connection-share-high", "warning",
            f"(\n  {m.PEER_CONNECTIONS}\n  / on(instance, job, port) group_left()\n"
            f"  sum by (instance, job, port) ({m.CONNECTIONS})\n) > {p.peer_share:g}\n"
            f"and on(instance, job, port)\n"
            f"sum by (instance, job, port) ({m.CONNECTIONS}) >= {p.peer_share_min_connections}",
            p.peer_share_for,
            "Peer {{ $labels.peer }} holds {{ $value | humanizePercentage }} of the connections on port "
            "{{ $labels.port }}.",
            f"Peer {{{{ $labels.peer }}}} holds "
            f"{q(m.PEER_CONNECTIONS + IPEER, 'instance', 'port', 'peer')} "
            f"of the {q('sum(' + m.CONNECTIONS + IPORT + ')', 'instance', 'port')} "
            f"connections on port {{{{ $labels.port }}}} of {{{{ $labels.instance }}}} "
            f"({{{{ $value | humanizePercentage }}}}, alert above {pct(p.peer_share)}). One client, or a NAT or "
            f"proxy in front of many, can exhaust a per-IP cap or the fd limit: look for a reconnect loop and "
            f"check the application's per-IP limit."),
        Alert(
            "ConnwatchAgentDown", "agent-down", "critical",
            f"{m.UP}{{{p.agent_job_selector}}} == 0",
            p.agent_down_for,
            "connwatch agent on {{ $labels.instance }} is down.",
            f"Prometheus could not scrape the connwatch agent at {{{{ $labels.instance }}}} (job "
            f"{{{{ $labels.job }}}}) for {p.agent_down_for}: up is {{{{ $value }}}}. No connection, fd or "
            f"backlog alert can fire for this host while it is down."),
        Alert(
            "ConnwatchProbeDisabled", "probe-disabled", "warning",
            f"{m.PROBE_ENABLED} == 0",
            p.probe_disabled_for,
            "connwatch probe {{ $labels.probe }} is disabled on {{ $labels.instance }}.",
            "The kernel of {{ $labels.instance }} refused connwatch's {{ $labels.probe }} probe "
            "(connwatch_probe_enabled is {{ $value }}): the metrics it feeds are missing or zero. "
            "The agent log names the reason."),
        Alert(
            "ConnwatchBPFMapFull", "bpf-map-full", "warning",
            f"increase({m.BPF_MAP_FULL}[{p.map_full_window}]) > 0",
            p.map_full_for,
            "connwatch BPF map {{ $labels.map }} is full on {{ $labels.instance }}.",
            f"The {{{{ $labels.map }}}} map of the connwatch agent on {{{{ $labels.instance }}}} holds "
            f"{q(m.BPF_MAP_ENTRIES + IMAP, 'instance', 'map')} of "
            f"{q(m.BPF_MAP_CAPACITY + IMAP, 'instance', 'map')} entries and "
            f"{VALUE} updates were dropped in the last {p.map_full_window}: connwatch "
            f"undercounts. Raise maps.{{{{ $labels.map }}}} in the agent's config file."),
    ]


def rules(p: Params = DEFAULT) -> dict:
    group: dict = {"name": p.group_name}
    if p.group_interval:
        group["interval"] = p.group_interval
    group["rules"] = [
        {
            "alert": a.name,
            "expr": a.expr,
            "for": a.for_,
            "labels": {"severity": a.severity},
            "annotations": {
                "summary": a.summary,
                "description": a.description,
                "runbook_url": f"{p.runbook_base_url.rstrip('/')}/{a.slug}.md",
            },
        }
        for a in alerts(p)
    ]
    return {"groups": [group]}


def check_rules(doc: dict) -> list[str]:
    """Problems that make a rule file unfit to ship (empty list = fine)."""
    problems = []
    groups = doc.get("groups") if isinstance(doc, dict) else None
    if not groups:
        return ["no rule groups"]
    for g in groups:
        for r in g.get("rules") or []:
            if "alert" not in r:
                continue
            name = r["alert"]
            labels = r.get("labels") or {}
            ann = r.get("annotations") or {}
            if labels.get("severity") not in SEVERITIES:
                problems.append(f"{name}: severity label missing or not one of {SEVERITIES}")
            for key in REQUIRED_ANNOTATIONS:
                if not str(ann.get(key, "")).strip():
                    problems.append(f"{name}: annotation {key} missing")
            if "{{" not in str(ann.get("description", "")):
                problems.append(f"{name}: description has no templated numbers/labels")
            if not re.fullmatch(r"https?://\S+/[a-z0-9-]+\.md", str(ann.get("runbook_url", ""))):
                problems.append(f"{name}: runbook_url is not a link to a runbook .md file")
    return problems


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper, data: str):
    """Multi-line expressions as literal blocks, long annotations folded (no quote escaping)."""
    style = "|" if "\n" in data else ">" if len(data) > 80 else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)

HEADER = ("# Generated by `python -m dashboards.generate` from dashboards/alerts.py and\n"
          "# dashboards/params.py. Do not edit: change the parameters and regenerate.\n")


def render(p: Params = DEFAULT) -> str:
    doc = rules(p)
    problems = check_rules(doc)
    if problems:
        raise ValueError("invalid alert rules:\n  " + "\n  ".join(problems))
    text = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
    assert yaml.safe_load(text) == doc, "YAML rendering changed a rule"
    return HEADER + text
