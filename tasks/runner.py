"""Build and run the tasks of a job: fork safety, scheduler choice and exit codes."""

from __future__ import annotations

import luigi
from luigi.execution_summary import LuigiStatusCode
from luigi.task_register import Register

from astra_cannon import db

from .cannon import InferAll, TrainModel, clear_completion_cache
from .validation import ChooseRegularization, CrossValidate

__all__ = ["job_tasks", "build", "exit_code"]


def job_tasks(job, kind="infer", rerun_failed=False, progress=False, tag="", n_folds=5, seed=0, grid=None,
              validation_fraction=0.2):
    """Return the root tasks for a :class:`astra_cannon.pipeline.Job`.

    Parameters
    ----------
    job : Job
    kind : {"infer", "train", "validate", "regularization"}
        ``"infer"``: :class:`InferAll` (trains first when needed); ``"train"``: :class:`TrainModel`;
        ``"validate"``: :class:`CrossValidate`; ``"regularization"``: :class:`ChooseRegularization`.
    rerun_failed : bool
        Re-fit spectra whose results are failures.
    progress : bool
        Tasks print one line per chunk.
    tag : str
        Free text stored with every task run.
    n_folds, seed : int
        Cross-validation folds; seed of the fold / validation split.
    grid : sequence of float
        Lambda values for ``"regularization"``.
    validation_fraction : float
        Held-out fraction for ``"regularization"``.

    Returns
    -------
    list of luigi.Task
    """
    # Luigi caches task instances by parameters; InferAll memoises its chunk list (and rerun
    # tokens), so start from fresh instances for every job.
    Register.clear_instance_cache()
    clear_completion_cache()
    params = dict(job.task_parameters(), progress=bool(progress), tag=str(tag))
    if kind == "train":
        return [TrainModel(**params)]
    if kind == "validate":
        return [CrossValidate(n_folds=int(n_folds), seed=int(seed), **params)]
    if kind == "regularization":
        if grid is None:
            raise ValueError("a regularisation grid is needed")
        return [ChooseRegularization(grid=[float(g) for g in grid], seed=int(seed),
                                     validation_fraction=float(validation_fraction), **params)]
    if kind != "infer":
        raise ValueError(f"kind must be 'infer', 'train', 'validate' or 'regularization', got {kind!r}")
    return [InferAll(spectra=list(job.spectra), format=job.format, chunk_size=int(job.chunk_size),
                     rerun_failed=bool(rerun_failed), **params)]


def build(tasks, workers=1, scheduler_url=None, log_level="WARNING"):
    """Run tasks with Luigi and return its detailed result.

    The database is closed first: Luigi forks a process per running task when
    ``workers > 1`` and each task connects by itself.

    Parameters
    ----------
    tasks : list of luigi.Task
    workers : int
    scheduler_url : str, optional
        A ``luigid`` URL (e.g. ``http://127.0.0.1:8082``); default: the local scheduler.
    log_level : str
        Luigi's log level.

    Returns
    -------
    luigi.execution_summary.LuigiRunResult
    """
    db.close()
    clear_completion_cache()
    options = dict(detailed_summary=True, workers=int(workers), log_level=log_level)
    if scheduler_url:
        options.update(local_scheduler=False, scheduler_url=scheduler_url)
    else:
        options.update(local_scheduler=True)
    if int(workers) <= 1:
        return luigi.build(list(tasks), **options)
    # Worker processes are forked from here and inherit the BLAS thread setting: one thread
    # each, so N workers on N cores do not oversubscribe them with N x BLAS threads.
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return luigi.build(list(tasks), **options)


def exit_code(result, roots=None) -> int:
    """Process exit code for a Luigi run, from the ``[retcode]`` configuration.

    0 for success (also after retries); otherwise ``task_failed`` (30 by default),
    ``scheduling_error`` (35: e.g. the database was unreachable from ``complete()``),
    ``missing_data`` (20), ``not_run`` (25). With ``roots``, a "not run" outcome whose roots
    are all complete is success: with several hosts on one ``luigid``, another host may have
    run this host's tasks.
    """
    from luigi.retcodes import retcode

    codes = retcode()
    status = result.status
    if status in (LuigiStatusCode.SUCCESS, LuigiStatusCode.SUCCESS_WITH_RETRY):
        return 0
    if status == LuigiStatusCode.NOT_RUN and roots:
        db.close()
        try:
            if all(task.complete() for task in roots):
                return 0
        finally:
            db.close()
    mapping = {
        LuigiStatusCode.FAILED: codes.task_failed,
        LuigiStatusCode.FAILED_AND_SCHEDULING_FAILED: max(codes.task_failed, codes.scheduling_error),
        LuigiStatusCode.SCHEDULING_FAILED: codes.scheduling_error,
        LuigiStatusCode.NOT_RUN: codes.not_run,
        LuigiStatusCode.MISSING_EXT: codes.missing_data,
    }
    return int(mapping.get(status, codes.unhandled_exception)) or 1
