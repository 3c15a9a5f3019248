"""The ``assemble`` stage: decides when a series is complete.

A series is complete when no instance arrived for ``stable_seconds``, or when every association that
delivered to it released normally and ``release_grace_seconds`` passed. A late instance re-opens it
(ingest does that in the same transaction that indexes the instance). All state is in the store, so
after a restart the same rules simply apply again.
"""

from __future__ import annotations

import logging
import threading
import time

from appliance.config import AssembleConfig
from appliance.store import Index

log = logging.getLogger("appliance.assemble")


class Assembler:
    def __init__(self, index: Index, config: AssembleConfig) -> None:
        self.index = index
        self.config = config

    def tick(self, now: float | None = None) -> list[str]:
        done = self.index.complete_quiet_series(
            time.time() if now is None else now, self.config.stable_seconds, self.config.release_grace_seconds
        )
        for uid in done:
            log.info("series %s complete", uid)
        return done

    def run(self, stop: threading.Event) -> None:
        """Tick until ``stop`` is set; a failing tick is logged and retried, never fatal."""
        while not stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("assembler tick failed; retrying")
            stop.wait(self.config.poll_seconds)
