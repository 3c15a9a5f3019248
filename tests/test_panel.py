"""The technician panel through Flask's test client, on a real store populated by the store's own operations.

CSRF protection stays on (it is under test): every form post and API call carries the session's token,
read from a page's hidden ``csrf_token`` field or from ``GET /api/v1/csrf``. Pages, live fragments and the
JSON API; the login wall, roles and the audit trail of every action; hostile DICOM header values; login
throttling; session cookies and timeouts; user management on the page and at the command line; series
search; the audit CSV export.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest
from conftest import appliance_exe, write_toml
from flask import Flask
from flask.testing import FlaskClient

from appliance.config import Config
from appliance.infer.measure import LabelVolume, Lesion, Measurements, OrganVolume
from appliance.infer.summary import SUMMARY_FILE, BackendInfo, ModelInfo, SeriesInfo, Summary
from appliance.metrics.collect import Check, ProcessView
from appliance.panel.app import create_app
from appliance.store import InstanceRecord, Store
from appliance.store.jobs import JobQueue, NewObject
from appliance.store.outbox import Outbox
from appliance.store.users import Audit, Users

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MODEL = "liver-ct-demo"
FAIL = dict(max_attempts=5, base=1.0, cap=10.0)

ADMIN, ADMIN_PW = "chief", "Gan-mat 2026 secure!"
TECH, TECH_PW = "tech1", "Scanner room 7 key!"
VIEWER, VIEWER_PW = "view1", "Read only, 2026 view"

XSS_SCRIPT = "<script>alert(1)</script>"
XSS_IMG = '"><img src=x onerror=alert(1)>'
XSS_DESC = "<b onmouseover=alert(2)>CT ABD</b>"
XSS_ACC = "<i>ACC-X</i>"
XSS_REASON = "model failed: <svg onload=alert(3)>"
XSS_WARNING = "<script>alert(5)</script> spacing irregular"
XSS_USER = "<img src=x onerror=alert(4)>"
HOSTILE = (XSS_SCRIPT, XSS_IMG, XSS_DESC, XSS_ACC, XSS_REASON, XSS_WARNING, XSS_USER)

T_MAR10 = time.mktime((2024, 3, 10, 12, 0, 0, 0, 0, -1))
T_MAR12 = time.mktime((2024, 3, 12, 9, 30, 0, 0, 0, -1))

UID = {
    "done": "1.2.826.0.1.3680043.10.1",
    "dead": "1.2.826.0.1.3680043.10.2",
    "xss1": "1.2.826.0.1.3680043.10.3",
    "failed": "1.2.826.0.1.3680043.10.4",
    "pending": "1.2.826.0.1.3680043.10.5",
    "xss2": "1.2.826.0.1.3680043.10.6",
    "queued": "1.2.826.0.1.3680043.10.7",
    "wild1": "1.2.826.0.1.3680043.10.8",
    "wild2": "1.2.826.0.1.3680043.10.9",
    "receiving": "1.2.826.0.1.3680043.10.10",
}
DESTINATIONS = [
    {"name": "pacs", "ae_title": "PACS_AE", "host": "10.0.0.5", "port": 104},
    {"name": "viewer", "ae_title": "VIEWER", "host": "10.0.0.6", "port": 11112},
]


# -- building a store ---------------------------------------------------------------------------------


def _add_series(store: Store, uid: str, *, n: int = 3, now: float | None = None, complete: bool = True,
                modality: str = "CT", **header: Any) -> None:
    now = time.time() if now is None else now
    for i in range(n):
        rel = f"s/{uid}/{i}.dcm"
        p = store.spool.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 10)
        store.index.add_instance(
            InstanceRecord(sop_instance_uid=f"{uid}.{i}", sop_class_uid=CT_IMAGE, study_uid=f"{uid}.0", series_uid=uid,
                           transfer_syntax="1.2.840.10008.1.2.1", path=rel, size=10, modality=modality,
                           series_number=3, **header),
            None, now=now + i)
    if complete:
        store.index.complete_quiet_series(max(now + n, time.time()) + 100.0, 5.0, 1.0)


def _objects(uid: str) -> list[NewObject]:
    return [NewObject(kind=k, sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4", sop_instance_uid=f"9.{uid}.{i}",
                      result_series_uid=f"8.{uid}.{i}", path=f"results/{uid}/{MODEL}/{k.lower()}.dcm")
            for i, k in enumerate(("SEG", "SR", "SC"))]


def _summary(uid: str) -> Summary:
    return Summary(
        model=ModelInfo(MODEL, "1.4.0", "de2284e0" * 8),
        backend=BackendInfo("onnxruntime", "cpu", "fp32"),
        series=SeriesInfo(f"{uid}.0", uid, 3, 64, 64, (0.8, 0.8), 2.5, (XSS_WARNING,)),
        measurements=Measurements(
            voxel_volume_ml=0.0016,
            labels=(LabelVolume(1, "Liver", 327_125, 523.4), LabelVolume(2, "Liver lesion", 2625, 4.2)),
            organs=(OrganVolume("Liver", (1, 2), 329_750, 527.6),),
            lesions=(Lesion(1, 2, 4.2, 21.5, 1, f"{uid}.1", (1.0, 30.0, 30.0), 14.0, 0.87, 41.0, 96.0,
                            "superior anterior right"),),
        ),
        timings_s={"infer": 1.5},
    )


def _job(store: Store, uid: str, dests: list[str], *, claim: bool = True, ok: bool = True, finish: bool = True,
         reason: str = "done", result_dir: str | None = None) -> None:
    q = JobQueue(store.index)
    assert q.queue_jobs(uid, [(MODEL, 0, ["ct-liver"], dests)]) == 1
    if not claim:
        return
    job = q.claim(4242)
    assert job is not None and job.series_uid == uid
    if finish:
        assert q.finish(job, ok=ok, reason=reason, backend="onnxruntime", device="cpu", precision="fp32",
                        timings={"infer": 1.5}, result_dir=result_dir, objects=_objects(uid) if ok else None)


def _rows(store: Store, uid: str) -> list[Any]:
    return [r for r in Outbox(store.index).due(now=time.time() + 3600, limit=1000) if r.series_uid == uid]


def populate(store: Store) -> None:
    """One series in every state a technician meets, two with hostile header values, two for LIKE wildcards."""
    ob = Outbox(store.index)
    # done: processed, summary and key image written, every object acknowledged
    _add_series(store, UID["done"], now=T_MAR10, patient_name="DOE^JANE", patient_id="PID-001", accession="ACC-1001",
                description="CT ABDOMEN", study_date="20240310")
    rd = f"results/{UID['done']}/{MODEL}"
    (store.data_dir / rd).mkdir(parents=True)
    (store.data_dir / rd / SUMMARY_FILE).write_text(_summary(UID["done"]).to_json())
    (store.data_dir / rd / "key.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    _job(store, UID["done"], ["pacs"], result_dir=rd)
    for r in _rows(store, UID["done"]):
        ob.record_sent(r, "0x0000")
    # export failed: every object a dead letter (the PACS refused our AE title)
    for key, hdr, when in (
        ("dead", dict(patient_name="SMITH^JOHN", patient_id="PID-002", accession="ACC-1002", description="CT CHEST"),
         T_MAR12),
        ("xss1", dict(patient_name=XSS_SCRIPT, patient_id="PID-005", accession=XSS_ACC, description=XSS_DESC), None),
    ):
        _add_series(store, UID[key], now=when, **hdr)
        _job(store, UID[key], ["pacs"])
        for r in _rows(store, UID[key]):
            assert ob.record_failure(r, "association rejected: Called AE title not recognised", "A-ASSOCIATE-RJ 1/1/7",
                                     permanent=True, **FAIL) == "dead"
    # inference failed
    _add_series(store, UID["failed"], modality="MR", patient_name="NGUYEN^VAN^A", patient_id="PID-003",
                accession="ACC-1003", description="MR LIVER")
    _job(store, UID["failed"], ["pacs"], ok=False, reason=XSS_REASON)
    # results waiting to be sent to both destinations
    _add_series(store, UID["pending"], patient_name="PARK^MIN", patient_id="PID-004", accession="ACC-1004",
                description="CT LIVER")
    _job(store, UID["pending"], ["pacs", "viewer"])
    # running now, hostile name
    _add_series(store, UID["xss2"], patient_name=XSS_IMG, patient_id="PID-006", accession="ACC-1006",
                description="CT PORTAL")
    _job(store, UID["xss2"], ["pacs"], finish=False)
    # waiting in the queue
    _add_series(store, UID["queued"], patient_name="LE^THI", patient_id="PID-007", accession="ACC-1007",
                description="CT ARTERIAL")
    _job(store, UID["queued"], ["pacs"], claim=False)
    # complete, not routed yet: LIKE wildcards in their values
    _add_series(store, UID["wild1"], patient_name="WILD%CARD", patient_id="PID_9", accession="ACC-1008")
    _add_series(store, UID["wild2"], patient_name="WILDXCARD", patient_id="PIDX9", accession="ACC-1009")
    # still receiving
    _add_series(store, UID["receiving"], complete=False, modality="MR", patient_name="TRAN^BINH", patient_id="PID-010",
                accession="ACC-1010", description="MR T2")


# -- the app and its clients --------------------------------------------------------------------------


@dataclass
class Panel:
    app: Flask
    store: Store
    config: Config
    tmp: Path
    state: dict[str, Any] = field(default_factory=dict)

    def client(self, address: str = "127.0.0.1") -> FlaskClient:
        c = self.app.test_client()
        c.environ_base["REMOTE_ADDR"] = address
        return c

    def login(self, name: str, password: str, address: str = "127.0.0.1") -> FlaskClient:
        c = self.client(address)
        r = login(c, name, password)
        assert r.status_code == 302, r.text
        return c

    def dead_ids(self) -> list[int]:
        return sorted(r["id"] for r in Outbox(self.store.index).list(state="dead"))

    def audit(self, action: str) -> list[dict[str, Any]]:
        return Audit(self.store.index).query(action=action, limit=1000)[1]


def make_panel(tmp_path: Path, *, populated: bool = True, checks: Any = None, processes: Any = None,
               **panel: Any) -> Panel:
    data = tmp_path / "data"
    cfg = Config.model_validate({"storage": {"data_dir": str(data)}, "destinations": DESTINATIONS, "panel": panel,
                                 "device": {"id": "edge-07", "site": "ward-3"}})
    store = Store.open(data)
    u = Users(store.index)
    u.add(ADMIN, "admin", ADMIN_PW)
    u.add(TECH, "technician", TECH_PW)
    u.add(VIEWER, "viewer", VIEWER_PW)
    if populated:
        populate(store)
    app = create_app(cfg, store, processes=processes, checks=checks, testing=True)
    return Panel(app, store, cfg, tmp_path)


@pytest.fixture
def panel(tmp_path: Path) -> Panel:
    return make_panel(tmp_path)


def token_in(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m, "no CSRF token in the page"
    return m.group(1)


def login(c: FlaskClient, name: str, password: str, next: str | None = None) -> Any:
    r = c.get("/login")
    assert r.status_code == 200
    data = {"username": name, "password": password, "csrf_token": token_in(r.text)}
    if next is not None:
        data["next"] = next
    return c.post("/login", data=data)


def api_token(c: FlaskClient) -> str:
    r = c.get("/api/v1/csrf")
    assert r.status_code == 200
    return str(r.get_json()["csrf_token"])


def post_form(c: FlaskClient, path: str, data: dict[str, str] | None = None, **kw: Any) -> Any:
    return c.post(path, data={**(data or {}), "csrf_token": api_token(c)}, **kw)


def post_api(c: FlaskClient, path: str, body: Any = None) -> Any:
    return c.post(path, json=body if body is not None else {}, headers={"X-CSRFToken": api_token(c)})


PAGES = ["/", "/series", f"/series/{UID['done']}", "/queue", "/models", "/audit", "/audit.csv", "/users",
         "/settings"]
FRAGMENTS = ["/live/dashboard", "/live/series", f"/live/series/{UID['done']}", "/live/queue"]
API_GET = ["/api/v1/", "/api/v1/health", "/api/v1/dashboard", "/api/v1/series", f"/api/v1/series/{UID['done']}",
           f"/api/v1/series/{UID['done']}/timeline", "/api/v1/jobs", "/api/v1/models", "/api/v1/outbox",
           "/api/v1/csrf"]
API_POST = ["/api/v1/outbox/retry", "/api/v1/destinations/pacs/suspend", "/api/v1/destinations/pacs/resume"]


class _Markup(HTMLParser):
    """What a Content-Security-Policy without 'unsafe-inline' would block: inline scripts, styles, handlers."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script" and not a.get("src"):
            self.problems.append("inline <script>")
        if tag == "style":
            self.problems.append("inline <style>")
        for k, v in attrs:
            if k == "style":
                self.problems.append(f"style= on <{tag}>")
            if k.startswith("on"):
                self.problems.append(f"{k}= on <{tag}>")
            if (v or "").strip().lower().startswith("javascript:"):
                self.problems.append(f"javascript: URL in {k}= on <{tag}>")
        if tag == "img" and (a.get("src") or "").startswith("x"):
            self.problems.append("injected <img>")


