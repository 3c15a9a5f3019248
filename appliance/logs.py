"""Logging set-up shared by every process of the appliance."""

from __future__ import annotations

import logging
import sys


def setup(level: str = "INFO") -> None:
    """One line per event on stderr (journald adds its own timestamps; a plain run needs them)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s [%(processName)s] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO/DEBUG; its warnings and errors are what an operator needs.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level != "DEBUG" else logging.INFO)
