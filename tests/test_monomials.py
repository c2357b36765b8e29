"""The objective as an explicit polynomial (astra_cannon.monomials) against direct computations."""

import numpy as np
import pytest

from astra_cannon.engines import khatri_rao_upper, unpack_symmetric
from astra_cannon.monomials import MonomialBasis
from astra_cannon.vectorizer import PolynomialVectorizer


def _random_objective(rng, K, S):
    B = rng.normal(size=(S, K, K))
    Q = B @ np.transpose(B, (0, 2, 1)) + K * np.eye(K)
    return Q, rng.normal(size=(S, K)), rng.uniform(10, 100, S)


@pytest.mark.parametrize("n_labels, order", [(4, 2), (3, 3), (2, 4)])
def test_polynomial_equals_the_quadratic_form_in_the_label_vector(n_labels, order):
    rng = np.random.default_rng(0)
    vec = PolynomialVectorizer([f"L{i}" for i in range(n_labels)], order)
    basis = MonomialBasis(vec)
    K = vec.n_terms
    Q, c, e = _random_objective(rng, K, 5)
    iu, ju = np.triu_indices(K)
    q = np.zeros((5, basis.n_monomials))
    np.add.at(q, (slice(None), basis.pair_group), Q[:, iu, ju] * basis.pair_weight)
    a = basis.coefficients(q, c, e)
    x = rng.uniform(-1, 1, (5, n_labels))
    v = vec.get_label_vector(x).T
    direct = np.einsum("si,sij,sj->s", v, Q, v) - 2 * np.einsum("si,si->s", v, c) + e
    np.testing.assert_allclose(np.einsum("sm,sm->s", a, basis.values(x)), direct, rtol=1e-12)


def test_seventeen_label_quadratic_has_the_distinct_quartic_monomials():
    vec = PolynomialVectorizer([f"L{i}" for i in range(17)], 2)
    basis = MonomialBasis(vec)
    assert basis.n_monomials == 5985  # C(21, 4): 2.5x fewer than the 14706 pairs
    assert len(basis.pair_group) == 14706


