"""The database failing under the pipeline (catalogue 33, 34, 35, 37, 38).

- unreachable at scheduling: ``complete()`` raises, Luigi exits 35 and nothing runs;
- lost in the middle of a run (PostgreSQL backends terminated from an admin connection): the
  chunk fails (exit 30), none of its rows are written, the other chunks and a rerun succeed;
- read-only (PostgreSQL ``default_transaction_read_only``) and disk full (SQLite under
  ``RLIMIT_FSIZE``): the run fails with the database's own message, nothing partial is left.
"""

import os
import resource
import signal
from pathlib import Path

import pytest

from astra_cannon import pipeline
from astra_cannon.models import CannonResult, TaskRun
from test_faults_common import (  # noqa: F401 - fixtures
    build, faults_env, faults_model_file, integrity, run_in_child, small_job, tasks_module, trained_job)
import fixtures_db

REPO = Path(__file__).resolve().parents[1]
ONLY_POSTGRES = pytest.mark.parametrize("db_url", [pytest.param("postgresql", marks=pytest.mark.postgres)],
                                        indirect=True)
ONLY_SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def _dead_postgres_url(tmp_path):
    # A Unix-socket directory where no server listens: connecting fails at once.
    return f"postgresql://postgres@/astra?host={tmp_path}&port=1"


@pytest.mark.postgres
def test_unreachable_postgres_at_scheduling_exits_35_and_runs_nothing(tmp_path, monkeypatch, example_dir):
    import peewee as pw

    tasks = tasks_module()
    monkeypatch.setenv("ASTRA_CANNON_DATABASE_URL", _dead_postgres_url(tmp_path))
    monkeypatch.setenv("ASTRA_CANNON_WORK_DIR", str(tmp_path / "work"))
    job = small_job(example_dir)
    root = tasks.job_tasks(job)[0]
    with pytest.raises(pw.OperationalError):
        root.complete()  # errors propagate: never "not complete, recompute everything"
    result = tasks.build([root])
    assert tasks.exit_code(result) == 35
    assert not (tmp_path / "work" / "models").exists()  # no training ran


def test_cli_with_an_unreachable_database_fails_clearly_before_running_anything(tmp_path, monkeypatch,
                                                                                example_dir, capsys):
    from astra_cannon import cli

    monkeypatch.setenv("ASTRA_CANNON_WORK_DIR", str(tmp_path / "work"))
    spectra = sorted(str(p) for p in (Path(example_dir) / "spectra").glob("*.fits"))[:1]
    code = cli.main(["--database-url", _dead_postgres_url(tmp_path), "run", "--training-set",
                     str(Path(example_dir) / "training_set.fits"), "--spectra", *spectra])
    err = capsys.readouterr().err
    assert code == 35  # Luigi's scheduling-error code: nothing could be scheduled
    assert "cannot reach the database" in err and "OperationalError" in err
    assert not (tmp_path / "work" / "models").exists()


def _terminate_backends(admin_url, database):
    fixtures_db._admin_execute(admin_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                          f"WHERE datname = '{database}' AND pid <> pg_backend_pid()")


@ONLY_POSTGRES
def test_postgres_lost_mid_chunk_fails_that_chunk_only_and_a_rerun_completes(trained_job, pg_admin_url,
                                                                            monkeypatch):
    url = os.environ["ASTRA_CANNON_DATABASE_URL"]
    database = url.split("/")[3].split("?")[0]
    real_fit = pipeline.fit_spectra
    calls = []

    def fit_then_lose_the_server(*args, **kwargs):
        out = real_fit(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # first chunk: every session is killed between fit and write
            _terminate_backends(pg_admin_url, database)
        return out

    monkeypatch.setattr(pipeline, "fit_spectra", fit_then_lose_the_server)
    result, code = build(trained_job)
    assert code == 30, result.summary_text
    state = integrity()
    assert state["rows"] == state["keys"] == 20  # the other chunk; nothing of the lost one
    assert state["unmarked"] == 0 and state["orphans"] == 0
    with pipeline.connected():
        statuses = sorted(r.status for r in TaskRun.select().where(
            TaskRun.task_family == "astra_cannon.InferChunk"))
    # The lost chunk's own failure could not be recorded (no server); it never says "done".
    assert statuses.count("done") == 1 and len(statuses) == 2

    monkeypatch.setattr(pipeline, "fit_spectra", real_fit)
    result, code = build(trained_job)
    assert code == 0, result.summary_text
    state = integrity()
    assert state["rows"] == state["keys"] == state["spectra"] == 40 and state["unmarked"] == 0


@ONLY_POSTGRES
def test_read_only_postgres_fails_the_run_with_the_servers_message(trained_job, pg_admin_url, caplog):
    url = os.environ["ASTRA_CANNON_DATABASE_URL"]
    database = url.split("/")[3].split("?")[0]
    fixtures_db._admin_execute(pg_admin_url, f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
    try:
        result, code = build(trained_job)
    finally:
        fixtures_db._admin_execute(pg_admin_url, f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
    assert code == 30, result.summary_text
    assert "cannot execute INSERT in a read-only transaction" in caplog.text  # Luigi's error log
    assert integrity()["rows"] == 0


def _infer_on_a_full_disk(job, limit, log_path):
    # In a forked child: once a chunk starts, no file may grow beyond ``limit`` bytes, as on a
    # full disk (SIGXFSZ ignored so write() fails with EFBIG instead of killing the process).
    # Luigi itself starts normally (its queues need /dev/shm).
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage() + "\n" + (
        logging.Formatter().formatException(record.exc_info) if record.exc_info else ""))
    logging.getLogger("luigi-interface").addHandler(handler)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    real_infer = pipeline.infer_chunk

    def infer_with_a_full_disk(*args, **kwargs):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        return real_infer(*args, **kwargs)

    pipeline.infer_chunk = infer_with_a_full_disk
    try:
        code = build(job)[1]
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    Path(log_path).write_text("\n".join(records))
    return code


@ONLY_SQLITE
@pytest.mark.parametrize("limit", [0])
def test_sqlite_disk_full_fails_the_run_with_a_clear_message_and_leaves_nothing_partial(trained_job, tmp_path,
                                                                                         limit):
    log_path = tmp_path / "luigi.log"
    code = run_in_child(_infer_on_a_full_disk, trained_job, limit, log_path)
    log = log_path.read_text()
    assert code == 30, log
    assert "database or disk is full" in log or "disk I/O error" in log, log
    state = integrity()
    assert state["unmarked"] == 0 and state["integrity"] == "ok"
    assert state["rows"] in (0, 20)  # whole chunks only
    result, code = build(trained_job)  # space back: the same job completes
    assert code == 0, result.summary_text
    assert integrity()["rows"] == 40


@ONLY_SQLITE
def test_failure_record_never_masks_the_tasks_own_error(trained_job, monkeypatch, caplog):
    from astra_cannon import store

    def broken_finish(*args, **kwargs):
        raise RuntimeError("the provenance write itself failed")

    def failing_fit(*args, **kwargs):
        raise ValueError("the real cause")

    monkeypatch.setattr(pipeline, "fit_spectra", failing_fit)
    monkeypatch.setattr(store, "finish_task_run", broken_finish)
    result, code = build(trained_job)
    assert code == 30  # a failing chunk is a failed run, not exit 0
    assert "ValueError: the real cause" in caplog.text
    assert CannonResult is not None and integrity()["rows"] == 0
