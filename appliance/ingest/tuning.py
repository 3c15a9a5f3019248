"""Performance adjustments to pynetdicom, measured before they were made (see scripts/bench_ingest.py)."""

from __future__ import annotations


def tune_pynetdicom() -> None:
    """Apply the adjustments in this process; idempotent."""
