"""Luigi tasks end to end on the small example (local scheduler, SQLite and PostgreSQL)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import peewee as pw
import pytest

from astra_cannon import pipeline, store
from astra_cannon.models import CannonResult, TaskRun

REPO = Path(__file__).resolve().parents[1]


def _tasks():
    try:
        from astra_cannon import tasks
    except ImportError:  # source checkout: the folder tasks/ is astra_cannon.tasks once installed
        import tasks
    return tasks


@pytest.fixture
def luigi_env(tmp_path, monkeypatch, db_url):
    """A database and work dir for the run; fail fast (no retries) and fresh Luigi caches."""
    import luigi
    from luigi.configuration import get_config
    from luigi.task_register import Register

    tasks = _tasks()
    monkeypatch.setenv("ASTRA_CANNON_DATABASE_URL", db_url)
    monkeypatch.setenv("ASTRA_CANNON_WORK_DIR", str(tmp_path / "work"))
    cfg = get_config()
    saved = cfg.get("scheduler", "retry_count", None)
    cfg.set("scheduler", "retry_count", "1")
    Register.clear_instance_cache()
    tasks.clear_completion_cache()
    from astra_cannon import db

    db.connect(db_url)  # migrate once, as the CLI does
    db.close()
    yield db_url
    Register.clear_instance_cache()
    tasks.clear_completion_cache()
    if saved is not None:
        cfg.set("scheduler", "retry_count", saved)
    assert luigi  # imported for its side effects on the config singleton


def _job(example_dir, **options):
    options.setdefault("chunk_size", 50)
    return pipeline.example_job(example_dir, **options)


def _small_job(example_dir, **options):
    """40 spectra (one file) in 2 chunks: enough for behaviour tests, and fast."""
    job = _job(example_dir, **options)
    job.spectra, job.chunk_size = job.spectra[:1], 20
    return job


def _build(job, **kwargs):
    tasks = _tasks()
    opts = {k: kwargs.pop(k) for k in ("rerun_failed", "tag", "kind") if k in kwargs}
    result = tasks.build(tasks.job_tasks(job, **opts), **kwargs)
    return result, tasks.exit_code(result)


def _counts():
    with pipeline.connected():
        return (CannonResult.select().count(),
                CannonResult.select(CannonResult.spectrum, CannonResult.model).distinct().count(),
                TaskRun.select().count(),
                CannonResult.select(pw.fn.MAX(CannonResult.updated)).scalar())


def test_luigi_run_labels_every_spectrum_once_and_a_rerun_does_nothing(luigi_env, example_dir):
    from astra_cannon.io.example import example_truth

    job = _job(example_dir)
    result, code = _build(job)
    assert code == 0, result.summary_text
    n_rows, n_keys, n_runs, last_update = _counts()
    assert n_rows == n_keys == 120
    assert n_runs == 1 + 3  # TrainModel + 3 chunks, all done
    with pipeline.connected():
        rows = store.read_results()
        assert {r.status for r in TaskRun.select()} == {"done"}
    truth = {str(t["IDENTIFIER"]): t for t in example_truth(example_dir)}
    good = [r for r in rows if r["status"] == "ok"]
    assert len(good) == 116
    assert np.median([abs(r["logg"] - truth[r["identifier"]]["LOGG"]) for r in good]) < 0.2

    _tasks().clear_completion_cache()
    result, code = _build(job)
    assert code == 0
    assert _counts() == (n_rows, n_keys, n_runs, last_update)  # no task ran, nothing written


def test_a_chunk_failing_in_the_middle_is_recorded_and_rerun_failed_fixes_it(luigi_env, example_dir, monkeypatch):
    job = _job(example_dir)
    real_fit = pipeline.fit_spectra
    middle = pipeline.plan_chunks(job.spectra, 50, "example")[1]
    middle_ids = set()

    def flaky_fit(model, spectra):
        if any(s["path"] == middle[0].path and s["row"] == middle[0].start for s in spectra.sources):
            middle_ids.update(spectra.identifiers)
            raise RuntimeError("injected failure in the middle chunk")
        return real_fit(model, spectra)

    monkeypatch.setattr(pipeline, "fit_spectra", flaky_fit)
    result, code = _build(job)
    assert code == 30, result.summary_text
    with pipeline.connected():
        failed = store.failed_task_runs()
        assert len(failed) == 1 and failed[0]["error_type"] == "RuntimeError"
        run = TaskRun.get_by_id(failed[0]["task_run_pk"])
        assert "injected failure" in run.traceback and "Traceback" in run.traceback
        assert CannonResult.select().count() == 70  # the other two chunks; nothing of the middle one
        report = pipeline.format_status(pipeline.status_report())
    assert "injected failure in the middle chunk" in report

    monkeypatch.setattr(pipeline, "fit_spectra", real_fit)
    _tasks().clear_completion_cache()
    result, code = _build(job, rerun_failed=True)
    assert code == 0, result.summary_text
    n_rows, n_keys, _, _ = _counts()
    assert n_rows == n_keys == 120
    with pipeline.connected():
        assert store.failed_task_runs() == []


def test_rerun_failed_overwrites_failed_rows_in_place(luigi_env, example_dir):
    job = _small_job(example_dir)
    assert _build(job)[1] == 0
    with pipeline.connected():
        before = {r["spectrum_pk"]: r for r in store.read_results()}
    result, code = _build(job, rerun_failed=True)
    assert code == 0
    with pipeline.connected():
        after = {r["spectrum_pk"]: r for r in store.read_results()}
    assert len(after) == 40
    changed = {pk for pk in after if after[pk]["task_run_pk"] != before[pk]["task_run_pk"]}
    assert changed == {pk for pk, r in before.items() if r["status"] == "failed"}
    assert all(after[pk]["id"] == before[pk]["id"] for pk in after)  # same rows, updated in place


def test_code_version_change_makes_new_rows_and_leaves_old_ones(luigi_env, example_dir):
    old = _small_job(example_dir)
    assert _build(old)[1] == 0
    with pipeline.connected():
        old_rows = {r["id"]: r["updated"] for r in store.read_results()}
    new = _small_job(example_dir, code_version="9.9.9")
    assert _build(new)[1] == 0
    with pipeline.connected():
        rows = store.read_results()
    assert len(rows) == 80 and len({r["model_pk"] for r in rows}) == 2
    assert {r["id"]: r["updated"] for r in rows if r["id"] in old_rows} == old_rows


def test_a_job_without_the_theta_covariance_writes_its_own_rows_with_the_plain_uncertainties(luigi_env, example_dir):
    auto = _small_job(example_dir)
    assert _build(auto)[1] == 0
    never = _small_job(example_dir, theta_covariance="never")
    assert _build(never)[1] == 0
    with pipeline.connected():
        rows = store.read_results()
    by_model = {}
    for r in rows:
        if r["status"] == "ok":
            by_model.setdefault(r["model_pk"], {})[r["identifier"]] = np.sqrt(np.diag(r["covariance"]))
    assert len(by_model) == 2  # a model row each, and result rows each
    corrected, plain = (by_model[k] for k in sorted(by_model))
    common = sorted(set(corrected) & set(plain))
    assert len(common) > 30
    # 300 training stars for 15 terms: the model's noise is a large part of the uncertainty
    ratio = np.array([corrected[i] / plain[i] for i in common])
    assert np.all(np.median(ratio, axis=0) > 1.2), np.median(ratio, axis=0)


def test_hostile_tag_is_stored_verbatim_and_hostile_parameters_are_rejected(luigi_env, example_dir):
    tasks = _tasks()
    hostile = "x'); DROP TABLE cannon_result; -- \u00e9 \" \\ %s {}"
    job = _small_job(example_dir)
    result, code = _build(job, kind="train", tag=hostile)
    assert code == 0
    with pipeline.connected():
        run = TaskRun.get(TaskRun.task_family == "astra_cannon.TrainModel")
        assert run.parameters["tag"] == hostile
        assert CannonResult.select().count() == 0  # the table still exists
    params = job.task_parameters()
    for name, value in (("label_names", "TEFF; DROP TABLE x"), ("code_version", "1.0'; --"),
                        ("training_set_sha256", "' OR '1'='1"), ("order", 0)):
        with pytest.raises(ValueError):
            tasks.TrainModel(**{**params, name: value})
    with pytest.raises(ValueError):
        tasks.InferAll(**params, spectra=list(job.spectra), format="x' OR 1=1")


def test_label_order_does_not_change_the_task_id(luigi_env, example_dir):
    tasks = _tasks()
    params = _job(example_dir).task_parameters()
    a = tasks.TrainModel(**{**params, "label_names": "TEFF,LOGG,FE_H,ALPHA_FE"})
    b = tasks.TrainModel(**{**params, "label_names": "ALPHA_FE,FE_H,LOGG,TEFF"})
    c = tasks.TrainModel(**{**params, "tag": "other", "progress": True})  # insignificant
    assert a.task_id == b.task_id == c.task_id


def test_theta_covariance_at_auto_leaves_the_task_ids_of_earlier_jobs_unchanged(luigi_env, example_dir):
    from luigi.task import task_id_str

    tasks = _tasks()
    params = _job(example_dir).task_parameters()
    auto = tasks.TrainModel(**params)
    significant = auto.to_str_params(only_significant=True, only_public=True)
    assert "theta_covariance" not in significant
    # the id a task of these parameters had before the option existed
    assert auto.task_id == task_id_str(auto.get_task_family(), significant)
    always = tasks.TrainModel(**{**params, "theta_covariance": "always"})
    assert always.task_id != auto.task_id
    assert always.identity()["theta_covariance"] == "always" and "theta_covariance" not in auto.identity()
    assert always.model_path() != auto.model_path()
    # the infer tasks follow: a model with the covariance makes other result rows
    segments = [pipeline.Segment(path=_job(example_dir).spectra[0], start=0, stop=5)]
    chunk = dict(chunk_key=pipeline.chunk_key(segments), segments=pipeline.segments_to_json(segments))
    assert always.clone(tasks.InferChunk, **chunk).task_id != auto.clone(tasks.InferChunk, **chunk).task_id


def test_database_errors_propagate_from_complete(luigi_env, example_dir, tmp_path, monkeypatch):
    tasks = _tasks()
    job = _small_job(example_dir)
    bad = tmp_path / "a-directory"
    bad.mkdir()
    monkeypatch.setenv("ASTRA_CANNON_DATABASE_URL", f"sqlite:///{bad}")
    root = tasks.job_tasks(job)[0]
    with pytest.raises(pw.OperationalError):
        root.complete()
    result = tasks.build([root])
    assert tasks.exit_code(result) == 35  # scheduling failed: nothing ran


def test_shipped_luigi_defaults_are_installed_below_user_config():
    from luigi.configuration import get_config

    tasks = _tasks()
    shipped = tasks.read_defaults()
    assert shipped["retcode"]["task_failed"] == "30"
    assert shipped["worker"]["check_complete_on_run"] == "true"
    cfg = get_config()
    assert cfg.getint("retcode", "task_failed") == 30
    assert cfg.getboolean("worker", "keep_alive") is True
    cfg.set("retcode", "not_run", "99")
    try:
        assert "not_run" not in tasks.install_luigi_defaults().get("retcode", {})
        assert cfg.getint("retcode", "not_run") == 99
    finally:
        cfg.set("retcode", "not_run", shipped["retcode"]["not_run"])


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["before_marker", "after_commit"])
def test_sigkill_during_a_run_then_rerun_gives_one_row_per_spectrum(luigi_env, example_dir, tmp_path, kill_at):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    job = _small_job(example_dir)
    args = [sys.executable, "-m", "astra_cannon.cli", "run", "--training-set", job.training_set,
            "--spectra", *job.spectra, "--chunk-size", "20", "-q"]
    killed = subprocess.run(args, env=dict(env, ASTRA_CANNON_KILL_AT=kill_at), capture_output=True,
                            text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    with pipeline.connected():
        unmarked = (CannonResult.select().join(TaskRun, on=(CannonResult.task_run == TaskRun.id))
                    .where(TaskRun.status != "done").count())
        n_first = CannonResult.select().count()
    assert unmarked == 0
    assert n_first == (20 if kill_at == "after_commit" else 0)  # the first chunk, committed
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    n_rows, n_keys, _, _ = _counts()
    assert n_rows == n_keys == 40
