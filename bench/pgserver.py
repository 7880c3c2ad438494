"""PostgreSQL for the benchmarks: fresh pool databases on a given server, or on a throwaway
PostgreSQL 15 started as the tests start it (``tests/pgsupport.py``) and restarted with
``fsync=on``: the test server runs without it, and a benchmark commits as the field does."""

from __future__ import annotations

import contextlib
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aggregator.config import redact_pool_url

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def postgres(url: str | None) -> Iterator[Callable[[], str]]:
    """A maker of fresh PostgreSQL pool URLs: databases created on the server of ``url``, or
    on a throwaway server (``tests/pgsupport.py``) restarted with fsync on."""
    import psycopg

    server: Any = None
    if url is None:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))  # tests/ is not an installed package
        from tests.pgsupport import start_server

        server = start_server()
        # The test server runs with fsync=off (tests need no durability); a benchmark of the
        # pool commits as the field does. Restarted with the same options but fsync.
        server.stop()
        server._run(
            "pg_ctl", "-w", "-D", str(server.data), "-l", str(server.root / "log"), "-o",
            f"-p {server.port} -k {server.sockets} -c listen_addresses=127.0.0.1"
            " -c max_locks_per_transaction=256 -c fsync=on",
            "start",
        )  # fmt: skip
        url = server.url()
    base = url
    created: list[str] = []

    def fresh() -> str:
        name = f"bench_{uuid.uuid4().hex[:10]}"
        try:
            with psycopg.connect(base, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
        except psycopg.Error as exc:
            print(
                f"PostgreSQL: cannot create a database ({type(exc).__name__}); runs share "
                f"{redact_pool_url(base)}, told apart by their alert ids"
            )
            return base
        created.append(name)
        return _as_url(base, name)

    try:
        yield fresh
    finally:
        with contextlib.suppress(psycopg.Error), psycopg.connect(base, autocommit=True) as conn:
            for name in created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop()
            shutil.rmtree(server.root, ignore_errors=True)


def _as_url(url: str, dbname: str) -> str:
    """``url`` with its database replaced (query string kept)."""
    head, _, query = url.partition("?")
    scheme, _, rest = head.partition("://")
    authority = rest.split("/", 1)[0]
    return f"{scheme}://{authority}/{dbname}" + (f"?{query}" if query else "")
