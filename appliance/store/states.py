"""Every state a series, a job or an outbox row can be in, the moves allowed between them, and the one
place that writes a state column.

The tables below are the contract the README's state diagrams describe (a test compares the two), and the
metrics and panel stages enumerate states from these enums rather than from string literals. Each stage
asks for a move with :func:`move`; the UPDATE it runs only matches rows whose current state may make that
move, so a stage that asks for a move the table does not allow (a misspelt state, a series re-opened by a
late instance meanwhile) changes nothing and learns so from the return value. The audit rows
(``series_events``, ``job_events``, ``outbox_events``) are written by triggers on the state column, in the same transaction.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # JetPack 6 ships Python 3.10

    class StrEnum(str, Enum):
        """``enum.StrEnum`` of Python 3.11: members are their values, as strings and in SQL."""

        def __str__(self) -> str:
            return str(self.value)


class SeriesState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    QUEUED = "queued"
    NO_MODEL = "no_model"
    PROCESSING = "processing"
    EXPORTING = "exporting"
    DONE = "done"
    EXPORT_FAILED = "export_failed"
    FAILED = "failed"
    PURGING = "purging"
    PURGED = "purged"


class JobState(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class OutboxState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"
    SUPERSEDED = "superseded"


S = TypeVar("S", bound=StrEnum)


@dataclass(frozen=True)
class Rule(Generic[S]):
    """Rows in any of ``sources`` (None: the row is new) may move to ``target``; ``by`` says who does it."""

    sources: frozenset[S | None]
    target: S
    by: str


@dataclass(frozen=True)
class Machine(Generic[S]):
    """One table's states and its allowed moves."""

    table: str
    states: type[S]
    rules: tuple[Rule[S], ...]

    def pairs(self) -> set[tuple[S | None, S]]:
        """Every allowed (from, to); None as ``from`` is a new row."""
        return {(src, r.target) for r in self.rules for src in r.sources}

    def sources(self, target: S) -> frozenset[S]:
        """The existing states a row may leave for ``target``."""
        return frozenset(src for src, dst in self.pairs() if dst == target and src is not None)

    def allowed(self, source: S | None, target: S) -> bool:
        return (source, target) in self.pairs()

    def initial(self, target: S) -> S:
        """``target`` if a new row may start in it; else :class:`InvalidTransition`."""
        if not self.allowed(None, target):
            raise InvalidTransition(f"a new {self.table} row cannot start as {target!r}")
        return target


class InvalidTransition(ValueError):
    """A stage asked for a move no rule allows: a programming error, never the peer's."""


def _rule(sources: Iterable[S | None], target: S, by: str) -> Rule[S]:
    """A rule; staying in ``target`` is not a move (see ``refresh`` in :func:`move`)."""
    return Rule(frozenset(sources) - {target}, target, by)


_Se = SeriesState
#: States a series settles between as its jobs run and their results are delivered.
SETTLED: frozenset[SeriesState] = frozenset({_Se.QUEUED, _Se.PROCESSING, _Se.EXPORTING, _Se.EXPORT_FAILED, _Se.DONE})
#: Series whose work is over: retention may purge them.
PURGEABLE: frozenset[SeriesState] = frozenset({_Se.DONE, _Se.NO_MODEL})

SERIES: Machine[SeriesState] = Machine(
    "series",
    SeriesState,
    (
        _rule([None], _Se.RECEIVING, "ingest: first instance"),
        _rule([s for s in SeriesState if s != _Se.RECEIVING], _Se.RECEIVING, "ingest: a late or replaced instance"),
        _rule([_Se.RECEIVING], _Se.COMPLETE, "assembler: quiet, or every sender released"),
        _rule([_Se.COMPLETE], _Se.QUEUED, "router: a rule matched"),
        _rule([_Se.COMPLETE], _Se.NO_MODEL, "router: no rule matched"),
        _rule([_Se.COMPLETE], _Se.FAILED, "router: the header cannot be read"),
        _rule([_Se.QUEUED], _Se.PROCESSING, "worker: a job started"),
        _rule(SETTLED, _Se.QUEUED, "jobs: another job waits"),
        _rule(SETTLED, _Se.EXPORTING, "jobs and outbox: results wait for their destinations"),
        _rule(SETTLED, _Se.EXPORT_FAILED, "outbox: a result is a dead letter"),
        _rule(SETTLED, _Se.DONE, "jobs and outbox: every job ran, every result delivered"),
        _rule(SETTLED, _Se.FAILED, "jobs: a job failed"),
        _rule(PURGEABLE, _Se.PURGING, "retention: the retention period is over"),
        _rule([_Se.PURGING], _Se.PURGED, "retention: files deleted"),
    ),
)

