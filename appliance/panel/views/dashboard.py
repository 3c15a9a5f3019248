"""The dashboard: today's scans, the queue, what needs action, disk and process health, the last 24 hours."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, render_template

from appliance.panel import queries
from appliance.panel.views.auth import ctx

bp = Blueprint("dashboard", __name__)


def data() -> dict[str, Any]:
    c = ctx()
    processes = c.processes() if c.processes else None
    checks = c.checks() if c.checks else None
    return queries.dashboard(c.config, c.store, processes, checks)


@bp.route("/")
def index() -> Any:
    return render_template("dashboard.html", d=data())


@bp.route("/live/dashboard")
def live() -> Any:
    return render_template("_dashboard_live.html", d=data())