def markup_problems(html: str) -> list[str]:
    p = _Markup()
    p.feed(html)
    p.close()
    found = p.problems
    for m in re.finditer(r"<script\b[^>]*>", html, re.I):
        if not re.search(r"\ssrc\s*=", m.group(0)):
            found.append(f"inline script tag {m.group(0)!r}")
    return found


# -- 1. every page, fragment and API route for an admin ---------------------------------------------------


def test_every_page_renders_for_an_admin_with_its_data(panel: Panel) -> None:
    c = panel.login(ADMIN, ADMIN_PW)
    expect = {
        "/": ["NGUYEN, VAN A", "SMITH, JOHN", "edge-07", "ward-3", MODEL],
        "/series": ["DOE, JANE", "SMITH, JOHN", "PARK, MIN", "TRAN, BINH", "ACC-1001", "PID-003", "Series found: 10"],
        f"/series/{UID['done']}": ["DOE, JANE", "ACC-1001", "PID-001", "CT ABDOMEN", "Liver", "527.6", "21.5", "1.4.0",
                                   f"/series/{UID['done']}/key/", UID["done"]],
        "/queue": ["PACS_AE @ 10.0.0.5:104", "VIEWER @ 10.0.0.6:11112", "SMITH, JOHN", "PARK, MIN", "LE, THI",
                   "Called AE title not recognised", 'data-action="retry-all"', 'data-action="suspend-pacs"'],
        "/models": [MODEL, "1.6.0"],
        "/audit": [ADMIN, "127.0.0.1"],
        "/users": [ADMIN, TECH, VIEWER],
        "/settings": ["[panel]", "lockout_account_failures", "PACS_AE"],
    }
    for path in PAGES:
        r = c.get(path)
        assert r.status_code == 200, (path, r.status_code, r.text[:500])
        for text in expect.get(path, []):
            assert text in r.text, (path, text)
        if path != "/audit.csv":
            assert r.mimetype == "text/html"
            assert "Log out" in r.text and "Log in</h1>" not in r.text
    assert c.get("/audit.csv").text.splitlines()[0] == "time_utc,user,address,action,target,detail"
    # the key image the results stage wrote is served
    detail = c.get(f"/series/{UID['done']}").text
    # each finding with its confidence, attenuation against the liver around it, and where it lies
    assert "87 %" in detail and "hypo-attenuating" in detail and "(41 / 96 HU)" in detail
    assert "superior, anterior, right" in detail
    job_id = int(re.search(rf"/series/{re.escape(UID['done'])}/key/(\d+)\.png", detail)[1])
    r = c.get(f"/series/{UID['done']}/key/{job_id}.png")
    assert r.status_code == 200 and r.mimetype == "image/png" and r.data.startswith(b"\x89PNG")
    assert c.get(f"/series/{UID['done']}/key/{job_id + 999}.png").status_code == 404
    # an unknown series is a 404 page, an over-long UID too
    assert c.get("/series/1.2.3.4.5").status_code == 404
    assert c.get("/series/" + "1." * 40 + "1").status_code == 404
    # a viewed series leaves its trace in the audit log
    assert any(a["target"] == UID["done"] and a["username"] == ADMIN for a in panel.audit("view_series"))


