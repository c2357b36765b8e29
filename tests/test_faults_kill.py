"""kill -9 at every fault point of a real Luigi pipeline run, then rerun (catalogue 28, 29).

The child runs the whole ``InferAll`` build (local scheduler, as ``astra-cannon run`` does) with
``ASTRA_CANNON_KILL_AT`` set; the store SIGKILLs it at that point of the first chunk's write.
The parent then checks the database and reruns the job.
"""

import peewee as pw
import pytest

from astra_cannon import pipeline, store
from astra_cannon.models import CannonResult, TaskRun
from test_faults_common import (  # noqa: F401 - fixtures
    build, faults_env, faults_model_file, integrity, run_in_child, trained_job)


def _infer(job):
    return build(job)[1]


# One point in the quick suite; the whole matrix (both backends) with -m slow.
@pytest.mark.parametrize("kill_at", [p if p == "before_commit" else pytest.param(p, marks=pytest.mark.slow)
                                     for p in store.FAULT_POINTS])
def test_sigkill_at_each_write_point_of_a_pipeline_run_then_rerun_gives_one_row_per_spectrum(
        trained_job, kill_at):
    code = run_in_child(_infer, trained_job, env={store.KILL_ENV: kill_at})
    assert code == -9, f"child exited with {code}, expected SIGKILL at {kill_at}"

    state = integrity()
    committed = kill_at == "after_commit"
    assert state["rows"] == state["keys"] == (20 if committed else 0)  # whole chunk or nothing
    assert state["unmarked"] == 0 and state["orphans"] == 0
    assert state["integrity"] == "ok"
    with pipeline.connected():
        chunk_runs = list(TaskRun.select().where(TaskRun.task_family == "astra_cannon.InferChunk"))
    # The killed attempt's provenance row never claims "done" unless its chunk committed.
    assert [r.status for r in chunk_runs] == (["done"] if committed else ["running"])

    result, code = build(trained_job)  # the rerun, as an operator (or cron) would start it
    assert code == 0, result.summary_text
    state = integrity()
    assert state["rows"] == state["keys"] == state["spectra"] == 40
    assert state["unmarked"] == 0 and state["orphans"] == 0 and state["integrity"] == "ok"
    with pipeline.connected():
        done = TaskRun.select().where((TaskRun.task_family == "astra_cannon.InferChunk")
                                      & (TaskRun.status == "done")).count()
    assert done == 2  # the committed chunk was not run again


def test_rerun_of_a_complete_job_runs_nothing_and_writes_nothing(trained_job):
    assert build(trained_job)[1] == 0
    with pipeline.connected():
        before = (CannonResult.select(pw.fn.MAX(CannonResult.updated)).scalar(), TaskRun.select().count())
    result, code = build(trained_job)
    assert code == 0
    assert "complete" in result.summary_text and "ran successfully" not in result.summary_text
    with pipeline.connected():
        after = (CannonResult.select(pw.fn.MAX(CannonResult.updated)).scalar(), TaskRun.select().count())
    assert after == before
