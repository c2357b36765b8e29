"""Batched engines: training for all pixels at once, the test step for all spectra at once.

Both rest on one identity. For a model linear in theta with weights ``w``,
``sum w (A theta - f)^2`` only needs ``A^T W A``, ``A^T W f`` and ``f^T W f``. The symmetric
products ``A^T W A`` for every pixel (training) or ``Theta^T W Theta`` for every spectrum (test)
are a single matrix product with the "Khatri-Rao" table of column pairs ``a_i a_j (i <= j)``,
so the heavy work is one BLAS call per block instead of a Python loop over pixels or spectra.

- Training: per-pixel normal equations, a batched Cholesky/LU solve, the intrinsic scatter
  ``s2`` re-estimated for all pixels (:func:`astra_cannon.fitting.estimate_s2`) and the
  weights refreshed until ``s2`` settles; L1 regularisation by feature-sign search (coordinate
  descent as its fallback), vectorised across pixels.
- Test: per-spectrum sufficient statistics ``(Q, c, e)`` so that
  ``chi2(x) = v^T Q v - 2 v^T c + e`` with ``v`` the label vector; Levenberg-Marquardt runs
  in the K-dimensional term space for all (spectrum, start) pairs at once. The Gauss-Newton
  matrix ``J^T W J = D^T Q D`` is exact, so the covariance equals leastsq's ``cov_x``.
  From 28 terms up ``Q`` is built from float32 products (half the time of the step's largest
  cost) and each fit is polished with the residual and chi2 computed in float64 at its
  optimum, which restores the float64 labels (to ~1e-5 sigma) and chi2. Such models skip
  ``Q`` altogether: their statistics are the coefficients of chi2 as a polynomial in the labels
  (:mod:`astra_cannon.monomials`, 2.5x fewer numbers at 17 labels), optimised with its exact
  gradient and Hessian (:func:`_polynomial_fit`); the model-noise pass adds the K x K ``G``,
  merged per spectrum into the corrected objective's polynomial.

Nothing here reads files or databases.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import threading
import time

import numpy as np
from threadpoolctl import ThreadpoolController

from . import flags as F
from .fitting import _s2_newton, s2_newton_step
from .model_noise import (SeparableCovariance, inverse_spd as _inverse_spd, separable_error,
                          separable_theta_covariance, star_weight_profile)
from .monomials import MonomialBasis, pair_products as _pairs_table

__all__ = ["khatri_rao_upper", "merge_equal_columns", "unpack_symmetric", "cg_preconditioner",
           "solve_normal_equations_cg", "train_pixels", "SpectrumStatistics", "label_spectra", "theta_pairs_for",
           "theta_table", "monomial_basis_for"]

# Memory budget for one block of the Khatri-Rao product (bytes).
_BLOCK_BYTES = 48 * 2**20
_ELEMENTWISE_BYTES = 4 * 2**20
_PAIRS_CACHE_BYTES = 256 * 2**20
# Largest Khatri-Rao table of theta a model keeps between test calls (17 labels at 8575
# pixels: 0.5 GB in float32).
_PAIRS_KEEP_BYTES = 1280 * 2**20
_SINGLE_PRECISION_MIN_TERMS = 28
# Largest share of a spectrum's label curvature that the model's own noise may take for the
# corrected-score fit to be used (see SpectrumStatistics.limit_correction). The corrected fit's
# variance grows as 1 / (1 - share)^2 along that direction (up to 100x at 0.9), which its
# covariance reports; beyond it the label direction is set by the model's noise, not the data.
MAX_MODEL_NOISE_FRACTION = 0.9
# Conjugate-gradient iterations per solve before a pixel falls back to the direct solve.
_CG_MAX_ITERATIONS = 200
# Up to this many terms the normal matrices are inverted by inverse_spd_pixels_last (measured
# 1.8x faster than numpy.linalg.inv at 10 terms, 1.2x at 15, slower from about 20)
_SWEEP_MAX_TERMS = 15
# Levenberg-Marquardt iterations of a corrected fit from the plain optimum: converged ones took
# 3-6 evaluations (17 labels x 1000 stars); one that leaves the region where the corrected
# objective is convex runs on to any limit (68-101 evaluations of 100), 3x the whole fit.
_CORRECTED_MAX_ITERATIONS = 20
# Default batches of the test step for models below and from _SINGLE_PRECISION_MIN_TERMS terms.
_SMALL_MODEL_BATCH = 1024
_LARGE_MODEL_BATCH = 256
# Largest batch of spectra on the polynomial test path (see label_spectra).
_POLYNOMIAL_BATCH = 100
# Scale of the Newton-decrement test that accepts a polished polynomial fit (tests set it
# negative to send every fit through the Levenberg-Marquardt fallback).
_NEWTON_CHECK_ATOL = 1.0
# What float32 conjugate gradients resolve of the residual's measure r^T P^-1 r, relative to its
# start (measured ~2e-12 at 17 labels; aiming lower only adds iterations).
_CG_SINGLE_FLOOR = 1e-10


def _controller():
    global _CONTROLLER
    if _CONTROLLER is None:
        # Inspecting the loaded BLAS libraries costs ~1 ms: do it once, not per call.
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER


def _blas_threads():
    """Threads the BLAS is set to use (e.g. by OPENBLAS_NUM_THREADS): our default parallelism."""
    counts = [pool["num_threads"] for pool in _controller().info() if pool.get("user_api") == "blas"]
    return max(counts) if counts else 1


@contextlib.contextmanager
def _blas_limit(n):
    """Limit the BLAS to ``n`` threads inside the block (no change for None)."""
    if n is None:
        yield
    else:
        with _controller().limit(limits=n, user_api="blas"):
            yield


def _small_matrix_blas():
    """One BLAS thread for stacks of small matrices.

    Batched solves and products of K x K matrices make many tiny BLAS/LAPACK calls; with
    several OpenBLAS threads each call pays a thread hand-off, which was measured 20x slower
    than one thread on a busy 2-core machine. Large products keep every thread.
    """
    return _blas_limit(1)


_CONTROLLER = None
# Per-thread scratch arrays (see _scratch).
_THREADED = threading.local()


def _scratch(name, shape, dtype=np.float64):
    """A per-thread scratch array of at least ``shape`` (its leading part is returned), reused
    by later calls of the same thread. Fresh large arrays are page-faulted in on every
    allocation, which on this project's VMs made a quarter of the test step's median time;
    the callers overwrite the contents and keep nothing past the call."""
    cache = getattr(_THREADED, "scratch", None)
    if cache is None:
        cache = _THREADED.scratch = {}
    size = int(np.prod(shape))
    buf = cache.get(name)
    if buf is None or buf.size < size or buf.dtype != dtype:
        buf = cache[name] = np.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


@functools.lru_cache(maxsize=16)
def _upper_indices(K):
    """``numpy.triu_indices(K)``, read-only and cached (it costs ~0.1 ms, called per batch)."""
    iu, ju = np.triu_indices(K)
    iu.flags.writeable = ju.flags.writeable = False
    return iu, ju


def khatri_rao_upper(X):
    """Row-wise products of column pairs: ``out[n, (i, j)] = X[n, i] * X[n, j]`` for ``i <= j``.

    Parameters
    ----------
    X : ndarray, shape (N, K)

    Returns
    -------
    ndarray, shape (N, K (K + 1) / 2)
    """
    iu, ju = _upper_indices(X.shape[1])
    return X[:, iu] * X[:, ju]


def merge_equal_columns(Z, rtol=1e-13):
    """Group the columns of ``Z`` that are equal (to ``rtol``, element by element).

    For a polynomial design matrix many column pairs ``a_i a_j`` are the same monomial
    (``x0 * x1x2`` and ``x1 * x0x2``): a 17-label quadratic model has 14706 pairs but 5985
    distinct quartic monomials. Their normal-equation entries are equal, so the matrix product
    is only needed once per group. Groups are found from rounded values and then verified on
    every row, so a merge is never an approximation beyond ``rtol``.

    Parameters
    ----------
    Z : ndarray, shape (N, C)

    Returns
    -------
    unique : ndarray of int, shape (U,)
        One representative column per group.
    inverse : ndarray of int, shape (C,)
        Group of each column (``Z[:, unique[inverse]]`` equals ``Z``).
    """
    C = Z.shape[1]
    scale = np.abs(Z).max(axis=0)
    scale[scale == 0] = 1.0
    key = np.round(Z[: min(len(Z), 64)] / scale, 9)
    _, first, inverse = np.unique(key, axis=1, return_index=True, return_inverse=True)
    rep = first[inverse.reshape(-1)]
    diff = np.abs(Z - Z[:, rep])
    same = np.all(diff <= rtol * np.maximum(np.abs(Z), np.abs(Z[:, rep])), axis=0)
    rep = np.where(same, rep, np.arange(C))
    unique, inverse = np.unique(rep, return_inverse=True)
    return unique, inverse.reshape(-1)


def _single_precision(K):
    """Whether the test step builds ``Q`` in float32: for models of at least 28 terms.

    There the ``Q`` products dominate the test step and float32 halves them (and the kept
    table); the float64 polish (:meth:`SpectrumStatistics.polished`) that restores the exact
    optimum costs about one pass over the pixels, which below ~28 terms would eat the gain.
    """
    return K >= _SINGLE_PRECISION_MIN_TERMS


@functools.lru_cache(maxsize=8)
def _basis(n_labels, terms):
    from .vectorizer import PolynomialVectorizer

    return MonomialBasis(PolynomialVectorizer([f"x{i}" for i in range(n_labels)], terms=list(terms[1:])))


def monomial_basis_for(vectorizer, n_pixels, theta_cov=None):
    """The :class:`~astra_cannon.monomials.MonomialBasis` the test step uses, or None.

    Used for single-precision models (:func:`_single_precision`) whose terms include every
    label linearly and whose float32 monomial table fits in ``_PAIRS_KEEP_BYTES``: their
    statistics are 2.5x smaller (17 labels) than the pairs of ``Q`` and the fit runs on the
    objective's polynomial (:func:`_polynomial_fit`), with the model-noise correction too.
    ``theta_cov`` is accepted for the record: the choice does not depend on it.
    """
    K = vectorizer.n_terms
    if not _single_precision(K) or not MonomialBasis.applies_to(vectorizer):
        return None
    basis = _basis(vectorizer.n_labels, tuple(vectorizer.terms))
    if n_pixels * basis.n_monomials * 4 > _PAIRS_KEEP_BYTES:
        return None
    return basis


def theta_table_layout(K, basis=None):
    """Columns and dtype of :func:`theta_table` for a model of ``K`` terms."""
    width = K * (K + 1) // 2 if basis is None else basis.n_monomials
    return width, np.dtype(np.float32 if _single_precision(K) else np.float64)


def theta_table(theta, basis=None):
    """The table of products of theta's columns that the test step reads: the merged monomial
    table ``basis.table(theta)`` (see :func:`monomial_basis_for`) or every pair
    (:func:`khatri_rao_upper`), float32 from 28 terms up (:func:`_single_precision`)."""
    theta = np.asarray(theta, dtype=float)
    _, dtype = theta_table_layout(theta.shape[1], basis)
    return _pairs_table(theta, dtype) if basis is None else basis.table(theta, dtype)


def theta_pairs_for(owner, theta, max_bytes=None, basis=None):
    """The Khatri-Rao table of ``theta`` for the test step, kept on ``owner`` between calls.

    Building it costs as much as the test step of ~100 spectra at 17 labels, so a model keeps
    it (attribute ``_theta_pairs``) while ``theta`` is unchanged (compared in full on every
    call, so an edited theta is never paired with a stale table). With ``basis`` (see
    :func:`monomial_basis_for`) the table is the merged one, ``basis.table(theta)``. Returns None, keeping
    nothing, when the table would exceed ``max_bytes`` (default ``_PAIRS_KEEP_BYTES``);
    the test step then builds it block by block.
    """
    theta = np.asarray(theta, dtype=float)
    P, K = theta.shape
    limit = _PAIRS_KEEP_BYTES if max_bytes is None else max_bytes
    width, dtype = theta_table_layout(K, basis)
    if P * width * dtype.itemsize > limit:
        return None
    kept = getattr(owner, "_theta_pairs", None)
    if (kept is not None and kept[1].dtype == dtype and kept[1].shape[1] == width
            and kept[0].shape == theta.shape and np.array_equal(kept[0], theta)):
        return kept[1]
    pairs = theta_table(theta, basis)
    owner._theta_pairs = (theta.copy(), pairs)
    return pairs


def unpack_symmetric(flat, K):
    """Inverse of the ``i <= j`` packing: ``(..., K(K+1)/2) -> (..., K, K)`` symmetric."""
    iu, ju = _upper_indices(K)
    out = np.empty(flat.shape[:-1] + (K, K))
    out[..., iu, ju] = flat
    out[..., ju, iu] = flat
    return out


def _solve_spd(M, b):
    """Solve ``M x = b`` for a stack of symmetric matrices; singular ones via pseudo-inverse."""
    try:
        return np.linalg.solve(M, b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        out = np.empty_like(b)
        for chunk in np.array_split(np.arange(M.shape[0]), max(1, M.shape[0] // 64)):
            try:
                out[chunk] = np.linalg.solve(M[chunk], b[chunk, :, None])[..., 0]
            except np.linalg.LinAlgError:
                out[chunk] = (np.linalg.pinv(M[chunk], hermitian=True) @ b[chunk, :, None])[..., 0]
        return out


def _solve_spd_small(M, b):
    """``_solve_spd`` for a stack of small symmetric positive-definite matrices (up to 4 x 4):
    Cholesky written out over the stack, a few dozen whole-stack operations instead of a
    LAPACK call per matrix (7x faster for 3 x 3). Matrices that are not positive definite go
    to :func:`_solve_spd`. Faster than LAPACK from ~300 matrices on."""
    n, L = b.shape
    Lm = np.zeros((L, L, n))
    bad = np.zeros(n, dtype=bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        for j in range(L):
            d = M[:, j, j] - sum(Lm[j, k] ** 2 for k in range(j))
            bad |= ~(d > 0)
            Lm[j, j] = np.sqrt(np.where(d > 0, d, 1.0))
            for i in range(j + 1, L):
                Lm[i, j] = (M[:, i, j] - sum(Lm[i, k] * Lm[j, k] for k in range(j))) / Lm[j, j]
        y = [None] * L
        for i in range(L):
            y[i] = (b[:, i] - sum(Lm[i, k] * y[k] for k in range(i))) / Lm[i, i]
        x = np.empty((n, L))
        for i in range(L - 1, -1, -1):
            x[:, i] = (y[i] - sum(Lm[k, i] * x[:, k] for k in range(i + 1, L))) / Lm[i, i]
    bad |= ~np.all(np.isfinite(x), axis=1)
    if bad.any():
        x[bad] = _solve_spd(M[bad], b[bad])
    return x


def inverse_spd_pixels_last(X, rtol=1e-12):
    """Inverses of a stack of symmetric positive-definite matrices stored pixels last.

    Gauss-Jordan elimination vectorised over the stack: K passes over the whole
    ``(K, K, n)`` array instead of one LAPACK call per matrix: 1.8x faster than
    ``numpy.linalg.inv`` for stacks of 500 10 x 10 matrices (3-label models), 1.2x at 15 x 15,
    slower from about 20 x 20. No pivoting is needed: every pivot of a positive-definite
    matrix is a positive Schur complement.

    Parameters
    ----------
    X : ndarray, shape (K, K, n)
        The matrices, ``X[:, :, p]`` for pixel ``p``; not modified.
    rtol : float
        A matrix whose pivot falls to ``rtol`` times its diagonal entry or below (singular or
        not positive definite to working precision) or is not finite gets its pseudo-inverse
        (``numpy.linalg.pinv``) instead.

    Returns
    -------
    ndarray, shape (K, K, n)
        The inverses, in the same layout.
    """
    K, _, n = X.shape
    out = np.array(X, dtype=float)
    tmp = np.empty_like(out)
    bad = np.zeros(n, dtype=bool)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for j in range(K):
            pivot = out[j, j].copy()
            ok = pivot > rtol * X[j, j]
            bad |= ~(ok & np.isfinite(pivot))
            d = 1.0 / np.where(ok, pivot, 1.0)
            col = out[:, j].copy()
            out[j] *= d
            # every other row loses col_i times the scaled pivot row; column j and the pivot
            # itself are then set to their swept values
            np.multiply(col[:, None], out[j][None], out=tmp)
            tmp[j] = 0.0
            out -= tmp
            out[:, j] = -col * d
            out[j, j] = d
    bad |= ~np.all(np.isfinite(out), axis=(0, 1))
    if bad.any():
        # (np.linalg.inv would return rounding noise of 1e16 for a numerically singular matrix)
        out[:, :, bad] = np.linalg.pinv(np.moveaxis(X[:, :, bad], -1, 0), hermitian=True).transpose(1, 2, 0)
    return out


def _apply_censoring(M, b, censored):
    """Censored terms get coefficient 0: identity row/column, zero right-hand side."""
    if censored is None or not censored.any():
        return
    p, k = np.nonzero(censored)
    M[p, k, :] = 0.0
    M[p, :, k] = 0.0
    M[p, k, k] = 1.0
    b[p, k] = 0.0


def _support_index(support):
    """Each row's support indices first, padded to the largest support: ``idx`` (n, S) and the
    padding mask ``pad`` (n, S)."""
    n_sup = support.sum(axis=1)
    S = int(n_sup.max()) if len(n_sup) else 0
    idx = np.argsort(~support, axis=1, kind="stable")[:, :S]
    return idx, np.arange(S)[None, :] >= n_sup[:, None]


def _support_rows(M, index, rows=None):
    """The support's rows of each matrix of ``M`` (n, S, K), ``index`` from :func:`_support_index`."""
    idx = index[0]
    rows = np.arange(len(idx)) if rows is None else np.asarray(rows)
    return M[rows[:, None], idx]


def _matvec_on_support(M, x, index, rows=None, support_rows=None):
    """``M x`` for symmetric ``M`` and ``x`` zero outside each row's support (``index`` from
    :func:`_support_index`): the sum of the support's rows of ``M`` (``support_rows``, from
    :func:`_support_rows`, when at hand), which reads S rows of each matrix instead of all K
    (a lasso support is ~1/15 of a 17-label model's terms, and these products, memory-bound,
    were a quarter of its training)."""
    idx, pad = index
    R = _support_rows(M, index, rows) if support_rows is None else support_rows
    xs = np.where(pad, 0.0, np.take_along_axis(x, idx, axis=1))
    return (xs[:, None, :] @ R)[:, 0, :]


