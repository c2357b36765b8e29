"""The test-step objective as an explicit polynomial in the labels.

A spectrum's chi2 at scaled labels ``x`` is ``v^T Q v - 2 c^T v + e`` with ``v = v(x)`` the
label vector. Every product ``v_i v_j`` is a monomial of the labels, and many pairs give the
same one (``x0 * x1x2`` and ``x1 * x0x2``): a 17-label quadratic model has 14706 pairs but only
5985 distinct monomials of degree <= 4. Written over those monomials,

    chi2(x) = sum_m a_m x^m,     a = (pair sums of Q) - 2 c (at the terms) + e (at 1),

so a spectrum's statistics need 2.5x fewer numbers (and products with the pixels), and the
gradient and the exact Hessian are linear maps of ``a`` evaluated at monomials of lower degree.
:class:`MonomialBasis` holds that bookkeeping for a vectorizer. Pure numpy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MonomialBasis", "pair_products"]


def pair_products(X, dtype=np.float64):
    """Row-wise products of column pairs ``X[:, i] * X[:, j]`` (i <= j, ``numpy.triu_indices``
    order), written term by term into one output array.

    Fancy indexing would first materialise two gathered copies of the table, which costs
    several times the products for a large one (1 GB at 17 labels and 8575 pixels).
    """
    N, K = X.shape
    out = np.empty((N, K * (K + 1) // 2), dtype=dtype)
    start = 0
    for i in range(K):
        np.multiply(X[:, i : i + 1], X[:, i:], out=out[:, start : start + K - i])
        start += K - i
    return out


def _unique_rows(rows):
    """Distinct exponent rows. As integer keys (mixed radix) where they fit in 63 bits: sorting
    rows as records is ~20x slower."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    base = int(rows.max()) + 1 if rows.size else 1
    L = rows.shape[1]
    if L * np.log2(max(base, 2)) >= 62:
        return np.unique(rows, axis=0)
    weights = base ** np.arange(L, dtype=np.int64)
    keys = np.unique(rows @ weights)
    return (keys[:, None] // weights) % base


class _RowIndex:
    """Position of each exponent row in a table of distinct rows (exact match, vectorised)."""

    def __init__(self, table):
        self._keys = np.ascontiguousarray(table, dtype=np.int64).view(np.dtype((np.void, 8 * table.shape[1])))[:, 0]
        self._order = np.argsort(self._keys)
        self._sorted = self._keys[self._order]

    def __call__(self, rows):
        keys = np.ascontiguousarray(rows, dtype=np.int64).view(self._keys.dtype)[:, 0]
        pos = np.searchsorted(self._sorted, keys)
        pos = np.minimum(pos, len(self._sorted) - 1)
        if not np.all(self._sorted[pos] == keys):
            raise KeyError("monomial not in the table")
        return self._order[pos].astype(np.intp)


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
        eye = np.eye(L, dtype=np.int64)
        # The pair products, every monomial of degree <= 1, closed under differentiation
        # (lowering one exponent by one), as arrays: no Python loop over monomials.
        exps = _unique_rows(np.vstack([pairs, eye, np.zeros((1, L), dtype=np.int64)]))
        while True:
            lowered = np.vstack([exps[exps[:, a] > 0] - eye[a] for a in range(L)])
            grown = _unique_rows(np.vstack([exps, lowered]))
            if len(grown) == len(exps):
                break
            exps = grown
        degree = exps.sum(axis=1)
        order = np.lexsort(tuple(-exps[:, a] for a in range(L - 1, -1, -1)) + (degree,))
        exps = exps[order]
        self.exponents = exps
        self.n_labels, self.n_terms = L, K
        index = _RowIndex(exps)
        self.pair_group = index(pairs)
        self.pair_weight = np.where(iu == ju, 1.0, 2.0)
        self.term_index = index(E)
        self.linear_index = index(eye)
        degree = exps.sum(axis=1)
        # Each monomial of degree >= 1 is a parent of one degree less times one label: the
        # whole table is evaluated level by level, one vectorised product per degree.
        M = len(exps)
        self._var = np.argmax(exps > 0, axis=1)
        self._var[0] = 0
        self._parent = np.zeros(M, dtype=np.intp)
        self._parent[1:] = index(exps[1:] - eye[self._var[1:]])
        self._levels = [np.flatnonzero(degree == d) for d in range(1, int(degree.max()) + 1)]
        # The monomials up to the terms' own degree carry the objective's large coefficients
        # (the pair sums of Q nearly cancel 2 c there), and for a linear model the degree-2
        # ones hold its Fisher matrix: a leading block of the graded table.
        self._exact_levels = min(len(self._levels), max(2, int(E.sum(axis=1).max())))
        self._exact_stop = int(np.count_nonzero(degree <= self._exact_levels))
        self._runs = _contiguous_runs(self._parent, self._var)
        # Derivative maps: d/dx_a x^m = m_a x^(m - e_a); d2/dx_a dx_b likewise twice (upper
        # triangle a <= b only: the Hessian is symmetric).
        Lt = L * (L + 1) // 2
        g_rows, g_low, g_var, g_vals = [], [], [], []
        h_rows, h_low, h_pair, h_vals = [], [], [], []
        pair = 0
        for a in range(L):
            rows = np.flatnonzero(exps[:, a] > 0)
            low = exps[rows] - eye[a]
            g_rows.append(rows), g_low.append(index(low)), g_var.append(np.full(rows.size, a))
            g_vals.append(exps[rows, a].astype(float))
            for b in range(a, L):
                ok = low[:, b] > 0
                h_rows.append(rows[ok]), h_low.append(index(low[ok] - eye[b]))
                h_pair.append(np.full(ok.sum(), pair)), h_vals.append((exps[rows[ok], a] * low[ok, b]).astype(float))
                pair += 1
        g_low, h_low = np.concatenate(g_low), np.concatenate(h_low)
        self.grad_monomials, g_slot = np.unique(g_low, return_inverse=True)
        self.hess_monomials, h_slot = np.unique(h_low, return_inverse=True)
        # Each derivative coefficient comes from exactly one monomial (slot g along label a is
        # x^(g + e_a)): a gather with an integer factor, laid out C-ordered per spectrum.
        # Columns without a monomial read column 0 with factor 0.
        self._grad_map = _gather_map(np.concatenate(g_rows), g_slot * L + np.concatenate(g_var),
                                     np.concatenate(g_vals), len(self.grad_monomials) * L)
        self._hess_map = _gather_map(np.concatenate(h_rows), h_slot * Lt + np.concatenate(h_pair),
                                     np.concatenate(h_vals), max(1, len(self.hess_monomials)) * Lt)
        # The part of that map whose source is a term of the label vector, for
        # term_hessian: (term, Hessian monomial slot, factor) per entry and the entries' pairs.
        src, fac = self._hess_map
        term_of = np.full(M, -1)
        term_of[self.term_index] = np.arange(K)
        entries = np.flatnonzero((fac != 0) & (term_of[src] >= 0))
        self._term_hess = (term_of[src[entries]], entries // Lt, fac[entries],
                           np.eye(Lt)[entries % Lt] if entries.size else np.zeros((0, Lt)))

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
        return self._merged(theta.shape[0], lambda sl: pair_products(theta[sl]), dtype, block)

    def merge(self, packed, dtype=np.float32, block=256):
        """Pair sums of packed symmetric matrices, one per pixel: ``packed`` (P, K (K + 1) / 2)
        (``numpy.triu_indices`` order, e.g. the theta covariance ``Cov(theta_p)``) to (P, M)
        with ``v^T C_p v = sum_m out[p, m] x^m``. Summed in float64 per block of pixels."""
        packed = np.asarray(packed)
        Kt = self.n_terms * (self.n_terms + 1) // 2
        if packed.ndim != 2 or packed.shape[1] != Kt:
            raise ValueError(f"packed matrices must have shape (P, {Kt}), not {packed.shape}")
        return self._merged(packed.shape[0], lambda sl: np.asarray(packed[sl], dtype=float), dtype, block)

    def _merged(self, P, pair_block, dtype, block):
        # pairs sorted by monomial, each group summed with one reduceat
        order = np.argsort(self.pair_group, kind="stable")
        group = self.pair_group[order]
        starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
        weight = self.pair_weight[order]
        out = np.zeros((P, self.n_monomials), dtype=dtype)
        for p0 in range(0, P, block):
            products = np.take(pair_block(slice(p0, p0 + block)), order, axis=1)
            products *= weight
            out[p0:p0 + block, group[starts]] = np.add.reduceat(products, starts, axis=1)
        return out

    def coefficients(self, q, c, e):
        """The objective's coefficients ``a`` (S, M) from pair sums ``q`` (S, M), ``c`` (S, K), ``e`` (S,)."""
        a = np.array(q, dtype=float)
        a[:, self.term_index] -= 2.0 * c  # distinct terms are distinct monomials
        a[:, 0] += e
        return a

    def values(self, x, out=None, upto=None):
        """Every monomial at scaled labels ``x`` (R, L): (R, M), written into ``out`` if given;
        with ``upto``, only the first ``upto`` columns (R, upto) (the table is graded, so e.g. the
        derivatives' monomials of lower degree are a leading block).

        One product per run of the table (see :func:`_contiguous_runs`), else per degree
        level with ``np.take`` (3x faster than fancy indexing).
        """
        x = np.asarray(x, dtype=float)
        n = self.n_monomials
        if upto is not None and self._runs is not None:
            # the runs up to the one that covers column upto - 1
            n = next((stop for _, stop, _, _ in self._runs if stop >= upto), n)
        U = np.empty((x.shape[0], n)) if out is None else out
        U[:, 0] = 1.0
        if self._runs is not None:
            for start, stop, p_start, var in self._runs:
                if start >= n:
                    break
                np.multiply(U[:, p_start:p_start + stop - start], x[:, var:var + 1], out=U[:, start:stop])
        else:
            for lev in self._levels:
                np.multiply(np.take(U, self._parent[lev], axis=1), np.take(x, self._var[lev], axis=1),
                            out=U[:, lev[0]:lev[-1] + 1])
        return U if upto is None else U[:, :upto]

    def high_part(self, a, U):
        """``sum_m a[r, m] U[r, m]`` over the monomials above the terms' degree (R,): the part
        of the objective :meth:`change` takes as a plain difference."""
        n = self._exact_stop
        return np.einsum("rm,rm->r", a[:, n:], U[:, n:])

    def change(self, a, U, high, x, x_new, out=None):
        """The objective's change ``sum_m a[r, m] (x_new^m - x^m)`` from ``x`` to ``x_new`` (R, L),
        free of cancellation, with ``U = values(x)`` and ``high = high_part(a, U)``.

        Up to the terms' degree (at least 2), level by level,
        ``x'^m - x^m = (p' - p) x'_a + p (x'_a - x_a)`` for ``x^m = p x_a``: exact to the rounding
        of the difference itself. These monomials
        carry the large coefficients (``Q``'s pair sums nearly cancel ``2 c`` there, ~1e5-1e6
        at S/N 100). Above, the coefficients are pair sums of the small higher-order theta
        terms, and the difference of the two sums loses only ~1e-14 chi2: no table of
        differences is written for them (one pass over the table fewer per step).

        Returns
        -------
        change : ndarray, shape (R,)
        U_new : ndarray, shape (R, M)
            ``values(x_new)``, written into ``out`` if given (a fit's iterations reuse it:
            fresh arrays of this size cost the kernel's zeroing of their pages each time).
        high_new : ndarray, shape (R,)
            ``high_part(a, U_new)``.
        """
        U_new = self.values(x_new, out=out)
        n = self._exact_stop
        dU = np.empty((len(U), n))
        dU[:, 0] = 0.0
        dx = x_new - x
        for lev in self._levels[:self._exact_levels]:
            par, var = self._parent[lev], self._var[lev]
            dU[:, lev[0]:lev[-1] + 1] = dU[:, par] * x_new[:, var] + U[:, par] * dx[:, var]
        high_new = self.high_part(a, U_new)
        return np.einsum("rm,rm->r", a[:, :n], dU) + (high_new - high), U_new, high_new

    def gradient_coefficients(self, a, dtype=np.float64, out=None):
        """(S, G, L), C-ordered: ``grad chi2 = sum_g values[:, grad_monomials[g]] * out[:, g, :]``;
        written into ``out`` (C-ordered, of that shape and ``dtype``) if given."""
        return _stack(self._grad_map, a, len(self.grad_monomials), self.n_labels, dtype, out)

    def gradient(self, a, x, coefficients=None):
        """Gradient (R, L) of ``sum_m a[r, m] x^m`` at ``x`` (R, L), one row each; or from
        ``coefficients = gradient_coefficients(a)`` when they are at hand."""
        Gc = self.gradient_coefficients(a) if coefficients is None else coefficients
        return np.einsum("rgl,rg->rl", Gc, self.values_at(x, self.grad_monomials))

    def hessian_coefficients(self, a, dtype=np.float64, out=None):
        """(S, H, L (L + 1) / 2): ``hess chi2`` (upper triangle, ``numpy.triu_indices`` order) is
        ``sum_h values[:, hess_monomials[h]] * out[:, h, :]``; see :meth:`unpack_hessian`.
        Written into ``out`` if given, as :meth:`gradient_coefficients`."""
        L = self.n_labels
        return _stack(self._hess_map, a, max(1, len(self.hess_monomials)), L * (L + 1) // 2, dtype, out)

    def unpack_hessian(self, packed):
        """(R, L (L + 1) / 2) upper triangles -> (R, L, L) symmetric matrices."""
        L = self.n_labels
        iu, ju = np.triu_indices(L)
        out = np.empty((len(packed), L, L), dtype=packed.dtype)
        out[:, iu, ju] = packed
        out[:, ju, iu] = packed
        return out

    def hessian(self, a, x, coefficients=None):
        """Hessian (R, L, L) of ``sum_m a[r, m] x^m`` at ``x`` (R, L), one row each; or from
        ``coefficients = hessian_coefficients(a)`` when they are at hand (``a`` is then unused)."""
        if not len(self.hess_monomials):
            return np.zeros((len(x), self.n_labels, self.n_labels))
        Hc = self.hessian_coefficients(a) if coefficients is None else coefficients
        return self.unpack_hessian(np.einsum("rh,rhk->rk", self.values_at(x, self.hess_monomials), Hc))

    def term_hessian(self, u, x):
        """Hessian (R, L, L) of ``sum_k u[r, k] v_k(x)`` (``v`` the label vector, ``u`` (R, K)):
        ``hessian`` of those coefficients, reading only the few entries the terms feed."""
        k, h, fac, to_pair = self._term_hess
        if not k.size:
            return np.zeros((len(x), self.n_labels, self.n_labels))
        U = self.values_at(x, self.hess_monomials)
        return self.unpack_hessian((u[:, k] * fac * U[:, h]) @ to_pair)

    def values_at(self, x, monomials):
        """``values(x)[:, monomials]``, computing only the leading block when that is what they are."""
        n = len(monomials)
        if n and np.array_equal(monomials, np.arange(n)):
            return self.values(x, upto=n)
        return self.values(x)[:, monomials]


def _contiguous_runs(parent, var):
    """The monomial table as runs ``(start, stop, parent_start, var)``: monomials
    ``start:stop`` are ``x_var`` times monomials ``parent_start:parent_start + stop - start``.

    In graded order with the highest powers of the first labels first, the monomials of one
    degree whose first label is ``a`` are one run, and their parents (one power of ``a``
    less) are the tail of the degree below, in the same order: each run is then one
    product of slices instead of two gathers (the table is rebuilt every iteration of the
    fit). None if the order does not have that form.
    """
    M = len(parent)
    runs, start = [], 1
    while start < M:
        stop = start + 1
        while stop < M and var[stop] == var[start] and parent[stop] == parent[stop - 1] + 1:
            stop += 1
        runs.append((start, stop, int(parent[start]), int(var[start])))
        start = stop
    # evaluated in order: each run's parents must be complete before it
    if any(p + (b - a) > a for a, b, p, _ in runs):
        return None
    return runs


def _gather_map(sources, columns, factors, n_columns):
    """(source index, factor) of every output column (each has at most one source)."""
    src = np.zeros(n_columns, dtype=np.intp)
    fac = np.zeros(n_columns)
    src[columns], fac[columns] = sources, factors
    return src, fac


def _stack(gather_map, a, rows, cols, dtype, out=None):
    """``a[:, src] * factor`` as a C-ordered (S, rows, cols) stack of per-spectrum matrices
    (numpy's stacked ``matmul`` hands C-ordered matrices to BLAS; other layouts run ~5x slower
    on every product that reads the stack, one per Levenberg-Marquardt iteration)."""
    src, fac = gather_map
    flat = None if out is None else out.reshape(len(a), rows * cols)
    # gathered in the output's precision (factors are small integers, exact in float32);
    # np.take writes straight into ``out`` only with a mode other than "raise"
    flat = np.take(np.asarray(a, dtype=dtype), src, axis=1, out=flat, mode="clip")
    flat *= fac.astype(dtype)
    return flat.reshape(len(a), rows, cols)
