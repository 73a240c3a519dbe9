"""The results table: (benchmark, measurement, result, target) rows, printed
and written as Markdown (build/bench/results.md), with the targets of
issues 12 and 16 marked MET or MISSED."""

from __future__ import annotations

import sys

Row = tuple[str, str, str, str]

# issue 12 and issue 16 targets
CHURN_MIN_RATIO = 0.97
GETPPID_MAX_RATIO = 1.05
WS_MIN_RATIO = 0.99
SEND_RECV_MAX_NS = 30
ACCEPT_MAX_NS = 300
IDLE_CPU_MAX = {10000: 0.005, 100000: 0.02}
RSS_MAX_BYTES = 100e6
SCRAPE_MAX_SECONDS = 0.1
# the agent conditions: (name, label, whether issue 12's target applies)
AGENTS = (("agent", "default agent", True), ("agent_always", "agent, syscall_tracing: always", False))


def _mark(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def _against(floor: float, limit: float, goal: str) -> str:
    """Where a floor lies against a goal: one below it cannot be met on those hooks."""
    return f"{'above' if floor > limit else 'below'} {goal}"


def _span(s: dict, fmt: str = ".3f") -> str:
    """median [min .. max]"""
    return f"{s['median']:{fmt}} [{s['min']:{fmt}} .. {s['max']:{fmt}}]"


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x >= 0.001 else f"{x * 1e6:.0f} us"


def _noise_rows(res: dict) -> list[Row]:
    rows = []
    start = res.get("noise_at_start")
    if start and start.get("summary") != "nothing":
        rows.append(("NOISE", "present at the start (run with --allow-noise): every number below is contaminated",
                     start["summary"], ""))
    during = res.get("noise_during_run")
    if during and during.get("summary") != "nothing":
        rows.append(("NOISE", "foreign programs on measured hooks still there before some phases",
                     during["summary"], ""))
    return rows


def _agent_warnings(bench: str, name: str, r: dict, on_demand: bool) -> list[Row]:
    """The default agent (on demand) must have measured with its syscall hook
    disarmed; any agent must have survived the load."""
    rows = []
    if on_demand and r.get("hook_armed_phases"):
        rows.append((bench, f"WARNING: {name}: syscall hook armed in {r['hook_armed_phases']} phase(s), "
                     "not the state measured", "; ".join(r.get("arm_reasons", [])), ""))
    if r.get("agent_alive_after_load") and not all(r["agent_alive_after_load"]):
        rows.append((bench, f"WARNING: {name}: agent died during the load", "", ""))
    return rows


def _aa_row(bench: str, a: dict | None) -> list[Row]:
    """The A/A control: nothing vs nothing, the spread a ratio gets from the machine alone."""
    if not a:
        return []
    return [(bench, f"ratio nothing / nothing (A/A control, {a['ratio']['n']} paired rounds): the machine's own spread",
             _span(a["ratio"]), "")]


def _churn_rows(bench: str, r: dict) -> list[Row]:
    rows = [(bench, "conn/s, nothing attached (median [min..max])", _span(r["rate"]["none"], ".0f"), "")]
    rows += _aa_row(bench, r.get("none_again"))
    for name, label, target in AGENTS:
        if name not in r:
            continue
        a = r[name]
        n = a["ratio"]["n"]
        rows.append((bench, f"conn/s, {label}", _span(r["rate"][name], ".0f"), ""))
        goal = f">= {CHURN_MIN_RATIO}: {_mark(a['ratio']['median'] >= CHURN_MIN_RATIO)}" if target else "reference"
        rows.append((bench, f"ratio {label} / nothing ({n} paired rounds)", _span(a["ratio"]), goal))
        rows.append((bench, f"CPU per connection (whole machine), {label} / nothing", _span(a["cpu_ratio"]), ""))
        rows.append((bench, f"generator CPU per connection, {label} / nothing", _span(a["gen_cpu_ratio"]), ""))
        rows.append((bench, f"agent process CPU, {label} (cores)", _span(a["agent_cpu_cores"]), ""))
        rows += _agent_warnings(bench, label, a, name == "agent")
    return rows


def _syscall_rows(r: dict) -> list[Row]:
    rows = []
    labels = r["rounds"]["conditions"]
    for mode in ("getppid", "pipe"):
        m = r[mode]
        base = m["none"]
        rows.append(("2 syscall", f"{m['label']}: CPU ns/iteration, nothing attached",
                     f"{base['cpu_ns']['median']:.0f} (wall {base['wall_ns']['median']:.0f})", ""))
        for c in ("agent", "agent_always", "empty_sys_exit"):
            s = m[c]["slowdown"]
            target = ""
            if c == "agent" and mode == "getppid":
                target = f"<= {GETPPID_MAX_RATIO}: {_mark(s['median'] <= GETPPID_MAX_RATIO)}"
            wall = m[c]["wall_slowdown"]["median"]
            rows.append(("2 syscall", f"{m['label']}: {labels[c]}: CPU time / nothing",
                         f"{m[c]['cpu_ns']['median']:.0f} ns, x{_span(s)} (wall x{wall:.3f})", target))
        oc = base["other_cpu_cores"]
        rows.append(("2 syscall", f"{m['label']}: other load on the machine during baselines (cores)",
                     _span(oc, ".2f"), ""))
    for c, a in r.get("agents", {}).items():
        rows += _agent_warnings("2 syscall", labels[c], a, c == "agent")
    return rows


def _ws_rows(r: dict) -> list[Row]:
    rows = []
    for name in ("node", "python"):
        if name not in r:
            continue
        s = r[name]
        b = f"1 ws {name}"
        load = f"{s['label']} echo, {r['connections']} conns x {r['message_bytes']} B"
        rows.append((b, f"{load}: msgs/s, nothing attached", _span(s["none"]["rate"], ".0f"), ""))
        rows += _aa_row(b, s.get("none_again"))
        for c, label, target in AGENTS:
            a = s[c]
            rows.append((b, f"msgs/s, {label}", _span(a["rate"], ".0f"), ""))
            goal = f">= {WS_MIN_RATIO}: {_mark(a['ratio']['median'] >= WS_MIN_RATIO)}" if target else "reference"
            rows.append((b, f"ratio {label} / nothing ({a['ratio']['n']} paired rounds)", _span(a["ratio"]), goal))
            rows.append((b, f"server CPU per message, {label} / nothing", _span(a["server_cpu_ratio"]), ""))
            rows += _agent_warnings(b, label, a, c == "agent")
        rows.append((b, "server CPU (cores; ~1 = saturated, the bottleneck)",
                     _span(s["none"]["server_cores"], ".2f"), ""))
        gen = s["generator_max_cores"]
        rows.append((b, "load generator CPU, highest phase (cores)", f"{gen:.2f}",
                     "headroom OK" if gen < 0.9 else "WARNING: generator may limit the rate"))
        bpf = s.get("bpf")
        if not bpf:
            continue
        b = f"1 ws {name} bpf_stats"
        for c, label in (("agent", "default agent"), ("agent_always", "agent, syscall_tracing: always")):
            rows.append((b, f"BPF ns per echoed message, {label} (all its programs)",
                         _span(bpf[c]["bpf_ns_per_msg"], ".0f"), ""))
        for c, who in (("agent", "agent"), ("agent_always", "agent always"), ("empty_send_recv", "empty")):
            for prog, p in bpf[c]["programs"].items():
                if c == "agent_always" and prog != "sys_exit":
                    continue  # the rest is the default agent's
                rows.append((b, f"{who}: {prog}", f"{p['ns_per_run']:.0f} ns/run x {p['runs_per_msg']:.2f} runs/msg "
                             f"= {p['ns_per_msg']:.0f} ns/msg", ""))
        for prog, x in bpf.get("excess_ns_per_run", {}).items():
            if not x["n"]:
                continue
            raw = bpf["agent"]["programs"][prog]["ns_per_run"]
            rows.append((b, f"{prog} per send/recv after classification: raw ns/run; over its empty twin",
                         f"{raw:.0f}; {_span(x, '.0f')}",
                         f"<= {SEND_RECV_MAX_NS} ns over empty: {_mark(x['median'] <= SEND_RECV_MAX_NS)}"))
        a_runs = bpf["agent"]["programs"].get("sock_send", {}).get("runs_per_msg")
        e_runs = bpf["empty_send_recv"]["programs"].get("bench_empty_send", {}).get("runs_per_msg")
        if a_runs and e_runs and abs(a_runs / e_runs - 1) > 0.05:
            # the same load fires the same tracepoints: a difference is someone else's traffic
            rows.append((b, "WARNING: sock_send_length runs per message differ, agent vs empty pair",
                         f"{a_runs:.2f} vs {e_runs:.2f}: other traffic on the host", ""))
        for c in ("agent", "agent_always"):
            if bpf[c].get("exported_missing"):
                rows.append((b, f"WARNING: {c}: connwatch_bpf_program_runs_total short of the kernel's count",
                             ", ".join(bpf[c]["exported_missing"]), ""))
        if bpf["agent"].get("hook_armed_phases"):
            rows.append((b, "WARNING: default agent's syscall hook armed during the bpf_stats phase", "", ""))
        acc = s.get("cpu_accounting")
        if acc:
            budget = 1 - WS_MIN_RATIO
            rows.append((b, "the floor: an empty send+recv pair on the server's end per echo / the server's CPU "
                         "per echo, nothing attached",
                         f"{acc['floor_server_ns_per_msg']:.0f} ns / {acc['server_cpu_ns_per_msg']:.0f} ns = "
                         f"{acc['floor_share']:.2%}",
                         _against(acc["floor_share"], budget, f"the {budget:.0%} the goal allows")))
            rows.append((b, "by CPU accounting: the default agent's send/recv BPF ns on the server's end per echo, "
                         "and the ratio they leave",
                         f"{acc['agent_server_ns_per_msg']:.0f} ns = {acc['agent_share']:.2%}; "
                         f"ratio {acc['cpu_accounted_ratio']:.4f}", ""))
    return rows


def _accept_rows(r: dict, bench: str = "3 accept", target: bool = True) -> list[Row]:
    rows = []
    o = r["open"]
    raw, work = o["raw_ns_per_conn"], o["over_empty_ns_per_conn"]
    rows.append((bench, f"BPF ns per accepted connection, all agent programs in the open step "
                 f"({r['conns_per_step']} conns x {raw['n']} rounds)", _span(raw, ".0f"),
                 f"<= {ACCEPT_MAX_NS}: {_mark(raw['median'] <= ACCEPT_MAX_NS)}" if target else ""))
    rows.append((bench, "the same minus the empty twins' floor on those hooks (connwatch's own work)",
                 _span(work, ".0f"), ""))
    floor, server_floor = o.get("floor_ns_per_conn"), o.get("server_end_floor_ns_per_conn")
    if floor and floor["n"]:
        # what any program on these hooks costs, doing nothing: a goal below it
        # cannot be met with these hooks, whatever the code does
        rows.append((bench, "the floor: the empty twins alone, at the agent's runs (both ends of the loopback "
                     "connections)", _span(floor, ".0f"),
                     _against(floor["median"], ACCEPT_MAX_NS, f"the {ACCEPT_MAX_NS} ns goal") if target else ""))
        rows.append((bench, "the floor of the server's end alone (its child socket's 2 state changes, "
                     "its accept or first read)", _span(server_floor, ".0f"),
                     _against(server_floor["median"], ACCEPT_MAX_NS, f"the {ACCEPT_MAX_NS} ns goal")
                     if target else ""))
    for prog, p in o["agent"].items():
        rows.append((bench, f"agent {prog} (open step)", f"{p['runs_per_conn']:.2f} runs/conn x "
                     f"{p['ns_per_run']:.0f} ns = {p['ns_per_conn']['median']:.0f} ns/conn", ""))
    for prog, p in o["empty"].items():
        rows.append((bench, f"empty {prog} (open step)",
                     f"{p['runs_per_conn']:.2f} runs/conn x {p['ns_per_run']:.0f} ns", ""))
    a_runs = o["agent"].get("sock_state", o["agent"].get("accept_fexit", {})).get("runs_per_conn")
    e_runs = o["empty"].get("bench_empty_state", {}).get("runs_per_conn")
    if a_runs and e_runs and abs(a_runs / e_runs - 1) > 0.05:
        # the same steps fire the same tracepoints: a difference is someone else's traffic
        rows.append((bench, "WARNING: inet_sock_set_state runs per connection differ, agent vs empty twins",
                     f"{a_runs:.2f} vs {e_runs:.2f}: other traffic on the host during the steps", ""))
    c = r["close"]
    rows.append((bench, "close path for comparison: BPF ns per connection, raw / over empty twins",
                 f"{c['raw_ns_per_conn']['median']:.0f} / {c['over_empty_ns_per_conn']['median']:.0f} ns", ""))
    if r.get("hook_armed_phases"):
        rows.append((bench, "WARNING: syscall hook armed during some phases", "", ""))
    return rows


def _accept_vm_rows(r: dict) -> list[Row]:
    b = f"3 accept VM {r.get('kernel', '')} (EMULATED)"
    if "skipped" in r:
        return [(b, "skipped", r["skipped"], "")]
    rows = []
    agent, empty = r["open"]["agent"], r["open"]["empty"]
    fx, ef = agent.get("accept_fexit"), empty.get("bench_empty_accept")
    if fx:
        rows.append((b, "accept_fexit ns/run (TCG-emulated guest: relative numbers only)",
                     f"{fx['ns_per_run']:.0f} ns x {fx['runs_per_conn']:.2f} runs/conn", ""))
    if fx and ef:
        a, e = fx["ns_per_run"], ef["ns_per_run"]
        rows.append((b, "accept_fexit / its empty fexit twin (ns/run)", f"{a:.0f} / {e:.0f} = x{a / e:.2f}", ""))
    for prog in ("sock_state", "sock_state_nested", "sendmsg_fentry", "recvmsg_fexit"):
        if prog in agent:
            rows.append((b, f"{prog} ns/run in the same guest", f"{agent[prog]['ns_per_run']:.0f} ns "
                         f"x {agent[prog]['runs_per_conn']:.2f} runs/conn", ""))
    raw, work = r["open"]["raw_ns_per_conn"]["median"], r["open"]["over_empty_ns_per_conn"]["median"]
    rows.append((b, "all agent programs per accepted connection, raw / over empty twins (emulated ns)",
                 f"{raw:.0f} / {work:.0f}", ""))
    return rows


def _scale_rows(r: dict) -> list[Row]:
    rows = []
    for lv in r.get("connections", {}).get("levels", []):
        n = lv["connections"]
        b = f"4/5 scale {n} conns"
        idle = lv["idle_cpu_fraction"]
        cap = IDLE_CPU_MAX.get(n)
        rc = lv.get("socket_table_recount")
        if rc:  # the target's measure includes the amortized recount
            total = lv["idle_cpu_with_recount_fraction"]
            rows.append((b, "agent CPU, nobody scraping: refreshes + socket-table recount amortized",
                         f"{idle * 100:.2f}% + {rc['cpu_fraction'] * 100:.2f}% ({_ms(rc['cpu_seconds_per_recount'])} "
                         f"every {rc['interval_seconds']:g} s) = {total * 100:.2f}% of a core",
                         f"<= {cap * 100:g}%: {_mark(total <= cap)}" if cap else ""))
        else:
            rows.append((b, "agent CPU, nobody scraping", f"{idle * 100:.2f}% of a core",
                         f"<= {cap * 100:g}%: {_mark(idle <= cap)}" if cap else ""))
        rows.append((b, "refresh (snapshot build) median [min..max]",
                     _span(lv["snapshot_build_seconds"], ".4f") + " s", ""))
        sc = lv["scrape_seconds"]
        rows.append((b, "scrape /metrics median / p99", f"{_ms(sc['median'])} / {_ms(sc['p99'])}",
                     f"< 100 ms: {_mark(sc['p99'] < SCRAPE_MAX_SECONDS)}" if n >= 100000 else ""))
        rss = lv["agent_memory"]
        rows.append((b, "agent RSS (peak)", f"{rss['VmRSS'] / 2**20:.1f} MiB ({rss['VmHWM'] / 2**20:.1f} MiB)",
                     f"< 100 MB: {_mark(rss['VmHWM'] < RSS_MAX_BYTES)}" if n >= 100000 else ""))
        rows.append((b, "agent CPU per scrape", _ms(lv["agent_cpu_seconds_per_scrape"]), ""))
        rows.append((b, "BPF map memory (all maps)", f"{lv['bpf_map_memory_bytes'] / 2**20:.1f} MiB", ""))
        if lv.get("hook_armed"):
            rows.append((b, "WARNING: syscall hook armed, not the state measured", lv.get("arm_reason", ""), ""))
        if lv.get("refresh_failure"):
            rows.append((b, "WARNING: the agent's refreshes fail", lv["refresh_failure"], ""))
        pu = lv.get("port_use_cpu_seconds")
        if pu:
            counted = ", ".join(f"{method} {_ms(v)}" for method, v in pu["agent"].items()) or "none yet"
            rows.append((b, "ephemeral-port count, CPU per recount: agent / sock_diag filtered to the range",
                         f"{counted} / {_ms(pu['sock_diag_filtered']['median'])}", ""))
        for name, s in lv["baselines"].items():
            rows.append((b, f"baseline: {name} (counts checked equal)", _ms(s["median"]), ""))
        rows.append((b, f"scrape speed-up vs fastest named baseline ({lv['fastest_baseline']})",
                     f"{lv['speedup_vs_fastest']:.0f}x", ""))
    if r.get("connections", {}).get("error"):
        rows.append(("4/5 scale", "FAILED", r["connections"]["error"], ""))
    lst = r.get("listeners", {})
    for lv in lst.get("levels", []):
        b = f"5 scale {lv['listeners']} listeners"
        rows.append((b, "agent CPU, nobody scraping", f"{lv['idle_cpu_fraction'] * 100:.2f}% of a core", ""))
        rows.append((b, "refresh (snapshot build) median [min..max]",
                     _span(lv["snapshot_build_seconds"], ".4f") + " s", ""))
        rows.append((b, "scrape median / agent RSS", f"{_ms(lv['scrape_seconds']['median'])} / "
                     f"{lv['agent_memory']['VmRSS'] / 2**20:.1f} MiB", ""))
        if lv.get("refresh_failure"):
            rows.append((b, "WARNING: the agent's refreshes fail", lv["refresh_failure"], ""))
    if lst.get("error"):
        rows.append(("5 scale listeners", "FAILED", lst["error"], ""))
    pr = r.get("processes", {})
    if "before" in pr:
        b = f"5 scale +{pr['added']} processes"
        be, af = pr["before"], pr["after"]
        rows.append((b, "fd census of every process (fds.FdCensus, limits cached), "
                     f"{be['host_processes']} -> {af['host_processes']} processes",
                     f"{_ms(be['fd_scan']['seconds']['median'])} -> {_ms(af['fd_scan']['seconds']['median'])}", ""))
        rows.append((b, "fd census, cold (every limit read)",
                     f"{_ms(be['fd_scan']['cold_seconds'])} -> {_ms(af['fd_scan']['cold_seconds'])}", ""))
        if be.get("headroom_read_seconds") is not None and af.get("headroom_read_seconds") is not None:
            rows.append((b, "the agent's headroom read (last refresh)",
                         f"{_ms(be['headroom_read_seconds'])} -> {_ms(af['headroom_read_seconds'])}", ""))
        rows.append((b, "agent CPU, nobody scraping", f"{be['idle_cpu_fraction'] * 100:.2f}% -> "
                     f"{af['idle_cpu_fraction'] * 100:.2f}% of a core", ""))
        rows.append((b, "refresh (snapshot build) median", f"{_ms(be['snapshot_build_seconds']['median'])} -> "
                     f"{_ms(af['snapshot_build_seconds']['median'])}", ""))
    if pr.get("error"):
        rows.append(("5 scale processes", "FAILED", pr["error"], ""))
    return rows


def _growth_rows(r: dict) -> list[Row]:
    rows = []
    for rate, g in r.items():
        b = f"5 churn {rate}/s offered"
        a = g["agent"]
        rows.append((b, "achieved conn/s nothing / default agent",
                     f"{g['rate']['none']['median']:.0f} / {g['rate']['agent']['median']:.0f}", ""))
        rows.append((b, "throughput ratio", _span(a["ratio"]), ""))
        rows.append((b, "generator CPU per connection ratio", _span(a["gen_cpu_ratio"]), ""))
    return rows


def table(res: dict) -> list[Row]:
    rows = _noise_rows(res)
    if "churn" in res:
        rows += _churn_rows("1 churn", res["churn"])
    if "syscall" in res:
        rows += _syscall_rows(res["syscall"])
    if "ws" in res:
        rows += _ws_rows(res["ws"])
    if "bpfcost" in res:
        rows += _accept_rows(res["bpfcost"])
    if "accept-vm" in res:
        rows += _accept_vm_rows(res["accept-vm"])
    if "scale" in res:
        rows += _scale_rows(res["scale"])
    if "churn-growth" in res:
        rows += _growth_rows(res["churn-growth"])
    for k, p in res.get("profile", {}).items():
        if p.get("categories_pct"):
            rows.append(("profile", f"{k}: share of CPU samples in tracing/BPF",
                         ", ".join(f"{c} {v:.1f}%" for c, v in p["categories_pct"].items()), ""))
    for b, e in res.get("errors", {}).items():
        rows.append((b, "FAILED", e, ""))
    return rows


def print_table(rows: list[Row], out=sys.stdout) -> None:
    hdr = ("benchmark", "measurement", "result", "target")
    w = [max([len(hdr[i])] + [len(r[i]) for r in rows]) for i in range(4)]
    line = lambda r: "  ".join(str(r[i]).ljust(w[i]) for i in range(4)).rstrip()  # noqa: E731
    print(line(hdr), file=out)
    print(line(tuple("-" * x for x in w)), file=out)
    for r in rows:
        print(line(r), file=out)


def _pyspy_lines(spy: dict, where: str) -> list[str]:
    out = [f"py-spy, agent during {spy['scrapes']} scrapes at {where} ({spy['samples']} samples, all threads):",
           "", "```", f"{'inclusive':>9}  {'function':<58} {'self':>6}  function"]
    for (k, v), (k2, v2) in zip(spy["inclusive_pct"][:15], spy["self_pct"][:15]):
        out.append(f"{v:8.1f}%  {k:<58} {v2:5.1f}%  {k2}")
    for name, t in spy.get("threads", {}).items():
        out += ["", f"{name}: {t['share_pct']}% of the samples; within it:"]
        for (k, v), (k2, v2) in zip(t["inclusive_pct"][:15], t["self_pct"][:15]):
            out.append(f"{v:8.1f}%  {k:<58} {v2:5.1f}%  {k2}")
    return out + ["```"]


def extras(res: dict) -> list[str]:
    """Profiles: py-spy of the agent at the largest scale level, perf of the loads."""
    out = []
    for lv in res.get("scale", {}).get("connections", {}).get("levels", []):
        spy = lv.get("pyspy_scrapes")
        if spy and "inclusive_pct" in spy:
            out += [""] + _pyspy_lines(spy, f"{lv['connections']} connections")
    for k, p in res.get("profile", {}).items():
        out += ["", f"perf, `{k}` (top symbols, % of the load generator's CPU samples):", "", "```"]
        out += p["top"][:15]
        out += ["by category: " + ", ".join(f"{c} {v:.1f}%" for c, v in p["categories_pct"].items()), "```"]
    return out


def markdown(rows: list[Row], res: dict) -> str:
    m = res["machine"]
    dirty = m.get("git_uncommitted") or []
    out = [f"Run: `{res['command']}`, {m['date']}, {res.get('total_seconds', 0):.0f} s, "
           f"tree at {m.get('git_head')}" + (f" plus uncommitted changes to {', '.join(x.split()[-1] for x in dirty)}"
                                             if dirty else "") + ". "
           f"Machine: nproc={m['nproc']}, kernel {m['kernel']}, CPU {m['cpu']}; "
           f"load average {' '.join(m['loadavg_start'])} at the start, "
           f"{' '.join(m.get('loadavg_end', []))} at the end; "
           f"other agents or foreign programs on measured hooks at the start: "
           f"{res.get('noise_at_start', {}).get('summary', '?')}.", ""]
    out += ["| benchmark | measurement | result | target |", "|---|---|---|---|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out + extras(res)) + "\n"
