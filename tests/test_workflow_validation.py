"""Cross-validation and the regularisation choice as Luigi tasks and CLI commands; figures
written by training and by the CLI; Luigi status messages from the tasks."""

import sys
from pathlib import Path

import pytest

from astra_cannon import cli, pipeline, store, workflow
from astra_cannon.models import TaskRun, ValidationRun

FAST = ["--order", "1", "--labels", "TEFF,LOGG,FE_H"]  # 4 terms: each model trains in a blink


def _tasks():
    try:
        from astra_cannon import tasks
    except ImportError:
        import tasks
    return tasks


@pytest.fixture
def env(tmp_path, monkeypatch, db_url):
    from luigi.configuration import get_config
    from luigi.task_register import Register

    monkeypatch.setenv("ASTRA_CANNON_DATABASE_URL", db_url)
    monkeypatch.setenv("ASTRA_CANNON_WORK_DIR", str(tmp_path / "work"))
    cfg = get_config()
    saved = cfg.get("scheduler", "retry_count", None)
    cfg.set("scheduler", "retry_count", "1")
    Register.clear_instance_cache()
    from astra_cannon import db

    db.connect(db_url)  # migrate once, as the CLI does
    db.close()
    yield db_url
    Register.clear_instance_cache()
    if saved is not None:
        cfg.set("scheduler", "retry_count", saved)


def _job(example_dir):
    return pipeline.example_job(example_dir, order=1, label_names=("TEFF", "LOGG", "FE_H"))


def test_cross_validate_task_stores_bias_scatter_and_a_one_to_one_png(env, example_dir):
    tasks = _tasks()
    roots = tasks.job_tasks(_job(example_dir), kind="validate", n_folds=3, seed=1)
    assert tasks.exit_code(tasks.build(roots)) == 0
    with pipeline.connected():
        rows = store.read_validation_runs(kind="cross_validation")
        assert len(rows) == 1
        row = rows[0]
        assert row["parameters"]["n_folds"] == 3 and row["n_stars"] == 60
        assert set(row["bias"]) == {"TEFF", "LOGG", "FE_H"}
        assert 0 < row["scatter"]["TEFF"] < 300 and 0 < row["scatter"]["LOGG"] < 0.5
        assert Path(row["plot_paths"][0]).stat().st_size > 10_000
        assert TaskRun.get_by_id(row["task_run_pk"]).status == "done"
    # Complete now: a second build runs nothing and writes nothing.
    assert roots[0].complete()
    assert tasks.exit_code(tasks.build(tasks.job_tasks(_job(example_dir), kind="validate", n_folds=3,
                                                       seed=1))) == 0
    with pipeline.connected():
        assert TaskRun.select().where(TaskRun.task_family == "astra_cannon.CrossValidate").count() == 1


def test_choose_regularization_task_ignores_the_job_lambda_and_stores_the_choice(env, example_dir):
    tasks = _tasks()
    a = tasks.job_tasks(_job(example_dir), kind="regularization", grid=[0, 10, 1000])[0]
    job = _job(example_dir)
    job.regularization = 5.0
    b = tasks.job_tasks(job, kind="regularization", grid=[1000, 10, 0])[0]
    assert a.task_id == b.task_id  # the job's Lambda and the grid's order do not matter
    assert tasks.exit_code(tasks.build([a])) == 0
    with pipeline.connected():
        row = workflow.find_validation_run("regularization", a.parameters())
    assert row["chosen_regularization"] in (0.0, 10.0, 1000.0)
    assert row["at_grid_edge"] == (row["chosen_regularization"] != 10.0)
    assert row["results"]["grid"] == [0.0, 10.0, 1000.0] and len(row["results"]["nll"]) == 3


