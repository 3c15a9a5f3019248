"""The queue and the outbox: jobs waiting or running, dead letters with their reason, retry one or all,
suspend and resume sending to a destination. Acting needs the technician or admin role."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, flash, g, redirect, render_template, request, url_for

from appliance.panel import queries
from appliance.panel.i18n import gettext
from appliance.panel.views.auth import ACT, audit, can_act, ctx, require, safe_next
from appliance.store.outbox import Outbox

bp = Blueprint("queue", __name__)
#: The largest row id SQLite can bind (a larger number in a form or body is refused, not a 500).
MAX_ROW_ID = 2**63 - 1


@bp.route("/queue")
def index() -> Any:
    c = ctx()
    return render_template("queue.html", q=queries.queue(c.config, c.store), can_act=can_act(g.user))


@bp.route("/live/queue")
def live() -> Any:
    c = ctx()
    return render_template("_queue_live.html", q=queries.queue(c.config, c.store), can_act=can_act(g.user))


def retry(ids: list[int] | None, all_dead: bool) -> int:
    n = Outbox(ctx().store.index).retry(ids, all_dead=all_dead)
    audit("retry", target="all dead letters" if all_dead else ",".join(str(i) for i in ids or []), detail=f"{n} row(s)")
    return n


def destination_names() -> set[str]:
    return {d.name for d in ctx().config.destinations}


def set_hold(destination: str, suspend: bool, reason: str | None = None) -> bool:
    if destination not in destination_names():
        abort(404)
    ob = Outbox(ctx().store.index)
    changed = ob.suspend(destination, g.user.name, reason) if suspend else ob.resume(destination)
    if changed:
        audit("suspend" if suspend else "resume", target=destination, detail=reason)
    return changed


@bp.route("/queue/retry", methods=["POST"])
@require(*ACT)
def retry_form() -> Any:
    if request.form.get("all") == "1":
        n = retry(None, True)
    else:
        try:
            ids = [int(request.form["id"])]
        except (KeyError, ValueError):
            abort(400)
        if not 0 < ids[0] <= MAX_ROW_ID:
            abort(400)
        n = retry(ids, False)
    flash(gettext("%(n)s dead letter(s) queued to send again.", n=n))
    return redirect(safe_next(request.form.get("back") or url_for("queue.index")))


@bp.route("/queue/destination/<name>/<action>", methods=["POST"])
@require(*ACT)
def hold_form(name: str, action: str) -> Any:
    if action not in ("suspend", "resume"):
        abort(404)
    set_hold(name, action == "suspend", (request.form.get("reason") or "").strip()[:200] or None)
    if action == "suspend":
        flash(gettext("Sending to %(name)s is suspended. Results wait until you resume it.", name=name))
    else:
        flash(gettext("Sending to %(name)s resumed.", name=name))
    return redirect(url_for("queue.index"))
