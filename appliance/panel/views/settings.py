"""The effective configuration, read only (admin): what the box runs with, as ``appliance check-config`` prints it.

Changing it stays a file edit and a restart on the box, where the change is reviewed and validated as a whole.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, render_template

from appliance.panel.views.auth import ctx, require

bp = Blueprint("settings", __name__)


@bp.route("/settings")
@require("admin")
def index() -> Any:
    config = ctx().config
    sections = {
        name: json.dumps(value, indent=2, ensure_ascii=False) for name, value in config.model_dump(mode="json").items()
    }
    return render_template("settings.html", sections=sections, data_dir=str(ctx().store.data_dir))
