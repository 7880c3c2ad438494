"""The pool's write path alone: ``commit_batch`` of 1,000-alert batches on SQLite and on
PostgreSQL, in one run, on the same batches.

Batches are assembled once (decode, geo-tag) from the load generator's templates (devices at
fixed places across the sample area, several warning types), then committed to a fresh pool of
each kind. PostgreSQL runs with each dedup lock mode (``cell``: an advisory lock per type and
coarse cell a batch touches; ``batch``: one lock per batch), with one writer and with two
writers committing different batches at once from two threads (two "replicas", a connection
pool each), first with the batches dealt out in turn (what a shared subscription does), then
with each writer given one half of the area. Prints alerts/s, µs per alert and the batch
commit's p50/p99, and CPU time per alert: the committing threads' own (``time.thread_time``)
and, for the PostgreSQL this script starts, its server processes' (from /proc); other work on
a busy machine inflates those little, where it stretches the wall-clock figures. The writer
runs with the aggregator's garbage-collector settings (``tune_gc``), as the service does.

Each PostgreSQL run gets a fresh database (``bench/pgserver.py``): on the server of
``--pg-url``, or on a throwaway PostgreSQL 15 started as the tests start it and restarted with
``fsync=on`` (a pool commits as the field does; synchronous_commit stays on).

    python bench/bench_pool.py [--batches 20] [--batch 1000] [--devices 400] [--pg-url URL]
        [--one-writer]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from pgserver import postgres  # bench/ is the script's directory: on sys.path

from aggregator.gctune import tune_gc
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


_TICK: float = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100.0


def postmaster_pid(url: str) -> int | None:
    """The PostgreSQL server's main process, when it runs on this machine (the parent of a
    backend of ours that /proc shows as postgres); None otherwise."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    try:
        assert row is not None
        stat = Path(f"/proc/{int(row[0])}/stat").read_text()
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if Path(f"/proc/{parent}/comm").read_text().strip() in {"postgres", "postmaster"}:
            return parent
    except (OSError, ValueError, IndexError, AssertionError):
        pass
    return None


def server_cpu_s(postmaster: int | None) -> float | None:
    """CPU seconds used so far by a local PostgreSQL: the postmaster's own and its exited
    children's (cutime, cstime), and its running children's (backends, WAL writer, …), read
    from /proc. None where that cannot be read (a remote server, no /proc)."""
    if postmaster is None:
        return None
    try:
        total = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the process ended meanwhile
            # after the name: state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14)
            if int(entry) == postmaster:
                total += sum(int(f) for f in fields[11:15])
            elif int(fields[1]) == postmaster:
                total += int(fields[11]) + int(fields[12])
        return total / _TICK
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Cpu:
    """CPU seconds of the committing threads and of the server over one configuration."""

    client: float = 0.0
    server: float | None = None


def timed(
    commit: Callable[[Batch], BatchResult], batches: Sequence[Batch], cpu: Cpu | None = None
) -> list[float]:
    out = []
    c0 = time.thread_time()
    for batch in batches:
        t0 = time.perf_counter()
        commit(batch)
        out.append(time.perf_counter() - t0)
    if cpu is not None:
        cpu.client += time.thread_time() - c0
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
    writers: Sequence[PgEventPool], shares: Sequence[Sequence[Batch]], cpu: Cpu
) -> tuple[float, list[float]]:
    """Each writer commits its share of the batches from a thread of its own, all at once."""
    times: list[list[float]] = [[] for _ in writers]
    own = [Cpu() for _ in writers]  # one each: the threads never add to one total at once

    def run(k: int) -> None:
        times[k].extend(timed(writers[k].commit_batch, shares[k], own[k]))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(writers))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu.client += sum(c.client for c in own)
    return time.perf_counter() - t0, [t for per in times for t in per]


def report(name: str, alerts: int, wall: float, per_batch: list[float], cpu: Cpu) -> dict[str, Any]:
    per_batch = sorted(per_batch)
    p99 = per_batch[min(len(per_batch) - 1, round(0.99 * (len(per_batch) - 1)))]
    row = {
        "pool": name,
        "alerts_per_s": round(alerts / wall),
        "us_per_alert": round(wall / alerts * 1e6, 1),
        "batch_p50_ms": round(statistics.median(per_batch) * 1e3, 1),
        "batch_p99_ms": round(p99 * 1e3, 1),
        "writer_cpu_us_per_alert": round(cpu.client / alerts * 1e6, 1),
        "server_cpu_us_per_alert": (
            None if cpu.server is None else round(cpu.server / alerts * 1e6, 1)
        ),
    }
    server = "" if cpu.server is None else f" + server {row['server_cpu_us_per_alert']:>6}"
    print(
        f"{name:<44} {row['alerts_per_s']:>7} alerts/s {row['us_per_alert']:>6} µs/alert"
        f"  batch p50 {row['batch_p50_ms']:>6} ms p99 {row['batch_p99_ms']:>6} ms"
        f"  CPU µs/alert: writer {row['writer_cpu_us_per_alert']:>6}{server}"
    )
    return row


def _since(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=400)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--pg-url", default=None, help="an empty database (default: start one)")
    parser.add_argument(
        "--one-writer", action="store_true", help="skip the two-writer configurations"
    )
    args = parser.parse_args()
    if not 1 <= args.batches <= 1000 or not 1 <= args.batch <= 20_000:
        parser.error("--batches must be 1..1,000 and --batch 1..20,000")
    catalogue = load_catalogue()
    print(machine_description())
    with (
        tempfile.TemporaryDirectory(prefix="cwg-bench-pool-") as tmp,
        postgres(args.pg_url) as fresh_database,
    ):
        root = Path(tmp)
        batches = make_batches(args, root)
        n = sum(len(b.alerts) for b in batches)
        print(f"{len(batches)} batches, {n} alerts ({args.devices} devices)")

        def fresh_pg() -> str:
            url = fresh_database()
            migrate(url)
            return url

        tune_gc()  # what Aggregator.start() does
        lite = EventPool(root / "pool.db", catalogue)
        cpu = Cpu()
        t0 = time.perf_counter()
        per = timed(lite.commit_batch, batches, cpu)
        report("SQLite (one writer)", n, time.perf_counter() - t0, per, cpu)
        lite.close()
        for lock in LOCKS:
            url = fresh_pg()
            postmaster = postmaster_pid(url)
            pg = PgEventPool(url, catalogue, lock=lock)
            cpu, s0 = Cpu(), server_cpu_s(postmaster)
            t0 = time.perf_counter()
            per = timed(pg.commit_batch, batches, cpu)
            wall = time.perf_counter() - t0
            cpu.server = _since(s0, server_cpu_s(postmaster))
            report(f"PostgreSQL lock={lock}, 1 writer", n, wall, per, cpu)
            pg.close()
            if args.one_writer:
                continue
            for how, shares in (
                ("round robin", [batches[0::2], batches[1::2]]),
                ("west|east", split_west_east(batches, args.batch)),
            ):
                url = fresh_pg()
                writers = [PgEventPool(url, catalogue, lock=lock) for _ in range(2)]
                cpu, s0 = Cpu(), server_cpu_s(postmaster)
                wall, per = concurrently(writers, shares, cpu)
                cpu.server = _since(s0, server_cpu_s(postmaster))
                report(f"PostgreSQL lock={lock}, 2 writers, {how}", n, wall, per, cpu)
                for w in writers:
                    w.close()


if __name__ == "__main__":
    main()
