"""The one query layer of the pages and the JSON API: plain, JSON-ready dicts shaped from the store's reads.

A page renders what these return and ``/api/v1`` serialises the same dicts, so the two never disagree.
Times are epoch seconds (pages localise them, the API leaves them to the client); DICOM header values are
returned as received, and escaped where they are shown.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from appliance.config import Config
from appliance.infer.summary import SUMMARY_FILE, Summary
from appliance.metrics.collect import Check, ProcessView
from appliance.models.package import find_packages
from appliance.store import Store
from appliance.store.browse import Browse, SeriesFilter, day_start
from appliance.store.states import JobState, OutboxState, SeriesState

log = logging.getLogger("appliance.panel")

PAGE_SIZE = 50
KEY_PNG = "key.png"  # written by the results stage next to the DICOM objects (results/preview.py)


def _browse(store: Store) -> Browse:
    return Browse(store.index)


# -- dashboard ------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def health(processes: ProcessView | None, checks: list[Check] | None) -> dict[str, Any]:
    """Listener, worker and sender health as the supervisor sees them (unknown when the panel runs alone)."""
    if processes is None:
        return {"known": False, "listeners": None, "worker": None, "sender": None, "checks": []}
    return {
        "known": True,
        "listeners": {"alive": processes.listeners_alive, "of": processes.listeners},
        "worker": processes.worker_alive,
        "sender": getattr(processes, "sender_alive", None),
        "open_associations": processes.open_associations,
        "checks": [{"name": c.name, "ok": c.ok, "reason": c.reason} for c in (checks or [])],
    }


def dashboard(
    config: Config, store: Store, processes: ProcessView | None, checks: list[Check] | None, now: float | None = None
) -> dict[str, Any]:
    now = time.time() if now is None else now
    b = _browse(store)
    today = b.states_since(day_start(now))
    action_total, action = b.needing_action(10)
    try:
        usage = shutil.disk_usage(store.data_dir)
        disk: dict[str, int | None] = {
            "free": usage.free,
            "total": usage.total,
            "reserve": config.storage.min_free_bytes,
        }
    except OSError:
        disk = {"free": None, "total": None, "reserve": config.storage.min_free_bytes}
    counts = b.outbox_counts()
    since = now - 24 * 3600
    hours = [int(since // 3600) * 3600 + 3600 * i for i in range(25)]
    received = {h: (n, inst) for h, n, inst in b.received_per_hour(hours[0])}
    results = b.results_since(hours[0])
    per_hour: dict[int, list[float]] = {}
    for at, seconds in results:
        per_hour.setdefault(int(at // 3600) * 3600, []).append(seconds)
    chart = [
        {
            "hour": h,
            "series": received.get(h, (0, 0))[0],
            "instances": received.get(h, (0, 0))[1],
            "p50": percentile(per_hour.get(h, []), 0.5),
            "p95": percentile(per_hour.get(h, []), 0.95),
        }
        for h in hours
    ]
    all_results = [s for _, s in results]
    return {
        "today": {"total": sum(today.values()), "by_state": today},
        "queue_depth": b.queue_depth(),
        "running": b.running_jobs(),
        "needing_action": {"total": action_total, "series": action},
        "dead_letters": sum(n for (_, state), n in counts.items() if state == OutboxState.DEAD),
        "waiting_to_send": sum(n for (_, state), n in counts.items() if state == OutboxState.PENDING),
        "disk": disk,
        "health": health(processes, checks),
        "backends": b.backends(),
        "device": {"id": config.device.id, "site": config.device.site},
        "last_24h": {
            "hours": chart,
            "time_to_result_p50": percentile(all_results, 0.5),
            "time_to_result_p95": percentile(all_results, 0.95),
            "results": len(all_results),
        },
    }


# -- series -----------------------------------------------------------------------------------------------


def series_list(store: Store, flt: SeriesFilter, page: int = 1, per_page: int = PAGE_SIZE) -> dict[str, Any]:
    page = max(1, page)
    total, rows = _browse(store).series_page(flt, limit=per_page, offset=(page - 1) * per_page)
    return {
        "total": total,
        "page": page,
        "per_page": per_page,
        "pages": max(1, math.ceil(total / per_page)),
        "series": rows,
    }


def _summary(store: Store, result_dir: str | None) -> dict[str, Any] | None:
    if not result_dir:
        return None
    path = store.data_dir / result_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        s = Summary.read(path)
    except (OSError, ValueError) as exc:
        log.warning("panel: cannot read %s: %s", path, exc)
        return {"error": str(exc)}
    m = s.measurements
    lesions = sorted(m.lesions, key=lambda x: x.longest_axial_diameter_mm, reverse=True)
    return {
        "model": {"name": s.model.name, "version": s.model.version, "onnx_sha256": s.model.onnx_sha256},
        "backend": {"name": s.backend.name, "device": s.backend.device, "precision": s.backend.precision},
        "organs": [{"name": o.name, "volume_ml": o.volume_ml} for o in m.organs],
        "labels": [{"value": lv.value, "name": lv.name, "volume_ml": lv.volume_ml} for lv in m.labels],
        "lesions": {
            "count": len(m.lesions),
            "total_ml": sum(x.volume_ml for x in m.lesions),
            "largest": [asdict(x) | {"attenuation": x.attenuation} for x in lesions[:5]],
            "unreported": m.unreported_lesions,
            "threshold_mm": m.min_lesion_diameter_mm,
            # The confidence limit, the rim rule or the finding score may also have left lesions out: the page says so.
            "other_rules": m.min_confidence > 0 or m.max_edge_contact < 1.0 or m.min_finding_score > 0,
        },
        "slices": s.series.slices,
        "warnings": list(s.series.warnings),
        "timings_s": s.timings_s,
    }


def timeline(store: Store, series_uid: str, series: dict[str, Any], jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every step from the first instance to each destination's acknowledgement, oldest first, each with the
    seconds since the step before (``took``) and, for sends, the DICOM status of each attempt."""
    b = _browse(store)
    steps: list[dict[str, Any]] = [
        {"at": series["first_received"], "step": "received_first", "detail": None},
    ]
    if series["last_received"] > series["first_received"]:
        steps.append({"at": series["last_received"], "step": "received_last", "detail": f"{series['instances']}"})
    for e in b.series_events(series_uid):
        if e["from_state"] is None:
            continue  # the creation row is the first instance, above
        steps.append({"at": e["at"], "step": f"series_{e['to_state']}", "detail": e["reason"]})
    models = {j["id"]: j["model"] for j in jobs}
    for e in b.job_events(list(models)):
        if e["from_state"] is None:
            continue  # queued at creation is the series' own "queued" step
        steps.append(
            {"at": e["at"], "step": f"job_{e['to_state']}", "detail": e["reason"], "model": models[e["job_id"]]}
        )
    for r in b.result_objects(series_uid):
        steps.append({"at": r["created_at"], "step": "result", "detail": r["kind"], "model": models.get(r["job_id"])})
    rows = b.outbox_for_series(series_uid)
    names = {r["id"]: (r["destination"], r["kind"]) for r in rows}
    events, attempts = b.outbox_trail(list(names))
    for a in attempts:
        dest, kind = names[a["outbox_id"]]
        steps.append(
            {
                "at": a["at"],
                "step": "sent" if a["ok"] else "send_failed",
                "destination": dest,
                "kind": kind,
                "status": a["status"],
                "detail": a["detail"],
            }
        )
    for e in events:
        if e["to_state"] in (OutboxState.DEAD, OutboxState.SUPERSEDED) or (
            e["to_state"] == OutboxState.PENDING and e["from_state"] == OutboxState.DEAD
        ):
            dest, kind = names[e["outbox_id"]]
            steps.append(
                {
                    "at": e["at"],
                    "step": f"outbox_{e['to_state']}" if e["from_state"] != OutboxState.DEAD else "outbox_retry",
                    "destination": dest,
                    "kind": kind,
                    "detail": e["reason"],
                }
            )
    _order(steps)
    prev = None
    seen: set[tuple[Any, Any]] = set()
    for s in steps:
        s["took"] = None if prev is None else max(0.0, s["at"] - prev)
        prev = s["at"]
        # the same failure again (every attempt at an unreachable PACS): said once, then only counted
        key = (s.get("destination"), s.get("detail"))
        s["repeat"] = s["step"] == "send_failed" and key in seen
        if s["step"] == "send_failed":
            seen.add(key)
    return steps


