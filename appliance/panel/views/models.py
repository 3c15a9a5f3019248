"""Model packages: versions, checksums, which routes use them, refused packages with the reason, engines built."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, render_template

from appliance.panel import queries
from appliance.panel.views.auth import ctx

bp = Blueprint("models", __name__)


@bp.route("/models")
def index() -> Any:
    c = ctx()
    return render_template("models.html", m=queries.models(c.config, c.store))
