"""Login, logout, the session's user, and the role checks every other view declares.

Everything but ``/healthz``, ``/readyz``, ``/login`` and ``/static`` needs a session: a page without one is
sent to the login form, an API call gets 401. The session cookie is signed (Flask), ``HttpOnly``,
``SameSite=Strict``, ``Secure`` behind TLS; a session idle for ``[panel] idle_minutes`` ends; the user's
row is read on every request, so a disabled, removed or re-roled user is seen at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from flask import Blueprint, abort, current_app, flash, g, jsonify, redirect, render_template, request, session, url_for

from appliance.panel.i18n import LANGUAGES, gettext
from appliance.store.users import Audit, Throttle, User, Users

bp = Blueprint("auth", __name__)

F = TypeVar("F", bound=Callable[..., Any])
OPEN_ENDPOINTS = {"auth.login", "auth.language", "health.healthz", "health.readyz", "static"}
#: Roles allowed to act (retry, suspend); viewers read only. Admins also manage users.
ACT = ("admin", "technician")


def ctx() -> Any:
    return current_app.extensions["panel"]


def users() -> Users:
    return Users(ctx().store.index)


def audit(action: str, target: str | None = None, detail: str | None = None, username: str | None = None) -> None:
    user = getattr(g, "user", None)
    Audit(ctx().store.index).record(
        action,
        username=username if username is not None else (user.name if user else None),
        address=request.remote_addr,
        target=target,
        detail=detail,
    )


def load_user() -> Any:
    """Before every request: the session's user (or none), the idle timeout, and the login wall."""
    g.user = None
    name = session.get("user")
    if name:
        idle = ctx().config.panel.idle_minutes * 60
        now = time.time()
        user = users().get(name)
        if user is None or user.disabled or now - float(session.get("seen", 0)) > idle:
            session.clear()
        else:
            g.user = user
            if request.headers.get("X-Panel-Refresh") != "1":  # the page's own refresh is not activity
                session["seen"] = now
    if g.user is None and request.endpoint not in OPEN_ENDPOINTS:
        if request.path.startswith("/api/"):
            return jsonify(error="log in first (POST /login), then call the API with the session cookie"), 401
        if request.headers.get("X-Panel-Refresh") == "1":
            return "", 401
        return redirect(url_for("auth.login", next=request.full_path if request.method == "GET" else None))
    return None


def require(*roles: str) -> Callable[[F], F]:
    """Only these roles may call the view (others get 403, and the attempt is logged)."""

    def deco(view: F) -> F:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if g.user is None or g.user.role not in roles:
                current_app.logger.warning(
                    "panel: %s (%s) may not %s",
                    g.user.name if g.user else "-",
                    g.user.role if g.user else "-",
                    request.path,
                )
                if request.path.startswith("/api/"):
                    return jsonify(error=f"your role may not do this (needs {' or '.join(roles)})"), 403
                abort(403)
            return view(*args, **kwargs)

        return cast(F, wrapper)

    return deco


def can_act(user: User | None) -> bool:
    return user is not None and user.role in ACT


def safe_next(target: str | None) -> str:
    """Only a path on this panel: never an absolute URL an attacker put in ``next``."""
    if not target:
        return url_for("dashboard.index")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return url_for("dashboard.index")
    return target


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    if request.method == "GET":
        if g.user is not None:
            return redirect(url_for("dashboard.index"))
        return render_template("login.html", next=request.args.get("next", ""), no_users=users().count() == 0)
    name = (request.form.get("username") or "").strip()[:64]
    password = (request.form.get("password") or "")[:1024]
    pc = ctx().config.panel
    throttle = Throttle(
        pc.lockout_account_failures, pc.lockout_address_failures, pc.lockout_window_seconds, pc.lockout_seconds
    )
    user, why, started = users().authenticate(name, password, request.remote_addr or "-", throttle)
    for kind in started:
        audit("lockout", target=f"{kind}:{name if kind == 'account' else request.remote_addr}", username=name)
        current_app.logger.warning(
            "panel: %s locked after repeated failed logins (%s from %s)", kind, name, request.remote_addr
        )
    if user is None:
        if why != "locked_address":  # a locked address is refused without a trace: a flood leaves no rows
            audit("login_failed", target=name, detail=why, username=name)
        if why and why.startswith("locked"):
            msg = gettext(
                "Too many failed logins: this account or this computer is locked for a while. An administrator can unlock it."
            )
        else:
            msg = gettext("Wrong user name or password.")
        return render_template("login.html", next=request.form.get("next", ""), error=msg, no_users=False), 401
    lang = session.get("lang")
    session.clear()
    session.permanent = True
    session["user"] = user.name
    session["seen"] = time.time()
    if lang:
        session["lang"] = lang
    g.user = user
    audit("login", target=user.name)
    return redirect(safe_next(request.form.get("next")))


@bp.route("/logout", methods=["POST"])
def logout() -> Any:
    audit("logout", target=g.user.name)
    session.clear()
    flash(gettext("You are logged out."))
    return redirect(url_for("auth.login"))


@bp.route("/language", methods=["POST"])
def language() -> Any:
    """The language picker: a user's choice is saved with the account; before login, for this session."""
    lang = request.form.get("lang", "")
    if lang not in LANGUAGES and lang != "auto":
        abort(400)
    if g.user is not None:
        users().update(g.user.name, language=None if lang == "auto" else lang)
    if lang == "auto":
        session.pop("lang", None)
    else:
        session["lang"] = lang
    return redirect(safe_next(request.form.get("next")))