#: The order of steps that happen together: stages stamp their rows from their own clocks (Python's, or
#: SQLite's in a trigger), so a job's end and the series' move to sending can be a millisecond apart either way.
_RANK = {
    "received_first": 0,
    "received_last": 1,
    "series_receiving": 2,
    "series_complete": 3,
    "series_queued": 4,
    "series_no_model": 4,
    "job_queued": 5,
    "series_processing": 6,
    "job_processing": 7,
    "job_failed": 8,
    "job_done": 8,
    "result": 9,
    "series_failed": 10,
    "series_exporting": 10,
    "outbox_retry": 11,
    "send_failed": 12,
    "sent": 12,
    "outbox_dead": 13,
    "outbox_superseded": 13,
    "series_export_failed": 14,
    "series_done": 14,
    "series_purging": 15,
    "series_purged": 16,
}
_TIE_SECONDS = 0.05


def _order(steps: list[dict[str, Any]]) -> None:
    """Sort by time, then put steps stamped within ``_TIE_SECONDS`` of each other in pipeline order."""
    steps.sort(key=lambda s: s["at"])
    for _ in range(len(steps)):
        swapped = False
        for i in range(len(steps) - 1):
            a, b = steps[i], steps[i + 1]
            if b["at"] - a["at"] < _TIE_SECONDS and _RANK.get(a["step"], 99) > _RANK.get(b["step"], 99):
                steps[i], steps[i + 1] = b, a
                swapped = True
        if not swapped:
            break


