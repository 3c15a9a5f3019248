"""The panel in Vietnamese and Korean: complete catalogues, consistent terms, and no English left on any page.

The catalogues are ``appliance/panel/translations/<lang>/LC_MESSAGES/messages.po``, made from the panel's
own strings (templates, ``i18n.py`` labels, flash messages and error pages)::

    pybabel extract -F appliance/panel/babel.cfg -k lazy_gettext -o appliance/panel/translations/messages.pot appliance/panel
    pybabel update -i appliance/panel/translations/messages.pot -d appliance/panel/translations --no-fuzzy-matching

then every new ``msgstr`` filled in both languages (no fuzzy entries: the panel never shows them).

Two layers of checks:

* the catalogues: a fresh extraction (run here, into ``tmp_path``) has no message that the committed
  template or either catalogue lacks, each translated, not fuzzy, with the same ``%(name)s`` placeholders,
  the technical tokens kept, and the key terms of :data:`GLOSSARY` used the same way everywhere;
* the pages: a store with series in the states a technician meets (done with a result, dead letters,
  failed, waiting to send to a suspended destination, running, queued, still receiving), an audit trail
  of every action and a locked account, rendered by the real app in en, vi and ko. Every text a user sees
  (text nodes and the title, placeholder, aria-label and alt attributes) is collected, except DICOM header
  values (class ``dv``), UIDs (class ``uid``) and ``<time>``; any English word left in vi or ko fails,
  naming the page and the string. English pages must differ (a catalogue that fails to load would show
  English everywhere), and dates and numbers must follow each language's conventions.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import babel.dates
import pytest
from babel.messages.catalog import Catalog
from babel.messages.pofile import read_po

if importlib.util.find_spec("appliance.panel.slices") is None:  # pragma: no cover - until the renderer lands
    _stub = types.ModuleType("appliance.panel.slices")

    class SliceNotFound(LookupError):
        pass

    class SliceUnreadable(ValueError):
        pass

    class SliceRenderer:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def count(self, uid: str) -> int:
            return 0

    _stub.__dict__.update(SliceRenderer=SliceRenderer, SliceNotFound=SliceNotFound, SliceUnreadable=SliceUnreadable)
    sys.modules["appliance.panel.slices"] = _stub

from flask import Flask  # noqa: E402
from flask.testing import FlaskClient  # noqa: E402

from appliance import __version__  # noqa: E402
from appliance.config import Config  # noqa: E402
from appliance.infer.measure import LabelVolume, Lesion, Measurements, OrganVolume  # noqa: E402
from appliance.infer.summary import SUMMARY_FILE, BackendInfo, ModelInfo, SeriesInfo, Summary  # noqa: E402
from appliance.metrics.collect import Check, ProcessView  # noqa: E402
from appliance.models.package import bundled_models_dir  # noqa: E402
from appliance.panel.app import create_app  # noqa: E402
from appliance.panel.i18n import LANGUAGES  # noqa: E402
from appliance.store import InstanceRecord, Store  # noqa: E402
from appliance.store.jobs import JobQueue, NewObject  # noqa: E402
from appliance.store.outbox import Outbox  # noqa: E402
from appliance.store.users import Audit, Throttle, Users  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PANEL = ROOT / "appliance" / "panel"
TRANSLATIONS = PANEL / "translations"
TEMPLATE = TRANSLATIONS / "messages.pot"
LANGS = ("vi", "ko")

#: Key concepts, one term each per language, as a radiology department and its PACS administrators say
#: them: (concept, the English in a msgid, the Vietnamese term, the Korean term). Every msgid naming the
#: concept must use the term in its translation, so a page never calls one thing by two names.
GLOSSARY: list[tuple[str, str, str, str]] = [
    ("series", r"\bseries\b", "chuỗi ảnh", "시리즈"),
    ("study (date)", r"\bstudy\b", "ngày chụp", "검사일"),
    ("accession number", r"\baccession\b", "số tiếp nhận", "접수 번호"),
    ("patient", r"\bpatient\b", "bệnh nhân", "환자"),
    ("technician (role)", r"^technician$", "kỹ thuật viên", "방사선사"),
    ("viewer (role)", r"^viewer$", "người xem", "열람자"),
    ("administrator", r"\badministrator\b", "quản trị viên", "관리자"),
    ("dead letter", r"\bdead letter", "mục gửi lỗi", "전송 실패 항목"),
    ("audit log", r"\baudit log\b", "nhật ký kiểm tra", "감사 로그"),
    ("time to result", r"\btime to result\b", "thời gian ra kết quả", "결과 소요 시간"),
    ("queue", r"\bqueue\b", "hàng đợi", "대기열"),
    ("destination", r"\bdestinations?\b", "nơi nhận", "전송 대상"),
    ("model", r"\bmodels?\b", "mô hình", "모델"),
    ("liver", r"\bliver\b", "gan", "간"),
    ("lesion", r"\blesions?\b", "tổn thương", "병변"),
    ("volume", r"\bvolume\b", "thể tích", "부피"),
    ("slice", r"\bslice\b", "lát cắt", "슬라이스"),
    ("key image", r"\bkey image\b", "ảnh chính", "키 이미지"),
]

#: Never translated: protocol and product names, units, and the command a translation quotes.
TECHNICAL = [
    "appliance users add NAME --role admin",
    "ONNX Runtime",
    "TensorRT",
    "SHA-256",
    "DICOM",
    "PACS",
    "CSV",
    "API",
    "UID",
    "SEG",
    "SR",
    "SC",
    "OT",
    "CT",
    "MR",
    "AE",
    "p50",
    "p95",
    "mL",
    "mm",
    "ms",
]
PLACEHOLDER = re.compile(r"%\((\w+)\)[sd]")


# -- the catalogues -------------------------------------------------------------------------------------


def _read(path: Path, locale: str | None = None) -> Catalog:
    with path.open("rb") as f:
        return read_po(f, locale=locale)


def _po(lang: str) -> Catalog:
    return _read(TRANSLATIONS / lang / "LC_MESSAGES" / "messages.po", lang)


def _ids(catalog: Catalog) -> set[str]:
    return {m.id for m in catalog if m.id and isinstance(m.id, str)}


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    """The panel's messages as ``pybabel extract`` finds them now (the same command the module doc gives)."""
    out = tmp_path_factory.mktemp("extract") / "messages.pot"
    cmd = [
        sys.executable,
        "-c",
        "import sys; from babel.messages.frontend import CommandLineInterface as C; sys.exit(C().run(sys.argv))",
        "extract",
        "-F",
        str(PANEL / "babel.cfg"),
        "-k",
        "lazy_gettext",
        "-o",
        str(out),
        str(PANEL),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    catalog = _read(out)
    assert len(_ids(catalog)) > 150, "the extraction found almost nothing: is babel.cfg's mapping broken?"
    return catalog


def test_the_committed_template_and_catalogues_hold_every_message_extracted_now(extracted: Catalog) -> None:
    fresh = _ids(extracted)
    assert not fresh - _ids(_read(TEMPLATE)), (
        "messages.pot is stale: re-run the extraction in this module's doc; new: "
        f"{sorted(fresh - _ids(_read(TEMPLATE)))}"
    )
    for lang in LANGS:
        po = _po(lang)
        missing = sorted(fresh - _ids(po))
        assert not missing, f"{lang}: not in the catalogue (run pybabel update, then translate): {missing}"
        stale = sorted(m.id for m in po if m.id and m.id not in fresh)
        assert not stale, f"{lang}: entries no page uses any more (run pybabel update): {stale}"


@pytest.mark.parametrize("lang", LANGS)
def test_every_message_is_translated_with_its_placeholders(extracted: Catalog, lang: str) -> None:
    po = _po(lang)
    problems = []
    for msgid in sorted(_ids(extracted)):
        m = po.get(msgid)
        if m is None:
            problems.append(f"missing: {msgid!r}")
            continue
        text = m.string if isinstance(m.string, str) else ""
        if m.fuzzy:
            problems.append(f"fuzzy: {msgid!r}")
        if not text.strip():
            problems.append(f"empty: {msgid!r}")
            continue
        if set(PLACEHOLDER.findall(msgid)) != set(PLACEHOLDER.findall(text)):
            problems.append(f"placeholders differ: {msgid!r} -> {text!r}")
        if "%" in PLACEHOLDER.sub("", text).replace("%%", ""):  # Jinja formats every _() call: a lone % breaks it
            problems.append(f"a stray % (write %% for a percent sign): {text!r}")
        for token in TECHNICAL:
            if re.search(rf"(?<!\w){re.escape(token)}(?!\w)", msgid) and token not in text:
                problems.append(f"technical token {token!r} lost: {msgid!r} -> {text!r}")
        rest = PLACEHOLDER.sub("", msgid)
        for token in TECHNICAL:
            rest = rest.replace(token, "")
        if text == msgid and re.search(r"[A-Za-z]{2,}", rest):
            problems.append(f"left in English: {msgid!r}")
    assert not problems, f"{lang}:\n  " + "\n  ".join(problems)
    assert not [m.id for m in po if m.id and m.fuzzy], f"{lang}: fuzzy entries are never shown: remove the flag"


@pytest.mark.parametrize("lang", LANGS)
def test_key_terms_are_the_glossary_s_everywhere(lang: str) -> None:
    po = _po(lang)
    column = 2 if lang == "vi" else 3
    problems = []
    for entry in GLOSSARY:
        concept, pattern, term = entry[0], entry[1], entry[column]
        for m in po:
            if m.id and isinstance(m.id, str) and re.search(pattern, m.id, re.IGNORECASE):
                if term.lower() not in str(m.string).lower():
                    problems.append(f"{concept}: {m.id!r} -> {m.string!r} (the term is {term!r})")
    assert not problems, f"{lang}:\n  " + "\n  ".join(problems)


# -- the pages ------------------------------------------------------------------------------------------

MODEL = "liver-ct-demo"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ADMIN, ADMIN_PW = "chief", "Gan-mat 2026 secure!"
TECH, TECH_PW = "ktv.lan", "Phong chup so 7, 2026!"
VIEWER, VIEWER_PW = "bs.park", "Chi doc thoi, 2026 ok"
LOCKED = "ktv.tam"
LOCKED_ADDRESS = "10.20.0.78"
DESTINATIONS = [
    {"name": "pacs", "ae_title": "BVCR_PACS", "host": "10.20.0.5", "port": 104},
    {"name": "vna", "ae_title": "VNA_ARCHIVE", "host": "10.20.0.9", "port": 11112},
]
DEVICE = {"id": "cr-edge-01", "site": "cho-ray"}
REFUSED = "gan-v0-broken"
ENGINE = f"{MODEL}-1.4.0-fp16-sm87.plan"
STUDY_DATE = "20261203"  # day 3 and month 12 tell the orders apart
UIDS = {
    "done": "1.2.826.0.1.3680043.77.1",
    "dead": "1.2.826.0.1.3680043.77.2",
    "failed": "1.2.826.0.1.3680043.77.3",
    "pending": "1.2.826.0.1.3680043.77.4",
    "running": "1.2.826.0.1.3680043.77.5",
    "receiving": "1.2.826.0.1.3680043.77.6",
    "queued": "1.2.826.0.1.3680043.77.7",
}
#: Words of the pages that are names, not language: user, model, backend, destination, device names, AE
#: titles, the language picker's own names, the version. Removed before looking for English.
NAMES: list[str] = [
    ADMIN,
    TECH,
    VIEWER,
    LOCKED,
    MODEL,
    REFUSED,
    ENGINE,
    "onnxruntime",
    "tensorrt",
    "cpu",
    "cuda",
    "fp32",
    "fp16",
    *DEVICE.values(),
    *(str(d["name"]) for d in DESTINATIONS),
    *(str(d["ae_title"]) for d in DESTINATIONS),
    *LANGUAGES.values(),
    *(f"ktv.{lang}" for lang in ("en", *LANGS)),
    __version__,
    "GB",
    "MB",
    "kB",
]


def _add_series(store: Store, uid: str, now: float, n: int = 3, complete: bool = True, **header: Any) -> None:
    for i in range(n):
        rel = f"s/{uid}/{i}.dcm"
        p = store.spool.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 10)
        store.index.add_instance(
            InstanceRecord(
                sop_instance_uid=f"{uid}.{i}",
                sop_class_uid=CT_IMAGE,
                study_uid=f"{uid}.0",
                series_uid=uid,
                transfer_syntax="1.2.840.10008.1.2.1",
                path=rel,
                size=10,
                series_number=2,
                **header,
            ),
            None,
            now=now + i,
        )
    if complete:
        store.index.complete_quiet_series(time.time() + 100.0, 5.0, 1.0)


