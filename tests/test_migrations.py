"""Schema migrations (peewee's playhouse.migrations runner) on both backends."""

import multiprocessing

from playhouse.schema_diff import diff_models

from astra_cannon import db as adb
from astra_cannon import store
from astra_cannon.models import ALL_MODELS, CannonResult
from fixtures_db import FakeModel, fake_chunk, spectrum_sources

HEAD = ["0001_initial", "0002_result_status_index", "0003_validation_run", "0004_double_precision"]
LABELS = ("TEFF", "LOGG", "FE_H")


def test_migrate_applies_every_migration_once_then_is_a_no_op(db_url):
    database = adb.connect(db_url, migrate=False)
    assert adb.migration_status(database) == [(name, False) for name in HEAD]
    assert adb.migrate(database) == HEAD
    assert adb.migrate(database) == []
    assert adb.connect(db_url).get_tables()  # connect() migrates: also a no-op now
    assert adb.migration_status() == [(name, True) for name in HEAD]


def test_migrated_schema_matches_the_models(db):
    diff = diff_models(db, list(ALL_MODELS))
    assert not diff, str(diff)


def test_upgrade_from_0001_keeps_rows(db_url):
    database = adb.connect(db_url, migrate=False)
    assert adb.migrate(database, target="0001_initial") == ["0001_initial"]
    assert "cannon_result_model_id_status" not in {i.name for i in database.get_indexes("cannon_result")}
    model = store.register_model(name="m", model=FakeModel(), path="/m.npz", file_checksum="c", parameters={})
    pks = store.register_spectra(spectrum_sources(20))
    labels, cov, meta = fake_chunk(20, failed=[3])
    run = store.begin_task_run(task_family="T", task_id="c0", parameters={})
    store.write_chunk(task_run=run, model_pk=model.id, spectrum_pks=pks, label_names=LABELS, labels=labels,
                      cov=cov, meta=meta)
    before = database.execute_sql("SELECT spectrum_id, teff, flags FROM cannon_result ORDER BY spectrum_id").fetchall()

    assert adb.migrate(database) == ["0002_result_status_index", "0003_validation_run", "0004_double_precision"]
    after = database.execute_sql("SELECT spectrum_id, teff, flags FROM cannon_result ORDER BY spectrum_id").fetchall()
    assert after == before and len(after) == 20
    assert "cannon_result_model_id_status" in {i.name for i in database.get_indexes("cannon_result")}
    assert store.task_complete("c0") and CannonResult.select().count() == 20
    assert not diff_models(database, list(ALL_MODELS))


def test_down_and_up_round_trip(db):
    assert adb.downgrade(db) == ["0004_double_precision"]
    assert adb.downgrade(db, target="0001_initial") == ["0003_validation_run", "0002_result_status_index",
                                                         "0001_initial"]
    assert not {"cannon_result", "spectrum", "task_run", "cannon_model"} & set(db.get_tables())
    assert adb.migrate(db) == HEAD
    assert not diff_models(db, list(ALL_MODELS))


def _connect_and_migrate(url, barrier, results):
    barrier.wait()
    try:
        adb.connect(url)
        results.put("ok")
    except Exception as exc:  # noqa: BLE001
        results.put(repr(exc))


def test_concurrent_first_connections_migrate_exactly_once(db_url):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(4, timeout=30), ctx.Queue()
    procs = [ctx.Process(target=_connect_and_migrate, args=(db_url, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [results.get(timeout=5) for _ in procs] == ["ok"] * 4
    database = adb.connect(db_url, migrate=False)
    assert database.execute_sql("SELECT COUNT(*) FROM schema_migration").fetchone()[0] == len(HEAD)
    assert adb.migrate(database) == []


def test_float_columns_keep_double_precision_on_every_backend(db):
    import numpy as np

    if isinstance(db, __import__("peewee").PostgresqlDatabase):
        real = db.execute_sql("SELECT table_name, column_name FROM information_schema.columns "
                              "WHERE table_schema = current_schema() AND data_type = 'real'").fetchall()
        assert real == []
    model = store.register_model(name="m", model=FakeModel(), path="/m.npz", file_checksum="c", parameters={})
    pks = store.register_spectra(spectrum_sources(3))
    labels, cov, meta = fake_chunk(3)
    labels[:, 0] = [4654.260989254771, 4654.260979505814, 1.0 + 2.0**-40]  # apart below float32's digits
    meta[0]["chi_sq"] = 8123.456789012345
    run = store.begin_task_run(task_family="T", task_id="c0", parameters={})
    store.write_chunk(task_run=run, model_pk=model.id, spectrum_pks=pks, label_names=LABELS, labels=labels,
                      cov=cov, meta=meta)
    rows = db.execute_sql("SELECT teff, e_teff, chi2 FROM cannon_result ORDER BY spectrum_id").fetchall()
    assert [r[0] for r in rows] == labels[:, 0].tolist()
    assert [r[1] for r in rows] == np.sqrt(cov[:, 0, 0]).tolist()
    assert rows[0][2] == 8123.456789012345
    # and the view, re-created around the change, still answers
    assert db.execute_sql("SELECT COUNT(*) FROM cannon_result_view").fetchone()[0] == 3
