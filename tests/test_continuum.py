"""Pseudo-continuum normalisation: recovery, masking, chip failures, real DR17 spectra."""

import time
import warnings

import numpy as np
import pytest
from fixtures_io import make_apstar_arrays, synthetic_continuum_mask

from astra_cannon import continuum as C
from astra_cannon import flags as F
from astra_cannon.io import grid, read_spectra
from astra_cannon.io.base import Spectra


def _synthetic(rng, n=4, snr=200.0):
    flux, sigma, _, cont, norm = make_apstar_arrays(rng, n_rows=n, snr=snr)
    ivar = np.where(np.isfinite(sigma), 1.0 / np.where(np.isfinite(sigma), sigma, 1.0) ** 2, 0.0)
    return flux, ivar, cont, norm


@pytest.mark.parametrize("basis,kw", [("sinusoid", {}), ("chebyshev", {"order": 4})])
def test_known_continuum_is_recovered_to_half_a_percent(io_rng, basis, kw):
    flux, ivar, cont, norm = _synthetic(io_rng, snr=200.0)
    wl = grid.apstar_wavelength()
    data = ivar > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        noiseless = C.normalise(cont * norm, ivar, wl, synthetic_continuum_mask(), basis=basis, **kw)
        res = C.normalise(flux, ivar, wl, synthetic_continuum_mask(), basis=basis, **kw)
    # The basis can represent the continuum: without noise the error is tiny everywhere.
    assert np.abs(noiseless.continuum[data] / cont[data] - 1).max() < 5e-4
    # At S/N 200 per pixel (~200 continuum pixels per chip) the error is noise-limited.
    err = np.abs(res.continuum[data] / cont[data] - 1)
    assert np.sqrt(np.mean(err**2)) < 0.002 and np.quantile(err, 0.99) < 0.005, err.max()
    assert res.chip_ok.all()
    np.testing.assert_allclose(res.ivar[data], ivar[data] * res.continuum[data] ** 2)
    np.testing.assert_allclose(res.flux[data], flux[data] / res.continuum[data])


def test_gaps_and_nonfinite_pixels_never_leak_into_usable_pixels(io_rng):
    flux, ivar, _, _ = _synthetic(io_rng, n=2)
    res = C.normalise(flux, ivar, grid.apstar_wavelength(), synthetic_continuum_mask())
    usable = res.ivar > 0
    assert np.isfinite(res.flux).all() and np.isfinite(res.ivar).all()
    assert not usable[~np.isfinite(flux)].any()
    assert (res.flux[~usable & ~np.isfinite(flux)] == 1.0).all()


def test_nonpositive_or_nan_continuum_is_masked_without_warnings():
    wl = np.linspace(15000, 15500, 300)
    flux = np.vstack([np.full(300, -5.0), np.full(300, 2.0)])  # first: negative "continuum"
    flux[1, :] = np.nan
    ivar = np.ones_like(flux)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = C.normalise(flux, ivar, wl, np.ones(300, bool), basis="chebyshev", order=2, chips=[(0, 300)])
    assert not res.ivar.any()
    assert (res.flux == 1.0).all()


def test_chip_with_too_few_continuum_pixels_is_masked_and_reported(io_rng):
    flux, ivar, _, _ = _synthetic(io_rng, n=3)
    cmask = synthetic_continuum_mask()
    chips = grid.chip_slices(8575)
    a, b = chips[1]
    ivar[1, a:b] = np.where(cmask[a:b], 0.0, ivar[1, a:b])  # spectrum 1 loses chip-2 continuum
    res = C.normalise(flux, ivar, grid.apstar_wavelength(), cmask)
    assert res.chip_ok.tolist()[1] == [True, False, True]
    assert res.chip_ok[[0, 2]].all()
    assert not res.ivar[1, a:b].any() and res.ivar[1, :a].any()
    assert res.n_continuum_pixels[1, 1] == 0


