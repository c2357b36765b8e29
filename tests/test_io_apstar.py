"""apStar reading: layout, byte order, masking, rows, and per-file failures as flags."""

import time
import warnings

import numpy as np
import pytest
from fixtures_io import make_apstar_arrays, write_apstar

from astra_cannon import flags as F
from astra_cannon.io import grid, read_apstar, read_spectra, select_pixels, to_gap_removed


def test_big_endian_file_is_copied_to_native_float64(apstar_file):
    path, arrays = apstar_file
    s = read_apstar(path, rows="all")
    assert s.flux.dtype == np.float64 and s.flux.dtype.byteorder in "=<|"
    assert s.ivar.dtype.byteorder in "=<|"
    good = np.isfinite(arrays["flux"])
    np.testing.assert_allclose(s.flux[good], arrays["flux"][good])
    expected_ivar = np.where(good, 1.0 / np.where(good, arrays["sigma"], 1.0) ** 2, 0.0)
    expected_ivar[:, 1000] = 0.0  # BADPIX
    np.testing.assert_allclose(s.ivar, expected_ivar)
    np.testing.assert_allclose(s.wavelength, grid.apstar_wavelength(), rtol=0, atol=1e-8)
    assert s.flags.tolist() == [0] * 5 and not s.normalised


def test_rows_select_combined_visits_all_or_explicit(apstar_file):
    path, _ = apstar_file
    assert read_apstar(path).identifiers == ["apStar-synth-2M00000001+0000001.fits[0]"]
    visits = read_apstar(path, rows="visits")
    assert [m["row"] for m in visits.meta] == [2, 3, 4]
    assert [m["kind"] for m in visits.meta] == ["visit"] * 3
    assert [m["snr"] for m in visits.meta] == [100.0, 110.0, 120.0]
    assert len(read_apstar(path, rows="all")) == 5
    assert [m["row"] for m in read_apstar(path, rows=[4, 1]).meta] == [4, 1]
    out_of_range = read_apstar(path, rows=[7])
    assert out_of_range.flags[0] & F.BAD_INPUT_SHAPE and "rows" in out_of_range.reasons[0]


def test_header_metadata_and_provenance_are_json_safe(apstar_file):
    import json

    path, _ = apstar_file
    s = read_apstar(path)
    assert s.meta[0]["object_id"] == "2M00000001+0000001" and s.meta[0]["snr"] == 200.0
    assert s.sources[0]["path"] == path and len(s.sources[0]["sha256"]) == 64
    json.dumps(s.meta), json.dumps(s.sources)


def test_old_one_dimensional_layout_is_read_as_one_row(tmp_path, io_rng):
    flux, sigma, mask, _, _ = make_apstar_arrays(io_rng, n_rows=1)
    path = write_apstar(tmp_path / "apStar-old.fits", flux[0], sigma[0], mask[0])
    s = read_apstar(path, rows="visits")
    assert s.flux.shape == (1, 8575) and s.flags[0] == 0
    assert s.meta[0]["kind"] == "combined"


