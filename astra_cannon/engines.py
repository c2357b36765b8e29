"""Batched engines: training for all pixels at once, the test step for all spectra at once.

Both rest on one identity. For a model linear in theta with weights ``w``,
``sum w (A theta - f)^2`` only needs ``A^T W A``, ``A^T W f`` and ``f^T W f``. The symmetric
products ``A^T W A`` for every pixel (training) or ``Theta^T W Theta`` for every spectrum (test)
are a single matrix product with the "Khatri-Rao" table of column pairs ``a_i a_j (i <= j)``,
so the heavy work is one BLAS call per block instead of a Python loop over pixels or spectra.

- Training: per-pixel normal equations, a batched Cholesky/LU solve, the intrinsic scatter
  ``s2`` re-estimated for all pixels (:func:`astra_cannon.fitting.estimate_s2`) and the
  weights refreshed until ``s2`` settles; L1 regularisation by batched ADMM.
- Test: per-spectrum sufficient statistics ``(Q, c, e)`` so that
  ``chi2(x) = v^T Q v - 2 v^T c + e`` with ``v`` the label vector; Levenberg-Marquardt runs
  in the K-dimensional term space for all (spectrum, start) pairs at once. The Gauss-Newton
  matrix ``J^T W J = D^T Q D`` is exact, so the covariance equals leastsq's ``cov_x``.

Nothing here reads files or databases.
"""

from __future__ import annotations

import time

import numpy as np

from . import flags as F
from .fitting import adjusted_ivar, estimate_s2

__all__ = ["khatri_rao_upper", "unpack_symmetric", "train_pixels", "SpectrumStatistics", "label_spectra"]

# Memory budget for one block of the Khatri-Rao product (bytes).
_BLOCK_BYTES = 256 * 2**20


def _upper_indices(K):
    return np.triu_indices(K)


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


def _normal_equations(A, Z, flux, w, pixels):
    """``A^T W A`` (P_b, K, K) and ``A^T W f`` (P_b, K) for the given pixels."""
    K = A.shape[1]
    Wb = w[:, pixels]
    M = unpack_symmetric(Wb.T @ Z, K)
    b = (Wb * flux[:, pixels]).T @ A
    return M, b


def _apply_censoring(M, b, censored):
    """Censored terms get coefficient 0: identity row/column, zero right-hand side."""
    if censored is None or not censored.any():
        return
    p, k = np.nonzero(censored)
    M[p, k, :] = 0.0
    M[p, :, k] = 0.0
    M[p, k, k] = 1.0
    b[p, k] = 0.0


def _admm_l1(M, b, lam, theta0, max_iterations=2000, rtol=1e-7):
    """Minimise ``t^T M t - 2 b^T t + lam * |t[1:]|_1`` for a stack of pixels by ADMM.

    Each pixel gets its own penalty ``rho`` (scaled to its curvature) and a cached inverse
    ``(2M + rho I)^-1``, so an iteration is one batched matrix-vector product.
    """
    P, K = b.shape
    diag_mean = np.einsum("pkk->p", M) / K
    rho = 2.0 * np.maximum(diag_mean, 1e-12)
    lam = np.broadcast_to(lam, (P,)).astype(float)
    Q = np.linalg.inv(2.0 * M + rho[:, None, None] * np.eye(K))
    z = theta0.copy()
    u = np.zeros_like(z)
    active = np.arange(P)
    thresh = (lam / rho)[:, None]
    n_iter = np.zeros(P, dtype=int)
    for it in range(max_iterations):
        a = active
        rhs = 2.0 * b[a] + rho[a, None] * (z[a] - u[a])
        t = np.einsum("pij,pj->pi", Q[a], rhs)
        v = t + u[a]
        z_new = v.copy()
        z_new[:, 1:] = np.sign(v[:, 1:]) * np.maximum(np.abs(v[:, 1:]) - thresh[a], 0.0)
        u[a] = v - z_new
        primal = np.linalg.norm(t - z_new, axis=1)
        dual = rho[a] * np.linalg.norm(z_new - z[a], axis=1)
        z[a] = z_new
        n_iter[a] += 1
        scale = np.maximum(np.linalg.norm(z_new, axis=1), 1e-12)
        done = (primal <= rtol * scale) & (dual <= rtol * rho[a] * scale)
        active = a[~done]
        if active.size == 0:
            break
    return z, n_iter, active


