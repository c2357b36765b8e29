"""The shipped Bovy model and grid, and the example data generator and readers."""

import hashlib
import json

import numpy as np
import pytest
from astropy.io import fits

from astra_cannon import flags
from astra_cannon.data import (DATA_DIR, apogee_chips, apogee_wavelength, bovy_model_arrays,
                               bovy_training_labels, compute_apogee_wavelength)
from astra_cannon.io.base import Spectra
from astra_cannon.io.example import (bovy_model, example_truth, generate_example,
                                     read_example_spectra, read_example_training_set,
                                     read_manifest)

LABELS = ["TEFF", "LOGG", "FE_H", "ALPHA_FE"]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _truth_labels(truth):
    return np.stack([np.asarray(truth[n], dtype=float) for n in LABELS], axis=1)


# ----------------------------------------------------------------------------- package data

def test_shipped_npz_files_load_without_pickle_and_hold_plain_arrays():
    files = sorted(DATA_DIR.glob("*.npz"))
    assert {f.name for f in files} >= {"bovy_cannon_dr10_apokasc_gc.npz",
                                       "bovy_cannon_dr10_training_labels.npz",
                                       "apogee_wavelength_7214.npz"}
    for f in files:
        with np.load(f, allow_pickle=False) as npz:
            for key in npz.files:
                assert npz[key].dtype != object, (f.name, key)
    assert (DATA_DIR / "ATTRIBUTION.md").read_text().count("BSD-3-Clause") >= 1


def test_bovy_model_arrays_have_documented_shapes():
    arrays = bovy_model_arrays()
    assert arrays["coeffs"].shape == (15, 7214)
    assert arrays["scatter"].shape == (7214,)
    assert list(arrays["label_names"]) == LABELS
    np.testing.assert_array_equal(arrays["baseline_labels"], [4500, 2, -0.3, 0.05])


def test_shipped_wavelength_grid_matches_apstar_formula_and_chips():
    wl = apogee_wavelength()
    assert wl.shape == (7214,)
    np.testing.assert_allclose(wl, compute_apogee_wavelength(), rtol=0, atol=1e-9)
    assert wl[0] == pytest.approx(15168.1285, abs=1e-3)
    assert wl[-1] == pytest.approx(16936.7470, abs=1e-3)
    assert np.all(np.diff(wl) > 0)
    np.testing.assert_array_equal(apogee_chips(), [[0, 2920], [2920, 5320], [5320, 7214]])


def test_shipped_wavelength_grid_matches_the_payne_grid(shared_data_dir):
    path = shared_data_dir / "apogee_grid" / "payne_apogee_wavelength_7214.npz"
    if not path.exists():
        pytest.skip("Payne wavelength grid not available")
    with np.load(path, allow_pickle=False) as npz:
        payne = npz["wavelength"]
    np.testing.assert_allclose(apogee_wavelength(), payne, rtol=0, atol=1e-8)


def test_shipped_model_is_identical_to_the_shared_source(shared_data_dir):
    source = shared_data_dir / "emulators" / "bovy_cannon_dr10_apokasc_gc.npz"
    if not source.exists():
        pytest.skip("Bovy model source not available")
    assert _sha(source) == _sha(DATA_DIR / "bovy_cannon_dr10_apokasc_gc.npz")


def test_shipped_training_labels_are_the_1801_real_stars():
    data = bovy_training_labels()
    assert data["labels"].shape == (1801, 4)
    assert data["apogee_id"].shape == (1801,)
    assert str(data["apogee_id"][0]).startswith("2M")
    lo, hi = data["labels"].min(axis=0), data["labels"].max(axis=0)
    np.testing.assert_allclose(lo, [3632.88, -0.35636, -2.36275, -0.029], atol=1e-6)
    np.testing.assert_allclose(hi, [5120.0, 3.57072, 0.354257, 0.491201], atol=1e-6)


# ----------------------------------------------------------------------------- the model

def test_bovy_model_reproduces_the_documented_reference_spectrum():
    flux = bovy_model().flux([[4800, 2.5, 0.0, 0.0]])[0]
    assert flux.min() == pytest.approx(0.53, abs=0.005)
    assert np.median(flux) == pytest.approx(0.98, abs=0.005)
    assert flux.max() == pytest.approx(1.08, abs=0.005)


def test_bovy_model_at_baseline_labels_is_the_constant_term():
    model = bovy_model()
    np.testing.assert_allclose(model(model.baseline_labels)[0], model.coeffs[0], atol=1e-12)


def test_bovy_model_flux_is_vectorised_and_equals_the_written_formula():
    model = bovy_model()
    rng = np.random.default_rng(0)
    labels = model.label_range[0] + rng.random((5, 4)) * np.ptp(model.label_range, axis=0)
    x = labels - model.baseline_labels
    expected = []
    for xi in x:
        terms = [1.0, *xi] + [xi[i] * xi[j] for i in range(4) for j in range(i, 4)]
        expected.append(np.asarray(terms) @ model.coeffs)
    np.testing.assert_allclose(model.flux(labels), np.array(expected), rtol=1e-12, atol=1e-12)
    assert model.term_indices[5] == (0, 0) and model.term_indices[6] == (0, 1)


