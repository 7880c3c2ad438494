"""What a batch carries into the pool and what comes back, and one batch's working view of the
events over the dedup index. No database here: both storage adapters (``sqlite``, ``postgres``)
write what these describe."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Final, Protocol

import orjson

from aggregator.pool.dedup import (
    METRES_PER_DEGREE_LAT,
    DedupIndex,
    EventState,
    SpatialHash,
    haversine_m,
)
from contract import (
    Catalogue,
    EventNoticeV1,
    EventStatus,
    EventSummary,
    GridLevel,
    Location,
    Outcome,
    RejectReason,
    Severity,
    event_notice_json,
)

SOURCE: Final = "smart_community_warning"  # Longgang 5.4


class Row(Protocol):
    """A stored event row, as either adapter's driver hands it (by column name)."""

    def __getitem__(self, key: str, /) -> Any: ...


def iso(value: float | None) -> str | None:
    if value is None:
        return None
    return datetime.fromtimestamp(value, UTC).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------------------- batch input


@dataclass(slots=True)  # not frozen: built per alert, and a frozen __init__ costs ~10×
class AlertIn:
    """A valid, geo-tagged alert ready to be pooled."""

    alert_id: str
    device_id: str
    seq: int
    type: str
    severity: Severity
    confidence: float
    observed_at: float
    received_at: float
    lat: float
    lon: float
    grid_code: str
    grid_path: str  # JSON of contract GridLevel list
    address: str
    description: str
    snapshot_sha256: str | None
    payload: bytes


@dataclass(slots=True)  # not frozen: built per alert, and a frozen __init__ costs ~10×
class OutOfAreaIn:
    alert_id: str
    device_id: str
    type: str
    observed_at: float
    received_at: float
    lat: float
    lon: float


@dataclass(frozen=True, slots=True)
class DeadLetterIn:
    received_at: float
    topic: str
    device_id: str | None
    alert_id: str | None
    reason: RejectReason
    detail: str
    payload: bytes
    seq: int | None = None  # the alert's seq when it could be read, for the device's feedback


def dead_letter_key(dl: DeadLetterIn) -> str:
    """A rejected message's identity in the pool (``dead_letters.message_sha256``): the same
    bytes on the same topic again (a redelivery after a reconnect) are the same message."""
    return hashlib.sha256(dl.topic.encode("utf-8", "replace") + b"\0" + dl.payload).hexdigest()


@dataclass(frozen=True, slots=True)
class StatusIn:
    device_id: str
    state: str
    reason: str | None
    at: float
    kind: str | None
    health: str | None  # JSON


@dataclass(slots=True)
class Batch:
    alerts: list[AlertIn] = field(default_factory=list)
    out_of_area: list[OutOfAreaIn] = field(default_factory=list)
    dead_letters: list[DeadLetterIn] = field(default_factory=list)
    statuses: list[StatusIn] = field(default_factory=list)
    seen: dict[str, float] = field(default_factory=dict)  # device_id -> last message time

    def __len__(self) -> int:
        return (
            len(self.alerts) + len(self.out_of_area) + len(self.dead_letters) + len(self.statuses)
        )


@dataclass(slots=True)  # not frozen: built per alert, and a frozen __init__ costs ~10×
class AlertResult:
    alert_id: str
    device_id: str
    seq: int
    outcome: Outcome
    event_id: int | None


@dataclass(frozen=True, slots=True)
class DeadLetterResult:
    id: int
    device_id: str | None
    alert_id: str | None
    reason: RejectReason
    detail: str
    duplicate: bool = False  # the message was kept before (row ``id``): nothing was added
    seq: int | None = None


def _no_summary(event_id: int) -> dict[str, Any]:
    raise KeyError(f"event {event_id} was not touched by this batch")


@dataclass(slots=True)
class BatchResult:
    alerts: list[AlertResult] = field(default_factory=list)
    out_of_area: list[OutOfAreaIn] = field(default_factory=list)
    dead_letters: list[DeadLetterResult] = field(default_factory=list)
    created: set[int] = field(default_factory=set)
    updated: set[int] = field(default_factory=set)
    committed_at: float = 0.0
    # a created or updated event as this batch committed it: EventSummary's JSON-ready dict
    # (``summary_dict``), built only for the events that are wanted; a model is
    # ``EventSummary.model_validate(d)``
    summary: Callable[[int], dict[str, Any]] = field(default=_no_summary)


