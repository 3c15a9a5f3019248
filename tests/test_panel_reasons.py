"""Failure reasons in the reader's language (``appliance.panel.reasons``).

The reasons are made by the sender's own code where it has a function for them (``association_failure``) and
copied from its f-strings elsewhere; each must come out in Vietnamese and Korean with its variable parts (AE
title and address, status, exception text) as written, escaped by the template, and an unknown reason as
written, never dropped.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from flask import Flask, render_template_string
from flask_babel import force_locale

from appliance.config import Destination
from appliance.export.sender import association_failure
from appliance.panel import i18n
from appliance.panel.reasons import translate_reason

DEST = Destination(name="pacs", ae_title="ARCHIVE", host="10.0.0.5", port=104)
WHERE = "ARCHIVE@10.0.0.5:104"


def _reasons() -> list[str]:
    rejected = SimpleNamespace(
        is_rejected=True,
        acceptor=SimpleNamespace(primitive=SimpleNamespace(
            result=1, result_source=1, diagnostic=7, result_str="Rejected Permanent",
            source_str="Service User", reason_str="Called AE title not recognised")),
    )
    unreachable = SimpleNamespace(acceptor=SimpleNamespace(primitive=None))
    no_context = SimpleNamespace(is_aborted=True, accepted_contexts=[],
                                 acceptor=SimpleNamespace(primitive=object()))
    aborted = SimpleNamespace(is_aborted=False, acceptor=SimpleNamespace(primitive=object()))
    made = [association_failure(a, DEST)[0] for a in (rejected, unreachable, no_context, aborted)]
    return made + [
        f"cannot associate with {WHERE}: OSError: [Errno 113] No route to host",
        "cannot send to ARCHIVE: ValueError: no accepted presentation context",
        f"association with {WHERE} ended by an earlier failure (ConnectionResetError)",
        f"no C-STORE response from {WHERE} (association aborted or timed out)",
        "ARCHIVE refused the object: 0xA700 Refused: Out of Resources",
        "destination 'old' is not configured any more ([[destinations]])",
        "result file /var/results/x/seg.dcm cannot be read: FileNotFoundError: gone",
        f"3 delivery(ies) failed; pacs: {made[1]} (appliance outbox retry)",
        "2 delivery(ies) to send (one per result object and destination)",
        "all models ran; 3 delivery(ies) acknowledged (result objects x destinations)",
        "the worker stopped during this job 3 times (crash, kill or out of memory); giving up",
        "worker stopped during attempt 1; retrying",
        "internal error: KeyError: 'x'",
    ]


@pytest.fixture()
def app(tmp_path: Path) -> Flask:
    app = Flask(__name__)
    i18n.init_app(app, "en", tmp_path)
    return app


@pytest.mark.parametrize("lang", ["vi", "ko"])
def test_every_reason_the_stages_write_is_translated_with_its_parts_as_written(app: Flask, lang: str) -> None:
    with app.test_request_context(), force_locale(lang):
        for reason in _reasons():
            out = translate_reason(reason)
            assert out != reason, f"{lang}: not translated: {reason}"
            for part in ("ARCHIVE", "0xA700", "Errno 113", "ConnectionResetError", "'old'", "KeyError"):
                if part in reason:
                    assert part in out, f"{lang}: {part!r} lost from {reason!r}: {out!r}"
        nested = translate_reason(_reasons()[11])
        assert "connection refused" not in nested  # the quoted dead letter's reason is translated too


def test_english_keeps_the_text_and_an_unknown_reason_is_shown_as_written(app: Flask) -> None:
    with app.test_request_context(), force_locale("en"):
        assert translate_reason(f"cannot connect to {WHERE} (connection refused, host unreachable or timed out)") == (
            f"cannot connect to {WHERE} (connection refused, host unreachable or timed out)")
    with app.test_request_context(), force_locale("vi"):
        assert translate_reason("the PACS caught fire") == "the PACS caught fire"
        assert translate_reason(None) == "" and translate_reason("") == ""


def test_a_hostile_part_is_escaped_by_the_template_not_interpreted(app: Flask) -> None:
    hostile = "<img/src=x/onerror=alert(1)> refused the object: 0xA700 Refused: <b>Out</b> %(n)s"
    with app.test_request_context(), force_locale("vi"):
        html = render_template_string("<p>{{ r|reason }}</p>", r=hostile)
    assert "<img" not in html and "&lt;img/src=x/onerror=alert(1)&gt;" in html and "&lt;b&gt;" in html
    assert "từ chối đối tượng" in html and "%(n)s" in html  # a placeholder inside a part is not expanded