def test_bovy_model_rejects_wrong_number_of_labels():
    with pytest.raises(ValueError, match=r"expected \(N, 4\)"):
        bovy_model().flux(np.zeros((2, 3)))


# ----------------------------------------------------------------------------- generation

def test_example_layout_matches_the_manifest(example_dir):
    manifest = read_manifest(example_dir)
    assert manifest["label_names"] == LABELS
    assert manifest["parameters"]["n_test"] == 120
    assert [e["n_spectra"] for e in manifest["spectra"]] == [40, 40, 40]
    entries = [manifest["training_set"], manifest["truth"], *manifest["spectra"]]
    for entry in entries:
        path = example_dir / entry["path"]
        assert path.stat().st_size == entry["size_bytes"]
        assert _sha(path) == entry["sha256"]
    with fits.open(example_dir / manifest["spectra"][0]["path"], checksum=True) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "FLUX", "IVAR", "WAVELENGTH", "IDS"]
        assert hdul["FLUX"].data.shape == (40, 7214)
        assert hdul["IVAR"].data.shape == (40, 7214)
        assert hdul["WAVELENGTH"].data.shape == (7214,)
        assert hdul["WAVELENGTH"].header["BUNIT"] == "Angstrom"
        assert "Bovy" in hdul[0].header["COMMENT"][0]
    with fits.open(example_dir / "training_set.fits", checksum=True) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "LABELS", "FLUX", "IVAR", "WAVELENGTH"]
        assert hdul["FLUX"].data.shape == (60, 7214)
        assert list(hdul["LABELS"].columns.names) == ["APOGEE_ID", *LABELS, "SNR"]


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path):
    kwargs = dict(n_train=8, n_test=12, n_files=2)
    first = generate_example(tmp_path / "a", seed=11, **kwargs)
    second = generate_example(tmp_path / "b", seed=11, **kwargs)
    other = generate_example(tmp_path / "c", seed=12, **kwargs)
    assert first == second
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    assert first["training_set"]["sha256"] != other["training_set"]["sha256"]
    assert first["spectra"][0]["sha256"] != other["spectra"][0]["sha256"]


def test_generate_refuses_to_overwrite_unless_asked(tmp_path):
    generate_example(tmp_path, n_train=3, n_test=6, n_files=1, bad_spectra=())
    with pytest.raises(FileExistsError):
        generate_example(tmp_path, n_train=3, n_test=6, n_files=1)
    generate_example(tmp_path, n_train=3, n_test=6, n_files=1, overwrite=True)


def test_generate_rejects_more_files_than_spectra(tmp_path):
    with pytest.raises(ValueError, match="n_test >= n_files"):
        generate_example(tmp_path, n_train=3, n_test=2, n_files=3)


def test_example_labels_snr_and_bad_pixels_follow_the_recipe(example_dir):
    truth = example_truth(example_dir)
    labels = _truth_labels(truth)
    model = bovy_model()
    assert model.in_range(labels).all()
    assert np.all((truth["SNR"] >= 50) & (truth["SNR"] <= 200))
    spectra = read_example_spectra(example_dir)
    good = np.asarray(truth["KIND"]) == "good"
    masked = (spectra.ivar[good] == 0).mean(axis=1)
    assert np.all((masked > 0.012) & (masked < 0.04))
    assert 0.02 <= masked.mean() <= 0.03
    # Jittered resampling: close to, but not on top of, real training labels.
    real = bovy_training_labels()["labels"]
    nearest = np.abs(labels[:, None, 0] - real[None, :, 0]).min(axis=1)
    assert np.median(nearest) > 0 and np.median(nearest) < 30


# ----------------------------------------------------------------------------- reading

def test_reading_round_trip_preserves_finite_values_and_masks_nan(example_dir):
    manifest = read_manifest(example_dir)
    path = example_dir / manifest["spectra"][1]["path"]
    spectra = read_example_spectra(path)
    assert isinstance(spectra, Spectra) and spectra.normalised
    with fits.open(path) as hdul:
        raw_flux = hdul["FLUX"].data.astype(float)
        raw_ivar = hdul["IVAR"].data.astype(float)
        ids = [str(v) for v in hdul["IDS"].data["IDENTIFIER"]]
    finite = np.isfinite(raw_flux)
    assert (~finite).any()
    np.testing.assert_array_equal(spectra.flux[finite], raw_flux[finite])
    assert np.all(spectra.ivar[~finite] == 0)
    np.testing.assert_array_equal(spectra.ivar[finite], raw_ivar[finite])
    assert np.isfinite(spectra.flux).all()
    assert spectra.identifiers == ids
    assert spectra.flux.dtype == np.float64 and spectra.flux.dtype.isnative
    assert spectra.sources[3] == {"path": str(path), "hdu": "FLUX", "row": 3,
                                  "checksum": manifest["spectra"][1]["sha256"]}
    json.dumps(spectra.sources), json.dumps(spectra.meta)


