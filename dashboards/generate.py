"""Generate the dashboard JSON and the alert rules file.

    .venv/bin/python -m dashboards.generate                  # write into dashboards/
    .venv/bin/python -m dashboards.generate --check          # exit 1 if committed files are stale
    .venv/bin/python -m dashboards.generate --out-dir DIR    # write elsewhere (tests)

Outputs (relative to the output directory): json/<name>.json for every
dashboards/<name>.dashboard.py, and alerts/connwatch.rules.yml. Output is
deterministic: sorted JSON keys, panel ids assigned in layout order, fixed uids.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import sys
from pathlib import Path

from grafanalib._gen import DashboardEncoder

from . import alerts
from .params import DEFAULT, Params

HERE = Path(__file__).resolve().parent
RULES_FILE = "alerts/connwatch.rules.yml"


def dashboard_sources() -> list[Path]:
    return sorted(HERE.glob("*.dashboard.py"))


def load_dashboard(path: Path, params: Params = DEFAULT):
    name = "dashboards._gen_" + path.name[: -len(".dashboard.py")]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(params)


def dashboard_json(dash) -> str:
    return json.dumps(dash.to_json_data(), cls=DashboardEncoder, sort_keys=True, indent=2,
                      ensure_ascii=False) + "\n"


def outputs(params: Params = DEFAULT) -> dict[str, str]:
    """Relative path -> file content, for everything the generator owns."""
    out = {}
    for src in dashboard_sources():
        out[f"json/{src.name[: -len('.dashboard.py')]}.json"] = dashboard_json(load_dashboard(src, params))
    out[RULES_FILE] = alerts.render(params)
    return out


def write(out_dir: Path, params: Params = DEFAULT) -> list[Path]:
    written = []
    for rel, text in outputs(params).items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def check(out_dir: Path, params: Params = DEFAULT) -> list[str]:
    """Differences between what would be generated and what is in out_dir."""
    problems = []
    want = outputs(params)
    for rel, text in want.items():
        path = out_dir / rel
        have = path.read_text(encoding="utf-8") if path.exists() else ""
        if have != text:
            diff = difflib.unified_diff(have.splitlines(True), text.splitlines(True), f"{rel} (committed)",
                                        f"{rel} (generated)", n=1)
            problems.append(f"{rel} is stale:\n" + "".join(list(diff)[:40]))
    for path in sorted((out_dir / "json").glob("*.json")):
        if f"json/{path.name}" not in want:
            problems.append(f"json/{path.name} has no dashboards/*.dashboard.py source")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dashboards.generate", description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=HERE, help="where json/ and alerts/ go (default: dashboards/)")
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if the files differ")
    args = ap.parse_args(argv)
    if args.check:
        problems = check(args.out_dir)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print("generated dashboards/rules are stale: run `make dashboards` and commit", file=sys.stderr)
            return 1
        return 0
    for path in write(args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
