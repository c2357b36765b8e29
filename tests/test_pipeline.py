"""The pipeline library without Luigi: identities, chunk planning, train/infer/write, status, export."""

import json
from pathlib import Path

import numpy as np
import pytest

from astra_cannon import flags as F, pipeline, store
from astra_cannon.io.base import Spectra
from astra_cannon.models import CannonResult
from astra_cannon.model_noise import SeparableCovariance


@pytest.fixture
def env(tmp_path, monkeypatch, db_url):
    monkeypatch.setenv("ASTRA_CANNON_DATABASE_URL", db_url)
    monkeypatch.setenv("ASTRA_CANNON_WORK_DIR", str(tmp_path / "work"))
    return db_url


def _job(example_dir, **options):
    options.setdefault("chunk_size", 50)
    return pipeline.example_job(example_dir, **options)


def _identity(job):
    params = job.task_parameters()
    return pipeline.model_identity(training_set_sha256=params["training_set_sha256"],
                                   label_names=job.label_names, order=job.order,
                                   regularization=job.regularization, code_version=job.code_version)


# ---------------------------------------------------------------------------------- identities

def test_label_names_are_sorted_so_reordering_keeps_the_model_identity():
    a = pipeline.model_identity(training_set_sha256="a" * 64, label_names="TEFF,LOGG,FE_H", order=2,
                                regularization=0, code_version="1")
    b = pipeline.model_identity(training_set_sha256="a" * 64, label_names=["FE_H", "TEFF", "LOGG"],
                                order=2, regularization=0.0, code_version="1")
    assert a == b and pipeline.model_name(a) == pipeline.model_name(b)
    assert a["label_names"] == ["FE_H", "LOGG", "TEFF"]


@pytest.mark.parametrize("change", [dict(order=3), dict(regularization=1e-3), dict(code_version="2"),
                                    dict(training_set_sha256="b" * 64), dict(label_names="TEFF,LOGG")])
def test_each_significant_parameter_changes_the_model_name(change):
    base = dict(training_set_sha256="a" * 64, label_names="TEFF,LOGG,FE_H", order=2, regularization=0,
                code_version="1")
    assert pipeline.model_name(pipeline.model_identity(**base)) != \
        pipeline.model_name(pipeline.model_identity(**{**base, **change}))


def test_theta_covariance_enters_the_model_identity_only_when_not_auto():
    base = dict(training_set_sha256="a" * 64, label_names="TEFF,LOGG,FE_H", order=2, regularization=0,
                code_version="1")
    old = pipeline.model_identity(**base)
    assert "theta_covariance" not in old  # the identities of models from before the option
    assert pipeline.model_identity(**base, theta_covariance="auto") == old
    names = {pipeline.model_name(pipeline.model_identity(**base, theta_covariance=v))
             for v in pipeline.THETA_COVARIANCE}
    assert len(names) == 4
    assert [pipeline.training_theta_covariance(pipeline.model_identity(**base, theta_covariance=v))
            for v in pipeline.THETA_COVARIANCE] == ["auto", "exact", "separable", "none"]
    with pytest.raises(ValueError, match="theta_covariance"):
        pipeline.model_identity(**base, theta_covariance="yes")
    with pytest.raises(ValueError, match="theta_covariance"):
        pipeline.Job(training_set="t.fits", spectra=(), theta_covariance="sometimes")


def test_training_keeps_or_drops_the_theta_covariance_as_the_identity_says(env, example_dir, tmp_path):
    from astra_cannon import db

    db.connect(env)
    job = _job(example_dir, theta_covariance="never")
    params = job.task_parameters()
    assert params["theta_covariance"] == "never"
    identity = pipeline.model_identity(training_set_sha256=params["training_set_sha256"],
                                       label_names=job.label_names, order=job.order,
                                       regularization=job.regularization, code_version=job.code_version,
                                       theta_covariance=job.theta_covariance)
    model, row, summary = pipeline.train_and_register(training_set=job.training_set, identity=identity,
                                                      path=tmp_path / "never.npz")
    assert model.theta_cov is None
    assert any("no theta covariance" in w for w in summary["warnings"])
    assert row.name == pipeline.model_name(identity) != pipeline.model_name(_identity(job))
    model, _, _ = pipeline.train_and_register(training_set=job.training_set, identity=_identity(job),
                                              path=tmp_path / "auto.npz")
    assert isinstance(model.theta_cov, np.ndarray)  # 15 terms: "auto" keeps the exact one
    separable = pipeline.model_identity(**{**identity, "theta_covariance": "separable"})
    model, row, summary = pipeline.train_and_register(training_set=job.training_set, identity=separable,
                                                      path=tmp_path / "separable.npz")
    assert isinstance(model.theta_cov, SeparableCovariance)
    assert isinstance(type(model).read(tmp_path / "separable.npz").theta_cov, SeparableCovariance)
    assert not any("no theta covariance" in w for w in summary["warnings"])
    assert row.name not in (pipeline.model_name(identity), pipeline.model_name(_identity(job)))


