"""The audit trail's SHA-256 chain: tampered, deleted, inserted and truncated rows are found."""

from __future__ import annotations

import hashlib
import itertools
import json
from datetime import UTC

import pytest

from aggregator.cases import Action
from aggregator.cases.audit import (
    GENESIS,
    AuditEntry,
    AuditRow,
    ProblemKind,
    chain,
    chain_all,
    dump_jsonl,
    load_jsonl,
    verify,
)

from .case_support import drive, new_case

A = Action


@pytest.fixture
def rows() -> list[AuditRow]:
    """The trail of two real cases, interleaved as two operators would write it."""
    _, first = drive(
        new_case("case-1"),
        [(A.VERIFY, 1), (A.WHISTLE, 2), (A.ACCEPT_OFF_SITE, 10), (A.HANDLE, 60)],
    )
    _, second = drive(new_case("case-2"), [(A.VERIFY, 3), (A.SELF_HANDLE, 5)])
    entries = [s.audit for s in (first[0], second[0], first[1], second[1], first[2], first[3])]
    return chain_all(entries)


def _kinds(problems: list[object]) -> list[tuple[int, ProblemKind]]:
    return [(p.seq, p.kind) for p in problems]  # type: ignore[attr-defined]


def test_an_intact_trail_verifies(rows: list[AuditRow]) -> None:
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0].prev_hash == GENESIS
    assert all(r.prev_hash == p.hash for p, r in itertools.pairwise(rows))
    assert verify(rows) == []
    assert verify(rows, head=rows[-1].hash) == []
    assert verify([]) == []


def test_the_hash_is_sha256_of_the_documented_canonical_json(rows: list[AuditRow]) -> None:
    # Recomputed here with the standard library, from the module docstring's definition.
    row = rows[5]
    fields = row.model_dump(mode="json", exclude={"hash"})
    fields["at"] = row.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert hashlib.sha256(text.encode()).hexdigest() == row.hash
    assert row.action == "handle"
    assert row.evidence  # the evidence hashes are under the hash


def test_a_tampered_row_is_found(rows: list[AuditRow]) -> None:
    forged = rows[2].model_copy(update={"reason": "nothing happened here"})
    assert _kinds(verify([*rows[:2], forged, *rows[3:]])) == [(3, ProblemKind.TAMPERED)]
    # Rewriting the hash too only moves the problem to the next row's link.
    rehashed = chain(forged, rows[1])
    assert _kinds(verify([*rows[:2], rehashed, *rows[3:]])) == [(4, ProblemKind.BROKEN_LINK)]
    # So does changing the evidence or the time.
    photo = rows[5].model_copy(update={"evidence": ("cd" * 32,)})
    assert _kinds(verify([*rows[:5], photo])) == [(6, ProblemKind.TAMPERED)]


def test_a_deleted_row_is_found(rows: list[AuditRow]) -> None:
    assert _kinds(verify([*rows[:3], *rows[4:]])) == [(5, ProblemKind.MISSING)]
    assert _kinds(verify(rows[1:])) == [(2, ProblemKind.MISSING)]
    # The newest row is missed only against the recorded head.
    assert verify(rows[:-1]) == []
    assert _kinds(verify(rows[:-1], head=rows[-1].hash)) == [(5, ProblemKind.HEAD)]


def test_an_inserted_row_is_found(rows: list[AuditRow]) -> None:
    fake = AuditEntry(**{**rows[2].model_dump(include=set(AuditEntry.model_fields)), "actor": "x"})
    inserted = chain(fake, rows[2])  # seq 4, chained properly onto row 3
    assert _kinds(verify([*rows[:3], inserted, *rows[3:]])) == [(4, ProblemKind.INSERTED)]
    # Renumbered to fit, every later row's hash gives it away.
    renumbered = [*rows[:3], inserted]
    for row in rows[3:]:
        renumbered.append(row.model_copy(update={"seq": row.seq + 1}))
    problems = _kinds(verify(renumbered))
    assert problems[0] == (5, ProblemKind.TAMPERED)
    assert (5, ProblemKind.BROKEN_LINK) in problems


def test_a_reordered_trail_is_found(rows: list[AuditRow]) -> None:
    swapped = [rows[0], rows[2], rows[1], *rows[3:]]
    assert verify(swapped) != []


def test_chinese_text_is_hashed_as_utf8(rows: list[AuditRow]) -> None:
    entry = AuditEntry(
        **{**rows[0].model_dump(include=set(AuditEntry.model_fields)), "reason": "非本社区事件"}
    )
    row = chain(entry, rows[-1])
    fields = row.model_dump(mode="json", exclude={"hash"})
    fields["at"] = row.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == row.hash
    assert verify([*rows, row]) == []


def test_an_export_verifies_offline_and_shows_an_edit(rows: list[AuditRow]) -> None:
    data = dump_jsonl(rows)
    assert load_jsonl(data) == rows
    assert verify(load_jsonl(data), head=rows[-1].hash) == []
    edited = data.replace(b'"actor":"department-fire"', b'"actor":"department-police"', 1)
    assert edited != data
    assert [p.kind for p in verify(load_jsonl(edited))] == [ProblemKind.TAMPERED]
    lines = data.splitlines(keepends=True)
    assert [p.kind for p in verify(load_jsonl(b"".join(lines[:2] + lines[3:])))] == [
        ProblemKind.MISSING
    ]
    with pytest.raises(ValueError, match="line 2"):
        load_jsonl(lines[0] + b"{}\n")
