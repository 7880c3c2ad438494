"""Health heartbeat (retained status with ``contract.Health``) and sensor telemetry batches."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Protocol

from contract import DeviceState, Health, Location, Reading, StatusV1, TelemetryV1, utcnow
from edge.outbox import Outbox

logger = logging.getLogger(__name__)

_FPS_WINDOW_S = 10.0


class StatusSink(Protocol):
    def submit_status(self, status: StatusV1) -> None: ...


class TelemetrySink(Protocol):
    def submit_telemetry(self, batch: TelemetryV1) -> None: ...


@dataclass
class AgentMetrics:
    """Counters the pipeline updates and the heartbeat reads (single writers, so no lock)."""

    started: float = field(default_factory=time.monotonic)
    frames_processed: int = 0
    frames_dropped: int = 0
    alerts_raised: int = 0
    readings: int = 0
    last_inference_ms: float | None = None
    _frame_times: deque[float] = field(default_factory=lambda: deque(maxlen=600))

    def frame_done(self, inference_ms: float) -> None:
        self.frames_processed += 1
        self.last_inference_ms = inference_ms
        self._frame_times.append(time.monotonic())

    def fps(self) -> float | None:
        """Frames processed per second over the last few seconds; None before the first."""
        if self.frames_processed == 0:
            return None
        now = time.monotonic()
        recent = [t for t in list(self._frame_times) if now - t <= _FPS_WINDOW_S]
        if len(recent) < 2 or recent[-1] <= recent[0]:
            return 0.0
        return round((len(recent) - 1) / (recent[-1] - recent[0]), 2)

    def uptime_s(self) -> float:
        return round(time.monotonic() - self.started, 1)


class Heartbeat:
    """Builds the device's online status with its health, every ``interval_s`` seconds."""

    def __init__(
        self,
        *,
        device_id: str,
        kind: Literal["camera", "sensor", "hub"],
        version: str,
        metrics: AgentMetrics,
        outbox: Outbox,
        sink: StatusSink,
        interval_s: float,
    ) -> None:
        self.device_id = device_id
        self.kind: Literal["camera", "sensor", "hub"] = kind
        self.version = version
        self.metrics = metrics
        self.outbox = outbox
        self.sink = sink
        self.interval_s = interval_s

    def health(self) -> Health:
        m = self.metrics
        camera = self.kind == "camera"
        return Health(
            fps=m.fps() if camera else None,
            inference_ms=round(m.last_inference_ms, 2)
            if camera and m.last_inference_ms is not None
            else None,
            outbox_depth=self.outbox.depth(),
            outbox_dropped=self.outbox.dropped_total(),
            outbox_resent=self.outbox.resent_total(),
            frames_dropped=m.frames_dropped if camera else None,
            uptime_s=m.uptime_s(),
            version=self.version,
        )

    def status(self) -> StatusV1:
        return StatusV1(
            device_id=self.device_id,
            state=DeviceState.ONLINE,
            at=utcnow(),
            kind=self.kind,
            health=self.health(),
        )

    def beat(self) -> None:
        self.sink.submit_status(self.status())

    def run(self, stop: threading.Event) -> None:
        while True:
            self.beat()
            if stop.wait(self.interval_s):
                return


class TelemetryBatcher:
    """Collects sensor readings and sends them as one TelemetryV1 every ``interval_s``."""

    def __init__(
        self,
        *,
        device_id: str,
        location: Location,
        sink: TelemetrySink,
        interval_s: float,
        max_batch: int = 1000,
    ) -> None:
        self.device_id = device_id
        self.location = location
        self.sink = sink
        self.interval_s = interval_s
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._readings: list[Reading] = []

    def add(self, reading: Reading) -> None:
        with self._lock:
            self._readings.append(reading)
            full = len(self._readings) >= self.max_batch
        if full:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            readings, self._readings = self._readings, []
        if readings:
            self.sink.submit_telemetry(
                TelemetryV1(
                    device_id=self.device_id,
                    sent_at=utcnow(),
                    location=self.location,
                    readings=readings,
                )
            )

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            self.flush()
        self.flush()
