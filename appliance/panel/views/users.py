"""User management (admin only): add, change role, disable, reset a password, lift a lockout."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, flash, g, redirect, render_template, request, url_for

from appliance.panel.i18n import gettext
from appliance.panel.views.auth import audit, require, users
from appliance.store.users import ROLES, UserError, WeakPasswordError

bp = Blueprint("users", __name__)


def _WEAK() -> str:  # noqa: N802 (reads as the message it is)
    return gettext(
        "Password refused: it is too easy to guess. Use at least 12 characters, not a common password and not "
        "the user name; a short sentence works well."
    )


@bp.route("/users")
@require("admin")
def index() -> Any:
    u = users()
    return render_template("users.html", users=u.list(), lockouts=u.lockouts(), roles=ROLES)


@bp.route("/users/add", methods=["POST"])
@require("admin")
def add() -> Any:
    name = (request.form.get("name") or "").strip()
    role = request.form.get("role", "")
    password = request.form.get("password", "")
    if password != request.form.get("password2", ""):
        flash(gettext("The two passwords differ."), "error")
        return redirect(url_for("users.index"))
    try:
        users().add(name, role, password)
    except WeakPasswordError:
        flash(_WEAK(), "error")
        return redirect(url_for("users.index"))
    except UserError as exc:
        flash(gettext("User not added: %(why)s", why=str(exc)), "error")
        return redirect(url_for("users.index"))
    audit("user_add", target=name, detail=f"role={role}")
    flash(gettext("User %(name)s added.", name=name))
    return redirect(url_for("users.index"))


@bp.route("/users/<name>/change", methods=["POST"])
@require("admin")
def change(name: str) -> Any:
    u = users()
    if u.get(name) is None:
        abort(404)
    action = request.form.get("action", "")
    try:
        if action == "role":
            u.update(name, role=request.form.get("role", ""))
            detail = f"role={request.form.get('role')}"
        elif action in ("disable", "enable"):
            if name == g.user.name and action == "disable":
                raise UserError("you cannot disable your own account")
            u.update(name, disabled=action == "disable")
            detail = action
        elif action == "password":
            if request.form.get("password", "") != request.form.get("password2", ""):
                raise UserError("the two passwords differ")
            u.update(name, password=request.form.get("password", ""))
            detail = "password reset"
        elif action == "remove":
            if name == g.user.name:
                raise UserError("you cannot remove your own account")
            u.remove(name)
            audit("user_remove", target=name)
            flash(gettext("User %(name)s removed.", name=name))
            return redirect(url_for("users.index"))
        else:
            abort(400)
    except WeakPasswordError:
        flash(_WEAK(), "error")
        return redirect(url_for("users.index"))
    except UserError as exc:
        flash(gettext("Not changed: %(why)s", why=str(exc)), "error")
        return redirect(url_for("users.index"))
    audit("user_change", target=name, detail=detail)
    flash(gettext("User %(name)s changed.", name=name))
    return redirect(url_for("users.index"))


@bp.route("/users/unlock", methods=["POST"])
@require("admin")
def unlock() -> Any:
    kind, key = request.form.get("kind", ""), request.form.get("key", "")
    if kind not in ("account", "address") or not key:
        abort(400)
    if users().unlock(kind, key):
        audit("unlock", target=f"{kind}:{key}")
        flash(gettext("Lockout lifted."))
    return redirect(url_for("users.index"))