def alert_row(a: AlertIn, event_id: int, outcome: Outcome, batch_id: int) -> tuple[Any, ...]:
    """An alert's row, in the column order both adapters write (SQLite INSERT, PostgreSQL COPY)."""
    return (
        a.alert_id,
        event_id,
        a.device_id,
        a.seq,
        a.type,
        a.severity.value,
        a.confidence,
        a.observed_at,
        a.received_at,
        batch_id,
        a.lat,
        a.lon,
        a.grid_code,
        outcome.value,
        a.snapshot_sha256,
        a.payload,
    )


@dataclass(slots=True)  # not frozen: built per device per batch (a city: 1,000 a batch)
class DeviceTally:
    """What one committed batch adds to a device's row: both adapters upsert exactly this."""

    device_id: str
    last_seen: float
    last_seq: int | None
    alerts: int
    rejected: int
    out_of_area: int
    lat: float | None
    lon: float | None


def device_tallies(batch: Batch, result: BatchResult) -> list[DeviceTally]:
    """Per device seen in the batch: pooled alerts (not duplicates), new dead letters,
    out-of-area messages, the highest pooled seq and the position of its latest alert."""
    # Plain dicts and one pass each: a city's batch names a thousand devices.
    alerts: dict[str, int] = {}
    last_seq: dict[str, int] = {}
    duplicate = Outcome.DUPLICATE
    for r in result.alerts:
        if r.outcome is not duplicate:
            d = r.device_id
            alerts[d] = alerts.get(d, 0) + 1
            if r.seq > last_seq.get(d, -1):
                last_seq[d] = r.seq
    rejected: dict[str, int] = {}
    for dl in result.dead_letters:
        if dl.device_id and not dl.duplicate:
            rejected[dl.device_id] = rejected.get(dl.device_id, 0) + 1
    out_of_area: dict[str, int] = {}
    for o in batch.out_of_area:
        out_of_area[o.device_id] = out_of_area.get(o.device_id, 0) + 1
    # A device's position is where its latest alert placed it (a camera: its own position or
    # the object's; a sensor: where it is installed).
    latest: dict[str, AlertIn] = {}
    for a in batch.alerts:
        held = latest.get(a.device_id)
        if held is None or a.observed_at >= held.observed_at:
            latest[a.device_id] = a
    tallies = []
    for device_id, seen in batch.seen.items():
        last = latest.get(device_id)
        tallies.append(
            DeviceTally(
                device_id,
                seen,
                last_seq.get(device_id),
                alerts.get(device_id, 0),
                rejected.get(device_id, 0),
                out_of_area.get(device_id, 0),
                None if last is None else last.lat,
                None if last is None else last.lon,
            )
        )
    return tallies


@dataclass(frozen=True, slots=True)
class Notice:
    """An event notice as published on the events topic (``payload``: EventNoticeV1 JSON),
    with what subscribers filter on."""

    change: str
    event_id: int
    grid_code: str
    department: str
    type: str
    severity: Severity
    payload: bytes

    @classmethod
    def of_summary(cls, change: str, event: dict[str, Any], at: datetime) -> Notice:
        """The notice of a writer's summary (``BatchResult.summary``), serialized without
        models (``event_notice_json``)."""
        return cls(
            change,
            event["event_id"],
            event["grid_code"],
            event["department"],
            event["type"],
            Severity(event["severity"]),
            event_notice_json(change, event, at),
        )

    @classmethod
    def of(cls, notice: EventNoticeV1) -> Notice:
        """The record of a notice built as a model (an operator's lifecycle step)."""
        ev = notice.event
        return cls(
            notice.change,
            ev.event_id,
            ev.grid_code,
            ev.department,
            ev.type,
            ev.severity,
            notice.to_json(),
        )


# An alert's event as the walk knows it: the state it joined or opened in this batch (whose id
# a PostgreSQL batch assigns only after the walk), an id pooled before, or None (an alert
# pooled before whose row retention dropped).
EventRef = int | EventState | None


def event_of(ref: EventRef) -> int | None:
    """The event id a ``EventRef`` names (read after the batch's new events have their ids)."""
    return ref.id if isinstance(ref, EventState) else ref


# Before a look at an alert's open (closed=False) or closed candidates: an adapter whose view
# does not hold them yet brings them in (``BatchWork.refresh``).
LookUp = Callable[[AlertIn, bool], None]


