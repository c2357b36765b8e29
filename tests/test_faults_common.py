"""Shared fixtures and helpers of the fault tests (tests/test_faults_*.py); no tests here.

``faults_env``: a fresh database (both backends, via ``db_url``), a work dir, Luigi failing
fast (one attempt per task), fresh Luigi caches, the schema migrated and the database closed
(as the CLI leaves it before Luigi forks). ``trained_job``: the small example job (one file,
40 spectra, two chunks of 20) with its model already trained and registered, so fault tests
spend their time on inference.
"""

import multiprocessing
import os
import traceback

import pytest

from astra_cannon import db as adb, pipeline
from astra_cannon.models import CannonResult, Spectrum, TaskRun

TIMEOUT = 120


def tasks_module():
    try:
        from astra_cannon import tasks
    except ImportError:  # source checkout: tasks/ is astra_cannon.tasks once installed
        import tasks
    return tasks


@pytest.fixture
def faults_env(tmp_path, monkeypatch, db_url):
    from luigi.configuration import get_config
    from luigi.task_register import Register

    tasks = tasks_module()
    monkeypatch.setenv("ASTRA_CANNON_DATABASE_URL", db_url)
    monkeypatch.setenv("ASTRA_CANNON_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.delenv("ASTRA_CANNON_KILL_AT", raising=False)
    cfg = get_config()
    saved = cfg.get("scheduler", "retry_count", None)
    cfg.set("scheduler", "retry_count", "1")
    Register.clear_instance_cache()
    tasks.clear_completion_cache()
    adb.connect(db_url)
    adb.close()
    yield db_url
    adb.close()
    Register.clear_instance_cache()
    tasks.clear_completion_cache()
    if saved is not None:
        cfg.set("scheduler", "retry_count", saved)


def small_job(example_dir, chunk_size=20, n_files=1, **options):
    job = pipeline.example_job(example_dir, chunk_size=chunk_size, **options)
    job.spectra = job.spectra[:n_files]
    return job


def build(job, **kwargs):
    """Run a job's root task with Luigi; return (LuigiRunResult, exit code)."""
    tasks = tasks_module()
    opts = {k: kwargs.pop(k) for k in ("rerun_failed", "tag", "kind") if k in kwargs}
    result = tasks.build(tasks.job_tasks(job, **opts), **kwargs)
    return result, tasks.exit_code(result)


@pytest.fixture(scope="session")
def faults_model_file(example_dir, tmp_path_factory):
    """The small job's model, trained once per session (training is not under test here)."""
    from astra_cannon import CannonModel, PolynomialVectorizer

    job = small_job(example_dir)
    identity = tasks_module().TrainModel(**job.task_parameters()).identity()
    labels, names, flux, ivar, wavelength = pipeline.read_training_set(job.training_set, identity["label_names"])
    model = CannonModel(labels, flux, ivar, PolynomialVectorizer(list(names), identity["order"]),
                        dispersion=wavelength)
    model.train()
    path = tmp_path_factory.mktemp("faults_model") / "model.npz"
    model.write(path)
    return path


@pytest.fixture
def trained_job(faults_env, example_dir, faults_model_file):
    """The small job with its model in place and registered, exactly as TrainModel leaves it."""
    import shutil

    from astra_cannon import CannonModel, store

    job = small_job(example_dir)
    task = tasks_module().TrainModel(**job.task_parameters())
    path = task.model_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(faults_model_file, path)
    with pipeline.connected():
        store.register_model(name=pipeline.model_name(task.identity()), model=CannonModel.read(path),
                             path=str(path), file_checksum=pipeline.file_sha256(path),
                             parameters=task.identity())
        run = store.begin_task_run(task_family=task.get_task_family(), task_id=task.task_id,
                                   parameters=task._provenance())
        store.finish_task_run(run, status="done")
    assert task.complete()
    tasks_module().clear_completion_cache()
    return job


def integrity(url=None):
    """Consistency facts of the database: rows, distinct keys, unmarked and orphan rows."""
    with pipeline.connected(url) as database:
        n_rows = CannonResult.select().count()
        n_keys = CannonResult.select(CannonResult.model, CannonResult.spectrum).distinct().count()
        unmarked = (CannonResult.select().join(TaskRun, on=(CannonResult.task_run == TaskRun.id))
                    .where(TaskRun.status != "done").count())
        no_run = database.execute_sql(
            "SELECT COUNT(*) FROM cannon_result r LEFT JOIN task_run t ON t.id = r.task_run_id "
            "WHERE t.id IS NULL").fetchone()[0]
        no_spectrum = database.execute_sql(
            "SELECT COUNT(*) FROM cannon_result r LEFT JOIN spectrum s ON s.id = r.spectrum_id "
            "WHERE s.id IS NULL").fetchone()[0]
        check = (database.execute_sql("PRAGMA integrity_check").fetchone()[0]
                 if adb.is_sqlite(database) else "ok")
        n_spectra = Spectrum.select().count()
    return dict(rows=n_rows, keys=n_keys, unmarked=unmarked, orphans=no_run + no_spectrum,
                integrity=check, spectra=n_spectra)


def run_in_child(target, *args, env=None, timeout=TIMEOUT):
    """Run ``target(*args)`` in a forked process; return its exit code (-9 when SIGKILLed).

    The child reports an exception as exit code 97 after printing its traceback.
    """
    def main():
        try:
            if env:
                os.environ.update(env)
            code = target(*args)
        except BaseException:  # noqa: BLE001 - report, then a distinctive exit code
            traceback.print_exc()
            os._exit(97)
        os._exit(int(code or 0))

    proc = multiprocessing.get_context("fork").Process(target=main)
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(10)
        pytest.fail(f"child process did not finish within {timeout} s")
    return proc.exitcode