def test_live_fragments_answer_with_their_data(panel: Panel) -> None:
    c = panel.login(ADMIN, ADMIN_PW)
    expect = {
        "/live/dashboard": ["NGUYEN, VAN A", "Dead letters"],
        "/live/series": ["DOE, JANE", "TRAN, BINH"],
        f"/live/series/{UID['done']}": ["DICOM status", "0x0000", "pacs (SEG)"],
        "/live/queue": ["SMITH, JOHN", "PACS_AE"],
    }
    for path in FRAGMENTS:
        r = c.get(path, headers={"X-Panel-Refresh": "1"})
        assert r.status_code == 200, (path, r.text[:300])
        assert "<html" not in r.text and "<body" not in r.text, path  # a fragment, not a page
        for text in expect[path]:
            assert text in r.text, (path, text)
    assert c.get("/live/series?q=SMITH").text.count("SMITH, JOHN") >= 1
    assert "DOE, JANE" not in c.get("/live/series?q=SMITH").text
    assert c.get("/live/series/1.2.3.4.5").status_code == 404


def test_every_api_route_answers_json_for_an_admin(panel: Panel) -> None:
    c = panel.login(ADMIN, ADMIN_PW)
    for path in API_GET:
        r = c.get(path)
        assert r.status_code == 200, (path, r.text[:300])
        assert r.mimetype == "application/json", path
    j = c.get("/api/v1/").get_json()
    assert j["user"] == {"name": ADMIN, "role": "admin"} and "GET /api/v1/series/<uid>" in j["endpoints"]
    health = c.get("/api/v1/health").get_json()
    assert health["health"]["known"] is False and health["disk"]["total"] > 0
    assert [b["model"] for b in health["backends"]] == [MODEL]
    d = c.get("/api/v1/dashboard").get_json()
    assert d["queue_depth"] == 1 and d["dead_letters"] == 6 and d["waiting_to_send"] == 6
    assert d["needing_action"]["total"] == 3
    assert {s["series_uid"] for s in d["needing_action"]["series"]} == {UID["dead"], UID["xss1"], UID["failed"]}
    assert [j["series_uid"] for j in d["running"]] == [UID["xss2"]]
    assert len(d["last_24h"]["hours"]) == 25 and d["device"] == {"id": "edge-07", "site": "ward-3"}
    s = c.get("/api/v1/series").get_json()
    assert s["total"] == 10 and len(s["series"]) == 10
    assert {r["series_uid"] for r in s["series"]} == set(UID.values())
    detail = c.get(f"/api/v1/series/{UID['done']}").get_json()
    assert detail["series"]["patient_name"] == "DOE^JANE" and detail["series"]["state"] == "done"
    assert detail["delivered"] is True and len(detail["outbox"]) == 3
    (job,) = detail["jobs"]
    assert job["summary"]["organs"] == [{"name": "Liver", "volume_ml": 527.6}]
    assert job["summary"]["lesions"]["count"] == 1 and job["key_image"] is True
    tl = c.get(f"/api/v1/series/{UID['done']}/timeline").get_json()
    steps = [t["step"] for t in tl["timeline"]]
    assert tl["series_uid"] == UID["done"] and steps[0] == "received_first"
    assert steps.count("sent") == 3 and steps.count("result") == 3 and "job_done" in steps
    ats = [t["at"] for t in tl["timeline"]]  # oldest first; steps a few ms apart in pipeline order
    assert all(b >= a - 0.1 for a, b in zip(ats[:-1], ats[1:], strict=True)) and ats[0] == T_MAR10
    assert all(t["took"] is None or t["took"] >= 0 for t in tl["timeline"])
    assert steps.index("job_done") < steps.index("sent")
    jobs = c.get("/api/v1/jobs").get_json()
    assert {(j["series_uid"], j["state"]) for j in jobs["active"]} == {(UID["xss2"], "processing"),
                                                                       (UID["queued"], "queued")}
    assert [(j["series_uid"], j["reason"]) for j in jobs["failed"]] == [(UID["failed"], XSS_REASON)]
    models = c.get("/api/v1/models").get_json()
    assert [(p["name"], p["version"]) for p in models["packages"]] == [(MODEL, "1.6.0")]
    out = c.get("/api/v1/outbox").get_json()
    assert [(d["name"], d["pending"], d["dead"], d["suspended"]) for d in out["destinations"]] == [
        ("pacs", 3, 6, False), ("viewer", 3, 0, False)]
    assert out["dead"]["total"] == 6 and out["pending"]["total"] == 6
    assert isinstance(c.get("/api/v1/csrf").get_json()["csrf_token"], str)
    # the writes
    first = panel.dead_ids()[0]
    r = post_api(c, "/api/v1/outbox/retry", {"ids": [first]})
    assert r.status_code == 200 and r.get_json() == {"retried": 1}
    assert first not in panel.dead_ids()
    assert post_api(c, "/api/v1/outbox/retry", {"ids": "all"}).status_code == 400
    assert post_api(c, "/api/v1/outbox/retry", {"ids": [True]}).status_code == 400
    r = post_api(c, "/api/v1/outbox/retry", {"all": True})
    assert r.get_json() == {"retried": 5} and panel.dead_ids() == []
    r = post_api(c, "/api/v1/destinations/pacs/suspend", {"reason": "PACS upgrade"})
    assert r.status_code == 200 and r.get_json() == {"destination": "pacs", "suspended": True, "changed": True}
    assert post_api(c, "/api/v1/destinations/pacs/suspend").get_json()["changed"] is False
    hold = c.get("/api/v1/outbox").get_json()["destinations"][0]
    assert hold["suspended"] is True and hold["hold"]["by_user"] == ADMIN and hold["hold"]["reason"] == "PACS upgrade"
    r = post_api(c, "/api/v1/destinations/pacs/resume")
    assert r.status_code == 200 and r.get_json() == {"destination": "pacs", "suspended": False, "changed": True}
    assert Outbox(panel.store.index).held() == set()
    r = post_api(c, "/api/v1/destinations/nowhere/suspend")
    assert r.status_code == 404 and r.mimetype == "application/json"
    r = c.get("/api/v1/series/1.2.3.4.5")
    assert r.status_code == 404 and "error" in r.get_json()
    assert c.get("/api/v1/nothing-here").status_code == 404


# -- 2. the login wall, health endpoints --------------------------------------------------------------------


def test_without_a_session_pages_redirect_to_login_and_the_api_answers_401(panel: Panel) -> None:
    c = panel.client()
    for path in PAGES + FRAGMENTS + ["/series?q=DOE", f"/series/{UID['done']}/key/1.png",
                                     f"/series/{UID['done']}/slice/0.png"]:
        r = c.get(path)
        assert r.status_code == 302, path
        loc = urlsplit(r.headers["Location"])
        assert loc.path == "/login" and not loc.netloc, path
        assert "JANE" not in r.text
    assert c.get("/series?q=DOE").headers["Location"] == "/login?next=/series?q%3DDOE"
    # the page's own refresh gets a bare 401, not a login form inside the page
    r = c.get("/live/dashboard", headers={"X-Panel-Refresh": "1"})
    assert r.status_code == 401 and r.data == b""
    for path in API_GET:
        r = c.get(path)
        assert r.status_code == 401, path
        assert r.mimetype == "application/json" and "log in" in r.get_json()["error"]
    token = token_in(c.get("/login").text)  # an anonymous session's token gets past CSRF, not past the wall
    for path in API_POST:
        r = c.post(path, json={"all": True}, headers={"X-CSRFToken": token})
        assert r.status_code == 401, path
    r = c.post("/queue/retry", data={"all": "1", "csrf_token": token})
    assert r.status_code == 302 and urlsplit(r.headers["Location"]).path == "/login"
    assert len(panel.dead_ids()) == 6
    assert c.get("/healthz").status_code == 200 and c.get("/healthz").get_json() == {"status": "alive"}
    r = c.get("/readyz")
    assert r.status_code == 503 and "cannot see" in r.get_json()["reason"]
    assert c.get("/login").status_code == 200 and c.get("/static/panel.css").status_code == 200