@pytest.mark.parametrize("bad", ["", "TEFF,TEFF", "TEFF'; DROP TABLE cannon_result; --", "../etc", "A" * 80,
                                 "TE FF"])
def test_hostile_or_malformed_label_names_are_rejected(bad):
    with pytest.raises(ValueError):
        pipeline.normalise_label_names(bad)


# ------------------------------------------------------------------------------------- chunks

def test_plan_chunks_splits_files_by_rows_and_covers_every_spectrum_once(example_dir):
    job = _job(example_dir)
    chunks = pipeline.plan_chunks(job.spectra, 50, "example")
    assert [sum(s.size() for s in c) for c in chunks] == [50, 50, 20]
    # The second chunk spans two files (40 rows each).
    assert len(chunks[1]) == 2 and chunks[1][0].path != chunks[1][1].path
    covered = [(s.path, r) for c in chunks for s in c for r in range(s.start, s.stop)]
    assert len(covered) == len(set(covered)) == 120
    assert pipeline.plan_chunks(job.spectra, 50, "example") == chunks  # deterministic


def test_chunk_key_changes_with_the_segments_or_format():
    a = [pipeline.Segment("/x/a.fits", 0, 10)]
    b = [pipeline.Segment("/x/a.fits", 0, 11)]
    assert pipeline.chunk_key(a) != pipeline.chunk_key(b)
    assert pipeline.chunk_key(a, "example") != pipeline.chunk_key(a, "apstar")
    assert pipeline.segments_from_json(pipeline.segments_to_json(a)) == a


@pytest.mark.parametrize("text", ["", "[]", "{}", "[[1]]", "not json", '[["a", "x", 1]]'])
def test_malformed_segments_are_rejected(text):
    with pytest.raises(ValueError):
        pipeline.segments_from_json(text)


def test_a_file_without_a_cheap_row_count_is_one_whole_file_segment(tmp_path):
    missing = tmp_path / "missing.fits"
    chunks = pipeline.plan_chunks([missing, missing.with_name("other.fits")], 1, "example")
    assert chunks == [[pipeline.Segment(str(missing))], [pipeline.Segment(str(tmp_path / "other.fits"))]]
    with pytest.raises(ValueError):
        pipeline.plan_chunks([missing], 0)


def test_reader_flagged_spectra_are_not_fitted():
    class Model:
        label_names = ("A", "B")

        def test(self, flux, ivar):
            self.seen = flux.shape[0]
            n = flux.shape[0]
            meta = [{"flags": 0, "status": "ok", "fail_message": None} for _ in range(n)]
            return np.ones((n, 2)), np.tile(np.eye(2), (n, 1, 1)), meta

    spectra = Spectra(identifiers=["a", "b", "c"], flux=np.ones((3, 5)), ivar=np.ones((3, 5)),
                      wavelength=np.arange(5.0), flags=[0, F.UNREADABLE_INPUT, F.DUPLICATE_INPUT],
                      reasons=[None, "cannot read b.fits", None])
    model = Model()
    labels, cov, meta, reasons = pipeline.fit_spectra(model, spectra)
    assert model.seen == 2
    assert np.isnan(labels[1]).all() and np.isfinite(labels[[0, 2]]).all()
    assert meta[1]["status"] == "failed" and meta[1]["flags"] == F.UNREADABLE_INPUT
    assert reasons[1] == "cannot read b.fits"
    assert meta[2]["flags"] & F.DUPLICATE_INPUT  # warning bits from the reader are kept


# ------------------------------------------------------------------------- train, infer, write

@pytest.fixture
def trained(env, example_dir, tmp_path):
    from astra_cannon import db

    db.connect(env)
    job = _job(example_dir)
    identity = _identity(job)
    model, row, summary = pipeline.train_and_register(training_set=job.training_set, identity=identity,
                                                      path=tmp_path / "model.npz")
    return job, identity, model, row


