"""The case audit trail: append-only rows chained by SHA-256 (issue 15 item 6).

Every change to a case appends one row: who, in which role, which action, the state before and
after, the reason, the evidence hashes and the time. Rows are never updated or deleted. Each row
carries ``seq`` (its position, 1, 2, 3 … over the whole trail, not per case) and ``prev_hash``
(the previous row's hash, :data:`GENESIS` for the first), and its own ``hash``:

    hash = sha256(canonical JSON of every field but ``hash``, ``prev_hash`` included)

Canonical JSON: keys sorted, no insignificant whitespace, UTF-8 (Chinese text kept as is),
times as UTC ``YYYY-MM-DDTHH:MM:SS.ffffffZ``. One chain over all cases (not one per case) so
that deleting a case's whole trail, or its last row, still breaks the chain at the next row.
What a chain cannot show by itself is the loss of the newest rows: :func:`verify` takes the
head hash recorded elsewhere (an export, a log line) to catch that too.

Storage appends under one lock (SQLite's write lock; on PostgreSQL a row lock on the chain
head) so that two replicas never chain onto the same previous row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "GENESIS",
    "AuditEntry",
    "AuditRow",
    "Problem",
    "ProblemKind",
    "canonical_json",
    "chain",
    "chain_all",
    "dump_jsonl",
    "load_jsonl",
    "verify",
]

GENESIS = "0" * 64  # the prev_hash of the first row
_HEX64 = r"^[0-9a-f]{64}$"


class AuditEntry(BaseModel):
    """What one step did to one case, before it is chained."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    case_id: str = Field(min_length=1, max_length=128, description="the case changed")
    case_version: int = Field(ge=1, description="the case's version after this step")
    actor: str = Field(min_length=1, max_length=128, description="the acting account")
    role: str = Field(min_length=1, max_length=32, description="the account's level")
    action: str = Field(min_length=1, max_length=64, description="the action taken")
    before: str = Field(min_length=1, max_length=64, description="state before the step")
    after: str = Field(min_length=1, max_length=64, description="state after the step")
    reason: str | None = Field(default=None, max_length=4000, description="reason given")
    note: str | None = Field(default=None, max_length=4000, description="note or summary")
    evidence: tuple[str, ...] = Field(
        default=(), description="sha256 of each photo attached, content-addressed"
    )
    detail: dict[str, str] = Field(
        default_factory=dict, description="what else the step set (departments, deadlines)"
    )
    at: AwareDatetime = Field(description="when the step was taken")


class AuditRow(AuditEntry):
    """An entry in the chain."""

    seq: int = Field(ge=1, description="position in the whole trail, from 1")
    prev_hash: str = Field(pattern=_HEX64, description="the previous row's hash")
    hash: str = Field(pattern=_HEX64, description="sha256 over this row's canonical JSON")


def _utc(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _hashed_fields(row: AuditEntry, seq: int, prev_hash: str) -> dict[str, Any]:
    fields = row.model_dump(mode="python", include=set(AuditEntry.model_fields))
    fields["at"] = _utc(row.at)
    fields["evidence"] = list(row.evidence)
    fields["seq"] = seq
    fields["prev_hash"] = prev_hash
    return fields


def canonical_json(fields: dict[str, Any]) -> bytes:
    """Sorted keys, compact separators, UTF-8: the same bytes on every host and backend."""
    return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)


def _digest(entry: AuditEntry, seq: int, prev_hash: str) -> str:
    return hashlib.sha256(canonical_json(_hashed_fields(entry, seq, prev_hash))).hexdigest()


def chain(entry: AuditEntry, previous: AuditRow | None) -> AuditRow:
    """The row that appends ``entry`` after ``previous`` (None: the first row of the trail)."""
    seq = 1 if previous is None else previous.seq + 1
    prev_hash = GENESIS if previous is None else previous.hash
    base = entry.model_dump(include=set(AuditEntry.model_fields))
    return AuditRow(**base, seq=seq, prev_hash=prev_hash, hash=_digest(entry, seq, prev_hash))


def chain_all(entries: Sequence[AuditEntry]) -> list[AuditRow]:
    rows: list[AuditRow] = []
    for entry in entries:
        rows.append(chain(entry, rows[-1] if rows else None))
    return rows


class ProblemKind(StrEnum):
    TAMPERED = "tampered"  # the row's fields no longer give its hash
    MISSING = "missing"  # rows absent before this one (a gap in seq)
    INSERTED = "inserted"  # a row whose seq does not follow, or that is not chained in
    BROKEN_LINK = "broken_link"  # prev_hash is not the previous row's hash
    HEAD = "head"  # the newest row is not the recorded head


@dataclass(frozen=True, slots=True)
class Problem:
    seq: int
    kind: ProblemKind
    detail: str


def verify(rows: Sequence[AuditRow], *, head: str | None = None) -> list[Problem]:
    """Every place where ``rows`` (in seq order, as stored) are not the chain that was written.

    ``head``: the hash of the newest row as recorded elsewhere; without it, losing the newest
    rows cannot be told from their never having been written.
    """
    problems: list[Problem] = []
    previous: AuditRow | None = None
    for row in rows:
        if _digest(row, row.seq, row.prev_hash) != row.hash:
            problems.append(Problem(row.seq, ProblemKind.TAMPERED, "fields do not match hash"))
        expected_seq = 1 if previous is None else previous.seq + 1
        expected_prev = GENESIS if previous is None else previous.hash
        if row.seq > expected_seq:
            problems.append(
                Problem(row.seq, ProblemKind.MISSING, f"rows {expected_seq}…{row.seq - 1} absent")
            )
        elif row.seq < expected_seq:
            problems.append(
                Problem(row.seq, ProblemKind.INSERTED, f"seq {row.seq} after {expected_seq - 1}")
            )
        elif row.prev_hash != expected_prev:
            # seq follows but the link does not: a row in between was replaced or inserted and
            # renumbered, or this row was rewritten to hide one.
            problems.append(
                Problem(row.seq, ProblemKind.BROKEN_LINK, "prev_hash is not the previous hash")
            )
        previous = row
    if head is not None:
        last = rows[-1].hash if rows else GENESIS
        if last != head:
            problems.append(
                Problem(rows[-1].seq if rows else 0, ProblemKind.HEAD, "newest row is not head")
            )
    return problems


def dump_jsonl(rows: Iterable[AuditRow]) -> bytes:
    """An export: one row per line, every field including ``hash``, verifiable offline."""
    return b"".join(orjson.dumps(row.model_dump(mode="json")) + b"\n" for row in rows)


def load_jsonl(data: bytes) -> list[AuditRow]:
    """Rows back from an export; a line that is not a row is a ValueError naming its number."""
    rows: list[AuditRow] = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(AuditRow.model_validate_json(line))
        except ValidationError as exc:
            raise ValueError(f"line {number}: not an audit row: {exc}") from exc
    return rows
