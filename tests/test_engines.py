"""Batched engines agree with the per-pixel / per-spectrum reference functions."""

import concurrent.futures

import numpy as np
import pytest

from astra_cannon import engines
from astra_cannon import flags as F
from astra_cannon.engines import (SpectrumStatistics, khatri_rao_upper, label_spectra, merge_equal_columns,
                                  solve_normal_equations_cg, train_pixels, unpack_symmetric)
from astra_cannon.vectorizer import PolynomialVectorizer
from astra_cannon.fitting import fit_pixel_fixed_scatter, fit_spectrum, fit_theta_by_linalg


@pytest.fixture
def problem(truth):
    labels, flux, ivar = truth.sample(300)
    A = truth.vectorizer.get_label_vector((labels - truth.fiducials) / truth.scales).T
    return A, flux, ivar


def test_khatri_rao_packing_rebuilds_gram_matrix():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 6))
    w = rng.random(50)
    np.testing.assert_allclose(unpack_symmetric(w @ khatri_rao_upper(X), 6), (X * w[:, None]).T @ X, rtol=1e-12)


def test_equal_khatri_rao_columns_are_the_distinct_quartic_monomials():
    rng = np.random.default_rng(1)
    vec = PolynomialVectorizer([f"L{i}" for i in range(17)], 2)
    A = vec.get_label_vector(rng.normal(size=(200, 17))).T
    Z = khatri_rao_upper(A)
    unique, group = merge_equal_columns(Z)
    assert unique.size == 5985  # monomials of degree <= 4 in 17 variables: C(21, 4)
    np.testing.assert_allclose(Z[:, unique[group]], Z, rtol=1e-13)


def test_merging_never_joins_columns_that_differ_slightly():
    rng = np.random.default_rng(2)
    Z = rng.normal(size=(80, 5))
    Z = np.hstack([Z, Z[:, :2], Z[:, 2:3] * (1 + 1e-11)])
    unique, group = merge_equal_columns(Z)
    assert list(group) == [0, 1, 2, 3, 4, 0, 1, 5]


def _survey_like_weights(rng, N, P):
    """ivar ~ (S/N)^2 / flux^2 with absorption depths varying star to star, 3% masked."""
    snr = rng.uniform(50, 200, N)
    depth = rng.uniform(0.0, 0.5, (N, P))
    w = (snr[:, None] / (1 - depth)) ** 2
    w[rng.random((N, P)) < 0.03] = 0.0
    return w


def test_conjugate_gradients_match_the_direct_weighted_least_squares_solve():
    rng = np.random.default_rng(3)
    vec = PolynomialVectorizer([f"L{i}" for i in range(8)], 2)
    A = vec.get_label_vector(rng.uniform(-1, 1, (400, 8))).T  # 45 terms
    N, K = A.shape
    w = _survey_like_weights(rng, N, 60)
    rhs = rng.normal(size=(60, K)) * 1e4
    x, n_it, left = solve_normal_equations_cg(A, w, rhs)
    assert left.size == 0 and n_it.max() < 60
    M = np.einsum("np,nk,nj->pkj", w, A, A)
    exact = np.linalg.solve(M, rhs[..., None])[..., 0]
    d = x - exact
    # chi2 excess (d^T M d) is the stopping measure: well below 1e-6
    assert np.einsum("pi,pij,pj->p", d, M, d).max() < 1e-6
    # every coefficient within 1e-3 of its standard error
    sd = np.sqrt(np.diagonal(np.linalg.inv(M), axis1=1, axis2=2))
    assert np.max(np.abs(d) / sd) < 1e-3
    # a warm start at the solution needs no iteration
    _, n_warm, _ = solve_normal_equations_cg(A, w, rhs, x0=exact)
    assert n_warm.max() <= 1


def test_cg_and_direct_training_agree_within_a_small_fraction_of_the_uncertainty(problem):
    A, flux, ivar = problem
    theta_d, s2_d, info_d = train_pixels(A, flux, ivar, solver="direct", theta_covariance=True)
    theta_c, s2_c, info_c = train_pixels(A, flux, ivar, solver="cg")
    assert info_c["solver"] == "cg" and info_c["cg_iterations"] > 0
    K = A.shape[1]
    sd = np.sqrt(unpack_symmetric(info_d["theta_cov"], K)[:, np.arange(K), np.arange(K)])
    assert np.max(np.abs(theta_c - theta_d) / sd) < 0.02
    np.testing.assert_allclose(s2_c, s2_d, rtol=2e-2, atol=1e-9)


def test_cg_training_gives_the_theta_covariance_at_its_final_weights(problem):
    """With conjugate gradients the covariance is one pass of normal matrices at the end."""
    A, flux, ivar = problem
    theta, s2, info = train_pixels(A, flux, ivar, solver="cg", theta_covariance=True)
    K = A.shape[1]
    assert info["solver"] == "cg" and info["theta_cov"].dtype == np.float32
    for p in range(0, flux.shape[1], 23):
        w = ivar[:, p] / (1.0 + ivar[:, p] * s2[p])
        C = np.linalg.inv((A * w[:, None]).T @ A)
        np.testing.assert_allclose(unpack_symmetric(info["theta_cov"][p], K), C, rtol=1e-5,
                                   atol=1e-6 * np.abs(C).max())
    # and agrees with the direct solver's, computed at each pixel's last alternation
    direct = train_pixels(A, flux, ivar, solver="direct", theta_covariance=True)[2]["theta_cov"]
    np.testing.assert_allclose(info["theta_cov"], direct, rtol=2e-2, atol=2e-2 * np.abs(direct).max())


def test_cg_training_falls_back_to_the_direct_solve_when_it_does_not_converge(problem, monkeypatch):
    A, flux, ivar = problem
    s2 = np.full(flux.shape[1], 1e-5)
    theta_d, _, _ = train_pixels(A, flux, ivar, fixed_s2=s2, solver="direct")
    monkeypatch.setattr(engines, "_CG_MAX_ITERATIONS", 1)
    theta_c, _, _ = train_pixels(A, flux, ivar, fixed_s2=s2, solver="cg")
    np.testing.assert_allclose(theta_c, theta_d, rtol=1e-8, atol=1e-10)


