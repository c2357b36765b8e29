"""validation_run: migration 0003 on a database at 0002 with data, and the store's writer
(both backends)."""

import pytest
from playhouse.schema_diff import diff_models

from astra_cannon import db as adb
from astra_cannon import store
from astra_cannon.models import ALL_MODELS, CannonResult, TaskRun, ValidationRun
from fixtures_db import FakeModel, fake_chunk, spectrum_sources

LABELS = ("TEFF", "LOGG", "FE_H")


def _cv_row(task_run=None, scatter_teff=50.0, **extra):
    return store.write_validation_run(
        kind="cross_validation", parameters={"n_folds": 5, "seed": 0, "label_names": list(LABELS)},
        training_set_hash="ab" * 32, label_names=LABELS, task_run=task_run, model_name="m", n_stars=300,
        bias={"TEFF": 1.5, "LOGG": -0.01, "FE_H": float("nan")},
        scatter={"TEFF": scatter_teff, "LOGG": 0.1, "FE_H": 0.05},
        results={"robust_scatter": {"TEFF": 40.0}}, plot_paths=["/tmp/cv.png"], **extra)


def test_upgrade_from_0002_with_data_adds_validation_run_and_keeps_rows(db_url):
    database = adb.connect(db_url, migrate=False)
    assert adb.migrate(database, target="0002_result_status_index") == ["0001_initial", "0002_result_status_index"]
    assert "validation_run" not in database.get_tables()
    model = store.register_model(name="m", model=FakeModel(), path="/m.npz", file_checksum="c", parameters={})
    pks = store.register_spectra(spectrum_sources(15))
    labels, cov, meta = fake_chunk(15, failed=[2])
    run = store.begin_task_run(task_family="T", task_id="c0", parameters={})
    store.write_chunk(task_run=run, model_pk=model.id, spectrum_pks=pks, label_names=LABELS, labels=labels,
                      cov=cov, meta=meta)
    before = database.execute_sql("SELECT spectrum_id, teff, flags, status FROM cannon_result "
                                  "ORDER BY spectrum_id").fetchall()

    assert adb.migrate(database) == ["0003_validation_run", "0004_double_precision"]
    assert adb.migrate(database) == []
    after = database.execute_sql("SELECT spectrum_id, teff, flags, status FROM cannon_result "
                                 "ORDER BY spectrum_id").fetchall()
    assert after == before and len(after) == 15
    assert "validation_run" in database.get_tables()
    assert not diff_models(database, list(ALL_MODELS))
    assert store.task_complete("c0") and CannonResult.select().count() == 15
    # the new table takes rows right away, pointing at an existing task run
    row = _cv_row(task_run=store.begin_task_run(task_family="CV", task_id="cv0", parameters={}))
    assert row.task_run_id is not None and store.task_complete("cv0")


def test_downgrade_drops_only_validation_run(db):
    assert adb.downgrade(db, target="0003_validation_run") == ["0004_double_precision", "0003_validation_run"]
    tables = set(db.get_tables())
    assert "validation_run" not in tables and {"cannon_result", "task_run"} <= tables
    assert adb.migrate(db) == ["0003_validation_run", "0004_double_precision"]


def test_validation_row_and_its_task_marker_are_written_together(db):
    run = store.begin_task_run(task_family="astra_cannon.CrossValidate", task_id="cv1", parameters={})
    assert not store.task_complete("cv1")
    row = _cv_row(task_run=run, summary={"n_used": 300})
    assert store.task_complete("cv1")
    stored = ValidationRun.get_by_id(row.id)
    assert stored.kind == "cross_validation" and stored.n_stars == 300
    assert stored.scatter["TEFF"] == 50.0 and stored.bias["FE_H"] is None  # NaN -> null
    assert stored.plot_paths == ["/tmp/cv.png"] and stored.chosen_regularization is None
    assert TaskRun.get_by_id(run.id).summary["n_used"] == 300

    # the same parameters again: one row, updated in place (idempotent reruns)
    again = _cv_row(scatter_teff=51.0)
    assert again.id == row.id and ValidationRun.select().count() == 1
    assert ValidationRun.get_by_id(row.id).scatter["TEFF"] == 51.0


def test_regularization_rows_store_the_choice_and_the_grid_edge(db):
    row = store.write_validation_run(kind="regularization", parameters={"grid": [0, 10, 100]},
                                     training_set_hash="cd" * 32, label_names=LABELS,
                                     chosen_regularization=100.0, at_grid_edge=True,
                                     results={"grid": [0.0, 10.0, 100.0], "nll": [3.0, 2.0, 1.0]})
    stored = store.read_validation_runs(kind="regularization")
    assert len(stored) == 1 and stored[0]["id"] == row.id
    assert stored[0]["chosen_regularization"] == 100.0 and stored[0]["at_grid_edge"] is True
    assert stored[0]["results"]["nll"] == [3.0, 2.0, 1.0] and stored[0]["task_run_pk"] is None
    assert store.read_validation_runs(kind="cross_validation") == []
    with pytest.raises(ValueError, match="kind"):
        store.write_validation_run(kind="oops", parameters={}, training_set_hash="x", label_names=LABELS)
