#!/usr/bin/env python3
"""How fast the technician panel answers on a box that holds many series.

Run from the project root with the project's environment:

    .venv/bin/python scripts/bench_panel.py [--series 100000] [--requests 30]

The issue's scale requirement: with 100,000 series rows in the store, the series list and the dashboard
answer in under 200 ms. A fresh store (a temporary directory) is filled with ``--series`` series in one
transaction of bulk SQL inserts (this benchmark's fixture, not the appliance's write path): studies of 1-4
series of CT, MR, US and CR with Vietnamese, Korean and a few Latin patient names, patient IDs, accession
numbers and study dates; first received over the last 30 days, ~2% of them today; every series state,
most series ``done``; one job per routed series with its backend and times, two result objects per job
done, one outbox row per object (mostly sent, some dead, some pending) with its send attempts, and the
state trails (series_events, job_events, outbox_events) a real run leaves. Instance rows are written for
the one series whose page is timed only (the pages read no other instance row; 100,000 series of CT would
be ~30 million of them).

Then the real panel runs: :class:`appliance.panel.server.PanelServer` (waitress, the production WSGI
server) on a free loopback port, logged in through the login form (cookie jar, CSRF token) with urllib.
Every page is requested ``--requests`` times, the pages taking turns so that drift of the machine spreads
over all of them, after ``--warmup`` untimed rounds. The reference, measured in the same run on the same
server, is ``/healthz``: no store, no template, the floor of the HTTP stack; each page's median is printed
with its ratio to that floor. Goal: median under 200 ms, judged on the dashboard and the series list (paged,
searched, filtered) and on their ``/api/v1`` twins; the series page is shown for context.

This is a benchmark, not a test: numbers go to stdout (the goal line last) and to JSON (``--json``),
progress to stderr. The exit status is 1 only when a request failed (a non-200 answer or an empty body),
never because a goal was missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.cookiejar
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.config import parse_config
from appliance.store import Store
from appliance.store.browse import day_start
from appliance.store.states import JobState, OutboxState, SeriesState
from appliance.store.users import Users
from appliance_dev.harness import PROJECT_ROOT, fmt, free_port, progress

DEFAULT_JSON = PROJECT_ROOT / "bench-results" / "bench_panel.json"
GOAL_MS = 200.0
USER, PASSWORD = "technician1", "Hue-Seoul-2026-panel"
DAY = 86400.0

# -------------------------------------------------------------------------------------------- the fixture

_VI_FAMILY = ["Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Huỳnh", "Phan", "Vũ", "Võ", "Đặng", "Bùi", "Đỗ", "Hồ",
              "Ngô", "Dương", "Lý"]
_VI_MIDDLE = ["Văn", "Thị", "Hữu", "Đức", "Minh", "Ngọc", "Thanh", "Quốc", "Xuân", "Thu"]
_VI_GIVEN = ["An", "Bình", "Cường", "Dũng", "Hà", "Hải", "Hạnh", "Hoa", "Hùng", "Lan", "Linh", "Mai", "Nam",
             "Phương", "Quang", "Thảo", "Trang", "Tuấn", "Việt", "Yến", "Khánh", "Long", "Sơn", "Tâm"]
_KO_FAMILY = [("김", "KIM"), ("이", "LEE"), ("박", "PARK"), ("최", "CHOI"), ("정", "JUNG"), ("강", "KANG"),
              ("조", "CHO"), ("윤", "YOON"), ("장", "JANG"), ("임", "LIM")]
_KO_GIVEN = [("민준", "MINJUN"), ("서연", "SEOYEON"), ("지훈", "JIHOON"), ("수빈", "SUBIN"), ("현우", "HYUNWOO"),
             ("지민", "JIMIN"), ("예은", "YEEUN"), ("도윤", "DOYOON"), ("하은", "HAEUN"), ("성민", "SUNGMIN"),
             ("영희", "YOUNGHEE"), ("철수", "CHULSOO")]
_LATIN = [("SMITH", "JOHN"), ("MÜLLER", "ANNA"), ("GARCÍA", "LUIS"), ("DUBOIS", "MARIE"), ("ROSSI", "MARCO")]
_ASCII = str.maketrans("ĂÂĐÊÔƠƯăâđêôơư", "AADEOOUaadeoou")

#: (modality, share of studies, series per study (lo, hi), instances (lo, hi), bytes per instance, model or None)
_MODALITIES = [
    ("CT", 0.55, (1, 4), (100, 600), 526_000, "liver-ct-demo"),
    ("MR", 0.20, (2, 4), (50, 400), 140_000, "brain-mr-demo"),
    ("US", 0.15, (1, 2), (50, 120), 310_000, None),
    ("CR", 0.10, (1, 2), (50, 60), 8_400_000, None),
]
_DESCRIPTIONS = {"CT": ["ABDOMEN PORTAL 1.0 B30f", "THORAX 1.5 B70f", "LIVER 3 PHASE", "HEAD 5.0 H30s"],
                 "MR": ["T2 TSE AX", "T1 VIBE FS", "DWI b800", "FLAIR COR"],
                 "US": ["LIVER", "THYROID", "ABDOMEN"], "CR": ["CHEST PA", "KNEE AP"]}


def _ascii(s: str) -> str:
    import unicodedata

    s = s.translate(_ASCII)
    return "".join(c for c in unicodedata.normalize("NFD", s) if unicodedata.category(c) != "Mn")


def patient_name(rng: random.Random) -> str:
    """A DICOM PN as clinics send it: Vietnamese with or without diacritics, Korean with its Hangul group,
    a few Latin ones."""
    r = rng.random()
    if r < 0.60:
        family, middle, given = rng.choice(_VI_FAMILY), rng.choice(_VI_MIDDLE), rng.choice(_VI_GIVEN)
        name = f"{family}^{middle} {given}"
        return name if rng.random() < 0.5 else _ascii(name).upper()
    if r < 0.92:
        (fk, fr), (gk, gr) = rng.choice(_KO_FAMILY), rng.choice(_KO_GIVEN)
        return f"{fr}^{gr}={fk}^{gk}" if rng.random() < 0.7 else f"{fk}{gk}"
    family, given = rng.choice(_LATIN)
    return f"{family}^{given}"


def _pick_state(rng: random.Random, routed: bool, today: bool, age_days: float) -> SeriesState:
    """Most series are done; in-flight states only among today's; purged ones are the oldest."""
    if not routed:
        if today and rng.random() < 0.02:
            return SeriesState.RECEIVING
        return SeriesState.PURGED if age_days > 29 else SeriesState.NO_MODEL
    r = rng.random()
    if today:
        for state, share in ((SeriesState.RECEIVING, 0.005), (SeriesState.COMPLETE, 0.002),
                             (SeriesState.QUEUED, 0.015), (SeriesState.PROCESSING, 0.001),
                             (SeriesState.EXPORTING, 0.01)):
            if r < share:
                return state
            r -= share
        r = rng.random()
    if r < 0.025:
        return SeriesState.FAILED
    if r < 0.035:
        return SeriesState.EXPORT_FAILED
    if age_days > 29:
        return SeriesState.PURGING if r < 0.036 else SeriesState.PURGED
    return SeriesState.DONE