@dataclass(slots=True)
class Walk:
    """What the dedup walk decided for a batch's alerts, in their order."""

    decisions: list[tuple[AlertIn, Outcome, EventRef]] = field(default_factory=list)
    # each event the batch opened, with its ``registered`` log entry's detail
    registered: list[tuple[EventState, dict[str, Any]]] = field(default_factory=list)

    def fill(self, result: BatchResult) -> None:
        """Each alert's result, and the created and updated events (ids final by now)."""
        for a, outcome, ref in self.decisions:
            event_id = event_of(ref)
            result.alerts.append(AlertResult(a.alert_id, a.device_id, a.seq, outcome, event_id))
            if outcome is Outcome.ACCEPTED:
                assert event_id is not None
                result.created.add(event_id)
            elif outcome is Outcome.MERGED:
                assert event_id is not None
                result.updated.add(event_id)

    def alert_rows(self, batch_id: int) -> Iterator[tuple[Any, ...]]:
        """The rows of the alerts this batch pools (not the duplicates): ``alert_row``."""
        for a, outcome, ref in self.decisions:
            if outcome is Outcome.DUPLICATE:
                continue
            event_id = event_of(ref)
            assert event_id is not None  # every pooled alert has its event
            yield alert_row(a, event_id, outcome, batch_id)


