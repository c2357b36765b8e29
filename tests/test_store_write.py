"""store.write_chunk and friends on both backends: schema, idempotency, NULLs, JSON, blobs."""

import math

import numpy as np
import peewee as pw
import pytest

from astra_cannon import flags, store
from astra_cannon.models import LABEL_COLUMNS, CannonResult, Spectrum, TaskRun, TrainedModel, covariance_from_blob
from fixtures_db import FakeModel, fake_chunk, spectrum_sources

LABELS = ("TEFF", "LOGG", "FE_H")


def _model(name="test model", ts_hash="a" * 64, parameters=None):
    return store.register_model(name=name, model=FakeModel(training_set_hash=ts_hash), path="/m/model.npz",
                                file_checksum="c" * 64, parameters=parameters or {"order": 2})


def _write(model, spectrum_pks, labels, cov, meta, task_id="chunk-0", **kwargs):
    run = store.begin_task_run(task_family="CannonTest", task_id=task_id,
                               parameters={"chunk": task_id}, code_version="test")
    summary = store.write_chunk(task_run=run, model_pk=model.id, spectrum_pks=spectrum_pks,
                                label_names=LABELS, labels=labels, cov=cov, meta=meta, **kwargs)
    return run, summary


def test_sql_user_can_select_label_columns_with_plain_sql(db):
    model = _model()
    pks = store.register_spectra(spectrum_sources(5))
    labels, cov, meta = fake_chunk(5)
    for i, r in enumerate([1.0, 2.0, 4.0, 0.5, 10.0]):
        meta[i]["r_chi_sq"] = r
    _write(model, pks, labels, cov, meta)

    rows = db.execute_sql("SELECT teff, e_teff, logg, fe_h FROM cannon_result WHERE rchi2 < 3 "
                          "ORDER BY spectrum_id").fetchall()
    keep = [0, 1, 3]
    assert len(rows) == 3
    np.testing.assert_allclose([r[0] for r in rows], labels[keep, 0])
    np.testing.assert_allclose([r[1] for r in rows], np.sqrt(cov[keep, 0, 0]))
    np.testing.assert_allclose([r[2] for r in rows], labels[keep, 1])
    np.testing.assert_allclose([r[3] for r in rows], labels[keep, 2])


def test_view_puts_identifier_and_model_name_next_to_labels(db):
    model = _model(name="dr17 giants")
    pks = store.register_spectra(spectrum_sources(3))
    labels, cov, meta = fake_chunk(3)
    _write(model, pks, labels, cov, meta)
    rows = db.execute_sql("SELECT identifier, model_name, teff FROM cannon_result_view "
                          "ORDER BY identifier").fetchall()
    assert [r[0] for r in rows] == ["star-00000", "star-00001", "star-00002"]
    assert {r[1] for r in rows} == {"dr17 giants"}
    np.testing.assert_allclose([r[2] for r in rows], labels[:, 0])


def test_write_chunk_twice_leaves_one_row_per_key_and_overwrites_in_place(db):
    model = _model()
    pks = store.register_spectra(spectrum_sources(6))
    labels, cov, meta = fake_chunk(6, failed=[2])
    run1, summary = _write(model, pks, labels, cov, meta)
    assert summary["n_failed"] == 1 and summary["n_ok"] == 5
    first_ids = dict(CannonResult.select(CannonResult.spectrum, CannonResult.id).tuples())

    assert store.pending_spectrum_pks(model.id, pks) == []
    assert store.pending_spectrum_pks(model.id, pks, include_failed=True) == [pks[2]]

    # Rerun the failed spectrum successfully: same row (same id), labels now present.
    labels2, cov2, meta2 = fake_chunk(6, seed=1)
    run2, _ = _write(model, pks, labels2, cov2, meta2, task_id="chunk-0-rerun")
    assert CannonResult.select().count() == 6
    assert dict(CannonResult.select(CannonResult.spectrum, CannonResult.id).tuples()) == first_ids
    row = CannonResult.get(CannonResult.spectrum == pks[2])
    assert row.status == "ok" and row.flags == 0 and row.reason is None
    assert row.teff == pytest.approx(labels2[2, 0])
    assert row.task_run_id == run2.id
    assert store.pending_spectrum_pks(model.id, pks, include_failed=True) == []
    assert store.failed_results(model.id) == []


