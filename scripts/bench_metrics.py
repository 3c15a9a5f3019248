#!/usr/bin/env python3
"""What a Prometheus scrape of ``/metrics`` costs on a box that holds many series.

Run from the project root with the project's environment:

    .venv/bin/python scripts/bench_metrics.py [--series 100000] [--scrapes 20]

A store is filled with ``--series`` series (one instance each, spread over every series state, with jobs and
outbox rows for a tenth of them) in one transaction, then the real ``/metrics`` WSGI app is scraped
``--scrapes`` times. The reference, measured in the same run, is rendering the same number of samples from an
in-memory registry (no store): the ratio says what reading the store adds. Goal: a scrape under 50 ms at
100,000 series. JSON in bench-results/bench_metrics.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from appliance.config import parse_config
from appliance.metrics.collect import ModelView, ProcessView
from appliance.metrics.http import MetricsApp
from appliance.store import Store
from appliance.store.states import JobState, OutboxState, SeriesState
from appliance_dev.harness import PROJECT_ROOT, progress

DEFAULT_JSON = PROJECT_ROOT / "bench-results" / "bench_metrics.json"


def fill(store: Store, n: int) -> None:
    """``n`` series (bulk SQL: this is a benchmark's fixture, not the appliance's write path)."""
    states = list(SeriesState)
    now = time.time()
    c = store.index.conn
    c.execute("BEGIN")
    c.executemany(
        "INSERT INTO series(series_uid, study_uid, modality, state, instances, bytes, first_received, last_received,"
        " state_changed, state_reason) VALUES (?, ?, 'CT', ?, 1, 1000, ?, ?, ?, 'bench')",
        [(f"1.2.{i}", f"1.3.{i}", str(states[i % len(states)]), now, now, now) for i in range(n)])
    c.executemany(
        "INSERT INTO instances(sop_instance_uid, sop_class_uid, series_uid, study_uid, transfer_syntax, path, size,"
        " received_at) VALUES (?, '1.2.840.10008.5.1.4.1.1.2', ?, ?, '1.2.840.10008.1.2.1', ?, 1000, ?)",
        [(f"1.4.{i}", f"1.2.{i}", f"1.3.{i}", f"p/{i}", now) for i in range(n)])
    c.executemany(
        "INSERT INTO jobs(series_uid, model, routes, destinations, priority, state, queued_at, reason)"
        " VALUES (?, 'liver-ct-demo', '[]', '[\"pacs\"]', 0, ?, ?, 'bench')",
        [(f"1.2.{i}", str(JobState.DONE), now) for i in range(0, n, 10)])
    jobs = [r[0] for r in c.execute("SELECT id FROM jobs")]
    c.executemany(
        "INSERT INTO result_objects(job_id, generation, series_uid, kind, sop_class_uid, sop_instance_uid,"
        " result_series_uid, path, created_at) VALUES (?, 0, ?, 'SEG', '1.2.840.10008.5.1.4.1.1.66.4', ?, ?, 'x', ?)",
        [(j, f"1.2.{j}", f"1.5.{j}", f"1.6.{j}", now) for j in jobs])
    objs = [r[0] for r in c.execute("SELECT id FROM result_objects")]
    outbox_states = [OutboxState.SENT, OutboxState.SENT, OutboxState.PENDING, OutboxState.DEAD]
    c.executemany(
        "INSERT INTO outbox(object_id, series_uid, destination, state, next_attempt_at, created_at)"
        " VALUES (?, ?, 'pacs', ?, ?, ?)",
        [(o, f"1.2.{o}", str(outbox_states[o % 4]), now, now) for o in objs])
    c.execute("COMMIT")


def scrape_ms(app: MetricsApp) -> tuple[float, int]:
    t = time.perf_counter()
    body = b"".join(app({"PATH_INFO": "/metrics", "HTTP_ACCEPT": ""}, lambda s, h: None))
    return (time.perf_counter() - t) * 1000, body.count(b"\n")


def reference_ms(samples: int) -> float:
    reg = CollectorRegistry()
    g = Gauge("bench_gauge", "reference", ["k"], registry=reg)
    for i in range(samples):
        g.labels(str(i)).set(i)
    t = time.perf_counter()
    generate_latest(reg)
    return (time.perf_counter() - t) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=100_000, help="series rows in the store (default 100000)")
    ap.add_argument("--scrapes", type=int, default=20, help="timed scrapes (default 20)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as td:
        store = Store.open(Path(td))
        progress(f"filling a store with {args.series} series")
        fill(store, args.series)
        config = parse_config({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                                 "port": 104}], "storage": {"min_free_bytes": 0}})
        app = MetricsApp(config, store, lambda: ProcessView(0, 4, 4, True), lambda: [ModelView("liver-ct-demo", "1")])
        scrape_ms(app)  # warm
        times, lines = [], 0
        for _ in range(args.scrapes):
            ms, lines = scrape_ms(app)
            times.append(ms)
        ref = statistics.median(reference_ms(lines) for _ in range(5))
    med = statistics.median(times)
    result = {"series": args.series, "scrapes": args.scrapes, "scrape_ms_median": round(med, 2),
              "scrape_ms_max": round(max(times), 2), "exposition_lines": lines, "reference_ms": round(ref, 3),
              "goal_ms": 50.0, "python": sys.version.split()[0]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"scrape of {args.series} series: median {med:.1f} ms, max {max(times):.1f} ms ({lines} lines); "
          f"rendering as many samples from memory {ref:.2f} ms; scrape/reference {med / ref:.1f}x; "
          f"goal <= 50 ms: {'met' if med <= 50 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
