"""The audit log: filters, paging and a CSV export (streamed, so a year of entries stays in bounded memory)."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, render_template, request

from appliance.panel.views.auth import audit as record
from appliance.panel.views.auth import ctx, require
from appliance.panel.views.series import _day
from appliance.store.users import Audit

bp = Blueprint("audit", __name__)
PAGE = 100


def _filters(args: Any) -> dict[str, Any]:
    action = args.get("action", "")
    return {
        "action": action if action in Audit.ACTIONS else None,
        "username": (args.get("user") or "").strip()[:64] or None,
        "since": _day(args.get("from")),
        "until": _day(args.get("to"), end=True),
    }


@bp.route("/audit")
@require("admin", "technician")
def index() -> Any:
    try:
        page = max(1, min(int(request.args.get("page", 1)), 1_000_000))  # an offset SQLite can bind
    except ValueError:
        page = 1
    total, rows = Audit(ctx().store.index).query(**_filters(request.args), limit=PAGE, offset=(page - 1) * PAGE)
    return render_template(
        "audit.html",
        rows=rows,
        total=total,
        page=page,
        pages=max(1, -(-total // PAGE)),
        args=request.args,
        actions=Audit.ACTIONS,
    )


def _csv_injection_safe(value: object) -> str:
    """A cell a spreadsheet would run as a formula (=, +, -, @) gets a leading quote: values come from peers."""
    s = "" if value is None else str(value)
    return "'" + s if s[:1] in ("=", "+", "-", "@", "\t", "\r") else s


@bp.route("/audit.csv")
@require("admin", "technician")
def export() -> Any:
    filters = _filters(request.args)
    record("export_audit", detail=", ".join(f"{k}={v}" for k, v in filters.items() if v is not None) or None)
    rows = Audit(ctx().store.index).iterate(**filters)

    def lines() -> Iterator[str]:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["time_utc", "user", "address", "action", "target", "detail"])
        for r in rows:
            w.writerow(
                [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["at"]))]
                + [_csv_injection_safe(r[k]) for k in ("username", "address", "action", "target", "detail")]
            )
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
        yield buf.getvalue()

    resp = Response(lines(), mimetype="text/csv")
    resp.headers["Content-Disposition"] = f"attachment; filename=audit-{time.strftime('%Y%m%d')}.csv"
    return resp
