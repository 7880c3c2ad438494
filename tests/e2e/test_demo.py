"""`gateway demo` end to end: the README's first command, run for a few seconds."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

from aggregator.pool.sqlite import connect


def _mosquittos_under(path: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if "mosquitto" in line and str(path) in line]


def test_demo_shows_events_and_leaves_nothing_running(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "aggregator.cli", "demo", "--data-dir", str(tmp_path)),
            *("--devices", "9", "--rate", "6", "--http-port", "0", "--duration", "60"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
        start_new_session=True,
    )
    pool_path = tmp_path / "demo" / "data" / "pool.db"
    try:
        deadline = time.monotonic() + 45
        events = merged = 0
        while time.monotonic() < deadline and (events < 5 or merged < 1):
            time.sleep(0.5)
            if pool_path.exists():
                with closing(connect(pool_path, readonly=True)) as db:
                    try:
                        events = db.execute("SELECT count(*) FROM events").fetchone()[0]
                        merged = db.execute(
                            "SELECT count(*) FROM alerts WHERE outcome='merged'"
                        ).fetchone()[0]
                    except sqlite3.OperationalError:  # the schema is not there yet
                        pass
        assert events >= 5, "the demo registered too few events"
        # the demo fleet's multi-device incidents merge into one event
        assert merged >= 1, "no alert was merged into an open event"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        output, _ = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    text = output.decode("utf-8", "replace")
    assert proc.returncode == 0, text[-3000:]
    assert "dashboard http://127.0.0.1:" in text
    assert "latest events" in text
    assert "feedback accepted" in text  # the fleet's summary at the end
    assert _mosquittos_under(tmp_path) == []
    with closing(connect(pool_path, readonly=True)) as db:
        devices = db.execute("SELECT count(*) FROM devices").fetchone()[0]
    assert devices >= 5