class BatchWork:
    """One batch's view of the events: the index, overlaid with this batch's edits, new events
    and rows re-read from SQL. Applied to the index only once the batch has committed, so a
    rolled-back batch leaves the index as it was."""

    def __init__(self, index: DedupIndex) -> None:
        self.index = index
        self.states: dict[int, EventState] = {}
        self.new_ids: list[int] = []
        self.edited_ids: dict[int, None] = {}
        self.device_alerts: dict[tuple[int, str], list[Any]] = {}
        self.change_seq = 0  # this batch's pool-wide change number
        self._local: dict[bool, SpatialHash] = {}
        # type → (lat, lon) → [(distance m, event id)] of the open candidates within the merge
        # radius, nearest first. A device sits still, so its alerts repeat their position; an
        # event's position is its first alert's and never moves. Dropped for a type when this
        # batch reads a candidate of it from SQL (``refresh``); an event the batch opens is
        # added to the lists it belongs in (``created``).
        self._near: dict[str, dict[tuple[float, float], list[tuple[float, int]]]] = {}
        self._near_radius: dict[str, float] = {}

    def _hash(self, closed: bool) -> SpatialHash:
        if closed not in self._local:
            self._local[closed] = self.index.new_hash()
        return self._local[closed]

    def _add_local(self, state: EventState, closed: bool) -> None:
        self._hash(closed).add(state.type, state.lat, state.lon, state.id)
        if not closed:
            self._near.pop(state.type, None)

    def _near_add(self, state: EventState) -> None:
        """A new open event into the cached candidate lists of the points within its type's
        radius, as ``open_near`` would find it: a city's batch opens dozens of events, and
        dropping the cache for each made every later alert of the type search again."""
        by_point = self._near.get(state.type)
        if not by_point:
            return
        radius_m = self._near_radius[state.type]
        max_dlat = radius_m / METRES_PER_DEGREE_LAT * (1 + 1e-9)
        lat, lon = state.lat, state.lon
        for (plat, plon), near in by_point.items():
            if abs(plat - lat) > max_dlat:
                continue
            d = haversine_m(plat, plon, lat, lon)
            if d <= radius_m:
                bisect.insort(near, (d, state.id))

    def open_near(
        self, type_: str, lat: float, lon: float, radius_m: float
    ) -> list[tuple[float, int]]:
        """The open candidates of the type within ``radius_m`` of the point, as (distance,
        event id), nearest (then oldest) first; their status and span are the caller's."""
        by_point = self._near.setdefault(type_, {})
        self._near_radius[type_] = radius_m
        near = by_point.get((lat, lon))
        if near is None:
            near = []
            # A great circle is never shorter than its latitude difference: most candidates
            # of the cells around are ruled out by that before the haversine.
            max_dlat = radius_m / METRES_PER_DEGREE_LAT * (1 + 1e-9)
            get = self.get
            for event_id in dict.fromkeys(self.candidates(type_, lat, lon, closed=False)):
                s = get(event_id)
                if abs(s.lat - lat) > max_dlat:
                    continue
                d = haversine_m(lat, lon, s.lat, s.lon)
                if d <= radius_m:
                    near.append((d, event_id))
            near.sort()
            by_point[(lat, lon)] = near
        return near

    # -- the dedup walk (Longgang 7.1: one incident, one event), the same on both backends

    def walk(
        self,
        alerts: Sequence[AlertIn],
        catalogue: Catalogue,
        known: dict[str, EventRef],
        *,
        now: float,
        ids: Iterator[int],
        text: Callable[[str], str] = str,
        look_up: LookUp | None = None,
    ) -> Walk:
        """Decide each alert in order: a duplicate of an alert pooled before (``known``, which
        the walk extends), merged into the nearest open event that can hold it, or opening a
        new event (linked to a recent closed one nearby). New events take their ids from
        ``ids``; ``text`` makes free text storable; ``look_up`` brings candidates in first."""
        out = Walk()
        for a in alerts:
            if a.alert_id in known:
                out.decisions.append((a, Outcome.DUPLICATE, known[a.alert_id]))
                continue
            wt = catalogue.types[a.type]
            if look_up is not None:
                look_up(a, False)
            state = self.find_open(a, wt.merge_radius_m, wt.merge_window_s)
            if state is None:
                if look_up is not None:
                    look_up(a, True)
                recurrence = self.recurrence_of(a, wt.merge_radius_m, wt.merge_window_s)
                state = new_event_state(
                    catalogue, a, next(ids), now, recurrence, text(a.description)
                )
                self.created(state, a)
                detail: dict[str, Any] = {"alert_id": a.alert_id, "device_id": a.device_id}
                if recurrence is not None:
                    detail["recurrence_of"] = recurrence
                out.registered.append((state, detail))
                outcome = Outcome.ACCEPTED
            else:
                self.merge(state, a)
                outcome = Outcome.MERGED
            known[a.alert_id] = state
            out.decisions.append((a, outcome, state))
        return out

    def find_open(self, a: AlertIn, radius_m: float, window_s: float) -> EventState | None:
        """The nearest open event of the type whose observed span, widened by the type's
        window, holds the alert (ties go to the older event), as this batch's copy to edit."""
        lo, hi = a.observed_at - window_s, a.observed_at + window_s
        for _, event_id in self.open_near(a.type, a.lat, a.lon, radius_m):
            s = self.get(event_id)
            if s.status != "closed" and s.last >= lo and s.first <= hi:
                return self.edit(event_id)
        return None

    def recurrence_of(self, a: AlertIn, radius_m: float, window_s: float) -> int | None:
        """A closed event absorbs nothing; a recurrence near it opens a new event linked to
        the latest one closed within the window."""
        best: tuple[float, int] | None = None
        for event_id in self.candidates(a.type, a.lat, a.lon, closed=True):
            s = self.get(event_id)
            if s.status != "closed" or (s.closed_at or 0) < a.observed_at - window_s:
                continue
            d = haversine_m(a.lat, a.lon, s.lat, s.lon)
            if d <= radius_m and (best is None or (d, -s.id) < best):
                best = (d, -s.id)  # the latest closed event nearby
        return None if best is None else -best[1]

    def get(self, event_id: int) -> EventState:
        state = self.states.get(event_id)
        return state if state is not None else self.index.events[event_id]

    def candidates(self, type_: str, lat: float, lon: float, *, closed: bool) -> list[int]:
        ids = self.index.candidates(type_, lat, lon, closed=closed)
        local = self._local.get(closed)
        return ids + local.near(type_, lat, lon) if local is not None else ids

    def edit(self, event_id: int) -> EventState:
        if event_id not in self.states:
            self.states[event_id] = self.index.events[event_id].copy()
        self.edited_ids[event_id] = None
        return self.states[event_id]

    def refresh(self, state: EventState) -> None:
        """A row read from SQL inside this transaction: it wins over what the index holds."""
        if state.id in self.edited_ids:
            return  # we changed it in this batch already; our copy is newer
        self.states[state.id] = state
        self._add_local(state, state.status == "closed")

    def created(self, state: EventState, a: AlertIn) -> None:
        self.states[state.id] = state
        self.new_ids.append(state.id)
        self.edited_ids[state.id] = None
        self._hash(False).add(state.type, state.lat, state.lon, state.id)
        self._near_add(state)
        self.device_alerts[(state.id, a.device_id)] = [a.observed_at, 1]

    def merge(self, state: EventState, a: AlertIn) -> None:
        state.alert_count += 1
        state.devices[a.device_id] = state.devices.get(a.device_id, 0) + 1
        state.first = min(state.first, a.observed_at)
        state.last = max(state.last, a.observed_at)
        # Severity only rises; the snapshot kept is the one of the most confident alert.
        if a.severity.rank > state.severity.rank:
            state.severity = a.severity
        if a.snapshot_sha256 and (
            state.snapshot_score is None or a.confidence > state.snapshot_score
        ):
            state.snapshot_sha256, state.snapshot_score = a.snapshot_sha256, a.confidence
        entry = self.device_alerts.setdefault((state.id, a.device_id), [a.observed_at, 0])
        entry[0] = min(entry[0], a.observed_at)
        entry[1] += 1

    def apply(self) -> None:
        for state in self.states.values():
            self.index.put(state)

    def summary(self, event_id: int, catalogue: Catalogue) -> dict[str, Any]:
        return summary_dict(self.get(event_id), catalogue)


