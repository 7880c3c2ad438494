"""The pool's write path alone: ``commit_batch`` of 1,000-alert batches on SQLite and on
PostgreSQL, in one run, on the same batches.

Batches are assembled once (decode, geo-tag) from the load generator's templates (devices at
fixed places across the sample area, several warning types), then committed to a fresh pool of
each kind. PostgreSQL runs with each dedup lock mode (``cell``: an advisory lock per type and
coarse cell a batch touches; ``batch``: one lock per batch), with one writer and with two
writers committing different batches at once from two threads (two "replicas", a connection
pool each), first with the batches dealt out in turn (what a shared subscription does), then
with each writer given one half of the area. Prints alerts/s, µs per alert and the batch
commit's p50/p99.

Without ``--pg-url`` a throwaway PostgreSQL 15 is started as the tests start it
(tests/pgsupport.py: run from the repository root).

    python bench/bench_pool.py [--batches 20] [--batch 1000] [--devices 400] [--pg-url URL]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aggregator.grids import GridIndex, default_grid_file
from aggregator.ingest.assemble import Inbound, Pipeline
from aggregator.ingest.decode import DecodeLimits
from aggregator.pool.model import Batch, BatchResult
from aggregator.pool.postgres import LockMode, PgEventPool, migrate
from aggregator.pool.snapshots import SnapshotStore
from aggregator.pool.sqlite import EventPool
from contract import Topics, load_catalogue
from simulators.loadgen import build_templates, machine_description, render, stamp_now

LOCKS: tuple[LockMode, ...] = ("cell", "batch")


def make_batches(args: argparse.Namespace, root: Path) -> list[Batch]:
    grids = GridIndex.from_geojson(default_grid_file())
    catalogue = load_catalogue()
    rng = random.Random(args.seed)
    topics = Topics("cwg")
    devices = [f"cam-{i:04d}" for i in range(args.devices)]
    templates = {d: build_templates(d, 8, rng, grids, catalogue, snapshot=False) for d in devices}
    pipeline = Pipeline(topics, catalogue, grids, SnapshotStore(root / "snap"), DecodeLimits())
    run = uuid.uuid4().hex[:8]
    batches, seq = [], 0
    for _ in range(args.batches):
        stamp = stamp_now()
        msgs = []
        for _ in range(args.batch):
            seq += 1
            device = devices[rng.randrange(len(devices))]
            payload = render(templates[device][seq % 8], f"{run}-{seq}", seq, stamp)
            msgs.append(Inbound(topics.alert(device), payload, time.time(), seq % 65535, 1))
        batches.append(pipeline.assemble(msgs).batch)
    return batches


def timed(commit: Callable[[Batch], BatchResult], batches: Sequence[Batch]) -> list[float]:
    out = []
    for batch in batches:
        t0 = time.perf_counter()
        commit(batch)
        out.append(time.perf_counter() - t0)
    return out


def split_west_east(batches: Sequence[Batch], size: int) -> list[list[Batch]]:
    """The same alerts, regrouped into batches of the western and of the eastern half of the
    devices: two writers that each pool one side of the area (where per-cell locks let them
    run side by side; with the shared subscription's round robin every batch spans the area)."""
    alerts = sorted((a for b in batches for a in b.alerts), key=lambda a: a.lon)
    halves = [alerts[: len(alerts) // 2], alerts[len(alerts) // 2 :]]
    out: list[list[Batch]] = []
    for half in halves:
        half.sort(key=lambda a: a.received_at)
        chunks = [half[i : i + size] for i in range(0, len(half), size)]
        out.append([Batch(alerts=c, seen={a.device_id: a.received_at for a in c}) for c in chunks])
    return out


def concurrently(
    writers: Sequence[PgEventPool], shares: Sequence[Sequence[Batch]]
) -> tuple[float, list[float]]:
    """Each writer commits its share of the batches from a thread of its own, all at once."""
    times: list[list[float]] = [[] for _ in writers]

    def run(k: int) -> None:
        times[k].extend(timed(writers[k].commit_batch, shares[k]))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(writers))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, [t for per in times for t in per]


def report(name: str, alerts: int, wall: float, per_batch: list[float]) -> dict[str, Any]:
    per_batch = sorted(per_batch)
    p99 = per_batch[min(len(per_batch) - 1, round(0.99 * (len(per_batch) - 1)))]
    row = {
        "pool": name,
        "alerts_per_s": round(alerts / wall),
        "us_per_alert": round(wall / alerts * 1e6, 1),
        "batch_p50_ms": round(statistics.median(per_batch) * 1e3, 1),
        "batch_p99_ms": round(p99 * 1e3, 1),
    }
    print(
        f"{name:<48} {row['alerts_per_s']:>8} alerts/s {row['us_per_alert']:>7} µs/alert"
        f"   batch p50 {row['batch_p50_ms']:>6} ms  p99 {row['batch_p99_ms']:>6} ms"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=400)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--pg-url", default=None, help="an empty database (default: start one)")
    args = parser.parse_args()
    catalogue = load_catalogue()
    print(machine_description())
    server = None
    with tempfile.TemporaryDirectory(prefix="cwg-bench-pool-") as tmp:
        root = Path(tmp)
        batches = make_batches(args, root)
        n = sum(len(b.alerts) for b in batches)
        print(f"{len(batches)} batches, {n} alerts ({args.devices} devices)")

        def fresh_pg() -> str:
            if args.pg_url:
                return str(args.pg_url)
            assert server is not None
            url = server.create_database(f"b_{uuid.uuid4().hex[:12]}")
            migrate(url)
            return url

        if not args.pg_url:
            from tests.pgsupport import start_server

            server = start_server()
        try:
            lite = EventPool(root / "pool.db", catalogue)
            t0 = time.perf_counter()
            per = timed(lite.commit_batch, batches)
            report("SQLite (one writer)", n, time.perf_counter() - t0, per)
            lite.close()
            for lock in LOCKS:
                pg = PgEventPool(fresh_pg(), catalogue, lock=lock)
                t0 = time.perf_counter()
                per = timed(pg.commit_batch, batches)
                report(f"PostgreSQL lock={lock}, 1 writer", n, time.perf_counter() - t0, per)
                pg.close()
                for how, shares in (
                    ("round robin", [batches[0::2], batches[1::2]]),
                    ("west|east", split_west_east(batches, args.batch)),
                ):
                    url = fresh_pg()
                    writers = [PgEventPool(url, catalogue, lock=lock) for _ in range(2)]
                    wall, per = concurrently(writers, shares)
                    report(f"PostgreSQL lock={lock}, 2 writers, {how}", n, wall, per)
                    for w in writers:
                        w.close()
        finally:
            if server is not None:
                server.stop()
                shutil.rmtree(server.root, ignore_errors=True)


if __name__ == "__main__":
    main()
