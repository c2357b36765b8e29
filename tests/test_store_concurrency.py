"""Several processes writing at once, on both backends: no lock errors, no duplicates.

Workers are forked from a parent that holds an open connection, so these tests also check that
a child never uses (or closes) the parent's connection.
"""

import multiprocessing
import traceback


from astra_cannon import store
from astra_cannon.models import CannonResult, TaskRun
from fixtures_db import FakeModel, fake_chunk, spectrum_sources

LABELS = ("TEFF", "LOGG", "FE_H")
TIMEOUT = 60


def _worker(barrier, errors, model_pk, chunks, repeats):
    try:
        barrier.wait()
        for _ in range(repeats):
            for task_id, pks in chunks:
                labels, cov, meta = fake_chunk(len(pks), seed=len(pks))
                run = store.begin_task_run(task_family="CannonTest", task_id=task_id, parameters={})
                store.write_chunk(task_run=run, model_pk=model_pk, spectrum_pks=pks, label_names=LABELS,
                                  labels=labels, cov=cov, meta=meta)
                assert store.task_complete(task_id)
    except BaseException:  # noqa: BLE001 - report everything to the parent
        errors.put(traceback.format_exc())
        raise


def _run_workers(assignments, repeats=1):
    ctx = multiprocessing.get_context("fork")
    barrier, errors = ctx.Barrier(len(assignments), timeout=TIMEOUT), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(barrier, errors, *a, repeats)) for a in assignments]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not alive, "workers timed out"
    assert not messages, "\n".join(messages)
    assert [p.exitcode for p in procs] == [0] * len(procs)


def _setup(n):
    model = store.register_model(name="m", model=FakeModel(), path="/m.npz", file_checksum="c", parameters={})
    return model.id, store.register_spectra(spectrum_sources(n))


def _assert_one_marked_row_per_key(db, n):
    assert CannonResult.select().count() == n
    assert db.execute_sql("SELECT COUNT(*) FROM (SELECT DISTINCT model_id, spectrum_id "
                          "FROM cannon_result) k").fetchone()[0] == n
    assert db.execute_sql("SELECT COUNT(*) FROM cannon_result r JOIN task_run t ON t.id = r.task_run_id "
                          "WHERE t.status = 'done'").fetchone()[0] == n


def test_processes_writing_different_chunks_concurrently(db):
    model_pk, pks = _setup(8 * 50)
    chunks = [(f"chunk-{i}", pks[i * 50:(i + 1) * 50]) for i in range(8)]
    _run_workers([(model_pk, chunks[w::4]) for w in range(4)])
    _assert_one_marked_row_per_key(db, len(pks))  # the parent's own connection still works
    assert store.completed_task_ids([c for c, _ in chunks]) == {c for c, _ in chunks}


def test_two_processes_writing_the_same_chunk_concurrently(db):
    model_pk, pks = _setup(100)
    same = [("chunk-0", pks)]
    _run_workers([(model_pk, same), (model_pk, same)], repeats=4)
    _assert_one_marked_row_per_key(db, len(pks))
    assert TaskRun.select().where(TaskRun.status == "done").count() == 8
