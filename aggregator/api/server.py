"""The operator API's process: uvicorn, the FastAPI app and the live stream's fan-out, started
by ``aggregator.service.Service`` (``multiprocessing`` spawn) over the pool (the SQLite file, or
the PostgreSQL database of ``CWG_POOL_URL``). It writes only operators' lifecycle steps and
logins, and publishes the steps on the events topic with an MQTT client of its own
(``<client_id>-api``, clean session); its ``/readyz`` is that connection and the pool.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.sharedctypes import Synchronized
from typing import Any

import paho.mqtt.client as mqtt
from argon2 import PasswordHasher
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.access.auth import AuthStore
from aggregator.config import Settings
from aggregator.pool.port import LifecycleSteps, SnapshotStorage
from contract import Catalogue, EventNoticeV1, Topics

__all__ = ["ApiOptions", "api_process_main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiOptions:
    """What the API process is built from (pickled to it)."""

    settings: Settings
    host: str
    port: int
    log_level: str
    stream_queue: int
    metrics_url: str | None
    password_hasher: PasswordHasher | None = None


# -- the API process -----------------------------------------------------------------------


def open_operator_side(
    settings: Settings, catalogue: Catalogue
) -> tuple[LifecycleSteps | None, SnapshotStorage]:
    """Where operators' lifecycle steps are written and snapshots read: on PostgreSQL a small
    writer of the API's own (a pool of two connections; the ingest process migrated the
    schema) and the pool's snapshot table; on SQLite ``None`` (the app opens a
    ``LifecycleWriter`` on the file) and the snapshot files."""
    if settings.pool_url is None:
        from aggregator.pool.snapshots import SnapshotStore

        return None, SnapshotStore(settings.snapshots)
    from aggregator.pool.postgres import PgEventPool, PgSnapshotStore

    # Its steps take the same advisory locks as the ingest writers' batches (the default
    # lock mode), so a batch that may merge into an event and a step on it never interleave.
    writer = PgEventPool(
        settings.pool_url.get_secret_value(),
        catalogue,
        min_size=1,
        max_size=2,
        # an operator's step while the server is away is a 503 in seconds, not a hung request
        checkout_timeout_s=3.0,
        migrate_on_open=False,
    )
    return writer, PgSnapshotStore(writer)


class NoticePublisher:
    """The API process's own MQTT connection: operators' steps go out on the events topic."""

    def __init__(self, settings: Settings) -> None:
        s = settings.mqtt
        self.topic = Topics(s.topic_prefix).events
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{s.client_id}-api",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(s.username, s.secret())
        if s.tls_ca is not None:
            self.client.tls_set(ca_certs=str(s.tls_ca))
        # Reconnects stay within a few seconds of the broker coming back.
        self.client.reconnect_delay_set(min_delay=1, max_delay=5)
        self.client.max_queued_messages_set(10_000)
        self.client.connect_async(s.host, s.port, keepalive=s.keepalive_s)
        self.client.loop_start()

    def connected(self) -> bool:
        return bool(self.client.is_connected())

    def publish(self, notice: EventNoticeV1) -> None:
        self.client.publish(self.topic, notice.to_json(), qos=1)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


def api_process_main(
    options: ApiOptions,
    report: multiprocessing.connection.Connection,
    stop: Any,
    clients: Synchronized[int],
    parent_pid: int,
) -> None:
    """Build the app over the pool file and serve it until told to stop or the parent is gone."""
    import uvicorn

    from aggregator.api.app import create_app
    from aggregator.api.cases import CaseOptions
    from aggregator.fanout.metrics import ScrapedMetrics
    from aggregator.fanout.stream import StreamHub
    from aggregator.grids import GridIndex, default_grid_file
    from contract import load_catalogue

    logging.basicConfig(
        level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    settings = options.settings
    http = settings.http
    if http.nice:
        # Below the pool writer's priority: when the cores are short, ingest goes first.
        os.nice(http.nice)
    catalogue = load_catalogue(settings.catalogue_file)
    grids = GridIndex.from_geojson(settings.grid_file or default_grid_file())
    hub = StreamHub(
        catalogue,
        settings.pool_target,
        queue_size=options.stream_queue,
        update_interval=max(settings.notices.update_interval_ms / 1000, 0.0),
        stall_s=http.stream_stall_s,
    )

    def count(n: int) -> None:
        clients.value = n

    hub.on_clients = count
    auth = AuthStore(
        settings.pool_target,
        hasher=options.password_hasher,
        token_ttl=timedelta(seconds=settings.access.token_ttl_s),
    )
    writer, snapshots = open_operator_side(settings, catalogue)
    notices = NoticePublisher(settings)
    app = create_app(
        pool=settings.pool_target,
        pool_label=settings.pool_label,
        writer=writer,
        catalogue=catalogue,
        grids=grids,
        snapshots=snapshots,
        metrics=ScrapedMetrics(options.metrics_url),
        hub=hub,
        auth=auth,
        broker_connected=notices.connected,
        on_notice=notices.publish,
        access=settings.access,
        case_options=CaseOptions(
            holiday_file=settings.holiday_file,
            whistle_lists=settings.whistle_lists,
            evidence_max_bytes=settings.evidence_max_bytes,
            test_clock_file=settings.test_clock_file,
        ),
        webhook_settings=settings.webhooks,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=options.host,
            port=options.port,
            log_level=options.log_level,
            ws="websockets-sansio",
            # Per-message deflate compresses each small stream message on its own: CPU in the
            # API process per message and client, for little saved on a link to an operator.
            ws_per_message_deflate=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
            ssl_certfile=str(http.certfile) if http.certfile else None,
            ssl_keyfile=str(http.keyfile) if http.keyfile else None,
            # Only proxies named in the settings may say who the client is (never uvicorn's
            # FORWARDED_ALLOW_IPS from the environment): the login limiter counts per address.
            proxy_headers=bool(http.trusted_proxies),
            forwarded_allow_ips=list(http.trusted_proxies),
        )
    )

    def watch() -> None:
        reported = False
        while not server.should_exit:
            if not reported and server.started:
                sock = server.servers[0].sockets[0]
                report.send(int(sock.getsockname()[1]))
                report.close()
                reported = True
            if stop.wait(0.1) or os.getppid() != parent_pid:
                server.should_exit = True

    threading.Thread(target=watch, name="cwg-api-watch", daemon=True).start()
    try:
        server.run()
    finally:
        notices.close()
        auth.close()