def test_readyz_reports_the_supervisors_checks(tmp_path: Path) -> None:
    state = {"ok": True}

    def checks() -> list[Check]:
        return [Check("listeners", True), Check("worker", state["ok"], "" if state["ok"] else "worker not running")]

    def processes() -> ProcessView:
        return ProcessView(open_associations=2, listeners_alive=2, listeners=2, worker_alive=state["ok"],
                           sender_alive=True)

    p = make_panel(tmp_path, populated=False, checks=checks, processes=processes)
    c = p.client()
    r = c.get("/readyz")
    assert r.status_code == 200 and r.get_json() == {"status": "ready", "checks": {"listeners": {"ok": True},
                                                                                  "worker": {"ok": True}}}
    state["ok"] = False
    r = c.get("/readyz")
    assert r.status_code == 503 and r.get_json()["status"] == "not ready"
    assert r.get_json()["checks"]["worker"] == {"ok": False, "reason": "worker not running"}
    a = p.login(ADMIN, ADMIN_PW)
    h = a.get("/api/v1/health").get_json()["health"]
    assert h["known"] is True and h["worker"] is False and h["listeners"] == {"alive": 2, "of": 2}
    assert "worker not running" in a.get("/").text


# -- 3. roles, and what the actions do to the store ----------------------------------------------------------


def test_a_viewer_reads_but_may_not_act_nor_manage(panel: Panel) -> None:
    c = panel.login(VIEWER, VIEWER_PW)
    for path in ["/", "/series", f"/series/{UID['dead']}", "/queue", "/models", "/api/v1/outbox"]:
        assert c.get(path).status_code == 200, path
    queue = c.get("/queue").text
    assert "data-action=\"retry" not in queue and "data-action=\"suspend" not in queue
    dead = panel.dead_ids()
    assert post_form(c, "/queue/retry", {"all": "1"}).status_code == 403
    assert post_form(c, "/queue/retry", {"id": str(dead[0])}).status_code == 403
    assert post_form(c, "/queue/destination/pacs/suspend").status_code == 403
    r = post_api(c, "/api/v1/outbox/retry", {"all": True})
    assert r.status_code == 403 and "role" in r.get_json()["error"]
    assert post_api(c, "/api/v1/destinations/pacs/suspend").status_code == 403
    for path in ["/users", "/audit", "/audit.csv", "/settings"]:
        assert c.get(path).status_code == 403, path
    assert post_form(c, "/users/add", {"name": "mallory", "role": "admin", "password": "Mallory was here 1!",
                                       "password2": "Mallory was here 1!"}).status_code == 403
    assert panel.dead_ids() == dead and Outbox(panel.store.index).held() == set()
    assert Users(panel.store.index).get("mallory") is None
    assert panel.audit("retry") == [] and panel.audit("suspend") == []


def test_a_technician_retries_and_suspends_and_each_action_is_audited(panel: Panel) -> None:
    c = panel.login(TECH, TECH_PW)
    ob = Outbox(panel.store.index)
    queue = c.get("/queue").text
    dead = panel.dead_ids()
    assert f'data-action="retry-{dead[0]}"' in queue and 'data-action="retry-all"' in queue
    # one dead letter back to pending, due now, with a fresh attempt count
    r = post_form(c, "/queue/retry", {"id": str(dead[0])})
    assert r.status_code == 302 and r.headers["Location"] == "/queue"
    row = next(x for x in ob.list() if x["id"] == dead[0])
    assert row["state"] == "pending" and row["attempts"] == 0
    assert dead[0] in [x.id for x in ob.due()]
    assert panel.dead_ids() == dead[1:]
    (a,) = panel.audit("retry")
    assert a["username"] == TECH and a["target"] == str(dead[0]) and a["detail"] == "1 row(s)"
    assert a["address"] == "127.0.0.1"
    assert "1 dead letter(s) queued to send again." in c.get("/queue").text
    assert post_form(c, "/queue/retry", {"id": "x"}).status_code == 400
    # suspend: the sender no longer sees pacs' rows; they stay pending and untried
    due = {x.destination for x in ob.due(now=time.time() + 3600)}
    assert due == {"pacs", "viewer"}
    r = post_form(c, "/queue/destination/pacs/suspend", {"reason": "PACS <maintenance>"})
    assert r.status_code == 302
    assert ob.held() == {"pacs"}
    assert {x.destination for x in ob.due(now=time.time() + 3600)} == {"viewer"}
    assert ob.next_due_at() is not None
    page = c.get("/queue").text
    assert "Suspended since" in page and 'data-action="resume-pacs"' in page
    (s,) = panel.audit("suspend")
    assert s["username"] == TECH and s["target"] == "pacs" and s["detail"] == "PACS <maintenance>"
    assert post_form(c, "/queue/destination/nowhere/suspend").status_code == 404
    assert post_form(c, "/queue/destination/pacs/explode").status_code == 404
    # resume: pacs' rows are due again
    assert post_form(c, "/queue/destination/pacs/resume").status_code == 302
    assert ob.held() == set()
    assert {x.destination for x in ob.due(now=time.time() + 3600)} == {"pacs", "viewer"}
    assert [x["target"] for x in panel.audit("resume")] == ["pacs"]
    # all at once
    post_form(c, "/queue/retry", {"all": "1"})
    assert panel.dead_ids() == []
    assert panel.audit("retry")[0]["target"] == "all dead letters"
    # the audit log is open to technicians, the user page is not
    assert c.get("/audit").status_code == 200 and c.get("/audit.csv").status_code == 200
    assert c.get("/users").status_code == 403
    assert post_form(c, "/users/unlock", {"kind": "account", "key": VIEWER}).status_code == 403


def test_an_admin_can_do_everything(panel: Panel) -> None:
    c = panel.login(ADMIN, ADMIN_PW)
    ob = Outbox(panel.store.index)
    assert c.get("/users").status_code == 200
    assert post_form(c, "/queue/retry", {"all": "1"}).status_code == 302
    assert panel.dead_ids() == []
    assert post_form(c, "/queue/destination/viewer/suspend").status_code == 302
    assert {x.destination for x in ob.due(now=time.time() + 3600)} == {"pacs"}
    assert post_api(c, "/api/v1/destinations/viewer/resume").get_json()["changed"] is True
    assert {x.destination for x in ob.due(now=time.time() + 3600)} == {"pacs", "viewer"}
    assert [a["username"] for a in panel.audit("suspend") + panel.audit("resume")] == [ADMIN, ADMIN]


def test_a_role_change_is_seen_at_the_next_request(panel: Panel) -> None:
    c = panel.login(VIEWER, VIEWER_PW)
    assert post_form(c, "/queue/retry", {"all": "1"}).status_code == 403
    Users(panel.store.index).update(VIEWER, role="technician")
    assert post_form(c, "/queue/retry", {"all": "1"}).status_code == 302
    assert panel.dead_ids() == []


# -- 4. CSRF ---------------------------------------------------------------------------------------------------


def test_posts_without_a_csrf_token_are_refused(panel: Panel) -> None:
    c = panel.client()
    c.get("/login")
    r = c.post("/login", data={"username": ADMIN, "password": ADMIN_PW})
    assert r.status_code == 400 and "Location" not in r.headers
    assert c.get("/").status_code == 302  # not logged in
    r = c.post("/login", data={"username": ADMIN, "password": ADMIN_PW, "csrf_token": "forged"})
    assert r.status_code == 400 and c.get("/").status_code == 302
    assert panel.audit("login") == []
    # a token from another browser's session is not this session's
    other = panel.client()
    foreign = token_in(other.get("/login").text)
    r = c.post("/login", data={"username": ADMIN, "password": ADMIN_PW, "csrf_token": foreign})
    assert r.status_code == 400 and c.get("/").status_code == 302

    c = panel.login(TECH, TECH_PW)
    dead = panel.dead_ids()
    r = c.post("/queue/retry", data={"all": "1"})
    assert r.status_code == 400 and panel.dead_ids() == dead
    r = c.post("/queue/destination/pacs/suspend")
    assert r.status_code == 400 and Outbox(panel.store.index).held() == set()
    r = c.post("/api/v1/outbox/retry", json={"all": True})
    assert r.status_code == 400 and "CSRF" in r.get_json()["error"] and panel.dead_ids() == dead
    r = c.post("/api/v1/outbox/retry", json={"all": True}, headers={"X-CSRFToken": foreign})
    assert r.status_code == 400 and panel.dead_ids() == dead
    r = c.post("/logout")
    assert r.status_code == 400 and c.get("/").status_code == 200  # still logged in
    # with the token: accepted, from a page's form field or from the API
    token = token_in(c.get("/queue").text)
    r = c.post("/queue/retry", data={"id": str(dead[0]), "csrf_token": token})
    assert r.status_code == 302 and panel.dead_ids() == dead[1:]
    r = c.post("/api/v1/outbox/retry", json={"all": True}, headers={"X-CSRFToken": api_token(c)})
    assert r.status_code == 200 and r.get_json() == {"retried": 5} and panel.dead_ids() == []
    r = c.post("/logout", data={"csrf_token": token})
    assert r.status_code == 302 and c.get("/").status_code == 302
    assert [a["username"] for a in panel.audit("logout")] == [TECH]