def _infer(model, row, segments, task_id, rerun_failed=False):
    run = store.begin_task_run(task_family="test.InferChunk", task_id=task_id, parameters={})
    return pipeline.infer_chunk(model=model, model_pk=row.id, segments=segments, format="example",
                                task_run=run, rerun_failed=rerun_failed)


def test_infer_chunk_writes_one_row_per_spectrum_with_labels_close_to_truth(trained, example_dir):
    from astra_cannon.io.example import example_truth

    job, identity, model, row = trained
    assert pipeline.find_model(identity).id == row.id
    chunks = pipeline.plan_chunks(job.spectra, 50, "example")
    for i, segments in enumerate(chunks):
        summary = _infer(model, row, segments, f"chunk-{i}")
        assert summary["n_fitted"] == sum(s.size() for s in segments)
        assert store.task_complete(f"chunk-{i}")
    rows = store.read_results(row.id)
    assert len(rows) == 120 and len({r["spectrum_pk"] for r in rows}) == 120
    truth = {str(t["IDENTIFIER"]): t for t in example_truth(example_dir)}
    good = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert {r["identifier"] for r in failed} == {k for k, t in truth.items() if t["KIND"] != "good"}
    assert all(r["flags"] & F.FAILURE_FLAGS and r["reason"] for r in failed)
    dteff = np.array([r["teff"] - truth[r["identifier"]]["TEFF"] for r in good])
    dfeh = np.array([r["fe_h"] - truth[r["identifier"]]["FE_H"] for r in good])
    assert np.median(np.abs(dteff)) < 150 and np.median(np.abs(dfeh)) < 0.1


def test_a_second_pass_fits_nothing_and_rerun_failed_refits_only_failures(trained):
    job, identity, model, row = trained
    segments = pipeline.plan_chunks(job.spectra, 200, "example")[0]
    first = _infer(model, row, segments, "all")
    second = _infer(model, row, segments, "again")
    assert first["n_fitted"] == 120 and second["n_fitted"] == 0 and second["n_skipped"] == 120
    rerun = _infer(model, row, segments, "rerun", rerun_failed=True)
    assert rerun["n_fitted"] == first["n_failed"] == 4
    assert CannonResult.select().count() == 120


def test_rerun_tokens_name_the_chunks_holding_failures(trained):
    job, identity, model, row = trained
    chunks = pipeline.plan_chunks(job.spectra, 30, "example")
    for i, segments in enumerate(chunks):
        _infer(model, row, segments, f"c{i}")
    failed_rows = store.failed_results(row.id)
    tokens = pipeline.rerun_tokens(row.id, chunks)
    expected = {i for i, c in enumerate(chunks) for f in failed_rows
                if any(s.contains(f["path"], f["row"]) for s in c)}
    assert set(tokens) == expected and expected
    # After the failures are rewritten by another run, the tokens change (a new rerun may run).
    i = sorted(tokens)[0]
    _infer(model, row, chunks[i], "rerun", rerun_failed=True)
    assert pipeline.rerun_tokens(row.id, chunks)[i] != tokens[i]


def test_training_set_changed_since_scheduling_is_refused(env, example_dir, tmp_path):
    from astra_cannon import db

    db.connect(env)
    job = _job(example_dir)
    identity = dict(_identity(job), training_set_sha256="0" * 64)
    with pytest.raises(ValueError, match="changed"):
        pipeline.train_and_register(training_set=job.training_set, identity=identity, path=tmp_path / "m.npz")
    assert not (tmp_path / "m.npz").exists()


def test_status_report_lists_failed_runs_and_spectra(trained):
    job, identity, model, row = trained
    segments = pipeline.plan_chunks(job.spectra, 200, "example")[0]
    _infer(model, row, segments, "ok-chunk")
    run = store.begin_task_run(task_family="test.InferChunk", task_id="bad-chunk", parameters={})
    store.finish_task_run(run, status="failed", error=RuntimeError("disk on fire"))
    report = pipeline.status_report(row.id)
    assert report["task_runs"]["test.InferChunk"] == {"done": 1, "failed": 1}
    assert report["results"][0]["ok"] == 116 and report["results"][0]["failed"] == 4
    assert report["failed_task_runs"][0]["error_type"] == "RuntimeError"
    text = pipeline.format_status(report)
    assert "disk on fire" in text and "NO_INFORMATION" in text and "Failed spectra: 4" in text


