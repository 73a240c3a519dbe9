"""Agent health: is connwatch up, are its probes attached, are its maps big enough."""

from dashboards import metrics as m
from dashboards.common import INSTANCE, Layout, make_dashboard, instance_var, sel, stat, target, timeseries
from dashboards.params import DEFAULT, Params

RATE = "[$__rate_interval]"


def _map(value: str, text: str, color: str) -> dict:
    return {"type": "value", "options": {value: {"text": text, "color": color, "index": int(value)}}}


def build(p: Params = DEFAULT):
    up_down = [_map("1", "UP", "green"), _map("0", "DOWN", "red")]
    lay = Layout()
    lay.row("Agent")
    lay.add(stat("Agent up", "Prometheus's `up` for the connwatch scrape job.",
                 [target(sel(m.UP, p.agent_job_selector, INSTANCE), "{{instance}}")], "none",
                 thresholds=[(None, "red"), (1, "green")], mappings=up_down, graph=False), w=6, h=5)
    lay.add(stat("Ready", "1 once the probes are attached and a first snapshot was read.",
                 [target(sel(m.READY, INSTANCE), "{{instance}}")], "none",
                 thresholds=[(None, "red"), (1, "green")], mappings=up_down, graph=False), w=6, h=5)
    lay.add(stat("Snapshot age", "Seconds since the agent last read its BPF maps.",
                 [target(f"time() - {sel(m.SNAPSHOT_TIMESTAMP, INSTANCE)}", "{{instance}}")], "s",
                 thresholds=[(None, "green"), (10, "orange"), (60, "red")]), w=6, h=5)
    lay.add(stat("Version", "connwatch version and kernel of each agent.",
                 [target(f"count by (version, kernel) ({sel(m.BUILD_INFO, INSTANCE)})",
                         "{{version}} on {{kernel}}")], "short", graph=False), w=6, h=5)
    lay.add(stat(
        "Probes enabled", "1 = attached, 0 = the kernel refused this probe (its metrics are missing).",
        [target(sel(m.PROBE_ENABLED, INSTANCE), "{{probe}}")], "none",
        thresholds=[(None, "red"), (1, "green")],
        mappings=[_map("1", "enabled", "green"), _map("0", "disabled", "red")], graph=False), w=24, h=5)

    lay.row("BPF maps")
    lay.add(timeseries(
        "Map fill", f"Entries / max_entries per BPF map; updates are dropped at 100 % "
        f"(thresholds {p.map_fill_warning:.0%} / {p.map_fill_critical:.0%}).",
        [target(f"{sel(m.BPF_MAP_ENTRIES, INSTANCE)} / ({sel(m.BPF_MAP_CAPACITY, INSTANCE)} > 0)",
                "{{instance}} {{map}}")], "percentunit",
        thresholds=[(None, "green"), (p.map_fill_warning, "orange"), (p.map_fill_critical, "red")], max_=1), w=8)
    lay.add(timeseries(
        "Map-full drops", "Updates dropped per second because a map was full: connwatch undercounts.",
        [target(f"rate({sel(m.BPF_MAP_FULL, INSTANCE)}{RATE})", "{{instance}} {{map}}")], "ops",
        thresholds=[(None, "green"), (0.001, "red")]), w=8)
    lay.add(timeseries(
        "Map memory", "Kernel memory charged to each BPF map.",
        [target(sel(m.BPF_MAP_MEMORY, INSTANCE), "{{instance}} {{map}}")], "bytes", stack=True), w=8)

    lay.row("BPF programs and scrapes")
    lay.add(timeseries(
        "BPF program CPU", "Share of one CPU spent in each BPF program (needs kernel.bpf_stats_enabled=1).",
        [target(f"rate({sel(m.BPF_PROGRAM_RUN_SECONDS, INSTANCE)}{RATE})", "{{instance}} {{program}}")],
        "percentunit"), w=8)
    lay.add(timeseries(
        "BPF program runs", "Program invocations per second (needs kernel.bpf_stats_enabled=1).",
        [target(f"rate({sel(m.BPF_PROGRAM_RUNS, INSTANCE)}{RATE})", "{{instance}} {{program}}")], "ops"), w=8)
    lay.add(timeseries(
        "Average run time per event", "BPF time per program invocation.",
        [target(f"rate({sel(m.BPF_PROGRAM_RUN_SECONDS, INSTANCE)}{RATE}) / "
                f"rate({sel(m.BPF_PROGRAM_RUNS, INSTANCE)}{RATE})", "{{instance}} {{program}}")], "s"), w=8)
    lay.add(timeseries(
        "Scrape and snapshot duration", "Time to serve /metrics and to read the BPF maps.",
        [target(sel(m.SCRAPE_DURATION, INSTANCE), "{{instance}} scrape"),
         target(sel(m.SNAPSHOT_DURATION, INSTANCE), "{{instance}} snapshot")], "s"), w=24)

    return make_dashboard(
        "connwatch-agent", "connwatch / Agent health",
        "The connwatch agent itself: scrape status, probes, BPF map fill and program cost.",
        lay, [instance_var()])


dashboard = build()