def test_threads_share_pixel_blocks_without_changing_the_result(problem, monkeypatch):
    A, flux, ivar = problem
    monkeypatch.setattr(engines, "_ELEMENTWISE_BYTES", 8 * len(A) * 7)  # many small blocks
    done = []
    with engines._blas_limit(1):  # as the threads' BLAS
        one = train_pixels(A, flux, ivar, regularization=5.0, n_threads=1)
    two = train_pixels(A, flux, ivar, regularization=5.0, n_threads=2, progress=done.append)
    assert sum(done) == flux.shape[1] and len(done) > 4
    for a, b in zip(one[:2], two[:2]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    for key in ("n_iterations", "pixels_per_iteration", "lasso_unconverged"):
        assert one[2][key] == two[2][key]
    np.testing.assert_allclose(one[2]["theta_cov"], two[2]["theta_cov"], rtol=1e-10, atol=1e-18)


def test_cg_solver_refuses_what_needs_the_normal_matrix(problem):
    A, flux, ivar = problem
    with pytest.raises(ValueError, match="solver='direct'"):
        train_pixels(A, flux, ivar, regularization=10.0, solver="cg")
    with pytest.raises(ValueError, match="solver must be"):
        train_pixels(A, flux, ivar, solver="lu")


def test_batched_training_equals_per_pixel_linalg_at_fixed_scatter(problem, truth):
    A, flux, ivar = problem
    s2 = truth.s2
    theta, _, info = train_pixels(A, flux, ivar, fixed_s2=s2)
    for p in range(0, flux.shape[1], 23):
        f = np.where(ivar[:, p] > 0, flux[:, p], 0.0)
        expected, _ = fit_theta_by_linalg(f, ivar[:, p], s2[p], A)
        np.testing.assert_allclose(theta[p], expected, rtol=1e-8, atol=1e-10)


def test_batched_training_s2_matches_reference_estimate(problem):
    A, flux, ivar = problem
    # a tight tolerance: the alternation converges to the reference's fixed point
    theta, s2, _ = train_pixels(A, flux, ivar, weight_rtol=1e-5)
    for p in range(0, flux.shape[1], 37):
        t, s2_ref, _ = fit_pixel_fixed_scatter(np.where(ivar[:, p] > 0, flux[:, p], 0), ivar[:, p], [(theta[p], "batched")],
                                               A, 0.0, None, s2=s2[p])
        np.testing.assert_allclose(t, theta[p], rtol=1e-4, atol=1e-6)
        assert s2_ref == pytest.approx(s2[p], rel=1e-3, abs=1e-9)


def test_default_weight_tolerance_leaves_theta_within_2_percent_of_its_uncertainty(problem):
    A, flux, ivar = problem
    theta, s2, info = train_pixels(A, flux, ivar, theta_covariance=True)
    theta_tight, s2_tight, _ = train_pixels(A, flux, ivar, weight_rtol=1e-6)
    K = A.shape[1]
    sd = np.sqrt(unpack_symmetric(info["theta_cov"], K)[:, np.arange(K), np.arange(K)])
    assert np.max(np.abs(theta - theta_tight) / sd) < 0.02
    np.testing.assert_allclose(s2, s2_tight, rtol=1e-2, atol=1e-9)
    assert info["n_iterations"] <= 3


def test_batched_l1_reaches_reference_objective(problem):
    A, flux, ivar = problem
    lam = 300.0
    theta, s2, info = train_pixels(A, flux, ivar, regularization=lam, fixed_s2=np.zeros(flux.shape[1]))
    assert info["lasso_unconverged"] == 0
    for p in range(0, flux.shape[1], 29):
        f = np.where(ivar[:, p] > 0, flux[:, p], 0)
        t, _, meta = fit_pixel_fixed_scatter(f, ivar[:, p], [(theta[p], "batched"), (np.eye(A.shape[1])[0], "guess")],
                                             A, lam, None)
        # the batched optimum is at least as good as L-BFGS-B's (to solver precision)
        assert info["objective"][p] <= meta["fopt"] + 1e-6 * abs(meta["fopt"])
    assert np.mean(theta[:, 1:] == 0) > 0.05  # L1 produces exact zeros


def test_censored_terms_are_zero_and_others_match_reference(problem):
    A, flux, ivar = problem
    P, K = flux.shape[1], A.shape[1]
    cens = np.zeros((P, K), dtype=bool)
    cens[::3, [3, 6, 8, 9]] = True
    theta, _, _ = train_pixels(A, flux, ivar, censored_terms=cens, fixed_s2=np.zeros(P))
    assert np.all(theta[cens] == 0)
    p = 3
    t, _, _ = fit_pixel_fixed_scatter(np.where(ivar[:, p] > 0, flux[:, p], 0), ivar[:, p], [], A, 0.0, cens[p])
    np.testing.assert_allclose(theta[p], t, rtol=1e-5, atol=1e-7)


def test_dead_pixels_get_infinite_scatter(problem):
    A, flux, ivar = problem
    ivar = ivar.copy()
    ivar[:, 4] = 0
    ivar[5:, 9] = 0  # 5 stars < 10 terms
    theta, s2, info = train_pixels(A, flux, ivar)
    assert np.isinf(s2[[4, 9]]).all() and info["dead"][[4, 9]].all()
    np.testing.assert_array_equal(theta[4], np.eye(A.shape[1])[0])


def test_sufficient_statistics_reproduce_direct_chi2(truth):
    _, flux, ivar = truth.sample(20)
    stats = SpectrumStatistics(truth.theta, flux, ivar, truth.s2)
    x = np.random.default_rng(1).normal(size=(20, 3)) * 0.3
    V = truth.vectorizer.get_label_vector(x).T
    model = V @ truth.theta.T
    w = ivar / (1 + ivar * truth.s2)
    w = np.where(np.isfinite(flux), w, 0)
    direct = np.nansum(w * (model - np.nan_to_num(flux)) ** 2, axis=1)
    np.testing.assert_allclose(stats.chi2(V, np.arange(20)), direct, rtol=1e-9)
    grid = stats.chi2_grid(V[:4])
    for c in range(4):
        np.testing.assert_allclose(grid[:, c], np.nansum(w * (model[c] - np.nan_to_num(flux)) ** 2, axis=1), rtol=1e-9)


def test_threads_do_not_change_the_result_bit_for_bit(truth, monkeypatch):
    labels, flux, ivar = truth.sample(300)
    flux[3] = np.nan  # a failed spectrum in one of the chunks
    starts = np.vstack([truth.fiducials, labels[:4]])
    args = (truth.theta, truth.s2, truth.vectorizer, truth.fiducials, truth.scales, flux, ivar, starts)
    # Small chunks, so that each batch has several, some of unequal sizes.
    monkeypatch.setattr(SpectrumStatistics, "_CHUNK_SPECTRA", 64)
    done = []
    # With a single-threaded BLAS: a multi-threaded one rounds its products differently.
    with engines._blas_limit(1):
        one = label_spectra(*args, n_threads=1, batch_size=128)
        other_batches = label_spectra(*args, n_threads=1, batch_size=77)
    two = label_spectra(*args, n_threads=2, batch_size=128, progress=done.append)
    assert done == [128, 128, 44]
    for key, value in one.items():
        np.testing.assert_array_equal(two[key], value, err_msg=key)
    # Other batches make other chunks, whose products may round differently (BLAS kernels
    # block by matrix size), and chi2 is a difference of sums ~1e4 times larger than itself.
    for key, value in other_batches.items():
        rtol = 1e-10 if key in ("chi2", "rchi2") else 1e-12
        np.testing.assert_allclose(two[key], value, rtol=rtol, atol=1e-14, err_msg=key)
    assert two["flags"][3] & F.NO_INFORMATION and not np.any(two["flags"][4:] & F.NO_INFORMATION)


def test_statistics_in_chunks_and_threads_equal_one_sweep(truth, monkeypatch):
    _, flux, ivar = truth.sample(90)
    ivar[10, :50] = 0  # bad pixels in one chunk only
    whole = SpectrumStatistics(truth.theta, flux, ivar, truth.s2)
    monkeypatch.setattr(SpectrumStatistics, "_CHUNK_SPECTRA", 32)
    serial = SpectrumStatistics(truth.theta, flux, ivar, truth.s2)
    assert [(c.start, c.stop) for c in serial._chunks()] == [(0, 30), (30, 60), (60, 90)]
    with engines._blas_limit(1), concurrent.futures.ThreadPoolExecutor(2) as pool:
        threaded = SpectrumStatistics(truth.theta, flux, ivar, truth.s2, executor=pool)
    for name in ("Q", "c", "e", "n_pixels", "snr", "mean_flux"):
        np.testing.assert_array_equal(getattr(threaded, name), getattr(serial, name), err_msg=name)
        # (the S/N and mean flux are float32 sums)
        rtol = 1e-6 if name in ("snr", "mean_flux") else 1e-12
        np.testing.assert_allclose(getattr(threaded, name), getattr(whole, name), rtol=rtol, err_msg=name)
    usable = (ivar > 0) & np.isfinite(flux) & np.isfinite(ivar)
    np.testing.assert_array_equal(threaded.n_pixels, usable.sum(axis=1))


def test_chunks_are_even_in_number_and_bounded():
    stats = SpectrumStatistics.__new__(SpectrumStatistics)
    sizes = {}
    for S in (0, 1, 100, 127, 128, 256, 257, 300, 600, 1024):
        stats._flux = np.zeros((S, 1))
        chunks = stats._chunks()
        assert chunks[0].start == 0 and chunks[-1].stop == S
        assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
        sizes[S] = [c.stop - c.start for c in chunks]
    assert max(max(v) for v in sizes.values()) <= SpectrumStatistics._CHUNK_SPECTRA
    assert sizes[100] == [100] and sizes[128] == [64, 64] and sizes[300] == [150, 150]
    assert sizes[600] == [150] * 4 and sizes[1024] == [256] * 4


def test_batched_test_step_equals_reference_fit_spectrum(truth):
    labels, flux, ivar = truth.sample(12)
    starts = truth.fiducials[None, :]
    out = label_spectra(truth.theta, truth.s2, truth.vectorizer, truth.fiducials, truth.scales, flux, ivar, starts,
                       optimise_all=True)
    for i in range(12):
        lab, cov, meta = fit_spectrum(flux[i], ivar[i], starts, truth.vectorizer, truth.theta, truth.s2,
                                      truth.fiducials, truth.scales)
        np.testing.assert_allclose((out["labels"][i] - lab) / truth.scales, 0, atol=1e-6)
        np.testing.assert_allclose(out["cov"][i], cov, rtol=1e-5, atol=1e-12)
        assert out["chi2"][i] == pytest.approx(meta["chi_sq"], rel=1e-8)
        assert out["snr"][i] == pytest.approx(meta["snr"], rel=1e-6)
        assert out["n_pixels"][i] == meta["n_pixels"]


def test_batched_l1_solution_satisfies_kkt_conditions(problem):
    A, flux, ivar = problem
    P = flux.shape[1]
    lam = np.where(np.arange(P) % 2 == 0, 50.0, 2000.0)  # per-pixel strengths
    theta, _, info = train_pixels(A, flux, ivar, regularization=lam, fixed_s2=np.zeros(P))
    assert info["lasso_unconverged"] == 0
    f = np.where(ivar > 0, flux, 0.0)
    for p in range(0, P, 7):
        M = (A * ivar[:, p, None]).T @ A
        b = A.T @ (ivar[:, p] * f[:, p])
        half_grad = b - M @ theta[p]  # stationarity: half_grad_k = lam/2 sign(theta_k) on the support
        nz = theta[p, 1:] != 0
        assert abs(half_grad[0]) < 1e-6 * np.abs(b[0])
        np.testing.assert_allclose(half_grad[1:][nz], lam[p] / 2 * np.sign(theta[p, 1:][nz]), rtol=1e-6, atol=1e-6)
        assert np.all(np.abs(half_grad[1:][~nz]) <= lam[p] / 2 * (1 + 1e-6))


@pytest.fixture(scope="module")
def quartic():
    """A 35-term model (3 labels, order 4): the test step builds Q in float32 and polishes."""
    from astra_cannon import CannonModel
    from fixtures_numerics import TruthModel

    t = TruthModel(n_pixels=400, seed=21, order=4)
    labels, flux, ivar = t.sample(400)
    model = CannonModel(labels, flux, ivar, t.vectorizer)
    model.train(theta_covariance=True)
    return model, t


def _assert_same_covariance(got, expected, rtol=1e-4, atol=1e-5):
    """Uncertainties within ``rtol`` and correlations within ``atol`` (one matrix or a stack)."""
    sg = np.sqrt(np.diagonal(got, axis1=-2, axis2=-1))
    se = np.sqrt(np.diagonal(expected, axis1=-2, axis2=-1))
    np.testing.assert_allclose(sg, se, rtol=rtol)
    corr = lambda c, s: c / s[..., :, None] / s[..., None, :]  # noqa: E731
    np.testing.assert_allclose(corr(got, sg), corr(expected, se), atol=atol)


def _assert_same_fit(fit, double):
    """Labels within 1e-4 sigma (the optimiser's own tolerance, chi2_atol = 1e-10, is ~1e-5
    sigma), uncertainties within 1e-5 and correlations within 1e-5 of the float64 fit."""
    sigma = np.sqrt(np.diagonal(double["cov"], axis1=1, axis2=2))
    np.testing.assert_allclose((fit["labels"] - double["labels"]) / sigma, 0, atol=1e-4)
    _assert_same_covariance(fit["cov"], double["cov"], rtol=1e-5)


@pytest.mark.parametrize("model_noise", [False, True])
def test_single_precision_q_gives_the_double_precision_fit(quartic, model_noise):
    from astra_cannon.engines import _pairs_table, _single_precision

    model, t = quartic
    K = model.theta.shape[1]
    assert _single_precision(K)
    _, flux, ivar = t.sample(40)
    starts = model.default_starts()
    args = (model.theta, model.s2, model.vectorizer, model.fiducials, model.scales, flux, ivar, starts)
    kw = dict(theta_cov=model.theta_cov if model_noise else None)
    single = label_spectra(*args, theta_pairs=_pairs_table(model.theta, np.float32), **kw)
    double = label_spectra(*args, theta_pairs=_pairs_table(model.theta, np.float64), **kw)
    _assert_same_fit(single, double)
    # With the model noise, the weights depend on the first optimum, itself only fixed to the
    # optimiser's tolerance: chi2 then agrees to ~1e-7.
    np.testing.assert_allclose(single["chi2"], double["chi2"], rtol=1e-6 if model_noise else 1e-8)
    assert np.all(single["ier"] == 1)


def test_single_precision_fit_equals_reference_fit_spectrum(quartic):
    from astra_cannon.engines import _pairs_table

    model, t = quartic
    _, flux, ivar = t.sample(6)
    start = model.fiducials[None, :]
    out = label_spectra(model.theta, model.s2, model.vectorizer, model.fiducials, model.scales, flux, ivar, start,
                        optimise_all=True, theta_pairs=_pairs_table(model.theta, np.float32))
    for i in range(6):
        lab, cov, meta = fit_spectrum(flux[i], ivar[i], start, model.vectorizer, model.theta, model.s2,
                                      model.fiducials, model.scales)
        sigma = np.sqrt(np.diag(cov))
        np.testing.assert_allclose((out["labels"][i] - lab) / sigma, 0, atol=1e-4)
        assert out["chi2"][i] == pytest.approx(meta["chi_sq"], rel=1e-8)


def test_exact_candidate_grid_matches_the_double_precision_chi2(quartic):
    from astra_cannon.engines import _pairs_table

    model, t = quartic
    _, flux, ivar = t.sample(10)
    V = model.vectorizer.get_label_vector((model.default_starts() - model.fiducials) / model.scales).T
    exact = SpectrumStatistics(model.theta, flux, ivar, model.s2,
                               theta_pairs=_pairs_table(model.theta, np.float32), candidates=V)
    double = SpectrumStatistics(model.theta, flux, ivar, model.s2, theta_pairs=_pairs_table(model.theta))
    assert exact.single and not double.single
    np.testing.assert_allclose(exact.grid, double.chi2_grid(V), rtol=1e-10)


def test_merged_starts_give_the_best_single_start_fit(truth):
    _, flux, ivar = truth.sample(12)
    starts = truth.fiducials + truth.scales * np.array([[0, 0, 0], [0.3, 0.3, 0.3], [-0.3, 0.2, -0.2],
                                                        [0.2, -0.3, 0.1]])
    args = (truth.theta, truth.s2, truth.vectorizer, truth.fiducials, truth.scales, flux, ivar)
    together = label_spectra(*args, starts, optimise_all=True)
    alone = [label_spectra(*args, s[None], optimise_all=True) for s in starts]
    chi = np.array([o["chi2"] for o in alone])
    best = np.argmin(chi, axis=0)
    labels = np.array([o["labels"] for o in alone])[best, np.arange(12)]
    sigma = np.sqrt(np.diagonal(together["cov"], axis1=1, axis2=2))
    np.testing.assert_allclose((together["labels"] - labels) / sigma, 0, atol=1e-4)
    np.testing.assert_allclose(together["chi2"], chi.min(axis=0), rtol=1e-10)
    assert np.all(together["ier"] == 1)


@pytest.mark.parametrize("fallback", [False, True])
def test_monomial_path_gives_the_double_precision_fit(quartic, fallback, monkeypatch):
    """Models of 28+ terms without the model-noise pass fit on the objective's polynomial."""
    from astra_cannon.engines import _pairs_table, monomial_basis_for

    model, t = quartic
    assert monomial_basis_for(model.vectorizer, model.theta.shape[0]) is not None
    if fallback:  # no polished fit passes its check: all refitted by Levenberg-Marquardt
        monkeypatch.setattr(engines, "_NEWTON_CHECK_ATOL", -1.0)
    _, flux, ivar = t.sample(40)
    args = (model.theta, model.s2, model.vectorizer, model.fiducials, model.scales, flux, ivar,
            model.default_starts())
    merged = label_spectra(*args)
    double = label_spectra(*args, theta_pairs=_pairs_table(model.theta, np.float64))
    _assert_same_fit(merged, double)
    np.testing.assert_allclose(merged["chi2"], double["chi2"], rtol=1e-8)
    assert np.all(merged["ier"] == 1) and np.all(merged["flags"] == 0)


def test_monomial_path_equals_reference_fit_spectrum_for_a_28_term_quadratic():
    rng = np.random.default_rng(5)
    names = [f"L{i}" for i in range(6)]
    vec = PolynomialVectorizer(names, 2)  # 28 terms: the single-precision path
    P = 250
    theta = np.zeros((P, vec.n_terms))
    theta[:, 0] = 1.0
    theta[:, 1:] = 0.02 * rng.normal(size=(P, vec.n_terms - 1))
    fid, scl = np.zeros(6), np.ones(6)
    x = 0.3 * rng.normal(size=(5, 6))
    ivar = np.full((5, P), 100.0**2)
    flux = (theta @ vec.get_label_vector(x)).T + rng.normal(size=(5, P)) / 100.0
    ivar[:, ::37] = 0.0
    s2 = np.zeros(P)
    out = label_spectra(theta, s2, vec, fid, scl, flux, ivar, fid[None, :], optimise_all=True)
    assert engines.monomial_basis_for(vec, P) is not None
    for i in range(5):
        lab, cov, meta = fit_spectrum(flux[i], ivar[i], fid[None, :], vec, theta, s2, fid, scl)
        sigma = np.sqrt(np.diag(cov))
        np.testing.assert_allclose((out["labels"][i] - lab) / sigma, 0, atol=1e-4)
        np.testing.assert_allclose(np.sqrt(np.diag(out["cov"][i])), sigma, rtol=1e-4)
        assert out["chi2"][i] == pytest.approx(meta["chi_sq"], rel=1e-8)


def _corrected_terms_by_pixel(model, flux, ivar, x):
    """At scaled labels ``x`` of one spectrum, pixel by pixel in float64: ``H = J^T W J``,
    ``D^T G D``, the plain half gradient ``-J^T W r``, ``D^T G v``, ``v^T G v`` and the number
    of usable pixels (``G = sum_p w_p Cov(theta_p)``)."""
    use = (ivar > 0) & np.isfinite(flux)
    w = np.where(use, 1.0 / (1.0 / np.where(use, ivar, 1.0) + model.s2), 0.0)
    v = model.vectorizer._vector_rows(x[None])[0]
    D = model.vectorizer._derivative_rows(x[None])[0]  # (K, L)
    J = model.theta @ D
    r = np.where(use, flux, 0.0) - model.theta @ v
    G = np.einsum("p,pij->ij", w, unpack_symmetric(model.theta_cov, model.theta.shape[1]))
    return (np.einsum("p,pl,pm->lm", w, J, J), D.T @ G @ D, -np.einsum("p,pl,p->l", w, J, r), D.T @ G @ v,
            v @ G @ v, use.sum())


def test_monomial_path_with_model_noise_gives_the_k_by_k_corrected_fit(quartic):
    """28+ terms: the model-noise correction on the objective's polynomial (G merged per
    spectrum) reproduces the corrected fit on the K x K statistics in float64."""
    from astra_cannon.engines import _pairs_table, monomial_basis_for

    model, t = quartic
    assert monomial_basis_for(model.vectorizer, model.theta.shape[0], model.theta_cov) is not None
    _, flux, ivar = t.sample(40)
    args = (model.theta, model.s2, model.vectorizer, model.fiducials, model.scales, flux, ivar,
            model.default_starts())
    merged = label_spectra(*args, theta_cov=model.theta_cov)
    double = label_spectra(*args, theta_cov=model.theta_cov, theta_pairs=_pairs_table(model.theta, np.float64))
    plain = label_spectra(*args)
    _assert_same_fit(merged, double)
    np.testing.assert_allclose(merged["chi2"], double["chi2"], rtol=1e-6)
    np.testing.assert_array_equal(merged["flags"], double["flags"])
    # the correction matters here: it moves the labels by more than the tolerance above
    sigma = np.sqrt(np.diagonal(double["cov"], axis1=1, axis2=2))
    assert np.max(np.abs(merged["labels"] - plain["labels"]) / sigma) > 0.1


def test_monomial_path_keeps_the_plain_fit_with_its_bias_where_the_model_noise_dominates(quartic, monkeypatch):
    model, t = quartic
    _, flux, ivar = t.sample(6)
    args = (model.theta, model.s2, model.vectorizer, model.fiducials, model.scales, flux, ivar,
            model.default_starts())
    plain = label_spectra(*args)
    monkeypatch.setattr(engines, "MAX_MODEL_NOISE_FRACTION", 0.0)
    out = label_spectra(*args, theta_cov=model.theta_cov)
    assert np.all(out["flags"] == F.MODEL_NOISE_DOMINATED)
    sigma = np.sqrt(np.diagonal(plain["cov"], axis1=1, axis2=2))
    np.testing.assert_allclose((out["labels"] - plain["labels"]) / sigma, 0, atol=1e-4)
    for i in range(6):
        x = (out["labels"][i] - model.fiducials) / model.scales
        H, _, _, DGv, vGv, n = _corrected_terms_by_pixel(model, flux[i], ivar[i], x)
        b = np.linalg.solve(H, DGv)  # the plain fit's expected bias
        expected = (np.linalg.inv(H) + np.outer(b, b)) * (1 + vGv / n)
        _assert_same_covariance(out["cov"][i], model.scales[:, None] * expected * model.scales)
        assert out["chi2"][i] == pytest.approx(plain["chi2"][i] / (1 + vGv / n), rel=1e-6)


def test_monomial_path_fits_a_batch_of_corrected_and_plain_spectra_as_each_alone(quartic, monkeypatch):
    """Spectra that keep the plain fit and spectra that are corrected share a batch (and its
    exact passes over the pixels) without changing each other's result."""
    model, t = quartic
    _, flux, ivar = t.sample(8)
    starts = model.default_starts()
    ratios = []
    within = engines._within_model_noise_limit

    def spy(H_data, H_noise):
        vals, vecs = np.linalg.eigh(H_data)
        root = vecs / np.sqrt(vals)[:, None, :]
        ratios.extend(np.linalg.eigvalsh(np.transpose(root, (0, 2, 1)) @ H_noise @ root).max(axis=1))
        return within(H_data, H_noise)

    monkeypatch.setattr(engines, "_within_model_noise_limit", spy)

    def fit(f, iv):
        return label_spectra(model.theta, model.s2, model.vectorizer, model.fiducials, model.scales, f, iv,
                             starts, theta_cov=model.theta_cov)

    fit(flux, ivar)
    # half of the batch over the limit
    monkeypatch.setattr(engines, "MAX_MODEL_NOISE_FRACTION", float(np.median(ratios[:8])))
    batch = fit(flux, ivar)
    assert set(batch["flags"]) == {0, F.MODEL_NOISE_DOMINATED}
    for i in range(8):
        alone = fit(flux[i:i + 1], ivar[i:i + 1])
        assert alone["flags"][0] == batch["flags"][i]
        sigma = np.sqrt(np.diag(alone["cov"][0]))
        np.testing.assert_allclose((batch["labels"][i] - alone["labels"][0]) / sigma, 0, atol=1e-5)
        _assert_same_covariance(batch["cov"][i], alone["cov"][0])


def test_monomial_path_runaway_takes_one_gauss_newton_step_of_the_corrected_objective(quartic, monkeypatch):
    """A corrected fit that ends where its objective is not convex is replaced by one
    Gauss-Newton step of the corrected objective from the plain optimum (checked against that
    step built pixel by pixel), with the sandwich covariance there."""
    model, t = quartic
    _, flux, ivar = t.sample(6)
    args = (model.theta, model.s2, model.vectorizer, model.fiducials, model.scales, flux, ivar,
            model.default_starts())
    plain = label_spectra(*args)
    monkeypatch.setattr(engines, "_corrected_fit_convex", lambda x, H, ier: np.zeros(len(x), dtype=bool))
    out = label_spectra(*args, theta_cov=model.theta_cov)
    assert np.all(out["flags"] == 0)
    for i in range(6):
        x = (plain["labels"][i] - model.fiducials) / model.scales
        H, DGD, g, DGv, _, _ = _corrected_terms_by_pixel(model, flux[i], ivar[i], x)
        x_step = x - np.linalg.solve(H - DGD, g - DGv)
        sigma = np.sqrt(np.diag(plain["cov"][i])) / model.scales
        got = (out["labels"][i] - model.fiducials) / model.scales
        np.testing.assert_allclose((got - x_step) / sigma, 0, atol=1e-3)
        H, DGD, _, _, vGv, n = _corrected_terms_by_pixel(model, flux[i], ivar[i], got)
        Hc_inv = np.linalg.inv(H - DGD)
        expected = Hc_inv @ H @ Hc_inv * (1 + vGv / n)
        _assert_same_covariance(out["cov"][i], model.scales[:, None] * expected * model.scales)


def test_monomial_path_with_model_noise_gives_unit_pulls(quartic):
    """400 training stars for 35 terms: without the correction the pulls are 2-3.5."""
    model, t = quartic
    labels, flux, ivar = t.sample(200)
    args = (model.theta, model.s2, model.vectorizer, model.fiducials, model.scales, flux, ivar,
            model.default_starts())
    pulls = {}
    for name, kw in (("corrected", dict(theta_cov=model.theta_cov)), ("plain", {})):
        out = label_spectra(*args, **kw)
        assert not np.any(out["flags"] & F.FAILURE_FLAGS)
        pulls[name] = ((out["labels"] - labels) / np.sqrt(np.diagonal(out["cov"], axis1=1, axis2=2))).std(axis=0)
    assert np.all(np.abs(pulls["corrected"] - 1) < 0.1), pulls
    assert np.all(pulls["plain"] > 1.5), pulls


@pytest.mark.parametrize("which", ["quadratic", "quartic"])
def test_no_spectra_give_empty_results(truth, quartic, which):
    if which == "quadratic":
        args = (truth.theta, truth.s2, truth.vectorizer, truth.fiducials, truth.scales)
    else:
        model, _ = quartic
        args = (model.theta, model.s2, model.vectorizer, model.fiducials, model.scales)
    P = args[0].shape[0]
    out = label_spectra(*args, np.zeros((0, P)), np.zeros((0, P)), args[3][None, :])
    assert out["labels"].shape == (0, len(args[3])) and out["cov"].shape == (0, len(args[3]), len(args[3]))


def test_feature_sign_lasso_meets_kkt_and_matches_coordinate_descent():
    from astra_cannon.engines import _lasso_cd, _lasso_feature_sign, pixel_objective

    rng = np.random.default_rng(11)
    P, N, K = 40, 200, 30
    X = np.hstack([np.ones((N, 1)), rng.normal(size=(N, K - 1))])
    w = rng.uniform(0.5, 2.0, (P, N))
    M = np.einsum("pn,nk,nj->pkj", w, X, X)
    truth = np.where(rng.random((P, K)) < 0.2, rng.normal(size=(P, K)), 0.0)
    y = truth @ X.T + 0.3 * rng.normal(size=(P, N))
    b = np.einsum("pn,nk,pn->pk", w, X, y)
    c = np.einsum("pn,pn->p", w, y * y)
    lam = rng.uniform(20.0, 400.0, P)  # per pixel
    start = np.zeros((P, K))
    start[:, 0] = b[:, 0] / M[:, 0, 0]
    theta, steps, left, Mt = _lasso_feature_sign(M, b, lam, start)
    assert left.size == 0
    np.testing.assert_allclose(Mt, np.einsum("pij,pj->pi", M, theta), rtol=1e-12, atol=1e-9)
    # KKT: b - M t = lam/2 sign(t) on the support (not the constant), |b - M t| <= lam/2 off it
    z = b - Mt
    on = theta != 0
    on[:, 0] = False
    np.testing.assert_allclose(z[on], (0.5 * lam[:, None] * np.sign(theta))[on], rtol=1e-8)
    assert np.all(np.abs(z[:, 0]) <= 1e-8 * np.abs(b[:, 0]))
    assert np.all(np.abs(z[theta == 0]) <= (0.5 * lam[:, None] * (1 + 1e-9) + 1e-9).repeat(K, 1)[theta == 0])
    # the same optimum as coordinate descent (the objective is strictly convex here)
    cd, _, cd_left = _lasso_cd(M, b, lam, start, tol=1e-12)
    assert cd_left.size == 0
    np.testing.assert_allclose(pixel_objective(M, b, c, theta, lam), pixel_objective(M, b, c, cd, lam), rtol=1e-10)
    assert 0.05 < np.mean(theta[:, 1:] != 0) < 0.9
    # from the solution at a weaker Lambda (as from an earlier alternation): many coefficients
    # must leave the active set, several per step
    weak, _, _, _ = _lasso_feature_sign(M, b, 0.2 * lam, start)
    warm, warm_steps, warm_left, _ = _lasso_feature_sign(M, b, lam, weak)
    assert warm_left.size == 0
    np.testing.assert_allclose(pixel_objective(M, b, c, warm, lam), pixel_objective(M, b, c, cd, lam), rtol=1e-10)
    dropped = (weak[:, 1:] != 0).sum(axis=1) - (warm[:, 1:] != 0).sum(axis=1)
    assert np.any(warm_steps < dropped)  # more than one coefficient left in some step


def test_l1_scatter_estimate_counts_the_lasso_degrees_of_freedom():
    """With L1 the fit has as many degrees of freedom as non-zero coefficients (Zou et al. 2007);
    counting every term (56 here, ~20 in use) puts scatter into clean pixels (measured: median
    s 0.0019 instead of 0, and 0.0107 for a true 0.01)."""
    rng = np.random.default_rng(12)
    vec = PolynomialVectorizer(["A", "B", "C", "D", "E"], 3)  # 56 terms
    N, P, K = 600, 200, vec.n_terms
    A = vec.get_label_vector(rng.uniform(-1, 1, (N, 5))).T
    theta = np.zeros((P, K))
    theta[:, 0] = 1.0
    for p in range(P):  # three real terms per pixel, like a line that reacts to few labels
        theta[p, rng.choice(np.arange(1, K), 3, replace=False)] = rng.choice([-1, 1], 3) * rng.uniform(0.02, 0.1, 3)
    s_true = np.where(np.arange(P) % 3 == 0, 0.01, 0.0)
    sigma = 1.0 / rng.uniform(80, 150, (N, 1)) * np.ones((N, P))
    flux = A @ theta.T + s_true * rng.normal(size=(N, P)) + sigma * rng.normal(size=(N, P))
    _, s2, info = train_pixels(A, flux, 1.0 / sigma**2, regularization=1000.0)
    s = np.sqrt(s2)
    assert np.median(s[s_true == 0]) < 5e-4
    assert abs(np.median(s[s_true > 0]) / 0.01 - 1) < 0.03


def test_known_pair_monomials_give_the_numerically_merged_training(problem, truth):
    from astra_cannon.engines import _basis

    A, flux, ivar = problem
    groups = _basis(truth.vectorizer.n_labels, tuple(truth.vectorizer.terms)).pair_group
    numeric = train_pixels(A, flux, ivar, theta_covariance=True)
    symbolic = train_pixels(A, flux, ivar, theta_covariance=True, pair_monomials=groups)
    np.testing.assert_allclose(symbolic[0], numeric[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(symbolic[1], numeric[1], rtol=1e-8, atol=1e-15)
    # (float32: one rounding step of difference where the float64 values straddle it)
    np.testing.assert_allclose(symbolic[2]["theta_cov"], numeric[2]["theta_cov"], rtol=1.2e-7, atol=1e-15)


def _statistics_masked_pixel_by_pixel(monkeypatch, *args, **kwargs):
    """SpectrumStatistics with every block through the general masking path."""
    original = SpectrumStatistics._block

    def masked(self, sl, f, r, w, bad, reduce, state, rows=None):
        fb, rb, _ = self._masked(sl, f, r, bad, rows)
        np.divide(1.0, rb, out=w)
        return fb, w, True, reduce(fb, w)

    monkeypatch.setattr(SpectrumStatistics, "_block", masked)
    try:
        return SpectrumStatistics(*args, **kwargs)
    finally:
        monkeypatch.setattr(SpectrumStatistics, "_block", original)


@pytest.mark.parametrize("bad_flux", ["finite", "nan", "inf"])
def test_unmasked_blocks_give_the_pixel_by_pixel_statistics(truth, monkeypatch, bad_flux):
    _, flux, ivar = truth.sample(30, nan_bad=False)
    bad = ivar == 0
    flux[bad] = {"finite": 7.0, "nan": np.nan, "inf": np.inf}[bad_flux]
    s2 = truth.s2.copy()
    s2[5] = np.inf  # a dead pixel
    theta_cov = np.abs(np.random.default_rng(2).normal(size=(truth.theta.shape[0], 55))) * 1e-6
    kw = dict(theta_cov=theta_cov.astype(np.float32))
    fast = SpectrumStatistics(truth.theta, flux, ivar, s2, **kw)
    slow = _statistics_masked_pixel_by_pixel(monkeypatch, truth.theta, flux, ivar, s2, **kw)
    for name in ("Q", "c", "e", "G"):
        np.testing.assert_allclose(getattr(fast, name), getattr(slow, name), rtol=1e-12, atol=1e-9, err_msg=name)
    np.testing.assert_array_equal(fast.n_pixels, slow.n_pixels)
    np.testing.assert_allclose(fast.snr, slow.snr, rtol=1e-6)
    np.testing.assert_allclose(fast.mean_flux, slow.mean_flux, rtol=1e-6)
    assert np.all(fast.n_pixels == flux.shape[1] - bad.sum(axis=1) - ~bad[:, 5])


def test_statistics_mask_bad_ivar_and_flux_at_usable_pixels(truth, monkeypatch):
    _, flux, ivar = truth.sample(12, nan_bad=False)
    ivar[0, 3], ivar[1, 4], ivar[2, 5] = np.nan, np.inf, -1.0  # each marks its pixel unusable
    flux[3, 6] = np.nan  # at a pixel whose ivar > 0
    flux[4, 7] = np.inf
    fast = SpectrumStatistics(truth.theta, flux, ivar, truth.s2)
    slow = _statistics_masked_pixel_by_pixel(monkeypatch, truth.theta, flux, ivar, truth.s2)
    np.testing.assert_allclose(fast.Q, slow.Q, rtol=1e-12)
    np.testing.assert_allclose(fast.c, slow.c, rtol=1e-12)
    np.testing.assert_array_equal(fast.n_pixels, slow.n_pixels)
    assert np.all(np.isfinite(fast.Q)) and np.all(np.isfinite(fast.e))
    assert fast.n_pixels[0] == np.count_nonzero(ivar[0] > 0) - 1 + 1  # NaN ivar: not > 0 already
    assert fast.n_pixels[3] == np.count_nonzero(ivar[3] > 0) - 1


def test_exact_residual_agrees_with_a_direct_sum_with_nan_flux_at_bad_pixels(truth):
    _, flux, ivar = truth.sample(8)  # half the bad pixels hold NaN flux
    stats = SpectrumStatistics(truth.theta, flux, ivar, truth.s2)
    V = truth.vectorizer.get_label_vector(np.random.default_rng(3).normal(size=(3, 3)) * 0.3).T
    rows = np.array([1, 4, 6])
    resid, chi = stats.exact_residual(rows, V)
    w = np.where(ivar[rows] > 0, ivar[rows] / (1 + ivar[rows] * truth.s2), 0.0)
    r = V @ truth.theta.T - np.where(ivar[rows] > 0, flux[rows], 0.0)
    np.testing.assert_allclose(chi, np.sum(w * r**2, axis=1), rtol=1e-10)
    np.testing.assert_allclose(resid, (w * r) @ truth.theta, rtol=1e-9, atol=1e-9)


def test_sorted_and_unsorted_rows_give_the_same_slots():
    from astra_cannon.engines import _slots

    rng = np.random.default_rng(4)
    for _ in range(50):
        rows = np.sort(rng.integers(0, 9, size=rng.integers(1, 30)))
        shuffled = rng.permutation(rows)
        for r in (rows, shuffled):
            uniq, inv, slot, width = _slots(r)
            np.testing.assert_array_equal(uniq[inv], r)
            counts = np.bincount(inv)
            assert width == counts.max()
            for u in range(uniq.size):  # each value's rows numbered 0, 1, ... in order
                np.testing.assert_array_equal(slot[inv == u], np.arange(counts[u]))


def test_median_of_good_entries_matches_numpy_with_negative_values():
    from astra_cannon.engines import _median_of_good

    rng = np.random.default_rng(5)
    for _ in range(200):
        S, P = rng.integers(1, 5), rng.integers(1, 30)
        values = rng.normal(rng.choice([-3.0, 0.0, 3.0]), 2.0, size=(S, P)).astype(np.float32)
        values[rng.random((S, P)) < 0.1] = 0.0
        bad = rng.random((S, P)) < rng.choice([0.0, 0.3, 0.95])
        expected = [np.median(v[~b]) if (~b).any() else np.nan for v, b in zip(values, bad)]
        np.testing.assert_allclose(_median_of_good(values, bad), expected, rtol=1e-6)


def test_training_ignores_non_finite_flux_where_ivar_is_zero(problem):
    A, flux, ivar = problem
    zeroed = np.where(ivar > 0, flux, 0.0)
    nan_flux = zeroed.copy()
    nan_flux[ivar == 0] = np.nan
    nan_flux[(ivar == 0) & (np.arange(flux.shape[1]) % 2 == 0)] = np.inf
    a = train_pixels(A, zeroed, ivar, theta_covariance=True)
    b = train_pixels(A, nan_flux, ivar, theta_covariance=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2]["theta_cov"], b[2]["theta_cov"])


def test_small_matrix_solve_matches_lapack_and_falls_back_where_not_positive_definite():
    from astra_cannon.engines import _solve_spd, _solve_spd_small

    rng = np.random.default_rng(7)
    for L in (1, 2, 3, 4):
        X = rng.normal(size=(400, 8, L))
        M = np.einsum("nkl,nkm->nlm", X, X)
        b = rng.normal(size=(400, L))
        M[0] = 0.0  # singular: pseudo-inverse, as in _solve_spd
        M[1] = -np.eye(L)  # negative definite: solved exactly all the same
        np.testing.assert_allclose(_solve_spd_small(M, b), _solve_spd(M.copy(), b.copy()), rtol=1e-9, atol=1e-12)


def test_reused_scratch_buffers_leave_no_trace_between_batches(truth):
    _, flux, ivar = truth.sample(30)
    _, other_flux, other_ivar = truth.sample(10, bad_fraction=0.5)
    first = SpectrumStatistics(truth.theta, flux, ivar, truth.s2)
    SpectrumStatistics(truth.theta, other_flux, other_ivar, truth.s2)  # other shapes and masks
    again = SpectrumStatistics(truth.theta, flux, ivar, truth.s2)
    for name in ("Q", "c", "e", "snr", "mean_flux", "n_pixels"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name), err_msg=name)


@pytest.mark.parametrize("K", [1, 3, 10, 15])
def test_vectorised_inverse_matches_lapack_and_falls_back_where_not_positive_definite(K):
    from astra_cannon.engines import inverse_spd_pixels_last
    from astra_cannon.model_noise import inverse_spd

    rng = np.random.default_rng(K)
    n = max(K, 12)  # (n == K too: the layout must not be guessed from the shape)
    X = rng.normal(size=(n, 3 * K, K))
    M = np.einsum("pnk,pnl->pkl", X, X) + 0.1 * np.eye(K)
    M[1] = 0.0  # singular
    v = rng.normal(size=K)
    M[2] = np.outer(v, v)  # rank one
    M[3] = -M[4]  # negative definite
    Xt = np.ascontiguousarray(M.transpose(1, 2, 0))
    before = Xt.copy()
    got = inverse_spd_pixels_last(Xt).transpose(2, 0, 1)
    np.testing.assert_array_equal(Xt, before)  # the input is left alone
    for p in range(n):
        # the rank-one matrix gets its pseudo-inverse, not numpy.linalg.inv's rounding noise
        expected = np.outer(v, v) / (v @ v) ** 2 if p == 2 and K > 1 else inverse_spd(M[p])
        np.testing.assert_allclose(got[p], expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max(), err_msg=p)


def test_vectorised_inverse_training_equals_the_lapack_path(problem, monkeypatch):
    A, flux, ivar = problem
    fast = train_pixels(A, flux, ivar, theta_covariance=True)
    monkeypatch.setattr(engines, "_SWEEP_MAX_TERMS", 0)
    slow = train_pixels(A, flux, ivar, theta_covariance=True)
    np.testing.assert_allclose(fast[0], slow[0], rtol=1e-9, atol=1e-12)
    # (s2 far below the noise variance takes the rounding of chi2 amplified)
    np.testing.assert_allclose(fast[1], slow[1], rtol=1e-7, atol=1e-14)
    np.testing.assert_allclose(fast[2]["objective"], slow[2]["objective"], rtol=1e-9)
    np.testing.assert_allclose(fast[2]["theta_cov"], slow[2]["theta_cov"], rtol=1e-6, atol=1e-12)
    assert fast[2]["pixels_per_iteration"] == slow[2]["pixels_per_iteration"]
    # and the covariance is the inverse at each pixel's final weights (to the alternation's
    # weight tolerance)
    K = A.shape[1]
    for p in range(0, flux.shape[1], 29):
        w = ivar[:, p] / (1.0 + ivar[:, p] * fast[1][p])
        C = np.linalg.inv((A * w[:, None]).T @ A)
        np.testing.assert_allclose(unpack_symmetric(fast[2]["theta_cov"][p], K), C, rtol=2e-2,
                                   atol=2e-2 * np.abs(C).max())


@pytest.mark.parametrize("bad_flux", [7.0, np.nan])
def test_snr_and_mean_flux_are_the_median_and_mean_over_usable_pixels(truth, bad_flux):
    """S/N is the median of f sqrt(w) over the usable pixels (w with the model's scatter), also
    where flux is negative; checked against numpy row by row."""
    _, flux, ivar = truth.sample(9, nan_bad=False)
    flux[1] -= 1.0  # about half the pixels negative
    flux[2] = -flux[2]  # all negative: S/N < 0
    flux[3, ::3] *= -1
    ivar[4, :7] = 0.0  # an odd and an even number of usable pixels
    ivar[5, :8] = 0.0
    flux[ivar == 0] = bad_flux
    stats = SpectrumStatistics(truth.theta, flux, ivar, truth.s2)
    for i in range(len(flux)):
        good = ivar[i] > 0
        w = ivar[i, good] / (1 + ivar[i, good] * truth.s2[good])
        assert stats.snr[i] == pytest.approx(np.median(flux[i, good] * np.sqrt(w)), rel=1e-6), i
        assert stats.mean_flux[i] == pytest.approx(np.mean(flux[i, good]), rel=1e-6, abs=1e-9), i
    assert stats.snr[2] < 0 < stats.snr[0]