# -- 5. hostile header values, CSP, no inline script or style ---------------------------------------------


def test_hostile_header_values_are_escaped_on_every_page_and_returned_verbatim_by_the_api(panel: Panel) -> None:
    # a hostile user name lands in the audit log through a failed login
    anon = panel.client("10.2.2.2")
    assert login(anon, XSS_USER, "whatever").status_code == 401
    c = panel.login(ADMIN, ADMIN_PW)
    pages = ["/", "/series", "/queue", "/models", "/audit", "/users", "/settings", "/login"] + FRAGMENTS + [
        f"/series/{uid}" for uid in UID.values()] + [f"/live/series/{uid}" for uid in UID.values()] + [
        "/series?q=" + XSS_SCRIPT, "/series?q=" + XSS_IMG, "/series?q=%3Cscript", "/audit?user=" + XSS_IMG,
        "/live/series?q=" + XSS_IMG, "/nothing/" + XSS_SCRIPT]
    seen = 0
    for path in pages:
        client = anon if path == "/login" else c
        r = client.get(path)
        assert r.status_code in (200, 404), (path, r.status_code)
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "object-src 'none'" in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["X-Frame-Options"] == "DENY"
        for raw in HOSTILE:
            assert raw not in r.text, (path, raw)
        assert "<script>alert" not in r.text and "<img src=x" not in r.text and "<svg onload" not in r.text
        assert markup_problems(r.text) == [], path
        seen += r.text.count("&lt;script&gt;alert(1)&lt;/script&gt;")
    assert seen > 0
    for path in ["/series", f"/series/{UID['xss1']}", "/queue", "/"]:
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in c.get(path).text, path
    assert "&lt;b onmouseover=alert(2)&gt;CT ABD&lt;/b&gt;" in c.get(f"/series/{UID['xss1']}").text
    assert "&lt;i&gt;ACC-X&lt;/i&gt;" in c.get("/series").text
    assert "&gt;&lt;img src=x onerror=alert(1)&gt;" in c.get(f"/series/{UID['xss2']}").text
    assert "&lt;svg onload=alert(3)&gt;" in c.get("/queue").text
    assert "&lt;img src=x onerror=alert(4)&gt;" in c.get("/audit").text
    assert "&lt;script&gt;alert(5)&lt;/script&gt;" in c.get(f"/series/{UID['done']}").text
    # the API returns the values as received, with <, > and & escaped inside the JSON strings
    r = c.get(f"/api/v1/series/{UID['xss1']}")
    assert b"<" not in r.data and b">" not in r.data and b"\\u003cscript\\u003e" in r.data
    s = r.get_json()["series"]
    assert (s["patient_name"], s["description"], s["accession"]) == (XSS_SCRIPT, XSS_DESC, XSS_ACC)
    assert c.get(f"/api/v1/series/{UID['xss2']}").get_json()["series"]["patient_name"] == XSS_IMG
    rows = c.get("/api/v1/series", query_string={"q": XSS_SCRIPT}).get_json()["series"]
    assert [r["series_uid"] for r in rows] == [UID["xss1"]]
    assert c.get("/api/v1/jobs").get_json()["failed"][0]["reason"] == XSS_REASON
    r = c.get("/api/v1/dashboard")
    assert r.mimetype == "application/json" and r.headers["X-Content-Type-Options"] == "nosniff"
    assert XSS_IMG in [j["patient_name"] for j in r.get_json()["running"]]
    summary = c.get(f"/api/v1/series/{UID['done']}").get_json()["jobs"][0]["summary"]
    assert summary["warnings"] == [XSS_WARNING]
    # CSV cells carry the raw value (a CSV is not HTML), neutralised only against spreadsheet formulas
    assert XSS_USER in c.get("/audit.csv").text


def test_odd_requests_are_refused_not_crashed(panel: Panel) -> None:
    c = panel.login(ADMIN, ADMIN_PW)
    dead = panel.dead_ids()
    for bad in ["9" * 30, "-1", "0", "x", ""]:
        assert post_form(c, "/queue/retry", {"id": bad}).status_code == 400, bad
    for body in [{"ids": [10**30]}, {"ids": [-1]}, {"ids": [True]}, {"ids": [float(dead[0])]}, {"ids": []},
                 {"ids": "all"}, {"ids": list(range(1, 1002))}, [dead[0]], "all", {"all": "yes"}]:
        r = post_api(c, "/api/v1/outbox/retry", body)
        assert r.status_code == 400 and "ids" in r.get_json()["error"], body
    assert panel.dead_ids() == dead
    r = post_api(c, "/api/v1/destinations/pacs/suspend", ["not", "an", "object"])
    assert r.status_code == 200 and Outbox(panel.store.index).held() == {"pacs"}
    assert post_api(c, "/api/v1/destinations/pacs/resume", {"reason": 5}).get_json()["changed"] is True
    assert c.get("/audit", query_string={"page": "9" * 30}).status_code == 200
    assert c.get("/series", query_string={"page": "9" * 30}).status_code == 200
    assert c.get("/api/v1/series", query_string={"page": "9" * 30, "per_page": "9" * 30}).status_code == 200
    r = c.get("/api/v1/outbox/retry")
    assert r.status_code == 405 and r.mimetype == "application/json" and "POST" in r.headers["Allow"]
    assert c.get("/queue/retry").status_code == 405
    r = c.post("/api/v1/outbox/retry", data="[" + "1," * 40_000 + "1]", content_type="application/json",
               headers={"X-CSRFToken": api_token(c)})
    assert r.status_code == 413 and panel.dead_ids() == dead


# -- 6. login throttling --------------------------------------------------------------------------------------