def test_failed_rows_have_null_labels_flag_and_reason_on_both_backends(db):
    model = _model()
    pks = store.register_spectra(spectrum_sources(4))
    labels, cov, meta = fake_chunk(4, failed=[1])
    # A row that claims success but carries a NaN label is a failure too, never a NaN row.
    labels[3, 1] = np.nan
    _write(model, pks, labels, cov, meta, reasons=[None, None, None, None])

    n_null = db.execute_sql("SELECT COUNT(*) FROM cannon_result WHERE teff IS NULL").fetchone()[0]
    assert n_null == 2
    if isinstance(db, pw.PostgresqlDatabase):
        assert db.execute_sql("SELECT COUNT(*) FROM cannon_result WHERE teff = 'NaN' "
                              "OR rchi2 = 'NaN' OR chi2 = 'NaN'").fetchone()[0] == 0
    failed = {r["spectrum_pk"]: r for r in store.failed_results()}
    assert set(failed) == {pks[1], pks[3]}
    assert failed[pks[1]]["flags"] & flags.FEW_PIXELS
    assert failed[pks[1]]["reason"] == "only 2 usable pixels"
    assert failed[pks[1]]["identifier"] == "star-00001"
    assert flags.is_failure(failed[pks[3]]["flags"]) and "non-finite" in failed[pks[3]]["reason"]
    row = CannonResult.get(CannonResult.spectrum == pks[1])
    assert row.labels is None and row.covariance is None and row.e_teff is None
    assert row.chi2 is None and row.n_pixels == 2 and row.status == "failed"
    # The whole row set of the ok rows is finite.
    ok = CannonResult.get(CannonResult.spectrum == pks[0])
    assert all(math.isfinite(getattr(ok, c)) for c in ("teff", "logg", "fe_h", "e_teff", "rchi2"))


def test_json_columns_accept_numpy_scalars_and_store_nan_as_null(db):
    model = store.register_model(
        name="json", model=FakeModel(censors={"TEFF": np.array([True, False])}), path="/m.npz",
        file_checksum="x", parameters={"order": np.int64(2), "reg": np.float32(0.5),
                                       "bad": float("nan"), "inf": float("inf"), "arr": np.arange(3)})
    pks = store.register_spectra(spectrum_sources(2))
    labels, cov, meta = fake_chunk(2)
    meta[0]["x0"] = [np.float64(1.0), float("nan"), np.float32(2.0)]
    run, _ = _write(model, pks, labels, cov, meta,
                    summary={"n_read": np.int64(2), "ratio": np.float64("nan")})
    stored = TrainedModel.get_by_id(model.id)
    assert stored.parameters == {"order": 2, "reg": 0.5, "bad": None, "inf": None, "arr": [0, 1, 2]}
    assert stored.censoring == {"TEFF": [True, False]}
    assert stored.label_names == list(LABELS) and stored.polynomial_order == 2
    row = CannonResult.get(CannonResult.spectrum == pks[0])
    assert row.x0 == [1.0, None, 2.0]
    assert row.labels == dict(zip(LABELS, labels[0].tolist()))
    summary = TaskRun.get_by_id(run.id).summary
    assert summary["n_read"] == 2 and summary["ratio"] is None and summary["n_results"] == 2
    # A later finish_task_run merges its summary with the stored counts.
    assert store.finish_task_run(run, status="done", summary={"wall": np.float32(1.5)})
    assert TaskRun.get_by_id(run.id).summary == dict(summary, wall=1.5)


