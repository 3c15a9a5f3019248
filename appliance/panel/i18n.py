"""Languages: English, Vietnamese and Korean, with dates, times and numbers in the reader's conventions.

The catalogues are ``translations/<lang>/LC_MESSAGES/messages.po``; ``scripts/dev setup`` compiles them
(``pybabel compile``). A box installed some other way compiles any missing or stale ``.mo`` at start-up,
into the package when it may write there, else under the data directory, so the panel never falls back to
English silently. The language is the user's own setting, else the browser's ``Accept-Language``, else
``[panel] default_language``; a ``lang`` chosen on the login page holds for that browser's session.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flask import Flask, g, request, session
from flask_babel import Babel, format_datetime, format_decimal, format_number, get_locale, gettext, lazy_gettext

from appliance.panel.reasons import translate_reason

__all__ = [
    "LANGUAGES",
    "format_datetime",
    "format_decimal",
    "format_number",
    "gettext",
    "init_app",
    "lazy_gettext",
]

log = logging.getLogger("appliance.panel")

TRANSLATIONS = Path(__file__).parent / "translations"
#: Language code -> its own name, as the language picker shows it.
LANGUAGES = {"en": "English", "vi": "Tiếng Việt", "ko": "한국어"}


def compile_catalogues(source: Path = TRANSLATIONS, target: Path | None = None) -> list[Path]:
    """Compile every ``.po`` under ``source`` whose ``.mo`` (under ``target``, default alongside) is missing
    or older; returns the ``.mo`` files written."""
    from babel.messages.mofile import write_mo
    from babel.messages.pofile import read_po

    written = []
    for po in sorted(source.glob("*/LC_MESSAGES/messages.po")):
        rel = po.relative_to(source).with_suffix(".mo")
        mo = (target or source) / rel
        if mo.exists() and mo.stat().st_mtime >= po.stat().st_mtime:
            continue
        with po.open("rb") as f:
            catalog = read_po(f, locale=rel.parts[0])
        mo.parent.mkdir(parents=True, exist_ok=True)
        tmp = mo.with_suffix(".mo.tmp")
        with tmp.open("wb") as f:
            write_mo(f, catalog, use_fuzzy=False)
        os.replace(tmp, mo)
        written.append(mo)
    return written


def _translation_dir(data_dir: Path) -> Path:
    if os.access(TRANSLATIONS, os.W_OK):
        compile_catalogues()
        return TRANSLATIONS
    target = data_dir / "cache" / "translations"
    compile_catalogues(TRANSLATIONS, target)
    return target


def _local_timezone() -> str:
    """The box's IANA zone name (the clinic's clock), for dates shown in the panel; UTC when unknown."""
    tz = os.environ.get("TZ", "").lstrip(":")
    if tz and "/" in tz and not tz.startswith("/"):
        return tz
    try:
        link = os.readlink("/etc/localtime")
        if "zoneinfo/" in link:
            return link.split("zoneinfo/", 1)[1]
    except OSError:
        pass
    try:
        name = Path("/etc/timezone").read_text().strip()
        if name:
            return name
    except OSError:
        pass
    return "UTC"


def select_locale() -> str:
    user = getattr(g, "user", None)
    if user is not None and user.language in LANGUAGES:
        return str(user.language)
    chosen = session.get("lang")
    if chosen in LANGUAGES:
        return str(chosen)
    best = request.accept_languages.best_match(list(LANGUAGES))
    return best or g.get("default_language", "en")


def init_app(app: Flask, default_language: str, data_dir: Path) -> None:
    try:
        directory = _translation_dir(data_dir)
    except OSError as exc:
        log.error("panel: cannot compile the translations (%s): pages will be in English", exc)
        directory = TRANSLATIONS
    app.config["BABEL_TRANSLATION_DIRECTORIES"] = str(directory)
    app.config["BABEL_DEFAULT_LOCALE"] = default_language
    app.config["BABEL_DEFAULT_TIMEZONE"] = _local_timezone()
    Babel(app, locale_selector=select_locale)

    @app.before_request
    def _default() -> None:
        g.default_language = default_language

    app.jinja_env.filters.update(
        when=when,
        number=number,
        decimal=decimal,
        duration=duration,
        nbytes=nbytes,
        state=state_label,
    )
    app.jinja_env.filters["dicom_date"] = dicom_date
    app.jinja_env.filters["pn"] = person_name
    app.jinja_env.filters["reason"] = translate_reason
    app.jinja_env.globals.update(
        languages=LANGUAGES,
        current_language=lambda: str(get_locale() or "en"),
        role_label=lambda v: _label(ROLE_LABELS, v),
        check_label=lambda v: _label(CHECK_LABELS, v),
        step_label=lambda v: _label(STEP_LABELS, v),
        window_label=lambda v: _label(WINDOW_LABELS, v),
        structure_label=lambda v: _label(STRUCTURE_LABELS, v),
        attenuation_label=lambda v: _label(ATTENUATION_LABELS, v),
        octant_label=octant_label,
        action_label=lambda v: _label(ACTION_LABELS, v),
        detail_label=lambda v: _label(DETAIL_LABELS, v),
        detail_codes=DETAIL_LABELS,
        problem_steps=PROBLEM_STEPS,
    )


def when(epoch: float | None, fmt: str = "short") -> str:
    if epoch is None:
        return "–"
    return format_datetime(datetime.fromtimestamp(float(epoch), tz=timezone.utc), fmt)


def number(n: float | int | None) -> str:
    return "–" if n is None else format_number(n)


def decimal(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "–"
    return format_decimal(round(float(x), digits), format="#,##0." + "0" * digits if digits else "#,##0")


def duration(seconds: float | None) -> str:
    """A step's length the way a technician reads it: 850 ms, 12.4 s, 3 min 5 s, 2 h 10 min."""
    if seconds is None:
        return "–"
    s = max(0.0, float(seconds))
    if s < 1:
        return gettext("%(n)s ms", n=format_number(int(round(s * 1000))))
    if s < 60:
        return gettext("%(n)s s", n=format_decimal(round(s, 1), format="#,##0.0"))
    if s < 3600:
        return gettext("%(m)s min %(s)s s", m=int(s // 60), s=int(s % 60))
    return gettext("%(h)s h %(m)s min", h=int(s // 3600), m=int(s % 3600 // 60))


def nbytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{format_decimal(round(n / size, 1), format='#,##0.0')} {unit}"
    return f"{format_number(n)} B"


#: Every state a page shows, translated: series, job and outbox states share names where they mean the same.
STATE_LABELS: dict[str, Any] = {
    "receiving": lazy_gettext("Receiving"),
    "complete": lazy_gettext("Complete"),
    "queued": lazy_gettext("Queued"),
    "no_model": lazy_gettext("No model applies"),
    "processing": lazy_gettext("Processing"),
    "exporting": lazy_gettext("Sending to PACS"),
    "done": lazy_gettext("Done"),
    "export_failed": lazy_gettext("Sending failed"),
    "failed": lazy_gettext("Analysis failed"),
    "purging": lazy_gettext("Being deleted"),
    "purged": lazy_gettext("Deleted"),
    "pending": lazy_gettext("Waiting to send"),
    "sent": lazy_gettext("Delivered"),
    "dead": lazy_gettext("Dead letter"),
    "superseded": lazy_gettext("Superseded"),
}


def state_label(state: str | None) -> str:
    if state is None:
        return "–"
    label = STATE_LABELS.get(str(state))
    return str(label) if label is not None else str(state)


def _label(table: dict[str, Any], value: str | None) -> str:
    if value is None:
        return "–"
    label = table.get(str(value), table.get(str(value).lower()))
    return str(label) if label is not None else str(value)


def person_name(value: str | None) -> str | None:
    """A PN value as people read it: ``Nguyễn^Văn An`` as "Nguyễn Văn An" (family name first, as in Vietnamese
    and Korean), ``DOE^JOHN`` as "DOE, JOHN" in English; the alphabetic, ideographic and phonetic groups of
    a Korean name (``Hong^Gildong=洪^吉洞=홍^길동``) joined by " / ". Anything else unchanged."""
    if not value or "^" not in value:  # a one-component name, or not a name at all: as received
        return value
    english = str(get_locale() or "en") == "en"
    shown = []
    for group in value.split("="):
        parts = [p.strip() for p in group.split("^")]
        family, given = parts[0], " ".join(p for p in parts[1:3] if p)
        if not family and not given:
            continue
        if english and family and given:
            shown.append(f"{family}, {given}")
        else:
            shown.append(" ".join(p for p in (family, given) if p))
    return " / ".join(shown) if shown else value


def dicom_date(value: str | None) -> str | None:
    """A DA value (``YYYYMMDD``) in the reader's date format; anything else as it came."""
    if not value or len(value) != 8 or not value.isdigit():
        return value
    from flask_babel import format_date

    try:
        return str(format_date(datetime(int(value[:4]), int(value[4:6]), int(value[6:])).date(), "medium"))
    except ValueError:
        return value


ROLE_LABELS: dict[str, Any] = {
    "admin": lazy_gettext("administrator"),
    "technician": lazy_gettext("technician"),
    "viewer": lazy_gettext("viewer"),
}
CHECK_LABELS: dict[str, Any] = {
    "store": lazy_gettext("Data store"),
    "listeners": lazy_gettext("DICOM receivers"),
    "worker": lazy_gettext("Analysis worker"),
    "models": lazy_gettext("Models"),
    "disk": lazy_gettext("Disk"),
}
WINDOW_LABELS: dict[str, Any] = {
    "liver": lazy_gettext("Liver"),
    "abdomen": lazy_gettext("Soft tissue"),
    "bone": lazy_gettext("Bone"),
    "lung": lazy_gettext("Lung"),
}
STRUCTURE_LABELS: dict[str, Any] = {
    "liver": lazy_gettext("Liver"),
    "lesion": lazy_gettext("Lesion"),
    "liver lesion": lazy_gettext("Lesion"),
}
#: A finding's attenuation against the liver around it, as CT reports say it.
ATTENUATION_LABELS: dict[str, Any] = {
    "hypo": lazy_gettext("hypo-attenuating"),
    "iso": lazy_gettext("iso-attenuating"),
    "hyper": lazy_gettext("hyper-attenuating"),
}
#: The words of a finding's octant ("superior anterior right"), each translated on its own.
POSITION_LABELS: dict[str, Any] = {
    "superior": lazy_gettext("superior"),
    "inferior": lazy_gettext("inferior"),
    "anterior": lazy_gettext("anterior"),
    "posterior": lazy_gettext("posterior"),
    "right": lazy_gettext("right"),
    "left": lazy_gettext("left"),
}


def octant_label(value: str | None) -> str:
    """ "superior anterior right" as the reader's language writes it, word by word ("–" when unknown)."""
    if not value:
        return "–"
    return ", ".join(_label(POSITION_LABELS, w) for w in str(value).split())


ACTION_LABELS: dict[str, Any] = {
    "login": lazy_gettext("Logged in"),
    "login_failed": lazy_gettext("Failed login"),
    "logout": lazy_gettext("Logged out"),
    "lockout": lazy_gettext("Locked out"),
    "unlock": lazy_gettext("Lockout lifted"),
    "view_series": lazy_gettext("Viewed a series"),
    "retry": lazy_gettext("Retried sending"),
    "suspend": lazy_gettext("Suspended sending"),
    "resume": lazy_gettext("Resumed sending"),
    "user_add": lazy_gettext("Added a user"),
    "user_change": lazy_gettext("Changed a user"),
    "user_remove": lazy_gettext("Removed a user"),
    "export_audit": lazy_gettext("Exported the audit log"),
}
#: Timeline steps (see ``queries.timeline``): series_<state>, job_<state>, and the outbox's own.
STEP_LABELS: dict[str, Any] = {
    "received_first": lazy_gettext("First image received"),
    "received_last": lazy_gettext("Last image received"),
    "series_receiving": lazy_gettext("Receiving again"),
    "series_complete": lazy_gettext("Series complete"),
    "series_queued": lazy_gettext("Queued for analysis"),
    "series_no_model": lazy_gettext("No model applies"),
    "series_processing": lazy_gettext("Analysis started"),
    "series_exporting": lazy_gettext("Sending results"),
    "series_done": lazy_gettext("Done"),
    "series_export_failed": lazy_gettext("Sending failed"),
    "series_failed": lazy_gettext("Analysis failed"),
    "series_purging": lazy_gettext("Being deleted"),
    "series_purged": lazy_gettext("Deleted"),
    "job_queued": lazy_gettext("Analysis queued again"),
    "job_processing": lazy_gettext("Model running"),
    "job_done": lazy_gettext("Model finished"),
    "job_failed": lazy_gettext("Model failed"),
    "result": lazy_gettext("Result object made"),
    "sent": lazy_gettext("Acknowledged by the destination"),
    "send_failed": lazy_gettext("Sending attempt failed"),
    "outbox_dead": lazy_gettext("Gave up sending (dead letter)"),
    "outbox_superseded": lazy_gettext("Replaced by a newer result"),
    "outbox_retry": lazy_gettext("Retry requested"),
}
#: Audit details that are codes, not free text (``Users.authenticate``'s reasons; where an action came from).
DETAIL_LABELS: dict[str, Any] = {
    "wrong": lazy_gettext("wrong user name or password"),
    "disabled": lazy_gettext("account disabled"),
    "locked_account": lazy_gettext("account locked"),
    "locked_address": lazy_gettext("address locked"),
    "api": lazy_gettext("through the API"),
}
#: Timeline steps whose stage reason explains a problem and is shown (as the stage wrote it, for service
#: engineers); on the others the step's own label and time say everything.
PROBLEM_STEPS = frozenset(
    {
        "series_receiving",
        "series_failed",
        "series_export_failed",
        "job_failed",
        "send_failed",
        "outbox_dead",
        "outbox_superseded",
    }
)