def _solve_on_support(M, rhs, support, rows=None, index=None, support_rows=None):
    """Solve ``M_AA t_A = rhs_A`` on each pixel's support ``A`` (True entries); zero elsewhere.

    Each pixel's support indices come first, padded to the largest support with identity rows
    (a sparse model's support is a small part of K), so one batched solve serves all.
    ``rows``: the matrices of ``M`` that ``rhs`` and ``support`` belong to (default all; the
    supports are gathered from there without copying the rest of ``M``). ``index``,
    ``support_rows``: the :func:`_support_index` of ``support`` and :func:`_support_rows`,
    when at hand.
    """
    P, K = rhs.shape
    if rows is None:
        rows = np.arange(P)
    idx, pad = _support_index(support) if index is None else index
    S = idx.shape[1]
    if support_rows is None:
        Ms = M[np.asarray(rows)[:, None, None], idx[:, :, None], idx[:, None, :]]
    else:
        # (a flat take: 2.7x faster than take_along_axis here)
        n = len(idx)
        offsets = (np.arange(n * S) * K).reshape(n, S, 1) + idx[:, None, :]
        Ms = np.take(support_rows.reshape(-1), offsets)
    Ms[np.broadcast_to(pad[:, :, None], Ms.shape) | np.broadcast_to(pad[:, None, :], Ms.shape)] = 0.0
    Ms[:, np.arange(S), np.arange(S)] += pad
    rs = np.where(pad, 0.0, np.take_along_axis(rhs, idx, axis=1))
    sol = _solve_spd(Ms, rs)
    out = np.zeros_like(rhs)
    np.put_along_axis(out, idx, np.where(pad, 0.0, sol), axis=1)
    out[~support] = 0.0
    return out


def _lasso_exact_on_support(M, b, lam, theta):
    """Exact lasso solution for each pixel's current support and signs, and its KKT check.

    With the signs ``s`` of the non-zero coefficients known, the optimum solves
    ``M_AA t_A = b_A - lam/2 s_A``. The candidate is accepted when its signs agree and every
    zero coefficient satisfies ``|b_k - (M t)_k| <= lam/2`` (the subgradient condition).
    """
    K = b.shape[1]
    support = theta != 0
    support[:, 0] = True
    sign = np.sign(theta)
    sign[:, 0] = 0.0
    cand = _solve_on_support(M, np.where(support, b - 0.5 * lam[:, None] * sign, 0.0), support)
    z = b - (M @ cand[:, :, None])[:, :, 0]
    same_signs = np.all((np.sign(cand) == sign) | ~support | (np.arange(K) == 0), axis=1)
    return cand, same_signs & _kkt_zeros(z, lam, support) & np.all(np.isfinite(cand), axis=1)


def _kkt_zeros(z, lam, support):
    """The subgradient condition of the zero coefficients: ``|b_k - (M t)_k| <= lam/2``."""
    return np.all((np.abs(z) <= 0.5 * lam[:, None] * (1 + 1e-9) + 1e-12) | support, axis=1)


def _lasso_feature_sign(M, b, lam, theta0, max_steps=None, add_per_step=4):
    """Minimise ``t^T M t - 2 b^T t + lam * |t[1:]|_1`` by feature-sign search (Lee et al. 2007),
    vectorised across pixels.

    A lasso solution of a Cannon pixel is sparse (about 11 of 170 coefficients at 17 labels and
    Lambda = 1000), so instead of sweeping every coefficient (coordinate descent) each step
    works on the active set: the exact solution for the active coefficients and their signs,
    ``M_AA t_A = b_A - lam/2 s_A``, then a line search from the current point that stops at the
    best of the points where a coefficient changes sign (which then leaves the set). When the
    active set is optimal, the zero coefficients that violate ``|b_k - (M t)_k| <= lam/2`` the
    most (up to ``add_per_step``; one at a time for a pixel where several at once did not lower
    the objective, since only then is a decrease guaranteed) join it with the sign of their
    gradient. The objective falls at every step, so the search ends, at a point that meets the
    KKT conditions exactly.

    Returns
    -------
    theta : ndarray, shape (P, K)
    n_steps : ndarray, shape (P,)
    unconverged : ndarray of int
        Pixels that reached ``max_steps`` (default 4 K) or whose result fails the final check
        of the KKT conditions.
    Mtheta : ndarray, shape (P, K)
        ``M theta`` at the result (for the objective).
    """
    P, K = b.shape
    lam = np.broadcast_to(np.asarray(lam, dtype=float), (P,)).copy()
    max_steps = 4 * K if max_steps is None else max_steps
    theta = np.array(theta0, dtype=float)
    n_steps = np.zeros(P, dtype=int)
    gave_up = []
    # Working rows (compacted when fewer than half are still searching): their M, b, lam,
    # theta, signs, and whether each is optimal on its active set with its signs (then only
    # additions can remain).
    idx = np.arange(P)
    Mw, bw, lw, tw = M, b, lam, theta.copy()
    sw = np.sign(tw)
    sw[:, 0] = 0.0
    settled = np.zeros(P, dtype=bool)
    live = np.ones(P, dtype=bool)
    width = np.full(P, add_per_step)  # coefficients a growing step may add
    cols = np.arange(K)
    fresh, z = True, None
    for _ in range(max_steps):
        if not live.any():
            break
        if live.mean() < 0.5:
            theta[idx] = tw
            idx, Mw, bw, lw, tw, sw, settled, live, width, z = (
                a[live] for a in (idx, Mw, bw, lw, tw, sw, settled, live, width, z))
        n = idx.size
        support = tw != 0
        support[:, 0] = True
        if fresh:
            # b - M t, then kept up to date by the steps
            z = bw - _matvec_on_support(Mw, tw, _support_index(support))
            fresh = False
        violation = np.where(support, -np.inf, np.abs(z) - 0.5 * lw[:, None] * (1 + 1e-9) - 1e-12)
        violated = violation.max(axis=1) > 0
        live &= ~(settled & ~violated)
        if not live.any():
            break
        grow = live & settled & violated
        sg = sw.copy()
        if grow.any():
            # the worst violators join the active set with the sign of their gradient
            g = np.flatnonzero(grow)
            top = np.argsort(-violation[g], axis=1)[:, :add_per_step]
            ok = (np.take_along_axis(violation[g], top, axis=1) > 0) & (np.arange(top.shape[1]) < width[g, None])
            r_, c_ = np.repeat(g, top.shape[1])[ok.ravel()], top.ravel()[ok.ravel()]
            support[r_, c_] = True
            sg[r_, c_] = np.sign(z[r_, c_])
        # the exact solution on the active set, for the pixels still searching
        lv = np.flatnonzero(live)
        index = _support_index(support[lv])  # where target - t and its parts can be non-zero
        R = _support_rows(Mw, index, lv)  # gathered once: the solve and both products read them
        target = tw.copy()
        target[lv] = _solve_on_support(Mw, np.where(support[lv], bw[lv] - 0.5 * lw[lv, None] * sg[lv], 0.0),
                                       support[lv], rows=lv, index=index, support_rows=R)
        d = target - tw
        # candidate step lengths: 1 and every zero crossing of an active coefficient on the way
        with np.errstate(divide="ignore", invalid="ignore"):
            cross = np.where((tw != 0) & (np.sign(target) != np.sign(tw)) & (cols > 0), tw / (tw - target), np.inf)
        cross = np.where((cross > 0) & (cross < 1), cross, np.inf)
        C = int(np.isfinite(cross).sum(axis=1).max())
        alphas = np.concatenate([np.sort(cross, axis=1)[:, :C], np.ones((n, 1))], axis=1)  # (n, C + 1)
        finite = np.isfinite(alphas)
        a_fin = np.where(finite, alphas, 0.0)
        lin = 2 * np.einsum("pk,pk->p", -z, d)  # 2 (M t - b) . d
        Md = np.zeros_like(d)  # (d = 0 where the search is over)
        Md[lv] = _matvec_on_support(Mw, d[lv], index, support_rows=R)
        quad = np.einsum("pk,pk->p", d, Md)
        # |t + alpha d|_1 at every candidate alpha: d = 0 off the support (and wherever the
        # search is over), so only the support's entries vary
        l1 = np.repeat(np.abs(tw[:, 1:]).sum(axis=1)[:, None], alphas.shape[1], axis=1)
        idx_s, pad_s = index
        penalised = ~pad_s & (idx_s > 0)
        t_s, d_s = np.take_along_axis(tw[lv], idx_s, axis=1), np.take_along_axis(d[lv], idx_s, axis=1)
        l1[lv] = np.where(penalised[:, None, :], np.abs(t_s[:, None, :] + a_fin[lv, :, None] * d_s[:, None, :]),
                          0.0).sum(axis=2)
        f = np.where(finite, a_fin * lin[:, None] + a_fin ** 2 * quad[:, None] + lw[:, None] * l1, np.inf)
        best = np.argmin(f, axis=1)
        alpha = a_fin[np.arange(n), best]
        # An increase beyond rounding is not expected (the theory guarantees a decrease): such a
        # pixel is left to the caller. A step of (nearly) zero length is the optimum itself.
        f0 = lw * np.abs(tw[:, 1:]).sum(axis=1)
        scale = np.abs(f0) + np.abs(lin) + np.abs(quad) + np.abs(bw * tw).sum(axis=1)  # of the objective
        stuck = live & ~(f[np.arange(n), best] <= f0 + 1e-10 * scale)
        new = tw + alpha[:, None] * d
        # the coefficient(s) crossing zero at the chosen point leave the set exactly
        new[(cross == alpha[:, None]) & np.isfinite(cross)] = 0.0
        new[~support] = 0.0
        # optimal on its set when the full step was taken and every sign is the assumed one
        full = (alpha == 1.0) & (best == C) & np.all((np.sign(new) == sg) | ~support | (cols == 0), axis=1)
        dz = alpha[:, None] * Md  # M (new - t), up to the rounding of the zeroed coefficients
        # Also the full step with every coefficient that changed sign dropped at once: where it
        # is lower still, it replaces the line search's point (several coefficients leave the
        # active set in one step instead of one per step; the objective still falls).
        flipped = np.isfinite(cross)
        if C:
            proj = np.where(flipped, 0.0, target)
            Me = np.zeros_like(d)
            Me[lv] = _matvec_on_support(Mw, (target - proj)[lv], index, support_rows=R)
            Mproj = bw - z + Md - Me
            f_proj = (np.einsum("pk,pk->p", proj - tw, Mproj + bw - z) - 2 * np.einsum("pk,pk->p", bw, proj - tw)
                      + lw * np.abs(proj[:, 1:]).sum(axis=1))
            take = live & flipped.any(axis=1) & (f_proj < f[np.arange(n), best]) & ~stuck
            new[take] = proj[take]
            dz[take] = Md[take] - Me[take]
            full[take] = False
        go = live & ~stuck
        # b - M t at the new point
        z[go] -= dz[go]
        tw[go] = new[go]
        sw[go] = np.where(support[go], np.sign(new[go]), 0.0)
        sw[go, 0] = 0.0
        settled[go] = full[go]
        n_steps[idx[live]] += 1
        retry = stuck & grow & (width > 1)
        width[retry] = 1  # several new coefficients at once may take wrong signs: one at a time
        stuck &= ~retry
        if stuck.any():
            gave_up.append(idx[stuck])
            live &= ~stuck
    theta[idx] = tw
    left = np.concatenate(gave_up + [idx[live]]) if gave_up or live.any() else np.zeros(0, dtype=int)
    # The KKT conditions once more with a fresh b - M t (the steps updated it incrementally).
    support = theta != 0
    support[:, 0] = True
    Mt = _matvec_on_support(M, theta, _support_index(support))
    z = b - Mt
    sign = np.sign(theta)
    sign[:, 0] = 0.0  # the constant term is not penalised
    on_support = np.all((np.abs(z - 0.5 * lam[:, None] * sign) <= 1e-6 * (np.abs(b) + np.abs(Mt)) + 1e-9)
                        | ~support, axis=1)
    bad = np.flatnonzero(~(_kkt_zeros(z, lam, support) & on_support))
    left = np.union1d(left, bad)
    return theta, n_steps, left, Mt


def _lasso_cd(M, b, lam, theta0, max_sweeps=2000, tol=1e-6, sweeps_per_check=2):
    """Minimise ``t^T M t - 2 b^T t + lam * |t[1:]|_1`` for a stack of pixels.

    Cyclic coordinate descent (as in glmnet), vectorised across pixels: one sweep is a loop
    over the K coefficients, each update acting on every unfinished pixel at once (the exact
    one-dimensional minimiser is a soft threshold). Every few sweeps the exact solution on
    each pixel's current support is tried and kept where it passes the KKT conditions, which
    finishes ill-conditioned pixels that coordinate descent alone approaches slowly. A pixel
    also stops when no coefficient moves by more than ``tol`` in chi2-scaled units.

    Returns
    -------
    theta : ndarray, shape (P, K)
    n_sweeps : ndarray, shape (P,)
    unconverged : ndarray of int
        Indices of pixels that hit ``max_sweeps``.
    """
    P, K = b.shape
    lam = np.broadcast_to(np.asarray(lam, dtype=float), (P,)).copy()
    theta = theta0.copy()
    n_sweeps = np.zeros(P, dtype=int)
    active = np.arange(P)
    Ma, ba, la = M, b, lam
    ta = theta.copy()
    for sweep in range(1, max_sweeps + 1):
        da = np.einsum("pkk->pk", Ma)
        ga = ba - np.einsum("pij,pj->pi", Ma, ta)  # b - M theta
        moved = np.zeros(active.size)
        # Only coefficients that are non-zero, or whose soft threshold would make them so, in
        # some pixel can move; the rest are skipped. A sweep that moves nothing leaves b - M t
        # unchanged, so the skipped ones still satisfy their condition when a pixel stops.
        free = np.any((ta != 0) | (np.abs(ga + da * ta) > 0.5 * la[:, None]), axis=0)
        free[0] = True
        for k in np.flatnonzero(free):
            z = ga[:, k] + da[:, k] * ta[:, k]
            if k == 0:
                new = z / da[:, k]
            else:
                new = np.sign(z) * np.maximum(np.abs(z) - 0.5 * la, 0.0) / da[:, k]
            delta = new - ta[:, k]
            if not delta.any():
                continue
            ta[:, k] = new
            ga -= Ma[:, k, :] * delta[:, None]  # row k (contiguous) = column k: M is symmetric
            np.maximum(moved, np.abs(delta) * np.sqrt(da[:, k]), out=moved)
        n_sweeps[active] += 1
        done = moved <= tol
        if sweep % sweeps_per_check == 0:
            cand, exact = _lasso_exact_on_support(Ma, ba, la, ta)
            ta[exact] = cand[exact]
            done |= exact
        theta[active] = ta
        if done.all():
            active = active[:0]
            break
        if done.any():
            keep = ~done
            active = active[keep]
            Ma, ba, la, ta = Ma[keep], ba[keep], la[keep], ta[keep]
    return theta, n_sweeps, active


def pixel_objective(M, b, c, theta, lam, solved=None, Mtheta=None):
    """``chi2 + lam * |theta[1:]|`` per pixel from the normal equations.

    ``solved`` marks pixels whose ``theta`` solves ``M theta = b`` exactly (no L1 term), where
    ``chi2 = c - b^T theta`` needs no product with ``M``; ``Mtheta`` (P, K), where given (rows
    of NaN elsewhere), is ``M theta`` already at hand.
    """
    chi2 = c - np.einsum("pi,pi->p", b, theta)
    rest = np.arange(len(c)) if solved is None else np.flatnonzero(~solved)
    if rest.size:
        t = theta[rest]
        Mt = None if Mtheta is None else Mtheta[rest]
        if Mt is None or np.isnan(Mt).any():
            Mt = (M[rest] @ t[:, :, None])[:, :, 0]
        chi2[rest] = np.einsum("pi,pi->p", t, Mt) - 2 * np.einsum("pi,pi->p", b[rest], t) + c[rest]
    return chi2 + lam * np.abs(theta[:, 1:]).sum(axis=1)


def cg_preconditioner(A, w):
    """``(A^T diag(a) A)^-1`` with ``a`` the stars' mean weight profile over the columns of ``w``
    (:func:`~astra_cannon.model_noise.star_weight_profile`): the shared preconditioner of
    :func:`solve_normal_equations_cg`, and the separable theta covariance's shared matrix."""
    total, n = star_weight_profile(w)
    a = total / max(n, 1)
    return _inverse_spd((A * a[:, None]).T @ A)


def solve_normal_equations_cg(A, w, rhs, x0=None, tol=1e-8, max_iterations=200, single=True, preconditioner=None):
    """Solve ``(A^T diag(w_p) A) x_p = rhs_p`` for every pixel p by preconditioned conjugate gradients.

    The weights of a survey factorise nearly as ``w_np ~ a_n b_p`` (a star's S/N times a
    pixel's depth), so the single matrix ``b_p A^T diag(a) A``, inverted once, is a close
    preconditioner for every pixel: a few iterations reach the solution, and each iteration
    is two ``N x K x P`` matrix products instead of building and factorising a K x K normal
    matrix per pixel (``N K^2 / 2`` and ``K^3 / 3`` operations per pixel).

    With ``single`` those products run in float32 (2.7x faster than float64 here) inside
    iterative refinement: the residual of the equations is computed in float64, conjugate
    gradients in float32 solve for the correction down to what float32 can resolve (1e-10 of
    the residual's own measure), and the float64 residual is checked again, so the result meets
    the same float64 criterion as a float64 solve (typically two checks).

    Parameters
    ----------
    A : ndarray, shape (N, K)
    w : ndarray, shape (N, B)
        Weights, >= 0; every column has more positive weights than K.
    rhs : ndarray, shape (B, K)
    x0 : ndarray, shape (B, K), optional
        Starting point (e.g. the solution at the previous weights).
    tol : float
        A pixel stops when ``r^T P^-1 r <= tol`` with ``r`` the (float64) residual of the
        equations and ``P`` the preconditioner: an estimate of ``chi2(x) - chi2(x_exact)``, so the
        default leaves each ``x`` within about 1e-4 of its own standard error of the exact solution.
    max_iterations : int
        Conjugate-gradient iterations per column, over all refinements.
    single : bool
        float32 products inside the refinement (default) or plain float64 conjugate gradients.
    preconditioner : ndarray, shape (K, K), optional
        :func:`cg_preconditioner` of similar weights (e.g. the same pixels' at the previous
        alternation: the scatter changes the weights too little to matter); computed from ``w``
        by default.

    Returns
    -------
    x : ndarray, shape (B, K)
    n_iterations : ndarray of int, shape (B,)
    unconverged : ndarray of int
        Columns that reached ``max_iterations`` without meeting ``tol``.
    """
    B, K = rhs.shape
    scale = w.mean(axis=0)
    Pinv = cg_preconditioner(A, w) if preconditioner is None else preconditioner
    A_in = A.astype(np.float32) if single else A

    def precondition(R, sc):
        return (Pinv @ R) / sc

    X = np.empty((K, B))
    X[:] = precondition(rhs.T, scale) if x0 is None else x0.T
    n_it = np.zeros(B, dtype=int)
    cols = np.arange(B)
    for _ in range(2 * max_iterations + 1):
        # the residual of the equations in float64: the convergence test is always on it
        R = rhs.T[:, cols] - A.T @ (w[:, cols] * (A @ X[:, cols]))
        Zp = precondition(R, scale[cols])
        rz = np.einsum("kb,kb->b", R, Zp)
        keep = ~(rz <= tol)
        cols, R, Zp, rz = cols[keep], R[:, keep], Zp[:, keep], rz[keep]
        if cols.size == 0 or np.all(n_it[cols] >= max_iterations):
            break
        target = np.maximum(tol, _CG_SINGLE_FLOOR * rz) if single else np.full(rz.shape, tol)
        X[:, cols] += _cg_correction(A_in, w[:, cols], R, Zp, rz, scale[cols], precondition, target, n_it, cols,
                                     max_iterations)
    return X.T, n_it, cols


