"""The technician panel in a real browser (Debian's chromium driven by Playwright) against a real appliance.

One browser session follows a series the way a technician would: log in, watch the series list fill in
while storescu sends (no reload: the page's own refresh), watch the series page until the results reach the
PACS (a DCMTK storescp), scroll the slices with and without the overlay, retry a dead letter of a destination
that is down, suspend and resume the PACS, switch languages, and leave a screenshot of every page in every
language under ``test-artifacts/panel/`` for a person to look at. The patient name is an XSS payload: any
dialog fails the test.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from conftest import Appliance, appliance_exe, free_port
from peers import StoreSCP
from test_worker import send, series_uid_of

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "panel"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

ADMIN, PASSWORD = "admin", "Correct-Horse-Battery-9"
HOSTILE_NAME = "<img src=x onerror=alert(1)>"
HOSTILE_DESCRIPTION = '"><script>alert(2)</script>'
LANGS = ("en", "vi", "ko")
PAGES = ("login", "dashboard", "series-list", "series-detail", "queue", "models", "audit", "users")
VIETNAMESE = re.compile("[ạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹđĐ]")
HANGUL = re.compile("[\uac00-\ud7a3]")

ROUTE = {"name": "ct", "match": {"Modality": "CT"}, "models": ["liver-ct-demo"], "destinations": ["pacs", "archive"]}
#: Retries compressed to a fraction of a second: the closed "archive" port makes dead letters within a second.
EXPORT = {"max_attempts": 2, "backoff_seconds": 0.2, "backoff_max_seconds": 0.5, "timeout_seconds": 5,
          "poll_seconds": 0.1}
ASSEMBLE = {"stable_seconds": 2, "release_grace_seconds": 0.3, "poll_seconds": 0.1}
#: Generous: the first model run on a cold CPU includes starting the worker and loading ONNX Runtime.
RESULT_WITHIN_MS = 90_000


def _playwright() -> Any:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium): the panel's browser test needs it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[test]')")
    return sync_playwright


def phantom_series(folder: Path) -> Path:
    """A small synthetic abdomen the demo model was made for (12 slices of 256², liver in view), with a patient
    name and description that are HTML."""
    from appliance_dev.dicom_factory import write_ct_volume
    from appliance_dev.synthetic import CaseSpec, make_phantom

    spec = CaseSpec(seed=2_000_001, fov_mm=400.0, rows=256, cols=256, slice_thickness=2.5, slice_spacing=2.5,
                    n_slices=12)
    hu, _, meta = make_phantom(spec)
    ps = meta["pixel_spacing"]
    write_ct_volume(folder, hu, spacing=(ps[0], ps[1]), thickness=spec.slice_spacing)
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.PatientName = HOSTILE_NAME
        ds.SeriesDescription = HOSTILE_DESCRIPTION
        ds.PatientID = "XSS-0001"
        ds.save_as(f)
    return folder


def add_user(app: Appliance, name: str, role: str, password: str) -> None:
    res = subprocess.run([appliance_exe(), "users", "add", name, "--role", role, "--config", str(app.config_path)],
                         input=f"{password}\n{password}\n", capture_output=True, text=True, timeout=60, cwd=app.root)
    assert res.returncode == 0, f"appliance users add failed ({res.returncode}): {res.stdout}{res.stderr}"


def outbox_rows(app: Appliance, uid: str) -> list[dict[str, Any]]:
    res = app.cli("outbox", "list", "--json", "--series", uid)
    assert res.returncode == 0, f"appliance outbox list failed ({res.returncode}): {res.stderr}"
    return json.loads(res.stdout)


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    return ARTIFACTS


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    peer = StoreSCP(tmp_path / "pacs").start()
    yield peer
    peer.stop()


def test_panel_in_a_browser(appliance_factory: Any, tmp_path: Path, pacs: StoreSCP, artifacts: Path) -> None:
    sync_playwright = _playwright()
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    started = time.monotonic()
    closed_port = free_port()  # nothing listens there: every association to "archive" is refused
    app: Appliance = appliance_factory(
        start=False, routes=[ROUTE],
        destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port},
                      {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": closed_port}],
        assemble=ASSEMBLE, export=EXPORT,
        inference={"backend": "onnxruntime", "poll_seconds": 0.1},
    )
    add_user(app, ADMIN, "admin", PASSWORD)
    app.start()
    base = f"http://127.0.0.1:{app.panel_port}"
    folder = phantom_series(tmp_path / "ct")
    uid = series_uid_of(folder)
    n_images = len(list(folder.glob("*.dcm")))

    dialogs: list[str] = []
    page_errors: list[str] = []
    console_errors: list[str] = []
    failed_responses: list[tuple[int, str]] = []

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 800}, locale="en-US")
        page = context.new_page()
        page.set_default_timeout(15_000)

        def on_dialog(dialog: Any) -> None:
            dialogs.append(f"{dialog.type}: {dialog.message}")
            dialog.dismiss()

        page.on("dialog", on_dialog)
        page.on("pageerror", lambda exc: page_errors.append(str(exc)))
        page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
        page.on("response", lambda r: failed_responses.append((r.status, r.url)) if r.status >= 400 else None)

        def fail(what: str) -> None:
            shot = artifacts / f"FAILED-{int(time.time())}.png"
            try:
                page.screenshot(path=str(shot), full_page=True)
            except PlaywrightError:
                pass
            pytest.fail(f"{what}\npage: {page.url} (screenshot {shot.name})\nconsole errors: {console_errors[-10:]}\n"
                        f"--- appliance log ---\n{app.log_tail(60)}")

        def wait(what: str, fn: Callable[[], Any]) -> None:
            try:
                fn()
            except PlaywrightTimeout as exc:
                fail(f"timed out: {what} ({str(exc).splitlines()[0]})")

        def goto(path: str) -> None:
            try:
                resp = page.goto(base + path)
            except PlaywrightError as exc:
                fail(f"cannot open {path}: {exc}")
            if resp is None or resp.status != 200:
                fail(f"{path} answered {resp.status if resp else 'nothing'}")

        def mark() -> None:
            page.evaluate("window.__marker = 1")

        def still_marked(what: str) -> None:
            if page.evaluate("window.__marker") != 1:
                fail(f"the page reloaded while {what}: the live part should refresh in place")

        def no_dialogs() -> None:
            assert not dialogs, f"a dialog opened (script injected through a DICOM value?): {dialogs}"
            assert page.locator("img[src='x']").count() == 0, "the patient name was rendered as an <img> element"

        def pick_language(lang: str) -> None:
            with page.expect_navigation():
                page.select_option("select#lang-pick", lang)
            got = page.get_attribute("html", "lang")
            if got != lang:
                fail(f"after picking {lang}, <html lang> is {got!r}")

        def shoot(lang: str, name: str) -> None:
            page.wait_for_load_state("load")
            page.screenshot(path=str(artifacts / f"{lang}-{name}.png"), full_page=True)

        # -- 1. the login page, in each language (the picker before login holds for this browser's session) --
        goto("/login")
        if page.get_attribute("html", "lang") != "en":
            fail("the login page is not in English for an en-US browser")
        assert page.locator("form input[name=csrf_token][type=hidden]").count() >= 1, "the login form has no CSRF token"
        shoot("en", "login")
        for lang in ("vi", "ko"):
            pick_language(lang)
            shoot(lang, "login")
        pick_language("en")

        # A wrong password first: refused, still on the login page.
        page.fill("input[name=username]", ADMIN)
        page.fill("input[name=password]", "not-the-password-1")
        with page.expect_navigation():
            page.click("form[action='/login'] button[type=submit]")
        assert "/login" in page.url and page.locator(".flash.error").count() == 1, "a wrong password was not refused"

        # -- 2. log in as the admin made by the CLI: the dashboard --
        page.fill("input[name=username]", ADMIN)
        page.fill("input[name=password]", PASSWORD)
        with page.expect_navigation():
            page.click("form[action='/login'] button[type=submit]")
        if page.url.rstrip("/") != base:
            fail(f"after logging in, the browser is at {page.url}, not the dashboard")
        if page.locator("#live").count() != 1 or page.locator(".who", has_text=ADMIN).count() != 1:
            fail("the dashboard does not show its live part or the logged-in user")

        # -- 3. the series list fills in while storescu sends, without a reload --
        goto("/series")
        mark()
        send(app, folder)
        row = page.locator("#live tbody tr", has_text=HOSTILE_NAME)
        wait("the sent series to appear in the series list (#live refresh every 3 s)",
             lambda: row.first.wait_for(timeout=30_000))
        still_marked("waiting for the series list")
        assert row.count() == 1, f"{row.count()} rows for one series"
        assert HOSTILE_DESCRIPTION in row.inner_text(), "the series description is not shown as text"
        no_dialogs()

        # -- 4. the series page follows the work until the PACS has the results --
        with page.expect_navigation():
            row.locator("a").first.click()
        if f"/series/{uid}" not in page.url:
            fail(f"the series row links to {page.url}, not /series/{uid}")
        mark()
        state = page.locator("#live .badge.s-done, #live .badge.s-export_failed")
        wait("the series to end done or export_failed (#live refresh every 2 s)",
             lambda: state.first.wait_for(timeout=RESULT_WITHIN_MS))
        pacs_rows = page.locator("#live tr", has=page.locator("td", has_text=re.compile(r"^pacs$")))
        wait("the series page's sending table to show every pacs row delivered",
             lambda: page.wait_for_function(
                 """() => {
                     const rows = [...document.querySelectorAll('#live tr')]
                         .filter(tr => [...tr.cells].some(td => td.textContent.trim() === 'pacs'));
                     return rows.length >= 2 && rows.every(tr => tr.querySelector('.badge.s-sent'));
                 }""", timeout=30_000))
        still_marked("waiting for the results to be delivered")
        delivered = pacs_rows.count()
        timeline = page.inner_text("#live .timeline")
        assert "Model finished" in timeline and "Acknowledged by the destination" in timeline, timeline
        assert page.locator("#live .result").count() >= 1, "no result section for the model"
        no_dialogs()

        received = {str(pydicom.dcmread(f, stop_before_pixels=True).Modality) for f in pacs.files()}
        assert {"SEG", "SR"} <= received, f"the PACS received {received}, not a SEG and an SR"
        assert len(pacs.files()) == delivered, f"the PACS holds {len(pacs.files())} objects, the page shows {delivered}"

        # -- 5. the slice scroller: another slice, with and without the overlay --
        if page.locator("#scroller").count() == 0:
            fail("the series page has no slice scroller (#scroller): is appliance/panel/slices.py in place, and did "
                 "it count the series' slices?")
        img = page.locator("#slice-img")
        wait("the first slice image to load", lambda: page.wait_for_function(
            "() => { const i = document.getElementById('slice-img'); return i.complete && i.naturalWidth > 0; }",
            timeout=15_000))
        count = int(page.get_attribute(".scroller", "data-count") or 0)
        assert count == n_images, f"the scroller counts {count} slices, the series has {n_images}"
        job_value = page.eval_on_selector("#slice-job", "e => e.value")
        assert job_value, "no overlay is selected by default although the model's result has a label map"
        before = img.get_attribute("src")
        target = 2 if count // 2 != 2 else 3
        page.eval_on_selector("#slice-pos", "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }",
                              target)
        wait("the slice image to change and load after moving the scroller", lambda: page.wait_for_function(
            """before => { const i = document.getElementById('slice-img');
                           return i.getAttribute('src') !== before && i.complete && i.naturalWidth > 0; }""",
            arg=before, timeout=15_000))
        src = img.get_attribute("src") or ""
        assert f"/{target}.png" in src and f"job={job_value}" in src, src
        assert page.inner_text("#slice-label").strip() == f"{target + 1} / {count}"
        # The same slice with and without the overlay: the overlay colours the liver, so the PNGs differ.
        middle = count // 2
        with_overlay = page.request.get(f"{base}/series/{uid}/slice/{middle}.png?window=liver&job={job_value}")
        plain = page.request.get(f"{base}/series/{uid}/slice/{middle}.png?window=liver")
        for r in (with_overlay, plain):
            assert r.status == 200 and r.headers.get("content-type") == "image/png", (r.status, r.text()[:200])
        assert with_overlay.body()[:8] == b"\x89PNG\r\n\x1a\n"
        assert with_overlay.body() != plain.body(), "the slice with the overlay is the same PNG as without"
        assert page.request.get(f"{base}/series/{uid}/slice/{count + 5}.png").status == 404
        # Switching the overlay off redraws the image without it.
        page.select_option("#slice-job", "")
        wait("the image without the overlay", lambda: page.wait_for_function(
            "() => !document.getElementById('slice-img').src.includes('job=')", timeout=5_000))
        shoot("en", "series-detail")

        # -- 6. the queue: dead letters for "archive", retry one; suspend and resume "pacs" --
        goto("/queue")
        dead = page.locator("button[data-action^='retry-']:not([data-action='retry-all'])")
        wait("the archive dead letters to appear on the queue page",
             lambda: dead.first.wait_for(timeout=30_000))
        action = dead.first.get_attribute("data-action") or ""
        row_id = int(action.removeprefix("retry-"))
        rows = {r["id"]: r for r in outbox_rows(app, uid)}
        assert rows[row_id]["destination"] == "archive" and rows[row_id]["state"] == "dead", rows[row_id]
        assert all(r["state"] == "sent" for r in rows.values() if r["destination"] == "pacs"), rows
        attempts_before = len(app.query("SELECT id FROM outbox_attempts WHERE outbox_id = ?", (row_id,)))
        assert attempts_before == EXPORT["max_attempts"], attempts_before
        with page.expect_navigation():
            page.click(f"button[data-action='retry-{row_id}']")
        flash = page.locator("main .flash")
        assert flash.count() >= 1 and "1 dead letter(s) queued to send again" in flash.first.inner_text(), (
            flash.all_inner_texts())
        # The row went back to pending with a fresh count (it dies again at once: the port is still closed).
        moved = app.query("SELECT to_state FROM outbox_events WHERE outbox_id = ? AND reason = 'retry requested'",
                          (row_id,))
        assert [r["to_state"] for r in moved] == ["pending"], moved
        audit = app.query("SELECT username, target FROM audit WHERE action = 'retry'")
        assert [(r["username"], r["target"]) for r in audit] == [(ADMIN, str(row_id))], audit
        deadline = time.monotonic() + 20
        while len(app.query("SELECT id FROM outbox_attempts WHERE outbox_id = ?", (row_id,))) <= attempts_before:
            if time.monotonic() > deadline:
                fail(f"outbox row {row_id} was not tried again after the retry")
            time.sleep(0.1)

        wait("the suspend button for pacs", lambda: page.locator("button[data-action='suspend-pacs']").wait_for())
        with page.expect_navigation():
            page.click("button[data-action='suspend-pacs']")
        assert "Sending to pacs is suspended" in page.inner_text("main .flash"), page.inner_text("main")
        assert [r["destination"] for r in app.query("SELECT destination FROM destination_holds")] == ["pacs"]
        wait("the resume button for pacs", lambda: page.locator("button[data-action='resume-pacs']").wait_for())
        shoot("en", "queue")  # pacs suspended, archive's dead letters
        with page.expect_navigation():
            page.click("button[data-action='resume-pacs']")
        assert "Sending to pacs resumed" in page.inner_text("main .flash"), page.inner_text("main")
        assert app.query("SELECT destination FROM destination_holds") == []
        assert page.locator("button[data-action='suspend-pacs']").count() == 1
        actions = [r["action"] for r in app.query("SELECT action FROM audit WHERE target = 'pacs' ORDER BY id")]
        assert actions == ["suspend", "resume"], actions

        # -- 7 and 8. every page in every language, through the picker --
        pages = {"dashboard": "/", "series-list": "/series", "series-detail": f"/series/{uid}", "queue": "/queue",
                 "models": "/models", "audit": "/audit", "users": "/users"}
        for lang in LANGS:
            goto("/")
            if page.get_attribute("html", "lang") != lang:
                pick_language(lang)
            for name, path in pages.items():
                if (lang, name) in (("en", "series-detail"), ("en", "queue")):
                    continue  # taken above, in the states worth seeing
                goto(path)
                got = page.get_attribute("html", "lang")
                if got != lang:
                    fail(f"{path} has <html lang={got!r}> after picking {lang}")
                # The page's own words (the picker names every language in its own script: left out).
                words = page.evaluate(
                    "() => [...document.querySelectorAll('nav, main')].map(e => e.innerText).join(' ')")
                if lang == "vi" and name == "dashboard" and not VIETNAMESE.search(words):
                    fail(f"no Vietnamese on the dashboard after picking vi: {words[:300]!r}")
                if lang == "ko" and name == "dashboard" and not HANGUL.search(words):
                    fail(f"no Korean on the dashboard after picking ko: {words[:300]!r}")
                if lang == "en" and name == "dashboard" and (VIETNAMESE.search(words) or HANGUL.search(words)):
                    fail(f"Vietnamese or Korean on the English dashboard: {words[:300]!r}")
                shoot(lang, name)
            no_dialogs()
        pick_language("en")
        assert page.get_attribute("html", "lang") == "en"

        assert not page_errors, f"script errors in the pages: {page_errors}"
        # Only the wrong password above may fail (and the browser's own favicon request): no broken image, no
        # refresh that errs.
        unexpected = [(status, url) for status, url in failed_responses
                      if (status, url) != (401, f"{base}/login") and not url.endswith("/favicon.ico")]
        assert not unexpected, f"requests the pages made failed: {unexpected}"
        csp = [m for m in console_errors if "Content Security Policy" in m]
        assert not csp, f"the pages break their own Content-Security-Policy: {csp}"
        no_dialogs()
        context.close()
        browser.close()

    missing = [f"{lang}-{name}.png" for lang in LANGS for name in PAGES
               if not (artifacts / f"{lang}-{name}.png").is_file()
               or (artifacts / f"{lang}-{name}.png").stat().st_size < 8_000]
    assert not missing, f"screenshots missing or nearly empty in {artifacts}: {missing}"
    print(f"\npanel browser test: {time.monotonic() - started:.1f} s; screenshots in {artifacts}")
