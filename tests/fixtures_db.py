"""Database fixtures: SQLite and PostgreSQL, for every test that touches the database.

Fixtures
--------
``db_url`` (function scope, parametrized ``[sqlite]`` and ``[postgresql]``)
    URL of a fresh, empty database (no schema yet: ``astra_cannon.db.connect(db_url)`` migrates
    it). SQLite: a file in ``tmp_path`` (not ``:memory:``, so WAL and multi-process tests are
    real). PostgreSQL: an empty database (schema ``public`` recreated per test); the
    ``[postgresql]`` case carries ``@pytest.mark.postgres``. The URL is a plain string and can be handed to
    subprocesses (``multiprocessing`` workers, ``luigi`` runs, the CLI via
    ``ASTRA_CANNON_DATABASE_URL``).
``db`` (function scope)
    ``astra_cannon.db.connect(db_url)``: the migrated, bound peewee database; closed afterwards.
``sqlite_url`` / ``postgres_url`` (function scope)
    One backend only, same semantics as ``db_url``.
``pg_admin_url`` (session scope)
    URL of the PostgreSQL server's maintenance database ``postgres``.

The PostgreSQL server
---------------------
``ASTRA_CANNON_TEST_PG`` set: that URL is used as the maintenance connection (its role needs
CREATEDB). Otherwise, when Debian's server binaries exist (``/usr/lib/postgresql/*/bin/initdb``),
the test session starts its own throw-away cluster: ``initdb`` into a temporary directory
(as root through ``runuser -u postgres --``, since ``initdb`` refuses root), Unix socket in that
directory, ``listen_addresses=''`` (no TCP), a free port number, ``fsync=off``; it is stopped and
deleted at session end. Tests share one database whose ``public`` schema is dropped and
recreated before each test (much faster than a database per test). Without binaries the
postgres cases are skipped, unless ``ASTRA_CANNON_REQUIRE_PG=1``, which makes them fail loudly.

Forked workers (``multiprocessing`` "fork", Luigi ``--workers N``) may use the parent's bound
database object: ``astra_cannon.db`` makes a forked child open its own connection. Helpers for
store tests: ``FakeModel`` (stand-in for a trained ``CannonModel``), ``fake_chunk(n, ...)``
(``CannonModel.test``-shaped output) and ``spectrum_sources(n)``; import them with
``from fixtures_db import FakeModel, fake_chunk, spectrum_sources``.

Example::

    def test_something(db_url):            # runs on both backends
        from astra_cannon import db
        database = db.connect(db_url)
        ...
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
import uuid

import pytest

PG_ENV = "ASTRA_CANNON_TEST_PG"
REQUIRE_PG_ENV = "ASTRA_CANNON_REQUIRE_PG"


def _pg_bin():
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(candidates[-1]) if candidates else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_postgres(reason: str):
    if os.environ.get(REQUIRE_PG_ENV) == "1":
        pytest.fail(f"PostgreSQL required ({REQUIRE_PG_ENV}=1) but unavailable: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL unavailable: {reason}")


def _run(cmd, as_postgres):
    if as_postgres:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def pg_admin_url():
    """URL of a PostgreSQL maintenance database (started for the session when needed)."""
    url = os.environ.get(PG_ENV)
    if url:
        yield url
        return
    pgbin = _pg_bin()
    if pgbin is None:
        _no_postgres("no /usr/lib/postgresql/*/bin/initdb and no " + PG_ENV)
    as_postgres = os.geteuid() == 0
    tmp = tempfile.mkdtemp(prefix="astra_cannon_pg_")
    data, logfile, port = os.path.join(tmp, "data"), os.path.join(tmp, "log"), _free_port()
    started = False
    try:
        if as_postgres:
            shutil.chown(tmp, user="postgres")
        _run([f"{pgbin}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"], as_postgres)
        options = (f"-k {tmp} -c listen_addresses='' -p {port} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        _run([f"{pgbin}/pg_ctl", "-D", data, "-l", logfile, "-w", "-t", "60", "-o", options, "start"],
             as_postgres)
        started = True
    except (subprocess.CalledProcessError, OSError, KeyError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", "") or ""
        if os.path.exists(logfile):
            with open(logfile) as fh:
                detail += fh.read()[-2000:]
        shutil.rmtree(tmp, ignore_errors=True)
        _no_postgres(f"could not start a server: {exc}\n{detail}")
    try:
        yield f"postgresql://postgres@/postgres?host={urllib.parse.quote(tmp)}&port={port}"
    finally:
        if started:
            try:
                _run([f"{pgbin}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"], as_postgres)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(tmp, ignore_errors=True)


def _admin_execute(url, *statements):
    import psycopg2
    from playhouse.db_url import parse

    params = parse(url)
    params["dbname"] = params.pop("database")
    conn = psycopg2.connect(**params)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for sql in statements:
                cur.execute(sql)
    finally:
        conn.close()


def _with_database(url, name):
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def _pg_test_database(pg_admin_url):
    # One database for the session, emptied before every test: CREATE DATABASE costs ~0.5 s,
    # recreating the public schema a few ms.
    name = f"astra_cannon_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    _admin_execute(pg_admin_url, f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        _admin_execute(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(pg_admin_url, _pg_test_database):
    """URL of an empty PostgreSQL database (its public schema recreated for each test)."""
    name = _pg_test_database
    # Sessions left by a previous test (killed or forked workers) must not hold locks.
    _admin_execute(pg_admin_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 f"WHERE datname = '{name}' AND pid <> pg_backend_pid()")
    url = _with_database(pg_admin_url, name)
    _admin_execute(url, "DROP SCHEMA IF EXISTS public CASCADE", "CREATE SCHEMA public")
    try:
        yield url
    finally:
        from astra_cannon import db as _db

        _db.close()


@pytest.fixture
def sqlite_url(tmp_path):
    """URL of a fresh SQLite file in ``tmp_path``."""
    return f"sqlite:///{tmp_path / 'astra_cannon.sqlite'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request):
    """URL of a fresh, empty database: once on SQLite, once on PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def db(db_url):
    """The migrated database bound by ``astra_cannon.db.connect(db_url)``; closed afterwards."""
    from astra_cannon import db as _db

    database = _db.connect(db_url)
    try:
        yield database
    finally:
        _db.close()


