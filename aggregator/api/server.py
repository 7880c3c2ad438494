"""The whole service in one process: aggregator (ingest) + operator API + dashboard + sinks.

``run_service`` is what ``gateway run --http-port …`` calls: it runs in the foreground and stops
cleanly on SIGINT/SIGTERM (uvicorn's handlers), finishing the batch in hand. ``Service`` is the
same thing as an object with ``start()``/``stop()`` for tests and embedding.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import TracebackType
from typing import Any, Self

import uvicorn
from argon2 import PasswordHasher

from aggregator.api.app import create_app
from aggregator.auth import AuthStore, dev_mode
from aggregator.config import Settings
from aggregator.errors import AggregatorError
from aggregator.ingest import BatchSink
from aggregator.service import Aggregator, build_aggregator
from aggregator.stream import StreamHub
from aggregator.timeseries import TimeSeriesSettings, TimeSeriesSink
from contract import load_catalogue

__all__ = ["Service", "ServiceError", "run_service"]

log = logging.getLogger(__name__)


class ServiceError(AggregatorError):
    """The HTTP server did not come up."""


class Service:
    """Aggregator, stream hub, time-series sink and the web server, built and wired together."""

    def __init__(
        self,
        settings: Settings,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        timeseries: TimeSeriesSettings | None = None,
        log_level: str = "info",
        stream_queue: int = 256,
        password_hasher: PasswordHasher | None = None,
    ) -> None:
        self.settings = settings
        self.hub = StreamHub(load_catalogue(settings.catalogue_file), queue_size=stream_queue)
        self.timeseries = TimeSeriesSink(timeseries) if timeseries is not None else None
        sinks: list[BatchSink] = [self.hub]
        if self.timeseries is not None:
            sinks.append(self.timeseries)
        self.aggregator: Aggregator = build_aggregator(settings, sinks=sinks)
        self.auth = AuthStore(settings.pool, hasher=password_hasher)
        self.dev_notice = self.auth.ensure_dev_admin()
        if not self.auth.accounts():
            log.warning(
                "no operator account exists: nobody can log in to the dashboard. Create one "
                "with `gateway accounts add <username> --level admin`%s",
                "" if dev_mode() else " (or run the demo with CWG_DEV=1)",
            )
        agg = self.aggregator
        self.app = create_app(
            pool_path=settings.pool,
            catalogue=agg.catalogue,
            grids=agg.grids,
            snapshots=agg.snapshots,
            metrics=agg.metrics,
            hub=self.hub,
            auth=self.auth,
            broker_connected=lambda: agg.ingest.stats().connected,
            on_notice=agg.ingest.publish_notice,
        )
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host=host,
                port=port,
                log_level=log_level,
                ws="websockets-sansio",
                lifespan="on",
                timeout_graceful_shutdown=5,
            )
        )
        self._thread: threading.Thread | None = None
        self._started = False

    @property
    def port(self) -> int:
        """The bound port (useful when started on port 0)."""
        for server in self.server.servers:
            for sock in server.sockets:
                port: int = sock.getsockname()[1]
                return port
        return self.server.config.port

    @property
    def url(self) -> str:
        return f"http://{self.server.config.host}:{self.port}"

    def _start_backends(self) -> None:
        if self.timeseries is not None:
            self.timeseries.start()
        self.aggregator.start()
        self._started = True

    def start(self, timeout: float = 15.0) -> None:
        """Start ingest and serve HTTP on a background thread; returns once it listens."""
        self._start_backends()
        self._thread = threading.Thread(target=self.server.run, name="cwg-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ServiceError(
                    f"the HTTP server did not start on port {self.server.config.port}"
                )
            time.sleep(0.02)
        log.info("serving the operator API and dashboard at %s", self.url)

    def stop(self) -> None:
        """Stop HTTP first (no new requests), then ingest (commits its batch), then sinks."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self._stop_backends()

    def _stop_backends(self) -> None:
        if self._started:
            self._started = False
            self.aggregator.stop()
            if self.timeseries is not None:
                self.timeseries.stop()
        self.auth.close()

    def serve_forever(self) -> None:
        """Run in the foreground until SIGINT/SIGTERM, then shut everything down in order."""
        # uvicorn handles the signal (graceful HTTP shutdown) and then raises it again for the
        # handler that was installed before it. Ours only notes it, so that ingest still gets
        # to commit and acknowledge its batch instead of the process dying mid-way.
        received: list[int] = []
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for stop_signal in (signal.SIGINT, signal.SIGTERM):
                previous[stop_signal] = signal.signal(stop_signal, lambda s, _f: received.append(s))
        self._start_backends()
        try:
            self.server.run()
        finally:
            self._stop_backends()
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
    print(f"dashboard and API on http://{host}:{port}/ (docs at /docs)", flush=True)
    service.serve_forever()
    return 0