def test_covariance_blob_round_trips_bit_exact(db):
    model = _model()
    pks = store.register_spectra(spectrum_sources(3))
    labels, cov, meta = fake_chunk(3)
    cov[1, 0, 2] = cov[1, 2, 0] = -1.2345678901234567e-7
    _write(model, pks, labels, cov, meta)
    raw = db.execute_sql("SELECT covariance FROM cannon_result WHERE spectrum_id = " + db.param,
                         (pks[1],)).fetchone()[0]
    expected_type = memoryview if isinstance(db, pw.PostgresqlDatabase) else bytes
    assert isinstance(raw, expected_type)
    assert len(bytes(raw)) == 9 * 8
    np.testing.assert_array_equal(covariance_from_blob(raw), cov[1])
    by_api = store.read_results(model.id, [pks[1]])[0]
    np.testing.assert_array_equal(by_api["covariance"], cov[1])
    assert by_api["identifier"] == "star-00001"


def test_hostile_strings_are_stored_verbatim(db):
    hostile = ["x'); DROP TABLE cannon_result; --", "Robert'); DROP TABLE spectrum;--",
               'quote " double', "back\\slash", "semi; colon", "percent %s %(x)s ?", "ünïcødé ✓"]
    model = _model(name=hostile[0])
    sources = [dict(identifier=h, path=h, hdu=0, row=0, checksum=h) for h in hostile]
    pks = store.register_spectra(sources)
    labels, cov, meta = fake_chunk(len(hostile), failed=range(len(hostile)))
    run = store.begin_task_run(task_family=hostile[1], task_id=hostile[2], parameters={hostile[3]: hostile[4]})
    store.write_chunk(task_run=run, model_pk=model, spectrum_pks=pks, label_names=LABELS, labels=labels,
                      cov=cov, meta=meta, reasons=hostile)
    assert TrainedModel.get_by_id(model.id).name == hostile[0]
    assert [Spectrum.get_by_id(pk).identifier for pk in pks] == hostile
    assert {r["spectrum_pk"]: r["reason"] for r in store.failed_results()} == dict(zip(pks, hostile))
    stored = TaskRun.get_by_id(run.id)
    assert (stored.task_family, stored.task_id, stored.parameters) == (hostile[1], hostile[2], {hostile[3]: hostile[4]})
    assert store.task_complete(hostile[2]) and not store.task_complete(hostile[0])
    assert set(db.get_tables()) >= {"cannon_result", "spectrum", "task_run", "cannon_model"}


def test_duplicate_spectra_in_a_chunk_become_one_flagged_row(db):
    model = _model()
    pks = store.register_spectra(spectrum_sources(3))
    labels, cov, meta = fake_chunk(4)
    _, summary = _write(model, [pks[0], pks[1], pks[0], pks[2]], labels, cov, meta)
    assert CannonResult.select().count() == 3 and summary["n_duplicates"] == 1
    row = CannonResult.get(CannonResult.spectrum == pks[0])
    assert row.flags & flags.DUPLICATE_INPUT and row.teff == pytest.approx(labels[0, 0])


def test_bad_shapes_raise_before_anything_is_written(db):
    model = _model()
    pks = store.register_spectra(spectrum_sources(3))
    labels, cov, meta = fake_chunk(3)
    run = store.begin_task_run(task_family="T", task_id="bad", parameters={})
    with pytest.raises(ValueError, match="shape"):
        store.write_chunk(task_run=run, model_pk=model.id, spectrum_pks=pks[:2], label_names=LABELS,
                          labels=labels, cov=cov, meta=meta)
    with pytest.raises(ValueError, match="meta"):
        store.write_chunk(task_run=run, model_pk=model.id, spectrum_pks=pks, label_names=LABELS,
                          labels=labels, cov=cov, meta=meta[:1])
    assert CannonResult.select().count() == 0 and not store.task_complete("bad")


