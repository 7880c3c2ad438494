"""The gateway, composed: read it top to bottom to see the whole service.

``build_aggregator`` wires ingest: settings → catalogue and grids → the pool (storage port) and
snapshots → the pipeline (decode, geo-tag, assemble) → the MQTT session and batch worker, with
their metrics and sinks. The pool is the SQLite file under the data directory, or with
``CWG_POOL_URL=postgresql://…`` the PostgreSQL database that replicas on several machines share
(``open_pool``; snapshots then live in its table, so no replica needs another's files).
``Service`` adds the operator side: accounts, the time-series sink, the ingest metrics endpoint
and the operator API in a process of its own (``api/server.py``), and the background threads
that work on the cases: webhook delivery and the supervision timer (督办: reminders, overdue
items, escalations; every replica runs one, a row lock shares the cases among them), and, with
``CWG_RETENTION__ALERT_DAYS`` set, the daily retention of raw alerts.

Ingest runs in this process, the operator API and dashboard in a child process.

Operators never slow ingest. The pool writer is the one serial stage, so nothing an operator
does runs in its interpreter: uvicorn, the FastAPI app and the live stream's fan-out live in a
child process (``multiprocessing`` spawn) that reads the pool (SQLite WAL or PostgreSQL: readers
never wait for the writer) and writes only operators' lifecycle steps and logins, through the pool's
own locking, as a second replica would. The live stream is fed from the pool, not from the
writer's batch callback (``fanout/stream.py``), so the writer does no work per watcher and an
operator on any replica's API sees every replica's events. The child publishes operators'
steps on the events topic with an MQTT client of its own (``<client_id>-api``, clean session);
its ``/readyz`` is that connection and the pool. Ingest's own Prometheus metrics are served on a
loopback port of this process (``CWG_METRICS_PORT``); the API's token-guarded ``/metrics`` shows
them with the stream's gauges.

HTTPS: uvicorn's own TLS (``CWG_HTTP__CERTFILE`` / ``CWG_HTTP__KEYFILE``, or ``gateway run
--certfile --keyfile``): one process fewer to run and test than a reverse proxy, and the same
dashboard works behind one (nginx, Caddy) for those who already have one.

``run_service`` is what ``gateway run --http-port …`` calls: it runs in the foreground and stops
cleanly on SIGINT/SIGTERM, finishing the batch in hand. ``Service`` is the same thing as an
object with ``start()``/``stop()`` for tests and embedding.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.sharedctypes import Synchronized
from types import TracebackType
from typing import Any, Self

from argon2 import PasswordHasher
from prometheus_client import start_http_server

from aggregator.access.auth import AuthStore
from aggregator.api.server import ApiOptions, api_process_main
from aggregator.cases.supervise import SupervisionPolicy
from aggregator.clock import clock_for
from aggregator.config import Settings
from aggregator.errors import AggregatorError
from aggregator.fanout.metrics import WebhookMetrics
from aggregator.fanout.timeseries import TimeSeriesSettings, TimeSeriesSink
from aggregator.fanout.webhooks import WebhookWorker, WorkerOptions
from aggregator.gctune import release_gc, tune_gc
from aggregator.grids import GridIndex, default_grid_file
from aggregator.ingest.assemble import Pipeline
from aggregator.ingest.decode import DecodeLimits
from aggregator.ingest.metrics import Metrics
from aggregator.ingest.worker import BatchSink, MqttIngest
from aggregator.pool.port import IngestPool, SnapshotStorage
from aggregator.pool.retention import RetentionTimer
from aggregator.pool.snapshots import SnapshotStore
from aggregator.pool.sqlite import EventPool
from aggregator.pool.supervision import SupervisionTimer, Supervisor
from contract import Catalogue, Topics, load_catalogue

__all__ = ["Aggregator", "Service", "ServiceError", "build_aggregator", "open_pool", "run_service"]

log = logging.getLogger(__name__)


@dataclass
class Aggregator:
    settings: Settings
    catalogue: Catalogue
    grids: GridIndex
    pool: IngestPool
    snapshots: SnapshotStorage
    metrics: Metrics
    ingest: MqttIngest
    sinks: list[BatchSink] = field(default_factory=list)
    _gc_tuned: bool = field(default=False, init=False, repr=False)

    def start(self) -> None:
        tune_gc()
        self._gc_tuned = True
        self.ingest.start()

    def stop(self) -> None:
        self.ingest.stop()
        self.pool.close()
        if self._gc_tuned:
            self._gc_tuned = False
            release_gc()

    def __enter__(self) -> Aggregator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def open_pool(
    settings: Settings, catalogue: Catalogue, ref_lat: float
) -> tuple[IngestPool, SnapshotStorage]:
    """The pool writer and snapshot store that ``settings`` select: PostgreSQL (migrated on
    open, snapshots in its table, so replicas on other machines read them) when ``pool_url``
    is set, else the SQLite file and snapshot files under the data directory."""
    if settings.pool_url is not None:
        # imported here: the SQLite default needs neither psycopg nor its pool
        from aggregator.pool.postgres import PgEventPool, PgSnapshotStore

        pg = PgEventPool(
            settings.pool_url.get_secret_value(),
            catalogue,
            ref_lat=ref_lat,
            dead_letter_keep_bytes=settings.dead_letters.keep_bytes,
        )
        return pg, PgSnapshotStore(pg)
    pool = EventPool(
        settings.pool,
        catalogue,
        ref_lat=ref_lat,
        dead_letter_keep_bytes=settings.dead_letters.keep_bytes,
    )
    return pool, SnapshotStore(settings.snapshots)


def build_aggregator(
    settings: Settings,
    *,
    sinks: Sequence[BatchSink] = (),
    metrics: Metrics | None = None,
    grids: GridIndex | None = None,
) -> Aggregator:
    """Validate every input, open the pool, wire the stages. Nothing connects until start()."""
    catalogue = load_catalogue(settings.catalogue_file)
    grids = grids or GridIndex.from_geojson(settings.grid_file or default_grid_file())
    pool, snapshots = open_pool(settings, catalogue, grids.reference_latitude())
    metrics = metrics or Metrics()
    pipeline = Pipeline(
        Topics(settings.mqtt.topic_prefix),
        catalogue,
        grids,
        snapshots,
        DecodeLimits(
            max_payload_bytes=settings.max_payload_bytes,
            max_clock_skew=timedelta(seconds=settings.max_clock_skew_s),
        ),
    )
    ingest = MqttIngest(
        settings.mqtt,
        settings.batch,
        pipeline,
        pool,
        metrics,
        sinks,
        notices=settings.notices,
        dead_letters=settings.dead_letters,
    )
    log.info(
        "aggregator built pool=%s grids=%s types=%s",
        settings.pool_label,
        len(grids),
        len(catalogue.types),
    )
    return Aggregator(settings, catalogue, grids, pool, snapshots, metrics, ingest, list(sinks))


# -- the whole gateway: ingest here, the operator API in its own process ----------------


class ServiceError(AggregatorError):
    """The API process did not come up."""


class StreamClients:
    """The API process's live-stream client count, readable here (``service.hub.client_count``)."""

    def __init__(self, value: Synchronized[int]) -> None:
        self._value = value

    @property
    def client_count(self) -> int:
        return int(self._value.value)