@lru_cache(maxsize=4096)
def _grid_path(grid_path: str) -> list[dict[str, str]]:
    """The stored grid path, parsed once per grid. Shared between summaries: read-only."""
    path: list[dict[str, str]] = orjson.loads(grid_path)
    return path


def new_event_state(
    catalogue: Catalogue,
    a: AlertIn,
    event_id: int,
    now: float,
    recurrence: int | None,
    description: str | None,
) -> EventState:
    """The event an alert opens (registration, Longgang 7.1), as both adapters write it:
    located where the alert placed it, with the type's department and handling deadline."""
    wt = catalogue.types[a.type]
    return EventState(
        id=event_id,
        type=a.type,
        status=EventStatus.REGISTERED.value,
        severity=a.severity,
        department=wt.department,
        grid_code=a.grid_code,
        grid_path=a.grid_path,
        lat=a.lat,
        lon=a.lon,
        address=a.address,
        description=description or f"{wt.zh} / {wt.en}",
        first=a.observed_at,
        last=a.observed_at,
        registered_at=now,
        deadline_at=now + wt.handling_deadline.total_seconds(),
        alert_count=1,
        devices={a.device_id: 1},
        snapshot_sha256=a.snapshot_sha256,
        snapshot_score=a.confidence if a.snapshot_sha256 else None,
        recurrence_of=recurrence,
    )


# The events columns a writer's EventState is read from, in the order ``event_state`` takes
# them (both adapters select exactly these).
EVENT_STATE_COLUMNS: Final = (
    "id, type, status, severity, department, grid_code, grid_path, lat, lon, address,"
    " description, first_observed_at, last_observed_at, registered_at, deadline_at,"
    " alert_count, snapshot_sha256, snapshot_score, recurrence_of, closed_at"
)


def event_state(r: Sequence[Any], devices: dict[str, int]) -> EventState:
    """The writer's state of a stored event: ``r`` the values of ``EVENT_STATE_COLUMNS``,
    ``devices`` its devices' alert counts in order of first appearance."""
    return EventState(
        id=r[0],
        type=r[1],
        status=r[2],
        severity=Severity(r[3]),
        department=r[4],
        grid_code=r[5],
        grid_path=r[6],
        lat=r[7],
        lon=r[8],
        address=r[9],
        description=r[10],
        first=r[11],
        last=r[12],
        registered_at=r[13],
        deadline_at=r[14],
        alert_count=r[15],
        devices=devices,
        snapshot_sha256=r[16],
        snapshot_score=r[17],
        recurrence_of=r[18],
        closed_at=r[19],
    )


def new_event_record(s: EventState, now: float, change_seq: int) -> dict[str, Any]:
    """A new event's row by column, as both adapters insert it."""
    return {
        "id": s.id,
        "source": SOURCE,
        "type": s.type,
        "severity": s.severity.value,
        "status": s.status,
        "department": s.department,
        "grid_code": s.grid_code,
        "grid_path": s.grid_path,
        "lat": s.lat,
        "lon": s.lon,
        "address": s.address,
        "description": s.description,
        "snapshot_sha256": s.snapshot_sha256,
        "snapshot_score": s.snapshot_score,
        "first_observed_at": s.first,
        "last_observed_at": s.last,
        "registered_at": s.registered_at,
        "updated_at": now,
        "deadline_at": s.deadline_at,
        "alert_count": s.alert_count,
        "device_count": len(s.devices),
        "recurrence_of": s.recurrence_of,
        "change_seq": change_seq,
    }