def _cg_correction(A, w, R, Z, rz, scale, precondition, target, n_it, cols, max_iterations):
    """Conjugate gradients for ``M d = R`` (``M = A^T diag(w) A`` per column, products in A's
    dtype) from ``d = 0`` until ``r^T P^-1 r <= target`` per column; counts into ``n_it[cols]``.
    Finished columns leave the working arrays as they go."""
    K, n = R.shape
    out = np.zeros((K, n))
    idx = np.arange(n)  # working columns' positions in out
    wa = w.astype(A.dtype)
    Dx = np.zeros((K, n))
    D = Z
    for _ in range(max_iterations):
        active = ~(rz <= target) & (n_it[cols[idx]] < max_iterations)
        if not active.any():
            break
        if active.mean() < 0.75:
            out[:, idx[~active]] = Dx[:, ~active]
            idx, wa, Dx, R, D, rz, scale, target = (idx[active], wa[:, active], Dx[:, active], R[:, active],
                                                    D[:, active], rz[active], scale[active], target[active])
            active = active[active]
        n_it[cols[idx[active]]] += 1
        Dc = D.astype(A.dtype)
        MD = (A.T @ (wa * (A @ Dc))).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = np.where(active, rz / np.einsum("kb,kb->b", D, MD), 0.0)
        Dx += alpha * D
        R -= alpha * MD
        Zp = precondition(R, scale)
        rz_new = np.einsum("kb,kb->b", R, Zp)
        with np.errstate(divide="ignore", invalid="ignore"):
            beta = np.where(active, rz_new / rz, 0.0)
        D = Zp + beta * D
        rz = rz_new
    out[:, idx] = Dx
    return out


THETA_COVARIANCE_FORMS = ("auto", "exact", "separable", "none")


def _theta_covariance_form(value):
    """``train_pixels``' ``theta_covariance`` as one of :data:`THETA_COVARIANCE_FORMS`."""
    if value is True:
        return "exact"
    if value is False or value is None:
        return "none"
    if isinstance(value, str) and value in THETA_COVARIANCE_FORMS:
        return value
    raise ValueError(f"theta_covariance must be one of {THETA_COVARIANCE_FORMS} or a bool, not {value!r}")


