"""The user's five fitting functions against independent computations."""

import json

import numpy as np
import pytest

from astra_cannon import flags as F
from astra_cannon.fitting import (
    L1Norm_variation, chi_sq, estimate_s2, fit_pixel_fixed_scatter, fit_spectrum, fit_theta_by_linalg)


@pytest.fixture
def pixel_problem(truth):
    labels, flux, ivar = truth.sample(200, nan_bad=False)
    A = truth.vectorizer.get_label_vector((labels - truth.fiducials) / truth.scales).T
    return A, flux, ivar


def test_fit_theta_by_linalg_equals_weighted_lstsq(pixel_problem):
    A, flux, ivar = pixel_problem
    p, s2 = 7, 1e-4
    w = ivar[:, p] / (1 + ivar[:, p] * s2)
    expected = np.linalg.lstsq(A * np.sqrt(w)[:, None], flux[:, p] * np.sqrt(w), rcond=None)[0]
    theta, cov = fit_theta_by_linalg(flux[:, p], ivar[:, p], s2, A)
    np.testing.assert_allclose(theta, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(cov, np.linalg.inv((A * w[:, None]).T @ A), rtol=1e-9)


def test_fit_theta_by_linalg_singular_returns_fiducial():
    A = np.ones((5, 3))
    theta, cov = fit_theta_by_linalg(np.ones(5), np.zeros(5), 0.0, A)
    np.testing.assert_array_equal(theta, [1, 0, 0])
    assert np.all(np.isinf(np.diag(cov)))


def test_chi_sq_gradient_matches_finite_differences(pixel_problem):
    A, flux, ivar = pixel_problem
    rng = np.random.default_rng(3)
    theta = rng.normal(size=A.shape[1]) * 0.01 + np.eye(A.shape[1])[0]
    f, g = chi_sq(theta, A, flux[:, 0], ivar[:, 0])
    assert f == pytest.approx(np.sum(ivar[:, 0] * (A @ theta - flux[:, 0]) ** 2))
    h = 1e-7
    num = [(chi_sq(theta + h * e, A, flux[:, 0], ivar[:, 0], gradient=False)
            - chi_sq(theta - h * e, A, flux[:, 0], ivar[:, 0], gradient=False)) / (2 * h) for e in np.eye(len(theta))]
    np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-3)


def test_l1_norm_variation_skips_first_entry():
    norm, d = L1Norm_variation([5.0, -2.0, 0.5, 0.0])
    assert norm == 2.5
    np.testing.assert_array_equal(d, [0, -1, 1, 0])


def test_fit_pixel_without_regularization_equals_linalg(pixel_problem):
    A, flux, ivar = pixel_problem
    expected, _ = fit_theta_by_linalg(flux[:, 3], ivar[:, 3], 0.0, A)
    theta, s2, meta = fit_pixel_fixed_scatter(flux[:, 3], ivar[:, 3], [], A, 0.0, None)
    np.testing.assert_allclose(theta, expected, rtol=1e-5, atol=1e-7)
    assert isinstance(s2, float) and s2 >= 0
    json.dumps(meta)
    assert {"fopt", "funcalls", "grad", "nit", "task", "warnflag", "op_method", "op_time",
            "initial_theta", "initial_theta_source"} <= set(meta)


def test_fit_pixel_l1_lbfgsb_and_powell_agree_and_shrink(pixel_problem):
    A, flux, ivar = pixel_problem
    lam = 1e3
    t0, _ = fit_theta_by_linalg(flux[:, 5], ivar[:, 5], 0.0, A)
    tl, _, ml = fit_pixel_fixed_scatter(flux[:, 5], ivar[:, 5], [(t0, "linalg")], A, lam, None, op_method="l_bfgs_b")
    tp, _, mp = fit_pixel_fixed_scatter(flux[:, 5], ivar[:, 5], [(t0, "linalg")], A, lam, None, op_method="powell",
                                        op_kwds=dict(xtol=1e-10, ftol=1e-12))
    assert {"fopt", "direc", "n_iter", "n_funcs", "warnflag"} <= set(mp)
    assert ml["fopt"] <= mp["fopt"] * (1 + 1e-6)
    assert np.abs(tl[1:]).sum() < np.abs(t0[1:]).sum()


def test_fit_pixel_censoring_zeroes_terms(pixel_problem):
    A, flux, ivar = pixel_problem
    mask = np.zeros(A.shape[1], dtype=bool)
    mask[[2, 5]] = True
    theta, _, _ = fit_pixel_fixed_scatter(flux[:, 1], ivar[:, 1], [], A, 0.0, mask)
    assert theta[2] == 0 and theta[5] == 0
    Ac = A.copy()
    Ac[:, mask] = 0
    keep = ~mask
    expected = np.linalg.lstsq(A[:, keep] * np.sqrt(ivar[:, 1])[:, None], flux[:, 1] * np.sqrt(ivar[:, 1]), rcond=None)[0]
    np.testing.assert_allclose(theta[keep], expected, rtol=1e-5, atol=1e-7)


def test_fit_pixel_without_information_is_flagged_dead(pixel_problem):
    A, flux, _ = pixel_problem
    theta, s2, meta = fit_pixel_fixed_scatter(flux[:, 0], np.zeros(len(flux)), [], A, 0.0, None)
    assert s2 == np.inf and meta["message"] == "No pixel information."
    np.testing.assert_array_equal(theta, np.eye(A.shape[1])[0])


def test_fit_pixel_rejects_unknown_options(pixel_problem):
    A, flux, ivar = pixel_problem
    with pytest.raises(TypeError, match="op_kwds"):
        fit_pixel_fixed_scatter(flux[:, 0], ivar[:, 0], [], A, 0.0, None, op_kwds={"bogus": 1})
    with pytest.raises(ValueError):
        fit_pixel_fixed_scatter(flux[:, 0], ivar[:, 0], [], A, 0.0, None, op_method="newton")