class Service:
    """Aggregator and time-series sink here; the web server in its own process."""

    def __init__(
        self,
        settings: Settings,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        timeseries: TimeSeriesSettings | None = None,
        log_level: str = "info",
        stream_queue: int = 4096,
        password_hasher: PasswordHasher | None = None,
    ) -> None:
        self.settings = settings
        self.host = host
        self.log_level = log_level
        self.timeseries = TimeSeriesSink(timeseries) if timeseries is not None else None
        sinks: list[BatchSink] = [self.timeseries] if self.timeseries is not None else []
        self.aggregator: Aggregator = build_aggregator(settings, sinks=sinks)
        # Accounts are made here (tests, the dev admin); the API process opens its own store.
        self.auth = AuthStore(
            settings.pool_target,
            hasher=password_hasher,
            token_ttl=timedelta(seconds=settings.access.token_ttl_s),
        )
        self.dev_notice = self.auth.ensure_dev_admin(settings.dev)
        if not self.auth.accounts():
            log.warning(
                "no operator account exists: nobody can log in to the dashboard. Create one "
                "with `gateway accounts add <username> --level admin`%s",
                "" if settings.dev else " (or run the demo with CWG_DEV=1)",
            )
        self._requested_port = port
        self._stream_queue = stream_queue
        self._hasher = password_hasher
        ctx = multiprocessing.get_context("spawn")
        self._mp = ctx
        self._clients: Synchronized[int] = ctx.Value("i", 0)
        self.hub = StreamClients(self._clients)
        self._stop_api = ctx.Event()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._port: int | None = None
        self._metrics_server: Any = None
        self.webhooks: WebhookWorker | None = None
        # Made once (a registry takes each metric name once), kept by this service alone: a
        # module-level map from registry to these metrics kept every stopped service alive.
        self._webhook_metrics: WebhookMetrics | None = None
        self.supervision: SupervisionTimer | None = None
        self.retention: RetentionTimer | None = None
        self.metrics_port: int | None = None
        self._started = False

    @property
    def port(self) -> int:
        """The bound port (useful when started on port 0)."""
        return self._port if self._port is not None else self._requested_port

    @property
    def api_pid(self) -> int | None:
        """The API process's id while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def scheme(self) -> str:
        return "https" if self.settings.http.certfile is not None else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------------

    def _start_backends(self) -> None:
        if self.timeseries is not None:
            self.timeseries.start()
        self.aggregator.start()
        self._started = True
        if self.settings.webhooks.enabled:
            # Delivery threads here rather than in the API process: they wait on sockets, and
            # they deliver whether or not the API process is up (aggregator/fanout/webhooks.py)
            hooks = self.settings.webhooks
            if self._webhook_metrics is None:
                # on ingest's registry, which the loopback metrics port serves to the API
                self._webhook_metrics = WebhookMetrics(self.aggregator.metrics.registry)
            self.webhooks = WebhookWorker(
                self.settings.pool_target,
                WorkerOptions(
                    schedule_s=tuple(hooks.schedule_s),
                    timeout_s=hooks.timeout_s,
                    workers=hooks.workers,
                    poll_s=hooks.poll_s,
                    jitter=hooks.jitter,
                    retention_days=hooks.retention_days,
                    retry_after_max_s=hooks.retry_after_max_s,
                    allow_networks=tuple(hooks.allow_networks),
                    ca_file=hooks.ca_file,
                ),
                self._webhook_metrics,
            )
            self.webhooks.start()
        if self.settings.supervision.enabled:
            # Every replica runs the timer: each case is claimed with a row lock (PostgreSQL's
            # SKIP LOCKED), each item raised once (aggregator/pool/supervision.py). Here rather
            # than in the API process: its notices go out on ingest's MQTT session.
            sup = self.settings.supervision
            self.supervision = SupervisionTimer(
                Supervisor(
                    self.settings.pool_target,
                    policy=SupervisionPolicy(
                        reminder_lead=timedelta(seconds=sup.reminder_lead_s),
                        reminder_fraction=sup.reminder_fraction,
                        street_after=timedelta(seconds=sup.street_after_s),
                        county_after=timedelta(seconds=sup.county_after_s),
                    ),
                    name=self.settings.mqtt.client_id,
                ),
                clock_for(self.settings.test_clock_file).now,
                interval_s=sup.interval_s,
                publish=self.aggregator.ingest.publish_events_topic,
            )
            self.supervision.start()
        kept = self.settings.retention
        if kept.alert_days is not None:
            # the same bounded steps as `gateway retention`, once a day on a thread and
            # connection of its own; on PostgreSQL one replica's job runs at a time
            self.retention = RetentionTimer(
                self.settings.pool_target,
                kept.alert_days,
                first_after_s=kept.first_run_after_s,
            )
            self.retention.start()
        server, _thread = start_http_server(
            self.settings.metrics_port, addr="127.0.0.1", registry=self.aggregator.metrics.registry
        )
        self._metrics_server = server
        self.metrics_port = int(server.server_port)
        log.info("ingest metrics on http://127.0.0.1:%s/metrics", self.metrics_port)

    def _start_api(self, timeout: float) -> None:
        options = ApiOptions(
            settings=self.settings,
            host=self.host,
            port=self._requested_port,
            log_level=self.log_level,
            stream_queue=self._stream_queue,
            metrics_url=f"http://127.0.0.1:{self.metrics_port}/metrics",
            password_hasher=self._hasher,
        )
        parent_end, child_end = self._mp.Pipe(duplex=False)
        self._process = self._mp.Process(
            target=api_process_main,
            args=(options, child_end, self._stop_api, self._clients, os.getpid()),
            name="cwg-api",
            daemon=True,
        )
        self._process.start()
        child_end.close()
        deadline = time.monotonic() + timeout
        with parent_end:
            while not parent_end.poll(0.1):
                if not self._process.is_alive() or time.monotonic() > deadline:
                    self.stop()
                    raise ServiceError(f"the API process did not start on port {self.port}")
            try:
                self._port = int(parent_end.recv())
            except EOFError:  # it ended before it listened: stop what started here too
                self.stop()
                raise ServiceError(f"the API process did not start on port {self.port}") from None

    def start(self, timeout: float = 60.0) -> None:
        """Start ingest here and the API process; returns once the API listens."""
        self._start_backends()
        self._start_api(timeout)
        log.info("serving the operator API and dashboard at %s", self.url)

    def stop(self) -> None:
        """Stop the API process first (no new requests), then ingest (commits its batch)."""
        self._stop_api.set()
        process, self._process = self._process, None
        if process is not None:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
            if not process.is_alive():
                # releases its pipe ends now rather than whenever the object is collected
                process.close()
        self._stop_backends()

    def _stop_backends(self) -> None:
        if self._started:
            self._started = False
            if self.retention is not None:
                self.retention.stop()
                self.retention = None
            if self.supervision is not None:
                self.supervision.stop()
                self.supervision = None
            if self.webhooks is not None:
                self.webhooks.stop()
                self.webhooks = None
            self.aggregator.stop()
            if self.timeseries is not None:
                self.timeseries.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        self.auth.close()

    def serve_forever(self) -> None:
        """Run in the foreground until SIGINT/SIGTERM (or the API process ends), then shut
        everything down in order: the batch in hand is committed and acknowledged."""
        stop = threading.Event()
        previous: dict[int, Any] = {}
        received: list[int] = []

        def note(number: int, _frame: Any) -> None:
            received.append(number)
            stop.set()

        if threading.current_thread() is threading.main_thread():
            for stop_signal in (signal.SIGINT, signal.SIGTERM):
                previous[stop_signal] = signal.signal(stop_signal, note)
        try:
            self.start()
            while not stop.wait(0.5):
                if self._process is not None and not self._process.is_alive():
                    log.error("the API process ended (exit code %s)", self._process.exitcode)
                    break
        finally:
            self.stop()
            for number, handler in previous.items():
                signal.signal(number, handler)
        if received:
            log.info("stopped on signal %s", signal.Signals(received[0]).name)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def run_service(
    settings: Settings,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    timeseries: TimeSeriesSettings | None = None,
    log_level: str = "info",
) -> int:
    """Build everything, serve until interrupted, shut down cleanly. Returns the exit status."""
    service = Service(settings, host, port, timeseries=timeseries, log_level=log_level)
    if service.dev_notice:
        print(service.dev_notice, flush=True)
    print(f"dashboard and API on {service.url}/ (docs at /docs)", flush=True)
    service.serve_forever()
    return 0
