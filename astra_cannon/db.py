"""Connecting to the astra_cannon database and migrating its schema.

Usage::

    from astra_cannon import db
    database = db.connect()            # URL from astra_cannon.config.database_url()
    ...                                # astra_cannon.store functions use the bound database
    db.close()

Processes and connections
-------------------------
A connection must never be shared between processes. :func:`connect` binds
:data:`astra_cannon.models.database_proxy` to a new peewee ``Database`` that connects lazily
(on first query) in each process. Call :func:`close` before forking; in addition, a fork hook
makes a forked child forget (without closing, which would break the parent's session) any
connection it inherited, so the child opens its own on first use. A worker may also simply call
``connect(url, migrate=False)`` itself.

SQLite is for a single host: WAL needs shared memory (never NFS/Lustre). Use PostgreSQL for
several hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import pathlib
import threading
import zlib

import peewee as pw
from playhouse import db_url
from playhouse.migrations import Runner

from . import config
from .models import database_proxy

__all__ = [
    "connect",
    "migrate",
    "migration_status",
    "close",
    "atomic_write",
    "is_sqlite",
    "get_database",
    "migrations_directory",
    "MIGRATION_TABLE",
]

log = logging.getLogger(__name__)

MIGRATION_TABLE = "schema_migration"
SQLITE_PRAGMAS = (
    ("journal_mode", "wal"),
    ("synchronous", "normal"),  # not OFF (Astra's choice), which risks corruption on power loss
    ("foreign_keys", 1),
    ("cache_size", -64000),
)
SQLITE_BUSY_TIMEOUT = 30.0  # seconds
# Key for pg_advisory_lock, so concurrent migrate() calls serialise.
_PG_LOCK_KEY = zlib.crc32(b"astra_cannon.migrate")

_lock = threading.Lock()
_database: pw.Database | None = None
# Connections inherited through fork(): kept referenced, never closed (see _after_fork_in_child).
_inherited: list = []


def is_sqlite(database) -> bool:
    """True when ``database`` (a peewee Database or the proxy) is SQLite."""
    if isinstance(database, pw.DatabaseProxy):
        database = database.obj
    return isinstance(database, pw.SqliteDatabase)


def _resolve(database):
    if database is None:
        database = _database
        if database is None:
            database = connect()
    if isinstance(database, pw.DatabaseProxy):
        database = database.obj
    return database


def get_database() -> pw.Database:
    """Return the bound database, connecting with the configured URL if none is bound."""
    return _resolve(None)


def migrations_directory() -> pathlib.Path:
    """Return the directory of the numbered migration scripts.

    ``astra_cannon.migrations`` when installed; the repository's ``migrations/`` folder when
    running from a source checkout that is not installed.
    """
    try:
        spec = importlib.util.find_spec("astra_cannon.migrations")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return pathlib.Path(list(spec.submodule_search_locations)[0])
    checkout = pathlib.Path(__file__).resolve().parent.parent / "migrations"
    if checkout.is_dir():
        return checkout
    raise RuntimeError("cannot find the astra_cannon migrations directory")


def _make_database(url: str) -> pw.Database:
    if url.startswith("sqlite"):
        parsed = db_url.parse(url)
        path = parsed.get("database")
        if path and path != ":memory:" and not path.startswith("file:"):
            pathlib.Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return db_url.connect(url, pragmas=SQLITE_PRAGMAS, timeout=SQLITE_BUSY_TIMEOUT)
    return db_url.connect(url)


def connect(url: str | None = None, migrate: bool = True) -> pw.Database:
    """Create the database for ``url``, bind the models to it and (optionally) migrate.

    Parameters
    ----------
    url : str, optional
        A ``playhouse.db_url`` URL (``sqlite:///path``, ``postgresql://user@host/db``,
        ``postgresql+pool://...``). Defaults to :func:`astra_cannon.config.database_url`.
    migrate : bool
        Apply pending migrations (serialised across processes). Workers that know the schema
        is current may pass ``False`` to skip the check.

    Returns
    -------
    peewee.Database
        The bound database (also reachable through ``models.database_proxy``). The actual
        connection opens lazily on first query.

    Raises
    ------
    peewee.OperationalError
        When the database cannot be reached (on migration, or later on first query).
    RuntimeError, ValueError
        For a malformed or unsupported URL.
    """
    global _database
    url = url or config.database_url()
    database = _make_database(url)
    with _lock:
        old, _database = _database, database
        database_proxy.initialize(database)
    if old is not None and old is not database:
        with contextlib.suppress(Exception):
            old.close()
    if migrate:
        _apply_migrations(database, None)
    return database


def close() -> None:
    """Close the bound database's connection (call before forking worker processes)."""
    database = _database
    if database is not None and not database.is_closed():
        database.close()


def atomic_write(database=None):
    """Return a write transaction: ``atomic('IMMEDIATE')`` on SQLite, ``atomic()`` elsewhere.

    A deferred SQLite transaction that has read cannot upgrade to a writer once another
    process has committed (SQLite answers BUSY at once, bypassing the busy timeout);
    IMMEDIATE takes the write lock up front, so writers simply queue.
    """
    database = _resolve(database)
    if is_sqlite(database):
        return database.atomic("IMMEDIATE")
    return database.atomic()


@contextlib.contextmanager
def _migration_lock(database):
    """Serialise migrations across processes (flock next to a SQLite file, advisory lock on
    PostgreSQL) so two workers starting on a fresh database do not both create the schema."""
    if is_sqlite(database):
        path = database.database
        if not path or path == ":memory:" or str(path).startswith("file:"):
            yield
            return
        with open(f"{path}.migrate.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    elif isinstance(database, pw.PostgresqlDatabase):
        database.execute_sql("SELECT pg_advisory_lock(%s)", (_PG_LOCK_KEY,))
        try:
            yield
        finally:
            database.execute_sql("SELECT pg_advisory_unlock(%s)", (_PG_LOCK_KEY,))
    else:
        yield


def _runner(database) -> Runner:
    return Runner(database, str(migrations_directory()), table_name=MIGRATION_TABLE)


def migrate(database=None, target: str | None = None) -> list[str]:
    """Apply pending numbered migrations in order; a second call is a no-op.

    Parameters
    ----------
    database : peewee.Database, optional
        Defaults to the bound database.
    target : str, optional
        Stop after this migration name (e.g. ``"0001_initial"``); for tests and staged upgrades.

    Returns
    -------
    list of str
        Names of the migrations applied by this call (empty when already at head).
    """
    return _apply_migrations(_resolve(database), target)


def _apply_migrations(database, target):
    with _migration_lock(database):
        applied = _runner(database).up(target)
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    return applied


def migration_status(database=None) -> list[tuple[str, bool]]:
    """Return ``(name, applied)`` for every migration script, in order."""
    database = _resolve(database)
    return [(m.name, bool(m.applied)) for m in _runner(database).status() if m.path is not None]


def downgrade(database=None, target: str | None = None) -> list[str]:
    """Revert the latest migration, or every migration back through ``target``."""
    database = _resolve(database)
    with _migration_lock(database):
        return _runner(database).down(target)


def _after_fork_in_child() -> None:
    # A connection inherited through fork shares its socket/file with the parent. Closing it
    # here would, for PostgreSQL, send a Terminate message that ends the *parent's* session,
    # so keep a reference (never garbage-collected) and reset the state: the child then opens
    # its own connection on first query.
    database = _database
    if database is None:
        return
    state = getattr(database, "_state", None)
    if state is not None and getattr(state, "conn", None) is not None:
        _inherited.append(state.conn)
        state.reset()
    for attr in ("_connections", "_in_use"):  # playhouse.pool
        pool = getattr(database, attr, None)
        if pool:
            _inherited.append(pool)
            setattr(database, attr, type(pool)())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
