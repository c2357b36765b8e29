"""Bad input of every kind through the real pipeline (catalogue 1-9, 19, 23-24, 26-27, 15).

One Luigi run labels a mix of good, spoiled and broken files: every spectrum gets exactly one
row, a bad one a flag and a reason (NULL labels when it could not be fitted), and the run as a
whole succeeds. A training set with missing labels and a damaged model file fail their task
clearly, writing nothing.
"""

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from astra_cannon import flags as F, pipeline, store
from astra_cannon.io import example as ex
from astra_cannon.models import CannonResult, TaskRun
from test_faults_common import (  # noqa: F401 - fixtures
    build, faults_env, faults_model_file, integrity, small_job, tasks_module, trained_job)


def _write_example_file(path, flux, ivar, wavelength, identifiers, dtype=np.float32):
    ids = Table({"IDENTIFIER": np.array(identifiers), "ROW": np.arange(len(identifiers)),
                 "SNR": np.full(len(identifiers), 100.0)})
    ex._write_fits(path, [fits.PrimaryHDU(), ex._image(np.asarray(flux, dtype=dtype), "FLUX"),
                          ex._image(np.asarray(ivar, dtype=dtype), "IVAR"),
                          ex._wavelength_hdu(wavelength), ex._named(fits.table_to_hdu(ids), "IDS")])


