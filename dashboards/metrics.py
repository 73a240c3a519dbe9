"""Every metric name the dashboards and alert rules use, taken from the agent.

The names are declared once, in agent/connwatch/metrics.py (the contract of
docs/metrics.md): each declaration's constant is a module-level name here
with its series name as value (``CONNECTIONS = "connwatch_connections"``,
``ACCEPTED = "connwatch_connections_accepted_total"``), so queries are
written against these constants only and a rename is one edit there.
CONTRACT is the full list of names a query may reference;
tests/test_dashboards.py and tests/test_alerts.py check every query
against it.
"""

from connwatch import metrics as _declared

globals().update({_const: _metric.name for _const, _metric in _declared.BY_CONSTANT.items()})

# a histogram's series
CONNECTION_DURATION_BUCKET = _declared.CONNECTION_DURATION.name + "_bucket"
CONNECTION_DURATION_SUM = _declared.CONNECTION_DURATION.name + "_sum"
CONNECTION_DURATION_COUNT = _declared.CONNECTION_DURATION.name + "_count"

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