def _summary(uid: str) -> Summary:
    return Summary(
        model=ModelInfo(MODEL, "1.4.0", "3f9a" * 16),
        backend=BackendInfo("onnxruntime", "cpu", "fp32"),
        series=SeriesInfo(f"{uid}.0", uid, 3, 64, 64, (0.8, 0.8), 2.5, ("slice spacing irregular",)),
        measurements=Measurements(
            voxel_volume_ml=0.0016,
            labels=(LabelVolume(1, "Liver", 327_125, 1523.4), LabelVolume(2, "Liver lesion", 2625, 4.2)),
            organs=(OrganVolume("Liver", (1, 2), 329_750, 1527.6),),
            lesions=(Lesion(1, 2, 4.2, 21.5, 1, f"{uid}.1", (1.0, 30.0, 30.0)),),
        ),
        timings_s={"infer": 1.5},
    )


def _objects(uid: str) -> list[NewObject]:
    return [
        NewObject(
            kind=k,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
            sop_instance_uid=f"9.{uid}.{i}",
            result_series_uid=f"8.{uid}.{i}",
            path=f"results/{uid}/{MODEL}/{k.lower()}.dcm",
        )
        for i, k in enumerate(("SEG", "SR", "SC"))
    ]


def _job(
    store: Store,
    uid: str,
    dests: list[str],
    *,
    claim: bool = True,
    finish: bool = True,
    ok: bool = True,
    reason: str = "done",
    result_dir: str | None = None,
) -> None:
    q = JobQueue(store.index)
    assert q.queue_jobs(uid, [(MODEL, 0, ["liver-ct"], dests)]) == 1
    if not claim:
        return
    job = q.claim(4242)
    assert job is not None and job.series_uid == uid
    if finish:
        assert q.finish(
            job,
            ok=ok,
            reason=reason,
            backend="onnxruntime",
            device="cpu",
            precision="fp32",
            timings={"infer": 1.5},
            result_dir=result_dir,
            objects=_objects(uid) if ok else None,
        )


