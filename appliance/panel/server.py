"""The panel behind waitress, a production WSGI server: a bounded thread pool, bounded request sizes, no
debugger. ``appliance serve`` runs it on a thread; ``appliance panel`` runs it alone in the foreground."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from appliance.config import Config
from appliance.metrics.collect import Check, ProcessView
from appliance.store import Store

log = logging.getLogger("appliance.panel")


class PanelServer:
    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        processes: Callable[[], ProcessView] | None = None,
        checks: Callable[[], list[Check]] | None = None,
    ) -> None:
        from waitress.server import create_server

        from appliance.panel.app import create_app

        pc = config.panel
        self.config = config
        self.app = create_app(config, store, processes=processes, checks=checks)
        self.server: Any = create_server(
            self.app,
            host=pc.bind,
            port=pc.port,
            threads=pc.threads,
            ident="appliance-panel",
            max_request_header_size=32 * 1024,
            max_request_body_size=64 * 1024,
            channel_timeout=60,
            connection_limit=200,
            # behind a TLS proxy, the app's ProxyFix reads X-Forwarded-For/-Proto (one hop); waitress passes them
        )
        self.port = int(self.server.effective_port)  # waitress gives it as a string
        self._thread = threading.Thread(target=self._run, name="panel", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run()
        except Exception as exc:  # the loop ended by stop(), or a socket error: logged, never fatal to reception
            if not getattr(self, "_stopping", False):
                log.error("panel server stopped: %s: %s", type(exc).__name__, exc)

    def start(self) -> None:
        self._thread.start()
        log.info(
            "panel on http://%s:%d/ (log in with an account made by 'appliance users add')",
            self.config.panel.bind,
            self.port,
        )

    def serve_forever(self) -> None:
        log.info("panel on http://%s:%d/", self.config.panel.bind, self.port)
        self.server.run()

    def stop(self) -> None:
        """Stop accepting, then let requests in progress finish (up to 5 s) before the caller closes the store."""
        self._stopping = True
        try:
            self.server.close()
        except Exception as exc:  # closing an already closed socket map
            log.debug("panel close: %s", exc)
        try:
            self.server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
        except Exception as exc:  # threads already gone
            log.debug("panel shutdown: %s", exc)
        close = getattr(getattr(self.app.extensions["panel"].slices, "decoder", None), "close", None)
        if close is not None:
            close()  # the decoding children
