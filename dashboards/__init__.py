"""Grafana dashboards as code: ``python -m dashboards`` regenerates dashboards/*.json."""
