"""The test-step objective as an explicit polynomial in the labels.

A spectrum's chi2 at scaled labels ``x`` is ``v^T Q v - 2 c^T v + e`` with ``v = v(x)`` the
label vector. Every product ``v_i v_j`` is a monomial of the labels, and many pairs give the
same one (``x0 * x1x2`` and ``x1 * x0x2``): a 17-label quadratic model has 14706 pairs but only
5985 distinct monomials of degree <= 4. Written over those monomials,

    chi2(x) = sum_m a_m x^m,     a = (pair sums of Q) - 2 c (at the terms) + e (at 1),

so a spectrum's statistics need 2.5x fewer numbers (and products with the pixels), and the
gradient and the exact Hessian are linear maps of ``a`` evaluated at monomials of lower degree.
:class:`MonomialBasis` holds that bookkeeping for a vectorizer. Pure numpy/scipy.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

__all__ = ["MonomialBasis"]


class MonomialBasis:
    """Monomials of the products of a vectorizer's terms, and their derivative maps.

    Parameters
    ----------
    vectorizer : PolynomialVectorizer

    Attributes
    ----------
    exponents : ndarray of int, shape (M, L)
        Every monomial needed, sorted by degree: the distinct products ``v_i v_j``, every
        monomial of degree <= 1 and everything their derivatives reach.
    pair_group, pair_weight : ndarray, shape (K (K + 1) / 2,)
        The monomial of pair ``(i <= j)`` (``numpy.triu_indices`` order) and its weight in
        ``v^T Q v`` (2 off the diagonal).
    term_index : ndarray of int, shape (K,)
        The monomial of each term ``v_k``.
    linear_index : ndarray of int, shape (L,)
        The monomial ``x_a`` of each label. The constant monomial is index 0.
    """

    def __init__(self, vectorizer):
        L, K = vectorizer.n_labels, vectorizer.n_terms
        E = np.zeros((K, L), dtype=np.int64)
        for k, term in enumerate(vectorizer.terms):
            for i, p in term:
                E[k, i] = p
        iu, ju = np.triu_indices(K)
        pairs = E[iu] + E[ju]
        seen = {tuple(r) for r in pairs} | {tuple(r) for r in np.eye(L, dtype=np.int64)} | {(0,) * L}
        # close the set under differentiation (lower one exponent by one)
        frontier = list(seen)
        while frontier:
            new = []
            for m in frontier:
                for a in range(L):
                    if m[a]:
                        low = m[:a] + (m[a] - 1,) + m[a + 1:]
                        if low not in seen:
                            seen.add(low)
                            new.append(low)
            frontier = new
        exps = np.array(sorted(seen, key=lambda m: (sum(m), tuple(-e for e in m))), dtype=np.int64)
        self.exponents = exps
        self.n_labels, self.n_terms = L, K
        index = {tuple(r): i for i, r in enumerate(exps)}
        self.pair_group = np.array([index[tuple(r)] for r in pairs], dtype=np.intp)
        self.pair_weight = np.where(iu == ju, 1.0, 2.0)
        self.term_index = np.array([index[tuple(r)] for r in E], dtype=np.intp)
        self.linear_index = np.array([index[tuple(r)] for r in np.eye(L, dtype=np.int64)], dtype=np.intp)
        degree = exps.sum(axis=1)
        # Each monomial of degree >= 1 is a parent of one degree less times one label: the
        # whole table is evaluated level by level, one vectorised product per degree.
        M = len(exps)
        self._var = np.zeros(M, dtype=np.intp)
        self._parent = np.zeros(M, dtype=np.intp)
        for i in range(1, M):
            a = int(np.flatnonzero(exps[i])[0])
            low = exps[i].copy()
            low[a] -= 1
            self._var[i], self._parent[i] = a, index[tuple(low)]
        self._levels = [np.flatnonzero(degree == d) for d in range(1, int(degree.max()) + 1)]
        # Derivative maps: d/dx_a x^m = m_a x^(m - e_a); d2/dx_a dx_b likewise twice.
        g_rows, g_cols, g_vals = [], [], []
        h_rows, h_cols, h_vals = [], [], []
        d1, d2 = {}, {}
        Lt = L * (L + 1) // 2
        packed = np.zeros((L, L), dtype=np.intp)
        packed[np.triu_indices(L)] = np.arange(Lt)
        for i, m in enumerate(exps):
            for a in np.flatnonzero(m):
                low = m.copy()
                low[a] -= 1
                j = d1.setdefault(index[tuple(low)], len(d1))
                g_rows.append(i), g_cols.append(j * L + a), g_vals.append(float(m[a]))
                for b in np.flatnonzero(low):
                    if b < a:
                        continue  # the upper triangle only: the Hessian is symmetric
                    low2 = low.copy()
                    low2[b] -= 1
                    j2 = d2.setdefault(index[tuple(low2)], len(d2))
                    h_rows.append(i), h_cols.append(j2 * Lt + packed[a, b]), h_vals.append(float(m[a] * low[b]))
        self.grad_monomials = np.array(sorted(d1, key=d1.get), dtype=np.intp)
        self.hess_monomials = np.array(sorted(d2, key=d2.get), dtype=np.intp)
        self._grad_map = scipy.sparse.csr_matrix((g_vals, (g_rows, g_cols)), shape=(M, len(d1) * L))
        self._hess_map = scipy.sparse.csr_matrix((h_vals, (h_rows, h_cols)), shape=(M, max(1, len(d2)) * Lt))

    @property
    def n_monomials(self):
        return len(self.exponents)

    @classmethod
    def applies_to(cls, vectorizer):
        """Whether the terms include every label linearly (the polish corrects along them)."""
        linear = {t[0][0] for t in vectorizer.terms if len(t) == 1 and t[0][1] == 1}
        return len(linear) == vectorizer.n_labels

    def table(self, theta, dtype=np.float32, block=256):
        """``T[p, m] = sum over pairs (i <= j) of monomial m of weight_ij theta_pi theta_pj``.

        ``w @ T`` are the pair sums of ``Theta^T diag(w) Theta`` (the ``a`` of the module's
        docstring without ``c`` and ``e``). Computed in float64 per block of pixels.
        """
        theta = np.asarray(theta, dtype=float)
        P, K = theta.shape
        iu, ju = np.triu_indices(K)
        order = np.argsort(self.pair_group, kind="stable")
        g = self.pair_group[order]
        starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
        out = np.zeros((P, self.n_monomials), dtype=dtype)
        i_o, j_o, w_o = iu[order], ju[order], self.pair_weight[order]
        for p0 in range(0, P, block):
            th = theta[p0:p0 + block]
            prod = th[:, i_o] * th[:, j_o]
            prod *= w_o
            out[p0:p0 + block, g[starts]] = np.add.reduceat(prod, starts, axis=1)
        return out

    def coefficients(self, q, c, e):
        """The objective's coefficients ``a`` (S, M) from pair sums ``q`` (S, M), ``c`` (S, K), ``e`` (S,)."""
        a = np.array(q, dtype=float)
        a[:, self.term_index] -= 2.0 * c  # distinct terms are distinct monomials
        a[:, 0] += e
        return a

    def values(self, x):
        """Every monomial at scaled labels ``x`` (R, L): (R, M).

        One product per degree level; ``np.take`` gathers the parents' columns 3x faster
        than fancy indexing.
        """
        x = np.asarray(x, dtype=float)
        U = np.empty((x.shape[0], self.n_monomials))
        U[:, 0] = 1.0
        for lev in self._levels:
            np.multiply(np.take(U, self._parent[lev], axis=1), np.take(x, self._var[lev], axis=1),
                        out=U[:, lev[0]:lev[-1] + 1])
        return U

    def differences(self, U, x, x_new, exact_degree=2):
        """``values(x_new) - values(x)`` and ``values(x_new)``, for chi2 changes without cancellation.

        Up to ``exact_degree`` level by level, ``x'^m - x^m = (p' - p) x'_a + p (x'_a - x_a)``
        for ``x^m = p x_a``: exact to the rounding of the difference itself. These carry the
        large coefficients of the objective (``Q``'s pair sums nearly cancel ``2 c`` there,
        ~1e5-1e6 at S/N 100); the higher monomials' coefficients are pair sums of the small
        quadratic theta terms, where a plain difference of values loses only ~1e-14 chi2.
        """
        U_new = self.values(x_new)
        dU = U_new - U
        dx = x_new - x
        dU[:, 0] = 0.0
        for lev in self._levels[:exact_degree]:
            par, var = self._parent[lev], self._var[lev]
            dU[:, lev[0]:lev[-1] + 1] = dU[:, par] * x_new[:, var] + U[:, par] * dx[:, var]
        return dU, U_new

    def gradient_coefficients(self, a):
        """(S, G, L): ``grad chi2 = sum_g values[:, grad_monomials[g]] * out[:, g, :]``."""
        return np.asarray((self._grad_map.T @ a.T).T).reshape(len(a), len(self.grad_monomials), self.n_labels)

    def hessian_coefficients(self, a, dtype=np.float64):
        """(S, H, L (L + 1) / 2): ``hess chi2`` (upper triangle, ``numpy.triu_indices`` order) is
        ``sum_h values[:, hess_monomials[h]] * out[:, h, :]``; see :meth:`unpack_hessian`."""
        L = self.n_labels
        H = max(1, len(self.hess_monomials))
        out = np.asarray((self._hess_map.T @ a.T).T).reshape(len(a), H, L * (L + 1) // 2)
        return out.astype(dtype, copy=False)

    def unpack_hessian(self, packed):
        """(R, L (L + 1) / 2) upper triangles -> (R, L, L) symmetric matrices."""
        L = self.n_labels
        iu, ju = np.triu_indices(L)
        out = np.empty((len(packed), L, L), dtype=packed.dtype)
        out[:, iu, ju] = packed
        out[:, ju, iu] = packed
        return out

    def hessian(self, a, x):
        """Hessian (R, L, L) of ``sum_m a[r, m] x^m`` at ``x`` (R, L), one row each."""
        if not len(self.hess_monomials):
            return np.zeros((len(x), self.n_labels, self.n_labels))
        U = self.values(x)
        Hc = self.hessian_coefficients(a)
        return self.unpack_hessian(np.einsum("rh,rhk->rk", U[:, self.hess_monomials], Hc))
