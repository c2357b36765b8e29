"""Concurrency through the real pipeline (catalogue 31, 32, 36): several Luigi worker
processes, and two invocations running the same chunk at the same moment."""

import multiprocessing


from astra_cannon import pipeline
from astra_cannon.models import TaskRun
from test_faults_common import (  # noqa: F401 - fixtures
    build, faults_env, faults_model_file, integrity, small_job, trained_job)


def test_four_luigi_workers_write_every_chunk_once_without_lock_errors(trained_job, example_dir):
    job = small_job(example_dir, chunk_size=10, n_files=2)  # 80 spectra, 8 chunks, 4 at a time
    result, code = build(job, workers=4)
    assert code == 0, result.summary_text
    state = integrity()
    assert state["rows"] == state["keys"] == state["spectra"] == 80
    assert state["unmarked"] == 0 and state["orphans"] == 0 and state["integrity"] == "ok"
    with pipeline.connected():
        runs = list(TaskRun.select().where(TaskRun.task_family == "astra_cannon.InferChunk"))
    assert len(runs) == 8 and {r.status for r in runs} == {"done"}
    assert not any("locked" in (r.error_message or "") for r in runs)
    assert len({r.pid for r in runs}) >= 2  # forked workers, each with its own connection


def _invocation(job, barrier):  # runs in a forked child
    import os

    # Both invocations read the chunk, see nothing done, fit it, meet here, then both write.
    real_fit = pipeline.fit_spectra

    def fit_then_wait(*args, **kwargs):
        out = real_fit(*args, **kwargs)
        barrier.wait()
        return out

    pipeline.fit_spectra = fit_then_wait
    os._exit(build(job)[1])


def test_two_invocations_writing_the_same_chunk_at_once_leave_one_row_per_spectrum(trained_job, example_dir):
    job = small_job(example_dir, chunk_size=40)  # one chunk of 40: both runs take the same task
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2, timeout=90)
    procs = [ctx.Process(target=_invocation, args=(job, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(150)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "an invocation did not finish"
    mine, theirs = (p.exitcode for p in procs)
    assert (mine, theirs) == (0, 0)  # no 'database is locked', no unique violation
    state = integrity()
    assert state["rows"] == state["keys"] == state["spectra"] == 40
    assert state["unmarked"] == 0 and state["orphans"] == 0 and state["integrity"] == "ok"
    with pipeline.connected():
        runs = list(TaskRun.select().where(TaskRun.task_family == "astra_cannon.InferChunk"))
    assert [r.status for r in runs] == ["done", "done"]  # both ran the chunk; both committed