# ----------------------------------------------------------------------------------------------
# Small stand-ins for tests of the store (no Cannon model needed). Import them directly:
#     from fixtures_db import FakeModel, fake_chunk


class _FakeVectorizer:
    def __init__(self, order):
        self.order = order


class FakeModel:
    """Anything with the attributes ``store.register_model`` reads from a ``CannonModel``."""

    def __init__(self, label_names=("TEFF", "LOGG", "FE_H"), training_set_hash="0" * 64, order=2,
                 regularization=0.0, censors=None):
        self.label_names = tuple(label_names)
        self.training_set_hash = training_set_hash
        self.vectorizer = _FakeVectorizer(order)
        self.regularization = regularization
        self.censors = censors


def fake_chunk(n, label_names=("TEFF", "LOGG", "FE_H"), seed=0, failed=()):
    """Return ``(labels (n, L), cov (n, L, L), meta)`` shaped like ``CannonModel.test`` output.

    Rows listed in ``failed`` are failures: NaN labels and covariance, ``FEW_PIXELS``,
    ``status='failed'`` and a ``fail_message``.
    """
    import numpy as np

    from astra_cannon import flags

    rng = np.random.default_rng(seed)
    L = len(label_names)
    centre = np.array([4800.0, 2.5, -0.2, 0.1, 0.05, 1.2][:L] + [0.0] * max(0, L - 6))
    labels = centre + rng.normal(size=(n, L)) * np.array([100.0] + [0.1] * (L - 1))
    sigma = np.array([50.0] + [0.05] * (L - 1))
    corr = np.full((L, L), 0.2) + 0.8 * np.eye(L)
    cov = np.broadcast_to(corr * np.outer(sigma, sigma), (n, L, L)).copy()
    meta = []
    for i in range(n):
        meta.append(dict(chi_sq=float(rng.uniform(100, 300)), r_chi_sq=float(rng.uniform(0.5, 5.0)),
                         snr=np.float32(rng.uniform(50, 200)), n_pixels=np.int64(200), ier=1,
                         nfev=np.int64(12), best_result_index=np.int64(i % 3),
                         x0=[np.float64(v) for v in centre], flags=0, fail_message=None,
                         status="ok", label_names=list(label_names), method="fake",
                         t_elapsed=np.float64(0.01)))
    for i in failed:
        labels[i] = np.nan
        cov[i] = np.nan
        meta[i].update(flags=flags.FEW_PIXELS, status="failed", fail_message="only 2 usable pixels",
                       chi_sq=float("nan"), r_chi_sq=float("nan"), n_pixels=2)
    return labels, cov, meta


def spectrum_sources(n, prefix="star"):
    """``register_spectra`` input for ``n`` fake spectra."""
    return [dict(identifier=f"{prefix}-{i:05d}", path=f"/data/{prefix}-{i:05d}.fits", hdu=1, row=0,
                 checksum=f"{i:064x}") for i in range(n)]
