"""Shared building blocks for the connwatch dashboards (Grafana 10+).

Every panel built here queries the `${datasource}` template variable, has a
unit, an explicit grid position and a stable id (assigned in order by
`dashboard()`), so the generated JSON is import-ready and deterministic.
grafanalib's classes produce the JSON; `extraJson` fills in the Grafana 10
fields it does not model (heatmap options, datasource objects).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import attr

from grafanalib import core as g

from . import metrics as m
from .params import DEFAULT, Params

SCHEMA_VERSION = 38  # Grafana 10.0
DS = {"type": "prometheus", "uid": "${datasource}"}
GRID_WIDTH = 24

# Label matchers used by the template variables.
INSTANCE = 'instance=~"$instance"'
PID = 'pid=~"$pid"'
COMM = 'comm=~"$comm"'
PORT = 'port=~"$port"'


def sel(metric: str, *matchers: str) -> str:
    return f"{metric}{{{', '.join(x for x in matchers if x)}}}" if any(matchers) else metric


def events_in(selector: str, window: str) -> str:
    """How many events a counter counted in `window`, including the first ones of series
    born inside the window (the agent creates a series on its first event, non-zero, so
    increase() alone would miss those)."""
    return (f"(sum(increase({selector}[{window}])) or vector(0))"
            f" + (sum({selector} unless {selector} offset {window}) or vector(0))")


# --- template variables ---------------------------------------------------------

def datasource_var() -> g.Template:
    return g.Template(name="datasource", label="Data source", query="prometheus", type="datasource",
                      default="default", refresh=1)


def query_var(name: str, label: str, query: str, multi: bool = True) -> g.Template:
    """A Prometheus label_values() variable, refreshed on time-range change, defaulting to All."""
    t = g.Template(name=name, label=label, query=query, dataSource=DS, includeAll=True, multi=multi,
                   allValue=".*", default="$__all", refresh=2, sort=3 if name in ("pid", "port") else 1)
    t._current = ({"selected": True, "text": ["All"], "value": ["$__all"]} if multi
                  else {"selected": True, "text": "All", "value": "$__all"})
    return t


def instance_var(multi: bool = True) -> g.Template:
    return query_var("instance", "Instance", f"label_values({m.BUILD_INFO}, instance)", multi)


def comm_var() -> g.Template:
    return query_var("comm", "Process name", f"label_values({sel(m.CONNECTIONS, INSTANCE)}, comm)")


def pid_var() -> g.Template:
    return query_var("pid", "PID", f"label_values({sel(m.CONNECTIONS, INSTANCE, COMM)}, pid)")


def port_var(*matchers: str) -> g.Template:
    return query_var("port", "Local port", f"label_values({sel(m.CONNECTIONS, INSTANCE, *matchers)}, port)")


# --- targets ----------------------------------------------------------------------

def target(expr: str, legend: str = "", instant: bool = False, fmt: str = "time_series") -> g.Target:
    return g.Target(expr=expr, legendFormat=legend, instant=instant, format=fmt, datasource=DS,
                    intervalFactor=1, step=None)


def _ref(targets: list) -> list:
    """Give targets the refIds Grafana expects (A, B, C, ...)."""
    for i, t in enumerate(targets):
        t.refId = t.refId or chr(ord("A") + i)
    return targets


def _steps(thresholds) -> list[dict]:
    """[(value, color), ...] -> Grafana threshold steps; the first value is the base (None)."""
    return [{"color": c, "value": v} for v, c in thresholds]


def usage_thresholds(warning: float, critical: float) -> list[tuple]:
    return [(None, "green"), (warning, "orange"), (critical, "red")]


def headroom_thresholds(p: Params) -> list[tuple]:
    return [(None, "red"), (p.headroom_critical, "orange"), (p.headroom_warning, "green")]


LIMIT_OVERRIDE_STYLE = [
    {"id": "color", "value": {"fixedColor": "red", "mode": "fixed"}},
    {"id": "custom.lineStyle", "value": {"dash": [10, 10], "fill": "dash"}},
    {"id": "custom.fillOpacity", "value": 0},
]


def limit_override(regex: str = ".*(limit|max|backlog|somaxconn|capacity).*") -> dict:
    """Draw series whose legend matches `regex` as red dashed limit lines."""
    return {"matcher": {"id": "byRegexp", "options": regex}, "properties": LIMIT_OVERRIDE_STYLE}


# --- panels --------------------------------------------------------------------

@dataclass
class Layout:
    """Places panels left to right, wrapping at 24 columns."""

    panels: list = field(default_factory=list)
    x: int = 0
    y: int = 0
    row_h: int = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(g.RowPanel(title=title, gridPos=g.GridPos(h=1, w=GRID_WIDTH, x=0, y=self.y)))
        self.y += 1

    def add(self, panel, w: int, h: int = 8) -> None:
        if self.x + w > GRID_WIDTH:
            self._newline()
        panel.gridPos = g.GridPos(h=h, w=w, x=self.x, y=self.y)
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
        self.x, self.row_h = 0, 0


def timeseries(title: str, description: str, targets: list, unit: str, *, thresholds=None,
               limits: bool = False, stack: bool = False, min_: int | None = 0, max_: int | None = None,
               draw: str = "line", legend_calcs=("lastNotNull", "max")) -> g.TimeSeries:
    extra = {"fieldConfig": {"defaults": {"min": min_}}}
    if max_ is not None:
        extra["fieldConfig"]["defaults"]["max"] = max_
    return g.TimeSeries(
        title=title, description=description, dataSource=DS, targets=_ref(targets), unit=unit,
        thresholds=_steps(thresholds or [(None, "green")]),
        thresholdsStyleMode="dashed" if thresholds else "off",
        overrides=[limit_override()] if limits else [],
        stacking={"mode": "normal", "group": "A"} if stack else {"mode": "none"},
        fillOpacity=20 if stack else 10, drawStyle=draw, showPoints="never", spanNulls=True,
        legendDisplayMode="table", legendPlacement="bottom", legendCalcs=list(legend_calcs),
        tooltipMode="multi", tooltipSort="desc", extraJson=extra,
    )


def stat(title: str, description: str, targets: list, unit: str, *, thresholds=None, decimals=None,
         graph: bool = True, mappings=None) -> g.Stat:
    return g.Stat(
        title=title, description=description, dataSource=DS, targets=_ref(targets), format=unit,
        thresholds=_steps(thresholds or [(None, "green")]), decimals=decimals,
        color={"mode": "thresholds"}, reduceCalc="lastNotNull",
        graphMode="area" if graph else "none", colorMode="value", noValue="no data",
        mappings=mappings or [], textMode="value_and_name" if len(targets) > 1 else "auto",
    )


@attr.s
class BarGaugePanel(g.Panel):
    """Grafana 10 bar gauge (grafanalib 0.7's BarGauge emits the pre-7.0 `fieldOptions`)."""

    unit = attr.ib(default="none")
    min_ = attr.ib(default=0)
    max_ = attr.ib(default=None)
    steps = attr.ib(factory=list)

    def to_json_data(self):
        return self.panel_json({
            "fieldConfig": {"defaults": {"unit": self.unit, "min": self.min_, "max": self.max_,
                                         "color": {"mode": "thresholds"},
                                         "thresholds": {"mode": "absolute", "steps": self.steps}},
                            "overrides": []},
            "options": {"displayMode": "gradient", "orientation": "horizontal", "showUnfilled": True,
                        "valueMode": "color", "namePlacement": "auto", "minVizHeight": 10, "minVizWidth": 0,
                        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
            "type": "bargauge",
        })


def bargauge(title: str, description: str, targets: list, unit: str, *, thresholds=None,
             min_: float = 0, max_: float | None = None) -> BarGaugePanel:
    return BarGaugePanel(title=title, description=description, dataSource=DS, targets=_ref(targets), unit=unit,
                         min_=min_, max_=max_, steps=_steps(thresholds or [(None, "green")]))


@attr.s
class HeatmapPanel(g.Panel):
    """Grafana 10 heatmap of pre-bucketed Prometheus histogram data (no client-side bucketing)."""

    unit = attr.ib(default="s")

    def to_json_data(self):
        return self.panel_json({
            "fieldConfig": {"defaults": {"unit": self.unit, "custom": {
                "hideFrom": {"legend": False, "tooltip": False, "viz": False},
                "scaleDistribution": {"type": "linear"}}}, "overrides": []},
            "options": {
                "calculate": False,
                "cellGap": 1,
                "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64, "exponent": 0.5,
                          "fill": "dark-orange", "reverse": False, "scale": "exponential"},
                "exemplars": {"color": "rgba(255,0,255,0.7)"},
                "filterValues": {"le": 1e-9},
                "legend": {"show": True},
                "rowsFrame": {"layout": "le"},
                "tooltip": {"show": True, "yHistogram": True},
                "yAxis": {"axisPlacement": "left", "unit": self.unit, "reverse": False},
            },
            "type": "heatmap",
        })


def heatmap(title: str, description: str, targets: list, unit: str) -> HeatmapPanel:
    return HeatmapPanel(title=title, description=description, dataSource=DS, targets=_ref(targets), unit=unit)


# --- annotations ------------------------------------------------------------------

def annotation(name: str, expr: str, color: str, title: str, text: str, tags: str) -> dict:
    return {
        "datasource": DS, "enable": True, "expr": expr, "iconColor": color, "name": name,
        "step": "30s", "titleFormat": title, "textFormat": text, "tagKeys": tags,
        "useValueForTime": False,
    }


BUILTIN_ANNOTATION = {
    "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
    "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
}


def failure_annotations(instance_matcher: str = INSTANCE, proc: tuple[str, ...] = ()) -> list[dict]:
    """EMFILE/ENFILE and listen-drop markers (counters born on the first event count too)."""
    fd = sel(m.FD_ALLOC_FAILURES, instance_matcher, *proc)
    ov = sel(m.LISTEN_OVERFLOW_DROPS, instance_matcher)
    ld = sel(m.LISTEN_DROPS, instance_matcher, *proc)
    return [
        annotation("EMFILE / ENFILE",
                   f"sum by (instance, pid, comm, errno) (increase({fd}[1m]) > 0 or ({fd} unless {fd} offset 1m))",
                   "red", "{{errno}}", "{{comm}} (pid {{pid}}) on {{instance}} failed to allocate a file descriptor",
                   "errno,comm"),
        annotation("Listen drops",
                   f"sum by (instance, port) (increase({ld}[1m]) > 0 or increase({ov}[1m]) > 0 "
                   f"or ({ov} unless {ov} offset 1m))",
                   "orange", "listen drops on port {{port}}",
                   "accept queue of port {{port}} on {{instance}} overflowed", "port"),
    ]


# --- dashboard ----------------------------------------------------------------------

def make_dashboard(uid: str, title: str, description: str, layout: Layout, variables: list,
              annotations: list | None = None, tags=("connwatch",)) -> g.Dashboard:
    return g.Dashboard(
        uid=uid, title=title, description=description, tags=list(tags), panels=layout.panels,
        templating=g.Templating(list=[datasource_var(), *variables]),
        annotations=g.Annotations(list=[BUILTIN_ANNOTATION, *(annotations or [])]),
        schemaVersion=SCHEMA_VERSION, timezone="browser", refresh="30s", graphTooltip=1,
        time=g.Time("now-1h", "now"),
        links=[{"asDropdown": True, "icon": "external link", "includeVars": True, "keepTime": True,
                "tags": ["connwatch"], "targetBlank": False, "title": "connwatch dashboards",
                "type": "dashboards"}],
    ).auto_panel_ids()


__all__ = ["DEFAULT", "DS", "INSTANCE", "PID", "COMM", "PORT", "Layout", "sel", "events_in", "target", "timeseries",
           "stat", "bargauge", "heatmap", "BarGaugePanel", "HeatmapPanel", "make_dashboard",
           "failure_annotations", "instance_var", "comm_var", "pid_var", "port_var", "usage_thresholds",
           "headroom_thresholds", "limit_override"]
