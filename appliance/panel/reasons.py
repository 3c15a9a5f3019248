"""Why a delivery or a job failed, in the reader's language.

The stages write their reasons in English (the log, ``appliance outbox list`` and the vendor's support read
the same text), and the store keeps them as written. The panel is read by a technician in Hanoi or Seoul at
the moment something went wrong, so the sentences the sender and the job queue write are recognised here
and rendered from the catalogue; what varies inside them (the PACS's AE title and address, a status code
and its standard meaning, an exception's own text) is shown as written. A reason no pattern knows is shown
as written too: never guessed at, never dropped. Each pattern mirrors one f-string of
``appliance/export/sender.py`` or ``appliance/store/jobs.py``; ``tests/test_panel_reasons.py`` makes the
reasons with the sender's own function where it has one and copies the rest, and checks each is recognised.
"""

from __future__ import annotations

import re
from typing import Any

from flask_babel import lazy_gettext

_WHERE = r"(?P<where>\S+)"
#: (pattern of the English reason, the sentence to show instead, its named parts filled in).
_PATTERNS: list[tuple[re.Pattern[str], Any]] = [
    (
        re.compile(rf"^cannot connect to {_WHERE} \(connection refused, host unreachable or timed out\)$"),
        lazy_gettext("cannot connect to %(where)s (connection refused, host unreachable or timed out)"),
    ),
    (
        re.compile(
            rf"^association rejected by {_WHERE}: (?P<detail>.*) \(check the AE titles configured on both sides\)$"
        ),
        lazy_gettext("association rejected by %(where)s: %(detail)s (check the AE titles configured on both sides)"),
    ),
    (
        re.compile(rf"^{_WHERE} accepted none of the proposed presentation contexts$"),
        lazy_gettext("%(where)s accepted none of the proposed presentation contexts"),
    ),
    (
        re.compile(rf"^association with {_WHERE} aborted during negotiation$"),
        lazy_gettext("association with %(where)s aborted during negotiation"),
    ),
    (
        re.compile(rf"^cannot associate with {_WHERE}: (?P<detail>.*)$"),
        lazy_gettext("cannot associate with %(where)s: %(detail)s"),
    ),
    (
        re.compile(rf"^association with {_WHERE} ended by an earlier failure \((?P<detail>[^)]*)\)$"),
        lazy_gettext("association with %(where)s ended by an earlier failure (%(detail)s)"),
    ),
    (
        re.compile(rf"^no C-STORE response from {_WHERE} \(association aborted or timed out\)$"),
        lazy_gettext("no C-STORE response from %(where)s (association aborted or timed out)"),
    ),
    (
        re.compile(rf"^cannot send to {_WHERE}: (?P<detail>.*)$"),
        lazy_gettext("cannot send to %(where)s: %(detail)s"),
    ),
    (
        re.compile(rf"^{_WHERE} refused the object: (?P<detail>.*)$"),
        lazy_gettext("%(where)s refused the object: %(detail)s"),
    ),
    (
        re.compile(r"^destination (?P<where>'[^']*') is not configured any more \(\[\[destinations\]\]\)$"),
        lazy_gettext("destination %(where)s is not configured any more ([[destinations]])"),
    ),
    (
        re.compile(rf"^result file {_WHERE} cannot be read: (?P<detail>.*)$"),
        lazy_gettext("result file %(where)s cannot be read: %(detail)s"),
    ),
    (
        re.compile(r"^(?P<n>\d+) delivery\(ies\) failed; (?P<where>[^:]+): (?P<inner>.*) \(appliance outbox retry\)$"),
        lazy_gettext("%(n)s deliveries failed; %(where)s: %(inner)s (retry them from the queue page)"),
    ),
    (
        re.compile(r"^(?P<n>\d+) delivery\(ies\) to send \(one per result object and destination\)$"),
        lazy_gettext("%(n)s deliveries to send (one per result object and destination)"),
    ),
    (
        re.compile(r"^all models ran; (?P<n>\d+) delivery\(ies\) acknowledged \(result objects x destinations\)$"),
        lazy_gettext("all models ran; %(n)s deliveries acknowledged (result objects x destinations)"),
    ),
    (
        re.compile(
            r"^the worker stopped during this job (?P<n>\d+) times \(crash, kill or out of memory\); giving up$"
        ),
        lazy_gettext(
            "the analysis process stopped during this job %(n)s times (crash, kill or out of memory); giving up"
        ),
    ),
    (
        re.compile(r"^worker stopped during attempt (?P<n>\d+); retrying$"),
        lazy_gettext("the analysis process stopped during attempt %(n)s; retrying"),
    ),
    (
        re.compile(r"^internal error: (?P<detail>.*)$"),
        lazy_gettext("internal error: %(detail)s"),
    ),
]


def translate_reason(text: str | None) -> str:
    """``text`` in the reader's language where it is one of the stages' known sentences, else as written.
    The result is plain text (the template escapes it); parts taken from ``text`` are never interpreted."""
    if not text:
        return ""
    for pattern, sentence in _PATTERNS:
        m = pattern.match(text)
        if m is None:
            continue
        parts = m.groupdict()
        if "inner" in parts:  # a series' reason quotes its last dead letter's reason: that one too
            parts["inner"] = translate_reason(parts["inner"])
        return str(sentence) % parts  # the catalogue's sentence for this reader, its parts as written
    return text
