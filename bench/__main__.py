"""connwatch benchmarks: `make bench` (= python -m bench), see docs/performance.md.

    python -m bench                      everything, full size (~15 min)
    python -m bench --quick              a small run of everything (< 60 s)
    python -m bench --smoke              the smallest run (the smoke test's)
    python -m bench --only churn,scale   selected benchmarks
    python -m bench --json out.json --markdown out.md

Benchmarks: churn, syscall, bpfcost, scale (4 and the memory/latency curve of
5), churn-growth (the churn-rate half of 5), profile (perf profiles of the
syscall loop and of churn). Needs root, BTF, gcc, clang; perf for `profile`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time

from . import common as C

ALL = ("churn", "syscall", "bpfcost", "scale", "churn-growth", "profile")


@dataclasses.dataclass
class Profile:
    name: str
    rounds: int = 6              # churn: with/without pairs (even: as many off-first as on-first)
    warmup: float = 1.0
    churn_seconds: float = 3.0
    churn_servers: int = 2
    churn_clients: int = 4
    syscall_rounds: int = 5
    syscall_seconds: float = 1.5
    churn_rates: tuple = (1000, 10000, 50000)
    growth_rounds: int = 3
    levels: tuple = (1000, 10000, 50000, 100000)
    holder_procs: int = 6
    scrapes: int = 50
    idle_window: float = 3.0
    baseline_reps: int = 5
    agent_refresh: float = 2.0   # refresh_interval_seconds of the bpfcost/scale agents (2 = the default)
    pyspy_seconds: float = 10.0  # py-spy the agent while scraping at the largest level
    quiet_wait: float = 10.0     # wait this long for other people's syscall probes to go
    scale_syscall_tracing: bool = True  # the scale agent's syscall_tracing setting


PROFILES = {
    "full": Profile("full"),
    "quick": Profile("quick", rounds=2, warmup=0.3, churn_seconds=1.0, syscall_rounds=1,
                     syscall_seconds=0.4, churn_rates=(1000,), growth_rounds=1, levels=(1000, 5000),
                     holder_procs=2, scrapes=10, idle_window=1.0, baseline_reps=2, quiet_wait=0,
                     pyspy_seconds=0, agent_refresh=0.5),
    "smoke": Profile("smoke", rounds=1, warmup=0.2, churn_seconds=0.5, syscall_rounds=1,
                     syscall_seconds=0.2, churn_rates=(1000,), growth_rounds=1, levels=(500,),
                     holder_procs=2, scrapes=5, idle_window=0.5, baseline_reps=1, quiet_wait=0,
                     pyspy_seconds=0, agent_refresh=0.5),
}
SMOKE_ONLY = ("churn", "syscall", "bpfcost", "scale")


def machine() -> dict:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=C.ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {"git_head": git("rev-parse", "--short", "HEAD"),
            # the agent is measured as it is in the working tree
            "git_uncommitted": git("status", "--short", "--", "agent", "bpf").splitlines(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "nproc": os.cpu_count(),
            "kernel": platform.release(), "cpu": cpu, "loadavg_start": open("/proc/loadavg").read().split()[:3]}


# ---- the table ---------------------------------------------------------------------------


def _pct(s):
    return f"{s['median']:+.1f}% [{s['min']:+.1f} .. {s['max']:+.1f}]"


def _ratio(s):
    return f"{s['median']:.3f} [{s['min']:.3f} .. {s['max']:.3f}]"


def _ms(x):
    return f"{x * 1e3:.1f} ms" if x >= 0.001 else f"{x * 1e6:.0f} us"


def _mark(ok):
    return "MET" if ok else "MISSED"


def table(res: dict) -> list[tuple[str, str, str, str]]:
    """(benchmark, measurement, result, target) rows."""
    rows = []
    if "churn" in res:
        r = res["churn"]
        rows.append(("1 churn", "conn/s, agent detached (median [min..max])",
                     f"{r['rate_off']['median']:.0f} [{r['rate_off']['min']:.0f} .. {r['rate_off']['max']:.0f}]", ""))
        rows.append(("1 churn", "conn/s, agent attached",
                     f"{r['rate_on']['median']:.0f} [{r['rate_on']['min']:.0f} .. {r['rate_on']['max']:.0f}]", ""))
        rows.append(("1 churn", f"ratio attached/detached ({r['ratio']['n']} paired rounds)", _ratio(r["ratio"]),
                     f">= 0.97: {_mark(r['ratio']['median'] >= 0.97)}"))
        rows.append(("1 churn", "CPU per connection (system-wide) attached/detached", _ratio(r["cpu_ratio"]), ""))
        rows.append(("1 churn", "agent process CPU during attached runs (cores)",
                     f"{r['agent_cpu_cores_on']['median']:.3f} [{r['agent_cpu_cores_on']['min']:.3f} .. "
                     f"{r['agent_cpu_cores_on']['max']:.3f}]", ""))
        rows.append(("1 churn", "generator CPU us/conn detached / attached (ratio)",
                     f"{r['gen_cpu_us_per_conn_off']['median']:.1f} / {r['gen_cpu_us_per_conn_on']['median']:.1f} "
                     f"({_ratio(r['gen_cpu_ratio'])})", ""))
        n = r.get("no_syscall_tracing")
        if n:
            rows.append(("1 churn", "conn/s detached / attached, agent with syscall_tracing: false",
                         f"{n['rate_off']['median']:.0f} / {n['rate_on']['median']:.0f}", ""))
            rows.append(("1 churn", f"ratio attached/detached, syscall_tracing: false ({n['ratio']['n']} paired rounds)",
                         _ratio(n["ratio"]), f">= 0.97: {_mark(n['ratio']['median'] >= 0.97)}"))
            rows.append(("1 churn", "generator CPU us/conn detached / attached, syscall_tracing: false (ratio)",
                         f"{n['gen_cpu_us_per_conn_off']['median']:.1f} / {n['gen_cpu_us_per_conn_on']['median']:.1f} "
                         f"({_ratio(n['gen_cpu_ratio'])})", ""))
    if "churn" in res and res["churn"]["foreign_links_max"]:
        rows.append(("1 churn", "WARNING: other people's syscall-tracepoint BPF links present during runs",
                     f"up to {res['churn']['foreign_links_max']}: the baseline paid for tracing too", ""))
    if "syscall" in res:
        r = res["syscall"]
        if r["foreign_links_max"].get("none"):
            rows.append(("2 syscall", "WARNING: other people's syscall-tracepoint BPF links during baseline runs",
                         f"up to {r['foreign_links_max']['none']}: the baseline paid for tracing too", ""))
        for m, label in (("getppid", "getppid()"), ("pipe", "1-byte write+read on a pipe")):
            base = r[m]["none"]["ns_per_iter"]
            rows.append(("2 syscall", f"{label}: CPU ns/iteration, nothing attached",
                         f"{base['median']:.0f} (wall {r[m]['none']['wall_ns_per_iter']['median']:.0f})", ""))
            for c in ("agent", "agent_no_syscalls", "cw_sys_exit", "empty", "alt"):
                s = r[m][c]["slowdown_pct"]
                tgt = f"<= 5%: {_mark(s['median'] <= 5)}" if c.startswith("agent") else ""
                rows.append(("2 syscall", f"{label}: slowdown, {r['conditions'][c]}",
                             f"{r[m][c]['ns_per_iter']['median']:.0f} ns, {_pct(s)} (wall {r[m][c]['wall_slowdown_pct']['median']:+.1f}%)", tgt))
        oc = r["other_cpu_cores"]["none"]
        rows.append(("2 syscall", "other load on the machine during baseline runs (cores)",
                     f"{oc['median']:.2f} [{oc['min']:.2f} .. {oc['max']:.2f}]", ""))
    if "bpfcost" in res:
        r = res["bpfcost"]
        for who in ("agent", "empty", "alt"):
            if who not in r:
                continue
            for prog, v in r[who]["programs"].items():
                if who == "alt" and not prog.startswith("(") and v["runs"] < 1000:
                    continue
                rows.append(("3 BPF cost", f"{who}: {prog}", f"{v['ns_per_event']:.0f} ns/event ({v['runs']:.0f} runs)", ""))
            by = r[who].get("bpf_ns_per_connection_by_program", {})
            detail = ", ".join(f"{p} {v:.0f}" for p, v in sorted(by.items(), key=lambda kv: -kv[1])[:4]
                               if not p.startswith("("))
            rows.append(("3 BPF cost", f"{who}: BPF time per loopback connection (accept+close, both ends)",
                         f"{r[who]['bpf_ns_per_connection']:.0f} ns ({detail})", ""))
    if "scale" in res:
        for lv in res["scale"]["levels"]:
            n = lv["connections"]
            sc = lv["scrape_seconds"]
            rss = lv["agent_memory"]["VmRSS"]
            big = n >= 100000
            rows.append((f"4/5 scale {n}", "scrape /metrics median / p99",
                         f"{_ms(sc['median'])} / {_ms(sc['p99'])}",
                         f"< 100 ms: {_mark(sc['p99'] < 0.1)}" if big else ""))
            rows.append((f"4/5 scale {n}", "snapshot build (median of refreshes)",
                         _ms(lv["snapshot_build_seconds"]["median"]), ""))
            rows.append((f"4/5 scale {n}", "agent RSS (peak)",
                         f"{rss / 2**20:.1f} MiB ({lv['agent_memory']['VmHWM'] / 2**20:.1f} MiB)",
                         f"< 100 MB: {_mark(lv['agent_memory']['VmHWM'] < 100e6)}" if big else ""))
            rows.append((f"4/5 scale {n}", "agent CPU per scrape / background refresh CPU",
                         f"{_ms(lv['agent_cpu_seconds_per_scrape'])} / {lv['agent_background_cpu_fraction'] * 100:.1f}% of a core", ""))
            rows.append((f"4/5 scale {n}", "BPF map memory (all maps)",
                         f"{lv['bpf_map_memory_bytes'] / 2**20:.1f} MiB", ""))
            for b, s in lv["baselines"].items():
                rows.append((f"4/5 scale {n}", f"baseline: {b} (counts checked equal)", _ms(s["median"]), ""))
            rows.append((f"4/5 scale {n}", f"speed-up vs fastest named baseline ({lv['fastest_baseline']})",
                         f"{lv['speedup_vs_fastest']:.0f}x",
                         f">= 20x: {_mark(lv['speedup_vs_fastest'] >= 20)}" if big else ""))
            if lv["fastest_any_baseline"] != lv["fastest_baseline"]:
                rows.append((f"4/5 scale {n}", f"speed-up vs {lv['fastest_any_baseline']}",
                             f"{lv['speedup_vs_fastest_any']:.0f}x", ""))
    if "profile" in res:
        for k, p in res["profile"].items():
            cats = p.get("categories_pct", {})
            if cats:
                rows.append(("profile", f"{k}: share of CPU samples in tracing/BPF",
                             ", ".join(f"{c} {v:.1f}%" for c, v in cats.items()), ""))
    if "churn-growth" in res:
        for rate, r in res["churn-growth"].items():
            rows.append((f"5 churn {rate}/s offered", "achieved conn/s detached / attached",
                         f"{r['rate_off']['median']:.0f} / {r['rate_on']['median']:.0f}", ""))
            rows.append((f"5 churn {rate}/s offered", "throughput ratio attached/detached", _ratio(r["ratio"]), ""))
            rows.append((f"5 churn {rate}/s offered", "generator CPU us/conn detached / attached (ratio)",
                         f"{r['gen_cpu_us_per_conn_off']['median']:.1f} / {r['gen_cpu_us_per_conn_on']['median']:.1f} "
                         f"({_ratio(r['gen_cpu_ratio'])})", ""))
    return rows


def print_table(rows, out=sys.stdout) -> None:
    w = [max(len(r[i]) for r in rows) for i in range(4)] if rows else [0] * 4
    hdr = ("benchmark", "measurement", "result", "target")
    w = [max(w[i], len(hdr[i])) for i in range(4)]
    line = lambda r: "  ".join(str(r[i]).ljust(w[i]) for i in range(4)).rstrip()  # noqa: E731
    print(line(hdr), file=out)
    print(line(tuple("-" * x for x in w)), file=out)
    for r in rows:
        print(line(r), file=out)


def markdown(rows, res: dict | None = None) -> str:
    out = []
    if res:
        m = res["machine"]
        dirty = m.get("git_uncommitted") or []
        out += [f"Run: `{res['command']}`, {m['date']}, {res.get('total_seconds', 0):.0f} s, "
                f"tree at {m.get('git_head')}" + (f" plus uncommitted changes to {', '.join(x.split()[-1] for x in dirty)}"
                                                  if dirty else "") + ". "
                f"Machine: nproc={m['nproc']}, kernel {m['kernel']}, CPU {m['cpu']}; "
                f"load average {' '.join(m['loadavg_start'])} at the start, "
                f"{' '.join(m.get('loadavg_end', []))} at the end; "
                f"other people's syscall-tracepoint BPF links at the start: {res.get('foreign_syscall_links_at_start')}.",
                ""]
    out += ["| benchmark | measurement | result | target |", "|---|---|---|---|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    if res:
        for lv in res.get("scale", {}).get("levels", []):
            spy = lv.get("pyspy_scrapes")
            if spy and "inclusive_pct" in spy:
                out += ["", f"py-spy, agent during {spy['scrapes']} scrapes at {lv['connections']} connections "
                        f"({spy['samples']} samples, all threads):", "", "```",
                        f"{'inclusive':>9}  {'function':<58} {'self':>6}  function"]
                for (k, v), (k2, v2) in zip(spy["inclusive_pct"][:15], spy["self_pct"][:15]):
                    out.append(f"{v:8.1f}%  {k:<58} {v2:5.1f}%  {k2}")
                for name, t in spy.get("threads", {}).items():
                    out += ["", f"{name}: {t['share_pct']}% of the samples; within it:"]
                    for (k, v), (k2, v2) in zip(t["inclusive_pct"][:15], t["self_pct"][:15]):
                        out.append(f"{v:8.1f}%  {k:<58} {v2:5.1f}%  {k2}")
                out.append("```")
        for k, p in res.get("profile", {}).items():
            out += ["", f"perf, `{k}` (top symbols, % of the load generator's CPU samples):", "", "```"]
            out += p["top"][:15]
            out += ["by category: " + ", ".join(f"{c} {v:.1f}%" for c, v in p["categories_pct"].items()), "```"]
    return "\n".join(out) + "\n"


def _clean(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small run of everything (< 60 s)")
    g.add_argument("--smoke", action="store_true", help="smallest run (the smoke test's, < 30 s)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument("--rounds", type=int, help="override churn rounds")
    ap.add_argument("--syscall-rounds", type=int, help="override syscall rounds")
    ap.add_argument("--levels", help="override scale levels, e.g. 1000,10000")
    ap.add_argument("--scale-without-syscall-tracing", action="store_true",
                    help="run the scale agent with syscall_tracing: false (fd-table walk every refresh)")
    ap.add_argument("--json", default=str(C.BUILD / "results.json"), help="write raw results here")
    ap.add_argument("--markdown", default=str(C.BUILD / "results.md"), help="write the table here")
    args = ap.parse_args(argv)

    if os.geteuid() != 0:
        print("bench: needs root (it loads BPF programs and changes sysctls)", file=sys.stderr)
        return 2
    profile = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.rounds:
        profile.rounds = args.rounds
    if args.syscall_rounds:
        profile.syscall_rounds = args.syscall_rounds
    if args.levels:
        profile.levels = tuple(int(x) for x in args.levels.split(","))
    if args.scale_without_syscall_tracing:
        profile.scale_syscall_tracing = False
    only = [x.strip() for x in args.only.split(",") if x.strip()] or list(SMOKE_ONLY if args.smoke else ALL)
    bad = [x for x in only if x not in ALL]
    if bad:
        ap.error(f"unknown benchmark {bad[0]} (known: {', '.join(ALL)})")

    C.install_signal_handlers()
    t_start = time.monotonic()
    res = {"machine": machine(), "settings": dataclasses.asdict(profile), "benchmarks": only,
           "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
           "errors": {}}
    from . import overhead, profile as prof, scale

    def save(final: bool = False) -> None:
        res["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        res["total_seconds"] = time.monotonic() - t_start
        if args.json:
            with open(args.json, "w") as f:
                json.dump(_clean(res), f, indent=1)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(markdown(table(res), res))

    runners = {
        "churn": lambda objs: overhead.churn(profile),
        "syscall": lambda objs: overhead.syscall(profile, objs),
        "bpfcost": lambda objs: overhead.bpfcost(profile, objs),
        "scale": lambda objs: scale.scale(profile),
        "churn-growth": lambda objs: overhead.churn_growth(profile),
        "profile": lambda objs: prof.profile(profile, objs),
    }
    try:
        objs = C.build()
        res["foreign_syscall_links_at_start"] = C.foreign_syscall_links()
        res["bpf_stats_enabled_at_start"] = C.sysctl_get("kernel.bpf_stats_enabled")
        for b in only:
            C.log(f"running {b} ({profile.name})")
            t0 = time.monotonic()
            try:
                res[b] = runners[b](objs)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # report it, clean up, go on with the next one
                import traceback

                traceback.print_exc()
                res["errors"][b] = f"{type(e).__name__}: {e}"
                C.cleanup()
            res.setdefault("seconds", {})[b] = time.monotonic() - t0
            save()
    except KeyboardInterrupt:
        C.log("interrupted")
        return 130
    finally:
        C.cleanup()
        save()
    rows = table(res)
    m = res["machine"]
    print(f"connwatch bench ({profile.name}) {m['date']}  nproc={m['nproc']} kernel={m['kernel']} cpu={m['cpu']}"
          f"  load {' '.join(m['loadavg_start'])} -> {' '.join(m['loadavg_end'])}  {res['total_seconds']:.0f} s")
    print_table(rows)
    for lv in res.get("scale", {}).get("levels", []):
        spy = lv.get("pyspy_scrapes")
        if spy and "inclusive_pct" in spy:
            print(f"\npy-spy of the agent during {spy['scrapes']} scrapes at {lv['connections']} connections "
                  f"({spy['samples']} samples, all threads): inclusive / self %")
            for (k, v), (k2, v2) in zip(spy["inclusive_pct"][:15], spy["self_pct"][:15]):
                print(f"  {v:5.1f}% {k:<60} {v2:5.1f}% {k2}")
            for name, t in spy.get("threads", {}).items():
                print(f"  -- {name}: {t['share_pct']}% of the samples; within it:")
                for (k, v), (k2, v2) in zip(t["inclusive_pct"][:15], t["self_pct"][:15]):
                    print(f"  {v:5.1f}% {k:<60} {v2:5.1f}% {k2}")
    if "profile" in res:
        for k, p in res["profile"].items():
            print(f"\nperf profile {k} (top symbols, % of the generator's CPU samples):")
            print("\n".join(p["top"][:15]))
            print("  by category: " + ", ".join(f"{c} {v:.1f}%" for c, v in p["categories_pct"].items()))
    if res.get("scale", {}).get("error"):
        res["errors"]["scale"] = res["scale"]["error"]
    for b, e in res["errors"].items():
        print(f"\nbench: {b} FAILED: {e}")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