def _rows(store: Store, uid: str) -> list[Any]:
    return [r for r in Outbox(store.index).due(now=time.time() + 3600, limit=1000) if r.series_uid == uid]


def _populate(store: Store) -> None:
    """What a technician meets on a busy morning, made by the store's own operations."""
    now = time.time() - 2 * 3600
    ob = Outbox(store.index)
    fail: dict[str, Any] = {"max_attempts": 5, "base": 1.0, "cap": 10.0}
    _add_series(
        store,
        UIDS["done"],
        now,
        patient_name="NGUYỄN^VĂN AN",
        patient_id="BN-240311",
        accession="CR26-004512",
        description="CT BỤNG CÓ THUỐC",
        modality="CT",
        study_date=STUDY_DATE,
    )
    rd = f"results/{UIDS['done']}/{MODEL}"
    (store.data_dir / rd).mkdir(parents=True)
    (store.data_dir / rd / SUMMARY_FILE).write_text(_summary(UIDS["done"]).to_json())
    (store.data_dir / rd / "key.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    _job(store, UIDS["done"], ["pacs"], result_dir=rd)
    for r in _rows(store, UIDS["done"]):
        ob.record_sent(r, "0x0000")

    _add_series(
        store,
        UIDS["dead"],
        now + 600,
        patient_name="김^민준",
        patient_id="BN-240312",
        accession="CR26-004513",
        description="CT GAN 3 PHA",
        modality="CT",
        study_date="20261202",
    )
    _job(store, UIDS["dead"], ["pacs"])
    for r in _rows(store, UIDS["dead"]):
        assert (
            ob.record_failure(
                r,
                "association rejected: Called AE title not recognised",
                "A-ASSOCIATE-RJ 1/1/7",
                permanent=True,
                **fail,
            )
            == "dead"
        )

    _add_series(
        store,
        UIDS["failed"],
        now + 1200,
        patient_name="TRẦN^THỊ^BÌNH",
        patient_id="BN-240313",
        accession="CR26-004514",
        description="MR GAN",
        modality="MR",
        study_date="20261203",
    )
    _job(store, UIDS["failed"], ["pacs"], ok=False, reason="inference failed: out of memory on the device")

    _add_series(
        store,
        UIDS["pending"],
        now + 1800,
        patient_name="PARK^JI-HOON",
        patient_id="BN-240314",
        accession="CR26-004515",
        description="CT ABDOMEN",
        modality="CT",
        study_date="20261203",
    )
    _job(store, UIDS["pending"], ["pacs", "vna"])
    for r in _rows(store, UIDS["pending"]):
        if r.destination == "vna":
            assert (
                ob.record_failure(r, "cannot connect to 10.20.0.9:11112 (connection refused)", None, **fail)
                == "pending"
            )
    assert ob.suspend("vna", ADMIN, "VNA maintenance")

    _add_series(
        store,
        UIDS["running"],
        now + 2400,
        patient_name="LÊ^VĂN^CƯỜNG",
        patient_id="BN-240315",
        accession="CR26-004516",
        description="CT GAN",
        modality="CT",
        study_date="20261203",
    )
    _job(store, UIDS["running"], ["pacs"], finish=False)
    _add_series(
        store,
        UIDS["queued"],
        now + 3000,
        patient_name="PHẠM^THU^HÀ",
        patient_id="BN-240316",
        accession="CR26-004517",
        description="CT BỤNG",
        modality="CT",
        study_date="20261203",
    )
    _job(store, UIDS["queued"], ["pacs"], claim=False)
    _add_series(
        store,
        UIDS["receiving"],
        now + 3600,
        complete=False,
        patient_name="이^서연",
        patient_id="BN-240317",
        accession="CR26-004518",
        description="CT CHEST",
        modality="CT",
        study_date="20261203",
    )

    users = Users(store.index)
    users.add(ADMIN, "admin", ADMIN_PW)
    users.add(TECH, "technician", TECH_PW)
    users.add(VIEWER, "viewer", VIEWER_PW)
    users.add(LOCKED, "technician", "Mat khau cu da quen 2025")
    users.update(TECH, disabled=True)
    for _ in range(2):  # an account locked ...
        users.authenticate(LOCKED, "wrong", "10.20.0.77", Throttle(2, 1000, 900.0, 900.0))
    users.authenticate("nobody", "wrong", LOCKED_ADDRESS, Throttle(1000, 1, 900.0, 900.0))  # ... and an address
    audit = Audit(store.index)
    for action in Audit.ACTIONS:  # one of each, so every action's label is on the audit page
        audit.record(action, username=ADMIN, address="10.20.0.50", target=UIDS["done"], detail="api")


@dataclass
class Walk:
    app: Flask
    client: FlaskClient
    #: (page, lang) -> the visible strings; (page, lang) -> the strings inside DICOM values and <time>
    texts: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    values: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    times: dict[tuple[str, str], list[str]] = field(default_factory=dict)


class Visible(HTMLParser):
    """The strings a user reads: text nodes and the attributes a browser shows or speaks, outside DICOM
    values (class ``dv``), UIDs (class ``uid``), ``<time>``, scripts and styles, which are kept apart."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
    SHOWN = ("title", "placeholder", "aria-label", "alt")

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, str | None]] = []  # (tag, why its content is not language)
        self.texts: list[str] = []
        self.values: list[str] = []
        self.times: list[str] = []

    def _skipping(self) -> str | None:
        return next((why for _, why in reversed(self.stack) if why), None)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        why = None
        if tag in ("script", "style"):
            why = "code"
        elif tag == "time":
            why = "time"
        elif "dv" in classes or "uid" in classes:
            why = "value"
        skipping = self._skipping() or why
        if not skipping:
            for name in self.SHOWN:
                if a.get(name) and a[name].strip():  # type: ignore[union-attr]
                    self.texts.append(a[name].strip())  # type: ignore[union-attr]
        if tag not in self.VOID:
            self.stack.append((tag, why))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not self._skipping():
            a = dict(attrs)
            for name in self.SHOWN:
                if a.get(name) and a[name].strip():  # type: ignore[union-attr]
                    self.texts.append(a[name].strip())  # type: ignore[union-attr]

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        text = " ".join(data.split())
        if not text:
            return
        why = self._skipping()
        if why is None:
            self.texts.append(text)
        elif why == "value":
            self.values.append(text)
        elif why == "time":
            self.times.append(text)


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m, "no CSRF token on the page"
    return m.group(1)


def _login(client: FlaskClient, name: str, password: str) -> None:
    token = _csrf(client.get("/login").get_data(as_text=True))
    r = client.post("/login", data={"username": name, "password": password, "csrf_token": token})
    assert r.status_code == 302, r.get_data(as_text=True)[:2000]


def _config(data: Path, models: Path) -> Config:
    return Config.model_validate(
        {
            "storage": {"data_dir": str(data), "min_free_bytes": 1_000_000},
            "inference": {"models_dir": str(models)},
            "destinations": DESTINATIONS,
            "device": DEVICE,
        }
    )


def _models_dir(root: Path) -> Path:
    models = root / "models"
    models.mkdir()
    (models / MODEL).symlink_to(bundled_models_dir() / MODEL, target_is_directory=True)
    (models / REFUSED).mkdir()
    (models / REFUSED / "manifest.toml").write_text("name = 1\n")
    return models


PAGES = ["/", "/series", "/queue", "/models", "/audit", "/users", "/settings", "/live/dashboard", "/live/series", "/live/queue"]
PAGES += [f"/series/{uid}" for uid in UIDS.values()] + [f"/live/series/{uid}" for uid in UIDS.values()]


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    root = tmp_path_factory.mktemp("i18n")
    data = root / "data"
    data.mkdir()
    (data / "engines").mkdir()
    (data / "engines" / ENGINE).write_bytes(b"\0" * 4096)
    store = Store.open(data)
    _populate(store)
    processes = ProcessView(open_associations=2, listeners_alive=1, listeners=2, worker_alive=True, sender_alive=False)
    app = create_app(
        _config(data, _models_dir(root)),
        store,
        processes=lambda: processes,
        checks=lambda: [Check("store", True), Check("disk", False, "only 1.2 GB free below the reserve")],
    )
    w = Walk(app, app.test_client())

    def visit(client: FlaskClient, page: str, lang: str, status: int = 200, **kw: Any) -> None:
        method = kw.pop("method", "GET")
        r = client.open(page, method=method, headers={"Accept-Language": lang}, **kw)
        assert r.status_code == status, f"{method} {page} in {lang}: {r.status_code}\n{r.get_data(as_text=True)[:3000]}"
        html = r.get_data(as_text=True)
        if not page.startswith("/live/"):
            assert f'<html lang="{lang}">' in html, f"{page} was not rendered in {lang}"
        p = Visible()
        p.feed(html)
        p.close()
        key = (f"{method} {page}" if method != "GET" else page, lang)
        w.texts[key], w.values[key], w.times[key] = p.texts, p.values, p.times

    # before logging in: the login form, a failed login, and the first-run hint of a box with no account
    for lang in ("en", *LANGS):
        anon = app.test_client()
        visit(anon, "/login", lang)
        token = _csrf(anon.get("/login").get_data(as_text=True))
        visit(
            anon,
            "/login",
            lang,
            status=401,
            method="POST",
            data={"username": ADMIN, "password": "not it", "csrf_token": token},
        )
    empty_data = root / "empty"
    empty_data.mkdir()
    empty = create_app(_config(empty_data, root / "models"), Store.open(empty_data))
    for lang in ("en", *LANGS):
        visit(empty.test_client(), "/login?first", lang)

    _login(w.client, ADMIN, ADMIN_PW)
    for lang in ("en", *LANGS):
        for page in PAGES:
            visit(w.client, page, lang)
        visit(w.client, "/series/1.2.3.999", lang, status=404)
        visit(w.client, "/queue/retry", lang, status=400, method="POST", data={"all": "1"})  # no CSRF token
    # what an action answers (flash messages), on the page it returns to
    for lang in ("en", *LANGS):
        token = _csrf(w.client.get("/queue").get_data(as_text=True))
        said = {"Accept-Language": lang}  # the flash is worded when the action is done, in its request's language
        for action in ("suspend", "resume"):
            w.client.post(f"/queue/destination/pacs/{action}", data={"csrf_token": token}, headers=said)
            visit(w.client, f"/queue#{action}", lang)
        password = "Hai muoi ky tu 2026!"
        w.client.post(
            "/users/add",
            headers=said,
            data={
                "csrf_token": token,
                "name": f"ktv.{lang}",
                "role": "viewer",
                "password": password,
                "password2": password,
            },
        )
        visit(w.client, "/users#added", lang)
        w.client.post(
            "/users/add",
            headers=said,
            data={"csrf_token": token, "name": "x.y", "role": "viewer", "password": password, "password2": "other"},
        )
        visit(w.client, "/users#differ", lang)
    # a viewer: read-only pages, and the page that says the role may not
    viewer = app.test_client()
    _login(viewer, VIEWER, VIEWER_PW)
    for lang in ("en", *LANGS):
        visit(viewer, "/#viewer", lang)
        visit(viewer, "/queue#viewer", lang)
        visit(viewer, "/users#viewer", lang, status=403)
        token = _csrf(viewer.get("/").get_data(as_text=True))
        viewer.post("/logout", data={"csrf_token": token}, headers={"Accept-Language": lang})
        visit(viewer, "/login#logged-out", lang)
        _login(viewer, VIEWER, VIEWER_PW)
    yield w
    store.index.close()


def _pages(w: Walk, lang: str) -> list[str]:
    return sorted(page for page, lg in w.texts if lg == lang)


def _words_outside_names(text: str) -> str:
    for token in sorted(TECHNICAL + NAMES, key=len, reverse=True):
        # ASCII boundaries only: a Korean particle follows a name directly ("ktv.ko을(를)")
        text = re.sub(rf"(?<![A-Za-z0-9_.-]){re.escape(token)}(?![A-Za-z0-9_-])", " ", text)
    return text


def _ascii_words(text: str) -> list[str]:
    """Words (letters only) of three or more letters, all of them ASCII: the shape of an English word."""
    return [w for w in re.findall(r"[^\W\d_]+", text) if w.isascii() and len(w) >= 3]


@pytest.fixture(scope="module")
def vietnamese_ascii_words() -> set[str]:
    """Vietnamese words written without diacritics ("Trang", "Sau", "Gan", "theo"): the catalogue's own,
    less any that is also a word of an English msgid, so an untranslated English word never hides among them."""
    po = _po("vi")
    english = {w.lower() for m in po if m.id for w in _ascii_words(PLACEHOLDER.sub(" ", str(m.id)))}
    return {
        w.lower()
        for m in po
        if m.id
        for w in _ascii_words(_words_outside_names(PLACEHOLDER.sub(" ", str(m.string))))
        if w.lower() not in english
    }


def _date_words(lang: str) -> set[str]:
    """The words the locale's own dates are written with (Vietnamese "thg" for tháng): dates are not text."""
    words: set[str] = set()
    for width in ("abbreviated", "wide", "narrow"):
        for context in ("format", "stand-alone"):
            names = [
                *babel.dates.get_month_names(width, context, lang).values(),
                *babel.dates.get_day_names(width, context, lang).values(),
                *babel.dates.get_period_names(width, context, lang).values(),
            ]
            words |= {w.lower() for name in names for w in _ascii_words(name)}
    return words


@pytest.mark.parametrize("lang", LANGS)
def test_no_english_is_left_on_any_page(walk: Walk, lang: str, vietnamese_ascii_words: set[str]) -> None:
    assert len(_pages(walk, lang)) >= len(PAGES) + 10
    native = (vietnamese_ascii_words if lang == "vi" else set()) | _date_words(lang)
    assert not native & {"series", "patient", "queue", "dead", "sending", "failed"}, "the exceptions hide English"
    found = []
    for page in _pages(walk, lang):
        for text in walk.texts[(page, lang)]:
            english = [w for w in _ascii_words(_words_outside_names(text)) if w.lower() not in native]
            if english:
                found.append(f"{page}: {text!r} ({', '.join(english)})")
    assert not found, f"English on the {lang} pages (wrap it in _() and translate it):\n  " + "\n  ".join(found)


def test_the_walk_sees_english_on_the_english_pages(walk: Walk) -> None:
    """The check above would catch a catalogue that does not load: in English it finds English on every page."""
    for page in _pages(walk, "en"):
        words = [w for t in walk.texts[(page, "en")] for w in _ascii_words(_words_outside_names(t))]
        assert words, f"{page}: no English found on the English page: the walk reads nothing"


@pytest.mark.parametrize("lang", LANGS)
def test_every_page_differs_from_its_english_one(walk: Walk, lang: str) -> None:
    assert _pages(walk, lang) == _pages(walk, "en")
    for page in _pages(walk, lang):
        en, other = walk.texts[(page, "en")], walk.texts[(page, lang)]
        same = [t for t in other if t in en and _ascii_words(_words_outside_names(t))]
        assert other != en and not same, f"{page} in {lang} repeats the English: {same[:10]}"
    if lang == "ko":
        hangul = [t for p in _pages(walk, lang) for t in walk.texts[(p, lang)] if re.search(r"[\uac00-\ud7a3]", t)]
        assert len(hangul) > 100
    else:
        marked = [
            t
            for p in _pages(walk, lang)
            for t in walk.texts[(p, lang)]
            if re.search(r"[ăâđêôơưạảấầẩậắằặẹẻẽếềểệịọỏốồổộớờởợụủứừửữựỳỷỹ]", t, re.I)
        ]  # noqa: E501
        assert len(marked) > 100


def _study_date(walk: Walk, page: str, lang: str) -> str:
    """The study date as the series page's facts show it: the one ``<dd>`` with the year in it."""
    html = walk.client.get(page, headers={"Accept-Language": lang}).get_data(as_text=True)
    facts = [re.sub(r"<[^>]+>", "", dd).strip() for dd in re.findall(r"<dd[^>]*>(.*?)</dd>", html, re.S)]
    dates = [f for f in facts if "2026" in f]
    assert len(dates) == 1, f"{page} in {lang}: {facts}"
    return dates[0]


def test_dates_and_numbers_follow_the_language(walk: Walk) -> None:
    page = f"/series/{UIDS['done']}"
    # the study date (a DICOM DA value, 20261203), in each language's order: ko year first, vi day first
    study = {lang: _study_date(walk, page, lang) for lang in ("en", *LANGS)}
    numbers = {lang: [int(n) for n in re.findall(r"\d+", s)] for lang, s in study.items()}
    assert numbers["ko"][:3] == [2026, 12, 3], study
    assert numbers["vi"][:2] == [3, 12] and 2026 in numbers["vi"], study
    assert len(set(study.values())) == 3, study
    # times: every <time> of the timeline differs between languages, and Korean ones say 오전 or 오후
    times = {lang: walk.times[(page, lang)] for lang in ("en", *LANGS)}
    assert times["en"] and len(times["en"]) == len(times["vi"]) == len(times["ko"])
    for en, vi, ko in zip(times["en"], times["vi"], times["ko"], strict=True):
        assert len({en, vi, ko}) == 3, (en, vi, ko)
        assert re.search("오전|오후", ko), ko
        assert not re.search(r"\b(AM|PM)\b", vi), vi
    # decimals: the liver's volume 1527.6 mL is 1.527,6 in Vietnamese, 1,527.6 in Korean and English
    live = f"/live/series/{UIDS['done']}"
    text = {lang: " ".join(walk.texts[(live, lang)]) for lang in ("en", *LANGS)}
    assert "1.527,6" in text["vi"] and "1,527.6" in text["ko"] and "1,527.6" in text["en"], text["vi"][:500]


def test_each_catalogue_is_the_one_the_pages_use(walk: Walk) -> None:
    """Spot checks of the glossary's terms on the pages themselves."""
    for lang, words in {
        "vi": ["Chuỗi ảnh", "Số tiếp nhận", "Mục gửi lỗi", "Nhật ký kiểm tra", "thời gian ra kết quả", "Gan"],
        "ko": ["시리즈", "접수 번호", "전송 실패 항목", "감사 로그", "결과 소요 시간", "간"],
    }.items():
        shown = " ".join(t for p in _pages(walk, lang) for t in walk.texts[(p, lang)])
        for word in words:
            assert word in shown, f"{word!r} is not on any {lang} page"