def test_gradient_and_hessian_match_finite_differences():
    rng = np.random.default_rng(1)
    vec = PolynomialVectorizer(["A", "B", "C"], 3)
    basis = MonomialBasis(vec)
    a = rng.normal(size=(4, basis.n_monomials))
    x = rng.uniform(-1, 1, (4, 3))
    P = lambda z: np.einsum("sm,sm->s", a, basis.values(z))  # noqa: E731
    Gc = basis.gradient_coefficients(a)
    grad = np.einsum("sgl,sg->sl", Gc, basis.values(x)[:, basis.grad_monomials])
    H = basis.hessian(a, x)
    h = 1e-6
    for l in range(3):
        d = np.zeros(3)
        d[l] = h
        np.testing.assert_allclose(grad[:, l], (P(x + d) - P(x - d)) / (2 * h), rtol=1e-6, atol=1e-7)
        g_plus = np.einsum("sgl,sg->sl", Gc, basis.values(x + d)[:, basis.grad_monomials])
        g_minus = np.einsum("sgl,sg->sl", Gc, basis.values(x - d)[:, basis.grad_monomials])
        np.testing.assert_allclose(H[:, :, l], (g_plus - g_minus) / (2 * h), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(H, np.transpose(H, (0, 2, 1)))


@pytest.mark.parametrize("n_labels, order", [(17, 2), (3, 3), (2, 4), (5, 1)])
def test_monomial_values_are_the_powers_of_the_labels(n_labels, order):
    basis = MonomialBasis(PolynomialVectorizer([f"L{i}" for i in range(n_labels)], order))
    x = np.random.default_rng(5).uniform(-1.5, 1.5, (6, n_labels))
    direct = np.prod(x[:, None, :] ** basis.exponents[None], axis=2)
    np.testing.assert_allclose(basis.values(x), direct, rtol=1e-13, atol=1e-15)
    assert basis._runs is not None  # the table is built from slices, not gathers
    for n in (1, len(basis.hess_monomials), len(basis.grad_monomials), basis.n_monomials // 2 + 1):
        np.testing.assert_allclose(basis.values(x, upto=n), direct[:, :n], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("n_labels, order", [(6, 2), (3, 3)])
def test_term_hessian_is_the_hessian_of_the_weighted_label_vector(n_labels, order):
    rng = np.random.default_rng(6)
    vec = PolynomialVectorizer([f"L{i}" for i in range(n_labels)], order)
    basis = MonomialBasis(vec)
    u = rng.normal(size=(4, vec.n_terms))
    x = rng.uniform(-1, 1, (4, n_labels))
    h = 1e-5
    for l in range(n_labels):
        d = np.zeros(n_labels)
        d[l] = h
        # d/dx_l of sum_k u_k dv_k/dx: central differences of the analytic label-vector derivative
        grad = lambda z: np.einsum("rk,rkl->rl", u, vec.get_label_vector_derivative(z))  # noqa: E731
        np.testing.assert_allclose(basis.term_hessian(u, x)[:, :, l], (grad(x + d) - grad(x - d)) / (2 * h),
                                   rtol=1e-6, atol=1e-6)


def test_coefficient_stacks_are_blas_ready_in_the_precision_asked_for():
    """One C-ordered matrix per spectrum (stacked matmul hands only those to BLAS), the same
    numbers in float32 as in float64."""
    rng = np.random.default_rng(4)
    basis = MonomialBasis(PolynomialVectorizer([f"L{i}" for i in range(5)], 2))
    a = rng.normal(size=(7, basis.n_monomials))
    for make, n in ((basis.gradient_coefficients, len(basis.grad_monomials)),
                    (basis.hessian_coefficients, len(basis.hess_monomials))):
        double, single = make(a), make(a, dtype=np.float32)
        assert double.dtype == np.float64 and single.dtype == np.float32
        assert double.shape == single.shape and double.shape[:2] == (7, n)
        assert double.flags.c_contiguous and single.flags.c_contiguous
        np.testing.assert_allclose(single, double, rtol=1e-6, atol=1e-6 * np.abs(double).max())


def test_monomial_table_gives_the_pair_sums_of_theta_weighted_gram_matrix():
    rng = np.random.default_rng(2)
    vec = PolynomialVectorizer(["A", "B", "C", "D"], 2)
    basis = MonomialBasis(vec)
    theta = rng.normal(size=(70, vec.n_terms))
    w = rng.uniform(0, 2, (3, 70))
    T = basis.table(theta, dtype=np.float64, block=16)
    Q = unpack_symmetric(w @ khatri_rao_upper(theta), vec.n_terms)
    x = rng.uniform(-1, 1, (3, 4))
    v = vec.get_label_vector(x).T
    np.testing.assert_allclose(np.einsum("sm,sm->s", w @ T, basis.values(x)), np.einsum("si,sij,sj->s", v, Q, v),
                               rtol=1e-12)


def test_merged_covariances_give_the_quadratic_form_and_its_gradient_in_the_labels():
    rng = np.random.default_rng(3)
    vec = PolynomialVectorizer(["A", "B", "C", "D"], 2)
    basis = MonomialBasis(vec)
    K = vec.n_terms
    B = rng.normal(size=(50, K, K))
    C = B @ np.transpose(B, (0, 2, 1))  # one covariance matrix per pixel
    iu, ju = np.triu_indices(K)
    merged = basis.merge(C[:, iu, ju], dtype=np.float64, block=16)
    x = rng.uniform(-1, 1, (6, 4))
    v = vec.get_label_vector(x).T
    D = vec.get_label_vector_derivative(x)  # (R, K, L)
    w = rng.uniform(0, 2, (6, 50))
    G = np.einsum("sp,pij->sij", w, C)
    gamma = w @ merged
    np.testing.assert_allclose(np.einsum("sm,sm->s", gamma, basis.values(x)), np.einsum("si,sij,sj->s", v, G, v),
                               rtol=1e-12)
    # the gradient of v^T G v is 2 D^T G v (the bias of a fit that ignores the model's noise)
    np.testing.assert_allclose(basis.gradient(gamma, x), 2 * np.einsum("skl,skj,sj->sl", D, G, v), rtol=1e-10)
    assert basis.merge(C[:, iu, ju]).dtype == np.float32
    with pytest.raises(ValueError, match="shape"):
        basis.merge(C.reshape(50, -1))


def _exact_change(basis, a, x, x_new):
    """sum_m a[r, m] (x_new^m - x^m) in exact rational arithmetic from the float inputs."""
    from fractions import Fraction

    out = []
    for ar, xr, nr in zip(a, x, x_new):
        total = Fraction(0)
        for coef, exps in zip(ar, basis.exponents):
            new = old = Fraction(1)
            for xi, ni, p in zip(xr, nr, exps):
                old *= Fraction(float(xi)) ** int(p)
                new *= Fraction(float(ni)) ** int(p)
            total += Fraction(float(coef)) * (new - old)
        out.append(float(total))
    return np.array(out)


def _step_problem(seed, labels, order, rows, large_degree=None):
    """A basis, a small step x -> x_new and coefficients as in a spectrum's objective: large
    up to ``large_degree`` (by default the terms' degree, ``order``), small above."""
    rng = np.random.default_rng(seed)
    basis = MonomialBasis(PolynomialVectorizer(labels, order))
    x = rng.uniform(-1, 1, (rows, len(labels)))
    x_new = x + 1e-9 * rng.normal(size=x.shape)
    degree = basis.exponents.sum(axis=1)
    a = np.where(degree <= (large_degree or order), 1e6, 1.0) * rng.normal(size=(rows, basis.n_monomials))
    U = basis.values(x)
    return basis, a, U, x, x_new


def test_change_keeps_the_small_changes_of_large_coefficients():
    basis, a, U, x, x_new = _step_problem(3, ["A", "B", "C"], 2, 6)
    change, U_new, high_new = basis.change(a, U, basis.high_part(a, U), x, x_new)
    np.testing.assert_array_equal(U_new, basis.values(x_new))
    np.testing.assert_allclose(high_new, basis.high_part(a, U_new), rtol=0, atol=0)
    exact = _exact_change(basis, a, x, x_new)
    assert np.all(np.abs(exact) > 1e-6)  # the changes are real, ~1e-3
    np.testing.assert_allclose(change, exact, rtol=1e-9, atol=1e-14)
    # a plain difference of the two objectives loses ~1e-10 to cancellation: the test can tell
    naive = np.einsum("rm,rm->r", a, U_new) - np.einsum("rm,rm->r", a, U)
    assert np.max(np.abs(naive - exact) / np.abs(exact)) > 1e-8


@pytest.mark.parametrize("labels, order, large_degree", [(["A", "B"], 3, 3), (["A", "B", "C"], 1, 2)])
def test_change_is_exact_up_to_the_degree_of_the_terms(labels, order, large_degree):
    """A cubic model's degree-3 monomials carry large coefficients too; a linear model's
    degree-2 ones (its Fisher matrix) stay exact as well."""
    basis, a, U, x, x_new = _step_problem(4, labels, order, 4, large_degree)
    change, _, _ = basis.change(a, U, basis.high_part(a, U), x, x_new)
    np.testing.assert_allclose(change, _exact_change(basis, a, x, x_new), rtol=1e-9, atol=1e-14)


def test_basis_needs_every_label_linearly():
    assert MonomialBasis.applies_to(PolynomialVectorizer(["A", "B"], 2))
    assert not MonomialBasis.applies_to(PolynomialVectorizer(["A", "B"], terms="A + B^2"))
