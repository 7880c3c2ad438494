"""Aggregator replicas on one PostgreSQL pool, for tests/e2e/test_pg_replicas.py: each replica
is ``gateway run`` as a process of its own (so SIGKILL is a real crash), with its own data
directory and MQTT session, on one shared subscription, all writing the same database
(``CWG_POOL_URL``). The test reads the pool with SQL of its own and each replica's work from
its own Prometheus metrics (the pool does not record which writer committed a batch).
"""

from __future__ import annotations

import math
import re
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from aggregator.grids import GridIndex, default_grid_file

from .ingest_kit import AggregatorProcess, Tally

if TYPE_CHECKING:
    from tests.conftest import BrokerHandle

SHARE_GROUP = "cwg-replicas"
GRIDS = GridIndex.from_geojson(default_grid_file())
_METRICS_AT = re.compile(r"ingest metrics on http://127\.0\.0\.1:(\d+)/metrics")
_M_PER_DEG = 111_320.0
_CONNECTED = "connected session_present="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def offset(
    lat: float, lon: float, north_m: float = 0.0, east_m: float = 0.0
) -> tuple[float, float]:
    return lat + north_m / _M_PER_DEG, lon + east_m / (_M_PER_DEG * math.cos(math.radians(lat)))


def places(n: int, spacing_m: float) -> list[tuple[float, float]]:
    """``n`` points inside the sample grids, at least ``spacing_m`` apart (a lattice over the
    area, keeping the points a grid covers)."""
    union = GRIDS.grids[0].polygon
    for g in GRIDS.grids[1:]:
        union = union.union(g.polygon)
    lon0, lat0, lon1, lat1 = union.bounds
    step_lat = spacing_m / _M_PER_DEG
    step_lon = spacing_m / (_M_PER_DEG * math.cos(math.radians((lat0 + lat1) / 2)))
    found: list[tuple[float, float]] = []
    lat = lat0 + step_lat / 2
    while lat < lat1 and len(found) < n:
        lon = lon0 + step_lon / 2
        while lon < lon1 and len(found) < n:
            if GRIDS.locate(lat, lon) is not None:
                found.append((lat, lon))
            lon += step_lon
        lat += step_lat
    assert len(found) == n, f"only {len(found)} places {spacing_m} m apart in the sample area"
    return found


class Replica(AggregatorProcess):
    """One replica: ``gateway run --share-group … --metrics-port 0`` on ``CWG_POOL_URL``."""

    def __init__(
        self,
        broker: BrokerHandle,
        root: Path,
        name: str,
        pool_url: str,
        *,
        http_port: int | None = None,
        **env: str,
    ) -> None:
        args = ["--share-group", SHARE_GROUP, "--metrics-port", "0"]
        if http_port is not None:
            args += ["--http-port", str(http_port)]
        super().__init__(
            broker,
            root / f"replica-{name}",
            client_id=f"cwg-replica-{name}",
            args=args,
            CWG_POOL_URL=pool_url,
            **env,
        )
        self.name = name
        self.http_port = http_port
        self._mark = 0
        self._metrics_port: int | None = None

    def start(self) -> None:
        self._mark = self.log.stat().st_size if self.log.exists() else 0
        self._metrics_port = None
        super().start()

    def since_start(self) -> str:
        if not self.log.exists():
            return ""
        with self.log.open("rb") as f:
            f.seek(self._mark)
            return f.read().decode(errors="replace")

    def metrics_port(self) -> int | None:
        if self._metrics_port is None:
            found = _METRICS_AT.search(self.since_start())
            if found:
                self._metrics_port = int(found.group(1))
        return self._metrics_port

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """This replica's ingest metrics: (sample name, sorted labels) → value."""
        port = self.metrics_port()
        if port is None or not self.alive():
            return {}
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return {}
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def pooled(self) -> int:
        """Alerts this replica has committed since it started (every outcome)."""
        return int(sum(v for (n, _), v in self.metrics().items() if n == "cwg_alerts_total"))

    def outcomes(self) -> dict[str, int]:
        """Alerts this replica has committed since it started, by outcome."""
        return {
            dict(labels)["outcome"]: int(v)
            for (n, labels), v in self.metrics().items()
            if n == "cwg_alerts_total"
        }

    def events_created(self) -> int:
        return int(self.metrics().get(("cwg_events_created_total", ()), 0.0))