def test_failed_logins_lock_the_account_then_the_address_until_an_admin_unlocks(panel: Panel) -> None:
    attacker = "10.9.9.9"
    u = Users(panel.store.index)
    c = panel.client(attacker)
    for i in range(10):  # [panel] lockout_account_failures = 10
        r = login(c, TECH, f"wrong guess {i}")
        assert r.status_code == 401 and "Wrong user name or password." in r.text
    assert u.locked(TECH, "10.1.1.1") == "account"
    r = login(c, TECH, TECH_PW)  # the right password, too late
    assert r.status_code == 401 and "Too many failed logins" in r.text and "Log out" not in r.text
    assert {(lk["kind"], lk["key"]) for lk in u.lockouts()} == {("account", TECH)}
    # the refusal above still counted against the address (11 failures); an unknown name counts the same
    # way, and the 20th failure from the address locks it (before "ghost" reaches its own 10)
    for i in range(8):
        assert "Wrong user name" in login(c, "ghost", f"wrong guess {i}").text
    assert {(lk["kind"], lk["key"]) for lk in u.lockouts()} == {("account", TECH)}
    assert login(c, "ghost", "wrong guess 8").status_code == 401
    assert {(lk["kind"], lk["key"]) for lk in u.lockouts()} == {("account", TECH), ("address", attacker)}
    # a flood from the locked address is refused without hashing and without a row
    before = len(panel.audit("login_failed"))
    assert "Too many failed logins" in login(c, "ghost", "anything").text
    assert len(panel.audit("login_failed")) == before
    # another real account from the locked address is refused; from another address it works
    r = login(c, VIEWER, VIEWER_PW)
    assert r.status_code == 401 and "Too many failed logins" in r.text
    ok = panel.client("10.1.1.1")
    assert login(ok, VIEWER, VIEWER_PW).status_code == 302 and ok.get("/").status_code == 200
    # the locked account is locked everywhere
    assert login(panel.client("10.1.1.2"), TECH, TECH_PW).status_code == 401
    # an admin sees the lockouts and lifts them
    admin = panel.login(ADMIN, ADMIN_PW, "10.1.1.3")
    page = admin.get("/users").text
    assert attacker in page and 'data-action="unlock-tech1"' in page
    assert post_form(admin, "/users/unlock", {"kind": "account", "key": TECH}).status_code == 302
    assert login(panel.client(attacker), TECH, TECH_PW).status_code == 401  # the address is still locked
    assert post_form(admin, "/users/unlock", {"kind": "address", "key": attacker}).status_code == 302
    assert "Lockout lifted." in admin.get("/users").text
    assert post_form(admin, "/users/unlock", {"kind": "planet", "key": "x"}).status_code == 400
    assert u.lockouts() == []
    again = panel.client(attacker)
    assert login(again, TECH, TECH_PW).status_code == 302 and again.get("/queue").status_code == 200
    # everything is in the audit log
    assert {a["target"] for a in panel.audit("lockout")} == {f"account:{TECH}", f"address:{attacker}"}
    failed = panel.audit("login_failed")
    assert sum(1 for a in failed if a["address"] == attacker) >= 20
    assert {a["detail"] for a in failed} >= {"wrong", "locked_account"}
    assert {a["target"] for a in panel.audit("unlock")} == {f"account:{TECH}", f"address:{attacker}"}
    assert all(a["username"] == ADMIN for a in panel.audit("unlock"))
    csv_text = admin.get("/audit.csv", query_string={"action": "lockout"}).text
    assert csv_text.count("\n") == 3 and "address:10.9.9.9" in csv_text


def test_twenty_wrong_passwords_lock_the_account_and_the_address_with_the_defaults(panel: Panel) -> None:
    c = panel.client("10.7.7.7")
    for i in range(20):  # the account locks at 10; the 10 refused while it is locked still count for the address
        assert login(c, TECH, f"guess {i}").status_code == 401
    locks = {(lk["kind"], lk["key"]) for lk in Users(panel.store.index).lockouts()}
    assert locks == {("account", TECH), ("address", "10.7.7.7")}
    assert "Too many failed logins" in login(c, VIEWER, VIEWER_PW).text  # another account, same address


def test_the_lockout_limits_come_from_the_panel_config(tmp_path: Path) -> None:
    p = make_panel(tmp_path, populated=False, lockout_account_failures=20, lockout_address_failures=20,
                   lockout_seconds=120.0)
    c = p.client("10.4.4.4")
    for i in range(19):
        assert "Wrong user name" in login(c, TECH, f"guess {i}").text
    assert Users(p.store.index).lockouts() == []
    login(c, TECH, "guess 19")  # the 20th locks the account and the address at once
    locks = Users(p.store.index).lockouts()
    assert {(lk["kind"], lk["key"]) for lk in locks} == {("account", TECH), ("address", "10.4.4.4")}
    assert all(abs(lk["until"] - lk["since"] - 120.0) < 1e-6 for lk in locks)
    assert "Too many failed logins" in login(c, VIEWER, VIEWER_PW).text
    assert login(p.client("10.4.4.5"), VIEWER, VIEWER_PW).status_code == 302


def test_a_disabled_account_cannot_log_in(panel: Panel) -> None:
    Users(panel.store.index).update(TECH, disabled=True)
    r = login(panel.client(), TECH, TECH_PW)
    assert r.status_code == 401 and "Wrong user name or password." in r.text  # says no more than a wrong password
    assert panel.audit("login_failed")[0]["detail"] == "disabled"


# -- 7. sessions ------------------------------------------------------------------------------------------------


def _set_cookie(r: Any) -> str:
    cookies = [h for h in r.headers.getlist("Set-Cookie") if h.startswith("appliance_panel=")]
    assert cookies, r.headers
    return cookies[-1]


def test_session_cookie_flags(tmp_path: Path) -> None:
    p = make_panel(tmp_path / "plain", populated=False)
    r = login(p.client(), ADMIN, ADMIN_PW)
    assert r.status_code == 302
    cookie = _set_cookie(r)
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    assert "Expires=" in cookie  # permanent, bounded by the idle timeout

    p = make_panel(tmp_path / "tls", populated=False, behind_tls_proxy=True)
    c = p.client()
    proxy = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "192.168.7.7"}
    page = c.get("/login", headers=proxy)
    cookie = _set_cookie(page)
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    r = c.post("/login", headers={**proxy, "Referer": "https://localhost/login"},
               data={"username": ADMIN, "password": ADMIN_PW, "csrf_token": token_in(page.text)})
    assert r.status_code == 302, r.text
    cookie = _set_cookie(r)
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    # the client address comes from the proxy's header
    assert p.audit("login")[0]["address"] == "192.168.7.7"


def test_an_idle_session_ends_and_the_pages_own_refresh_is_not_activity(panel: Panel) -> None:
    c = panel.login(TECH, TECH_PW)
    idle = panel.config.panel.idle_minutes * 60
    with c.session_transaction() as s:
        s["seen"] = time.time() - idle + 60  # a minute left
    before = time.time() - idle + 60
    r = c.get("/live/dashboard", headers={"X-Panel-Refresh": "1"})
    assert r.status_code == 200
    with c.session_transaction() as s:
        assert s["user"] == TECH and abs(s["seen"] - before) < 1.0  # not refreshed by polling
    assert c.get("/").status_code == 200
    with c.session_transaction() as s:
        assert s["seen"] > time.time() - 5  # a page a person asked for is activity
        s["seen"] = time.time() - idle - 1
    r = c.get("/queue")
    assert r.status_code == 302 and urlsplit(r.headers["Location"]).path == "/login"
    with c.session_transaction() as s:
        assert "user" not in s
    assert c.get("/api/v1/").status_code == 401


def test_a_disabled_or_removed_users_session_ends_at_the_next_request(panel: Panel) -> None:
    u = Users(panel.store.index)
    c = panel.login(TECH, TECH_PW)
    v = panel.login(VIEWER, VIEWER_PW)
    assert c.get("/").status_code == 200 and v.get("/api/v1/").status_code == 200
    u.update(TECH, disabled=True)
    r = c.get("/")
    assert r.status_code == 302 and urlsplit(r.headers["Location"]).path == "/login"
    u.update(TECH, disabled=False)
    assert c.get("/").status_code == 302  # the session is gone, not merely paused
    u.remove(VIEWER)
    assert v.get("/api/v1/").status_code == 401


def test_next_goes_back_to_the_page_but_never_off_the_panel(panel: Panel) -> None:
    c = panel.client()
    r = c.get("/series?q=DOE")
    login_page = c.get(r.headers["Location"])
    assert 'name="next" value="/series?q=DOE"' in login_page.text
    r = c.post("/login", data={"username": ADMIN, "password": ADMIN_PW, "next": "/series?q=DOE",
                               "csrf_token": token_in(login_page.text)})
    assert r.status_code == 302 and r.headers["Location"] == "/series?q=DOE"
    assert c.get("/login").headers["Location"] == "/"  # logged in already: the dashboard
    for hostile in ["//evil.example", "https://evil.example", "https://evil.example/login", "///evil.example",
                    "/\\evil.example", "\\\\evil.example", "/\t/evil.example", "javascript:alert(1)",
                    "http:evil.example", "evil.example"]:
        r = login(panel.client(), ADMIN, ADMIN_PW, next=hostile)
        assert r.status_code == 302, hostile
        loc = r.headers["Location"]
        target = urlsplit(urljoin("http://localhost/login", loc))
        assert target.netloc == "localhost" and "\\" not in loc and not loc.startswith("//"), (hostile, loc)
        if hostile in ("//evil.example", "https://evil.example", "https://evil.example/login", "///evil.example",
                       "javascript:alert(1)"):
            assert loc == "/", (hostile, loc)


