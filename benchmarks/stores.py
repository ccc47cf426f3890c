"""Throw-away stores for the benchmarks: a fresh PostgreSQL database or SQLite file per run.

The benchmarks measure against the machine's PostgreSQL at 127.0.0.1:5432 (trust auth, user
postgres) and drop what they made; the tests' ``pg_url`` fixture (tests/conftest.py) makes its
databases here too, under a name of its own, and checks that the benchmarks left none behind.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=5"
BENCH_PREFIX = "tuner_bench_"  # the benchmarks' databases


@contextmanager
def postgres_url(prefix: str = BENCH_PREFIX) -> Iterator[str]:
    """A fresh PostgreSQL database (``prefix`` + a unique suffix) as a storage URL; dropped
    afterwards, its connections and all."""
    import psycopg
    from psycopg import sql

    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def bench_databases() -> set[str]:
    """The benchmarks' databases on the server now (none once they are done)."""
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        rows = admin.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (BENCH_PREFIX + "%",))
        return {name for (name,) in rows}


@contextmanager
def store(kind: str, tmp: Path, prefix: str = "") -> Iterator[str]:
    """A fresh, empty store of `kind` (sqlite | postgres) as a storage URL; SQLite files go in `tmp`."""
    if kind == "postgres":
        with postgres_url() as url:
            yield url
    else:
        yield f"sqlite:///{tmp / f'{prefix}{uuid.uuid4().hex[:8]}.db'}"
