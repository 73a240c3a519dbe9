"""connwatch's Grafana dashboards and Prometheus alert rules, as code.

Run from the repository root:

    .venv/bin/python -m dashboards.generate          # write json/ and alerts/
    .venv/bin/python -m dashboards.generate --check  # exit 1 if they are stale

Layout: metrics.py (every metric name, the one place to rename),
params.py (every threshold and duration), common.py (panel and template
helpers), *.dashboard.py (one Grafana dashboard each), alerts.py (rules).
"""
