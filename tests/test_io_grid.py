"""APOGEE wavelength grids computed from formulas, checked against the shared reference."""

import numpy as np
import pytest
from fixtures_io import shared_data_path

from astra_cannon.io import grid


def test_apstar_grid_matches_header_formula_and_range():
    wl = grid.apstar_wavelength()
    assert wl.shape == (8575,) and wl.dtype == np.float64
    assert wl[0] == pytest.approx(15100.80, abs=0.01)
    assert wl[-1] == pytest.approx(16999.81, abs=0.01)
    assert np.all(np.diff(np.log10(wl)) == pytest.approx(6e-6, rel=1e-6))


def test_gap_removed_grids_have_documented_sizes_and_chips():
    for n, chips in ((7214, grid.CHIPS_DR12), (7514, grid.CHIPS_DR13PLUS)):
        idx = grid.gap_removed_indices(n)
        assert idx.size == n and np.all(np.diff(idx) > 0)
        assert idx[0] == chips[0][0] and idx[-1] == chips[-1][1] - 1
        slices = grid.chip_slices(n)
        assert slices[0][0] == 0 and slices[-1][1] == n
        assert [b - a for a, b in slices] == [b - a for a, b in chips]
    assert grid.chip_slices(8575)[-1][1] == 8575
    with pytest.raises(ValueError, match="7000"):
        grid.gap_removed_indices(7000)


def test_grids_equal_the_shared_reference_arrays():
    p = shared_data_path("apogee_grid", "apstar_wavelength_8575.npz")
    if p is None:
        pytest.skip("shared grid not available")
    with np.load(p) as ref:
        np.testing.assert_allclose(grid.apstar_wavelength(), ref["wavelength"], rtol=0, atol=1e-8)
        np.testing.assert_array_equal(grid.gap_removed_indices(7214), ref["idx_dr12_7214"])
        np.testing.assert_array_equal(grid.gap_removed_indices(7514), ref["idx_dr13plus_7514"])
    payne = shared_data_path("apogee_grid", "payne_apogee_wavelength_7214.npz")
    if payne is not None:
        with np.load(payne) as ref:
            np.testing.assert_allclose(grid.gap_removed_wavelength(7214), ref["wavelength"], rtol=0, atol=1e-6)
            assert grid.identify_grid(ref["wavelength"]) == "gap_removed_7214"


def test_identify_grid_names_known_grids_and_rejects_shifted_ones():
    assert grid.identify_grid(grid.apstar_wavelength()) == "apstar_8575"
    assert grid.identify_grid(grid.gap_removed_wavelength(7514)) == "gap_removed_7514"
    assert grid.identify_grid(grid.log_linear_wavelength(4.1791, 6e-6, 8575)) is None


def test_subset_indices_finds_exact_subsets_only():
    wl = grid.apstar_wavelength()
    idx = grid.subset_indices(wl, grid.gap_removed_wavelength(7514))
    np.testing.assert_array_equal(idx, grid.gap_removed_indices(7514))
    assert grid.subset_indices(wl, wl[:10] + 0.05) is None


def test_mask_to_grid_round_trips_between_grids():
    rng = np.random.default_rng(1)
    m7214 = rng.random(7214) < 0.1
    full = grid.mask_to_grid(m7214, 8575)
    assert full.sum() == m7214.sum()
    np.testing.assert_array_equal(grid.mask_to_grid(full, 7214), m7214)
    with pytest.raises(ValueError):
        grid.mask_to_grid(np.ones(100, bool), 8575)


def test_missing_shipped_continuum_mask_raises_a_clear_error():
    with pytest.raises(FileNotFoundError, match="continuum_pixels_from_model"):
        grid.load_continuum_mask(name="no-such-mask.npz")


def test_shipped_continuum_mask_loads_on_every_grid_when_present():
    try:
        m8575 = grid.load_continuum_mask(8575)
    except FileNotFoundError:
        pytest.skip("continuum mask not shipped in astra_cannon/data yet")
    m7214 = grid.load_continuum_mask(7214)
    assert m8575.shape == (8575,) and m7214.shape == (7214,)
    assert m8575.sum() == m7214.sum() > 100
    for a, b in grid.chip_slices(7214):
        assert m7214[a:b].sum() > 50  # every chip can be fitted


@pytest.mark.parametrize("name,count", [("payne_cannon_cont_pixels_7214.npz", 529),
                                        ("astronn_dr17_contmask_7514.npy", 532)])
def test_continuum_mask_loader_reads_npz_and_npy_onto_any_grid(name, count):
    p = shared_data_path("apogee_grid", name)
    if p is None:
        pytest.skip("shared masks not available")
    masks = {n: grid.load_continuum_mask(n, name=name, directory=p.parent) for n in (8575, 7514, 7214)}
    assert masks[8575].sum() == count
    np.testing.assert_array_equal(grid.mask_to_grid(masks[8575], 7514), masks[7514])