def test_cli_validate_prints_the_table_and_a_rerun_reuses_the_stored_row(env, example_dir, capsys):
    args = ["validate", "--example-dir", str(example_dir), *FAST, "--folds", "3"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "3-fold cross-validation" in out and "TEFF" in out and "one-to-one figure:" in out
    png = Path(out.split("one-to-one figure: ")[1].split()[0])
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(args) == 0
    assert "stored as validation_run 1" in capsys.readouterr().out
    with pipeline.connected():
        assert ValidationRun.select().count() == 1


def test_cli_choose_regularization_warns_at_the_grid_edge(env, example_dir, capsys):
    args = ["choose-regularization", "--example-dir", str(example_dir), *FAST, "--grid", "0,1e4"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "chosen Lambda:" in captured.out and "<- best" in captured.out
    assert "WARNING" in captured.out and "edge of the grid" in captured.err
    assert cli.main(["choose-regularization", "--example-dir", str(example_dir), *FAST, "--grid", "0"]) == 2


def test_training_writes_a_theta_png_next_to_the_model_and_cli_plots(env, example_dir, capsys):
    assert cli.main(["train", "--example-dir", str(example_dir), *FAST, "-q"]) == 0
    capsys.readouterr()
    with pipeline.connected():
        run = TaskRun.get(TaskRun.task_family == "astra_cannon.TrainModel")
    png = Path(run.summary["plots"][0])
    assert png.name.endswith(".theta.png") and png.parent == Path(run.summary["path"]).parent
    assert png.read_bytes()[:4] == b"\x89PNG"

    out_png = Path(env.split("///")[-1] if env.startswith("sqlite") else "/tmp").parent / "model-cli.png"
    assert cli.main(["plot", "model", "-o", str(out_png)]) == 0
    assert out_png.exists() and "wrote" in capsys.readouterr().out
    assert cli.main(["plot", "residuals", "no-such-spectrum"]) == 2
    assert "no spectrum" in capsys.readouterr().err


def test_cli_plots_the_residuals_of_a_labelled_spectrum(env, example_dir, capsys, tmp_path):
    spectra = sorted(str(p) for p in (Path(example_dir) / "spectra").glob("*.fits"))[:1]
    args = ["infer", "--training-set", str(Path(example_dir) / "training_set.fits"), "--spectra", *spectra,
            *FAST, "-q"]
    assert cli.main(args) == 0
    with pipeline.connected():
        ident = next(r["identifier"] for r in store.read_results() if r["status"] == "ok")
    capsys.readouterr()
    output = tmp_path / "resid.png"
    assert cli.main(["plot", "residuals", ident, "-o", str(output)]) == 0
    assert output.read_bytes()[:4] == b"\x89PNG"


def test_training_without_matplotlib_skips_the_figure_and_still_trains(env, example_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" now raises ImportError
    job = _job(example_dir)
    identity = pipeline.model_identity(training_set_sha256=pipeline.file_sha256(job.training_set),
                                       label_names=job.label_names, order=1, regularization=0.0,
                                       code_version="t")
    path = Path(pipeline.config.work_dir()) / "m.npz"
    with pipeline.connected():
        model, row, summary = pipeline.train_and_register(training_set=job.training_set, identity=identity,
                                                          path=path)
    assert model.is_trained and summary["plots"] == [] and not pipeline.model_plot_path(path).exists()


def test_infer_chunk_and_train_model_report_luigi_status_and_progress(env, example_dir):
    tasks = _tasks()
    job = _job(example_dir)
    job.spectra, job.chunk_size = job.spectra[:1], 40
    train = tasks.job_tasks(job, kind="train")[0]
    chunk = tasks.job_tasks(job)[0].requires()[0]
    for task in (train, chunk):
        messages, percents = [], []
        task.set_status_message, task.set_progress_percentage = messages.append, percents.append
        task.run()
        assert percents[0] == 0 and percents[-1] == 100 and percents == sorted(percents)
        assert messages and "done" in messages[-1]
    assert any("fitting" in m for m in messages) and all(m.startswith("chunk 1/1") for m in messages)


def test_help_lists_the_workflow_commands_and_bars_stay_off_without_a_terminal(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("validate", "choose-regularization", "plot", "--label-table", "--format apstar"):
        assert command in out
    bar = workflow.progress_bar(3, "x")  # pytest captures stderr: not a terminal
    bar.update(1)
    bar.close()
    assert capsys.readouterr().err == ""
    assert workflow.parse_cuts(["SNR:100:", "LOGG::3.9"]) == {"SNR": (100.0, None), "LOGG": (None, 3.9)}
    for bad in (["SNR"], ["SNR::"], ["SNR:a:"], ["X:5:1"]):
        with pytest.raises(ValueError, match="cut"):
            workflow.parse_cuts(bad)
