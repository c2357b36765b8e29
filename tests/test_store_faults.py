"""SIGKILL at each named point of write_chunk, then rerun: no partial chunk, no unmarked rows."""

import multiprocessing
import os

import peewee as pw
import pytest

from astra_cannon import store
from astra_cannon.models import CannonResult, TaskRun
from fixtures_db import FakeModel, fake_chunk, spectrum_sources

LABELS = ("TEFF", "LOGG", "FE_H")


def _child(model_pk, pks, task_id, kill_at):
    # A forked child: it opens its own connection (the parent's is never shared) and kills
    # itself at the named point of write_chunk.
    os.environ[store.KILL_ENV] = kill_at
    labels, cov, meta = fake_chunk(len(pks), seed=1, failed=[0])
    run = store.begin_task_run(task_family="CannonTest", task_id=task_id, parameters={})
    store.write_chunk(task_run=run, model_pk=model_pk, spectrum_pks=pks, label_names=LABELS,
                      labels=labels, cov=cov, meta=meta)
    os._exit(3)  # not reached when the fault point fires


def _run_child(model_pk, pks, task_id, kill_at):
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(model_pk, pks, task_id, kill_at))
    proc.start()
    proc.join(60)
    if proc.is_alive():
        proc.kill()
        pytest.fail("child did not finish")
    return proc.exitcode


def _unmarked_rows(db):
    return db.execute_sql(
        "SELECT COUNT(*) FROM cannon_result r LEFT JOIN task_run t ON t.id = r.task_run_id "
        "WHERE t.status IS NULL OR t.status <> 'done'").fetchone()[0]


@pytest.mark.parametrize("kill_at", store.FAULT_POINTS)
def test_sigkill_at_fault_point_leaves_consistent_database_and_rerun_completes(db, kill_at):
    model = store.register_model(name="m", model=FakeModel(), path="/m.npz", file_checksum="c", parameters={})
    pks = store.register_spectra(spectrum_sources(60))
    chunk_a, chunk_b = pks[:30], pks[30:]
    labels, cov, meta = fake_chunk(30)
    run = store.begin_task_run(task_family="CannonTest", task_id="chunk-a", parameters={})
    store.write_chunk(task_run=run, model_pk=model.id, spectrum_pks=chunk_a, label_names=LABELS,
                      labels=labels, cov=cov, meta=meta)

    assert _run_child(model.id, chunk_b, "chunk-b", kill_at) == -9

    committed = kill_at == "after_commit"
    n_b = CannonResult.select().where(CannonResult.spectrum.in_(chunk_b)).count()
    assert n_b == (len(chunk_b) if committed else 0)
    assert store.task_complete("chunk-b") is committed
    assert CannonResult.select().where(CannonResult.spectrum.in_(chunk_a)).count() == len(chunk_a)
    assert _unmarked_rows(db) == 0
    # The killed attempt left its provenance row; it never claims to be done unless it committed.
    statuses = [r.status for r in TaskRun.select().where(TaskRun.task_id == "chunk-b")]
    assert statuses == (["done"] if committed else ["running"])
    if isinstance(db, pw.SqliteDatabase):
        assert db.execute_sql("PRAGMA integrity_check").fetchone()[0] == "ok"

    # Rerun (as Luigi would for an incomplete chunk; harmless for a complete one).
    labels, cov, meta = fake_chunk(30, seed=2)
    rerun = store.begin_task_run(task_family="CannonTest", task_id="chunk-b", parameters={})
    store.write_chunk(task_run=rerun, model_pk=model.id, spectrum_pks=chunk_b, label_names=LABELS,
                      labels=labels, cov=cov, meta=meta)
    assert CannonResult.select().count() == 60
    assert db.execute_sql("SELECT COUNT(*) FROM (SELECT DISTINCT model_id, spectrum_id "
                          "FROM cannon_result) k").fetchone()[0] == 60
    assert _unmarked_rows(db) == 0 and store.task_complete("chunk-b")
    assert store.failed_results() == []  # the rerun replaced the child's failed row, if any


def test_a_killed_attempt_is_closed_by_the_next_attempt(db):
    import subprocess
    import sys

    from astra_cannon import store
    from astra_cannon.models import TaskRun

    # a "running" row whose process is gone (a finished child stands in for a SIGKILLed worker)
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = store.begin_task_run(task_family="InferChunk", task_id="chunk-x", parameters={})
    TaskRun.update(pid=int(child.stdout)).where(TaskRun.id == dead.id).execute()
    alive = store.begin_task_run(task_family="InferChunk", task_id="chunk-y", parameters={})
    store.begin_task_run(task_family="InferChunk", task_id="chunk-x", parameters={})
    old = TaskRun.get_by_id(dead.id)
    assert old.status == "failed" and old.error_type == "Killed"
    assert TaskRun.get_by_id(alive.id).status == "running"  # other tasks untouched
