"""The panel's app factory: one Flask app per store, its blueprints, security headers, CSRF and languages.

Pages and the JSON API read through :mod:`appliance.panel.queries`, and write only through the store's own
operations (retry, suspend, users). ``appliance serve`` hands in callables that say which processes are
alive and what the readiness checks answer, the same ones ``/readyz`` on the metrics port uses; run alone
(``appliance panel``), the panel says it cannot see them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.middleware.proxy_fix import ProxyFix

from appliance import __version__
from appliance.config import Config
from appliance.metrics.collect import Check, ProcessView
from appliance.panel import i18n
from appliance.panel.slices import IsolatedDecoder, SliceRenderer
from appliance.store import SLICE_CACHE_DIR, Store
from appliance.store.users import secret

log = logging.getLogger("appliance.panel")

#: No inline script or style anywhere: every script and stylesheet is a file under /static.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none';"
    " frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


class HtmlSafeJSON(DefaultJSONProvider):
    """The API's JSON with ``<``, ``>``, ``&`` and ``'`` as ``\\u003c`` etc. (they only occur inside strings), so a
    DICOM header value stays inert even where a response is sniffed or embedded; keys keep the views' order."""

    sort_keys = False

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        text = super().dumps(obj, **kwargs)
        return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("'", "\\u0027")


class PanelContext:
    """What the views need besides the request: the config, the store, and the supervisor's view of its processes."""

    def __init__(
        self,
        config: Config,
        store: Store,
        processes: Callable[[], ProcessView] | None,
        checks: Callable[[], list[Check]] | None,
    ) -> None:
        self.config = config
        self.store = store
        self.processes = processes
        self.checks = checks
        self.slices = SliceRenderer(
            store.data_dir, store.index, store.data_dir / SLICE_CACHE_DIR, decoder=IsolatedDecoder()
        )


def create_app(
    config: Config,
    store: Store | None = None,
    *,
    processes: Callable[[], ProcessView] | None = None,
    checks: Callable[[], list[Check]] | None = None,
    testing: bool = False,
) -> Flask:
    store = store or Store.open(config.storage.data_dir)
    pc = config.panel
    app = Flask("appliance.panel", root_path=str(Path(__file__).parent))
    app.config.update(
        SECRET_KEY=secret(store.index, "panel-session"),  # sessions survive a restart
        SESSION_COOKIE_NAME="appliance_panel",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=pc.behind_tls_proxy,
        PERMANENT_SESSION_LIFETIME=timedelta(minutes=pc.idle_minutes),
        WTF_CSRF_TIME_LIMIT=None,  # bound to the session, which has its own idle timeout
        WTF_CSRF_SSL_STRICT=pc.behind_tls_proxy,
        MAX_CONTENT_LENGTH=64 * 1024,  # forms and API bodies are small; nothing bigger is read
        MAX_FORM_PARTS=100,
        TESTING=testing,
    )
    app.json = HtmlSafeJSON(app)  # JSON_SORT_KEYS is gone from Flask 3: the provider says it
    if pc.behind_tls_proxy:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)  # type: ignore[method-assign]
    app.extensions["panel"] = PanelContext(config, store, processes, checks)
    app.jinja_env.autoescape = True
    CSRFProtect(app)
    i18n.init_app(app, pc.default_language, store.data_dir)

    from appliance.panel.views import api, audit, auth, dashboard, health, models, queue, series, settings, users

    for bp in (
        health.bp,
        auth.bp,
        dashboard.bp,
        series.bp,
        queue.bp,
        models.bp,
        audit.bp,
        users.bp,
        settings.bp,
        api.bp,
    ):
        app.register_blueprint(bp)
    app.before_request(auth.load_user)

    @app.context_processor
    def _globals() -> dict[str, Any]:
        return {"version": __version__, "device": config.device}

    @app.errorhandler(CSRFError)
    def _csrf(err: CSRFError) -> tuple[Any, int]:
        log.warning(
            "panel: refused a request without a valid CSRF token from %s to %s", request.remote_addr, request.path
        )
        if request.path.startswith("/api/"):
            return jsonify(error="missing or invalid CSRF token (send the X-CSRFToken header)"), 400
        from flask import render_template

        return render_template(
            "error.html",
            code=400,
            message=i18n.gettext("The form expired or was not sent by this panel. Reload the page and try again."),
        ), 400

    @app.errorhandler(404)
    def _not_found(err: Any) -> tuple[Any, int]:
        if request.path.startswith("/api/"):
            return jsonify(error=f"no such resource: {request.path}"), 404
        from flask import render_template

        return render_template("error.html", code=404, message=i18n.gettext("This page does not exist.")), 404

    @app.errorhandler(405)
    def _method(err: Any) -> Any:
        if request.path.startswith("/api/"):
            resp = jsonify(error=f"{request.method} is not allowed on {request.path}")
            resp.status_code = 405
            if getattr(err, "valid_methods", None):
                resp.headers["Allow"] = ", ".join(err.valid_methods)
            return resp
        return err

    @app.errorhandler(403)
    def _forbidden(err: Any) -> tuple[Any, int]:
        from flask import render_template

        return render_template(
            "error.html", code=403, message=i18n.gettext("Your role may not do this. Ask an administrator.")
        ), 403

    @app.errorhandler(400)
    def _bad(err: Any) -> tuple[Any, int]:
        if request.path.startswith("/api/"):
            return jsonify(error="bad request"), 400
        from flask import render_template

        return render_template("error.html", code=400, message=i18n.gettext("The request was not understood.")), 400

    @app.errorhandler(413)
    def _too_big(err: Any) -> tuple[Any, int]:
        return jsonify(error="request body too large"), 413

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Referrer-Policy"] = "same-origin"
        if not request.path.startswith("/static/") and "Cache-Control" not in resp.headers:
            resp.headers["Cache-Control"] = "no-store"  # pages carry patient data
        if getattr(g, "user", None) is not None:
            resp.headers["Vary"] = "Cookie, Accept-Language"
        return resp

    return app
