"""A fault matrix, bounded (a few minutes in all): each row injects one fault into a running
stack (Mosquitto, ``gateway run`` as a process, a device raising alerts through the edge
outbox and publisher or a whole ``edge-agent`` process), clears it, and ends with the pool
holding every alert raised exactly once: 0 lost, 0 doubled. Recovery is the time from the
fault's end until the pool holds every alert raised until then; ``pytest -s`` shows each row
and a table at the end.

| row | fault | cleared by |
|---|---|---|
| broker restart ×3 | Mosquitto stopped (SIGTERM, state saved) | starting it again |
| aggregator SIGKILL ×3 | ``gateway run`` killed mid-stream | starting it again |
| edge SIGKILL ×3 | ``edge-agent run`` killed mid-stream | starting it again (same state) |
| disk full | the pool's file system (a tmpfs) filled to the last byte | deleting the filler |
| pool locked | another process holds the pool's write lock past the busy timeout | releasing it |
| pool unwritable | pool files immutable (``chattr +i``: root cannot bypass it) at a | clearing |
|   | (re)start of the aggregator; supervised, it is started again each second | the flag |

Why the unwritable pool is met at a (re)start: Linux checks immutability when a file is
opened, and the running writer's open descriptors keep writing (checked here), while a
read-only remount is refused as long as any file is open for writing. A fresh process,
as after a crash or an upgrade, is where an unwritable pool really shows.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .ingest_kit import (
    AggregatorProcess,
    AlertStream,
    EdgeAgentProcess,
    caught_up,
    fast_dir,
    tally,
    wait_for,
)

if TYPE_CHECKING:
    from tests.conftest import BrokerHandle

DEVICE = "sensor-001"
RATE = 200  # alerts/s from the device while faults come and go
RECOVERY_LIMIT_S = 40.0
_FAULT_LOG = "the pool could not commit"
_LOCK_HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
db.execute("ROLLBACK")
"""


@dataclass
class Row:
    name: str
    raised: int = 0
    stored: int = 0
    lost: int = -1
    doubled: int = -1
    recoveries: list[float] = field(default_factory=list)
    lag_s: float = 0.0  # from the device's last answer until the pool held every alert
    note: str = ""


ROWS: list[Row] = []


@pytest.fixture(scope="module", autouse=True)
def matrix_table() -> Iterator[None]:
    yield
    if not ROWS:
        return
    lines = [
        "",
        "fault matrix",
        f"{'row':<24} {'raised':>7} {'stored':>7} {'lost':>5} {'doubled':>8} {'lag s':>6}"
        "  recovery (s)",
    ]
    for r in ROWS:
        rec = ", ".join(f"{s:.1f}" for s in r.recoveries) or "-"
        lines.append(
            f"{r.name:<24} {r.raised:>7} {r.stored:>7} {r.lost:>5} {r.doubled:>8}"
            f" {r.lag_s:>6.2f}  {rec}" + (f"  ({r.note})" if r.note else "")
        )
    print("\n".join(lines))


def report(row: Row) -> None:
    ROWS.append(row)
    print(
        f"\n{row.name}: raised {row.raised}, stored {row.stored}, lost {row.lost}, doubled "
        f"{row.doubled}, recovery {[round(s, 2) for s in row.recoveries]} s, answered→pool "
        f"lag {row.lag_s:.2f} s {row.note}"
    )


def log_mark(agg: AggregatorProcess) -> int:
    return agg.log.stat().st_size if agg.log.exists() else 0


def log_since(agg: AggregatorProcess, mark: int) -> str:
    with agg.log.open("rb") as f:
        f.seek(mark)
        return f.read().decode(errors="replace")


@dataclass
class Stack:
    broker: BrokerHandle
    agg: AggregatorProcess
    stream: AlertStream


@contextlib.contextmanager
def stack(broker: BrokerHandle, tmp_path: Path, agg_dir: Path | None = None) -> Iterator[Stack]:
    agg = AggregatorProcess(broker, agg_dir or tmp_path / "agg")
    agg.start()
    with fast_dir(tmp_path / "edge") as edge_dir:
        stream = AlertStream(broker, DEVICE, edge_dir / "outbox.db", feedback_timeout_s=2.0)
        try:
            wait_for(agg.pool.exists, 20, f"the aggregator's pool:\n{agg.output()}")
            stream.start()
            wait_for(stream.publisher.connected.is_set, 10, "the device's connection")
            yield Stack(broker, agg, stream)
        finally:
            stream.stop()
            agg.stop()