# -- 8. the users page -----------------------------------------------------------------------------------------


def test_an_admin_manages_users_on_the_page(panel: Panel) -> None:
    u = Users(panel.store.index)
    c = panel.login(ADMIN, ADMIN_PW)
    strong = "Night shift 2026 rota"
    # weak and mismatching passwords are refused with a message
    r = post_form(c, "/users/add", {"name": "nurse", "role": "technician", "password": "short",
                                    "password2": "short"}, follow_redirects=True)
    assert r.status_code == 200 and "Password refused: it is too easy to guess" in r.text and "at least 12" in r.text
    r = post_form(c, "/users/add", {"name": "nurse", "role": "technician", "password": "nurse-password-123",
                                    "password2": "nurse-password-123"}, follow_redirects=True)
    assert "Password refused" in r.text and u.get("nurse") is None
    r = post_form(c, "/users/add", {"name": "nurse", "role": "technician", "password": strong,
                                    "password2": strong + "x"}, follow_redirects=True)
    assert "The two passwords differ." in r.text
    r = post_form(c, "/users/add", {"name": "bad name!", "role": "technician", "password": strong,
                                    "password2": strong}, follow_redirects=True)
    assert "User not added" in r.text
    r = post_form(c, "/users/add", {"name": "nurse", "role": "superuser", "password": strong,
                                    "password2": strong}, follow_redirects=True)
    assert "User not added" in r.text
    assert u.get("nurse") is None and panel.audit("user_add") == []
    # added
    r = post_form(c, "/users/add", {"name": "nurse", "role": "technician", "password": strong,
                                    "password2": strong}, follow_redirects=True)
    assert "User nurse added." in r.text
    assert u.get("nurse") is not None and u.get("nurse").role == "technician"  # type: ignore[union-attr]
    assert panel.audit("user_add")[0]["target"] == "nurse"
    assert login(panel.client(), "nurse", strong).status_code == 302
    r = post_form(c, "/users/add", {"name": "nurse", "role": "viewer", "password": strong, "password2": strong},
                  follow_redirects=True)
    assert "exists already" in r.text
    # role, disable, enable, password, remove
    post_form(c, "/users/nurse/change", {"action": "role", "role": "viewer"})
    assert u.get("nurse").role == "viewer"  # type: ignore[union-attr]
    post_form(c, "/users/nurse/change", {"action": "disable"})
    assert u.get("nurse").disabled is True  # type: ignore[union-attr]
    assert login(panel.client(), "nurse", strong).status_code == 401
    post_form(c, "/users/nurse/change", {"action": "enable"})
    assert u.get("nurse").disabled is False  # type: ignore[union-attr]
    r = post_form(c, "/users/nurse/change", {"action": "password", "password": "abc", "password2": "abc"},
                  follow_redirects=True)
    assert "Password refused: it is too easy to guess" in r.text
    r = post_form(c, "/users/nurse/change", {"action": "password", "password": "Another 2026 rota!",
                                             "password2": "Another 2026 rota?"}, follow_redirects=True)
    assert "Not changed" in r.text and "differ" in r.text
    assert login(panel.client(), "nurse", strong).status_code == 302
    post_form(c, "/users/nurse/change", {"action": "password", "password": "Another 2026 rota!",
                                         "password2": "Another 2026 rota!"})
    assert login(panel.client(), "nurse", strong).status_code == 401
    assert login(panel.client(), "nurse", "Another 2026 rota!").status_code == 302
    r = post_form(c, "/users/nurse/change", {"action": "remove"}, follow_redirects=True)
    assert "User nurse removed." in r.text and u.get("nurse") is None
    assert post_form(c, "/users/nurse/change", {"action": "remove"}).status_code == 404
    assert post_form(c, f"/users/{TECH}/change", {"action": "explode"}).status_code == 400
    details = [a["detail"] for a in panel.audit("user_change")]
    assert set(details) == {"role=viewer", "disable", "enable", "password reset"}
    assert [a["target"] for a in panel.audit("user_remove")] == ["nurse"]
    # not itself, and never the last admin
    r = post_form(c, f"/users/{ADMIN}/change", {"action": "remove"}, follow_redirects=True)
    assert "cannot remove your own account" in r.text and u.get(ADMIN) is not None
    r = post_form(c, f"/users/{ADMIN}/change", {"action": "disable"}, follow_redirects=True)
    assert "cannot disable your own account" in r.text and not u.get(ADMIN).disabled  # type: ignore[union-attr]
    r = post_form(c, f"/users/{ADMIN}/change", {"action": "role", "role": "viewer"}, follow_redirects=True)
    assert "is the last admin" in r.text and u.get(ADMIN).role == "admin"  # type: ignore[union-attr]
    # with a second admin, the first may step down (and then loses the users page at once)
    post_form(c, f"/users/{TECH}/change", {"action": "role", "role": "admin"})
    assert u.get(TECH).role == "admin"  # type: ignore[union-attr]
    r = post_form(c, f"/users/{ADMIN}/change", {"action": "role", "role": "technician"})
    assert r.status_code == 302 and u.get(ADMIN).role == "technician"  # type: ignore[union-attr]
    assert c.get("/users").status_code == 403
    t = panel.login(TECH, TECH_PW)
    r = post_form(t, f"/users/{TECH}/change", {"action": "role", "role": "viewer"}, follow_redirects=True)
    assert "is the last admin" in r.text and u.get(TECH).role == "admin"  # type: ignore[union-attr]


def test_the_last_enabled_admin_cannot_be_disabled_or_removed_by_another(panel: Panel) -> None:
    u = Users(panel.store.index)
    u.add("second", "admin", "Deputy head 2026!")
    u.update("second", disabled=True)
    c = panel.login(ADMIN, ADMIN_PW)
    # the other admin is disabled: enabling it gives two, then one can go
    post_form(c, "/users/second/change", {"action": "enable"})
    assert not u.get("second").disabled  # type: ignore[union-attr]
    s = panel.login("second", "Deputy head 2026!")
    r = post_form(s, f"/users/{ADMIN}/change", {"action": "disable"}, follow_redirects=True)
    assert f"User {ADMIN} changed." in r.text and u.get(ADMIN).disabled  # type: ignore[union-attr]
    assert c.get("/").status_code == 302  # chief's session ended
    r = post_form(s, f"/users/{ADMIN}/change", {"action": "remove"}, follow_redirects=True)
    assert u.get(ADMIN) is None
    with pytest.raises(Exception, match="last admin"):
        u.remove("second")


# -- 9. the command line ----------------------------------------------------------------------------------------


