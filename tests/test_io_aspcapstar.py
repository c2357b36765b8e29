"""aspcapStar reading for the 7214, 7514 and 8575 pixel layouts."""

import numpy as np
import pytest
from fixtures_io import make_apstar_arrays, write_apstar, write_aspcapstar

from astra_cannon import flags as F
from astra_cannon.io import grid, read_aspcapstar, read_spectra


def _arrays(n, rng):
    flux = 1.0 + 0.01 * rng.normal(size=n)
    sigma = np.full(n, 0.01)
    flux[10] = 0.0   # ASPCAP writes 0 in unusable pixels
    flux[11] = np.nan
    return flux, sigma


@pytest.mark.parametrize("n", [7214, 7514, 8575])
def test_each_release_layout_gets_its_grid(tmp_path, io_rng, n):
    flux, sigma = _arrays(n, io_rng)
    s = read_aspcapstar(write_aspcapstar(tmp_path / f"aspcapStar-{n}.fits", flux, sigma, {"OBJID": "2M1"}))
    assert s.flags[0] == 0 and s.normalised and s.flux.shape == (1, n)
    expected = grid.apstar_wavelength() if n == 8575 else grid.gap_removed_wavelength(n)
    np.testing.assert_allclose(s.wavelength, expected, rtol=0, atol=1e-8)
    np.testing.assert_allclose(s.flux[0, :10], flux[:10].astype(np.float32), rtol=1e-6)
    assert s.ivar[0, 10] == 0 and s.ivar[0, 11] == 0 and s.ivar[0, 12] == pytest.approx(1e4, rel=1e-5)
    assert s.meta[0]["object_id"] == "2M1"


def test_unknown_pixel_count_without_keywords_is_flagged(tmp_path, io_rng):
    flux, sigma = _arrays(5000, io_rng)
    s = read_aspcapstar(write_aspcapstar(tmp_path / "aspcapStar-odd.fits", flux, sigma, keywords=False))
    assert s.flags[0] & F.BAD_INPUT_SHAPE and "5000" in s.reasons[0]


def test_wrong_release_against_model_grid_is_flagged_not_fitted(tmp_path, io_rng):
    p7214 = write_aspcapstar(tmp_path / "aspcapStar-a.fits", *_arrays(7214, io_rng))
    p7514 = write_aspcapstar(tmp_path / "aspcapStar-b.fits", *_arrays(7514, io_rng))
    s = read_spectra([p7214, p7514], wavelength=grid.gap_removed_wavelength(7514))
    assert s.flags[0] & F.BAD_INPUT_SHAPE and s.flags[1] == 0 and s.normalised


def test_auto_format_flags_unnormalised_files_in_a_normalised_batch(tmp_path, io_rng):
    asp = write_aspcapstar(tmp_path / "aspcapStar-c.fits", *_arrays(8575, io_rng))
    flux, sigma, mask, _, _ = make_apstar_arrays(io_rng)
    ap = write_apstar(tmp_path / "apStar-c.fits", flux, sigma, mask)
    odd_name = write_apstar(tmp_path / "something.fits", flux, sigma, mask)
    s = read_spectra([asp, ap, odd_name])
    assert s.flags[0] == 0 and s.normalised
    assert s.flags[1] & F.PROCESSING_ERROR and "unnormalised" in s.reasons[1]
    assert s.flags[2] & F.PROCESSING_ERROR  # detected as apStar from its bitmask HDU