def run_row(
    s: Stack,
    name: str,
    inject: Callable[[], None],
    clear: Callable[[], None],
    *,
    repeats: int,
    gap_s: float = 2.0,
    note: Callable[[], str] = lambda: "",
) -> Row:
    """Alerts flow at RATE; ``repeats`` times: inject, clear, time the catch-up. Then count."""
    row = Row(name)
    s.stream.produce(RATE, 600)
    try:
        for _ in range(repeats):
            time.sleep(gap_s)
            inject()
            clear()
            cleared = time.monotonic()
            n = len(s.stream.ids)
            wait_for(
                lambda n=n: caught_up(s.agg.pool, DEVICE, n),
                RECOVERY_LIMIT_S,
                f"{name}: the pool catching up with {n} alerts\n{s.agg.output()}",
            )
            row.recoveries.append(time.monotonic() - cleared)
        time.sleep(gap_s)
    finally:
        s.stream.finish()
    wait_for(lambda: s.stream.outbox.depth() == 0, 60, f"{name}: every alert answered")
    # Feedback is sent after the commit, so the pool should hold every answered alert at once;
    # how long it took is printed (a lag would mean an answer ran ahead of its commit).
    answered = time.monotonic()
    wait_for(lambda: caught_up(s.agg.pool, DEVICE, len(s.stream.ids)), 10, "the last commits")
    row.lag_s = time.monotonic() - answered
    t = tally(s.agg.pool, DEVICE, list(s.stream.ids))
    row.raised, row.stored, row.lost, row.doubled = t.raised, t.stored, t.lost, t.doubled
    row.note = note()
    report(row)
    assert (t.lost, t.doubled, t.unknown) == (0, 0, 0), row
    assert t.raised > RATE * gap_s * repeats * 0.5, row  # alerts really flowed
    return row


@pytest.mark.slow
def test_broker_restart_x3(broker: BrokerHandle, tmp_path: Path) -> None:
    with stack(broker, tmp_path) as s:

        def inject() -> None:
            broker.stop()
            time.sleep(1.0)

        run_row(s, "broker restart x3", inject, broker.start, repeats=3)


@pytest.mark.slow
def test_aggregator_sigkill_x3(broker: BrokerHandle, tmp_path: Path) -> None:
    with stack(broker, tmp_path) as s:

        def inject() -> None:
            s.agg.kill()
            time.sleep(1.0)

        run_row(s, "aggregator SIGKILL x3", inject, s.agg.start, repeats=3)