def test_unknown_task_run_rolls_back_the_results(db):
    model = _model()
    pks = store.register_spectra(spectrum_sources(2))
    labels, cov, meta = fake_chunk(2)
    with pytest.raises(pw.IntegrityError):
        store.write_chunk(task_run=987654, model_pk=model.id, spectrum_pks=pks, label_names=LABELS,
                          labels=labels, cov=cov, meta=meta)
    assert CannonResult.select().count() == 0


def test_chunk_larger_than_one_insert_batch(db):
    # With every label column, one INSERT holds 32766 // 88 = 372 rows (SQLite's variable
    # limit), so 400 rows need two statements in the one transaction.
    names = tuple(c.upper() for c in LABEL_COLUMNS)
    n = 400
    model = store.register_model(name="wide", model=FakeModel(label_names=names), path="/m",
                                 file_checksum="c", parameters={})
    pks = store.register_spectra(spectrum_sources(n))
    labels, cov, meta = fake_chunk(n, label_names=names, failed=[7])
    run = store.begin_task_run(task_family="T", task_id="wide", parameters={})
    summary = store.write_chunk(task_run=run, model_pk=model.id, spectrum_pks=pks, label_names=names,
                                labels=labels, cov=cov, meta=meta)
    assert summary["n_results"] == n and CannonResult.select().count() == n
    assert store.pending_spectrum_pks(model.id, pks, include_failed=True) == [pks[7]]
    last = CannonResult.get(CannonResult.spectrum == pks[-1])
    assert last.yb_fe == pytest.approx(labels[-1, -1]) and last.e_yb_fe == pytest.approx(np.sqrt(cov[-1, -1, -1]))


def test_task_completion_and_failure_records(db):
    assert not store.task_complete("t1")
    run = store.begin_task_run(task_family="Fam", task_id="t1", parameters={"a": 1})
    assert TaskRun.get_by_id(run.id).status == "running" and not store.task_complete("t1")
    try:
        raise RuntimeError("boom ' quote")
    except RuntimeError as exc:
        assert store.finish_task_run(run, status="failed", error=exc, summary={"n": np.int64(1)})
    stored = TaskRun.get_by_id(run.id)
    assert (stored.error_type, stored.error_message) == ("RuntimeError", "boom ' quote")
    assert "Traceback" in stored.traceback and stored.elapsed >= 0 and stored.finished is not None
    assert [r["task_id"] for r in store.failed_task_runs()] == ["t1"]

    run2 = store.begin_task_run(task_family="Fam", task_id="t1", parameters={"a": 1})
    assert store.finish_task_run(run2.id, status="done")
    assert store.task_complete("t1")
    assert store.completed_task_ids(["t1", "t2", "x' OR '1'='1"]) == {"t1"}
    assert store.failed_task_runs() == []  # resolved by the later success
    assert len(store.failed_task_runs(include_resolved=True)) == 1
    # Never raises, whatever it is given.
    assert store.finish_task_run(run2, status="bogus") is False
    assert store.finish_task_run(123456789, status="done") is False


def test_register_model_and_spectra_are_idempotent(db):
    m1 = _model(parameters={"order": 2, "regularization": 0.0})
    m2 = store.register_model(name="renamed", model=FakeModel(training_set_hash="a" * 64), path="/new.npz",
                              file_checksum="d" * 64, parameters={"regularization": 0.0, "order": 2})
    assert m1.id == m2.id and TrainedModel.select().count() == 1
    assert TrainedModel.get_by_id(m1.id).path == "/new.npz"
    m3 = _model(parameters={"order": 3})
    assert m3.id != m1.id

    sources = spectrum_sources(4)
    pks = store.register_spectra(sources)
    again = store.register_spectra(list(reversed(sources)) + [sources[0]])
    assert again == list(reversed(pks)) + [pks[0]]
    assert Spectrum.select().count() == 4
    with pytest.raises(ValueError, match="identifier"):
        store.register_spectra([{"path": "/x"}])
    with pytest.raises(ValueError):
        store.register_model(name="x", model=FakeModel(training_set_hash=""), path="p", file_checksum="c",
                             parameters={})
