"""`gateway demo` with its simulated community operators and departments: cases are verified,
whistled, accepted, handled, sent back and closed while it runs, so the handling tab has living
figures; Ctrl-C still leaves nothing running."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import httpx

from aggregator.pool.sqlite import connect


def _actions(pool: Path) -> Counter[str]:
    if not pool.exists():
        return Counter()
    with closing(connect(pool, readonly=True)) as db:
        try:
            rows = db.execute("SELECT action, count(*) FROM case_audit GROUP BY action").fetchall()
        except sqlite3.OperationalError:  # the schema is not there yet
            return Counter()
    return Counter({str(a): int(n) for a, n in rows})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _figures(port: int) -> dict[str, object]:
    """What the dashboard's handling tab shows: the figures by department, as admin/admin."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        r = http.post("/api/v1/auth/token", json={"username": "admin", "password": "admin"})
        r.raise_for_status()
        auth = {"Authorization": f"Bearer {r.json()['access_token']}"}
        r = http.get("/api/v1/cases/metrics", params={"by": "department"}, headers=auth)
        r.raise_for_status()
        total: dict[str, object] = r.json()["total"]
        return total


def test_demo_operators_work_the_cases(tmp_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "aggregator.cli", "demo", "--data-dir", str(tmp_path)),
            *("--devices", "9", "--rate", "4", "--http-port", str(port), "--duration", "90"),
            *("--case-speed", "1200"),  # twenty case-clock minutes a second
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
        start_new_session=True,
    )
    pool = tmp_path / "demo" / "data" / "pool.db"
    wanted = ("verify", "whistle", "accept_feedback", "send_back")
    try:
        deadline = time.monotonic() + 75
        actions: Counter[str] = Counter()
        while time.monotonic() < deadline and not all(actions[a] for a in wanted):
            time.sleep(1)
            actions = _actions(pool)
        assert all(actions[a] for a in wanted), actions
        assert actions["accept_off_site"] + actions["accept_on_site"] >= 1, actions
        # what the dashboard's handling tab reads has figures: cases registered and handled
        total = _figures(port)
        assert isinstance(total["handled"], int)
        assert total["handled"] >= 1, total
        assert total["registered"] != 0, total
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    text = output.decode("utf-8", "replace")
    assert proc.returncode == 0, text[-3000:]
    assert "simulated operators and departments on a case clock 1200×" in text
    assert "case steps: " in text
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True)
    assert not [line for line in ps.stdout.splitlines() if str(tmp_path) in line]