@pytest.fixture
def bad_inputs(trained_job, example_dir, tmp_path):
    """Files of every kind of bad input; returns (job over them, {identifier: expectation})."""
    with fits.open(trained_job.spectra[0]) as hdul:
        flux = np.array(hdul["FLUX"].data[:8], dtype=np.float64)
        ivar = np.array(hdul["IVAR"].data[:8], dtype=np.float64)
        wl = np.array(hdul["WAVELENGTH"].data, dtype=np.float64)
    flux, ivar = np.where(np.isfinite(flux), flux, 1.0), np.where(np.isfinite(flux), ivar, 0.0)
    rng = np.random.default_rng(5)
    P = wl.size
    f, iv = flux.copy(), ivar.copy()
    px = rng.choice(P, 200, replace=False)
    f[1, px[:100]], f[1, px[100:150]], f[1, px[150:]] = np.nan, np.inf, -np.inf      # 1: non-finite flux
    iv[2, px[:100]], iv[2, px[100:150]], iv[2, px[150:]] = -1.0, np.nan, np.inf      # 2: bad ivar
    iv[3] = 0.0                                                                       # 3: all masked
    f[4], iv[4] = np.nan, 0.0                                                         # 4: all NaN
    keep = rng.choice(P, 3, replace=False)                                            # 5: 3 pixels < L + 1
    iv[5] = 0.0
    iv[5, keep] = 1e4
    iv[6, px[:100]] = 0.0                                                             # 6: negative-free zero ivar
    f[7] *= 1e6                                                                       # 7: unnormalised
    d = tmp_path / "inputs"
    d.mkdir()
    ids = [f"bad-{k}" for k in range(8)]
    _write_example_file(d / "mixed.fits", f, iv, wl, ids)
    # Same good spectra as float64 (big-endian on disk, like all FITS): must agree with float32.
    _write_example_file(d / "float64.fits", flux[[0, 6]], ivar[[0, 6]], wl, ["f64-0", "f64-6"], np.float64)
    _write_example_file(d / "float32.fits", flux, ivar, wl, [f"f32-{k}" for k in range(8)], np.float32)
    # Wrong pixel count (own 7000-pixel grid), inconsistent shapes, not FITS, truncated, missing.
    _write_example_file(d / "short.fits", flux[:2, :7000], ivar[:2, :7000], wl[:7000], ["short-0", "short-1"])
    hdus = [fits.PrimaryHDU(), ex._image(flux[:2].astype(np.float32), "FLUX"),
            ex._image(ivar[:2, :7000].astype(np.float32), "IVAR"), ex._wavelength_hdu(wl),
            ex._named(fits.table_to_hdu(Table({"IDENTIFIER": ["shape-0", "shape-1"], "ROW": [0, 1],
                                                "SNR": [1.0, 1.0]})), "IDS")]
    ex._write_fits(d / "inconsistent.fits", hdus)
    (d / "not-fits.fits").write_text("SIMPLE? no, this is text\n" * 100)
    raw = (d / "mixed.fits").read_bytes()
    (d / "truncated.fits").write_bytes(raw[: len(raw) // 2])
    files = ["mixed", "float64", "float32", "short", "inconsistent", "not-fits", "truncated", "missing"]
    paths = [str(d / f"{name}.fits") for name in files]
    # Chunk 1: the 18 readable, normalised spectra; later chunks: the broken files.
    job = small_job(example_dir, chunk_size=20)
    # float64.fits listed twice (duplicate spectra in one chunk): chunk 1 = 8 + 2 + 2 + 8 rows.
    job.spectra = (paths[0], paths[1], paths[1], *paths[2:])
    return job


def _rows():
    with pipeline.connected():
        return {r["identifier"]: r for r in store.read_results()}


def test_every_kind_of_bad_input_gives_one_row_each_flagged_never_a_crash(bad_inputs):
    job = bad_inputs
    result, code = build(job)
    assert code == 0, result.summary_text
    rows = _rows()
    state = integrity()
    assert state["rows"] == state["keys"] == len(rows) and state["unmarked"] == 0

    def ok(identifier):
        r = rows[identifier]
        assert r["status"] == "ok" and np.isfinite([r["teff"], r["logg"], r["fe_h"]]).all(), r
        return r

    def failed(identifier, bit):
        r = rows[identifier]
        assert r["status"] == "failed" and r["teff"] is None and r["flags"] & bit, (identifier, r["flags"], r["reason"])
        assert r["reason"], r
        return r

    assert np.isclose(ok("bad-0")["teff"], ok("f32-0")["teff"], rtol=1e-7)  # same values, another row
    for k in (1, 2, 6):  # non-finite flux, NaN/inf/negative ivar, masked pixels: just masked
        spoiled, clean = ok(f"bad-{k}"), ok(f"f32-{k}")
        assert abs(spoiled["teff"] - clean["teff"]) < 3 * clean["e_teff"] + 1.0, (spoiled, clean)
    failed("bad-3", F.NO_INFORMATION)
    failed("bad-4", F.NO_INFORMATION)
    failed("bad-5", F.FEW_PIXELS | F.NO_INFORMATION)  # fewer than L + 1 usable pixels
    failed("bad-7", F.UNNORMALISED_FLUX)  # x1e6 flux in a normalised batch: flagged, not fitted
    for k in ("0", "6"):  # float32 and float64 (big-endian) copies of the same values agree
        a, b = rows[f"f32-{k}"], rows[f"f64-{k}"]
        assert np.allclose([a["teff"], a["logg"], a["fe_h"]], [b["teff"], b["logg"], b["fe_h"]], rtol=1e-6, atol=1e-6)
    for identifier in ("short-0", "short-1"):
        failed(identifier, F.BAD_WAVELENGTH_GRID | F.BAD_INPUT_SHAPE)
    by_path = {}
    for r in rows.values():
        by_path.setdefault(Path(r["identifier"]).name, r)
    for name in ("inconsistent.fits", "not-fits.fits", "truncated.fits", "missing.fits"):
        assert name in by_path, sorted(rows)
        failed(by_path[name]["identifier"], F.UNREADABLE_INPUT)
    # float64.fits twice: still one row per spectrum, flagged as duplicated input.
    assert sum(1 for i in rows if i.startswith("f64-")) == 2
    assert all(rows[i]["flags"] & F.DUPLICATE_INPUT for i in ("f64-0", "f64-6"))


def test_training_set_with_missing_labels_fails_training_clearly_and_writes_nothing(faults_env, example_dir,
                                                                                     tmp_path, caplog):
    source = Path(example_dir) / "training_set.fits"
    damaged = tmp_path / "training_set.fits"
    with fits.open(source) as hdul:
        hdus = [h.copy() for h in hdul]
    hdus[1].data["TEFF"][[3, 7]] = np.nan
    ex._write_fits(damaged, hdus)
    job = small_job(example_dir)
    job.training_set = str(damaged)
    result, code = build(job)
    assert code == 30, result.summary_text
    with pipeline.connected():
        failed = store.failed_task_runs()
        assert [f["task_family"] for f in failed] == ["astra_cannon.TrainModel"]
        assert failed[0]["error_type"] == "ValueError"
        message = failed[0]["error_message"]
        assert CannonResult.select().count() == 0
    assert "TEFF" in message or "label" in message.lower(), message


def test_model_file_damaged_after_training_fails_the_chunk_and_writes_nothing(trained_job):
    from astra_cannon import ModelFileError

    tasks = tasks_module()
    root = tasks.job_tasks(trained_job)[0]
    chunk = root.requires()[0]
    path = chunk.model_path()
    path.write_bytes(b"\x00" * 64 + path.read_bytes()[64:])  # corrupted in place
    with pytest.raises(ModelFileError):
        chunk.run()
    with pipeline.connected():
        run = TaskRun.get(TaskRun.task_id == chunk.task_id)
        assert run.status == "failed" and run.error_type == "ModelFileError"
        assert CannonResult.select().count() == 0
    assert not chunk.complete()


def test_an_unreadable_file_does_not_change_the_labels_of_other_spectra_in_its_chunk(bad_inputs):
    job = bad_inputs
    d = Path(job.spectra[0]).parent
    # Chunk 1: float32.fits alone (8 rows). Chunk 2: float64.fits (the same values for rows 0
    # and 6) together with a missing file.
    job.spectra = (str(d / "float32.fits"), str(d / "float64.fits"), str(d / "missing.fits"))
    job.chunk_size = 8
    result, code = build(job)
    assert code == 0, result.summary_text
    rows = _rows()
    for k in ("0", "6"):
        a, b = rows[f"f32-{k}"], rows[f"f64-{k}"]
        # Floating-point agreement: the two chunks batch different numbers of spectra, and the
        # BLAS rounds a product of 2 rows differently from one of 8, which can move where the
        # optimiser stops within its tolerance (1e-10 in chi2, ~1e-5 sigma; seen 1e-5 sigma
        # with 2 BLAS threads). Anything the other file could do would be far larger.
        for label in ("teff", "logg"):
            assert abs(a[label] - b[label]) <= 1e-4 * a["e_" + label], (label, a[label], b[label], a["e_" + label])