def test_export_writes_a_fits_table_with_units_descriptions_and_failures(trained, tmp_path):
    from astropy.io import fits
    from astropy.table import Table

    from astra_cannon import export

    job, identity, model, row = trained
    _infer(model, row, pipeline.plan_chunks(job.spectra, 200, "example")[0], "x")
    out = tmp_path / "results.fits"
    info = export.export_results(out, model=row.id)
    assert info == {"path": str(out), "n_rows": 120, "n_failed": 4, "model_name": row.name}
    table = Table.read(out, hdu="CANNON")
    assert len(table) == 120 and str(table["TEFF"].unit) == "K"
    assert table["COVARIANCE"].shape == (120, 4, 4)
    raw = fits.getdata(out, "CANNON")
    failed = raw[raw["STATUS"] == "failed"]
    assert np.isnan(failed["TEFF"]).all() and (failed["FLAGS"] & F.FAILURE_FLAGS).all()
    header = fits.getheader(out, "CANNON")
    assert header["MODEL"] == row.name and "uncertainty" in header.comments["TTYPE5"]
    with pytest.raises(FileExistsError):
        export.export_results(out, model=row.id)
    assert export.export_results(out, model=row.name, include_failed=False, overwrite=True)["n_rows"] == 116


def test_job_validates_its_options(example_dir):
    with pytest.raises(ValueError):
        pipeline.Job(training_set="t.fits", spectra=("a.fits",), format="csv")
    with pytest.raises(ValueError):
        pipeline.Job(training_set="t.fits", spectra=("a.fits",), chunk_size=0)
    job = _job(example_dir, label_names=None)
    assert job.resolved_label_names() == ("ALPHA_FE", "FE_H", "LOGG", "TEFF")
    assert json.loads(json.dumps(job.task_parameters()))["order"] == 2


def test_unnormalised_spectra_are_normalised_with_model_continuum_pixels(trained):
    from dataclasses import replace

    job, identity, model, row = trained
    spectra = pipeline.read_chunk([pipeline.Segment(job.spectra[0], 0, 10)], "example", model.dispersion)
    assert pipeline.normalise_for_model(model, spectra) is spectra  # already normalised: untouched
    wl = spectra.wavelength
    continuum = 1e4 * (1.0 + 0.3 * (wl - wl.mean()) / np.ptp(wl))
    raw = replace(spectra, flux=spectra.flux * continuum, ivar=spectra.ivar / continuum**2, normalised=False)
    fixed = pipeline.normalise_for_model(model, raw)
    assert fixed.normalised
    good = (fixed.ivar > 0) & (spectra.ivar > 0)
    ok = (spectra.flags & F.FAILURE_FLAGS) == 0
    assert np.median(np.abs(fixed.flux - spectra.flux)[good & ok[:, None]]) < 0.02
    lab_raw = model.test(fixed.flux[ok], fixed.ivar[ok])[0]
    lab_ref = model.test(spectra.flux[ok], spectra.ivar[ok])[0]
    assert np.median(np.abs(lab_raw[:, identity["label_names"].index("TEFF")]
                            - lab_ref[:, identity["label_names"].index("TEFF")])) < 100


def test_load_model_keeps_the_test_table_beside_the_model_and_checks_the_registry(trained, monkeypatch):
    from astra_cannon import model as model_module
    from astra_cannon.model import ModelFileError

    job, identity, model, row = trained
    monkeypatch.setattr(model_module, "_TABLE_FILE_MIN_BYTES", 0)  # the example's table is small
    first = pipeline.load_model(row, label_names=identity["label_names"])
    table = Path(f"{row.path}.test-table.npy")
    assert table.exists() and Path(f"{table}.json").exists()
    again = pipeline.load_model(row, label_names=identity["label_names"])
    assert isinstance(again._theta_pairs[1], np.memmap)  # mapped by the next task, not rebuilt
    segments = pipeline.plan_chunks(job.spectra, 200, "example")[0]
    spectra = pipeline.read_chunk(segments, "example", again.dispersion)
    np.testing.assert_array_equal(pipeline.fit_spectra(again, spectra)[0], pipeline.fit_spectra(first, spectra)[0])
    row.file_checksum = "0" * 64
    with pytest.raises(ModelFileError, match="checksum"):
        pipeline.load_model(row)