def series_detail(store: Store, series_uid: str) -> dict[str, Any] | None:
    b = _browse(store)
    series = b.series(series_uid)
    if series is None:
        return None
    jobs = b.jobs(series_uid)
    results = []
    for j in jobs:
        results.append(
            {
                "job_id": j["id"],
                "model": j["model"],
                "state": j["state"],
                "reason": j["reason"],
                "backend": j["backend"],
                "device": j["device"],
                "precision": j["precision"],
                "timings": j["timings"],
                "summary": _summary(store, j["result_dir"]) if j["state"] == JobState.DONE else None,
                "key_image": bool(j["result_dir"]) and (store.data_dir / j["result_dir"] / KEY_PNG).is_file(),
                "overlay": bool(j["result_dir"]) and (store.data_dir / j["result_dir"] / "labelmap.npz").is_file(),
            }
        )
    outbox = b.outbox_for_series(series_uid)
    return {
        "series": series,
        "jobs": results,
        "outbox": outbox,
        "timeline": timeline(store, series_uid, series, jobs),
        "delivered": bool(outbox) and all(o["state"] in (OutboxState.SENT, OutboxState.SUPERSEDED) for o in outbox),
    }


def job_result_dir(store: Store, series_uid: str, job_id: int) -> Path | None:
    for j in _browse(store).jobs(series_uid):
        if j["id"] == job_id and j["result_dir"]:
            return store.data_dir / j["result_dir"]
    return None


# -- queue, outbox, models ------------------------------------------------------------------------------


def queue(config: Config, store: Store) -> dict[str, Any]:
    b = _browse(store)
    dead_total, dead = b.outbox_rows(OutboxState.DEAD, 200)
    pending_total, pending = b.outbox_rows(OutboxState.PENDING, 200)
    holds = b.holds()
    counts = b.outbox_counts()
    destinations = [
        {
            "name": d.name,
            "ae_title": d.ae_title,
            "host": d.host,
            "port": d.port,
            "suspended": d.name in holds,
            "hold": holds.get(d.name),
            "pending": counts.get((d.name, OutboxState.PENDING), 0),
            "dead": counts.get((d.name, OutboxState.DEAD), 0),
        }
        for d in config.destinations
    ]
    return {
        "jobs": b.jobs_by_state((JobState.PROCESSING, JobState.QUEUED), 200),
        "failed_jobs": b.jobs_by_state((JobState.FAILED,), 100),
        "destinations": destinations,
        "dead": {"total": dead_total, "rows": dead},
        "pending": {"total": pending_total, "rows": pending},
    }


def models(config: Config, store: Store) -> dict[str, Any]:
    packages, refused = find_packages(config.inference.resolved_models_dir())
    engines_dir = store.data_dir / "engines"
    engines = []
    if engines_dir.is_dir():
        for plan in sorted(engines_dir.glob("*.plan")):
            try:
                st = plan.stat()
            except OSError:
                continue
            engines.append({"file": plan.name, "bytes": st.st_size, "built_at": st.st_mtime})
    routed = {m for r in config.routes for m in r.models}
    backends = {r["model"]: r for r in _browse(store).backends()}
    return {
        "packages": [
            {
                "name": p.name,
                "version": p.version,
                "path": str(p.path),
                "onnx_sha256": p.manifest.files.get("model.onnx") if hasattr(p.manifest, "files") else None,
                "routed": p.name in routed,
                "last_backend": backends.get(p.name),
            }
            for p in packages
        ],
        "refused": [{"folder": k, "reason": v} for k, v in sorted(refused.items())],
        "engines": engines,
    }


SERIES_STATES = [s.value for s in SeriesState]