def fill(store: Store, n: int, now: float, seed: int = 20261203) -> dict[str, Any]:
    """``n`` series and everything that hangs off them, in one transaction of bulk inserts. Returns what the
    timed requests need (a series with a full trail for the detail page, search terms) and the table sizes."""
    rng = random.Random(seed)
    midnight = day_start(now)
    today_n = max(1, round(n * 0.02))
    oldest = midnight - 29 * DAY
    patients = [(f"PID{rng.randrange(10**7, 10**8)}", patient_name(rng)) for _ in range(max(1, n // 3))]
    series, events, jobs, job_events, objects, outbox, outbox_events, attempts = [], [], [], [], [], [], [], []
    job_id = obj_id = out_id = 0
    i = study_no = 0
    weights = [m[1] for m in _MODALITIES]
    while i < n:
        study_no += 1
        mod, _, per_study, inst_range, inst_bytes, model = rng.choices(_MODALITIES, weights)[0]
        today = i < today_n
        t0 = rng.uniform(midnight, now) if today else rng.uniform(oldest, midnight)
        pid, pname = rng.choice(patients)
        study_uid = f"1.2.826.0.1.3680043.10.1234.{study_no}"
        accession = f"A{dt.date.fromtimestamp(t0):%y%m%d}{study_no % 100000:05d}"
        study_date = f"{dt.date.fromtimestamp(t0):%Y%m%d}"
        routed = model is not None or (mod == "US" and rng.random() < 0.5)
        model = model or ("thyroid-us-demo" if routed else None)
        for k in range(rng.randint(*per_study)):
            if i >= n:
                break
            uid = f"1.2.826.0.1.3680043.10.1235.{study_no}.{k + 1}"
            inst = rng.randint(*inst_range)
            first = t0 + k * rng.uniform(20, 90)
            last = first + inst * rng.uniform(0.02, 0.08)
            age = (now - first) / DAY
            state = _pick_state(rng, routed, today, age)
            trail: list[tuple[float, SeriesState, str]] = [(last + 2.0, SeriesState.COMPLETE, "quiet for 2 s")]
            reason = "quiet for 2 s"
            job_state: JobState | None = None
            queued = last + 2.1
            started = queued + rng.uniform(0.1, 30.0)
            finished = started + rng.uniform(8.0, 40.0)
            sent_at = finished + rng.uniform(0.5, 4.0)
            if state in (SeriesState.RECEIVING,):
                trail, reason = [], "first instance"
            elif state == SeriesState.COMPLETE:
                pass
            elif state == SeriesState.NO_MODEL or (state in (SeriesState.PURGED, SeriesState.PURGING) and not routed):
                trail.append((last + 2.2, SeriesState.NO_MODEL, "no route matched"))
                reason = "no route matched"
            else:
                trail.append((queued, SeriesState.QUEUED, f"routed to {model}"))
                reason = f"routed to {model}"
                if state == SeriesState.QUEUED:
                    job_state = JobState.QUEUED
                else:
                    trail.append((started, SeriesState.PROCESSING, f"{model} started"))
                    reason = f"{model} started"
                    job_state = JobState.PROCESSING
                if state == SeriesState.FAILED:
                    job_state = JobState.FAILED
                    reason = f"{model} failed: the series has too few slices for the model"
                    trail.append((finished, SeriesState.FAILED, reason))
                elif state not in (SeriesState.QUEUED, SeriesState.PROCESSING):
                    job_state = JobState.DONE
                    trail.append((finished, SeriesState.EXPORTING, "2 result object(s) wait for pacs"))
                    reason = "2 result object(s) wait for pacs"
                    if state == SeriesState.EXPORT_FAILED:
                        reason = "a result is a dead letter at pacs"
                        trail.append((finished + 300, SeriesState.EXPORT_FAILED, reason))
                    elif state != SeriesState.EXPORTING:
                        reason = "every job ran, every result delivered"
                        trail.append((sent_at, SeriesState.DONE, reason))
            if state in (SeriesState.PURGING, SeriesState.PURGED):
                at = first + 30 * DAY if first + 30 * DAY < now else now - 60
                trail.append((at, SeriesState.PURGING, "retention period over"))
                reason = "retention period over"
                if state == SeriesState.PURGED:
                    trail.append((at + 5, SeriesState.PURGED, "files deleted"))
                    reason = "files deleted"
            changed = trail[-1][0] if trail else last
            series.append((uid, study_uid, pid, mod, rng.choice(_DESCRIPTIONS[mod]), str(state), inst,
                           inst * inst_bytes, first, last, changed, reason, pname, accession, study_date, k + 1))
            prev = SeriesState.RECEIVING
            for at, to, why in trail:
                events.append((at, uid, str(prev), str(to), why))
                prev = to
            if job_state is not None:
                job_id += 1
                trt = rng.random() < 0.8
                done = job_state in (JobState.DONE, JobState.FAILED)
                timings = json.dumps({"read": round(rng.uniform(0.5, 3), 3), "infer": round(rng.uniform(5, 30), 3),
                                      "write": round(rng.uniform(0.3, 2), 3)}) if done else None
                jobs.append((job_id, uid, model, json.dumps(["default"]), json.dumps(["pacs"]), 0, str(job_state),
                             1 if job_state == JobState.DONE else 2 if job_state == JobState.FAILED else 0, queued,
                             started if job_state != JobState.QUEUED else None, finished if done else None,
                             os.getpid(), reason if job_state == JobState.FAILED else f"routed to {model}",
                             ("tensorrt" if trt else "onnxruntime") if job_state != JobState.QUEUED else None,
                             ("cuda:0" if trt else "cpu") if job_state != JobState.QUEUED else None,
                             ("fp16" if trt else "fp32") if job_state != JobState.QUEUED else None,
                             timings, f"results/{uid}/{job_id}" if job_state == JobState.DONE else None))
                if job_state != JobState.QUEUED:
                    job_events.append((started, job_id, str(JobState.QUEUED), str(JobState.PROCESSING), "claimed"))
                if done:
                    job_events.append((finished, job_id, str(JobState.PROCESSING), str(job_state),
                                       reason if job_state == JobState.FAILED else "results made"))
                if job_state == JobState.DONE:
                    for kind, cls in (("SEG", "1.2.840.10008.5.1.4.1.1.66.4"), ("SR", "1.2.840.10008.5.1.4.1.1.88.33")):
                        obj_id += 1
                        objects.append((obj_id, job_id, 1, uid, kind, cls, f"1.2.826.0.1.3680043.10.1236.{obj_id}",
                                        f"1.2.826.0.1.3680043.10.1237.{job_id}.{kind}",
                                        f"results/{uid}/{job_id}/{kind.lower()}.dcm", finished))
                        out_id += 1
                        if state == SeriesState.EXPORTING:
                            ostate = OutboxState.PENDING
                        elif state == SeriesState.EXPORT_FAILED and kind == "SEG":
                            ostate = OutboxState.DEAD
                        else:
                            ostate = OutboxState.SENT
                        tries = 5 if ostate == OutboxState.DEAD else (0 if ostate == OutboxState.PENDING else 1)
                        err = "association refused by PACS (0x0003)" if ostate == OutboxState.DEAD else None
                        outbox.append((out_id, obj_id, uid, "pacs", str(ostate), tries, finished + 60, finished,
                                       sent_at if ostate == OutboxState.SENT else None,
                                       "0x0000" if ostate == OutboxState.SENT else ("0xA700" if tries else None), err))
                        if ostate != OutboxState.PENDING:
                            outbox_events.append((finished + 300 if err else sent_at, out_id, str(OutboxState.PENDING),
                                                  str(ostate), err))
                        for a in range(tries):
                            ok = ostate == OutboxState.SENT
                            attempts.append((out_id, finished + (sent_at - finished if ok else 60 * a), int(ok),
                                             "0x0000" if ok else "0xA700", None if ok else "Out of resources"))
            i += 1

    # The timed series page: a done CT series of today, with its whole trail.
    detail = next((s for s in series if s[5] == SeriesState.DONE and s[3] == "CT"), series[0])
    c = store.index.conn
    c.execute("BEGIN")
    c.executemany(
        "INSERT INTO series(series_uid, study_uid, patient_id, modality, description, state, instances, bytes,"
        " first_received, last_received, state_changed, state_reason, patient_name, accession, study_date,"
        " series_number) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", series)
    # The insert trigger wrote each series' creation row with its final state: make it the first instance.
    c.execute("UPDATE series_events SET to_state = ?, reason = 'first instance', at = ("
              "SELECT first_received FROM series s WHERE s.series_uid = series_events.series_uid)"
              " WHERE from_state IS NULL", (str(SeriesState.RECEIVING),))
    c.executemany("INSERT INTO series_events(at, series_uid, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)",
                  events)
    c.executemany(
        "INSERT INTO jobs(id, series_uid, model, routes, destinations, priority, state, attempts, queued_at,"
        " started_at, finished_at, worker_pid, reason, backend, device, precision, timings, result_dir)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", jobs)
    c.execute("UPDATE job_events SET to_state = ?, reason = 'router' WHERE from_state IS NULL", (str(JobState.QUEUED),))
    c.executemany("INSERT INTO job_events(at, job_id, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)",
                  job_events)
    c.executemany(
        "INSERT INTO result_objects(id, job_id, generation, series_uid, kind, sop_class_uid, sop_instance_uid,"
        " result_series_uid, path, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", objects)
    c.executemany(
        "INSERT INTO outbox(id, object_id, series_uid, destination, state, attempts, next_attempt_at, created_at,"
        " sent_at, last_status, last_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", outbox)
    c.execute("UPDATE outbox_events SET to_state = ? WHERE from_state IS NULL", (str(OutboxState.PENDING),))
    c.executemany("INSERT INTO outbox_events(at, outbox_id, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)",
                  outbox_events)
    c.executemany("INSERT INTO outbox_attempts(outbox_id, at, ok, status, detail) VALUES (?, ?, ?, ?, ?)", attempts)
    uid, study_uid, inst, first = detail[0], detail[1], detail[6], detail[8]
    c.executemany(
        "INSERT INTO instances(sop_instance_uid, sop_class_uid, series_uid, study_uid, transfer_syntax, path, size,"
        " received_at) VALUES (?, '1.2.840.10008.5.1.4.1.1.2', ?, ?, '1.2.840.10008.1.2.1', ?, 526000, ?)",
        [(f"{uid}.{j + 1}", uid, study_uid, f"spool/{uid}/{j + 1}.dcm", first + j * 0.05) for j in range(inst)])
    c.execute("COMMIT")  # no ANALYZE: the appliance never runs it, so the planner works without sqlite_stat1
    tables = ["series", "series_events", "jobs", "job_events", "result_objects", "outbox", "outbox_events",
              "outbox_attempts", "instances"]
    sizes = {t: c.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}
    failed = sum(1 for s in series if s[5] == SeriesState.FAILED)
    return {"detail_uid": uid, "today": today_n, "failed": failed, "tables": sizes,
            "db_bytes": store.index.db_path.stat().st_size}


# -------------------------------------------------------------------------------------------- the client


class Client:
    """urllib with a cookie jar: the panel's session as a browser holds it."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with self.opener.open(self.base + path, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def login(self, user: str, password: str) -> None:
        status, body = self.get("/login")
        m = re.search(rb'name="csrf_token" value="([^"]+)"', body)
        if status != 200 or not m:
            raise SystemExit(f"bench_panel: GET /login answered {status} without a CSRF token")
        data = urllib.parse.urlencode({"username": user, "password": password,
                                       "csrf_token": m.group(1).decode()}).encode()
        with self.opener.open(urllib.request.Request(self.base + "/login", data=data), timeout=60) as r:
            if r.status != 200 or urllib.parse.urlsplit(r.geturl()).path != "/":
                raise SystemExit(f"bench_panel: login failed ({r.status}, ended at {r.geturl()})")

    def timed(self, path: str) -> tuple[float, int, int]:
        t = time.perf_counter()
        status, body = self.get(path)
        return (time.perf_counter() - t) * 1000, status, len(body)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def pages(info: dict[str, Any], now: float) -> list[tuple[str, str, bool]]:
    """(label, path, judged against the goal) of every timed request; /healthz first, the reference."""
    frm = dt.date.fromtimestamp(now - 10 * DAY).isoformat()
    to = dt.date.fromtimestamp(now - 8 * DAY).isoformat()
    return [
        ("healthz (reference)", "/healthz", False),
        ("dashboard", "/", True),
        ("dashboard, live part", "/live/dashboard", True),
        ("series, page 1", "/series", True),
        ("series, page 1000", "/series?page=1000", True),
        ("series, name search", "/series?q=" + urllib.parse.quote("Nguy"), True),
        ("series, Hangul search", "/series?q=" + urllib.parse.quote("민준"), True),
        ("series, no match", "/series?q=zzzz", True),
        ("series, failed", "/series?state=failed", True),
        ("series, 3 days", f"/series?from={frm}&to={to}", True),
        ("api series", "/api/v1/series", True),
        ("api dashboard", "/api/v1/dashboard", True),
        ("series detail", f"/series/{info['detail_uid']}", False),
        ("api series detail", f"/api/v1/series/{info['detail_uid']}", False),
    ]


def measure(client: Client, todo: list[tuple[str, str, bool]], requests: int, warmup: int,
            tick: Callable[[int], None]) -> tuple[dict[str, list[float]], list[str]]:
    times: dict[str, list[float]] = {path: [] for _, path, _ in todo}
    failures: list[str] = []
    for rnd in range(warmup + requests):
        for _, path, _ in todo:
            ms, status, size = client.timed(path)
            if status != 200 or size == 0:
                failures.append(f"{path}: HTTP {status}, {size} bytes")
            elif rnd >= warmup:
                times[path].append(ms)
        tick(rnd)
    return times, failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Benchmark the technician panel over HTTP (waitress) on a store of many series: median and "
                    "p95 of the dashboard, the series list (paged, searched, filtered), the API and a series "
                    "page, against /healthz on the same server. Goal: median < 200 ms at 100,000 series. "
                    "Results on stdout (last line: the goal) and as JSON; progress on stderr.")
    ap.add_argument("--series", type=int, default=100_000, help="series rows in the store (default 100000)")
    ap.add_argument("--requests", type=int, default=30, help="timed requests per page (default 30)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds over every page first (default 2)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    ap.add_argument("--keep", type=Path, default=None,
                    help="fill (or reuse) the store in this directory and keep it, instead of a temporary one "
                         "(for profiling the pages against the same data)")
    args = ap.parse_args(argv)
    if args.series < 1 or args.requests < 1 or args.warmup < 0:
        ap.error("--series and --requests must be >= 1, --warmup >= 0")

    from appliance.panel.server import PanelServer

    with tempfile.TemporaryDirectory(prefix="bench-panel-") as td:
        data_dir = args.keep or Path(td)
        now = time.time()
        store = Store.open(data_dir)
        if store.index.conn.execute("SELECT count(*) FROM series").fetchone()[0] == 0:
            progress(f"filling a store in {data_dir} with {args.series} series")
            t = time.perf_counter()
            info = fill(store, args.series, now)
            Users(store.index).add(USER, "technician", PASSWORD)
            progress(f"filled in {time.perf_counter() - t:.1f} s: "
                     + ", ".join(f"{k} {v}" for k, v in info["tables"].items())
                     + f"; index {info['db_bytes'] / 1e6:.0f} MB")
            (data_dir / "bench-panel-info.json").write_text(json.dumps(info) + "\n")
        else:
            info = json.loads((data_dir / "bench-panel-info.json").read_text())
            progress(f"reusing the store in {data_dir} ({info['tables']['series']} series)")
        port = free_port()
        config = parse_config({
            "storage": {"data_dir": str(data_dir), "min_free_bytes": 0},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
            "panel": {"bind": "127.0.0.1", "port": port},
            "logging": {"level": "WARNING"},
        })
        server = PanelServer(config, store)
        server.start()
        try:
            client = Client(f"http://127.0.0.1:{server.port}")
            client.login(USER, PASSWORD)
            todo = pages(info, now)
            progress(f"panel on port {server.port}; {args.warmup} warm-up and {args.requests} timed rounds "
                     f"over {len(todo)} pages")
            totals: dict[str, int | None] = {}
            for _, path, _ in todo:
                if path == "/series" or path.startswith("/series?"):
                    status, body = client.get("/api/v1/series" + path[len("/series"):])
                    totals[path] = json.loads(body)["total"] if status == 200 else None
            times, failures = measure(client, todo, args.requests, args.warmup,
                                      lambda r: progress(f"round {r + 1}/{args.warmup + args.requests}")
                                      if (r + 1) % 10 == 0 else None)
        finally:
            time.sleep(0.5)  # let waitress's threads finish the last response's bookkeeping before its loop closes
            server.stop()

    ref = statistics.median(times["/healthz"]) if times["/healthz"] else None
    rows: list[dict[str, Any]] = []
    for label, path, is_judged in todo:
        ms = times[path]
        med = statistics.median(ms) if ms else None
        rows.append({"page": label, "path": path, "judged": is_judged, "n": len(ms), "matches": totals.get(path),
                     "median_ms": round(med, 2) if med is not None else None,
                     "p95_ms": round(pct(ms, 0.95), 2) if ms else None,
                     "max_ms": round(max(ms), 2) if ms else None,
                     "ratio_to_healthz": round(med / ref, 1) if med is not None and ref else None,
                     "goal_met": (med < GOAL_MS) if med is not None else None})
    judged = [r for r in rows if r["judged"]]
    all_met = all(r["goal_met"] for r in judged)
    result = {
        "benchmark": "bench_panel",
        "started": dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(timespec="seconds"),
        "series": args.series, "requests": args.requests, "warmup": args.warmup, "goal_ms": GOAL_MS,
        "reference": "/healthz on the same server, same client", "reference_median_ms": round(ref, 3) if ref else None,
        "store": info, "pages": rows, "failures": failures[:50], "goal_met": all_met and not failures,
        "host": {"hostname": platform.node(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
                 "python": sys.version.split()[0]},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    progress(f"wrote {args.json}")

    print(f"panel over HTTP, {args.series} series ({info['tables']['jobs']} jobs, {info['tables']['outbox']} outbox "
          f"rows), {args.requests} requests per page, ms")
    print(f"{'page':<24} {'matches':>8} {'median':>8} {'p95':>8} {'max':>8} {'x healthz':>10}  goal < {GOAL_MS:.0f} ms")
    for r in rows:
        goal = ("met" if r["goal_met"] else "NOT met") if r["judged"] else "-"
        m = "" if r["matches"] is None else str(r["matches"])
        print(f"{r['page']:<24} {m:>8} {fmt(r['median_ms'], 1):>8} {fmt(r['p95_ms'], 1):>8} {fmt(r['max_ms'], 1):>8} "
              f"{fmt(r['ratio_to_healthz'], 1):>10}  {goal}")
    for f in failures[:10]:
        print(f"FAILED: {f}")
    worst = max(judged, key=lambda r: r["median_ms"] or 0)
    print(f"goal: dashboard and series list median < {GOAL_MS:.0f} ms at {args.series} series: "
          f"{'met' if all_met and not failures else 'NOT met'} (slowest: {worst['page']} {fmt(worst['median_ms'], 1)} "
          f"ms, {fmt(worst['ratio_to_healthz'], 1)}x /healthz at {fmt(ref, 2)} ms)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
