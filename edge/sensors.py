"""Sensor sources behind one small protocol.

The only source shipped is a *replay* source: a CSV file of ``timestamp,quantity,value`` rows,
replayed with its original gaps (optionally faster). Integrators and CI use it in place of
field hardware. A field reader (RS-485/Modbus RTU, Modbus TCP, a vendor HTTP push, LoRaWAN
uplinks) implements the same ``SensorSource.readings()`` iterator: it yields one
``SensorSample`` per reading, blocks while there is none, and stops when ``stop`` is set —
the rules and the rest of the agent do not change.

CSV format: a header line ``timestamp,quantity,value``; ``timestamp`` is either seconds (a
float, taken as an offset from the first row) or an ISO 8601 time with offset (its gaps are
kept). Blank lines and lines starting with ``#`` are skipped.
"""

from __future__ import annotations

import csv
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)


class SensorSourceError(Exception):
    """A sensor source that cannot be read (missing file, malformed row)."""


@dataclass(frozen=True, slots=True)
class SensorSample:
    sensor: str
    quantity: str
    value: float
    ts: float  # seconds since the epoch, when the agent received it


class SensorSource(Protocol):
    name: str

    def readings(self, stop: threading.Event) -> Iterator[SensorSample]: ...


@dataclass(frozen=True, slots=True)
class CsvRow:
    offset_s: float
    quantity: str
    value: float


def read_csv(path: Path | str) -> list[CsvRow]:
    """Parse a replay file into rows with offsets from the first row, in file order."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SensorSourceError(f"cannot read sensor replay {p}: {exc}") from exc
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    reader = csv.DictReader(lines)
    if reader.fieldnames is None or [f.strip() for f in reader.fieldnames] != [
        "timestamp",
        "quantity",
        "value",
    ]:
        raise SensorSourceError(f"{p}: header must be 'timestamp,quantity,value'")
    rows: list[CsvRow] = []
    first: float | None = None
    for lineno, rec in enumerate(reader, start=2):
        try:
            ts = _parse_ts(rec["timestamp"].strip())
            value = float(rec["value"])
        except (ValueError, AttributeError) as exc:
            raise SensorSourceError(f"{p}: data row {lineno}: {exc}") from exc
        if first is None:
            first = ts
        if ts < first:
            raise SensorSourceError(f"{p}: data row {lineno}: timestamp goes backwards")
        rows.append(CsvRow(ts - first, rec["quantity"].strip(), value))
    if not rows:
        raise SensorSourceError(f"{p}: no readings")
    return rows


def _parse_ts(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        stamp = datetime.fromisoformat(text)
        if stamp.tzinfo is None:
            raise ValueError(f"timestamp {text!r} has no UTC offset") from None
        return stamp.timestamp()


class CsvReplaySensor:
    """Replays a CSV file as if the readings arrived now, keeping their spacing."""

    def __init__(
        self,
        name: str,
        path: Path | str,
        *,
        speed: float = 1.0,
        loop: bool = False,
        clock: ClockLike | None = None,
    ) -> None:
        self.name = name
        self.rows = read_csv(path)
        self.speed = speed
        self.loop = loop
        self._clock = clock or _WallClock()

    def readings(self, stop: threading.Event) -> Iterator[SensorSample]:
        while True:
            start = self._clock.now()
            for row in self.rows:
                due = start + row.offset_s / self.speed
                wait = due - self._clock.now()
                if wait > 0 and stop.wait(wait):
                    return
                if stop.is_set():
                    return
                yield SensorSample(self.name, row.quantity, row.value, self._clock.now())
            if not self.loop:
                logger.info("sensor %s: replay finished (%s readings)", self.name, len(self.rows))
                return


class ClockLike(Protocol):
    def now(self) -> float: ...


class _WallClock:
    def now(self) -> float:
        return time.time()