@pytest.mark.slow
def test_edge_sigkill_x3(broker: BrokerHandle, tmp_path: Path) -> None:
    agg = AggregatorProcess(broker, tmp_path / "agg")
    agg.start()
    rate, episodes = 50, 300  # one run raises 300 alerts in 6 s
    agent = EdgeAgentProcess(broker, DEVICE, tmp_path / "edge", rate=rate, episodes=episodes)
    row = Row("edge SIGKILL x3")
    try:
        wait_for(agg.pool.exists, 20, f"the aggregator's pool:\n{agg.output()}")
        agent.start()
        for i in range(3):
            before = agent.raised()
            wait_for(
                lambda before=before: agent.raised() >= before + 60,
                30,
                f"alerts raised\n{agent.output()}",
            )
            agent.kill()
            n = agent.raised()
            agent.start(exit_when_done=i == 2)  # the last run ends by itself, outbox drained
            started = time.monotonic()
            wait_for(
                lambda n=n: caught_up(agg.pool, DEVICE, n),
                RECOVERY_LIMIT_S,
                f"the pool catching up with {n} alerts\n{agent.output()}",
            )
            row.recoveries.append(time.monotonic() - started)
        assert agent.proc is not None
        assert agent.proc.wait(60) == 0, agent.output()
        raised = agent.raised()
        assert agent.undelivered() == 0, "the last run exited with alerts unanswered"
        answered = time.monotonic()
        wait_for(lambda: caught_up(agg.pool, DEVICE, raised), 10, "every alert in the pool")
        row.lag_s = time.monotonic() - answered
        t = tally(agg.pool, DEVICE, raised)
        row.raised, row.stored, row.lost, row.doubled = t.raised, t.stored, t.lost, t.doubled
        row.note = "recovery counted from the restart of the agent process"
        report(row)
        assert (t.lost, t.doubled, t.unknown) == (0, 0, 0), row
        assert raised >= episodes, row
    finally:
        agent.kill()
        agg.stop()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs for the aggregator's data: a disk that really fills."""
    where = tmp_path / "smallfs"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(fs: Path) -> Path:
    """Write a filler file until the file system has not a byte left."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
def test_disk_full(broker: BrokerHandle, tmp_path: Path, small_fs: Path) -> None:
    with stack(broker, tmp_path, agg_dir=small_fs / "agg") as s:
        seen: list[int] = []

        def inject() -> None:
            mark = log_mark(s.agg)
            fill(small_fs)
            # The fault bites once the WAL must grow: wait until the writer has met it.
            wait_for(
                lambda: _FAULT_LOG in log_since(s.agg, mark),
                30,
                f"the writer meeting the full disk\n{s.agg.output()}",
            )
            time.sleep(2.0)
            seen.append(log_since(s.agg, mark).count(_FAULT_LOG))

        def clear() -> None:
            (small_fs / "filler").unlink()

        run_row(
            s,
            "disk full",
            inject,
            clear,
            repeats=1,
            note=lambda: f"{sum(seen)} refused commits retried",
        )


@pytest.mark.slow
def test_pool_locked(broker: BrokerHandle, tmp_path: Path) -> None:
    with stack(broker, tmp_path) as s:
        holder: list[subprocess.Popen[str]] = []
        seen: list[int] = []

        def inject() -> None:
            mark = log_mark(s.agg)
            # Another process takes the write lock and keeps it past the writer's busy timeout.
            # (A process of its own: a connection in this one would share SQLite's per-process
            # lock and shared-memory state with the test's readers.)
            proc = subprocess.Popen(
                [sys.executable, "-c", _LOCK_HOLDER, str(s.agg.pool)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            holder.append(proc)
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "locked"
            wait_for(
                lambda: _FAULT_LOG in log_since(s.agg, mark),
                30,
                f"the writer meeting the lock\n{s.agg.output()}",
            )
            seen.append(log_since(s.agg, mark).count(_FAULT_LOG))

        def clear() -> None:
            proc = holder.pop()
            assert proc.stdin is not None
            proc.stdin.close()  # it rolls back and exits
            assert proc.wait(10) == 0

        run_row(
            s,
            "pool locked",
            inject,
            clear,
            repeats=1,
            note=lambda: f"{sum(seen)} refused commits retried",
        )


def chattr(flag: str, paths: list[Path]) -> None:
    done = subprocess.run(
        ["chattr", flag, *[str(p) for p in paths if p.exists()]],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"chattr {flag} failed (needs root and e2fsprogs): {done.stderr.strip()}")


@pytest.mark.slow
def test_pool_unwritable(broker: BrokerHandle, tmp_path: Path) -> None:
    if shutil.which("chattr") is None:
        pytest.fail("chattr is missing: apt-get install -y e2fsprogs")
    with stack(broker, tmp_path) as s:
        pool = s.agg.pool
        files = [pool.parent, pool, Path(f"{pool}-wal"), Path(f"{pool}-shm")]
        starts: list[float] = []
        immutable = threading.Event()
        done = threading.Event()

        def supervise() -> None:
            # As systemd's Restart=always would: whenever it exits, start it again.
            while not done.wait(0.5):
                if not s.agg.alive():
                    if immutable.is_set():
                        starts.append(time.monotonic())
                    s.agg.start()

        supervisor = threading.Thread(target=supervise, name="supervisor", daemon=True)

        def inject() -> None:
            mark = log_mark(s.agg)
            s.agg.kill()
            chattr("+i", files)
            immutable.set()
            supervisor.start()
            time.sleep(6.0)  # it must lose nothing whether it waits or exits meanwhile
            assert log_since(s.agg, mark).strip(), "the aggregator said nothing"

        def clear() -> None:
            chattr("-i", files)
            immutable.clear()

        try:
            run_row(
                s,
                "pool unwritable",
                inject,
                clear,
                repeats=1,
                note=lambda: f"{len(starts)} starts while immutable",
            )
        finally:
            done.set()
            if supervisor.is_alive():
                supervisor.join(10)
            chattr("-i", files)
