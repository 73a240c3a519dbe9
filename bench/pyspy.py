"""A py-spy profile of the agent while it is scraped (bench only: py-spy is
pip-installed into the venv by hand, `.venv/bin/pip install py-spy`; it is not
a project dependency). Used at the largest scale level when available."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from . import common as C


def available() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


def _key(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'file.py:func'."""
    name, _, where = frame.partition(" (")
    return f"{where.split(':')[0].rsplit('/', 1)[-1]}:{name}" if where else frame


# sub-profiles: the samples whose stack contains this function
THREADS = {"refresh thread (snapshot build)": "_refresh_loop", "HTTP (scrapes)": "_serve_conn"}


def summarize(raw: Path, top: int = 20) -> dict:
    incl, leaf, total = Counter(), Counter(), 0
    sub = {name: [Counter(), Counter(), 0] for name in THREADS}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        frames = [_key(f) for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        total += n
        for f in set(frames):
            incl[f] += n
        leaf[frames[-1]] += n
        for name, marker in THREADS.items():
            if any(f.endswith(marker) for f in frames):
                si, sl, _ = sub[name]
                for f in set(frames):
                    si[f] += n
                sl[frames[-1]] += n
                sub[name][2] += n

    def pct(c, of):
        return [(k, round(v * 100 / max(of, 1), 1)) for k, v in c.most_common(top)]

    return {"samples": total, "inclusive_pct": pct(incl, total), "self_pct": pct(leaf, total),
            "threads": {name: {"samples": n, "share_pct": round(n * 100 / max(total, 1), 1),
                               "inclusive_pct": pct(si, n), "self_pct": pct(sl, n)}
                        for name, (si, sl, n) in sub.items()}}


def profile_scrapes(agent: C.Agent, seconds: float) -> dict:
    exe = available()
    if not exe:
        return {"error": "py-spy not installed (.venv/bin/pip install py-spy)"}
    raw = C.BUILD / "pyspy-scrape.txt"
    spy = C.spawn([exe, "record", "-p", agent.pid, "-d", int(seconds) + 1, "-r", 250, "--nonblocking",
                   "--threads", "--format", "raw", "-o", raw], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        n, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < seconds:
            agent.scrape()
            n += 1
        spy.wait(timeout=60)
    finally:
        C.reap(spy)
    if not raw.exists():
        return {"error": "py-spy produced no output"}
    out = summarize(raw)
    out["scrapes"] = n
    return out
