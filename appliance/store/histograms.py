"""Latency histograms kept in the index, so every process observes into the same ones.

Listeners, the worker and the sender are separate processes; a histogram in one process's memory would show
a fraction of the box. An observation is one upsert into ``counters`` inside the transaction that records
what it measures (the instance's commit, the job's outcome, the delivery), so it costs no commit of its own,
survives restarts and never goes backwards. Buckets are stored per bucket (not cumulative); the exporter adds
them up. Sums are kept in microseconds (integers, exact).
"""

from __future__ import annotations

import bisect
import sqlite3
from dataclasses import dataclass


@dataclass(frozen=True)
class Buckets:
    name: str
    bounds: tuple[float, ...]  # upper bounds in seconds, ascending; +Inf is implied


#: One instance from its data set in memory to durable (file fsynced, index row committed): ms.
STORE = Buckets("store", (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
#: One stage of one job (decode ... results): tens of ms to minutes.
STAGE = Buckets("stage", (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0))
#: Last instance of a series to its job starting, and to every result acknowledged by its destinations.
WAIT = Buckets("wait", (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0))


def _key(metric: str, label: str) -> str:
    return f"{metric}\x1f{label}"


def observe(c: sqlite3.Connection, metric: str, buckets: Buckets, seconds: float, label: str = "") -> None:
    """Count one observation of ``seconds`` (negative clock steps count as 0) in ``c``'s transaction."""
    seconds = max(0.0, seconds)
    i = bisect.bisect_left(buckets.bounds, seconds)
    le = f"{buckets.bounds[i]:g}" if i < len(buckets.bounds) else "+Inf"
    c.execute(
        "INSERT INTO counters(name, label, value) VALUES (?, ?, 1), (?, ?, 1), (?, ?, ?)"
        " ON CONFLICT(name, label) DO UPDATE SET value = value + excluded.value",
        (
            f"hist_bucket:{metric}",
            _key(le, label),
            f"hist_count:{metric}",
            label,
            f"hist_sum_us:{metric}",
            label,
            int(round(seconds * 1e6)),
        ),
    )


@dataclass
class Histogram:
    """One label's histogram as exported: cumulative bucket counts, the count and the sum in seconds."""

    buckets: list[tuple[str, int]]
    count: int
    sum_seconds: float


def read(counters: dict[tuple[str, str], int], metric: str, buckets: Buckets) -> dict[str, Histogram]:
    """The histograms of ``metric`` by label, from a :meth:`Index.counters` snapshot."""
    per: dict[str, dict[str, int]] = {}
    counts: dict[str, int] = {}
    sums: dict[str, int] = {}
    for (name, label), value in counters.items():
        if name == f"hist_bucket:{metric}":
            le, _, lab = label.partition("\x1f")
            per.setdefault(lab, {})[le] = value
        elif name == f"hist_count:{metric}":
            counts[label] = value
        elif name == f"hist_sum_us:{metric}":
            sums[label] = value
    out = {}
    for lab in counts:
        raw = per.get(lab, {})
        running, cum = 0, []
        for b in [*(f"{x:g}" for x in buckets.bounds), "+Inf"]:
            running += raw.get(b, 0)
            cum.append((b, running))
        out[lab] = Histogram(cum, counts[lab], sums.get(lab, 0) / 1e6)
    return out
