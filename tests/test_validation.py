"""Cross-validation and the choice of Lambda on a small synthetic problem with a known answer."""

import warnings

import numpy as np
import pytest

from astra_cannon import PolynomialVectorizer, flags
from astra_cannon.validation import (RegularizationGridWarning, choose_regularization, cross_validate,
                                     label_statistics)

NAMES = ["TEFF", "LOGG", "FE_H"]
S_TRUE = 0.005  # intrinsic scatter of the synthetic spectra
SNR = 100.0


@pytest.fixture(scope="module")
def problem():
    """150 stars x 200 pixels from a sparse quadratic model in 3 labels, plus scatter and noise."""
    rng = np.random.default_rng(1)
    n, p = 150, 200
    labels = np.column_stack([rng.uniform(4000, 5200, n), rng.uniform(1, 3.5, n), rng.uniform(-1, 0.3, n)])
    vec = PolynomialVectorizer(NAMES, 2)
    x = (labels - [4600, 2.2, -0.35]) / [1200, 2.5, 1.3]
    design = vec.get_label_vector(x).T
    k = design.shape[1]
    theta = np.zeros((p, k))
    theta[:, 0] = 1 - 0.2 * rng.random(p)
    theta[:, 1:] = np.where(rng.random((p, k - 1)) < 0.3, rng.normal(0, 0.05, (p, k - 1)), 0.0)
    flux = design @ theta.T + rng.normal(0, S_TRUE, (n, p)) + rng.normal(0, 1 / SNR, (n, p))
    ivar = np.full((n, p), SNR**2)
    return labels, flux, ivar, vec


def test_cross_validation_recovers_small_scatter_and_no_bias(problem):
    labels, flux, ivar, vec = problem
    cv = cross_validate(labels, flux, ivar, vec, n_folds=5, seed=0)
    assert cv["predicted"].shape == labels.shape and np.isfinite(cv["predicted"]).all()
    assert cv["n_used"] == 150 and cv["n_failed"] == 0
    assert sorted(np.bincount(cv["fold"]).tolist()) == [30] * 5
    limits = {"TEFF": 50.0, "LOGG": 0.1, "FE_H": 0.05}  # label ranges: 1200 K, 2.5, 1.3 dex
    for name in NAMES:
        assert cv["scatter"][name] < limits[name]
        assert cv["robust_scatter"][name] < limits[name]
        assert abs(cv["bias"][name]) < 0.3 * limits[name]
    # The reported uncertainties describe the real scatter (no factor-of-2 miscalibration).
    for j, name in enumerate(NAMES):
        ratio = cv["scatter"][name] / np.median(cv["errors"][:, j])
        assert 0.6 < ratio < 1.7, (name, ratio)
    again = cross_validate(labels, flux, ivar, vec, n_folds=5, seed=0)
    np.testing.assert_array_equal(again["predicted"], cv["predicted"])


def test_cross_validation_predicts_each_star_from_a_model_that_never_saw_it(problem):
    labels, flux, ivar, vec = problem
    wrong = labels.copy()
    wrong[7, 0] += 600.0  # a mislabelled star: only held-out prediction exposes the error
    cv = cross_validate(wrong, flux, ivar, vec, n_folds=5, seed=3)
    delta = cv["predicted"][7, 0] - wrong[7, 0]
    assert delta < -450
    assert abs(cv["predicted"][7, 0] - labels[7, 0]) < 120


def test_cross_validation_flags_and_excludes_unusable_spectra(problem):
    labels, flux, ivar, vec = problem
    ivar = ivar.copy()
    ivar[11] = 0.0
    cv = cross_validate(labels, flux, ivar, vec, n_folds=3, seed=0)
    assert cv["flags"][11] & flags.NO_INFORMATION
    assert np.isnan(cv["predicted"][11]).all()
    assert cv["n_failed"] == 1 and cv["n_used"] == 149
    stats = label_statistics(labels, cv["predicted"], NAMES)
    assert stats["n"] == 149


def test_cross_validation_rejects_impossible_fold_counts(problem):
    labels, flux, ivar, vec = problem
    with pytest.raises(ValueError, match="n_folds"):
        cross_validate(labels, flux, ivar, vec, n_folds=1)
    with pytest.raises(ValueError, match="shapes disagree"):
        cross_validate(labels[:-1], flux, ivar, vec)


def test_choose_regularization_picks_an_interior_lambda_without_warning(problem):
    labels, flux, ivar, vec = problem
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegularizationGridWarning)
        result = choose_regularization(labels, flux, ivar, vec, grid=[0, 10, 100, 1e3], seed=0)
    assert result["best_regularization"] in (10.0, 100.0)
    assert not result["at_grid_edge"] and result["edge"] is None
    assert result["n_train"] == 120 and result["n_validation"] == 30
    assert set(result["train_index"]).isdisjoint(result["validation_index"])
    nll = np.asarray(result["nll"])
    assert nll[result["best_index"]] == nll.min()
    assert nll[-1] > nll.min() + 100  # heavy regularisation is clearly worse
    assert result["per_pixel_best"].shape == (200,)


@pytest.mark.parametrize("grid, edge", [([1e3, 3e3], "lower"), ([0, 1, 10], "upper")])
def test_choose_regularization_warns_when_best_is_at_grid_edge(problem, grid, edge):
    labels, flux, ivar, vec = problem
    with pytest.warns(RegularizationGridWarning, match=f"{edge} edge"):
        result = choose_regularization(labels, flux, ivar, vec, grid=grid, seed=0)
    assert result["at_grid_edge"] and result["edge"] == edge


def test_plain_chi2_criterion_rewards_inflated_scatter(problem):
    """Why nll is the default: chi2 with each model's own s2 falls as Lambda grows."""
    labels, flux, ivar, vec = problem
    with pytest.warns(RegularizationGridWarning, match="upper edge"):
        result = choose_regularization(labels, flux, ivar, vec, grid=[0, 100, 1e3], criterion="chi2")
    assert result["r_chi2"][0] > result["r_chi2"][1] > result["r_chi2"][2]
    assert result["best_regularization"] == 1e3


def test_choose_regularization_rejects_bad_arguments(problem):
    labels, flux, ivar, vec = problem
    with pytest.raises(ValueError, match="grid"):
        choose_regularization(labels, flux, ivar, vec, grid=[10])
    with pytest.raises(ValueError, match="grid"):
        choose_regularization(labels, flux, ivar, vec, grid=[-1, 10])
    with pytest.raises(ValueError, match="validation_fraction"):
        choose_regularization(labels, flux, ivar, vec, grid=[0, 10], validation_fraction=1.0)
    with pytest.raises(ValueError, match="criterion"):
        choose_regularization(labels, flux, ivar, vec, grid=[0, 10], criterion="aic")


def test_progress_is_reported_after_every_fold_and_every_lambda(problem):
    labels, flux, ivar, vec = problem
    folds, models = [], []
    cross_validate(labels, flux, ivar, vec, n_folds=3, progress=lambda done, total: folds.append((done, total)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegularizationGridWarning)  # the grid is not the point here
        choose_regularization(labels, flux, ivar, vec, grid=[0.0, 10.0, 100.0],
                              progress=lambda done, total: models.append((done, total)))
    assert folds == [(1, 3), (2, 3), (3, 3)]
    assert models == [(1, 3), (2, 3), (3, 3)]
