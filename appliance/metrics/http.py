"""``/metrics``, ``/healthz`` and ``/readyz``: a small WSGI app on a thread of ``appliance serve``.

``/metrics`` speaks the Prometheus text format, or OpenMetrics when the scraper's Accept header asks for it.
``/readyz`` is what a load balancer or a fleet's probe asks: 200 when the box can take and process studies,
503 with the reason for each failing check otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import ThreadingWSGIServer, choose_encoder

from appliance.config import Config
from appliance.metrics.collect import Check, ModelView, ProcessView, StoreCollector
from appliance.metrics.gpu import GpuSource
from appliance.store import Store

log = logging.getLogger("appliance.metrics")


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.debug("metrics http: " + format, *args)


class MetricsApp:
    def __init__(
        self,
        config: Config,
        store: Store,
        processes: Callable[[], ProcessView],
        models: Callable[[], list[ModelView]],
        gpu: GpuSource | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.processes = processes
        self.models = models
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StoreCollector(config, store, processes, models, gpu, checks=self.checks))

    # -- checks -------------------------------------------------------------------------------------

    def checks(self) -> list[Check]:
        view = self.processes()
        out = [self._store_writable()]
        out.append(
            Check(
                "listeners",
                view.listeners > 0 and view.listeners_alive == view.listeners,
                ""
                if view.listeners_alive == view.listeners
                else f"{view.listeners - view.listeners_alive} of {view.listeners} DICOM listener(s) not running",
            )
        )
        out.append(
            Check("worker", view.worker_alive, "" if view.worker_alive else "the inference worker is not running")
        )
        wanted = {m for r in self.config.routes for m in r.models}
        have = {m.name for m in self.models()}
        missing = sorted(wanted - have)
        out.append(Check("models", not missing, f"routed model(s) not loaded: {', '.join(missing)}" if missing else ""))
        try:
            free = self.store.spool.free_bytes()
            reserve = self.config.storage.min_free_bytes
            out.append(
                Check(
                    "disk",
                    free >= reserve,
                    ""
                    if free >= reserve
                    else f"{free} bytes free on the data filesystem, below the {reserve}-byte reserve",
                )
            )
        except OSError as exc:
            out.append(Check("disk", False, f"cannot read the data filesystem's free space: {exc}"))
        return out

    def _store_writable(self) -> Check:
        probe = self.store.data_dir / "run" / f".ready-{os.getpid()}-{threading.get_ident()}"
        try:
            probe.parent.mkdir(mode=0o750, exist_ok=True)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            os.close(fd)
            os.unlink(probe)
            return Check("store", True)
        except OSError as exc:
            return Check("store", False, f"the data directory is not writable: {exc.strerror or exc}")

    # -- WSGI ---------------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
            try:
                body = encoder(self.registry)
            except Exception as exc:  # the store unreadable: say so, do not crash the thread
                log.error("metrics: cannot collect: %s: %s", type(exc).__name__, exc)
                return self._json(start_response, "500 Internal Server Error", {"error": f"cannot collect: {exc}"})
            start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
            return [body]
        if path == "/healthz":
            return self._json(start_response, "200 OK", {"status": "alive"})
        if path == "/readyz":
            checks = self.checks()
            ready = all(c.ok for c in checks)
            report = {
                "status": "ready" if ready else "not ready",
                "checks": {c.name: {"ok": c.ok, **({"reason": c.reason} if c.reason else {})} for c in checks},
            }
            return self._json(start_response, "200 OK" if ready else "503 Service Unavailable", report)
        return self._json(
            start_response, "404 Not Found", {"error": f"no such page {path!r}: /metrics, /healthz, /readyz"}
        )

    @staticmethod
    def _json(start_response: Callable[..., Any], status: str, body: dict[str, Any]) -> list[bytes]:
        data = (json.dumps(body) + "\n").encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]


class MetricsServer:
    """The app on ``[metrics] bind``/``port``, served from daemon threads until :meth:`stop`."""

    def __init__(self, app: MetricsApp, bind: str, port: int) -> None:
        self.app = app
        self.httpd: WSGIServer = make_server(bind, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics (health: /healthz, /readyz)", self.app.config.metrics.bind, self.port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
