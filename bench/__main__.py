"""connwatch benchmarks: `make bench` (= python -m bench), see docs/performance.md.

    python -m bench                      everything, full size
    python -m bench --quick              a small run of everything but accept-vm
    python -m bench --smoke              the smallest run (the smoke test's)
    python -m bench --only churn,ws      selected benchmarks
    python -m bench --json out.json --markdown out.md

Benchmarks: churn, syscall, ws (WebSocket echo throughput and BPF ns per
message), bpfcost (BPF ns per accepted connection), accept-vm (the same with
fexit in Debian's 6.12 under QEMU: needs `make kernels`), scale
(connections, listeners and processes axes), churn-growth, profile (perf
profiles of the loads).

The harness runs alone: it refuses to start (exit 2) while another connwatch
agent runs, somebody else's BPF programs are attached to the hooks it
measures, or kernel.bpf_stats_enabled is on, unless --allow-noise is given
(the results table then says what was there). Needs root, BTF, gcc, clang,
bpftool, node; perf for `profile`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

from . import common as C
from . import noise, report

ALL = ("churn", "syscall", "ws", "bpfcost", "accept-vm", "scale", "churn-growth", "profile")
QUICK = tuple(b for b in ALL if b != "accept-vm")  # a VM boot alone takes longer than all the rest
SMOKE = ("churn", "syscall", "ws", "bpfcost", "scale")


@dataclasses.dataclass
class Profile:
    name: str
    warmup: float = 1.0          # before every measured window
    quiet_wait: float = 10.0     # wait this long for foreign programs on measured hooks to go
    agent_refresh: float = 2.0   # refresh_interval_seconds of the agents (2 = the default)
    # 1 churn (and 5b)
    rounds: int = 6
    churn_seconds: float = 3.0
    churn_servers: int = 2
    churn_clients: int = 4
    churn_rates: tuple = (1000, 10000, 50000)
    growth_rounds: int = 3
    # 2 syscall loops
    syscall_rounds: int = 5
    syscall_seconds: float = 1.5
    # 1 WebSocket echo
    ws_servers: tuple = ("node", "python")
    ws_connections: int = 32
    ws_message_bytes: int = 64
    ws_rounds: int = 6
    ws_seconds: float = 3.0
    ws_server_warmup: float = 2.0  # once per server, unmeasured
    ws_bpf_rounds: int = 3       # with bpf_stats, after the throughput rounds
    # 3 accept path
    accept_conns: int = 4000     # per step; below half of RLIMIT_NOFILE, so the syscall hook stays disarmed
    accept_rounds: int = 5
    vm_accept_conns: int = 1000
    vm_accept_rounds: int = 2
    vm_timeout: float = 1200.0
    # 4/5 scale
    levels: tuple = (1000, 10000, 50000, 100000)
    listener_levels: tuple = (10, 1000, 10000)
    idle_processes: int = 2000
    holder_procs: int = 6
    scrapes: int = 50
    idle_window: float = 10.0    # agent CPU with nobody scraping, rounded to whole refresh intervals
    snapshot_samples: int = 5
    fd_scan_reps: int = 5
    baseline_reps: int = 5
    pyspy_seconds: float = 10.0  # py-spy the agent while scraping at the largest level
    # the connections axis's agent: socket_table_idle_interval_seconds (None:
    # the default, 60 s; each level waits for a recount with its sockets)
    socket_table_idle_interval: float | None = None


PROFILES = {
    "full": Profile("full"),
    "quick": Profile("quick", warmup=0.3, quiet_wait=0, agent_refresh=0.5,
                     rounds=2, churn_seconds=1.0, churn_rates=(1000,), growth_rounds=1,
                     syscall_rounds=1, syscall_seconds=0.4,
                     ws_rounds=2, ws_seconds=1.0, ws_server_warmup=1.0, ws_bpf_rounds=1,
                     accept_conns=1000, accept_rounds=2, vm_accept_conns=300, vm_accept_rounds=1,
                     levels=(1000, 5000), listener_levels=(10, 1000), idle_processes=500, holder_procs=2,
                     scrapes=10, idle_window=2.0, snapshot_samples=3, fd_scan_reps=2, baseline_reps=2,
                     pyspy_seconds=0, socket_table_idle_interval=1.0),
    "smoke": Profile("smoke", warmup=0.2, quiet_wait=0, agent_refresh=0.5,
                     rounds=1, churn_seconds=0.5, churn_rates=(1000,), growth_rounds=1,
                     syscall_rounds=1, syscall_seconds=0.2,
                     ws_rounds=1, ws_seconds=0.3, ws_server_warmup=0.3, ws_bpf_rounds=1,
                     accept_conns=200, accept_rounds=1, vm_accept_conns=100, vm_accept_rounds=1,
                     levels=(500,), listener_levels=(10, 100), idle_processes=50, holder_procs=2,
                     scrapes=5, idle_window=0.5, snapshot_samples=2, fd_scan_reps=1, baseline_reps=1,
                     pyspy_seconds=0, socket_table_idle_interval=1.0),
}


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


def _clean(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def _runners(profile):
    from . import bpfcost, overhead, profile as perf, scale, ws

    return {
        "churn": lambda: overhead.churn(profile),
        "syscall": lambda: overhead.syscall(profile),
        "ws": lambda: ws.ws(profile),
        "bpfcost": lambda: bpfcost.accept_path(profile),
        "accept-vm": lambda: bpfcost.accept_vm(profile),
        "scale": lambda: scale.scale(profile),
        "churn-growth": lambda: overhead.churn_growth(profile),
        "profile": lambda: perf.profile(profile),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small run of everything but accept-vm")
    g.add_argument("--smoke", action="store_true", help="smallest run (the smoke test's)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument("--allow-noise", action="store_true",
                    help="run even beside another agent or foreign programs on measured hooks (the table says so)")
    ap.add_argument("--rounds", type=int, help="override churn rounds")
    ap.add_argument("--syscall-rounds", type=int, help="override syscall rounds")
    ap.add_argument("--ws-rounds", type=int, help="override WebSocket echo rounds")
    ap.add_argument("--levels", help="override scale connection levels, e.g. 1000,10000")
    ap.add_argument("--json", default=str(C.BUILD / "results.json"), help="write raw results here")
    ap.add_argument("--markdown", default=str(C.BUILD / "results.md"), help="write the table here")
    args = ap.parse_args(argv)

    if os.geteuid() != 0:
        print("bench: needs root (it loads BPF programs and changes sysctls)", file=sys.stderr)
        return 2
    profile = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    for flag, field in (("rounds", "rounds"), ("syscall_rounds", "syscall_rounds"), ("ws_rounds", "ws_rounds")):
        if getattr(args, flag):
            setattr(profile, field, getattr(args, flag))
    if args.levels:
        profile.levels = tuple(int(x) for x in args.levels.split(","))
    default = SMOKE if args.smoke else QUICK if args.quick else ALL
    only = [x.strip() for x in args.only.split(",") if x.strip()] or list(default)
    bad = [x for x in only if x not in ALL]
    if bad:
        ap.error(f"unknown benchmark {bad[0]} (known: {', '.join(ALL)})")

    try:
        at_start = noise.survey()
    except RuntimeError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    if at_start and not args.allow_noise:
        print(f"bench: refusing to run beside {at_start.describe()} (they would be measured too): "
              "stop them, or pass --allow-noise to run anyway with the results marked", file=sys.stderr)
        return 2
    noise.tolerate(at_start)
    # as servers do: the loads hold thousands of sockets per process (the
    # scale holders size themselves from this, below the agent's arm_ratio)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    C.install_signal_handlers()
    t_start = time.monotonic()
    res = {"machine": machine(), "settings": dataclasses.asdict(profile), "benchmarks": only,
           "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
           "noise_at_start": at_start.to_json(), "errors": {}}

    def save() -> None:
        res["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        res["total_seconds"] = time.monotonic() - t_start
        res["noise_during_run"] = noise.worst.to_json()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(_clean(res), f, indent=1)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(report.markdown(report.table(res), res))

    runners = _runners(profile)
    try:
        C.build()
        for b in only:
            C.log(f"running {b} ({profile.name})")
            t0 = time.monotonic()
            try:
                res[b] = runners[b]()
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
        left = noise.leftovers()
        if left:
            res["errors"]["cleanup"] = f"BPF links or programs of the bench still attached: {left}"
        save()
    rows = report.table(res)
    m = res["machine"]
    print(f"connwatch bench ({profile.name}) {m['date']}  nproc={m['nproc']} kernel={m['kernel']} cpu={m['cpu']}"
          f"  load {' '.join(m['loadavg_start'])} -> {' '.join(m['loadavg_end'])}  {res['total_seconds']:.0f} s")
    report.print_table(rows)
    extra = report.extras(res)
    if extra:
        print("\n".join(extra))
    for b, e in res["errors"].items():
        print(f"\nbench: {b} FAILED: {e}", file=sys.stderr)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
