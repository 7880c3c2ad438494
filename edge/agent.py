"""The edge agent, composed in one place.

``build_agent`` reads top to bottom as the path of an alert:

    camera:  source → detect → track → rules ─┐
    sensors: source → thresholds ─────────────┤
                                              └→ alert (AlertV1) → outbox (SQLite) → publisher
    health:  heartbeat (retained status) and telemetry batches → publisher

Every dependency comes in through a constructor, so a test can hand in a real broker, a
scripted sensor or a fixed detector. Frames may be dropped (oldest first, in the source's
bounded queue); alerts never: they are committed to the outbox by the thread that raised them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Protocol

import numpy as np

from contract import AlertV1, Location, Reading, SensorReading
from edge import config as conf
from edge.alerts import AlertFactory
from edge.annotate import annotate, encode_jpeg_capped
from edge.config import DeviceConfig
from edge.detector import Detector, load_detector
from edge.health import AgentMetrics, Heartbeat, TelemetryBatcher
from edge.outbox import Outbox
from edge.publisher import Publisher
from edge.rules import (
    ActiveHours,
    AlertIntent,
    CameraRule,
    CrowdRule,
    ThresholdRule,
    ZoneDwellRule,
    evaluate_camera,
)
from edge.sensors import CsvReplaySensor, SensorSource
from edge.sources import FrameSource, open_source
from edge.tracker import Track, Tracker

logger = logging.getLogger(__name__)

# A frame source's timestamps are either wall-clock seconds (live cameras) or video time
# counted from zero (files); anything below this is video time and is anchored at start-up.
_EPOCH_FLOOR = 1_000_000_000.0
_DRAIN_GRACE_S = 15.0


def agent_version() -> str:
    try:
        return version("community-warning-gateway")
    except PackageNotFoundError:
        return "0.0.0"


class Worker(Protocol):
    name: str

    def run(self, stop: threading.Event) -> None: ...

    def interrupt(self) -> None:
        """Unblock ``run`` when it waits on its source (called after ``stop`` is set)."""


class Wakeable(Protocol):
    def wake(self) -> None: ...


# ---- rules from configuration ------------------------------------------------------------


def camera_rules(config: DeviceConfig) -> list[CameraRule]:
    rules: list[CameraRule] = []
    for rc in config.rules:
        if isinstance(rc, conf.ThresholdRule):
            continue
        polygon = config.zones[rc.zone]
        name = rc.name or f"{rc.type}:{rc.zone}"
        if isinstance(rc, conf.CrowdRule):
            rules.append(
                CrowdRule(
                    name=name,
                    zone_name=rc.zone,
                    polygon=polygon,
                    min_count=rc.min_count,
                    min_duration_s=rc.min_duration_s,
                    cooldown_s=rc.cooldown_s,
                    min_score=rc.min_score,
                    severity=rc.severity,
                    description=rc.description,
                )
            )
            continue
        active = None
        if isinstance(rc, conf.IntrusionRule) and rc.active_hours is not None:
            h = rc.active_hours
            active = ActiveHours(h.start, h.end, h.timezone)
        assert isinstance(rc, conf.FireLaneRule | conf.EbikeInLiftRule | conf.IntrusionRule)
        rules.append(
            ZoneDwellRule(
                name=name,
                type_code=rc.type,
                zone_name=rc.zone,
                polygon=polygon,
                classes=frozenset(rc.classes),
                min_dwell_s=rc.min_dwell_s,
                cooldown_s=rc.cooldown_s,
                cooldown_scope=rc.cooldown_scope,
                min_score=rc.min_score,
                severity=rc.severity,
                active=active,
                description=rc.description,
            )
        )
    return rules


def sensor_rules(config: DeviceConfig) -> dict[str, list[ThresholdRule]]:
    units = {s.name: s.unit for s in config.sensors}
    out: dict[str, list[ThresholdRule]] = {s.name: [] for s in config.sensors}
    for rc in config.rules:
        if not isinstance(rc, conf.ThresholdRule):
            continue
        out[rc.sensor].append(
            ThresholdRule(
                name=rc.name or f"{rc.type}:{rc.sensor}",
                type_code=rc.type,
                sensor=rc.sensor,
                quantity=rc.quantity,
                unit=units[rc.sensor],
                on_at=rc.on_at,
                off_below=rc.on_at if rc.off_below is None else rc.off_below,
                hold_s=rc.hold_s,
                cooldown_s=rc.cooldown_s,
                repeat_s=rc.repeat_s,
                severity=rc.severity,
                description=rc.description,
                confidence=rc.confidence,
            )
        )
    return out


# ---- alerts --------------------------------------------------------------------------------


class AlertEmitter:
    """Turns intents into alerts committed to the outbox, then wakes the publisher."""

    def __init__(
        self, factory: AlertFactory, outbox: Outbox, publisher: Wakeable, metrics: AgentMetrics
    ) -> None:
        self.factory = factory
        self.outbox = outbox
        self.publisher = publisher
        self.metrics = metrics

    def emit(
        self,
        intents: Sequence[AlertIntent],
        ts: float,
        snapshot_jpeg: bytes | None = None,
        model: tuple[str, str] | None = None,
    ) -> list[AlertV1]:
        observed_at = datetime.fromtimestamp(ts, UTC)
        out: list[AlertV1] = []
        for intent in intents:
            alert, result = self.outbox.enqueue(
                lambda seq, i=intent: self.factory.build(
                    i, seq=seq, observed_at=observed_at, snapshot_jpeg=snapshot_jpeg, model=model
                )
            )
            self.metrics.alerts_raised += 1
            logger.info(
                "alert raised type=%s seq=%s id=%s rule=%s zone=%s confidence=%.2f stored=%s",
                alert.type,
                alert.seq,
                alert.alert_id,
                intent.rule,
                intent.zone,
                alert.confidence,
                result.stored,
            )
            out.append(alert)
        if out:
            self.publisher.wake()
        return out


# ---- workers -------------------------------------------------------------------------------


class Annotator(Protocol):
    def __call__(
        self,
        frame_bgr: np.ndarray,
        tracks: Sequence[Track],
        zones: Mapping[str, Sequence[tuple[float, float]]],
        max_bytes: int,
    ) -> bytes: ...


def annotated_snapshot(
    frame_bgr: np.ndarray,
    tracks: Sequence[Track],
    zones: Mapping[str, Sequence[tuple[float, float]]],
    max_bytes: int,
) -> bytes:
    return encode_jpeg_capped(annotate(frame_bgr, list(tracks), zones), max_bytes)


@dataclass
class CameraWorker:
    """source → detect → track → rules → alert, one frame at a time."""

    source: FrameSource
    detector: Detector
    tracker: Tracker
    rules: list[CameraRule]
    emitter: AlertEmitter
    metrics: AgentMetrics
    zones: Mapping[str, Sequence[tuple[float, float]]]
    snapshot_max_bytes: int
    snapshot: Annotator = annotated_snapshot
    name: str = "camera"
    _anchor: float | None = field(default=None, init=False)

    def _wall(self, stamp: float) -> float:
        if stamp >= _EPOCH_FLOOR:
            return stamp
        if self._anchor is None:
            self._anchor = time.time() - stamp
        return self._anchor + stamp

    def run(self, stop: threading.Event) -> None:
        try:
            for stamp, frame in self.source.frames():
                if stop.is_set():
                    break
                self.process(self._wall(stamp), frame)
                dropped = getattr(getattr(self.source, "stats", None), "frames_dropped", None)
                if isinstance(dropped, int):
                    self.metrics.frames_dropped = dropped
        finally:
            self.source.close()

    def interrupt(self) -> None:
        # A live stream that is reconnecting yields nothing; closing it ends the iteration.
        self.source.close()

    def process(self, now: float, frame: np.ndarray) -> list[AlertV1]:
        t0 = time.perf_counter()
        detections = self.detector.detect(frame)
        self.metrics.frame_done((time.perf_counter() - t0) * 1000.0)
        tracks = self.tracker.update(detections, now)
        intents = evaluate_camera(self.rules, tracks, now)
        if not intents:
            return []
        jpeg = self.snapshot(frame, tracks, self.zones, self.snapshot_max_bytes)
        model = (self.detector.model_id, self.detector.model_version)
        return self.emitter.emit(intents, now, jpeg, model)


@dataclass
class SensorWorker:
    """sensor source → thresholds → alert; every reading also goes to telemetry."""

    sensor: conf.SensorConfig
    source: SensorSource
    rules: list[ThresholdRule]
    emitter: AlertEmitter
    metrics: AgentMetrics
    telemetry: TelemetryBatcher | None
    name: str = "sensor"

    def interrupt(self) -> None:
        """Nothing to do: sensor sources watch the stop event themselves."""

    def run(self, stop: threading.Event) -> None:
        for sample in self.source.readings(stop):
            self.metrics.readings += 1
            observed = datetime.fromtimestamp(sample.ts, UTC)
            if self.telemetry is not None:
                self.telemetry.add(
                    Reading(
                        quantity=sample.quantity,
                        value=sample.value,
                        unit=self.sensor.unit,
                        observed_at=observed,
                    )
                )
            reading = SensorReading(
                quantity=sample.quantity, value=sample.value, unit=self.sensor.unit
            )
            intents: list[AlertIntent] = []
            for rule in self.rules:
                intents.extend(rule.evaluate(reading, sample.ts))
            if intents:
                self.emitter.emit(intents, sample.ts)


# ---- the agent -----------------------------------------------------------------------------


class Agent:
    """Runs the workers, the publisher and the heartbeat until stopped."""

    def __init__(
        self,
        *,
        config: DeviceConfig,
        outbox: Outbox,
        publisher: Publisher,
        heartbeat: Heartbeat,
        telemetry: TelemetryBatcher | None,
        workers: list[Worker],
        metrics: AgentMetrics,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self.publisher = publisher
        self.heartbeat = heartbeat
        self.telemetry = telemetry
        self.workers = workers
        self.metrics = metrics
        self.stop_event = threading.Event()
        self._crashed = False

    def request_stop(self) -> None:
        self.stop_event.set()

    def run(self, *, exit_when_done: bool = False) -> int:
        """Block until ``request_stop`` (or, with ``exit_when_done``, until every source has
        ended and the outbox has drained or a grace period has passed). Returns an exit code."""
        stop = self.stop_event
        device = self.config.device.device_id
        logger.info(
            "agent starting device=%s kind=%s workers=%s outbox=%s depth=%s",
            device,
            self.config.device.kind,
            [w.name for w in self.workers],
            self.outbox.path,
            self.outbox.depth(),
        )
        self.publisher.start()
        threads = [self._thread(f"worker:{w.name}", w.run) for w in self.workers]
        threads.append(self._thread("heartbeat", self.heartbeat.run))
        if self.telemetry is not None:
            threads.append(self._thread("telemetry", self.telemetry.run))
        failed = False
        try:
            while not stop.wait(0.2):
                live = [t for t in threads[: len(self.workers)] if t.is_alive()]
                if exit_when_done and not live:
                    logger.info("every source ended; draining the outbox")
                    self._drain(_DRAIN_GRACE_S)
                    break
        finally:
            stop.set()
            for w in self.workers:
                w.interrupt()
            for t in threads:
                t.join(timeout=10)
                if t.is_alive():
                    failed = True
                    logger.error("thread %s did not stop in time", t.name)
            self.publisher.stop()
            self.outbox.close()
            logger.info("agent stopped device=%s", device)
        return 1 if failed or self._crashed else 0

    def _drain(self, grace_s: float) -> None:
        if self.telemetry is not None:
            self.telemetry.flush()
        deadline = time.monotonic() + grace_s
        while self.outbox.depth() > 0 and time.monotonic() < deadline:
            self.publisher.wake()
            time.sleep(0.1)
        left = self.outbox.depth()
        if left:
            logger.warning(
                "%s alerts still wait in the outbox %s; they are sent after the next start",
                left,
                self.outbox.path,
            )

    def _thread(self, name: str, target: Callable[[threading.Event], None]) -> threading.Thread:
        def body() -> None:
            try:
                target(self.stop_event)
            except Exception:
                # A dead worker must not leave a half-running agent: stop everything, loudly.
                logger.exception("%s failed; stopping the agent", name)
                self._crashed = True
                self.stop_event.set()

        t = threading.Thread(target=body, name=name, daemon=True)
        t.start()
        return t


def build_agent(
    config: DeviceConfig,
    *,
    state_dir: Path | str = ".",
    password: str | None = None,
    frame_source: FrameSource | None = None,
    detector: Detector | None = None,
    sensor_sources: Mapping[str, SensorSource] | None = None,
) -> Agent:
    """Compose the agent for one device configuration.

    ``password`` overrides the configured credential reference; sources and detector may be
    handed in (tests, simulators), otherwise they are built from the configuration.
    """
    device = config.device
    metrics = AgentMetrics()
    # Resolved first: a missing secret fails before anything is opened.
    if password is None:
        password = config.credentials.password()

    # Outbox: every alert is committed here before it is published.
    outbox_path = Path(config.outbox.path or f"{device.device_id}.outbox.db")
    if not outbox_path.is_absolute():
        outbox_path = Path(state_dir) / outbox_path
    outbox = Outbox(
        outbox_path,
        max_rows=config.outbox.max_rows,
        max_bytes=config.outbox.max_bytes,
        feedback_timeout_s=config.outbox.feedback_timeout_s,
    )

    # Publisher: drains the outbox over MQTT; also carries status and telemetry.
    publisher = Publisher(
        device_id=device.device_id,
        kind=device.kind,
        broker=config.broker,
        username=config.credentials.username,
        password=password,
        outbox=outbox,
    )
    heartbeat = Heartbeat(
        device_id=device.device_id,
        kind=device.kind,
        version=agent_version(),
        metrics=metrics,
        outbox=outbox,
        sink=publisher,
        interval_s=config.heartbeat.interval_s,
    )
    location = Location(
        lat=config.geo.lat,
        lon=config.geo.lon,
        floor=config.geo.floor,
        accuracy_m=config.geo.accuracy_m,
    )

    # Alerts: intents become AlertV1, committed to the outbox, then the publisher is woken.
    factory = AlertFactory(device_id=device.device_id, geo=config.geo)
    emitter = AlertEmitter(factory, outbox, publisher, metrics)
    workers: list[Worker] = []

    # Camera: source → detect → track → rules → alert.
    cam = config.camera
    if cam is not None:
        workers.append(
            CameraWorker(
                source=frame_source
                or open_source(
                    cam.url,
                    cam.sample_fps,
                    loop=cam.loop,
                    realtime=cam.realtime,
                    queue_size=cam.queue_frames,
                ),
                detector=detector or load_detector(cam.detector),
                tracker=Tracker(),
                rules=camera_rules(config),
                emitter=emitter,
                metrics=metrics,
                zones=config.zones,
                snapshot_max_bytes=cam.snapshot_max_bytes,
            )
        )

    # Sensors: source → thresholds → alert; readings also become telemetry.
    telemetry = None
    if config.sensors:
        telemetry = TelemetryBatcher(
            device_id=device.device_id,
            location=location,
            sink=publisher,
            interval_s=config.heartbeat.telemetry_interval_s,
        )
        by_sensor = sensor_rules(config)
        for s in config.sensors:
            source = (sensor_sources or {}).get(s.name) or CsvReplaySensor(
                s.name, s.source.path, speed=s.source.speed, loop=s.source.loop
            )
            workers.append(
                SensorWorker(
                    sensor=s,
                    source=source,
                    rules=by_sensor[s.name],
                    emitter=emitter,
                    metrics=metrics,
                    telemetry=telemetry,
                    name=f"sensor:{s.name}",
                )
            )

    return Agent(
        config=config,
        outbox=outbox,
        publisher=publisher,
        heartbeat=heartbeat,
        telemetry=telemetry,
        workers=workers,
        metrics=metrics,
    )
