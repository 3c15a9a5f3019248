"""The state machines: one table in code, the README's tables agree with it, and nothing else writes a state."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from appliance.store import InstanceRecord, Store
from appliance.store.states import (JOBS, MACHINES, OUTBOX, SERIES, InvalidTransition, JobState, OutboxState,
                                    SeriesState, move)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "appliance"
README_TITLES = {"series": "Series (", "jobs": "Jobs (", "outbox": "Outbox rows ("}


def _readme_pairs(table: str) -> set[tuple[str | None, str]]:
    text = (ROOT / "README.md").read_text()
    start = text.index(README_TITLES[table])
    rows = []
    for line in text[start:].splitlines()[1:]:
        if not line.strip() and rows:
            break
        if line.startswith("| ") and not line.startswith("| from"):
            rows.append(line)
    pairs: set[tuple[str | None, str]] = set()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        target = cells[1].strip("`")
        for src in cells[0].split(","):
            src = src.strip()
            pairs.add((None if src == "(new)" else src.strip("`"), target))
    return pairs


@pytest.mark.parametrize("table", sorted(MACHINES))
def test_readme_state_tables_are_the_code_s(table: str) -> None:
    code = {(None if s is None else str(s), str(t)) for s, t in MACHINES[table].pairs()}
    readme = _readme_pairs(table)
    assert readme, f"no {table} transition table found in the README"
    assert readme == code, (f"README only: {sorted(readme - code, key=str)}; "
                            f"code only: {sorted(code - readme, key=str)}")


@pytest.mark.parametrize("table", sorted(MACHINES))
def test_every_state_is_reachable_from_a_new_row(table: str) -> None:
    machine = MACHINES[table]
    seen: set[object] = {None}
    frontier: list[object] = [None]
    while frontier:
        src = frontier.pop()
        for s, t in machine.pairs():
            if s == src and t not in seen:
                seen.add(t)
                frontier.append(t)
    assert set(machine.states) <= seen, f"unreachable: {set(machine.states) - seen}"


def _python_sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_only_the_store_runs_sql_against_the_index() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in _python_sources()
                 if "store" not in p.relative_to(PACKAGE).parts[:1]
                 and re.search(r"\.execute(many)?\(|\.conn\b", p.read_text())]
    assert offenders == [], f"SQL outside appliance/store: {offenders}"


_STATE_WORDS = "|".join(sorted({str(s) for m in MACHINES.values() for s in m.states}))


def test_no_module_writes_a_state_column_but_the_state_module() -> None:
    pattern = re.compile(r"SET\s+state\s*=|\bstate\s*(=|<>|IN)\s*\(?'(" + _STATE_WORDS + ")'", re.IGNORECASE)
    offenders = []
    for path in _python_sources():
        if path.name == "states.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == [], "state written or spelt outside store/states.py:\n" + "\n".join(offenders)


def _series(store: Store, uid: str = "1.2.3") -> str:
    store.index.add_instance(InstanceRecord(f"{uid}.1", "1.2.840.10008.5.1.4.1.1.2", "1.2", uid, "1.2.840.10008.1.2.1",
                                            "p", 10), None)
    return uid


def _state(store: Store, uid: str) -> str:
    return store.index.conn.execute("SELECT state FROM series WHERE series_uid = ?", (uid,)).fetchone()[0]


def test_a_move_the_table_does_not_allow_changes_nothing(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    uid = _series(store)
    with store.index.transaction() as c:
        assert move(c, SERIES, SeriesState.DONE, where={"series_uid": uid}, reason="skip ahead") == 0
    assert _state(store, uid) == "receiving"
    with store.index.transaction() as c:
        assert move(c, SERIES, SeriesState.COMPLETE, where={"series_uid": uid}, reason="quiet") == 1
    assert _state(store, uid) == "complete"
    events = [(e["from_state"], e["to_state"]) for e in store.index.series_events(uid)]
    assert events == [(None, "receiving"), ("receiving", "complete")], "each move leaves its audit row"


def test_asking_for_a_state_of_another_table_or_an_impossible_start_is_refused(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    uid = _series(store)
    with store.index.transaction() as c:
        with pytest.raises(InvalidTransition):
            move(c, SERIES, JobState.DONE, where={"series_uid": uid})  # type: ignore[arg-type]  # the point of the test
        with pytest.raises(InvalidTransition):
            move(c, OUTBOX, OutboxState.PENDING, where={"id": 1}, only_from=[OutboxState.SENT])
    with pytest.raises(InvalidTransition):
        JOBS.initial(JobState.DONE)
    assert SERIES.initial(SeriesState.RECEIVING) == "receiving"


def test_states_are_their_strings_in_sql_and_in_python(tmp_path: Path) -> None:
    conn = sqlite3.connect(":memory:")
    assert conn.execute("SELECT ?", (SeriesState.EXPORT_FAILED,)).fetchone()[0] == "export_failed"
    assert str(OutboxState.DEAD) == "dead" and f"{JobState.QUEUED}" == "queued"
    assert SeriesState("purged") is SeriesState.PURGED