def test_nan_flux_and_nonpositive_sigma_get_zero_ivar_without_warnings(tmp_path, io_rng):
    flux, sigma, mask, _, _ = make_apstar_arrays(io_rng, n_rows=1)
    flux[0, 2000] = np.nan
    flux[0, 2001] = np.inf
    sigma[0, 2002] = 0.0
    sigma[0, 2003] = -1.0
    sigma[0, 2004] = 1e-200  # square underflows
    path = write_apstar(tmp_path / "apStar-nan.fits", flux, sigma, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = read_apstar(path)
    assert np.all(s.ivar[0, 2000:2004] == 0) and np.isfinite(s.ivar).all()
    assert np.isnan(s.flux[0, 2001])
    assert s.ivar[0, 2005] > 0


def test_header_grid_is_used_and_nwave_mismatch_is_a_shape_error(tmp_path, io_rng):
    flux, sigma, mask, _, _ = make_apstar_arrays(io_rng, n_rows=1)
    shifted = read_apstar(write_apstar(tmp_path / "a.fits", flux, sigma, mask, crval1=4.18))
    assert shifted.wavelength[0] == pytest.approx(10**4.18)
    bad = read_apstar(write_apstar(tmp_path / "b.fits", flux, sigma, mask, nwave=8000))
    assert bad.flags[0] & F.BAD_INPUT_SHAPE and "NWAVE" in bad.reasons[0]
    nokeys = read_apstar(write_apstar(tmp_path / "c.fits", flux, sigma, mask, keywords=False))
    assert nokeys.flags[0] == 0 and "default" in nokeys.meta[0]["wavelength_source"]


def test_every_hostile_file_is_flagged_while_the_batch_is_read(hostile_files):
    order = ["good", "not_fits", "truncated", "empty", "missing", "wrong_length", "wrong_grid",
             "all_masked", "bad_checksum"]
    paths = [hostile_files[k] for k in order]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = read_spectra(paths, wavelength=grid.apstar_wavelength(), verify_checksum=True)
    got = dict(zip(order, s.flags.tolist()))
    assert got["good"] == 0
    for key in ("not_fits", "truncated", "empty", "missing", "bad_checksum"):
        assert got[key] & F.UNREADABLE_INPUT, key
    assert got["wrong_length"] & F.BAD_INPUT_SHAPE
    assert got["wrong_grid"] & F.BAD_WAVELENGTH_GRID
    assert got["all_masked"] & F.NO_INFORMATION
    for i, key in enumerate(order[1:], start=1):
        assert hostile_files[key] in s.reasons[i], key
        if key != "all_masked":
            assert np.isnan(s.flux[i]).all() and not s.ivar[i].any(), key
    assert "checksum mismatch" in s.reasons[order.index("bad_checksum")]
    assert s.sources[0]["checksum"] == "ok"
    assert s.flux.shape == (len(order), 8575)


def test_checksum_is_only_checked_on_request(hostile_files):
    s = read_spectra([hostile_files["bad_checksum"]])
    assert s.flags[0] == 0 and s.sources[0]["checksum"] == "not checked"


def test_without_model_grid_the_first_readable_file_sets_the_grid(hostile_files):
    s = read_spectra([hostile_files["missing"], hostile_files["good"], hostile_files["wrong_length"]])
    assert s.flags.tolist()[1] == 0
    assert s.flags[0] & F.UNREADABLE_INPUT and s.flags[2] & F.BAD_INPUT_SHAPE
    only_bad = read_spectra([hostile_files["missing"]])
    assert only_bad.flux.shape == (1, 8575)


def test_same_file_twice_is_marked_duplicate(hostile_files):
    s = read_spectra([hostile_files["good"], hostile_files["good"]])
    assert s.flags[0] == 0 and s.flags[1] == F.DUPLICATE_INPUT


def test_model_on_gap_removed_grid_flags_unless_pixels_are_selected(apstar_file):
    path, arrays = apstar_file
    model_wl = grid.gap_removed_wavelength(7514)
    flagged = read_spectra([path], wavelength=model_wl)
    assert flagged.flags[0] & F.BAD_INPUT_SHAPE
    selected = read_spectra([path], wavelength=model_wl, select_model_pixels=True)
    assert selected.flags[0] == 0 and selected.flux.shape == (1, 7514)
    full = read_apstar(path)
    np.testing.assert_array_equal(selected.flux[0], full.flux[0, grid.gap_removed_indices(7514)])
    via_helper = to_gap_removed(full, 7514)
    np.testing.assert_array_equal(via_helper.flux, selected.flux)
    with pytest.raises(ValueError, match="not a subset"):
        select_pixels(full, model_wl + 0.05)
    with pytest.raises(ValueError, match="8575"):
        to_gap_removed(via_helper, 7214)


def test_configuration_errors_raise():
    with pytest.raises(ValueError, match="format"):
        read_spectra(["x.fits"], format="nope")
    with pytest.raises(ValueError, match="no paths"):
        read_spectra([])
    with pytest.raises(ValueError, match="rows"):
        read_spectra(["x.fits"], rows="some")


def test_real_dr17_apstar_files_are_read(real_apstar_paths):
    t0 = time.perf_counter()
    s = read_spectra(real_apstar_paths, rows="all")
    per_file = (time.perf_counter() - t0) / len(real_apstar_paths)
    assert len(s) == 2 + 5
    np.testing.assert_allclose(s.wavelength, grid.apstar_wavelength(), rtol=0, atol=1e-8)
    combined = [i for i, m in enumerate(s.meta) if m.get("row") == 0]
    for i in combined:
        assert s.flags[i] == 0
        frac = np.mean(s.ivar[i] > 0)
        assert 0.8 < frac < 0.95  # ~91% finite, minus masked pixels
        assert np.isfinite(s.flux[i][s.ivar[i] > 0]).all()
    assert {s.meta[i]["object_id"] for i in combined} == {"2M19485057+5005279", "2M17335483-2753043"}
    # The one-visit file's second combined row is empty in DR17: flagged, not fitted.
    one_visit = s.identifiers.index("apStar-dr17-2M19485057+5005279.fits[1]")
    assert s.flags[one_visit] & F.NO_INFORMATION
    assert per_file < 1.0


def test_example_format_is_dispatched_to_the_example_reader(tmp_path):
    example = pytest.importorskip("astra_cannon.io.example")
    try:
        example.generate_example(tmp_path / "ex", n_train=10, n_test=12, n_files=2)
    except FileNotFoundError as exc:  # package data not in place yet
        pytest.skip(f"example data unavailable: {exc}")
    paths = sorted(str(p) for p in (tmp_path / "ex" / "spectra").glob("*.fits"))
    s = read_spectra(paths + [str(tmp_path / "missing.fits")], format="example",
                     wavelength=grid.gap_removed_wavelength(7214))
    assert s.flux.shape == (13, 7214) and s.normalised
    assert s.flags[-1] & F.UNREADABLE_INPUT
    assert not np.any(s.flags[:-1] & (F.BAD_WAVELENGTH_GRID | F.BAD_INPUT_SHAPE))


def test_file_with_only_a_primary_hdu_or_a_table_is_flagged(tmp_path):
    from astropy.io import fits
    from astropy.table import Table

    only_primary = tmp_path / "apStar-primary.fits"
    fits.PrimaryHDU().writeto(only_primary)
    table = tmp_path / "apStar-table.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(Table({"a": [1.0]})),
                  fits.table_to_hdu(Table({"a": [1.0]}))]).writeto(table)
    s = read_spectra([str(only_primary), str(table)])
    assert s.flags[0] & F.UNREADABLE_INPUT and "HDU1" in s.reasons[0]
    assert s.flags[1] & F.BAD_INPUT_SHAPE
