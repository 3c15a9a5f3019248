"""``/api/v1``: the panel's data as JSON, from the same query layer as the pages.

Authentication is the panel's session cookie (log in with ``POST /login``); state-changing calls need
the session's CSRF token in an ``X-CSRFToken`` header (``GET /api/v1/csrf`` returns it). Values from DICOM
headers are returned as received; JSON escaping (``<`` as ``\\u003c``) keeps them inert in any page.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, g, jsonify, request
from flask_wtf.csrf import generate_csrf

from appliance import __version__
from appliance.panel import queries
from appliance.panel.views import dashboard as dashboard_view
from appliance.panel.views import queue as queue_view
from appliance.panel.views.auth import ACT, audit, ctx, require
from appliance.panel.views.series import filter_from, page_from

bp = Blueprint("api", __name__, url_prefix="/api/v1")


def _json(body: Any, status: int = 200) -> Any:
    resp = jsonify(body)
    resp.status_code = status
    return resp


@bp.route("/")
def index() -> Any:
    return _json(
        {
            "version": __version__,
            "user": {"name": g.user.name, "role": g.user.role},
            "endpoints": [
                "GET /api/v1/health",
                "GET /api/v1/dashboard",
                "GET /api/v1/series?q=&modality=&state=&from=YYYY-MM-DD&to=YYYY-MM-DD&page=&per_page=",
                "GET /api/v1/series/<uid>",
                "GET /api/v1/series/<uid>/timeline",
                "GET /api/v1/jobs",
                "GET /api/v1/models",
                "GET /api/v1/outbox",
                "POST /api/v1/outbox/retry {ids: [..]} or {all: true}",
                "POST /api/v1/destinations/<name>/suspend | resume",
                "GET /api/v1/csrf",
            ],
        }
    )


@bp.route("/csrf")
def csrf() -> Any:
    return _json({"csrf_token": generate_csrf()})


@bp.route("/health")
def health() -> Any:
    d = dashboard_view.data()
    return _json({"health": d["health"], "disk": d["disk"], "backends": d["backends"]})


@bp.route("/dashboard")
def dashboard() -> Any:
    return _json(dashboard_view.data())


@bp.route("/series")
def series_list() -> Any:
    try:
        per_page = max(1, min(int(request.args.get("per_page", queries.PAGE_SIZE)), 200))
    except ValueError:
        per_page = queries.PAGE_SIZE
    return _json(queries.series_list(ctx().store, filter_from(request.args), page_from(request.args), per_page))


def _detail(uid: str) -> dict[str, Any]:
    d = queries.series_detail(ctx().store, uid) if len(uid) <= 64 else None
    if d is None:
        abort(404)
    return d


@bp.route("/series/<uid>")
def series_detail(uid: str) -> Any:
    d = _detail(uid)
    audit("view_series", target=uid, detail="api")
    return _json(d)


@bp.route("/series/<uid>/timeline")
def timeline(uid: str) -> Any:
    return _json({"series_uid": uid, "timeline": _detail(uid)["timeline"]})


@bp.route("/jobs")
def jobs() -> Any:
    q = queries.queue(ctx().config, ctx().store)
    return _json({"active": q["jobs"], "failed": q["failed_jobs"]})


@bp.route("/models")
def models() -> Any:
    return _json(queries.models(ctx().config, ctx().store))


@bp.route("/outbox")
def outbox() -> Any:
    q = queries.queue(ctx().config, ctx().store)
    return _json({"destinations": q["destinations"], "dead": q["dead"], "pending": q["pending"]})


@bp.route("/outbox/retry", methods=["POST"])
@require(*ACT)
def retry() -> Any:
    body = request.get_json(silent=True)
    body = body if isinstance(body, dict) else {}
    if body.get("all") is True:
        return _json({"retried": queue_view.retry(None, True)})
    ids = body.get("ids")
    if (
        not isinstance(ids, list)
        or not ids
        or len(ids) > 1000
        or not all(type(i) is int and 0 < i <= queue_view.MAX_ROW_ID for i in ids)
    ):
        return _json({"error": 'send {"ids": [outbox row ids]} or {"all": true}'}, 400)
    return _json({"retried": queue_view.retry(ids, False)})


@bp.route("/destinations/<name>/<action>", methods=["POST"])
@require(*ACT)
def hold(name: str, action: str) -> Any:
    if action not in ("suspend", "resume"):
        abort(404)
    body = request.get_json(silent=True)
    body = body if isinstance(body, dict) else {}
    reason = body.get("reason") if isinstance(body.get("reason"), str) else None
    changed = queue_view.set_hold(name, action == "suspend", reason[:200] if reason else None)
    return _json({"destination": name, "suspended": action == "suspend", "changed": changed})