_J = JobState
JOBS: Machine[JobState] = Machine(
    "jobs",
    JobState,
    (
        _rule([None], _J.QUEUED, "router"),
        _rule(
            [_J.QUEUED, _J.DONE, _J.FAILED, _J.PROCESSING],
            _J.QUEUED,
            "router: the series changed, processing again (new generation)",
        ),
        _rule([_J.QUEUED], _J.PROCESSING, "worker: claimed"),
        _rule([_J.PROCESSING], _J.DONE, "worker: results made"),
        _rule([_J.PROCESSING], _J.FAILED, "worker: failed, or the worker died on it max_attempts times"),
        _rule([_J.PROCESSING], _J.QUEUED, "worker stopped or died during the job: retry"),
    ),
)

_O = OutboxState
OUTBOX: Machine[OutboxState] = Machine(
    "outbox",
    OutboxState,
    (
        _rule([None], _O.PENDING, "worker: job done"),
        _rule([_O.PENDING], _O.SENT, "sender: the destination answered Success"),
        _rule([_O.PENDING], _O.DEAD, "sender: max_attempts failed, or a permanent refusal"),
        _rule([_O.DEAD], _O.PENDING, "operator: appliance outbox retry"),
        _rule([_O.PENDING, _O.DEAD], _O.SUPERSEDED, "router: the series changed, newer results replace these"),
    ),
)

MACHINES: dict[str, Machine] = {m.table: m for m in (SERIES, JOBS, OUTBOX)}

#: Column that says why a row is in its state, per table.
_REASON_COLUMN = {"series": "state_reason", "jobs": "reason", "outbox": "last_error"}


@dataclass(frozen=True)
class Sql:
    """An SQL expression for a column set with a move (``attempts + 1``); only ever a constant in code."""

    text: str


def move(
    c: sqlite3.Connection,
    machine: Machine[S],
    target: S,
    *,
    where: Mapping[str, object],
    reason: str | None = None,
    only_from: Iterable[S] | None = None,
    changed_at: float | None = None,
    also: Mapping[str, object] | None = None,
    refresh: bool = False,
) -> int:
    """Move the rows of ``machine.table`` matching ``where`` to ``target``; returns how many moved.

    Only rows whose current state may make the move (narrowed to ``only_from`` if given) are touched.
    ``also`` sets more columns in the same statement (a :class:`Sql` value is an expression). ``refresh``
    also lets a row already in ``target`` be written (a series that stays ``exporting`` with fewer
    objects left takes the new reason; a queued job re-routed takes a new generation); without it such a
    row is left alone. Staying is not a move: no audit row is written for it.
    """
    if not isinstance(target, machine.states):
        raise InvalidTransition(f"{target!r} is not a {machine.table} state")
    sources = set(machine.sources(target))
    if only_from is not None:
        sources &= set(only_from)
    if refresh:
        sources.add(target)
    if not sources:
        raise InvalidTransition(
            f"no {machine.table} state may move to {target!r}"
            + (f" from {sorted(only_from)}" if only_from is not None else "")
        )
    sets: list[str] = ["state = ?"]
    args: list[object] = [str(target)]
    if reason is not None:
        sets.append(f"{_REASON_COLUMN[machine.table]} = ?")
        args.append(reason)
    if changed_at is not None and machine.table == "series":
        sets.append("state_changed = ?")
        args.append(changed_at)
    for col, value in (also or {}).items():
        if isinstance(value, Sql):
            sets.append(f"{col} = {value.text}")
        else:
            sets.append(f"{col} = ?")
            args.append(value)
    conds = [f"{col} = ?" for col in where]
    args.extend(where.values())
    marks = ",".join("?" * len(sources))
    conds.append(f"state IN ({marks})")
    args.extend(sorted(str(s) for s in sources))
    if refresh and reason is not None and not also:  # in target already, same reason: nothing to write
        conds.append(f"(state <> ? OR {_REASON_COLUMN[machine.table]} IS NOT ?)")
        args.extend([str(target), reason])
    sql = f"UPDATE {machine.table} SET {', '.join(sets)} WHERE {' AND '.join(conds)}"
    return c.execute(sql, args).rowcount


__all__ = [
    "InvalidTransition",
    "JOBS",
    "JobState",
    "MACHINES",
    "Machine",
    "OUTBOX",
    "OutboxState",
    "PURGEABLE",
    "Rule",
    "SERIES",
    "SETTLED",
    "SeriesState",
    "Sql",
    "move",
]