def pixel_objective(M, b, c, theta, lam):
    """``chi2 + lam * |theta[1:]|`` per pixel from the normal equations."""
    chi2 = np.einsum("pi,pij,pj->p", theta, M, theta) - 2 * np.einsum("pi,pi->p", b, theta) + c
    return chi2 + lam * np.abs(theta[:, 1:]).sum(axis=1)


def train_pixels(design_matrix, flux, ivar, regularization=0.0, censored_terms=None, max_iterations=8,
                 s2_rtol=1e-4, fixed_s2=None, progress=None):
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
    s2_rtol : float
        Stop when no pixel's ``s2`` changes by more than this (relative, or 1e-12 absolute).
    fixed_s2 : ndarray of shape (P,), optional
        Fit theta at this scatter and skip the scatter estimate.
    progress : callable, optional
        Called as ``progress(n_pixels_done)`` after each block.

    Returns
    -------
    theta : ndarray, shape (P, K)
    s2 : ndarray, shape (P,)
        ``inf`` for a pixel without enough usable stars (its theta is ``[1, 0, ...]``).
    info : dict
        ``n_iterations`` (alternations), ``dead`` (bool, P), ``objective`` (P),
        ``admm_iterations`` (P), ``admm_unconverged`` (count), ``t_train``.
    """
    t0 = time.perf_counter()
    A = np.ascontiguousarray(design_matrix, dtype=float)
    N, K = A.shape
    P = flux.shape[1]
    lam = np.broadcast_to(np.asarray(regularization if regularization is not None else 0.0, dtype=float), (P,))
    good = ivar > 0
    f = np.where(good, flux, 0.0)
    iv = np.where(good, ivar, 0.0)
    n_free = K - (censored_terms.sum(axis=1) if censored_terms is not None else 0)
    n_free = np.broadcast_to(n_free, (P,))
    dead = good.sum(axis=0) <= n_free

    Z = khatri_rao_upper(A)
    block = max(1, int(_BLOCK_BYTES // (8 * max(Z.shape[1], K * K))))
    theta = np.zeros((P, K))
    theta[:, 0] = 1.0
    s2 = np.zeros(P) if fixed_s2 is None else np.asarray(fixed_s2, dtype=float).copy()
    s2[dead] = np.inf
    objective = np.full(P, np.nan)
    admm_iter = np.zeros(P, dtype=int)
    admm_unconverged = 0
    todo = np.flatnonzero(~dead)
    n_alt = 0
    for n_alt in range(1, max_iterations + 1):
        w = adjusted_ivar(iv, s2[None, :])
        for start in range(0, todo.size, block):
            pix = todo[start : start + block]
            M, b = _normal_equations(A, Z, f, w, pix)
            cens = censored_terms[pix] if censored_terms is not None else None
            _apply_censoring(M, b, cens)
            sol = _solve_spd(M, b)
            reg = lam[pix] > 0
            if reg.any():
                r = np.flatnonzero(reg)
                sol[r], it, left = _admm_l1(M[r], b[r], lam[pix][r], sol[r])
                admm_iter[pix[r]] = it
                admm_unconverged += left.size
            theta[pix] = sol
            c = np.einsum("np,np->p", w[:, pix], f[:, pix] ** 2)
            objective[pix] = pixel_objective(M, b, c, sol, lam[pix])
            if progress is not None:
                progress(pix.size)
        if fixed_s2 is not None:
            break
        residuals = f[:, todo] - A @ theta[todo].T
        new = estimate_s2(residuals**2, iv[:, todo], n_free[todo])
        change = np.abs(new - s2[todo]) > s2_rtol * np.maximum(new, 1e-12 / s2_rtol)
        s2[todo] = new
        todo = todo[change]
        if todo.size == 0:
            break
    theta[dead] = 0.0
    theta[dead, 0] = 1.0
    return theta, s2, {
        "n_iterations": n_alt,
        "dead": dead,
        "objective": objective,
        "admm_iterations": admm_iter,
        "admm_unconverged": int(admm_unconverged),
        "t_train": time.perf_counter() - t0,
    }


def _row_median(values, counts):
    """Median of the first ``counts[i]`` sorted values of each row (unused entries are +inf).

    One vectorised sort instead of ``nanmedian``, which loops over rows in Python.
    """
    srt = np.sort(values, axis=1)
    rows = np.arange(values.shape[0])
    lo = np.clip((counts - 1) // 2, 0, None)
    hi = np.clip(counts // 2, 0, None)
    med = 0.5 * (srt[rows, lo] + srt[rows, hi])
    return np.where(counts > 0, med, np.nan)


class SpectrumStatistics:
    """Per-spectrum sufficient statistics of a trained model.

    ``Q[s] = Theta^T W_s Theta`` (packed), ``c[s] = Theta^T W_s f_s`` and
    ``e[s] = f_s^T W_s f_s``, with ``W_s`` the scatter-adjusted inverse variance.
    """


    def __init__(self, theta, flux, ivar, s2):
        theta = np.asarray(theta, dtype=float)
        P, K = theta.shape
        w = adjusted_ivar(ivar, s2[None, :])
        use = (w > 0) & np.isfinite(flux)
        w = np.where(use, w, 0.0)
        f = np.where(use, flux, 0.0)
        self.K = K
        self.n_pixels = use.sum(axis=1)
        wf = w * f
        self.c = wf @ theta
        self.e = np.einsum("sp,sp->s", wf, f)
        Kt = K * (K + 1) // 2
        # Pixel blocks keep the Khatri-Rao table of theta within the memory budget.
        block = max(1, int(_BLOCK_BYTES // (8 * Kt)))
        Qf = np.zeros((flux.shape[0], Kt))
        for start in range(0, P, block):
            sl = slice(start, start + block)
            Qf += w[:, sl] @ khatri_rao_upper(theta[sl])
        self.Q = unpack_symmetric(Qf, K)
        self.snr = _row_median(np.where(use, f * np.sqrt(w), np.inf), self.n_pixels)

    def chi2(self, v, rows):
        """chi2 of label vectors ``v`` (R, K) against spectra ``rows`` (R,)."""
        Qv = np.einsum("rij,rj->ri", self.Q[rows], v)
        return np.einsum("ri,ri->r", v, Qv) - 2 * np.einsum("ri,ri->r", v, self.c[rows]) + self.e[rows]

    def chi2_grid(self, V):
        """chi2 of every spectrum at every candidate label vector ``V`` (C, K): (S, C)."""
        iu, ju = _upper_indices(self.K)
        weights = np.where(iu == ju, 1.0, 2.0)
        Qf = self.Q[:, iu, ju] * weights
        VV = V[:, iu] * V[:, ju]
        return Qf @ VV.T - 2 * self.c @ V.T + self.e[:, None]


def _levenberg_marquardt(stats, vectorizer, x0, rows, max_iterations=100, ftol=1e-12, xtol=1e-10):
    """Batched Levenberg-Marquardt in scaled label space for (spectrum, start) pairs."""
    R, L = x0.shape
    x = x0.copy()
    lam = np.full(R, 1e-3)
    V = vectorizer.get_label_vector(x).T
    chi = stats.chi2(V, rows)
    nfev = np.ones(R, dtype=int)
    ier = np.zeros(R, dtype=int)
    active = np.arange(R)
    eye = np.eye(L)
    for _ in range(max_iterations):
        if active.size == 0:
            break
        a = active
        ra = rows[a]
        D = vectorizer.get_label_vector_derivative(x[a])  # (R, K, L)
        Q = stats.Q[ra]
        QD = Q @ D
        H = np.transpose(D, (0, 2, 1)) @ QD  # J^T W J
        g = np.einsum("rkl,rk->rl", D, np.einsum("rij,rj->ri", Q, V[a]) - stats.c[ra])
        dH = np.einsum("rll->rl", H)
        A = H + lam[a, None, None] * (dH[:, :, None] * eye + 1e-12 * eye)
        step = -_solve_spd(A, g)
        x_try = x[a] + step
        V_try = vectorizer.get_label_vector(x_try).T
        chi_try = stats.chi2(V_try, ra)
        nfev[a] += 1
        ok = np.isfinite(chi_try) & (chi_try <= chi[a])
        decrease = np.where(ok, chi[a] - chi_try, 0.0)
        acc = a[ok]
        x[acc], V[acc], chi[acc] = x_try[ok], V_try[ok], chi_try[ok]
        lam[a] = np.where(ok, np.maximum(lam[a] * 0.2, 1e-12), lam[a] * 10.0)
        small_f = ok & (decrease <= ftol * np.maximum(chi[a], 1.0))
        small_x = np.linalg.norm(step, axis=1) <= xtol * (1.0 + np.linalg.norm(x[a], axis=1))
        stuck = lam[a] > 1e12
        ier[a] = np.where(small_f, 1, np.where(small_x, 2, np.where(stuck, 4, 0)))
        active = a[ier[a] == 0]
    ier[active] = 5
    return x, chi, nfev, ier


def _covariance(stats, vectorizer, x, rows):
    """``(D^T Q D)^-1`` at the optimum, in scaled label units; NaN where singular."""
    D = vectorizer.get_label_vector_derivative(x)
    H = np.transpose(D, (0, 2, 1)) @ (stats.Q[rows] @ D)
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


def label_spectra(theta, s2, vectorizer, fiducials, scales, flux, ivar, starts, n_optimise=3,
                 optimise_all=False, max_iterations=100, batch_size=256, progress=None):
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
    batch_size : int
        Spectra processed together (bounds memory).
    progress : callable, optional
        Called as ``progress(n_spectra_done)`` after each batch.

    Returns
    -------
    labels : ndarray, shape (S, L)
        Physical labels; NaN for failed spectra.
    cov : ndarray, shape (S, L, L)
        Physical covariance ``S cov_scaled S``.
    info : dict of arrays, shape (S,)
        ``chi2, rchi2, snr, n_pixels, ier, nfev, start_index, x0 (S, L), flags``.
    """
    theta = np.asarray(theta, dtype=float)
    s2 = np.asarray(s2, dtype=float)
    flux = np.asarray(flux, dtype=float)
    ivar = np.asarray(ivar, dtype=float)
    S, P = flux.shape
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
    for b0 in range(0, S, batch_size):
        sl = slice(b0, min(S, b0 + batch_size))
        stats = SpectrumStatistics(theta, flux[sl], ivar[sl], s2)
        nb = sl.stop - sl.start
        n_pix = stats.n_pixels
        out["n_pixels"][sl] = n_pix
        out["snr"][sl] = stats.snr
        fl = np.where(n_pix == 0, F.NO_INFORMATION, np.where(n_pix < L + 1, F.FEW_PIXELS, 0)).astype(np.int64)
        ok = np.flatnonzero(fl == 0)
        if ok.size:
            cand = starts[sl][ok] if per_spectrum else np.broadcast_to(starts, (ok.size,) + starts.shape)
            C = cand.shape[1]
            xs = (cand - fiducials) / scales  # (n_ok, C, L)
            if per_spectrum:
                V = vectorizer.get_label_vector(xs.reshape(-1, L)).T.reshape(ok.size, C, -1)
                chi_c = np.einsum("sck,sck->sc", V, np.einsum("sij,scj->sci", stats.Q[ok], V)) \
                    - 2 * np.einsum("sck,sk->sc", V, stats.c[ok]) + stats.e[ok, None]
            else:
                chi_c = stats.chi2_grid(vectorizer.get_label_vector(xs[0]).T)[ok]
            k = C if optimise_all else min(n_optimise, C)
            order = np.argsort(np.where(np.isfinite(chi_c), chi_c, np.inf), axis=1, kind="stable")[:, :k]
            rows = np.repeat(ok, k)
            which = order.reshape(-1)
            x0 = xs[np.repeat(np.arange(ok.size), k), which]
            x, chi, nfev, ier = _levenberg_marquardt(stats, vectorizer, x0, rows, max_iterations=max_iterations)
            chi_r = np.where(np.isfinite(chi), chi, np.inf).reshape(ok.size, k)
            best = np.argmin(chi_r, axis=1)
            pick = np.arange(ok.size) * k + best
            xb, chib = x[pick], chi[pick]
            cov = _covariance(stats, vectorizer, xb, ok)
            idx = np.arange(sl.start, sl.stop)[ok]
            out["labels"][idx] = xb * scales + fiducials
            out["cov"][idx] = scales[None, :, None] * cov * scales[None, None, :]
            out["chi2"][idx] = chib
            with np.errstate(divide="ignore", invalid="ignore"):
                out["rchi2"][idx] = chib / (n_pix[ok] - L)
            out["ier"][idx] = ier[pick]
            out["nfev"][idx] = nfev.reshape(ok.size, k).sum(axis=1)
            out["start_index"][idx] = which[pick]
            out["x0"][idx] = x0[pick] * scales + fiducials
            extra = np.zeros(ok.size, dtype=np.int64)
            extra[~np.all(np.isfinite(cov), axis=(1, 2))] |= F.NONFINITE_COVARIANCE
            extra[(ier[pick] == 5) | ~np.isfinite(chib)] |= F.OPTIMIZER_FAILED
            extra[np.all(np.abs(xb - x0[pick]) <= 1e-10, axis=1)] |= F.AT_INITIAL_GUESS
            fl[ok] |= extra
        out["flags"][sl] = fl
        if progress is not None:
            progress(nb)
    return out