def train_pixels(design_matrix, flux, ivar, regularization=0.0, censored_terms=None, max_iterations=8,
                 weight_rtol=1e-2, fixed_s2=None, theta_covariance="auto", solver="auto", n_threads=None,
                 progress=None, pair_monomials=None):
    """Fit theta and s2 for every pixel.

    Parameters
    ----------
    design_matrix : ndarray, shape (N, K)
        Label vectors of the training stars (first column 1).
    flux, ivar : ndarray, shape (N, P)
        Training fluxes and inverse variances (``ivar == 0`` for masked pixels; flux there is
        ignored even if NaN).
    regularization : float or ndarray of shape (P,)
        L1 strength Lambda on ``theta[1:]``.
    censored_terms : ndarray of bool, shape (P, K), optional
        True where a term is excluded at a pixel.
    max_iterations : int
        Alternations between theta and s2.
    weight_rtol : float
        A pixel is finished when its new ``s2`` changes no star's weight ``ivar / (1 + ivar s2)``
        by more than this fraction: theta would then move by about this fraction of its own
        uncertainty, and ``s2`` by less.
    fixed_s2 : ndarray of shape (P,), optional
        Fit theta at this scatter and skip the scatter estimate.
    theta_covariance : {"auto", "exact", "separable", "none"} or bool
        Also return each pixel's theta covariance ``(A^T W A)^-1`` (``info["theta_cov"]``), used
        to propagate the model's own noise at test time. "exact" (or True): packed, shape
        (P, K (K + 1) / 2), float32 (inverted in float64, kept to the 7 digits the test step's
        correction reads). "separable": a :class:`~astra_cannon.model_noise.SeparableCovariance`
        (one shared inverse and one scale per pixel; a few MB and well under a second at any
        size). "none" (or False): no covariance. "auto": "exact" when it takes at most 256 MB
        (up to ~120 terms at 8575 pixels) unless ``solver`` is "cg", else "separable" (a
        17-label quadratic model's exact covariance needs 0.5 GB and about 5x the training
        time).
    solver : {"auto", "direct", "cg"}
        "direct" builds and solves every pixel's normal equations (needed for L1 and
        censoring); "cg" uses :func:`solve_normal_equations_cg`, faster for many terms, and
        builds the normal matrices only once at the end when the theta covariance is asked for.
        "auto": "cg" for more than 40 terms without L1 or censoring.
    n_threads : int, optional
        Pixel blocks processed in parallel threads (each with a single-threaded BLAS). By
        default the number of threads the BLAS is configured for, so ``OPENBLAS_NUM_THREADS=1``
        (e.g. one per pipeline worker) keeps training on one core. Results do not depend on it.
    progress : callable, optional
        Called as ``progress(n_pixels_done)`` after each block.
    pair_monomials : ndarray of int, shape (K (K + 1) / 2,), optional
        The monomial of each column pair of a polynomial design matrix
        (:attr:`MonomialBasis.pair_group`): equal columns of the Khatri-Rao table are then known
        without comparing them numerically (about 1 s at 17 labels).

    Returns
    -------
    theta : ndarray, shape (P, K)
    s2 : ndarray, shape (P,)
        ``inf`` for a pixel without enough usable stars (its theta is ``[1, 0, ...]``).
    info : dict
        ``n_iterations`` (alternations), ``pixels_per_iteration`` (list), ``dead`` (bool, P),
        ``objective`` (P), ``lasso_sweeps`` (P: feature-sign steps at the last alternation),
        ``lasso_unconverged`` (count), ``solver``,
        ``cg_iterations`` (mean per pixel and alternation), ``theta_cov``,
        ``theta_covariance`` (the form kept: "exact", "separable" or "none"), ``separable_error``
        (:func:`~astra_cannon.model_noise.separable_error` of the separable form, else None),
        ``t_train``.
    """
    t0 = time.perf_counter()
    A = np.ascontiguousarray(design_matrix, dtype=float)
    N, K = A.shape
    P = flux.shape[1]
    lam = np.broadcast_to(np.asarray(regularization if regularization is not None else 0.0, dtype=float), (P,))
    n_free = K - (censored_terms.sum(axis=1) if censored_terms is not None else 0)
    n_free = np.broadcast_to(n_free, (P,))
    iu, ju = _upper_indices(K)
    Kt = K * (K + 1) // 2
    form = _theta_covariance_form(theta_covariance)
    if form == "auto":
        # an explicit choice of the matrix-free solver wins over "auto"
        form = "exact" if solver != "cg" and P * Kt * 4 <= _PAIRS_CACHE_BYTES else "separable"
    needs_matrix = censored_terms is not None or bool(np.any(lam > 0))
    if solver == "auto":
        solver = "cg" if K > 40 and not needs_matrix else "direct"
    separable = form == "separable"
    theta_covariance = form == "exact"
    if solver not in ("direct", "cg"):
        raise ValueError(f"solver must be 'auto', 'direct' or 'cg', not {solver!r}")
    if solver == "cg" and needs_matrix:
        raise ValueError("L1 regularisation and censoring need solver='direct'")
    # With conjugate gradients the covariance takes one pass of normal matrices at the end, at
    # the final weights: for 17 labels that is 8575 matrices instead of one per pixel and
    # alternation (15142 on the benchmark), and the solves stay matrix-free.
    final_covariance = bool(theta_covariance) and solver == "cg"
    A32 = A.astype(np.float32) if solver == "cg" else None
    # Conjugate gradients stop with theta within 0.1 weight_rtol of its standard error of the
    # exact solution (chi2 left to gain below that squared): ten times inside what the
    # alternations themselves leave (a finished pixel's theta is solved at weights within
    # weight_rtol of its final ones).
    cg_tol = (0.1 * weight_rtol) ** 2
    if solver == "direct" or final_covariance:
        # Only the distinct columns of the Khatri-Rao table enter the big product; every entry
        # of the K x K normal matrix is then gathered from its group (2.5x less work at 17 labels).
        Z = _pairs_table(A)
        if pair_monomials is None:
            unique, group = merge_equal_columns(Z)
        else:
            _, unique, group = np.unique(pair_monomials, return_index=True, return_inverse=True)
        # transposed: (Zu^T w)^T was measured 25% faster than w^T Zu for these skinny products
        ZuT = np.ascontiguousarray(Z[:, unique].T)
        del Z
        gather = np.empty((K, K), dtype=np.intp)
        gather[iu, ju] = group
        gather[ju, iu] = group
        matrix_floats = max(K * K, ZuT.shape[0])
    else:
        matrix_floats = 1
    # Pixel blocks keep every temporary small (N * block and block * K^2 floats): large arrays
    # are mmapped and page-faulted afresh on each allocation, which costs more than the maths.
    block = int(max(1, min(_ELEMENTWISE_BYTES // (8 * N), _BLOCK_BYTES // (8 * matrix_floats))))

    theta = np.zeros((P, K))
    theta[:, 0] = 1.0
    # float32: the test step reads it so (a correction's 7 digits), at half the memory and file
    theta_cov = np.zeros((P, Kt), dtype=np.float32) if theta_covariance else None
    s2 = np.zeros(P) if fixed_s2 is None else np.array(fixed_s2, dtype=float)
    dead = np.zeros(P, dtype=bool)
    objective = np.full(P, np.nan)
    lasso_sweeps_arr = np.zeros(P, dtype=int)

    # Small unregularised models with a covariance take the vectorised inverse
    sweep = solver == "direct" and theta_covariance and censored_terms is None and K <= _SWEEP_MAX_TERMS

    def run_block(b0):
        """Every alternation for the pixels of one block; disjoint slices of the outputs."""
        n_alt_b, per_alt_b, lasso_unconverged_b, cg_b = 0, np.zeros(max_iterations, dtype=int), 0, 0
        sl = slice(b0, min(P, b0 + block))
        # The first alternation reads views of the block: BLAS and the elementwise loops take the
        # strided columns directly (a copy of the block cost as much as its normal matrices at
        # 3 labels). ivar is finite and >= 0 (CannonModel checks); flux may be non-finite where
        # ivar == 0, which shows as a non-finite c and is mended there.
        iv, f = ivar[:, sl], flux[:, sl]
        n_good = np.count_nonzero(iv, axis=0)
        nf = n_free[sl]
        dead_b = n_good <= nf
        dead[sl] = dead_b
        s2_b = s2[sl]
        s2_b[dead_b] = np.inf
        cens_b = censored_terms[sl] if censored_terms is not None else None
        todo = np.flatnonzero(~dead_b)
        if todo.size < iv.shape[1]:
            iv, f = iv[:, todo], f[:, todo]
        # After the first alternation only the pixels still alternating are kept (gathered),
        # with the noise variance 1 / ivar in float32 (inf where masked, so the weight
        # 1 / (var + s2) is 0): the weights are then exact WLS weights to 1e-7, far inside their
        # own uncertainty, and the scatter's Newton iterations read half the bytes.
        var32 = iv_max = slope = f32 = pinv = None
        clean = False
        for n_alt in range(1, max_iterations + 1):
            if todo.size == 0:
                break
            n_alt_b = max(n_alt_b, n_alt)
            per_alt_b[n_alt - 1] += todo.size
            s2_t = s2_b[todo]
            if var32 is None:
                w = iv if not s2_t.any() else iv / (1.0 + iv * s2_t)
            else:
                w = np.add(var32, s2_t)
                np.divide(1.0, w, out=w)
            with np.errstate(invalid="ignore"):  # 0 * inf where ivar == 0: mended below
                wf = w * f
                c = np.einsum("np,np->p", wf, f)
            if not clean:
                bad = np.flatnonzero(~np.isfinite(c))
                if bad.size:
                    f = np.array(f)
                    f[:, bad] = np.where(w[:, bad] > 0, f[:, bad], 0.0)
                    wf[:, bad] = w[:, bad] * f[:, bad]
                    c[bad] = np.einsum("np,np->p", wf[:, bad], f[:, bad])
                clean = True
            rhs = (A.T @ wf).T
            del wf
            lam_t = lam[sl][todo]
            r2_all = inv = None
            reg = lam_t > 0
            swept = sweep and not reg.any()
            if solver == "cg":
                if pinv is None:
                    pinv = cg_preconditioner(A, w)
                sol, n_cg, left = solve_normal_equations_cg(A, w, rhs, x0=theta[b0 + todo] if n_alt > 1 else None,
                                                          tol=cg_tol, max_iterations=_CG_MAX_ITERATIONS,
                                                          preconditioner=pinv)
                cg_b += int(n_cg.sum())
                if left.size:
                    # not converged (never seen on survey-like weights): solve those exactly
                    M = unpack_symmetric(w[:, left].T @ khatri_rao_upper(A), K)
                    with _small_matrix_blas():
                        sol[left] = _solve_spd(M, rhs[left])
                theta[b0 + todo] = sol
                # Residuals in float32 (2.7x faster products): the scatter's estimate is float32
                # anyway, and the objective (a diagnostic here) keeps ~1e-5 relative precision.
                if f32 is None:
                    f32 = f.astype(np.float32)
                r2_all = A32 @ sol.T.astype(np.float32)
                r2_all -= f32
                r2_all *= r2_all
                objective[b0 + todo] = np.einsum("np,np->p", w, r2_all)
            elif swept:
                # Small unregularised models: the normal matrices pixels last, as the product
                # gives them, and one vectorised inverse serves the solve and the covariance.
                inv = inverse_spd_pixels_last(np.take(ZuT @ w, gather.ravel(), axis=0).reshape(K, K, -1))
                sol = np.einsum("klp,pl->pk", inv, rhs)
                theta[b0 + todo] = sol
                objective[b0 + todo] = pixel_objective(None, rhs, c, sol, lam_t, solved=np.ones(sol.shape[0], bool))
            else:
                # np.take: a C-ordered result, 10x faster than fancy indexing here (which returns a
                # transposed layout that also slows every later product with M)
                M = np.take((ZuT @ w).T, gather, axis=1)
                _apply_censoring(M, rhs, cens_b[todo] if cens_b is not None else None)
                with _small_matrix_blas():
                    sol = theta[b0 + todo]
                    if theta_cov is not None and not reg.any():
                        # one inverse serves the solve and the covariance
                        inv = _inverse_spd(M)
                        sol = (inv @ rhs[:, :, None])[:, :, 0]
                    elif (~reg).any():
                        sol[~reg] = _solve_spd(M[~reg], rhs[~reg]) if reg.any() else _solve_spd(M, rhs)
                    if reg.any():
                        r = np.flatnonzero(reg)
                        # L1 pixels start from the constant term alone, later from their last theta
                        start = sol[r]
                        if n_alt == 1:
                            start = np.zeros_like(start)
                            start[:, 0] = rhs[r, 0] / M[r, 0, 0]
                        Mtheta = np.full(sol.shape, np.nan)
                        Mr = M if r.size == len(M) else M[r]  # (no copy of a block's 24 MB when all are L1)
                        sol[r], it, left, Mtheta[r] = _lasso_feature_sign(Mr, rhs[r], lam_t[r], start)
                        if left.size:
                            # not settled (not seen): coordinate descent from there
                            sol[r[left]], it_cd, left = _lasso_cd(M[r[left]], rhs[r[left]], lam_t[r[left]],
                                                                  sol[r[left]])
                            Mtheta[:] = np.nan
                        lasso_sweeps_arr[b0 + todo[r]] = it
                        lasso_unconverged_b += left.size
                theta[b0 + todo] = sol
                objective[b0 + todo] = pixel_objective(M, rhs, c, sol, lam_t, solved=~reg,
                                                       Mtheta=Mtheta if reg.any() else None)
            del w
            finished = np.ones(todo.size, dtype=bool)
            if fixed_s2 is None:
                chi2 = objective[b0 + todo] - lam_t * np.abs(sol[:, 1:]).sum(axis=1)
                # Degrees of freedom: the free terms, or for an L1 fit its non-zero coefficients
                # (the lasso's degrees of freedom, Zou, Hastie & Tibshirani 2007): counting every
                # term there biases s2 high (true 0 -> 0.004 at 17 labels, Lambda = 1000).
                dof = np.where(lam_t > 0, np.count_nonzero(sol, axis=1), nf[todo])
                target = n_good[todo] - dof
                # A pixel whose chi2 at s2 = 0 is already below n - dof keeps s2 = 0 and is
                # finished: no residuals needed.
                need = ~((s2_t == 0) & (chi2 <= target))
                k = np.flatnonzero(need)
                new = np.zeros(todo.size)
                if k.size:
                    sub = k.size < todo.size
                    # (np.compress gathers columns 2x faster than fancy indexing)
                    fk = np.compress(need, f, axis=1) if sub else f
                    if var32 is None:
                        ivk = np.compress(need, iv, axis=1) if sub else iv
                        with np.errstate(divide="ignore"):
                            var32k = np.divide(1.0, ivk, dtype=np.float32)
                        iv_max_k = ivk.max(axis=0)
                        del ivk
                    else:
                        var32k, iv_max_k = (var32[:, k], iv_max[k]) if sub else (var32, iv_max)
                    if r2_all is not None:
                        r2 = r2_all[:, k] if sub else r2_all
                    else:
                        resid = A @ sol[k].T
                        resid -= fk
                        r2 = np.empty(resid.shape, dtype=np.float32)
                        np.multiply(resid, resid, out=r2, casting="same_kind")
                        del resid
                    # Stop the Newton iterations well inside the alternation's weight tolerance.
                    rtol, atol = 0.1 * weight_rtol, 0.1 * weight_rtol / iv_max_k
                    new_k, slope_k = s2_t[k], np.zeros(k.size)
                    newton = np.arange(k.size)
                    if slope is not None:
                        # g(s2) at the new theta is its chi2 (theta was solved with these weights) and
                        # g' barely moves with theta: where the Newton step from there is already
                        # below the tolerance, no pass over the stars is needed.
                        slope_k = slope[k] if sub else slope
                        new_k = s2_newton_step(chi2[k], slope_k, target[k], s2_t[k])
                        newton = np.flatnonzero(np.abs(new_k - s2_t[k]) > np.maximum(rtol * new_k, atol))
                    if newton.size:
                        part = newton.size < k.size
                        new_k, slope_k = new_k.copy(), slope_k.copy()
                        new_k[newton], slope_k[newton] = _s2_newton(
                            r2[:, newton] if part else r2, var32k[:, newton] if part else var32k,
                            target[k][newton], new_k[newton], rtol=rtol, atol=atol[newton], return_slope=True)
                    new[k] = new_k
                    del r2
                    # Largest relative change of any star's weight (the star with the largest ivar).
                    change = iv_max_k * np.abs(new[k] - s2_t[k]) / (1.0 + iv_max_k * np.minimum(new[k], s2_t[k]))
                    finished[k] = change <= weight_rtol
                s2_b[todo] = new
                if n_alt == max_iterations:
                    finished[:] = True
            if theta_cov is not None and solver == "direct" and finished.any():
                # The covariance at the weights theta was solved with, for pixels that are done.
                fin = np.flatnonzero(finished)
                if swept:
                    # pixels last
                    packed = inv[iu, ju]
                    theta_cov[b0 + todo[fin]] = (packed if fin.size == packed.shape[1] else packed[:, fin]).T
                else:
                    if inv is None:
                        with _small_matrix_blas():
                            inv_f = _inverse_spd(M[fin])
                    else:
                        inv_f = inv if fin.size == inv.shape[0] else inv[fin]
                    if cens_b is not None:
                        # a censored coefficient is exactly zero: no uncertainty
                        cmask = cens_b[todo[fin]]
                        inv_f[np.broadcast_to(cmask[:, :, None], inv_f.shape)] = 0.0
                        inv_f[np.broadcast_to(cmask[:, None, :], inv_f.shape)] = 0.0
                    theta_cov[b0 + todo[fin]] = inv_f[:, iu, ju]
            # Only pixels still alternating stay in the working arrays (all among k).
            cont = np.flatnonzero(~finished)
            if cont.size:
                pos = np.searchsorted(k, cont)
                every = pos.size == k.size
                f = fk if every else np.compress(~finished[k], fk, axis=1)
                var32, iv_max, slope = ((var32k, iv_max_k, slope_k) if every else
                                        (np.compress(~finished[k], var32k, axis=1), iv_max_k[pos], slope_k[pos]))
                if f32 is not None:
                    f32 = f32[:, cont]
            todo = todo[cont]
            iv = fk = var32k = None
        s2[sl] = s2_b
        return n_alt_b, per_alt_b, lasso_unconverged_b, cg_b, sl.stop - sl.start

    if n_threads is None:
        n_threads = _blas_threads()
    starts = range(0, P, block)
    n_alt_max, per_alternation, lasso_unconverged, cg_iterations = 0, np.zeros(max_iterations, dtype=int), 0, 0
    # Blocks are independent and numpy releases the GIL in its loops and BLAS calls, so
    # threads share the blocks; each thread's BLAS then runs single-threaded.
    with contextlib.ExitStack() as stack:
        if n_threads > 1:
            stack.enter_context(_blas_limit(1))
            blocks_map = stack.enter_context(concurrent.futures.ThreadPoolExecutor(n_threads)).map
        else:
            blocks_map = map
        for n_alt_b, per_alt_b, lu_b, cg_b, n_done in blocks_map(run_block, starts):
            n_alt_max = max(n_alt_max, n_alt_b)
            per_alternation += per_alt_b
            lasso_unconverged += lu_b
            cg_iterations += cg_b
            if progress is not None:
                progress(n_done)
        if final_covariance:
            cov_block = int(max(1, min(_ELEMENTWISE_BYTES // (8 * N), _BLOCK_BYTES // (8 * K * K))))

            def covariance_block(b0):
                """theta_cov of one block's live pixels at the final weights."""
                live = b0 + np.flatnonzero(~dead[b0:b0 + cov_block])
                if live.size:
                    iv = ivar[:, live]
                    w = iv / (1.0 + iv * s2[live])
                    M = np.take((ZuT @ w).T, gather, axis=1)
                    with _small_matrix_blas():
                        theta_cov[live] = _inverse_spd(M)[:, iu, ju]

            for _ in blocks_map(covariance_block, range(0, P, cov_block)):
                pass
    separable_check = None
    if separable:
        s2_final = np.where(dead, np.inf, s2)
        theta_cov = separable_theta_covariance(A, ivar, s2_final, censored_terms,
                                               block=max(1, _ELEMENTWISE_BYTES // (8 * N)))
        with _small_matrix_blas():
            separable_check = separable_error(A, ivar, s2_final, theta_cov, censored_terms)
    theta[dead] = 0.0
    theta[dead, 0] = 1.0
    return theta, s2, {
        "n_iterations": n_alt_max,
        "pixels_per_iteration": per_alternation[:n_alt_max].tolist(),
        "dead": dead,
        "objective": objective,
        "lasso_sweeps": lasso_sweeps_arr,
        "lasso_unconverged": int(lasso_unconverged),
        "solver": solver,
        "cg_iterations": cg_iterations / max(1, int(per_alternation.sum())),
        "theta_cov": theta_cov,
        "theta_covariance": form,
        "separable_error": separable_check,
        "t_train": time.perf_counter() - t0,
    }


def _fill_bad_with_infs(flat_vals, flat, rows, n_bad):
    """Set the bad entries ``flat`` (flat indices, row-major order) of ``flat_vals`` (a raveled
    (S, P) array) to -inf and +inf in turn within each row (``rows``: their rows, ``n_bad``:
    per row), the row's first, third, ... bad entry to -inf."""
    if flat.size:
        rank = np.arange(flat.size) - (np.cumsum(n_bad) - n_bad)[rows]
        flat_vals[flat] = np.where(rank % 2 == 0, -np.inf, np.inf)


def _balanced_median(vals, n_bad):
    """Row medians of the good entries of ``vals`` (S, P), whose ``n_bad`` bad entries per row
    hold -inf and +inf in turn (``ceil(n_bad / 2)`` of them -inf). ``vals`` is overwritten.

    The median of a row's good values then sits at ranks within one of ``k = P // 2`` of the
    whole row, so one ``partition`` at the single rank ``k`` serves every row: ranks
    ``k - 1`` and ``k + 1`` are the largest and smallest entries on either side. (numpy's
    partition with several ``kth`` takes a scalar path about 7x slower than with one.)

    float32 rows are partitioned as their int32 bit patterns, which numpy does twice as fast:
    that order is the float order for values >= 0 and puts every negative value (-inf
    included) below them, so it can only be wrong where the median ranks reach negative
    values; those rows (S/N <= 0) are partitioned again as floats.
    """
    S, P = vals.shape
    if P == 1:
        return np.where(n_bad == 0, vals[:, 0].astype(np.float64), np.nan)
    k = P // 2
    odd = n_bad % 2 == 1

    def ranked(part):
        at = part[:, k]
        if P % 2 == 0:
            # good-median ranks: (k - 1, k) for an even number of bad entries, (k, k) for odd
            return np.where(odd, at, part[:, :k].max(axis=1)), at
        # (k, k) for even, (k, k + 1) for odd
        return at, np.where(odd, part[:, k + 1:].min(axis=1), at)

    if vals.dtype == np.float32:
        bits = vals.view(np.int32)
        bits.partition(k, axis=1)
        lo, hi = ranked(bits)
        lo, hi = lo.view(np.float32).astype(np.float64), hi.view(np.float32).astype(np.float64)
        negative = np.flatnonzero(np.signbit(lo) | np.signbit(hi))
        if negative.size:
            sub = np.sort(vals[negative], axis=1)
            odd_n = odd[negative]
            at = sub[:, k]
            if P % 2 == 0:
                lo[negative], hi[negative] = np.where(odd_n, at, sub[:, k - 1]), at
            else:
                lo[negative], hi[negative] = at, np.where(odd_n, sub[:, k + 1], at)
    else:
        vals.partition(k, axis=1)  # in place: the callers' arrays are scratch
        lo, hi = ranked(vals)
        lo, hi = lo.astype(np.float64), hi.astype(np.float64)
    with np.errstate(invalid="ignore"):
        med = 0.5 * (lo + hi)
    return np.where(n_bad < P, med, np.nan)


def _median_of_good(values, bad):
    """Row medians of ``values`` over the entries where ``bad`` is False.

    Bad entries are replaced by -inf and +inf in turn (the first, third, ... bad entry of a
    row by -inf), so the median of the good values sits at fixed ranks of the whole row and
    one vectorised ``partition`` serves every row (``nanmedian`` loops over rows in Python).
    """
    # float32 halves the partition's memory traffic; S/N needs no more than 7 digits.
    vals = np.array(values, dtype=np.float32, order="C")
    flat = np.flatnonzero(bad)
    rows = flat // vals.shape[1]
    n_bad = np.bincount(rows, minlength=vals.shape[0])
    _fill_bad_with_infs(vals.reshape(-1), flat, rows, n_bad)
    return _balanced_median(vals, n_bad)


def _weighted_flux(flux, w, wf):
    """``sum w f^2`` per row and ``w f`` (written into ``wf``) of a block."""
    np.multiply(w, flux, out=wf)
    return np.einsum("sp,sp->s", wf, flux), wf


class SpectrumStatistics:
    """Per-spectrum sufficient statistics of a trained model.

    ``Q[s] = Theta^T W_s Theta`` (packed), ``c[s] = Theta^T W_s f_s`` and
    ``e[s] = f_s^T W_s f_s``, with ``W_s`` the scatter-adjusted inverse variance.

    Everything is accumulated over blocks of pixels, each a few hundred kB for the whole batch:
    the elementwise work runs in cache and feeds the block's matrix products directly, with
    no batch-sized temporaries (fresh large arrays are page-faulted in on every allocation).

    Parameters
    ----------
    theta : ndarray, shape (P, K)
    flux, ivar : array_like, shape (S, P)
        Any float dtype or byte order; non-finite flux, ivar <= 0 or non-finite mark bad pixels.
    s2 : ndarray, shape (P,)
        ``inf`` marks a dead pixel.
    theta_pairs : ndarray, shape (P, K (K + 1) / 2), optional
        ``khatri_rao_upper(theta)``, cached by the caller across batches when it fits in memory;
        a float32 table makes ``Q`` single precision (see ``single``).
    extra_variance : ndarray, shape (S, P), optional
        Variance added to every pixel's noise, on top of ``s2``.
    theta_cov : ndarray, shape (P, K (K + 1) / 2), or SeparableCovariance, optional
        Packed per-pixel covariance of theta (or its separable form: then ``G`` costs one
        product with its ``(P, J)`` pixel weights). When given, ``G = sum_p w_p Cov(theta_p)`` is
        built too, and :meth:`limit_correction` makes the fit objective ``Qfit = Q - G``. Without it the
        fitted labels are pulled towards where the model is best determined (the training
        set's centre), because the squared model error ``v^T Cov(theta_p) v`` grows away from
        it; subtracting its expectation removes that bias (a corrected score). ``Q`` itself
        (used for the covariance) is unchanged.
    summaries : bool
        Also compute the S/N (median of ``f sqrt(w)`` over usable pixels) and the mean flux.
    candidates : ndarray, shape (C, K), optional
        Label vectors at which to compute every spectrum's chi2 in float64 pixel by pixel
        (``grid``): with a single-precision ``Q`` the chi2 from ``Q`` is only good to ~1e-3
        relative, too coarse to rank starting points.
    merged : bool
        ``theta_pairs`` is a :class:`astra_cannon.monomials.MonomialBasis` table: the
        statistics are its monomials' sums ``q``, ``g`` instead of ``Q``, ``G``.
    executor : concurrent.futures.Executor, optional
        Threads to share the work: the spectra are swept in chunks (see :meth:`_chunks`), one
        chunk a task. The results do not depend on it, bit for bit.

    Attributes
    ----------
    Q, Qfit, G : ndarray, shape (S, K, K)
        ``G`` is None without ``theta_cov``; ``Qfit`` is ``Q`` (the plain objective: ``Q - G`` is
        safe only near an optimum) until :meth:`limit_correction` corrects it there.
    g_parts, g_shared : ndarray, shape (S, J) and (J, K (K + 1) / 2), or None
        With a separable ``theta_cov``: ``G_s = sum_j g_parts[s, j] C_j``, ``C_j`` packed in
        ``g_shared`` (the polynomial path multiplies by the ``C_j`` for all spectra at once).
    c : ndarray, shape (S, K)
    e, n_pixels : ndarray, shape (S,)
    snr, mean_flux : ndarray, shape (S,)
        With ``summaries``.
    grid : ndarray, shape (S, C)
        With ``candidates`` (else None).
    single : bool
        ``Q`` (and ``G``) were built from float32 products: for models of at least 28 terms
        (:func:`_single_precision`), or whenever ``theta_pairs`` is float32. The optimum of
        such an objective is only good to ~1e-3 sigma; :meth:`polished` restores float64
        accuracy around a point. ``c``, ``e`` are always float64.
    """

    # Pixels per block of the sweep, whatever the number of spectra (a chunk's float64 block
    # arrays take at most 1 MB). 256 to 2048 measured: on one thread 256-512 were fastest, on
    # two 512-2048 (narrower blocks hand the interpreter lock back and forth more often than
    # two threads can use).
    _PIXEL_BLOCK = 512
    # The monomial statistics (``merged``, from 28 terms) make one large product per block:
    # wider blocks cost fewer of the elementwise passes' small calls (at 17 labels, 100
    # spectra, 2048 pixels ran 5-15% faster than 512 on one thread and on two, measured).
    _MERGED_PIXEL_BLOCK = 2048
    # Spectra swept together: the S/N's float32 rows and the bad-pixel mask of a chunk (11 MB
    # for 256 spectra of 8575 pixels) stay near the cache (sweeping 1024-spectrum batches at
    # once made the whole 3-label test step 1.2-1.35x slower on one thread, measured).
    _CHUNK_SPECTRA = 256
    # Smallest chunk made only to give a second thread work.
    _MIN_CHUNK_SPECTRA = 64

    def __init__(self, theta, flux, ivar, s2, theta_pairs=None, extra_variance=None, theta_cov=None,
                 summaries=True, candidates=None, merged=False, executor=None):
        self._flux, self._ivar = np.asarray(flux), np.asarray(ivar)
        self.merged = merged
        s2 = np.asarray(s2, dtype=float)
        self._alive = np.isfinite(s2)
        self._all_alive = bool(self._alive.all())
        self._s2 = np.where(self._alive, s2, 0.0)
        self._s2_dead = np.where(self._alive, s2, np.inf)  # inf: a dead pixel's weight is 0
        self._theta, self._pairs, self.K = theta, theta_pairs, theta.shape[1]
        self.single = _single_precision(self.K) if theta_pairs is None else theta_pairs.dtype == np.float32
        self._extra = extra_variance
        self._summaries, self._candidates = summaries, candidates
        self._separable = isinstance(theta_cov, SeparableCovariance)
        self._theta_cov = theta_cov
        if executor is None:
            parts = [self._rows_statistics(rows) for rows in self._chunks()]
        else:
            parts = list(executor.map(self._rows_statistics, self._chunks()))
        self._assemble(parts)

    def _chunks(self):
        """Row slices of at most ``_CHUNK_SPECTRA`` spectra, each swept over the pixels on its
        own (in cache), of equal sizes and an even number of them from ``2 * _MIN_CHUNK_SPECTRA``
        spectra on, so that two threads share any batch evenly. The partition does not depend
        on the number of threads (nor, then, does the rounding of a chunk's matrix products)."""
        S = self._flux.shape[0]
        if S == 0:
            return [slice(0, 0)]
        n = -(-S // self._CHUNK_SPECTRA)
        if n % 2 and S >= 2 * self._MIN_CHUNK_SPECTRA:
            n += 1
        size = -(-S // n)
        return [slice(r, min(S, r + size)) for r in range(0, S, size)]

    def _rows_statistics(self, rows):
        """Per-spectrum sums, pixel counts and summaries of spectra ``rows`` (a slice), as a dict
        (see :meth:`_sweep`); in this thread's scratch arrays, which are free again after."""
        S, P = rows.stop - rows.start, self._flux.shape[1]
        # Batch-sized arrays are avoided (each is page-faulted in afresh, ~0.4 ms/MB); the
        # S/N median needs whole rows, in float32, and the bad pixels are found once at the end.
        snr_vals = _scratch("snr", (S, P), np.float32) if self._summaries else None
        bad_all = _scratch("bad", (S, P), bool)
        blocks = self._blocks(P)
        cov = self._theta_cov
        sums = self._sweep(blocks, cov.pixel_weights if self._separable else cov, self._candidates, snr_vals,
                           bad_all, rows)
        flat = np.flatnonzero(bad_all)  # row-major: each row's bad pixels in order
        in_row = flat // P
        n_bad = np.bincount(in_row, minlength=S)
        sums["n_pixels"] = P - n_bad
        if self._summaries:
            fsum = sums["fsum"]
            for i in np.flatnonzero(~np.isfinite(fsum)):
                # a flux beyond float32's range (e.g. raw units): sum that spectrum in float64
                use = ~bad_all[i]
                fsum[i] = np.sum(np.where(use, self._flux[rows.start + i], 0.0), dtype=float)
            _fill_bad_with_infs(snr_vals.reshape(-1), flat, in_row, n_bad)
            sums["snr"] = _balanced_median(snr_vals, n_bad)
        return sums

    def _assemble(self, parts):
        """Join the chunks' results (in row order) into this object's attributes."""
        sums = {key: (None if parts[0][key] is None else np.concatenate([p[key] for p in parts]))
                for key in parts[0]}
        separable = self._separable
        # sum_p w_p sum_j U[p, j] C_j = (w @ U) @ C: the (S, J) weights of the shared matrices
        self.g_parts = sums["g"] if separable else None
        self.g_shared = self._theta_cov.shared if separable else None
        if separable:
            sums["g"] = sums["g"] @ self._theta_cov.shared
        self._Qf, self.c, self.e, self._Gf, self.grid = sums["q"], sums["c"], sums["e"], sums["g"], sums["grid"]
        self.n_pixels = sums["n_pixels"]
        self._finish()
        if self.grid is not None:
            self.grid += self.e[:, None]
        if self._summaries:
            with np.errstate(invalid="ignore", divide="ignore"):
                self.mean_flux = sums["fsum"] / self.n_pixels
            self.snr = sums["snr"]
        del self._theta_cov, self._candidates

    def _sweep(self, blocks, theta_cov, candidates, snr_vals, bad_all, rows):
        """Q, c, e (G, the candidates' chi2, the flux sums) of spectra ``rows`` (a slice) over
        pixel ``blocks``, as a dict of sums; fills the blocks' columns of ``snr_vals``
        (f sqrt(w)) and ``bad_all``."""
        S = bad_all.shape[0]
        Kt = self.K * (self.K + 1) // 2
        sums = {"q": np.zeros((S, self._pairs.shape[1] if self.merged else Kt)), "c": np.zeros((S, self.K)),
                "e": np.zeros(S), "g": np.zeros((S, theta_cov.shape[1])) if theta_cov is not None else None,
                "grid": None if candidates is None else np.zeros((S, len(candidates))), "fsum": np.zeros(S)}
        f, r, w, wf = self._buffers(S, blocks)
        if snr_vals is not None:
            ones = np.ones(f.shape[1], dtype=np.float32)
            snr_f32 = _scratch("flux32", f.shape, np.float32)
            good = _scratch("good", f.shape, bool)
        state = {"mend": False}
        for sl in blocks:
            n = sl.stop - sl.start
            fb, wb, masked, (e_block, wfb) = self._block(sl, f[:, :n], r[:, :n], w[:, :n], bad_all[:, sl],
                                                         lambda fl, wt: _weighted_flux(fl, wt, wf[:, :n]), state,
                                                         rows)
            w32 = None
            if snr_vals is not None:
                # w in float32 once, for G's product and the S/N below
                w32 = snr_vals[:, sl]
                np.copyto(w32, wb, casting="same_kind")
            self._add(sums, wb, wfb, e_block, sl, None if theta_cov is None else theta_cov[sl], w32)
            if candidates is not None:
                # sum w m^2 - 2 sum w f m for every candidate model spectrum m (e added later)
                model = candidates @ self._theta[sl].T
                sums["grid"] += wb @ (model * model).T
                sums["grid"] -= 2 * (wfb @ model.T)
            if snr_vals is not None:
                # mean flux over usable pixels and S/N = median of f sqrt(w) over them, in
                # float32 (7 digits suffice for both; float32 operands throughout: a mixed-
                # precision product is 4x slower)
                f32 = snr_f32[:, :n]
                np.copyto(f32, fb, casting="same_kind")
                if not masked:
                    f32 *= np.logical_not(bad_all[:, sl], out=good[:, :n])  # (finite there: zero it)
                sums["fsum"] += f32 @ ones[:n]
                out = snr_vals[:, sl]
                np.sqrt(out, out=out)
                out *= f32
        return sums

    def _block(self, sl, f, r, w, bad, reduce, state, rows=None):
        """Weights ``w`` (0 at bad pixels) and flux of pixel block ``sl`` (of spectra ``rows``,
        default all), and ``reduce(flux, w)``, whose first item must come out finite.

        Survey spectra mark bad pixels with ``ivar = 0``, where ``w = 1 / (1/ivar + s2)`` is
        already 0, so only a check is needed that nothing else is bad, at a third of the
        elementwise passes of :meth:`_masked`: any non-finite or negative ivar shows in
        ``min(1/ivar) > 0`` failing (NaN, 0 or < 0), a non-finite flux in a non-finite result
        (``0 * nan`` is NaN too); dead pixels (``s2 = inf``) get ``w = 0``. Bad pixels' flux is
        often NaN (e.g. apStar files): once a block shows it (``state["mend"]``), the flux of
        bad pixels is zeroed (one select) in this and later blocks. Anything else (NaN flux
        where ivar > 0) is masked pixel by pixel. ``reduce`` must not write to its arguments.
        Returns ``(flux, w, masked, reduce(...))``, ``masked`` True when that flux is 0 at bad
        pixels; ``bad`` (bool, the block's shape) is filled.
        """
        sel = slice(None) if rows is None else rows
        flux, ivar = self._flux[sel, sl], self._ivar[sel, sl]
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(1.0, ivar, out=r)
            clean = r.size > 0 and r.min() > 0
        if clean:
            r += self._s2_dead[sl]
            if self._extra is not None:
                r += self._extra[sel, sl]
            np.divide(1.0, r, out=w)
            np.equal(w, 0.0, out=bad)
            for mend in ((True,) if state["mend"] else (False, True)):
                src = flux
                if mend:
                    np.copyto(f, flux)
                    np.copyto(f, 0.0, where=bad)
                    src = f
                with np.errstate(invalid="ignore", over="ignore"):
                    out = reduce(src, w)
                if np.all(np.isfinite(out[0])):
                    return src, w, mend, out
                state["mend"] = True
        fb, rb, _ = self._masked(sl, f, r, bad, rows)
        np.divide(1.0, rb, out=w)
        return fb, w, True, reduce(fb, w)

    def _blocks(self, P):
        width = self._MERGED_PIXEL_BLOCK if self.merged else self._PIXEL_BLOCK
        if self._pairs is None:
            # The block's Khatri-Rao table of theta is built on the fly: bound it too.
            width = min(width, max(1, _BLOCK_BYTES // (8 * self.K * (self.K + 1) // 2)))
        return [slice(p, min(P, p + width)) for p in range(0, P, width)]

    @staticmethod
    def _buffers(S, blocks):
        width = max(sl.stop - sl.start for sl in blocks) if blocks else 0
        return [_scratch(f"block{i}", (S, width)) for i in range(4)]

    def _masked(self, sl, f, r, bad, rows=None):
        """Masked flux (0 where unusable) and total variance ``1/ivar + s2`` (inf where unusable,
        so that the weight ``1/variance`` is 0) of pixel block ``sl``, written into ``f``, ``r``,
        and the block's bad-pixel mask, into ``bad``; plus the extra variance these statistics
        were built with.

        ``rows``: a subset of this object's spectra (default all). Recomputed from the input in
        every pass: cheaper than keeping batch-sized copies.
        """
        rows = slice(None) if rows is None else rows
        flux, ivar = self._flux[rows, sl], self._ivar[rows, sl]
        np.copyto(f, flux)
        with np.errstate(invalid="ignore", divide="ignore"):
            good = np.isfinite(f)
            good &= ivar > 0
            good &= ivar < np.inf
            if not self._all_alive:
                good &= self._alive[sl]
            np.divide(1.0, ivar, out=r)
        r += self._s2[sl]
        np.logical_not(good, out=bad)
        np.copyto(f, 0.0, where=bad)
        np.copyto(r, np.inf, where=bad)
        if self._extra is not None:
            r += self._extra[rows, sl]
        return f, r, bad

    def _add(self, sums, w, wf, e, sl, theta_cov, w32=None):
        """Add a pixel block's weights ``w`` and ``w f`` (and its ``sum w f^2``) to the sums of
        Q, c, e, G; ``w32``: ``w`` in float32 where at hand (G is built from it)."""
        if self._pairs is not None:
            pairs = self._pairs[sl]
        else:
            pairs = _pairs_table(self._theta[sl], np.float32 if self.single else np.float64)
        sums["q"] += w.astype(pairs.dtype, copy=False) @ pairs
        sums["c"] += wf @ self._theta[sl]
        sums["e"] += e
        if theta_cov is not None:
            if w32 is None or theta_cov.dtype != np.float32:
                w32 = w.astype(theta_cov.dtype, copy=False)
            sums["g"] += w32 @ theta_cov

    def _finish(self):
        if getattr(self, "merged", False):
            # pair sums per monomial (see astra_cannon.monomials); no K x K matrices
            self.q, self.g, self.Q, self.Qfit, self.G = self._Qf, self._Gf, None, None, None
            del self._Qf, self._Gf
            return
        self.Q = unpack_symmetric(self._Qf, self.K)
        self.Qfit = self.Q
        self.G = None if self._Gf is None else unpack_symmetric(self._Gf, self.K)
        del self._Qf, self._Gf

    def limit_correction(self, vectorizer, x):
        """Use the model-noise correction where the data, not the model's noise, set the labels.

        At labels ``x`` (one row per spectrum), the correction's curvature in label space,
        ``D^T G D``, must stay below ``MAX_MODEL_NOISE_FRACTION`` of the data's, ``D^T Q D``
        (all generalised eigenvalues), so that the corrected objective is safely convex there.
        Elsewhere (labels far from most training stars, or a model with too few of them for
        its terms) the spectrum keeps the plain objective, and :func:`_fit_with_q` adds that
        fit's expected bias to its covariance and flags it. Returns the mask of corrected
        spectra.
        """
        if self.G is None:
            return np.zeros(len(self.Q), dtype=bool)
        HQ, _ = _gauss_newton(self.Q, vectorizer, x)
        HG, _ = _gauss_newton(self.G, vectorizer, x)
        corrected = _within_model_noise_limit(HQ, HG)
        self.Qfit = np.where(corrected[:, None, None], self.Q - self.G, self.Q)
        return corrected

    def polished(self, rows, vectors):
        """Statistics that are exact to first order around label vectors ``vectors`` (R, K).

        For single-precision ``Q`` (see :func:`_single_precision`): ``v^T Q v`` and ``c`` cancel
        to ~1e-5 of ``e``, so an optimum of the float32-built objective can sit ~1e-3 sigma off.
        Here the residual ``Theta^T W (Theta v - f)`` and chi2 of spectra ``rows`` at
        ``vectors`` are computed exactly (float64, pixel by pixel) and ``c``, ``e`` of those
        rows replaced so that the objective and its gradient there are exact; ``Q``'s error
        then only enters as ``dv^T dQ dv`` around that point. A few more iterations from there
        give the float64 optimum (to the optimiser's tolerance, ~1e-5 sigma). ``Q`` and ``G``
        are shared.
        """
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        rows = np.asarray(rows)
        resid, chi = self.exact_residual(rows, vectors)
        Qv = _grouped_products(self.Q, rows, vectors[:, None, :])[:, 0, :]
        new.c, new.e = self.c.copy(), self.e.copy()
        new.c[rows] = Qv - resid
        new.e[rows] = chi - np.einsum("ri,ri->r", vectors, Qv) + 2 * np.einsum("ri,ri->r", vectors, new.c[rows])
        return new

    def exact_residual(self, rows, vectors):
        """``Theta^T W (Theta v - f)`` (R, K) and chi2 (R,) of spectra ``rows`` at label vectors
        ``vectors`` (R, K), in float64 pixel by pixel (no ``Q``): exact where ``Q`` is not."""
        rows = np.asarray(rows)
        R, K, P = len(rows), self.K, self._flux.shape[1]
        resid = np.zeros((R, K))
        chi = np.zeros(R)
        blocks = self._blocks(P)
        f, r, w, m = self._buffers(R, blocks)
        t = _scratch("block4", m.shape)
        bad = _scratch("bad_block", f.shape, bool)
        state = {"mend": False}

        def chi_and_residual(fl, wt):
            n = fl.shape[1]
            mb, tb = m[:, :n], t[:, :n]
            np.matmul(vectors, theta.T, out=mb)
            mb -= fl
            np.multiply(mb, wt, out=tb)  # w (model - f)
            return np.einsum("rp,rp->r", mb, tb), tb

        for sl in blocks:
            n = sl.stop - sl.start
            theta = self._theta[sl]
            _, _, _, (chi_b, wr) = self._block(sl, f[:, :n], r[:, :n], w[:, :n], bad[:, :n], chi_and_residual,
                                                state, rows=rows)
            chi += chi_b
            resid += wr @ theta
        return resid, chi

    def chi2(self, v, rows, corrected=True):
        """chi2 of label vectors ``v`` (R, K) against spectra ``rows`` (R,).

        ``corrected``: the fit objective (with the model-noise correction when there is one);
        otherwise the plain chi2 that is reported.
        """
        Q = self.Qfit if corrected else self.Q
        Qv = (Q[rows] @ v[:, :, None])[:, :, 0]
        return np.einsum("ri,ri->r", v, Qv) - 2 * np.einsum("ri,ri->r", v, self.c[rows]) + self.e[rows]

    def chi2_grid(self, V):
        """chi2 of every spectrum at every candidate label vector ``V`` (C, K): (S, C)."""
        iu, ju = _upper_indices(self.K)
        Qf = self.Qfit[:, iu, ju] * pack_weights(self.K)
        VV = V[:, iu] * V[:, ju]
        return Qf @ VV.T - 2 * self.c @ V.T + self.e[:, None]


def _gauss_newton(Q, vectorizer, x, u=None, V=None):
    """``H = D^T Q D`` (R, L, L) and, when ``u = Q v - c`` is given, ``g = D^T u`` (R, L).

    ``D = dv/dx`` is sparse (a column has ``1 + L`` non-zeros for a quadratic model), but
    gathering those columns of ``Q`` was measured 2-3x slower in numpy than the dense batched
    product, so the product stays dense. ``V``: the label vectors at ``x``, when known.
    """
    D = vectorizer._derivative_rows(x, V)
    Dt = np.transpose(D, (0, 2, 1))
    H = Dt @ (Q @ D)
    g = None if u is None else (Dt @ u[:, :, None])[:, :, 0]
    return H, g


def _slots(rows):
    """The distinct values of ``rows``, each row's index among them, its place among the rows
    of the same value, and the most rows any value has."""
    rows = np.asarray(rows)
    n = len(rows)
    if n and np.all(rows[1:] >= rows[:-1]):
        # sorted (the usual layout: a spectrum's starts side by side): no sort needed, 10x faster
        first = np.flatnonzero(np.concatenate(([True], rows[1:] != rows[:-1])))
        counts = np.diff(np.append(first, n))
        inv = np.repeat(np.arange(first.size), counts)
        return rows[first], inv, np.arange(n) - first[inv], int(counts.max())
    uniq, inv, counts = np.unique(rows, return_inverse=True, return_counts=True)
    order = np.argsort(inv, kind="stable")
    slot = np.empty(n, dtype=np.intp)
    slot[order] = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    return uniq, inv, slot, int(counts.max()) if n else 0


def _grouping(rows):
    """How :func:`_grouped` lays out ``rows`` (indices into a stack of matrices) spectrum by
    spectrum: (distinct matrices, position of each row, rows per matrix, already in place)."""
    R = len(rows)
    uniq, inv, slot, width = _slots(rows)
    idx = inv * width + slot
    return uniq, idx, width, bool(uniq.size * width == R and np.array_equal(idx, np.arange(R)))


def _grouped(Q, grouping, Xt):
    """``Xt[i] @ Q[rows[i]]`` for every row ``i`` (R, m, K) with ``grouping = _grouping(rows)``;
    ``Q`` is (n, K, K') for any K'."""
    uniq, idx, width, in_place = grouping
    R, m, K = Xt.shape
    Qu = Q if uniq.size == len(Q) else Q[uniq]
    if in_place:
        Z = Xt  # every spectrum's rows already side by side, in order
    else:
        Z = np.zeros((uniq.size * width, m, K), dtype=Xt.dtype)
        Z[idx] = Xt
    out = (Z.reshape(uniq.size, width * m, K) @ Qu).reshape(uniq.size * width, m, Qu.shape[-1])
    return out if in_place else out[idx]


def _grouped_products(Q, rows, Xt):
    """``Xt[i] @ Q[rows[i]]`` for every row ``i`` (R, m, K): ``(Q X)^T``, as ``Q`` is symmetric.

    Each matrix of ``Q`` is read once: the rows of one spectrum (its several starts) share one
    product, their left-hand sides stacked. Gathering ``Q[rows]`` instead copies a K x K matrix
    per row (0.23 MB each at 17 labels), which cost more than the products; and larger
    products run faster in BLAS. In the transposed layout the stacking is a copy along the
    first axis only.
    """
    return _grouped(Q, _grouping(rows), Xt)


def _merged_starts(rows, x, H, finished, objective, tolerance=1.0):
    """Rows that have reached another start of the same spectrum: within ``tolerance`` in
    ``(x - x')^T H (x - x')`` (chi2 units: 1 is one sigma) and with the larger objective.

    From there both descend into the same basin, so only the better one is continued (all
    three default starts of every spectrum of the benchmark workloads end at one optimum;
    this saves 40 % of the evaluations at 17 labels). The continued row ends with an objective
    no higher than the merged one's, and on a tie it is the earlier row, so picking the
    lowest chi2 never picks a merged row. ``objective(k)``: the objective of rows ``k`` (up to
    a constant per spectrum). Returns their indices, or None.
    """
    live = np.flatnonzero(~finished)
    if live.size < 2:
        return None
    r = rows[live]
    order = np.argsort(r, kind="stable")
    live, r = live[order], r[order]
    same = np.flatnonzero(r[1:] == r[:-1])
    if same.size == 0:
        return None
    i, j = live[same], live[same + 1]
    d = x[i] - x[j]
    close = np.einsum("rl,rlm,rm->r", d, H[i], d) <= tolerance
    if not close.any():
        return None
    i, j = i[close], j[close]
    return np.unique(np.where(objective(i) <= objective(j), j, i))


def _damped_step(H, g, lam, chi2_atol):
    """Levenberg-Marquardt steps ``(H + lam |diag H|)^-1 g`` for a stack of rows, and their
    status: 1 where already at the optimum (the undamped decrement ``g^T H^-1 g``, the chi2 a
    full step would gain, is below ``chi2_atol``), else 0. One batched solve for both."""
    n, L = g.shape
    eye = np.eye(L)
    dH = np.abs(np.einsum("rll->rl", H))
    A = H + lam[:, None, None] * (dH[:, :, None] * eye + 1e-12 * eye)
    solve = _solve_spd_small if L <= 4 and n >= 150 else _solve_spd  # (its fixed cost: ~0.1 ms)
    sol = solve(np.concatenate([A, H + 1e-12 * eye]), np.concatenate([g, g]))
    status = np.zeros(n, dtype=int)
    status[np.abs(np.einsum("rl,rl->r", g, sol[n:])) <= chi2_atol] = 1
    return sol[:n], status


def _after_trial(lam, status, go, ok, change, chi2_atol):
    """Damping and status of rows ``go`` after their trial steps (``ok``: accepted; ``change``:
    chi2 change): an accepted step that gained less than ``chi2_atol`` ends a row (1), a
    damping grown past 1e10 too (4)."""
    lam[go] = np.where(ok, np.maximum(lam[go] * 0.1, 1e-12), lam[go] * 10.0)
    status[go] = np.where(ok & (change >= -chi2_atol), 1, np.where(lam[go] > 1e10, 4, 0))


def _levenberg_marquardt(stats, vectorizer, x0, rows, max_iterations=100, chi2_atol=1e-10):
    """Batched Levenberg-Marquardt in scaled label space for (spectrum, start) pairs.

    Convergence is judged in chi2 units, which are statistically meaningful whatever the
    number of pixels: a row stops, without moving, when a full Gauss-Newton step would gain
    less than ``chi2_atol``, or after an accepted step that gained less (``ier`` 1); when the
    damping has grown so large that no step can be taken (``ier`` 4); ``ier`` 5: iteration
    limit; ``ier`` 6: it came within one sigma of another start of the same spectrum with a
    lower objective, which alone is continued (see :func:`_merged_starts`).

    A step's chi2 change is computed as one difference, ``d^T (Q (v + v') - 2 c)`` with
    ``d = v' - v``, not as the difference of two chi2 values: ``chi2 = v^T Q v - 2 v^T c + e``
    cancels terms of size ``e`` (~1e8 at S/N 100) whose rounding alone exceeds ``chi2_atol``,
    which left the accept/stop decisions to rounding near the optimum (random stopping points
    ~1e-4 sigma apart, and rows rejecting steps until the damping ran away).

    One matrix product per iteration: ``[D' v']^T Q`` at the trial point gives its chi2 change
    and, if the step is accepted, the next Gauss-Newton matrix ``D'^T Q D'`` and gradient. The
    state of unfinished rows is kept compact, and so is the stack of matrices they use. With
    single-precision statistics (already only float32-accurate in ``Q``) the ``Q D`` part runs
    in float32; ``Q v``, which the gradient and the chi2 change need to float64 accuracy, does
    not.
    """
    R, L = x0.shape
    K = stats.Qfit.shape[-1]
    x_out, V_out = x0.copy(), vectorizer._vector_rows(x0)
    QV_out = np.zeros((R, K))
    nfev = np.ones(R, dtype=int)
    ier = np.zeros(R, dtype=int)
    # working stacks of Q (and its float32 copy) and each row's matrix in them
    Qw, rw = stats.Qfit, np.asarray(rows)
    Qw32 = stats.Qfit.astype(np.float32) if getattr(stats, "single", False) else None

    def products(rows_, DT, V):
        """``(Q D)^T`` and ``Q v`` of every row."""
        grouping = _grouping(rows_)
        if Qw32 is None:
            QDV = _grouped(Qw, grouping, np.concatenate([DT, V[:, None, :]], axis=1))
            return QDV[:, :L, :], QDV[:, L, :]
        return _grouped(Qw32, grouping, DT.astype(np.float32)), _grouped(Qw, grouping, V[:, None, :])[:, 0, :]

    # State of the unfinished rows a: labels, label vectors, D^T, (Q D)^T, Q v, damping, c.
    a = np.arange(R)
    xa, Va = x_out.copy(), V_out.copy()
    DTa = vectorizer._derivative_rows(xa, Va, transposed=True)
    QDa, QVa = products(rw, DTa, Va)
    lam = np.full(R, 1e-4)
    ca = stats.c[rows]
    for _ in range(max_iterations):
        if a.size == 0:
            break
        u = QVa - ca
        # J^T W J, the exact Gauss-Newton matrix (in QD's precision)
        H = (DTa.astype(QDa.dtype, copy=False) @ np.transpose(QDa, (0, 2, 1))).astype(np.float64, copy=False)
        g = (DTa @ u[:, :, None])[:, :, 0]  # J^T W r
        step, status = _damped_step(H, g, lam, chi2_atol)
        go = np.flatnonzero(status == 0)
        if go.size:
            x_try = xa[go] - step[go]
            V_try = vectorizer._vector_rows(x_try)
            DT_try = vectorizer._derivative_rows(x_try, V_try, transposed=True)
            QD_try, QV_try = products(rw[go], DT_try, V_try)
            change = np.einsum("ri,ri->r", V_try - Va[go], QV_try - ca[go] + u[go])
            nfev[a[go]] += 1
            ok = np.isfinite(change) & (change <= 0)
            if go.size == a.size and ok.all():
                xa, Va, DTa, QDa, QVa = x_try, V_try, DT_try, QD_try, QV_try
            else:
                k = go[ok]
                xa[k], Va[k], DTa[k], QDa[k], QVa[k] = x_try[ok], V_try[ok], DT_try[ok], QD_try[ok], QV_try[ok]
            _after_trial(lam, status, go, ok, change, chi2_atol)
        finished = status != 0
        # objective up to the common constant e: v^T Q v - 2 v^T c
        merged = _merged_starts(rw, xa, H, finished,
                                lambda k: np.einsum("ri,ri->r", Va[k], QVa[k] - 2 * ca[k]))
        if merged is not None:
            status[merged] = 6
            finished[merged] = True
        if finished.any():
            f, rf = np.flatnonzero(finished), a[finished]
            x_out[rf], V_out[rf], QV_out[rf], ier[rf] = xa[f], Va[f], QVa[f], status[f]
            keep = ~finished
            a, xa, Va, DTa, QDa, QVa, lam, ca, rw = (arr[keep] for arr in (a, xa, Va, DTa, QDa, QVa, lam, ca, rw))
            if a.size and len(Qw) > 64:
                used = np.unique(rw)
                if used.size < len(Qw) // 2:
                    # keep the matrix stack compact as spectra finish
                    Qw, rw = Qw[used], np.searchsorted(used, rw)
                    Qw32 = None if Qw32 is None else Qw32[used]
    if a.size:
        x_out[a], V_out[a], QV_out[a], ier[a] = xa, Va, QVa, 5
    # chi2 at the final points from the products at hand
    chi = (np.einsum("ri,ri->r", V_out, QV_out) - 2 * np.einsum("ri,ri->r", V_out, stats.c[rows])
           + stats.e[rows])
    return x_out, chi, nfev, ier


def _stacked(stack, rows, X):
    """``X[i] @ stack[rows[i]]`` for every row ``i`` (X: (R, n), stack: (S, n, k)) -> (R, k).

    Rows of one spectrum are stacked side by side against the stack (unused spectra get zero
    rows), so no per-spectrum matrix is copied per row: gathering ``stack[rows]`` moves more
    memory than the products cost. The product reads the stack from the first to the last
    spectrum used; when those are mostly unused (a few rows left), the used matrices are
    gathered once instead.
    """
    n = X.shape[1]
    rows = np.asarray(rows)
    if not rows.size:
        return np.zeros((0, stack.shape[2]), dtype=np.result_type(X, stack))
    used, inv, slot, width = _slots(rows)
    lo, hi = int(used[0]), int(used[-1]) + 1
    if 3 * used.size < hi - lo:
        stack, at = stack[used], inv  # a gather reads and writes each matrix once, the product reads it
    else:
        stack, at = stack[lo:hi], rows - lo
    S = len(stack)
    Z = np.zeros((S * width, n), dtype=X.dtype)
    pos = at * width + slot
    Z[pos] = X
    return (Z.reshape(S, width, n) @ stack).reshape(S * width, -1)[pos]


def _leading(columns):
    """``columns`` as a slice when they are ``0 .. n-1`` (a view instead of a gather), else as is."""
    n = len(columns)
    return slice(0, n) if np.array_equal(columns, np.arange(n)) else columns


def _table(U, rows, columns, dtype):
    """``U[rows][:, columns]`` in ``dtype``, gathering only that block (``rows`` None: all)."""
    if rows is None:
        block = U[:, columns]
    elif isinstance(columns, slice):
        block = U[rows, columns]
    else:
        block = U[np.ix_(rows, columns)]
    return block.astype(dtype, copy=False)


def _polynomial_lm(basis, a, x0, rows, max_iterations=100, chi2_atol=1e-10, single_gradient=False,
                   convex_only=False):
    """Levenberg-Marquardt on ``chi2(x) = sum_m a[s, m] x^m`` for (spectrum, start) rows.

    The objective of spectrum ``s`` is the explicit polynomial of :mod:`astra_cannon.monomials`
    (coefficients ``a``, shape (S, M)); its gradient and *exact* Hessian are linear maps of
    ``a`` evaluated at monomials of lower degree, so an iteration never touches a K x K matrix.
    Conventions follow :func:`_levenberg_marquardt` (chi2 units, ``ier`` 1, 4, 5, 6, merged
    starts); the damping scales with ``|diag H|`` since far from the optimum the exact Hessian
    may be indefinite, and a step's chi2 change is computed from monomial differences
    (:meth:`~astra_cannon.monomials.MonomialBasis.change`), free of cancellation.

    ``single_gradient``: the gradient's coefficients in float32 too (half the memory they
    take per iteration), for a search that is polished afterwards: its ~1e-7 relative error
    moves the optimum by ~1e-5 sigma.

    ``convex_only``: a row whose Hessian, refreshed after a step, is no longer positive definite
    stops there with ``ier`` 7 (a corrected objective that is not convex there has left the
    region where it is a valid correction, and would only run on).

    Returns
    -------
    x : (R, L); chi2 : (R,) the polynomial at x; nfev, ier : (R,) int
    """
    R, L = x0.shape
    rows = np.asarray(rows)
    gi, hi = basis.grad_monomials, basis.hess_monomials
    # per-spectrum coefficient stacks (spectra without rows are dropped first)
    used, rw = np.unique(rows, return_inverse=True)
    a = a[used]
    # The Hessian only steers the steps (the gradient and each step's chi2 change are float64):
    # float32 halves the largest stack read every iteration.
    # (in per-thread scratch arrays, as the monomial tables below)
    g_dtype = np.float32 if single_gradient else np.float64
    L_t = L * (L + 1) // 2
    Gc = basis.gradient_coefficients(a, dtype=g_dtype, out=_scratch("lm_grad", (len(a), len(gi), L), g_dtype))
    Hc = basis.hessian_coefficients(a, dtype=np.float32,
                                    out=_scratch("lm_hess", (len(a), max(1, len(hi)), L_t), np.float32))

    # The monomial table (R x 5985 at 17 labels) is the largest array of an iteration: rows
    # are selected from it only where a subset is needed, and the derivatives read only their
    # columns (a leading slice of the graded order).
    g_cols, h_cols = _leading(gi), _leading(hi)

    def gradient(rw_, U, sel=None):
        return 0.5 * _stacked(Gc, rw_, _table(U, sel, g_cols, Gc.dtype)).astype(np.float64)

    def hessian(rw_, U, sel=None):
        return 0.5 * basis.unpack_hessian(_stacked(Hc, rw_, _table(U, sel, h_cols, np.float32)).astype(np.float64))

    x_out, chi_out = x0.copy(), np.zeros(R)
    nfev = np.ones(R, dtype=int)
    ier = np.zeros(R, dtype=int)
    idx = np.arange(R)
    xa = x0.copy()
    # The monomial tables live in per-thread scratch arrays (fresh arrays of this size cost the
    # kernel's zeroing of their pages in every iteration): the current one, the trial steps'
    # new values, and rows gathered from the table and from the coefficients.
    M = basis.n_monomials
    spare, rows_buf, coef_buf = (_scratch(f"lm_{name}", (R, M)) for name in ("spare", "rows", "coef_rows"))
    Ua = basis.values(xa, out=_scratch("lm_table", (R, M)))
    # each row's objective coefficients, kept in step with the working rows (np.take writes
    # straight into ``out`` only with a mode other than "raise"; the indices are valid)
    a_rows = np.take(a, rw, axis=0, out=_scratch("lm_coef", (R, M)), mode="clip")
    a_spare = _scratch("lm_coef_spare", (R, M))
    obj = np.einsum("rm,rm->r", a_rows, Ua)
    high = basis.high_part(a_rows, Ua)  # (see MonomialBasis.change)
    g, H = gradient(rw, Ua), hessian(rw, Ua)
    lam = np.full(R, 1e-4)
    for _ in range(max_iterations):
        if idx.size == 0:
            break
        step, status = _damped_step(H, g, lam, chi2_atol)
        go = np.flatnonzero(status == 0)
        if go.size:
            n_go, every = go.size, go.size == idx.size
            x_try = xa[go] - step[go]
            U_go = Ua if every else np.take(Ua, go, axis=0, out=rows_buf[:n_go], mode="clip")
            a_go = a_rows if every else np.take(a_rows, go, axis=0, out=coef_buf[:n_go], mode="clip")
            change, U_try, high_try = basis.change(a_go, U_go, high[go], xa[go], x_try, out=spare[:n_go])
            nfev[idx[go]] += 1
            ok = np.isfinite(change) & (change <= 0)
            k = go[ok]
            if k.size:
                xa[k] = x_try[ok]
                if every and 2 * k.size > n_go:
                    # most rows moved: the trial table takes the others' rows and is swapped in
                    stay = np.flatnonzero(~ok)
                    U_try[stay] = Ua[stay]
                    Ua, spare = U_try, Ua
                else:
                    Ua[k] = U_try[ok]
                obj[k] += change[ok]
                high[k] = high_try[ok]
                g[k] = gradient(rw[k], Ua, None if k.size == idx.size else k)
                # The Hessian is refreshed after steps that gained more than 0.01 in chi2; after
                # smaller ones it has hardly changed (Newton's convergence stays superlinear).
                far = k[change[ok] < -1e-2]
                if far.size:
                    H[far] = hessian(rw[far], Ua, None if far.size == idx.size else far)
            _after_trial(lam, status, go, ok, change, chi2_atol)
            if convex_only and k.size and far.size:
                status[far[~_positive_definite(H[far])]] = 7
        finished = status != 0
        merged = _merged_starts(rw, xa, H, finished, lambda k_: obj[k_])
        if merged is not None:
            status[merged] = 6
            finished[merged] = True
        if finished.any():
            f = np.flatnonzero(finished)
            x_out[idx[f]], chi_out[idx[f]], ier[idx[f]] = xa[f], obj[f], status[f]
            keep = ~finished
            kept = np.flatnonzero(keep)
            # the two tables move into their spares (no fresh arrays)
            Ua, spare = np.take(Ua, kept, axis=0, out=spare[:kept.size], mode="clip"), Ua
            a_rows, a_spare = np.take(a_rows, kept, axis=0, out=a_spare[:kept.size], mode="clip"), a_rows
            idx, xa, obj, high, g, H, lam, rw = (arr[keep] for arr in (idx, xa, obj, high, g, H, lam, rw))
            live = np.unique(rw)
            if live.size and live.size < len(Gc) // 2:
                # keep the coefficient stacks compact as spectra finish
                Gc, Hc = Gc[live], Hc[live]
                rw = np.searchsorted(live, rw)
    if idx.size:
        x_out[idx], chi_out[idx], ier[idx] = xa, obj, 5
    return x_out, chi_out, nfev, ier


def _polynomial_fit(stats, basis, vectorizer, x0, rows, max_iterations, chi2_atol=1e-10):
    """The whole fit on merged (single-precision) statistics: optimise, polish, covariance.

    1. Levenberg-Marquardt on the float32-built polynomial from every start, to ~1e-3 sigma;
    2. at the best optimum ``x0`` of each spectrum, the exact residual
       ``u = Theta^T W (Theta v - f)`` (float64, pixel by pixel) gives the exact gradient
       ``2 D^T u``, and one Newton step with the polynomial's Hessian lands on the float64
       optimum (its float32 error, ~1e-5 relative, moves the step by ~1e-8 sigma);
    3. a second exact pass there gives chi2, ``u`` and the exact gradient, which verifies the
       optimum (Newton decrement ``g^T H^-1 g <= chi2_atol``; the rare spectrum that fails
       is refitted by Levenberg-Marquardt on the polynomial corrected to be exact at ``x0``),
       and the Gauss-Newton matrix ``D^T Q D = H / 2 - sum_k u_k d2 v_k`` gives the covariance.

    With the model-noise statistics (``stats.g``: ``G = sum_p w_p Cov(theta_p)``, packed), the
    fit is then corrected as :func:`_fit_with_q` does on ``Q`` statistics, with the same
    definitions: the limit ``MAX_MODEL_NOISE_FRACTION`` on ``D^T G D`` against ``D^T Q D`` at
    the plain optimum (judged at ``x0``, after step 2's exact pass: step 3 is only taken for
    the spectra that keep the plain fit); the corrected objective ``chi2 - v^T G v`` (``G``
    merged into its polynomial, per spectrum) optimised from step 2's Newton step and polished
    as above; a fit that stops for leaving the region where that objective is convex (its
    Hessian no longer positive definite, ``ier`` 7, or the iteration limit), or ends where
    ``D^T (Q - G) D`` is not positive definite, replaced by one Gauss-Newton step of it from
    ``x0`` with the exact gradient there; and
    the sandwich ``Hc^-1 H Hc^-1`` with ``Hc = D^T (Q - G) D``, times ``1 + eps``. ``G`` is
    needed as a K x K matrix for that: ``D^T G D`` involves nearly all of its entries, and the
    corrected objective's own Hessian, which differs from it by ``sum_k (G v)_k d2 v_k``, made
    sigma up to 50x too large at 17 labels.

    Returns the index of the winning start of each spectrum, labels, chi2, covariance (scaled
    units), nfev, ier and whether the model's noise dominated (the plain fit kept), one row per
    spectrum of ``np.unique(rows)`` (in that order).
    """
    L = x0.shape[1]
    a = basis.coefficients(stats.q, stats.c, stats.e)
    x, chi, nfev, ier = _polynomial_lm(basis, a, x0, rows, max_iterations=max_iterations, chi2_atol=1e-6,
                                       single_gradient=True)
    spectra = np.unique(rows)
    k = len(rows) // len(spectra)
    chi_r = np.where(np.isfinite(chi), chi, np.inf).reshape(len(spectra), k)
    pick = np.arange(len(spectra)) * k + np.argmin(chi_r, axis=1)
    xb, nfev_b, ier_b = x[pick], nfev.reshape(len(spectra), k).sum(axis=1), ier[pick]
    a = a[spectra]
    Hc = basis.hessian_coefficients(a)

    def poly_hessian(stack, xs, rows_):
        """The Hessian of polynomial coefficient stacks at xs, rows ``rows_`` of the stack
        (no gather of the 21 MB stack per call)."""
        return basis.unpack_hessian(_stacked(stack, rows_, basis.values_at(xs, basis.hess_monomials)))

    def exact(xs, rows_):
        """chi2, half-gradient D^T u, u and the half Hessian of the objective at xs."""
        u, chi2 = stats.exact_residual(spectra[rows_], vectorizer._vector_rows(xs))
        g = np.einsum("rkl,rk->rl", vectorizer._derivative_rows(xs), u)
        return chi2, g, u, 0.5 * poly_hessian(Hc, xs, rows_)

    def plain(xs, rows_):
        chi2, g, u, H = exact(xs, rows_)
        return chi2, g, H, (chi2, u, H, g)

    every = np.arange(len(spectra))
    dominated = np.zeros(len(spectra), dtype=bool)
    if stats.g is None:
        x1, _, _, (chi1, u1, H1, g1), nfev_b, ier_b = _newton_polish(plain, basis, a, xb, every, nfev_b, ier_b,
                                                                  max_iterations, chi2_atol)
        return pick, x1, chi1, _inverse_or_nan(_data_curvature(basis, H1, u1, x1)), nfev_b, ier_b, dominated

    K = basis.n_terms
    G = _NoiseMatrices(stats, spectra)
    gam = G.merged(basis)  # v^T G v as a polynomial: the corrected objective's part
    Hg = basis.hessian_coefficients(gam)

    def model_noise(xs, rows_):
        """At xs: v^T G v, D^T G v (half its gradient), D^T G D, and half its Hessian."""
        V = vectorizer._vector_rows(xs)
        D = vectorizer._derivative_rows(xs, V)
        GV, GD = G.products(rows_, V, D)
        Dt = np.transpose(D, (0, 2, 1))
        return (np.einsum("rk,rk->r", V, GV), (Dt @ GV[:, :, None])[:, :, 0], Dt @ GD,
                0.5 * poly_hessian(Hg, xs, rows_))

    def corrected(xs, rows_):
        chi2, g, u, H = exact(xs, rows_)
        value, g_noise, H_noise, H_noise_full = model_noise(xs, rows_)
        return chi2 - value, g - g_noise, H - H_noise_full, (chi2, u, H, value, g_noise, H_noise)

    # The plain objective exactly at the polynomial's optimum xb (one pass over the pixels):
    # there the share of the data's curvature that the correction removes is judged, and its
    # Newton step starts the corrected fit. Only the spectra that keep the plain fit are then
    # polished to its exact optimum (below): for the others a verified plain optimum would
    # cost a second pass and change nothing.
    chi0, g0, u0, H0 = exact(xb, every)
    nfev_b += 1
    step = _solve_spd(H0, g0)
    with np.errstate(invalid="ignore"):
        # (a step that is not a descent direction, e.g. where H0 is not positive definite, is
        # not taken: the corrected fit then starts at xb)
        descent = np.all(np.isfinite(step), axis=1) & (np.einsum("rl,rl->r", g0, step) >= 0)
    x1 = np.where(descent[:, None], xb - step, xb)
    noise0 = model_noise(xb, every)
    H_data0 = _data_curvature(basis, H0, u0, xb)
    dominated = ~_within_model_noise_limit(H_data0, noise0[2])
    final = [xb.copy(), chi0, u0, H0, *noise0[:3]]  # x, chi2, u, half Hessian, v^T G v, D^T G v, D^T G D
    c = np.flatnonzero(~dominated)
    if c.size:
        ac = a[c] - gam[c]
        n_it = min(max_iterations, _CORRECTED_MAX_ITERATIONS)
        # (a fit that leaves the region where the corrected objective is convex may overflow: caught below)
        with np.errstate(over="ignore", invalid="ignore"):
            x2, _, nfev2, ier2 = _polynomial_lm(basis, ac, x1[c], np.arange(c.size), max_iterations=n_it,
                                                chi2_atol=1e-6, single_gradient=True, convex_only=True)
            # only fits that settled are polished (a runaway would only run on in the refit)
            s_ = np.flatnonzero(~np.isin(ier2, (5, 7)))
            x3 = x2.copy()
            ex3 = [np.zeros(c.size), np.zeros((c.size, K)), np.zeros((c.size, L, L)), np.zeros(c.size),
                   np.zeros((c.size, L)), np.full((c.size, L, L), np.nan)]
            nfev3, ier3 = nfev2.copy(), ier2.copy()
            if s_.size:
                x3[s_], _, _, ex_s, nfev3[s_], ier3[s_] = _newton_polish(
                    lambda xs, r: corrected(xs, c[s_[r]]), basis, ac[s_], x2[s_], np.arange(s_.size), nfev2[s_],
                    ier2[s_], n_it, chi2_atol)
                for arr, new in zip(ex3, ex_s):
                    arr[s_] = new
        nfev_b[c] += nfev3
        bread3 = _data_curvature(basis, ex3[2], ex3[1], np.where(np.isfinite(x3), x3, 0.0)) - ex3[5]
        convex = _corrected_fit_convex(x3, bread3, ier3)
        run = ~convex
        if run.any():
            # One Gauss-Newton step of the corrected objective from the plain optimum (convex
            # there: within the limit; at xb, where the exact gradient is known), the
            # first-order corrected estimate.
            r = c[run]
            x_step = xb[r] - _solve_spd(H_data0[r] - noise0[2][r], g0[r] - noise0[1][r])
            _, _, _, ex_s = corrected(x_step, r)
            nfev_b[r] += 1
            ok_s = np.all(np.isfinite(x_step), axis=1) & _positive_definite(
                _data_curvature(basis, ex_s[2], ex_s[1], np.where(np.isfinite(x_step), x_step, 0.0)) - ex_s[5])
            x3[run] = np.where(ok_s[:, None], x_step, x3[run])
            for arr, new in zip(ex3, ex_s):
                arr[run] = np.where(ok_s.reshape((-1,) + (1,) * (new.ndim - 1)), new, arr[run])
            convex[run] = ok_s
            ier3[run] = ier_b[r]
            dominated[r[~ok_s]] = True
        keep = c[convex]
        final[0][keep] = x3[convex]
        for arr, new in zip(final[1:], ex3):
            arr[keep] = new[convex]
        ier_b[keep] = ier3[convex]
    d = np.flatnonzero(dominated)
    if d.size:
        # the plain fit, kept where the model's noise dominates: to its exact optimum
        xd, _, _, (chi_d, u_d, H_d, _), nfev_b[d], ier_b[d] = _newton_polish(
            lambda xs, r: plain(xs, d[r]), basis, a[d], xb[d], np.arange(d.size), nfev_b[d], ier_b[d],
            max_iterations, chi2_atol, first=(chi0[d], g0[d], H0[d]))
        for arr, new in zip(final, (xd, chi_d, u_d, H_d, *model_noise(xd, d)[:3])):
            arr[d] = new
    x_f, chi_f, u_f, H_f, gamma_f, noise_grad_f, noise_H_f = final
    H = _data_curvature(basis, H_f, u_f, x_f)  # D^T Q D
    eps = np.maximum(gamma_f / stats.n_pixels[spectra], 0.0)
    Hc_inv = _inverse_or_nan(np.where(dominated[:, None, None], H, H - noise_H_f))
    cov = Hc_inv @ H @ Hc_inv
    if dominated.any():
        # the plain fit's expected bias, b = H^-1 D^T G v, as a mean squared error
        d = np.flatnonzero(dominated)
        b = (cov[d] @ noise_grad_f[d, :, None])[:, :, 0]
        cov[d] += b[:, :, None] * b[:, None, :]
    cov *= (1.0 + eps)[:, None, None]
    return pick, x_f, chi_f / (1.0 + eps), cov, nfev_b, ier_b, dominated


class _NoiseMatrices:
    """The model-noise matrices ``G_s = sum_p w_sp Cov(theta_p)`` of spectra ``spectra`` of
    ``stats``: per spectrum (packed ``stats.g``), or, from a separable theta covariance,
    ``G_s = sum_j stats.g_parts[s, j] C_j`` with a few shared ``C_j``: then every product
    with them is one matrix product per ``C_j`` for all spectra, and no K x K matrix is made
    per spectrum (at 17 labels that was 10 % of the test step)."""

    def __init__(self, stats, spectra):
        self.K = stats.K
        parts = getattr(stats, "g_parts", None)
        if parts is not None:
            self.parts = np.asarray(parts[spectra], dtype=float)
            self.shared = np.asarray(stats.g_shared, dtype=float)
            self.C = unpack_symmetric(self.shared, self.K)
        else:
            self.parts = None
            self.packed = np.asarray(stats.g[spectra], dtype=float)
            self.G = unpack_symmetric(self.packed, self.K)

    def merged(self, basis):
        """``v^T G_s v`` as a polynomial per spectrum: (R, M) coefficients."""
        if self.parts is None:
            return basis.merge(self.packed, dtype=np.float64)
        return self.parts @ basis.merge(self.shared, dtype=np.float64)

    def products(self, rows, V, D):
        """``G V`` (R, K) and ``G D`` (R, K, L) for label vectors ``V`` and derivatives ``D`` of
        spectra ``rows`` (indices into ``spectra``)."""
        if self.parts is None:
            G = self.G[rows]
            return (G @ V[:, :, None])[:, :, 0], G @ D
        R, K, L = D.shape
        GV, GD = np.zeros((R, K)), np.zeros((R, K, L))
        Dk = np.ascontiguousarray(np.transpose(D, (1, 0, 2))).reshape(K, R * L)
        for j, C in enumerate(self.C):
            w = self.parts[rows, j]
            GV += (V @ C) * w[:, None]  # C symmetric
            GD += np.transpose((C @ Dk).reshape(K, R, L), (1, 0, 2)) * w[:, None, None]
        return GV, GD


def _data_curvature(basis, H_half, u, x):
    """The Gauss-Newton matrix ``D^T Q D``: the objective's half Hessian ``H_half`` at ``x``
    less the residual's curvature ``sum_k u_k d2 v_k`` (``u = Q v - c``)."""
    return H_half - basis.term_hessian(u, x)


def _newton_polish(evaluate, basis, coef, xb, rows, nfev, ier, max_iterations, chi2_atol, first=None):
    """Take optima ``xb`` of the float32-built polynomials ``coef`` to the exact optimum.

    ``evaluate(x, rows)`` returns the exact objective, half gradient and half Hessian at ``x``
    and a tuple of per-row arrays kept for the result. One Newton step, verified by its
    decrement at the new point (and no rise of the objective); rows that fail are refitted by
    Levenberg-Marquardt on ``coef`` made exact (value and gradient) at ``xb``.
    ``first``: the objective, half gradient and half Hessian at ``xb`` where already known
    (counted in ``nfev`` by the caller).
    Returns ``x, objective, half Hessian, extras, nfev, ier``.
    """
    obj0, g0, H0 = evaluate(xb, rows)[:3] if first is None else first
    x1 = xb - _solve_spd(H0, g0)
    obj1, g1, H1, ex1 = evaluate(x1, rows)
    with np.errstate(invalid="ignore"):
        decrement = np.einsum("rl,rl->r", g1, _solve_spd(H1, g1))
    bad = np.flatnonzero(~((np.abs(decrement) <= _NEWTON_CHECK_ATOL * chi2_atol) & (obj1 <= obj0)))
    nfev, ier = nfev + (2 if first is None else 1), ier.copy()
    if bad.size:
        # Levenberg-Marquardt on the polynomial made exact (value, gradient) at xb
        ab = coef[bad].copy()
        Ub = basis.values(xb[bad])
        g_poly = np.einsum("rgl,rg->rl", basis.gradient_coefficients(ab), Ub[:, basis.grad_monomials])
        ab[:, basis.linear_index] += 2.0 * g0[bad] - g_poly
        ab[:, 0] += obj0[bad] - np.einsum("rm,rm->r", ab, Ub)
        x2, _, nfev2, ier2 = _polynomial_lm(basis, ab, xb[bad], np.arange(bad.size), max_iterations=max_iterations,
                                            chi2_atol=chi2_atol)
        x1[bad] = x2
        obj1[bad], _, H1[bad], ex2 = evaluate(x2, rows[bad])
        for arr, new in zip(ex1, ex2):
            arr[bad] = new
        nfev[bad] += nfev2
        ier[bad] = np.where(ier2 == 1, ier[bad], ier2)
    return x1, obj1, H1, ex1, nfev, ier


def _corrected_fit_convex(x, H, ier):
    """Corrected fits that ended where their objective is convex (half Hessian ``H`` positive
    definite), at finite labels, not stopped by the iteration limit (``ier`` 5) nor for leaving
    the convex region (7)."""
    return np.all(np.isfinite(x), axis=1) & _positive_definite(H) & ~np.isin(ier, (5, 7))


def _positive_definite(H):
    """Rows of a stack of symmetric matrices that are finite and positive definite."""
    with np.errstate(invalid="ignore"):
        finite = np.all(np.isfinite(H), axis=(1, 2))
        return finite & (np.linalg.eigvalsh(np.where(finite[:, None, None], H, 0.0))[:, 0] > 0)


def _within_model_noise_limit(H_data, H_noise):
    """Rows where the model's noise takes at most ``MAX_MODEL_NOISE_FRACTION`` of the curvature:
    every generalised eigenvalue of ``H_noise`` against ``H_data`` (positive definite) below it."""
    vals, vecs = np.linalg.eigh(H_data)
    ok = vals.min(axis=1) > 0
    root = vecs / np.sqrt(np.where(vals > 0, vals, np.inf))[:, None, :]
    ratio = np.linalg.eigvalsh(np.transpose(root, (0, 2, 1)) @ H_noise @ root).max(axis=1)
    return ok & (ratio <= MAX_MODEL_NOISE_FRACTION)


def _polish(stats, vectorizer, x, rows, nfev, ier, max_iterations):
    """Refit from ``x`` on :meth:`SpectrumStatistics.polished` statistics (float64-exact there).

    Returns the new statistics, labels, chi2, the evaluation counts added up and ``ier``
    (the first fit's, unless the polish itself failed).
    """
    stats = stats.polished(rows, vectorizer._vector_rows(x))
    with _small_matrix_blas():
        x, chi, nfev_p, ier_p = _levenberg_marquardt(stats, vectorizer, x, rows, max_iterations=max_iterations)
    return stats, x, chi, nfev + nfev_p, np.where(ier_p == 1, ier, ier_p)


def _fit_with_q(stats, vectorizer, x0, rows, ok, k, max_iterations):
    """The whole fit on ``Q`` statistics: Levenberg-Marquardt from every start, the best of
    each spectrum polished (single precision), then corrected for the model's own noise when
    ``stats`` carries ``G``, then the covariance. Returns what :func:`_polynomial_fit` returns,
    plus whether the statistics were single precision and, per spectrum, whether the model's
    noise dominated it (``MODEL_NOISE_DOMINATED``).

    The model's noise. ``G = sum_p w_p Cov(theta_p)`` comes from the same pass over the pixels
    as ``Q``, so the corrected score ``Q - G`` (see :class:`SpectrumStatistics`) is refitted
    from the plain optimum without reading the pixels again. Its covariance is the sandwich
    ``Hc^-1 H Hc^-1``, with ``H = D^T Q D`` the curvature of the noise the fit sees and
    ``Hc = D^T (Q - G) D`` that of the objective it minimises: the correction removes the
    pull towards the training set's centre by stretching the plain fit's response to the data
    (and so to their noise), by up to ``1 / (1 - share)`` along the direction where the model's
    noise takes the largest ``share`` of the curvature. Reporting ``H^-1`` there instead
    understated the errors 3-7x in sigma (300 training stars, 15 terms; measured against a
    Monte Carlo over the training set's noise, which the sandwich matched to ~2%).
    The model's variance ``m_p = v^T Cov(theta_p) v`` also adds a fraction ``eps_p = w_p m_p``
    to each pixel's noise variance; with its mean at the fitted labels, ``eps = v^T G v / n``,
    the covariance is multiplied by ``1 + eps`` and chi2 divided by it (exact for a uniform
    ``eps_p``; the re-weighting would move the labels by a second-order amount).

    Spectra where the share exceeds ``MAX_MODEL_NOISE_FRACTION`` keep the plain fit, whose
    expected bias ``b = H^-1 D^T G v`` (towards where the model is best determined) is added to
    the covariance as ``b b^T``: that fit's mean squared error, not a 1-sigma claim it cannot
    make. ``Q - G`` is a local correction: a corrected fit that leaves the region where it is
    convex takes one Gauss-Newton step of it from the plain optimum instead (the first-order
    corrected estimate), and only where that too is not convex keeps the plain fit.
    """
    corrected = stats.G is not None
    with _small_matrix_blas():
        # Every start to 1e-2 in chi2 (0.1 sigma), enough to rank them; only the best of each
        # spectrum is then taken to the optimiser's tolerance (its iterations near the optimum
        # cost as much as the whole search when run for every start).
        x, chi, nfev, ier = _levenberg_marquardt(stats, vectorizer, x0, rows, max_iterations=max_iterations,
                                                 chi2_atol=1e-2)
    chi_r = np.where(np.isfinite(chi), chi, np.inf).reshape(ok.size, k)
    best = np.argmin(chi_r, axis=1)
    pick = np.arange(ok.size) * k + best
    xb, chib = x[pick], chi[pick]
    nfev_total = nfev.reshape(ok.size, k).sum(axis=1)
    ier_b = ier[pick]
    single = stats.single
    dominated = np.zeros(ok.size, dtype=bool)
    if stats.single:
        stats, xb, chib, nfev_total, ier_b = _polish(stats, vectorizer, xb, ok, nfev_total, ier_b, max_iterations)
    if not corrected:
        with _small_matrix_blas():
            if not single:
                xb, chib, nfev2, ier2 = _levenberg_marquardt(stats, vectorizer, xb, ok, max_iterations=max_iterations)
                nfev_total, ier_b = nfev_total + nfev2, np.where(ier2 == 1, ier_b, ier2)
            cov = _covariance(stats, vectorizer, xb, ok)
        return pick, xb, chib, cov, nfev_total, ier_b, single, dominated
    # The corrected score from the plain optimum, on the same statistics.
    x_all = np.zeros((len(stats.Q), xb.shape[1]))
    x_all[ok] = xb
    plain_stats, plain_x, plain_ier = stats, xb, ier_b
    with _small_matrix_blas():
        dominated = ~stats.limit_correction(vectorizer, x_all)[ok]
        # (a fit that leaves the region where Q - G is convex may overflow: caught below)
        with np.errstate(over="ignore", invalid="ignore"):
            # Corrected fits get the cap; plain ones (where the model's noise dominates) are only
            # being finished, and get the full limit.
            xb, ier_b, nfev_total = xb.copy(), ier_b.copy(), nfev_total.copy()
            for part, n_it in ((~dominated, min(max_iterations, _CORRECTED_MAX_ITERATIONS)),
                               (dominated, max_iterations)):
                if part.any():
                    xb[part], _, nfev2, ier_b[part] = _levenberg_marquardt(stats, vectorizer, xb[part], ok[part],
                                                                           max_iterations=n_it)
                    nfev_total[part] += nfev2
            if stats.single:
                stats, xb, _, nfev_total, ier_b = _polish(stats, vectorizer, xb, ok, nfev_total, ier_b,
                                                          max_iterations)
    # Far from the plain optimum Q - G can lose its convexity (it is a local correction): a
    # corrected fit that ran away, or ended where it is not convex (seen for 30% of spectra at
    # 17 labels x 1000 stars), takes one Newton step of Q - G from the plain optimum instead,
    # the first-order corrected estimate; where even that is not convex, the plain fit stays.
    runaway = ~dominated & ~_convex(stats.Qfit[ok], vectorizer, xb, ier_b)
    if runaway.any():
        r, rows_r = np.flatnonzero(runaway), ok[runaway]
        xb, ier_b, nfev_total = xb.copy(), ier_b.copy(), nfev_total.copy()
        corrected_Q = stats.Qfit
        if single:
            # The plain optimum was polished on statistics exact there; these are exact at the
            # corrected point (so ~1e-3 sigma off at the plain one): take the plain ones back.
            stats.c[rows_r], stats.e[rows_r] = plain_stats.c[rows_r], plain_stats.e[rows_r]
            xp, ier_p = plain_x[r], plain_ier[r]
        else:
            # the plain fit was only taken to the ranking tolerance: finish it
            stats.Qfit = corrected_Q.copy()
            stats.Qfit[rows_r] = stats.Q[rows_r]
            with _small_matrix_blas():
                xp, _, nfev_p, ier_p = _levenberg_marquardt(stats, vectorizer, plain_x[r], rows_r,
                                                            max_iterations=max_iterations)
            stats.Qfit = corrected_Q
            ier_p = np.where(ier_p == 1, plain_ier[r], ier_p)
            nfev_total[r] += nfev_p
        with _small_matrix_blas():
            x1 = _newton_step(corrected_Q[rows_r], stats.c[rows_r], vectorizer, xp)
            still = ~_convex(corrected_Q[rows_r], vectorizer, x1)
        xb[r], ier_b[r] = np.where(still[:, None], xp, x1), ier_p
        if still.any():
            stats.Qfit = corrected_Q.copy()
            stats.Qfit[rows_r[still]] = stats.Q[rows_r[still]]
            dominated = dominated.copy()
            dominated[r[still]] = True
    V = vectorizer._vector_rows(xb)
    GV = _grouped_products(stats.G, ok, V[:, None, :])[:, 0, :]
    eps = np.maximum(np.einsum("ri,ri->r", V, GV) / stats.n_pixels[ok], 0.0)
    # Report the plain chi2 (noise + model variance), not the corrected objective.
    chib = stats.chi2(V, ok, corrected=False) / (1.0 + eps)
    with _small_matrix_blas():
        D = vectorizer._derivative_rows(xb, V)
        Dt = np.transpose(D, (0, 2, 1))
        H = Dt @ (stats.Q[ok] @ D)
        Hc_inv = _inverse_or_nan(Dt @ (stats.Qfit[ok] @ D))
        cov = Hc_inv @ H @ Hc_inv
        if dominated.any():
            # the plain fit's expected bias, b = H^-1 D^T G v, as a mean squared error
            d = np.flatnonzero(dominated)
            b = (cov[d] @ (Dt[d] @ GV[d, :, None]))[:, :, 0]
            cov[d] += b[:, :, None] * b[:, None, :]
        cov *= (1.0 + eps)[:, None, None]
    return pick, xb, chib, cov, nfev_total, ier_b, single, dominated


def _convex(Q, vectorizer, x, ier=None):
    """Rows whose objective (statistics ``Q``) is convex at ``x`` (positive definite
    Gauss-Newton matrix), ``x`` finite, and (given ``ier``) not stopped by the iteration limit."""
    with _small_matrix_blas():
        H, _ = _gauss_newton(Q, vectorizer, np.where(np.isfinite(x), x, 0.0))
    ok = np.all(np.isfinite(x), axis=1) & _positive_definite(H)
    return ok if ier is None else ok & (ier != 5)


def _newton_step(Q, c, vectorizer, x):
    """One Gauss-Newton step of the objective ``v^T Q v - 2 c^T v`` from ``x`` (one row each)."""
    V = vectorizer._vector_rows(x)
    H, g = _gauss_newton(Q, vectorizer, x, u=(Q @ V[:, :, None])[:, :, 0] - c, V=V)
    return x - _solve_spd(H, g)


def _covariance(stats, vectorizer, x, rows):
    """``(D^T Q D)^-1`` at the optimum, in scaled label units; NaN where singular."""
    H, _ = _gauss_newton(stats.Q[rows], vectorizer, x)
    return _inverse_or_nan(H)


def _inverse_or_nan(H):
    """Inverses of a stack of symmetric matrices; NaN where singular or not finite."""
    cov = np.full_like(H, np.nan)
    ok = np.all(np.isfinite(H), axis=(1, 2))
    if ok.any():
        idx = np.flatnonzero(ok)
        # eigh gives the inverse of a symmetric matrix and tells us whether it is singular.
        vals, vecs = np.linalg.eigh(H[idx])
        good = vals.min(axis=1) > vals.max(axis=1) * 1e-14
        inv = (vecs / np.where(vals > 0, vals, np.inf)[:, None, :]) @ np.transpose(vecs, (0, 2, 1))
        cov[idx[good]] = inv[good]
    return cov


def pack_weights(K):
    """Weights turning ``khatri_rao_upper(v) @ packed(C)`` into ``v^T C v`` (2 off the diagonal)."""
    iu, ju = _upper_indices(K)
    return np.where(iu == ju, 1.0, 2.0)


def label_spectra(theta, s2, vectorizer, fiducials, scales, flux, ivar, starts, n_optimise=3,
                 optimise_all=False, max_iterations=100, batch_size=None, normalised_range=(0.5, 1.5),
                 theta_cov=None, progress=None, theta_pairs=None, n_threads=None):
    """Fit labels for many spectra at once.

    Parameters
    ----------
    theta : ndarray, shape (P, K)
    s2 : ndarray, shape (P,)
    vectorizer : PolynomialVectorizer
    fiducials, scales : ndarray, shape (L,)
    flux, ivar : ndarray, shape (S, P)
        Normalised flux and inverse variance; non-finite flux or ivar <= 0 mark bad pixels.
    starts : ndarray, shape (C, L) or (S, C, L)
        Candidate starting points in physical units.
    n_optimise : int
        Optimise from the best ``n_optimise`` candidates by chi2 (all when ``optimise_all``).
    max_iterations : int
        Levenberg-Marquardt iterations per start.
    batch_size : int, optional
        Spectra processed together (bounds memory: ``batch_size * K^2`` floats for ``Q``, and
        ``batch_size * P`` for the S/N). By default 1024 below 28 terms, where the per-batch
        cost of the optimiser's many small operations dominates, else 256.
    normalised_range : (float, float)
        A spectrum whose mean usable flux lies outside this range is flagged
        ``UNNORMALISED_FLUX`` and not fitted.
    theta_cov : ndarray, shape (P, K (K + 1) / 2), or SeparableCovariance, optional
        Packed covariance of each pixel's theta from training (or its separable form). When given, the fit is
        corrected for the model's own noise (the corrected score ``Q - G``, from the same pass
        over the pixels), the covariance is that of the corrected fit (a sandwich), and chi2 and
        the covariance include the model's variance ``v^T C_p v`` at the fitted labels (to
        first order); spectra the model's noise dominates keep the plain fit, with its bias in
        the covariance, and are flagged ``MODEL_NOISE_DOMINATED`` (see :func:`_fit_with_q`).
    progress : callable, optional
        Called as ``progress(n_spectra_done)`` after each batch.
    theta_pairs : ndarray, shape (P, K (K + 1) / 2), optional
        ``khatri_rao_upper(theta)`` when the caller keeps it (see :func:`theta_pairs_for`);
        otherwise built here when it takes at most 256 MB, or block by block per batch.
    n_threads : int, optional
        Threads, each with a single-threaded BLAS; by default as many as the BLAS is configured
        for (``OPENBLAS_NUM_THREADS``). Below 28 terms they share each batch's statistics and
        this thread fits it, and the results do not depend on ``n_threads``, bit for bit (a
        different ``batch_size`` rounds the matrix products differently, ~1e-13 relative);
        from 28 terms they fit whole batches (smaller ones, to keep every thread busy).

    Returns
    -------
    labels : ndarray, shape (S, L)
        Physical labels; NaN for failed spectra.
    cov : ndarray, shape (S, L, L)
        Physical covariance ``S cov_scaled S``.
    info : dict of arrays, shape (S,)
        ``chi2, rchi2, snr, n_pixels, ier, nfev, start_index, x0 (S, L), flags``.
    """
    theta = np.ascontiguousarray(theta, dtype=float)
    s2 = np.asarray(s2, dtype=float)
    S, P = np.shape(flux)
    L = len(fiducials)
    starts = np.asarray(starts, dtype=float)
    per_spectrum = starts.ndim == 3
    out = dict(
        labels=np.full((S, L), np.nan),
        cov=np.full((S, L, L), np.nan),
        chi2=np.full(S, np.nan),
        rchi2=np.full(S, np.nan),
        snr=np.full(S, np.nan),
        n_pixels=np.zeros(S, dtype=int),
        ier=np.zeros(S, dtype=int),
        nfev=np.zeros(S, dtype=int),
        start_index=np.full(S, -1),
        x0=np.full((S, L), np.nan),
        flags=np.zeros(S, dtype=np.int64),
    )
    K = theta.shape[1]
    pairs = theta_pairs
    dtype = np.dtype(np.float32 if _single_precision(K) else np.float64)
    basis = monomial_basis_for(vectorizer, P, theta_cov)
    if basis is not None and pairs is not None and pairs.shape[1] != basis.n_monomials:
        basis = None  # the caller's full table of pairs: the K x K path
    if basis is not None and pairs is None:
        pairs = basis.table(theta)
    if pairs is None and P * K * (K + 1) // 2 * dtype.itemsize <= _PAIRS_CACHE_BYTES:
        pairs = _pairs_table(theta, dtype)
    # G (the model-noise correction of the objective) comes from float32 products: it is a
    # correction, so their ~1e-7 relative error is far below what matters.
    theta_cov32 = theta_cov
    if theta_cov is not None and not isinstance(theta_cov, SeparableCovariance):
        theta_cov32 = np.asarray(theta_cov, dtype=np.float32)
    if batch_size is None:
        batch_size = _SMALL_MODEL_BATCH if K < _SINGLE_PRECISION_MIN_TERMS else _LARGE_MODEL_BATCH
    if n_threads is None:
        n_threads = _blas_threads()
    if basis is not None:
        # The polynomial fit reads per-spectrum coefficient stacks every iteration (~230 kB a
        # spectrum at 17 labels): batches that keep them in cache run 25% faster (measured,
        # 100 against 256 spectra).
        # (as many batches per thread for every thread)
        n_batches = max(1, -(-S // min(batch_size, _POLYNOMIAL_BATCH)))
        n_batches = -(-n_batches // n_threads) * n_threads
        batch_size = max(1, -(-S // n_batches))
    if basis is not None and n_threads > 1 and S <= batch_size:
        n_threads = 1  # a single batch: its large products use the BLAS's own threads instead
    # Ranking the shared starting points needs chi2 better than a float32 Q gives.
    exact_grid = (not per_spectrum and not optimise_all and n_optimise < len(starts)
                  and (pairs.dtype == np.float32 if pairs is not None else _single_precision(K)))
    grid_vectors = vectorizer._vector_rows((starts - fiducials) / scales) if exact_grid else None
    stats_kwargs = dict(theta_pairs=pairs, candidates=grid_vectors, merged=basis is not None, theta_cov=theta_cov32)
    batches = [slice(b0, min(S, b0 + batch_size)) for b0 in range(0, S, batch_size)]

    def run_batch(sl, executor=None):
        """Fit the spectra of batch ``sl`` (its statistics built in ``executor``'s threads when
        given); disjoint rows of ``out``."""
        stats = SpectrumStatistics(theta, flux[sl], ivar[sl], s2, executor=executor, **stats_kwargs)
        nb = sl.stop - sl.start
        n_pix = stats.n_pixels
        out["n_pixels"][sl] = n_pix
        out["snr"][sl] = stats.snr
        fl = np.where(n_pix == 0, F.NO_INFORMATION, np.where(n_pix < L + 1, F.FEW_PIXELS, 0)).astype(np.int64)
        # A continuum-normalised spectrum has a mean near 1; raw fluxes (e.g. 1e-17 erg/s/cm2/A
        # units, or counts) would otherwise be "fitted" to nonsense.
        lo, hi = normalised_range
        fl[(fl == 0) & ~((stats.mean_flux > lo) & (stats.mean_flux < hi))] |= F.UNNORMALISED_FLUX
        ok = np.flatnonzero(fl == 0)
        if ok.size:
            cand = starts[sl][ok] if per_spectrum else np.broadcast_to(starts, (ok.size,) + starts.shape)
            C = cand.shape[1]
            xs = (cand - fiducials) / scales  # (n_ok, C, L)
            if basis is not None and stats.grid is None:
                U = basis.values(xs.reshape(-1, L)).reshape(ok.size, C, -1)
                chi_c = np.einsum("scm,sm->sc", U, basis.coefficients(stats.q[ok], stats.c[ok], stats.e[ok]))
            elif per_spectrum:
                V = vectorizer.get_label_vector(xs.reshape(-1, L)).T.reshape(ok.size, C, -1)
                chi_c = np.einsum("sck,sck->sc", V, np.einsum("sij,scj->sci", stats.Qfit[ok], V)) \
                    - 2 * np.einsum("sck,sk->sc", V, stats.c[ok]) + stats.e[ok, None]
            elif stats.grid is not None:
                chi_c = stats.grid[ok]
            else:
                chi_c = stats.chi2_grid(vectorizer.get_label_vector(xs[0]).T)[ok]
            k = C if optimise_all else min(n_optimise, C)
            order = np.argsort(np.where(np.isfinite(chi_c), chi_c, np.inf), axis=1, kind="stable")[:, :k]
            rows = np.repeat(ok, k)
            which = order.reshape(-1)
            x0 = xs[np.repeat(np.arange(ok.size), k), which]
            if basis is not None:
                with _small_matrix_blas():
                    pick, xb, chib, cov, nfev_total, ier_b, dominated = _polynomial_fit(
                        stats, basis, vectorizer, x0, rows, max_iterations)
                single = True
            else:
                pick, xb, chib, cov, nfev_total, ier_b, single, dominated = _fit_with_q(
                    stats, vectorizer, x0, rows, ok, k, max_iterations)
            idx = np.arange(sl.start, sl.stop)[ok]
            out["labels"][idx] = xb * scales + fiducials
            out["cov"][idx] = scales[None, :, None] * cov * scales[None, None, :]
            out["chi2"][idx] = chib
            with np.errstate(divide="ignore", invalid="ignore"):
                out["rchi2"][idx] = chib / (n_pix[ok] - L)
            out["ier"][idx] = ier_b
            out["nfev"][idx] = nfev_total
            out["start_index"][idx] = which[pick]
            out["x0"][idx] = x0[pick] * scales + fiducials
            extra = np.zeros(ok.size, dtype=np.int64)
            extra[~np.all(np.isfinite(cov), axis=(1, 2))] |= F.NONFINITE_COVARIANCE
            extra[(ier_b == 5) | ~np.isfinite(chib)] |= F.OPTIMIZER_FAILED
            extra[dominated] |= F.MODEL_NOISE_DOMINATED
            # A fit that never moved: to the last digit, or on the single-precision path (whose
            # float32 optimum and float64 polish shift even a start at the optimum by ~1e-5 sigma)
            # to within 1e-4 of its uncertainty.
            step = np.abs(xb - x0[pick])
            if single:
                with np.errstate(invalid="ignore"):
                    unmoved = np.all(step <= 1e-4 * np.sqrt(np.diagonal(cov, axis1=1, axis2=2)), axis=1)
            else:
                unmoved = np.all(step <= 1e-10, axis=1)
            extra[unmoved] |= F.AT_INITIAL_GUESS
            fl[ok] |= extra
        out["flags"][sl] = fl
        return nb

    with contextlib.ExitStack() as stack:
        if n_threads > 1 and batches:
            # each thread with a single-threaded BLAS
            stack.enter_context(_blas_limit(1))
            executor = stack.enter_context(concurrent.futures.ThreadPoolExecutor(n_threads))
            if basis is None:
                # The statistics (numpy's elementwise loops and BLAS, which release the
                # interpreter lock) are shared out in chunks; the fit's many small operations
                # hold the lock and run in this thread (fitting one batch while the threads
                # build the next one's statistics gained nothing, measured).
                done = (run_batch(sl, executor) for sl in batches)
            else:
                # The polynomial fit's products are large (and release the lock): batches are
                # independent, threads share them.
                done = executor.map(run_batch, batches)
        else:
            done = map(run_batch, batches)
        for nb in done:
            if progress is not None:
                progress(nb)
    return out