@contextmanager
def replicas(
    broker: BrokerHandle,
    root: Path,
    pool_url: str,
    *,
    names: Sequence[str] = ("a", "b", "c"),
    http: Sequence[str] = (),
    timeout: float = 60.0,
) -> Iterator[dict[str, Replica]]:
    """Start one replica per name (those in ``http`` with the operator API on a free port);
    return once every one is connected to the broker, stop them all afterwards."""
    started = {
        n: Replica(broker, root, n, pool_url, http_port=free_port() if n in http else None)
        for n in names
    }
    try:
        for r in started.values():
            r.start()
        for r in started.values():
            wait_ready(r, timeout)
        yield started
    finally:
        for r in started.values():
            r.stop()


def wait_ready(r: Replica, timeout: float = 60.0) -> None:
    """Until the replica has connected to the broker (and so sent its SUBSCRIBE) and serves
    its metrics. (Its ``cwg_broker_connected`` gauge turns 1 at the CONNACK, just before the
    SUBSCRIBE goes out: the log line, written after it, is the sign.)
    """
    deadline = time.monotonic() + timeout
    while not (_CONNECTED in r.since_start() and r.metrics()):
        if not r.alive():
            raise AssertionError(f"replica {r.name} exited:\n{r.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"replica {r.name} not connected in {timeout} s:\n{r.output()}")
        time.sleep(0.1)
    time.sleep(0.3)  # the broker has the SUBSCRIBE, sent just before the line, in well under this


# ---------------------------------------------------------------------------- the pool, read


@contextmanager
def pool(url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        yield conn


def scalar(url: str, query: str, *params: Any) -> Any:
    with pool(url) as conn:
        row = conn.execute(query.encode(), params).fetchone()
    return row[0] if row else None


def rows(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with pool(url) as conn:
        return list(conn.execute(query.encode(), params).fetchall())


def try_scalar(url: str, query: str, *params: Any) -> Any:
    """``scalar``, or None while the server is away (restarting)."""
    try:
        return scalar(url, query, *params)
    except psycopg.OperationalError:
        return None


def pg_tally(url: str, device_ids: Sequence[str], raised: Sequence[str]) -> Tally:
    """The pool against what the devices raised, by alert_id (and per device by seq)."""
    with pool(url) as conn:
        rows = conn.execute(
            "SELECT alert_id, device_id, seq FROM alerts WHERE device_id = ANY(%s)",
            (list(device_ids),),
        ).fetchall()
    ids = [str(r[0]) for r in rows]
    seqs = [(str(r[1]), int(r[2])) for r in rows]
    want = set(raised)
    return Tally(
        raised=len(raised),
        stored=len(rows),
        lost=len(want - set(ids)),
        doubled=len(ids) - len(set(ids)) + len(seqs) - len(set(seqs)),
        unknown=len(set(ids) - want),
    )


def pooled_of(url: str, device_ids: Sequence[str]) -> int | None:
    """Alerts of these devices in the pool (None while the server is away)."""
    n = try_scalar(url, "SELECT count(*) FROM alerts WHERE device_id = ANY(%s)", list(device_ids))
    return None if n is None else int(n)


def poll(seconds: float, every: float = 0.05) -> Iterator[float]:
    """Loop for at most ``seconds``: yields the time elapsed at each turn."""
    t0 = time.monotonic()
    while (elapsed := time.monotonic() - t0) < seconds:
        yield elapsed
        time.sleep(every)
