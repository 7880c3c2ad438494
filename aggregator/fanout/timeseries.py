"""Time series: telemetry readings, alert counts and ingest figures, written to any server that
speaks the InfluxDB v2 write API (InfluxDB 2.x, InfluxDB 3.x, VictoriaMetrics).

``TimeSeriesSink`` is a ``BatchSink``. ``on_batch`` only turns the batch into small point tuples
and appends them to a bounded buffer; a thread of its own writes them in batches with
influxdb-client. While the server is down or slow the buffer fills; when it is full the oldest
points are dropped and counted (``dropped``), so ingest never stalls and memory stays bounded.
Failed writes are retried with a growing delay; points written after the server returns land.

What is written (measurement → fields; tags in brackets):

=================  ======================  ==================================================
measurement        fields                  tags
=================  ======================  ==================================================
cwg_telemetry      value                   device_id, quantity, unit
cwg_alerts         count                   type, outcome, grid, community, severity
cwg_rejections     count                   reason
cwg_ingest         messages, alerts,       —
                   events_created,
                   events_updated,
                   dead_letters, telemetry,
                   commit_lag_s,
                   buffer_dropped
=================  ======================  ==================================================

Prometheus-style servers (VictoriaMetrics) name the series ``<measurement>_<field>``, e.g.
``cwg_alerts_count{type="smoke_fire",community="330383001001"}``.

Settings (``TimeSeriesSettings``: ``url``, ``token``, ``org``, ``bucket``; batching and buffer
bounds have defaults):

* **InfluxDB 2.x**: ``url=http://influx:8086``, ``org=<your org>``, ``bucket=<bucket>``,
  ``token=<an API token with write access to the bucket>``.
* **InfluxDB 3.x** (Core/Enterprise/Cloud): same v2-compatible endpoint ``/api/v2/write``:
  ``url=http://influx3:8181``, ``bucket=<database>``, ``token=<database token>``; ``org`` is
  ignored by the server but must be non-empty.
* **VictoriaMetrics**: ``url=http://vm:8428``; token, org and bucket are ignored (the bucket
  becomes a ``db`` label).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write.point import Point
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.domain.write_precision import WritePrecision
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from aggregator.ingest.assemble import Assembled
from aggregator.pool.model import BatchResult, Notice
from contract import TelemetryV1

__all__ = ["TimeSeriesSettings", "TimeSeriesSink", "TimeSeriesStats"]

log = logging.getLogger(__name__)

_NS = 1_000_000_000
COMMUNITY_LENGTH = 12

# (measurement, tags, fields, time in ns): cheap to build on the ingest thread.
PointTuple = tuple[str, dict[str, str], dict[str, float | int], int]


class TimeSeriesSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="base URL of the server, e.g. http://127.0.0.1:8086")
    token: SecretStr | None = Field(None, description="API token (InfluxDB); from the environment")
    org: str = Field("cwg", min_length=1, description="InfluxDB organisation")
    bucket: str = Field("cwg", min_length=1, description="bucket (InfluxDB 2) or database (3)")
    batch_points: int = Field(2000, ge=1, le=100_000, description="points per write request")
    flush_interval_s: float = Field(1.0, gt=0, le=60, description="longest a point waits")
    buffer_points: int = Field(
        200_000, ge=10, description="points kept while the server is away; oldest dropped beyond"
    )
    timeout_s: float = Field(5.0, gt=0, le=120, description="HTTP timeout of one write")
    retry_max_s: float = Field(30.0, gt=0, le=600, description="longest delay between retries")


@dataclass(frozen=True, slots=True)
class TimeSeriesStats:
    written: int
    dropped: int
    buffered: int
    failed_writes: int
    last_error: str | None


class TimeSeriesSink:
    """Batched, non-blocking writer of pipeline figures to an InfluxDB v2 write endpoint."""

    def __init__(self, settings: TimeSeriesSettings) -> None:
        self.settings = settings
        self._buffer: collections.deque[PointTuple] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._written = 0
        self._dropped = 0
        self._failed = 0
        self._last_error: str | None = None
        token = settings.token.get_secret_value() if settings.token else ""
        self._client = InfluxDBClient(
            url=settings.url,
            token=token,
            org=settings.org,
            timeout=int(settings.timeout_s * 1000),
        )
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cwg-timeseries", daemon=True)
        self._thread.start()
        log.info(
            "time series sink writing to %s bucket=%s", self.settings.url, self.settings.bucket
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is buffered (bounded by ``timeout``), then close."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._write_api.close()  # type: ignore[no-untyped-call]
        self._client.close()  # type: ignore[no-untyped-call]
        if self._buffer:
            log.warning("time series sink stopped with %s points unwritten", len(self._buffer))

    def stats(self) -> TimeSeriesStats:
        with self._lock:
            buffered = len(self._buffer)
        return TimeSeriesStats(
            self._written, self._dropped, buffered, self._failed, self._last_error
        )

    # -- BatchSink (ingest thread) --------------------------------------------------------------

    def on_batch(
        self,
        result: BatchResult,
        notices: Sequence[Notice],
        telemetry: Sequence[TelemetryV1],
        assembled: Assembled,
    ) -> None:
        self.add(self._points(result, telemetry, assembled))

    def add(self, points: Sequence[PointTuple]) -> None:
        """Buffer points; when the buffer is full the oldest are dropped (and counted)."""
        if not points:
            return
        with self._lock:
            self._buffer.extend(points)
            excess = len(self._buffer) - self.settings.buffer_points
            if excess > 0:
                for _ in range(excess):
                    self._buffer.popleft()
                self._dropped += excess
            full = len(self._buffer) >= self.settings.batch_points
        if full:
            self._wake.set()

    def _points(
        self, result: BatchResult, telemetry: Sequence[TelemetryV1], assembled: Assembled
    ) -> list[PointTuple]:
        now_ns = int((result.committed_at or time.time()) * _NS)
        points: list[PointTuple] = []
        for t in telemetry:
            sent = int(t.sent_at.timestamp() * _NS)
            for r in t.readings:
                if not math.isfinite(r.value):
                    continue
                at = int(r.observed_at.timestamp() * _NS) if r.observed_at else sent
                tags = {"device_id": t.device_id, "quantity": r.quantity, "unit": r.unit}
                points.append(("cwg_telemetry", tags, {"value": float(r.value)}, at))
        pooled = {a.alert_id: a for a in assembled.batch.alerts}
        counts: collections.Counter[tuple[str, ...]] = collections.Counter()
        for res in result.alerts:
            a = pooled.get(res.alert_id)
            if a is not None:
                counts[(a.type, res.outcome.value, a.grid_code, a.severity.value)] += 1
        for (type_, outcome, grid, severity), n in counts.items():
            tags = {
                "type": type_,
                "outcome": outcome,
                "grid": grid,
                "community": grid[:COMMUNITY_LENGTH],
                "severity": severity,
            }
            points.append(("cwg_alerts", tags, {"count": n}, now_ns))
        ooa: collections.Counter[str] = collections.Counter(o.type for o in result.out_of_area)
        for type_, n in ooa.items():
            points.append(
                ("cwg_alerts", {"type": type_, "outcome": "out_of_area"}, {"count": n}, now_ns)
            )
        reasons: collections.Counter[str] = collections.Counter(
            d.reason.value for d in result.dead_letters
        )
        for reason, n in reasons.items():
            points.append(("cwg_rejections", {"reason": reason}, {"count": n}, now_ns))
        received = [a.received_at for a in assembled.batch.alerts]
        ingest: dict[str, float | int] = {
            "messages": len(assembled.batch) + len(telemetry),
            "alerts": len(result.alerts),
            "events_created": len(result.created),
            "events_updated": len(result.updated),
            "dead_letters": len(result.dead_letters),
            "telemetry": len(telemetry),
            "buffer_dropped": self._dropped,
        }
        if received and result.committed_at:
            ingest["commit_lag_s"] = max(0.0, result.committed_at - min(received))
        points.append(("cwg_ingest", {}, ingest, now_ns))
        return points

    # -- the writer thread ----------------------------------------------------------------------

    def _take(self) -> list[PointTuple]:
        with self._lock:
            n = min(len(self._buffer), self.settings.batch_points)
            return [self._buffer.popleft() for _ in range(n)]

    def _give_back(self, points: list[PointTuple]) -> None:
        """Unwritten points go back in front; the bound still holds (oldest dropped first)."""
        with self._lock:
            self._buffer.extendleft(reversed(points))
            excess = len(self._buffer) - self.settings.buffer_points
            for _ in range(max(0, excess)):
                self._buffer.popleft()
            self._dropped += max(0, excess)

    def _run(self) -> None:
        delay = 0.5
        while True:
            stopping = self._stop.is_set()
            if not stopping:
                self._wake.wait(self.settings.flush_interval_s)
                self._wake.clear()
            while True:
                batch = self._take()
                if not batch:
                    break
                if self._write(batch):
                    delay = 0.5
                    continue
                self._give_back(batch)
                if stopping or self._stop.wait(delay):
                    return
                delay = min(delay * 2, self.settings.retry_max_s)
            if stopping:
                return

    def _write(self, batch: list[PointTuple]) -> bool:
        records = [_to_point(p) for p in batch]
        try:
            self._write_api.write(
                bucket=self.settings.bucket,
                org=self.settings.org,
                record=records,
                write_precision=WritePrecision.NS,  # type: ignore[arg-type]  # a str constant
            )
        except Exception as exc:  # noqa: BLE001 - any transport or server error means: retry later
            self._failed += 1
            first = self._last_error is None
            self._last_error = f"{type(exc).__name__}: {exc}"[:500]
            # One warning per outage, not one per retry.
            (log.warning if first else log.debug)(
                "time series write of %s points failed (%s); keeping them and retrying",
                len(batch),
                self._last_error,
            )
            return False
        if self._last_error is not None:
            log.info("time series server reachable again")
        self._last_error = None
        self._written += len(batch)
        return True


def _to_point(p: PointTuple) -> Point:
    measurement, tags, fields, at = p
    point: Any = Point(measurement)  # type: ignore[no-untyped-call]
    for key, value in tags.items():
        if value:
            point = point.tag(key, value)
    for key, field_value in fields.items():
        point = point.field(key, field_value)
    result: Point = point.time(at, WritePrecision.NS)
    return result