def test_truth_rows_match_the_spectra_they_describe(example_dir):
    truth = example_truth(example_dir)
    spectra = read_example_spectra(example_dir)
    assert spectra.identifiers == list(truth["IDENTIFIER"])
    model = bovy_model()
    good = np.asarray(truth["KIND"]) == "good"
    resid = spectra.flux[good] - model.flux(_truth_labels(truth)[good])
    ivar = spectra.ivar[good]
    adjusted = ivar / (1 + ivar * model.scatter**2)
    r_chi2 = np.sum(adjusted * resid**2, axis=1) / np.sum(ivar > 0, axis=1)
    assert np.all(np.abs(r_chi2 - 1) < 0.1)
    # A shuffled truth table does not fit: the match is real.
    shuffled = model.flux(_truth_labels(truth)[good][::-1])
    assert np.median(np.sum(adjusted * (spectra.flux[good] - shuffled) ** 2, axis=1)
                     / np.sum(ivar > 0, axis=1)) > 3


def test_deliberately_bad_spectra_are_flagged_or_nearly_empty(example_dir):
    manifest = read_manifest(example_dir)
    truth = example_truth(example_dir)
    spectra = read_example_spectra(example_dir)
    kinds = {b["kind"] for b in manifest["bad_spectra"]}
    assert kinds == {"all_masked", "all_nan", "few_pixels"}
    index = {ident: i for i, ident in enumerate(spectra.identifiers)}
    for bad in manifest["bad_spectra"]:
        i = index[bad["identifier"]]
        row = truth[i]
        assert row["KIND"] == bad["kind"] and row["EXPECTED_FLAGS"] == bad["expected_flags"]
        if bad["kind"] == "few_pixels":
            assert 0 < np.sum(spectra.ivar[i] > 0) < len(LABELS) + 1
            assert bad["expected_flag_names"] == ["FEW_PIXELS"]
        else:
            assert spectra.flags[i] == flags.NO_INFORMATION
            assert "no usable pixel" in spectra.reasons[i]
    good = np.asarray(truth["KIND"]) == "good"
    assert np.all(spectra.flags[good] == 0)


def test_corrupted_or_missing_file_is_flagged_and_the_batch_goes_on(example_dir, tmp_path):
    manifest = read_manifest(example_dir)
    source = example_dir / manifest["spectra"][0]["path"]
    damaged = tmp_path / "damaged.fits"
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the FLUX image: the checksum no longer matches
    damaged.write_bytes(bytes(data))
    spectra = read_example_spectra([damaged, tmp_path / "missing.fits", source])
    assert len(spectra) == 2 + 40
    assert spectra.flags[0] == flags.UNREADABLE_INPUT and spectra.flags[1] == flags.UNREADABLE_INPUT
    assert np.all(spectra.ivar[:2] == 0) and np.all(np.isnan(spectra.flux[:2]))
    assert "damaged.fits" in spectra.reasons[0]
    assert not np.any(spectra.flags[2:] & flags.UNREADABLE_INPUT)


def test_file_on_another_grid_is_flagged_bad_wavelength_grid(example_dir):
    manifest = read_manifest(example_dir)
    shifted = apogee_wavelength() * (1 + 1e-4)
    spectra = read_example_spectra(example_dir / manifest["spectra"][0]["path"], wavelength=shifted)
    assert np.all(spectra.flags == flags.BAD_WAVELENGTH_GRID)
    assert np.all(spectra.ivar == 0)


def test_training_set_round_trip(example_dir):
    labels, names, identifiers, flux, ivar, wavelength = read_example_training_set(example_dir)
    assert names == LABELS
    assert labels.shape == (60, 4) and flux.shape == ivar.shape == (60, 7214)
    assert len(identifiers) == 60 and identifiers[0].startswith("2M")
    np.testing.assert_array_equal(wavelength, apogee_wavelength())
    assert np.isfinite(flux).all() and np.all(ivar >= 0)
    with fits.open(example_dir / "training_set.fits") as hdul:
        np.testing.assert_array_equal(labels[:, 1], hdul["LABELS"].data["LOGG"])
    assert bovy_model().in_range(labels).all()


def test_damaged_training_set_raises_oserror(example_dir, tmp_path):
    data = bytearray((example_dir / "training_set.fits").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "training_set.fits").write_bytes(bytes(data))
    with pytest.raises(OSError, match="cannot read example training set"):
        read_example_training_set(tmp_path)


@pytest.mark.slow
def test_default_example_is_written_in_a_few_seconds(tmp_path):
    import time

    t0 = time.perf_counter()
    manifest = generate_example(tmp_path)
    elapsed = time.perf_counter() - t0
    assert elapsed < 15
    assert sum(e["n_spectra"] for e in manifest["spectra"]) == 3000
    assert all(300 <= e["n_spectra"] <= 700 for e in manifest["spectra"])