def test_estimate_s2_is_unbiased_over_many_pixels():
    rng = np.random.default_rng(5)
    n, P, s = 400, 2000, 0.01
    sigma = rng.uniform(0.005, 0.02, size=(n, P))
    r = rng.normal(size=(n, P)) * np.sqrt(sigma**2 + s**2)
    est = estimate_s2(r**2, 1 / sigma**2, 0)
    assert np.mean(np.sqrt(est)) == pytest.approx(s, rel=0.02)
    zero = estimate_s2((rng.normal(size=(n, P)) * sigma) ** 2, 1 / sigma**2, 0)
    assert np.median(zero) == 0.0 and np.sqrt(np.mean(zero)) < 0.3 * s


def test_estimate_s2_solves_the_moment_equation_from_any_start():
    rng = np.random.default_rng(6)
    n, P = 300, 50
    sigma = rng.uniform(0.005, 0.02, size=(n, P))
    r2 = (rng.normal(size=(n, P)) * np.sqrt(sigma**2 + rng.uniform(0, 0.02, P) ** 2)) ** 2
    ivar = 1 / sigma**2
    ivar[rng.random((n, P)) < 0.05] = 0.0  # masked stars do not count
    dof = 10
    est = estimate_s2(np.where(ivar > 0, r2, 0.0), ivar, dof)
    for start in (np.zeros(P), 10 * est + 1e-4):  # left and right of the root
        np.testing.assert_allclose(estimate_s2(r2, ivar, dof, s2_start=start), est, rtol=1e-7, atol=1e-14)
    pos = est > 0
    lhs = np.sum(np.where(ivar > 0, r2 * ivar / (1 + ivar * est), 0.0), axis=0)
    np.testing.assert_allclose(lhs[pos], (ivar > 0).sum(axis=0)[pos] - dof, rtol=1e-6)


def test_fit_spectrum_recovers_truth_with_physical_covariance(truth):
    labels, flux, ivar = truth.sample(1, snr=(100, 100))
    got, cov, meta = fit_spectrum(flux[0], ivar[0], truth.fiducials, truth.vectorizer, truth.theta, truth.s2,
                                  truth.fiducials, truth.scales)
    json.dumps(meta)
    assert meta["ier"] in (1, 2, 3, 4) and meta["flags"] == 0
    # Independent covariance: finite-difference Jacobian of weighted residuals in physical units.
    w = ivar[0] / (1 + ivar[0] * truth.s2)
    use = (w > 0) & np.isfinite(flux[0])

    def resid(lab):
        return (truth.flux(lab[None])[0] - flux[0])[use] * np.sqrt(w[use])

    h = 1e-6 * truth.scales
    J = np.stack([(resid(got + h[i] * np.eye(3)[i]) - resid(got - h[i] * np.eye(3)[i])) / (2 * h[i])
                  for i in range(3)], axis=1)
    np.testing.assert_allclose(cov, np.linalg.inv(J.T @ J), rtol=1e-4)
    np.testing.assert_allclose(cov, cov.T)
    assert np.all(np.abs(got - labels[0]) < 5 * np.sqrt(np.diag(cov)))
    assert meta["r_chi_sq"] == pytest.approx(meta["chi_sq"] / (use.sum() - 3))
    for key in ("fvec", "nfev", "fjac", "ipvt", "qtf", "x0", "chi_sq", "ier", "mesg", "model_flux", "method",
                "label_names", "best_result_index", "derivatives_used", "snr", "r_chi_sq", "ftol", "xtol", "gtol",
                "maxfev", "factor", "epsfcn", "initial_points"):
        assert key in meta


def test_fit_spectrum_numerical_derivatives_agree(truth):
    _, flux, ivar = truth.sample(1)
    a, ca, _ = fit_spectrum(flux[0], ivar[0], truth.fiducials, truth.vectorizer, truth.theta, truth.s2,
                            truth.fiducials, truth.scales, use_derivatives=True)
    b, cb, mb = fit_spectrum(flux[0], ivar[0], truth.fiducials, truth.vectorizer, truth.theta, truth.s2,
                             truth.fiducials, truth.scales, use_derivatives=False)
    assert mb["derivatives_used"] is False
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_fit_spectrum_no_pixels_and_few_pixels_fail_cleanly(truth):
    _, flux, ivar = truth.sample(1)
    labels, cov, meta = fit_spectrum(flux[0], np.zeros_like(ivar[0]), truth.fiducials, truth.vectorizer,
                                     truth.theta, truth.s2, truth.fiducials, truth.scales)
    assert np.all(np.isnan(labels)) and np.all(np.isnan(cov))
    assert meta["fail_message"] == "Pixels contained no information" and meta["flags"] & F.NO_INFORMATION
    few = np.zeros_like(ivar[0])
    few[:3] = 1e4
    labels, cov, meta = fit_spectrum(flux[0], few, truth.fiducials, truth.vectorizer, truth.theta, truth.s2,
                                     truth.fiducials, truth.scales)
    assert np.all(np.isnan(labels)) and meta["flags"] & F.FEW_PIXELS


def test_fit_spectrum_rejects_unknown_op_kwds(truth):
    _, flux, ivar = truth.sample(1)
    with pytest.raises(TypeError, match="unknown op_kwds"):
        fit_spectrum(flux[0], ivar[0], truth.fiducials, truth.vectorizer, truth.theta, truth.s2,
                     truth.fiducials, truth.scales, op_kwds={"maxiter": 3})
