"""Generate the metric tables of docs/metrics.md from connwatch/metrics.py.

    .venv/bin/python -m connwatch.metrics_doc            # rewrite the tables in docs/metrics.md
    .venv/bin/python -m connwatch.metrics_doc --check    # exit 1 if they are stale

Only what lies between a ``<!-- metrics: <concern> -->`` line and the next
``<!-- end metrics -->`` is generated; the prose around the tables is
written by hand. tests/test_metrics_doc.py fails when the file is stale.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

from . import metrics

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
_BLOCK = re.compile(r"(<!-- metrics: (\w+) -->\n)(.*?)(<!-- end metrics -->)", re.S)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(concern: str) -> str:
    rows = ["| Metric | Type | Labels | Source | Meaning |", "|---|---|---|---|---|"]
    for m in metrics.ALL:
        if m.concern != concern:
            continue
        labels = ", ".join(f"`{label}`" for label in m.labels)
        meaning = f"{m.help} {m.details}".strip()
        rows.append(f"| `{m.name}` | {m.type} | {labels} | {_cell(m.source)} | {_cell(meaning)} |")
    return "\n".join(rows) + "\n"


def render(text: str) -> str:
    """The document with every generated block rewritten; ValueError if a
    concern has no block, or a block names no concern."""
    seen = set()

    def block(match: re.Match) -> str:
        concern = match.group(2)
        if concern not in metrics.CONCERNS:
            raise ValueError(f"unknown concern {concern!r} in a metrics block")
        seen.add(concern)
        return match.group(1) + table(concern) + match.group(4)

    out = _BLOCK.sub(block, text)
    missing = [c for c in metrics.CONCERNS if c not in seen]
    if missing:
        raise ValueError(f"no <!-- metrics: {missing[0]} --> block")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m connwatch.metrics_doc", description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, default=DOC, help="the document (default: docs/metrics.md)")
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if the tables are stale")
    args = ap.parse_args(argv)
    have = args.file.read_text(encoding="utf-8")
    want = render(have)
    if args.check:
        if have != want:
            sys.stderr.writelines(list(difflib.unified_diff(
                have.splitlines(True), want.splitlines(True), f"{args.file} (committed)", "(generated)", n=1))[:40])
            print(f"{args.file} is stale: run `make dashboards` and commit", file=sys.stderr)
            return 1
        return 0
    if have != want:
        args.file.write_text(want, encoding="utf-8")
        print(args.file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
