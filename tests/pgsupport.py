"""A real PostgreSQL 15 for tests: one cluster per session, one database per test.

``initdb`` and ``pg_ctl`` refuse to run as root, and CI runs as root: they run as the
``postgres`` system user on a folder that user owns. pytest's ``tmp_path`` lies under a 0700
root-owned folder that user cannot enter, so the cluster lives in a ``tempfile.mkdtemp()`` folder
of its own, removed at the end. Each test gets a database copied from a migrated template
(``CREATE DATABASE … TEMPLATE``: a few milliseconds, no migration per test).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_BIN = Path(os.environ.get("CWG_PG_BIN", "/usr/lib/postgresql/15/bin"))
TEMPLATE = "cwg_template"
_INSTALL = (
    "PostgreSQL 15 server binaries not found in {bin}: install them with "
    "`apt-get install postgresql` (scripts/bootstrap.sh test does), or set CWG_PG_BIN"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    """A running cluster on 127.0.0.1, trust authentication for the ``postgres`` role."""

    root: Path
    port: int
    user: str | None  # the system user the server runs as (None: the current one)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def sockets(self) -> Path:
        return self.root / "sock"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        proc = subprocess.run(
            [str(PG_BIN / args[0]), *args[1:]],
            user=self.user,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr.strip()}")

    def init(self) -> None:
        self._run("initdb", "-A", "trust", "-U", "postgres", "--no-sync", "-D", str(self.data))

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
            # replicas' batches take one advisory lock per (type, coarse cell) they touch
            " -c max_locks_per_transaction=256"
        )
        self._run(
            "pg_ctl",
            "-w",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-o",
            options,
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-w", "-D", str(self.data), "-m", "fast", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self, name: str, template: str | None = None) -> str:
        import psycopg  # the tests that need the server need the driver too

        with psycopg.connect(self.url(), autocommit=True) as conn:
            sql = f'CREATE DATABASE "{name}"'
            if template:
                sql += f' TEMPLATE "{template}"'
            conn.execute(sql)
        return self.url(name)


def start_server() -> PgServer:
    if not (PG_BIN / "initdb").exists():
        pytest.fail(_INSTALL.format(bin=PG_BIN), pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="cwg-pg-"))
    user: str | None = None
    if os.geteuid() == 0:
        user = "postgres"
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            shutil.rmtree(root)
            pytest.fail(_INSTALL.format(bin=PG_BIN) + " (no `postgres` system user)", pytrace=False)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    (root / "sock").mkdir()
    if user is not None:
        os.chown(root / "sock", entry.pw_uid, entry.pw_gid)
    server = PgServer(root, _free_port(), user)
    try:
        server.init()
        server.start()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL cluster for the session, with a migrated template database."""
    from aggregator.pool.postgres import migrate

    server = start_server()
    try:
        url = server.create_database(TEMPLATE)
        migrate(url)
        yield server
    finally:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A fresh, migrated database of its own for this test (the pool's ``CWG_POOL_URL``)."""
    # the template must have no open connection while it is copied: migrate() closed its own
    deadline = time.monotonic() + 10
    while True:
        try:
            return pg_server.create_database(f"t_{uuid.uuid4().hex[:16]}", TEMPLATE)
        except Exception as exc:  # "source database is being accessed by other users"
            if "being accessed" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