def _cli(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([appliance_exe(), *args, "--config", str(config)], input=stdin, capture_output=True,
                          text=True, timeout=60)


def test_cli_manages_users(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = tmp_path / "appliance.toml"
    write_toml(config, {"storage": {"data_dir": data}, "panel": {"port": 8181}})
    pw = "Reading room 4 lamp"
    r = _cli(config, "users", "add", "alice", "--role", "admin", stdin=f"{pw}\n{pw}\n")
    assert r.returncode == 0, r.stderr
    assert "user alice added with role admin" in r.stdout and "8181" in r.stdout
    r = _cli(config, "users", "add", "bob", "--role", "viewer", stdin="short\nshort\n")
    assert r.returncode == 2 and "password refused" in r.stderr and "at least 12" in r.stderr
    r = _cli(config, "users", "add", "bob", "--role", "viewer", stdin=f"{pw}\n{pw}!\n")
    assert r.returncode == 2 and "differ" in r.stderr
    r = _cli(config, "users", "add", "alice", "--role", "viewer", stdin=f"{pw}\n{pw}\n")
    assert r.returncode == 2 and "exists already" in r.stderr
    r = _cli(config, "users", "add", "carol", "--role", "owner", stdin=f"{pw}\n{pw}\n")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = _cli(config, "users", "list", "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout) == [{"name": "alice", "role": "admin", "language": None, "disabled": False}]
    # the account works in the panel; a lockout is lifted from the shell
    store = Store.open(data)
    cfg = Config.model_validate({"storage": {"data_dir": str(data)}})
    app = create_app(cfg, store, testing=True)
    assert login(app.test_client(), "alice", pw).status_code == 302
    r = _cli(config, "users", "unlock", "alice")
    assert r.returncode == 1 and "was not locked" in r.stdout
    for i in range(10):
        assert login(app.test_client(), "alice", f"nope {i}").status_code == 401
    assert Users(store.index).locked("alice", "10.0.0.1") == "account"
    listed = _cli(config, "users", "list")
    assert "alice" in listed.stdout and "locked account alice" in listed.stdout
    r = _cli(config, "users", "unlock", "alice")
    assert r.returncode == 0 and "account alice unlocked" in r.stdout
    assert Users(store.index).locked("alice", "10.0.0.1") is None
    assert login(app.test_client(), "alice", pw).status_code == 302
    shell = Audit(store.index).query(action="unlock")[1]
    assert shell[0]["target"] == "account:alice" and shell[0]["address"] == "local"
    assert shell[0]["username"].endswith("(shell)")
    assert Audit(store.index).query(action="user_add")[1][0]["target"] == "alice"
    r = _cli(config, "users", "unlock")
    assert r.returncode == 2 and "name the account" in r.stderr


def test_cli_help() -> None:
    for args, words in ((["users", "--help"], ["add", "list", "passwd", "unlock"]),
                        (["users", "add", "--help"], ["--role", "technician"]),
                        (["panel", "--help"], ["--port", "--config"])):
        r = subprocess.run([appliance_exe(), *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        for w in words:
            assert w in r.stdout, (args, w)


# -- 10. series search ------------------------------------------------------------------------------------------


def test_series_search_filters_and_pages(panel: Panel) -> None:
    c = panel.login(VIEWER, VIEWER_PW)

    def uids(**q: Any) -> list[str]:
        r = c.get("/api/v1/series", query_string=q)
        assert r.status_code == 200
        body = r.get_json()
        assert body["total"] >= len(body["series"])
        return [s["series_uid"] for s in body["series"]]

    def total(**q: Any) -> int:
        return int(c.get("/api/v1/series", query_string=q).get_json()["total"])

    assert uids(q="doe") == [UID["done"]]  # patient name, case-insensitive substring
    assert uids(q="JOHN") == [UID["dead"]]
    assert uids(q="PID-002") == [UID["dead"]]  # patient ID
    assert uids(q="ACC-1003") == [UID["failed"]]  # accession
    assert uids(q="  ACC-1004  ") == [UID["pending"]]
    assert set(uids(modality="MR")) == {UID["failed"], UID["receiving"]}
    assert uids(modality="XA") == []
    assert set(uids(state="export_failed")) == {UID["dead"], UID["xss1"]}
    assert uids(state="receiving") == [UID["receiving"]]
    assert uids(state="processing") == [UID["xss2"]]
    assert total(state="no-such-state") == 10  # an unknown state filters nothing
    assert set(uids(q="ACC", modality="MR", state="failed")) == {UID["failed"]}
    # received date range (local days, inclusive)
    assert uids(**{"from": "2024-03-10", "to": "2024-03-10"}) == [UID["done"]]
    assert uids(**{"from": "2024-03-11", "to": "2024-03-31"}) == [UID["dead"]]
    assert uids(**{"from": "2024-03-01", "to": "2024-03-31"}) == [UID["dead"], UID["done"]]  # newest first
    assert uids(**{"to": "2024-03-11"}) == [UID["done"]]
    assert total(**{"from": "2024-03-13"}) == 8
    assert total(**{"from": "not-a-date"}) == 10
    # LIKE wildcards are literal characters
    assert uids(q="%") == [UID["wild1"]]
    assert uids(q="_") == [UID["wild1"]]
    assert uids(q="D%C") == [UID["wild1"]]
    assert uids(q="PID_9") == [UID["wild1"]]
    assert set(uids(q="WILD")) == {UID["wild1"], UID["wild2"]}
    assert uids(q="\\") == []
    assert uids(q="%%") == []
    # paging
    pages = [c.get("/api/v1/series", query_string={"per_page": 3, "page": p}).get_json() for p in (1, 2, 3, 4)]
    assert [p["pages"] for p in pages] == [4, 4, 4, 4] and [len(p["series"]) for p in pages] == [3, 3, 3, 1]
    seen = [s["series_uid"] for p in pages for s in p["series"]]
    assert sorted(seen) == sorted(UID.values())
    received = [s["first_received"] for p in pages for s in p["series"]]
    assert received == sorted(received, reverse=True)
    beyond = c.get("/api/v1/series", query_string={"per_page": 3, "page": 99}).get_json()
    assert beyond["series"] == [] and beyond["total"] == 10 and beyond["page"] == 99
    assert len(uids(per_page=0)) == 1 and len(uids(per_page="x")) == 10 and len(uids(page="-3")) == 10
    # the page searches the same way and keeps the query in the pager and the refresh URL
    page = c.get("/series", query_string={"q": "ACC-100", "modality": "CT"}).text
    assert "Series found: 7" in page and "DOE, JANE" in page and "NGUYEN, VAN A" not in page
    assert "/live/series?q=ACC-100&amp;modality=CT" in page
    assert 'value="ACC-100"' in page and '<option value="MR"' in page
    rows = c.get("/live/series", query_string={"q": "%"}).text
    assert "WILD%CARD" in rows and "WILDXCARD" not in rows
    page = c.get("/series", query_string={"page": "2"}).text
    assert "Page 1 of 1" in page or "Page 2 of 1" in page  # 10 series fit one page of 50
    assert "No series match." in c.get("/series", query_string={"q": "nobody-at-all"}).text


# -- 11. audit CSV ------------------------------------------------------------------------------------------------


def test_audit_csv_has_a_header_and_neutralises_formulas(panel: Panel) -> None:
    formulas = ["=cmd|' /C calc'!A0", "+SUM(A1:A9)", "-2+3", "@HYPERLINK(\"http://x\")"]
    for f in formulas:
        assert login(panel.client("10.3.3.3"), f, "no such password").status_code == 401
    c = panel.login(ADMIN, ADMIN_PW)
    r = c.get("/audit.csv")
    assert r.status_code == 200 and r.mimetype == "text/csv"
    assert r.headers["Content-Disposition"].startswith("attachment; filename=audit-")
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0] == ["time_utc", "user", "address", "action", "target", "detail"]
    failed = [row for row in rows[1:] if row[3] == "login_failed"]
    assert len(failed) == len(formulas)
    for row, f in zip(failed, formulas, strict=True):  # oldest first
        assert row[1] == "'" + f and row[4] == "'" + f, row
        assert row[2] == "10.3.3.3" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row[0])
    for row in rows[1:]:
        for cell in row:
            assert cell[:1] not in ("=", "+", "-", "@"), row
    assert [row[3] for row in rows[1:]] == ["login_failed"] * 4 + ["login", "export_audit"]
    # filtered export, and the export itself is audited
    only = list(csv.reader(io.StringIO(c.get("/audit.csv", query_string={"action": "login"}).text)))
    assert [row[3] for row in only[1:]] == ["login"]
    assert [a["username"] for a in panel.audit("export_audit")] == [ADMIN, ADMIN]
    assert panel.audit("export_audit")[0]["detail"] == "action=login"
    page = c.get("/audit", query_string={"action": "login_failed"}).text
    assert "Entries: 4" in page and "=cmd|" in page  # a page is not a spreadsheet: shown as received


@pytest.mark.parametrize(("rules", "says"), [
    ({}, "2 smaller than 5.0 mm not reported"),
    ({"min_confidence": 0.24, "max_edge_contact": 0.35},
     "2 under 5.0 mm, of low confidence or rims along the liver edge not reported"),
])
def test_the_series_page_names_the_rules_that_left_lesions_out(tmp_path: Path, rules: dict[str, float],
                                                                says: str) -> None:
    import dataclasses

    p = make_panel(tmp_path)
    s = _summary(UID["done"])
    m = dataclasses.replace(s.measurements, unreported_lesions=2, min_lesion_diameter_mm=5.0, **rules)
    path = p.store.data_dir / "results" / UID["done"] / MODEL / SUMMARY_FILE
    path.write_text(dataclasses.replace(s, measurements=m).to_json())
    page = p.login(ADMIN, ADMIN_PW).get(f"/series/{UID['done']}").text
    assert says in page
