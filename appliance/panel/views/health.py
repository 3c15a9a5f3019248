"""``/healthz`` and ``/readyz`` on the panel's port too, with the answers of the metrics port's checks,
so a load balancer in front of the panel needs no second port. Open without login: they name no patient."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify

bp = Blueprint("health", __name__)


@bp.route("/healthz")
def healthz() -> Any:
    return jsonify(status="alive")


@bp.route("/readyz")
def readyz() -> Any:
    checks_fn = current_app.extensions["panel"].checks
    if checks_fn is None:
        return jsonify(
            status="unknown", reason="the panel runs outside 'appliance serve' and cannot see its processes"
        ), 503
    checks = checks_fn()
    ready = all(c.ok for c in checks)
    body = {
        "status": "ready" if ready else "not ready",
        "checks": {c.name: {"ok": c.ok, **({"reason": c.reason} if c.reason else {})} for c in checks},
    }
    return jsonify(body), 200 if ready else 503