def merged_event_record(s: EventState, now: float, change_seq: int) -> dict[str, Any]:
    """What a batch changes in an event it merged alerts into (both adapters also bump its
    ``version``)."""
    return {
        "id": s.id,
        "severity": s.severity.value,
        "snapshot_sha256": s.snapshot_sha256,
        "snapshot_score": s.snapshot_score,
        "first_observed_at": s.first,
        "last_observed_at": s.last,
        "updated_at": now,
        "alert_count": s.alert_count,
        "device_count": len(s.devices),
        "change_seq": change_seq,
    }


def summary_dict(s: EventState, catalogue: Catalogue) -> dict[str, Any]:
    """The writer's state as ``EventSummary``'s JSON-ready dict (wire names, no nulls,
    datetimes as aware datetimes), built without models: every value came from a validated
    alert or from the pool itself, and this runs for every notice ingest sends
    (``EventSummary.model_validate`` of it equals the summary read from the row: tested)."""
    wt = catalogue.types.get(s.type)
    out: dict[str, Any] = {
        "event_id": s.id,
        "source": SOURCE,
        "type": s.type,
        "type_zh": wt.zh if wt else s.type,
        "type_en": wt.en if wt else s.type,
        "severity": s.severity.value,
        "status": s.status,
        "department": s.department,
        "grid_code": s.grid_code,
        "grid_path": _grid_path(s.grid_path),
        "location": {"lat": s.lat, "lon": s.lon},
        "description": s.description,
        "first_observed_at": _dt(s.first),
        "last_observed_at": _dt(s.last),
        "registered_at": _dt(s.registered_at),
        "deadline_at": _dt(s.deadline_at),
        "alert_count": s.alert_count,
        "device_ids": list(s.devices),
    }
    if s.snapshot_sha256 is not None:
        out["snapshot_sha256"] = s.snapshot_sha256
    if s.recurrence_of is not None:
        out["recurrence_of"] = s.recurrence_of
    return out


def summary_from_row(row: Row, device_ids: list[str], catalogue: Catalogue) -> EventSummary:
    wt = catalogue.types.get(row["type"])
    return EventSummary(
        event_id=row["id"],
        type=row["type"],
        type_zh=wt.zh if wt else row["type"],
        type_en=wt.en if wt else row["type"],
        severity=Severity(row["severity"]),
        status=EventStatus(row["status"]),
        department=row["department"],
        grid_code=row["grid_code"],
        grid_path=[GridLevel.model_validate(g) for g in _grid_path(row["grid_path"])],
        location=Location(lat=row["lat"], lon=row["lon"]),
        description=row["description"],
        first_observed_at=_dt(row["first_observed_at"]),
        last_observed_at=_dt(row["last_observed_at"]),
        registered_at=_dt(row["registered_at"]),
        deadline_at=_dt(row["deadline_at"]),
        alert_count=row["alert_count"],
        device_ids=device_ids,
        snapshot_sha256=row["snapshot_sha256"],
        recurrence_of=row["recurrence_of"],
    )


def summary_dict_from_row(row: Row, device_ids: list[str], catalogue: Catalogue) -> dict[str, Any]:
    """``summary_from_row`` as ``summary_dict``'s JSON-ready dict, built without models: the
    live stream reads hundreds of summaries a second only to serialize them
    (``event_notice_json`` of it equals the notice of ``summary_from_row``'s summary: tested)."""
    wt = catalogue.types.get(row["type"])
    out: dict[str, Any] = {
        "event_id": row["id"],
        "source": SOURCE,
        "type": row["type"],
        "type_zh": wt.zh if wt else row["type"],
        "type_en": wt.en if wt else row["type"],
        "severity": row["severity"],
        "status": row["status"],
        "department": row["department"],
        "grid_code": row["grid_code"],
        "grid_path": _grid_path(row["grid_path"]),
        "location": {"lat": row["lat"], "lon": row["lon"]},
        "description": row["description"],
        "first_observed_at": _dt(row["first_observed_at"]),
        "last_observed_at": _dt(row["last_observed_at"]),
        "registered_at": _dt(row["registered_at"]),
        "deadline_at": _dt(row["deadline_at"]),
        "alert_count": row["alert_count"],
        "device_ids": device_ids,
    }
    if row["snapshot_sha256"] is not None:
        out["snapshot_sha256"] = row["snapshot_sha256"]
    if row["recurrence_of"] is not None:
        out["recurrence_of"] = row["recurrence_of"]
    return out


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)
