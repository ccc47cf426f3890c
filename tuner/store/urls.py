"""Storage URL -> Optuna ``RDBStorage``: SQLite (one host) or PostgreSQL (many hosts); URL masking.

Two kinds of URL are accepted:

* ``sqlite:///relative/or/absolute.db`` (the default, ``storage/tuner.db``). The file is put in WAL
  mode and every connection waits up to 60 s for a lock, so several worker processes on one host can
  write at once without "database is locked". Commits do not wait for the disk (``synchronous=NORMAL``,
  SQLite's advice for WAL: ~4 ms less per report): a crash of the process loses nothing, a power
  loss may lose the last commits (the heartbeat retry re-runs those epochs), never the file.
* ``postgresql+psycopg://USER:PASS@HOST[:PORT]/DB`` (``postgresql://`` is rewritten to psycopg 3).
  Each worker process keeps a small pool (2 + 4 overflow) whose connections are pinged before use.

Every problem is a one-line :class:`TunerError` that names the URL with its password masked and the
cause. Passwords never reach a message: the driver's text is mapped to a cause and masked again.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy.engine import URL, make_url

from tuner.errors import TunerError
from tuner.store.cache import CachedStorage
from tuner.store.retry import RetryingRDBStorage, caused_by, retry_transient

__all__ = ["DEFAULT_URL", "check_storage", "mask_secrets", "mask_url", "open_storage", "store_exists"]

DEFAULT_URL = "sqlite:///storage/tuner.db"
SQLITE_BUSY_TIMEOUT_S = 60  # how long a SQLite connection waits for another process's write lock
PG_CONNECT_TIMEOUT_S = 10
_SCHEMA_RACE_TRIES = 5  # opening a brand-new store while other processes create its schema too
_FIX = "use sqlite:///PATH or postgresql+psycopg://USER:PASS@HOST/DB"
_SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file

# Driver message (regex, case-insensitive) -> cause. Fields: where=host:port, host, user, name=group.
_PG_CAUSES: dict[str, str] = {
    r"connection refused": "cannot reach PostgreSQL at {where} (connection refused); check host/port or start the server",
    r"timeout expired|timed out": "cannot reach PostgreSQL at {where} (no answer within %d s); check host/port and "
    "firewalls" % PG_CONNECT_TIMEOUT_S,
    r"failed to resolve host|could not translate host|name or service not known": "cannot resolve host '{host}'; check it",
    r'database "(?P<name>[^"]*)" does not exist': "database '{name}' does not exist at {where}; create it "
    "(createdb {name}) or fix DB in the URL",
    r'role "(?P<name>[^"]*)" does not exist': "user '{name}' does not exist at {where}; fix USER or create the role",
    r"password authentication failed": "password authentication failed for user '{user}'; check USER:PASS",
    r"no password supplied|fe_sendauth": "the server wants a password for user '{user}'; give USER:PASS@HOST",
    r"no pg_hba\.conf entry": "the server refuses user '{user}' from this host (pg_hba.conf); allow it there",
    r"too many connections|remaining connection slots": "PostgreSQL at {where} has too many connections; run fewer "
    "workers or raise max_connections",
}
_SQLITE_CAUSES: dict[str, str] = {
    r"unable to open database file": "cannot open '{path}'; check that its folder exists and is writable",
    r"file is not a database": "'{path}' is not a SQLite database; point the URL at another file",
    r"database is locked": "'{path}' stayed locked for over %d s by another process (a network file system cannot "
    "share SQLite: use PostgreSQL)" % SQLITE_BUSY_TIMEOUT_S,
    r"readonly|read-only": "'{path}' is read-only; make it and its folder writable",
}


def mask_url(url: str) -> str:
    """``url`` with its password shown as ``***``; never raises, whatever the input."""
    url = str(url)
    try:
        parsed = make_url(url)
    except Exception:  # not a URL SQLAlchemy can parse: masked by hand below
        parsed = None
    if parsed is not None and parsed.password is None:
        return url  # nothing to hide: shown as typed
    # An unescaped '@' in a password makes SQLAlchemy split it wrongly (part of it would show as
    # the host), so with more than one '@' everything up to the last '@' is masked by hand.
    if parsed is not None and url.count("@") <= 1:
        return parsed.render_as_string(hide_password=True)
    parts = _split_password(url)
    return url if parts is None else f"{parts[0]}***{parts[2]}"


def mask_secrets(text: str, url: str) -> str:
    """``text`` with ``url`` masked and its password (raw or percent-decoded) replaced by ``***``.

    Every occurrence of the password is replaced, even inside other words: a short password can
    mangle a message, never leak through it.
    """
    text, url = str(text), str(url)
    if url:
        text = text.replace(url, mask_url(url))
    secrets = {(_split_password(url) or ("", "", ""))[1]}  # as typed (maybe percent-encoded)
    with contextlib.suppress(Exception):
        secrets.add(make_url(url).password)
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = 10,
    grace_period: int | None = 30,
    max_retry: int | None = 3,
    retry_log: Callable[[str], None] | None = None,
) -> CachedStorage:
    """Open (creating tables, and for SQLite the file and its folder) the storage at ``url``.

    Trials whose heartbeat is older than ``grace_period`` seconds are failed by
    ``optuna.storages.fail_stale_trials`` and re-queued as WAITING copies (up to ``max_retry``
    times, ``None``: forever) that keep their intermediate values. ``heartbeat_interval=None``
    turns heartbeats off. Workers using ask/tell must call ``storage.record_heartbeat(trial_id)``
    and ``fail_stale_trials(study)`` themselves: Optuna does both only inside ``study.optimize``.

    ``retry_log``: workers pass their log to ride over a store outage (a PostgreSQL restart, a
    locked SQLite file): each store call is retried with backoff for up to a minute, one masked line
    per retry (:mod:`tuner.store.retry`). None: fail at once, for one-shot commands a user is watching.

    The RDBStorage comes behind a :class:`~tuner.store.cache.CachedStorage` (finished trials
    kept in memory, few queries per epoch; attributes such as ``engine`` are the RDBStorage's).
    """
    parsed = _parse(url)
    for name, value in (("heartbeat_interval", heartbeat_interval), ("grace_period", grace_period)):
        if value is not None and value <= 0:
            raise TunerError(f"{name} must be a positive number of seconds or None, but got {value}")
    if parsed.get_backend_name() == "sqlite":
        engine_kwargs = _prepare_sqlite(Path(parsed.database), url)
    else:
        engine_kwargs = {
            "pool_pre_ping": True,  # a connection dropped during a long epoch is replaced, not used
            "pool_size": 2,  # one worker process: the ask/tell thread and the heartbeat thread
            "max_overflow": 4,
            "connect_args": {"connect_timeout": PG_CONNECT_TIMEOUT_S},
        }
    # RDBStorage fills the URL as a str.format template ({SCHEMA_VERSION}): double the braces so a
    # '{' in a path or database name stays literal.
    rendered = parsed.render_as_string(hide_password=False).replace("{", "{{").replace("}", "}}")
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; we rely on them
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=max_retry, inherit_intermediate_values=True
        )
        retrying = {} if retry_log is None else {
            "log": retry_log, "describe": lambda e: str(_connect_error(url, parsed, e)),
        }
        try:
            for attempt in range(_SCHEMA_RACE_TRIES):
                try:
                    backend = (RetryingRDBStorage if retry_log else optuna.storages.RDBStorage)(
                        rendered,
                        **retrying,
                        engine_kwargs=engine_kwargs,
                        heartbeat_interval=heartbeat_interval,
                        grace_period=grace_period,
                        heartbeat_stale_trial_callback=retry,
                    )
                    break
                except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
                    if attempt + 1 == _SCHEMA_RACE_TRIES or not _lost_schema_race(e):
                        raise
                    time.sleep(0.1 * (attempt + 1))  # the winner's create/stamp commits, then we find it done
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            raise _connect_error(url, parsed, e) from None
        except RuntimeError as e:  # schema written by another Optuna version: the text says the fix
            raise TunerError(_one_line(url, str(e))) from None
    if parsed.get_backend_name() == "sqlite":
        _sync_normal(backend.engine)
    return CachedStorage(backend, retry=None if retry_log is None else (
        lambda call, what: retry_transient(call, what, log=retry_log, describe=retrying["describe"])))


def _lost_schema_race(error: BaseException) -> bool:
    """Whether ``error`` is another process creating the same new store's schema at the same moment.

    Optuna creates the tables (check, then CREATE) and stamps the schema version (an INSERT on a
    unique key) without a lock, so two workers opening a brand-new store at once can collide: the
    loser sees "table ... already exists" or a unique-key violation. The schema is then complete or
    about to be, so opening again succeeds; any other error is not retried.
    """
    return caused_by(error, lambda e: isinstance(e, sqlalchemy.exc.IntegrityError)
                     or "already exists" in str(e).lower())


def check_storage(url: str) -> None:
    """Raise TunerError unless ``url`` is supported and reachable; creates no file, folder or table.

    PostgreSQL: connects once (``SELECT 1``) with the same driver and timeout as ``open_storage``.
    SQLite: if the file exists, it must be a readable and writable SQLite file (checked by its
    16-byte header, without opening it) in a writable folder (WAL adds ``-wal``/``-shm`` files
    beside it); if not, its folder, or the nearest existing parent of that folder, must be a
    writable folder so ``open_storage`` can create the rest.
    """
    parsed = _parse(url)
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite(Path(parsed.database), url)
        return
    connect_args = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    engine = sqlalchemy.create_engine(parsed, poolclass=sqlalchemy.pool.NullPool, connect_args=connect_args)
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise _connect_error(url, parsed, e) from None
    finally:
        engine.dispose()


def store_exists(url: str) -> bool:
    """False only for a SQLite file that is not there yet: readers and joiners must not create one
    (a typo in a path would otherwise leave an empty database behind)."""
    parsed = _parse(url)
    return parsed.get_backend_name() != "sqlite" or Path(parsed.database).is_file()


def _parse(url: str) -> URL:
    """``url`` as SQLAlchemy sees it, ``postgresql://`` pointed at psycopg 3; TunerError if not ours."""

    def unsupported(why: str = "") -> TunerError:
        return TunerError(f"storage URL '{mask_url(url)}' is not supported{why}; {_FIX}")

    try:
        parsed = make_url(str(url))
    except Exception:
        raise unsupported() from None
    if parsed.drivername == "sqlite":
        if parsed.host:
            raise unsupported(" (sqlite URLs have three slashes and no host)")
        if not parsed.database or parsed.database == ":memory:":
            raise unsupported(" (no database file: workers can only share a file)")
        return parsed
    if parsed.drivername in ("postgresql", "postgresql+psycopg"):
        if str(url).count("@") > 1:
            raise unsupported(" (write an '@' inside the password as %40)")
        if not parsed.host or not parsed.database:
            raise unsupported(" (HOST and DB are both needed)")
        return parsed.set(drivername="postgresql+psycopg")
    raise unsupported()


def _sync_normal(engine: sqlalchemy.Engine) -> None:
    """Every connection of ``engine`` commits without an fsync (WAL keeps the file consistent)."""

    def pragma(connection: sqlite3.Connection, _: object) -> None:
        connection.execute("PRAGMA synchronous=NORMAL")

    sqlalchemy.event.listen(engine, "connect", pragma)
    engine.dispose()  # the connections RDBStorage opened before the listener: new ones get the pragma


def _prepare_sqlite(path: Path, url: str) -> dict[str, object]:
    """Create the folder and file, switch the file to WAL once; the engine kwargs for SQLite."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "a file has that name" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
        raise TunerError(_one_line(url, f"cannot create folder '{path.parent}' ({why}); "
                                        "choose a path in a writable folder")) from None
    # WAL lets readers and one writer work at once; the mode is stored in the file, so every later
    # connection (any process) uses it. Changing it needs a brief exclusive lock, hence the timeout.
    # Processes opening a brand-new file together can get "locked" at once, without SQLite's busy
    # wait (a lock upgrade it refuses to wait for): tried again until the timeout, by when one of
    # them has switched the file and the others find it in WAL already.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            with contextlib.closing(sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S)) as db:
                db.execute("PRAGMA journal_mode=WAL").fetchone()
            break
        except sqlite3.Error as e:
            if isinstance(e, sqlite3.OperationalError) and "locked" in str(e).lower() \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise TunerError(_one_line(url, _cause(_SQLITE_CAUSES, str(e), path=path))) from None
    return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}


def _check_sqlite(path: Path, url: str) -> None:
    """The SQLite half of ``check_storage``: file and folder checks only, nothing opened or made."""
    if path.is_dir():
        raise TunerError(_one_line(url, f"'{path}' is a folder; give a file path such as "
                                        f"sqlite:///{path / 'tuner.db'}"))
    if path.exists():
        with open(path, "rb") as f:
            header = f.read(len(_SQLITE_MAGIC))
        if header and header != _SQLITE_MAGIC:  # an empty file is a valid, empty database
            raise TunerError(_one_line(url, _cause(_SQLITE_CAUSES, "file is not a database", path)))
        if not os.access(path, os.R_OK | os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
            raise TunerError(_one_line(url, _cause(_SQLITE_CAUSES, "readonly", path)))
        return
    folder = path.parent.absolute()
    while not folder.exists():  # the nearest existing parent decides whether mkdir can work
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise TunerError(_one_line(url, f"cannot create '{path}': '{folder}' is not a writable "
                                        "folder; choose a path in a writable folder"))


def _connect_error(url: str, parsed: URL, error: BaseException) -> TunerError:
    """A one-line TunerError naming the cause of a failed connection, from the driver's text."""
    message = _driver_message(error)
    if parsed.get_backend_name() == "sqlite":
        return TunerError(_one_line(url, _cause(_SQLITE_CAUSES, message, Path(parsed.database))))
    fields = {"where": f"{parsed.host}:{parsed.port or 5432}", "host": parsed.host,
              "user": parsed.username or ""}
    return TunerError(_one_line(url, _cause(_PG_CAUSES, message, **fields)))


def _cause(causes: dict[str, str], message: str, path: Path | None = None, **fields: str) -> str:
    """The first cause whose pattern matches ``message``, else the message's first line."""
    for pattern, template in causes.items():
        found = re.search(pattern, message, re.IGNORECASE)
        if found:
            return template.format(path=path, **fields, **found.groupdict())
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return f"cannot connect ({first.removeprefix('connection failed: ')})"


def _driver_message(error: BaseException | None) -> str:
    """The database driver's own text: SQLAlchemy and Optuna wrap it (``.orig``, ``__cause__``)."""
    texts = []
    while error is not None:
        texts.append(str(getattr(error, "orig", None) or error))
        error = error.__cause__
    return "\n".join(texts[::-1])  # innermost (the driver's) first


def _one_line(url: str, cause: str) -> str:
    """``storage '<masked url>': <cause>`` on one line, the password masked wherever it appears."""
    return mask_secrets(" ".join(f"storage '{mask_url(url)}': {cause}".split()), url)


def _split_password(url: str) -> tuple[str, str, str] | None:
    """(up to ``user:``, the password as typed, from the last ``@`` on); None without a password."""
    scheme, sep, rest = url.partition("://") if "://" in url else ("", "", url)
    userinfo, at, host = rest.rpartition("@")
    user, colon, password = userinfo.partition(":")
    return (f"{scheme}{sep}{user}:", password, f"@{host}") if at and colon else None
