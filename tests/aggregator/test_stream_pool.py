"""The live stream's pool feed on both backends: a hub reading an SQLite file or a PostgreSQL
database offers the events another writer commits; on PostgreSQL it is woken by the commit's
announcement (LISTEN) rather than by its clock, and reads the table when it missed some."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import psycopg

from aggregator.access.auth import Level, Operator
from aggregator.fanout.stream import StreamFilter, StreamHub
from aggregator.ingest.assemble import Inbound, Pipeline
from aggregator.ingest.decode import DecodeLimits
from aggregator.pool.model import Batch
from contract import AlertV1, Topics, default_catalogue

from .conftest import GRIDS, PoolBackend, grid_in_community, interior, make_alert, offset

TOPICS = Topics("cwg")
CATALOGUE = default_catalogue()
ADMIN = Operator("admin", Level.ADMIN, "", None, "Admin")


def _batch(pipeline: Pipeline, *alerts: AlertV1) -> Batch:
    now = time.time()
    msgs = [Inbound(TOPICS.alert(a.device_id), a.to_json(), now) for a in alerts]
    return pipeline.assemble(msgs).batch


async def _items(hub: StreamHub, client: Any, timeout: float) -> list[dict[str, Any]]:
    await asyncio.wait_for(client.queue.wait(), timeout)
    out: list[dict[str, Any]] = []
    for text in client.queue.take():
        message = orjson.loads(text)
        out += message["items"] if message.get("kind") == "batch" else [message]
    return out


def test_a_feed_offers_what_another_writer_commits(pool_backend: PoolBackend) -> None:
    """The tick is 2 s on PostgreSQL: only the commit's announcement can bring the event
    within a second. On SQLite the feed polls every 0.25 s."""
    writer = pool_backend.writer(CATALOGUE)
    pipeline = Pipeline(TOPICS, CATALOGUE, GRIDS, pool_backend.snapshots(writer), DecodeLimits())
    poll_s = 2.0 if pool_backend.is_postgres else 0.25
    lat, lon = interior(grid_in_community(0, 3))

    async def scenario() -> None:
        hub = StreamHub(CATALOGUE, pool_backend.target, update_interval=0.5, poll_s=poll_s)
        hub.bind(asyncio.get_running_loop())
        try:
            client = hub.connect(ADMIN, StreamFilter())
            await asyncio.sleep(poll_s + 0.3)  # the feed is listening (or polling) by now
            for n in range(3):  # bounded: three events, one a commit
                alert = make_alert(f"cam-{n}", *interior(grid_in_community(n, 3)))
                started = time.monotonic()
                await asyncio.to_thread(writer.commit_batch, _batch(pipeline, alert))
                items = await _items(hub, client, 1.0)
                took = time.monotonic() - started
                assert [(i["change"], i["event"]["device_ids"]) for i in items] == [
                    ("created", [f"cam-{n}"])
                ], items
                assert took < 1.0
            # an update (a second device joins the first event) comes too
            join = make_alert("cam-9", *offset(lat, lon, east_m=20))
            await asyncio.to_thread(writer.commit_batch, _batch(pipeline, join))
            items = await _items(hub, client, 1.5)
            assert [(i["change"], i["event"]["device_ids"]) for i in items] == [
                ("updated", ["cam-0", "cam-9"])
            ], items
            assert hub.poll_errors == 0
        finally:
            await hub.aclose()

    asyncio.run(scenario())


def test_on_postgresql_what_was_committed_while_not_listening_is_read_from_the_table(
    pg_url: str, tmp_path: Path
) -> None:
    """The server ends the listener's session; commits made then are announced to nobody. The
    feed reads them from the table, offers each once, and listens again."""
    backend = PoolBackend("postgres", pg_url, tmp_path)
    try:
        writer = backend.writer(CATALOGUE)
        pipeline = Pipeline(TOPICS, CATALOGUE, GRIDS, backend.snapshots(writer), DecodeLimits())

        async def commit(n: int) -> None:
            alert = make_alert(f"cam-{n}", *interior(grid_in_community(n, 4)))
            await asyncio.to_thread(writer.commit_batch, _batch(pipeline, alert))

        async def scenario() -> None:
            hub = StreamHub(CATALOGUE, pg_url, update_interval=0.5, poll_s=0.25)
            hub.bind(asyncio.get_running_loop())
            try:
                client = hub.connect(ADMIN, StreamFilter())
                await asyncio.sleep(0.6)
                feed = hub._feed
                assert feed.listening
                assert feed._listener is not None
                pid = feed._listener._conn.info.backend_pid  # type: ignore[union-attr]
                with psycopg.connect(pg_url, autocommit=True) as admin:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                await commit(0)
                await commit(1)
                got: list[dict[str, Any]] = []
                deadline = time.monotonic() + 5
                while len(got) < 2 and time.monotonic() < deadline:
                    got += await _items(hub, client, 5.0)
                assert sorted(i["event"]["device_ids"][0] for i in got) == ["cam-0", "cam-1"]
                assert {i["change"] for i in got} == {"created"}
                # it listens again (a failed listener is retried after a few seconds)
                deadline = time.monotonic() + 10
                while not feed.listening and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                assert feed.listening
                await commit(2)
                got = await _items(hub, client, 1.0)
                assert [(i["change"], i["event"]["device_ids"]) for i in got] == [
                    ("created", ["cam-2"])
                ]
                # nothing was offered twice: the margin the table reads re-read is remembered
                await asyncio.sleep(1.0)
                assert client.queue.empty()
                assert hub.poll_errors == 0
            finally:
                await hub.aclose()

        asyncio.run(scenario())
    finally:
        backend.close()


def test_on_postgresql_a_change_nobody_announced_is_read_from_the_table(
    pg_url: str, tmp_path: Path
) -> None:
    """A writer that changes an event without NOTIFY (a tool, a future code path) is still
    seen, at the next look."""
    backend = PoolBackend("postgres", pg_url, tmp_path)
    try:
        writer = backend.writer(CATALOGUE)
        pipeline = Pipeline(TOPICS, CATALOGUE, GRIDS, backend.snapshots(writer), DecodeLimits())

        async def scenario() -> None:
            hub = StreamHub(CATALOGUE, pg_url, update_interval=0.5, poll_s=0.25)
            hub.bind(asyncio.get_running_loop())
            try:
                client = hub.connect(ADMIN, StreamFilter())
                await asyncio.sleep(0.6)
                alert = make_alert(
                    "cam-0", *interior(grid_in_community(0, 4)), type="crowd_gathering"
                )
                await asyncio.to_thread(writer.commit_batch, _batch(pipeline, alert))
                [created] = await _items(hub, client, 1.0)
                assert created["change"] == "created"
                await asyncio.sleep(0.6)  # past the event's update interval
                with psycopg.connect(pg_url, autocommit=True) as conn:
                    conn.execute(
                        "UPDATE events SET severity = 'critical', version = version + 1,"
                        " change_seq = nextval('pool_change_seq') WHERE id = %s",
                        (created["event"]["event_id"],),
                    )
                [updated] = await _items(hub, client, 1.0)
                assert updated["change"] == "updated"
                assert updated["event"]["severity"] == "critical"
                await asyncio.sleep(0.8)
                assert client.queue.empty()  # offered once
            finally:
                await hub.aclose()

        asyncio.run(scenario())
    finally:
        backend.close()