def test_normalise_spectra_flags_empty_spectra_and_refuses_double_normalisation(io_rng):
    flux, ivar, _, _ = _synthetic(io_rng, n=3)
    ivar[2] = 0.0
    flags = np.array([0, F.UNREADABLE_INPUT, 0])
    s = Spectra(identifiers=["a", "b", "c"], flux=flux, ivar=ivar, wavelength=grid.apstar_wavelength(), flags=flags)
    out, res = C.normalise_spectra(s, synthetic_continuum_mask())
    assert out.normalised and out.flags[0] == 0
    assert np.isnan(out.flux[1]).all() and out.flags[1] == F.UNREADABLE_INPUT
    assert out.flags[2] & F.NO_INFORMATION and out.meta[2]["continuum_failed_chips"] == [0, 1, 2]
    with pytest.raises(ValueError, match="already normalised"):
        C.normalise_spectra(out, synthetic_continuum_mask())


def test_design_matrix_shapes_and_bad_options():
    wl = np.linspace(15100, 15800, 50)
    assert C.design_matrix(wl, "sinusoid", 3).shape == (50, 7)
    assert C.design_matrix(wl, "chebyshev", 4).shape == (50, 5)
    with pytest.raises(ValueError, match="basis"):
        C.design_matrix(wl, "spline")
    with pytest.raises(ValueError, match="continuum mask"):
        C.normalise(np.ones((1, 50)), np.ones((1, 50)), wl, np.ones(49, bool))


def test_continuum_pixels_from_model_pick_flat_unresponsive_pixels():
    p = 8575
    rng = np.random.default_rng(3)
    theta = np.zeros((p, 4))
    theta[:, 0] = 1.0 - rng.uniform(0, 0.5, p)
    theta[:, 1:] = rng.normal(0, 0.1, (p, 3))
    flat = rng.choice(p, 300, replace=False)
    theta[flat, 0] = 1.0 + rng.uniform(-0.005, 0.005, 300)
    theta[flat, 1:] = rng.uniform(-0.002, 0.002, (300, 3))
    picked = C.continuum_pixels_from_model(theta)
    assert set(np.flatnonzero(picked)) == set(flat)
    per_chip = C.continuum_pixels_from_model(theta, n_per_chip=50)
    assert all(per_chip[a:b].sum() == 50 for a, b in grid.chip_slices(p))
    assert per_chip[flat].sum() == 150


def test_batch_of_spectra_is_normalised_quickly(io_rng):
    flux, ivar, _, _ = _synthetic(io_rng, n=1)
    flux = np.repeat(flux, 500, axis=0) * np.linspace(0.5, 2, 500)[:, None]
    ivar = np.repeat(ivar, 500, axis=0)
    t0 = time.perf_counter()
    res = C.normalise(flux, ivar, grid.apstar_wavelength(), synthetic_continuum_mask())
    assert time.perf_counter() - t0 < 2.0
    np.testing.assert_allclose(res.flux[10][res.ivar[10] > 0], res.flux[400][res.ivar[400] > 0], rtol=1e-8)


def test_real_dr17_spectra_normalise_to_unit_continuum(real_apstar_paths, shared_continuum_mask_8575):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spectra = read_spectra(real_apstar_paths)
        for basis in ("sinusoid", "chebyshev"):
            out, res = C.normalise_spectra(spectra, shared_continuum_mask_8575, basis=basis)
            assert res.chip_ok.all()
            for i in range(len(out)):
                usable = out.ivar[i] > 0
                cont = shared_continuum_mask_8575 & usable
                assert abs(np.median(out.flux[i][cont]) - 1) < 0.02, (basis, i)
                assert np.isfinite(out.flux[i][usable]).all() and np.isfinite(out.ivar[i]).all()
                assert not usable[~np.isfinite(spectra.flux[i])].any()  # chip gaps stay masked
                assert 0.85 < np.median(out.flux[i][usable]) < 1.05
