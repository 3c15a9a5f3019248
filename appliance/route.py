"""The ``route`` stage: which models run on a complete series.

Rules come from config (``[[routes]]``). A condition on a DICOM keyword is a regular expression (a string,
matched case-insensitively against the whole value), a set of values (a list of strings; ``!VALUE``
excludes; a list of exclusions alone admits anything else, a missing attribute included), or a numeric
``[min, max]`` range. A multi-valued attribute matches when any of its values does. Every matching rule
contributes its models; a model named by several rules runs once, at the highest priority, sending to the
union of their destinations. A series no rule matches is recorded as ``no_model``: that is not an error.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from appliance.config import Route
from appliance.dicomio import read_header
from appliance.store.index import Index
from appliance.store.jobs import JobQueue

log = logging.getLogger("appliance.route")


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [str(v).strip() for v in value]
    return [str(value).strip()]


def condition_holds(ds: Dataset, keyword: str, cond: str | Sequence[str | float]) -> bool:
    values = _values(ds, keyword)
    if isinstance(cond, str):
        pattern = re.compile(cond, re.IGNORECASE)
        return any(pattern.fullmatch(v) for v in values)
    words = [c for c in cond if isinstance(c, str)]
    if len(words) == len(cond):
        include = {c.upper() for c in words if not c.startswith("!")}
        exclude = {c[1:].upper() for c in words if c.startswith("!")}
        upper = [v.upper() for v in values]
        if any(v in exclude for v in upper):
            return False
        return not include or any(v in include for v in upper)
    lo, hi = float(cond[0]), float(cond[1])
    for v in values:
        try:
            if lo <= float(v) <= hi:
                return True
        except ValueError:
            continue
    return False


def rule_matches(ds: Dataset, rule: Route) -> bool:
    return all(condition_holds(ds, k, c) for k, c in rule.match.items())


@dataclass
class Planned:
    model: str
    priority: int
    routes: list[str] = field(default_factory=list)
    destinations: list[str] = field(default_factory=list)


def plan(ds: Dataset, rules: Sequence[Route]) -> list[Planned]:
    """The jobs a series gets under ``rules`` (empty: no rule matched)."""
    jobs: dict[str, Planned] = {}
    for rule in rules:
        if not rule_matches(ds, rule):
            continue
        for model in rule.models:
            p = jobs.setdefault(model, Planned(model=model, priority=rule.priority))
            p.priority = max(p.priority, rule.priority)
            p.routes.append(rule.name)
            p.destinations += [d for d in rule.destinations if d not in p.destinations]
    return sorted(jobs.values(), key=lambda p: (-p.priority, p.model))


class Router:
    """Turns complete series into queued jobs (or ``no_model``), one series per transaction."""

    def __init__(
        self,
        index: Index,
        spool_root: Path,
        rules: Sequence[Route],
        known_models: set[str] | None,
        poll_seconds: float = 0.25,
    ) -> None:
        self.jobs, self.spool_root, self.rules = JobQueue(index), Path(spool_root), list(rules)
        self.known_models, self.poll_seconds = known_models, poll_seconds

    def tick(self) -> int:
        routed = 0
        for series_uid, path in self.jobs.complete_series_heads():
            try:
                ds = read_header(self.spool_root / path)  # bounded: never inflates a Deflated file whole
            except Exception as exc:  # the receiver stored it, so this is rare: a damaged disk
                self.jobs.mark_series_failed(series_uid, f"route: cannot read the series' header: {exc}")
                log.error("series %s: cannot read its header for routing: %s", series_uid, exc)
                continue
            jobs = plan(ds, self.rules)
            missing = [j.model for j in jobs if self.known_models is not None and j.model not in self.known_models]
            if missing:
                log.error(
                    "series %s: route(s) name model(s) %s that are not installed or were refused; those jobs will fail",
                    series_uid,
                    missing,
                )
            n = self.jobs.queue_jobs(series_uid, [(j.model, j.priority, j.routes, j.destinations) for j in jobs])
            if jobs and not n:
                log.info("series %s re-opened by a late instance while being routed; routing it later", series_uid)
            elif n:
                log.info(
                    "series %s: queued %s", series_uid, ", ".join(f"{j.model} (priority {j.priority})" for j in jobs)
                )
            else:
                log.info(
                    "series %s: no routing rule matches (Modality %s, BodyPartExamined %s)",
                    series_uid,
                    ds.get("Modality"),
                    ds.get("BodyPartExamined"),
                )
            routed += 1
        return routed

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # the router must outlive a bad series; the next tick retries
                log.exception("router pass failed")
            stop.wait(self.poll_seconds)
