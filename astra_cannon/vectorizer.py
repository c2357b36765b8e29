"""Label vectors: the polynomial terms a Cannon model is linear in.

A term is a product of labels raised to integer powers, written as a tuple of
``(label_index, power)`` pairs; the constant term is the empty tuple and always comes first.
Labels given to the vectorizer are *scaled* (``(label - fiducial) / scale``); the model handles
the scaling.
"""

from __future__ import annotations

import itertools
import re

import numpy as np

__all__ = ["PolynomialVectorizer", "parse_terms"]


def _all_terms(n_labels, order):
    """Every monomial of total degree 1..order, ordered by degree, then lexicographically."""
    terms = []
    for degree in range(1, order + 1):
        for combo in itertools.combinations_with_replacement(range(n_labels), degree):
            counts = {}
            for i in combo:
                counts[i] = counts.get(i, 0) + 1
            terms.append(tuple(sorted(counts.items())))
    return terms


def parse_terms(text, label_names):
    """Parse a term string such as ``"TEFF + LOGG + TEFF^2 + TEFF*LOGG"``.

    Parameters
    ----------
    text : str
        Terms separated by ``+``; factors by ``*``; powers by ``^``.
    label_names : sequence of str
        The label names the factors refer to.

    Returns
    -------
    list of tuple
        Terms as ``((label_index, power), ...)``, without the constant term.

    Raises
    ------
    ValueError
        For an unknown label, a bad power or a repeated term.
    """
    index = {name: i for i, name in enumerate(label_names)}
    terms = []
    for raw in text.split("+"):
        raw = raw.strip()
        if not raw:
            raise ValueError(f"empty term in {text!r}")
        counts = {}
        for factor in raw.split("*"):
            factor = factor.strip()
            m = re.fullmatch(r"(.+?)(?:\^(\d+))?", factor)
            name, power = m.group(1).strip(), int(m.group(2) or 1)
            if name not in index:
                raise ValueError(f"unknown label {name!r} in term {raw!r}; labels are {list(label_names)}")
            if power < 1:
                raise ValueError(f"power must be >= 1 in term {raw!r}")
            counts[index[name]] = counts.get(index[name], 0) + power
        term = tuple(sorted(counts.items()))
        if term in terms:
            raise ValueError(f"term {raw!r} appears twice")
        terms.append(term)
    return terms


class PolynomialVectorizer:
    """Polynomial label vector of any order.

    Parameters
    ----------
    label_names : sequence of str
        Names of the labels, in the order label arrays use.
    order : int, optional
        Include every monomial up to this total degree (2 is the classic quadratic Cannon).
    terms : str or sequence, optional
        Explicit terms instead of ``order``: a string like ``"TEFF + LOGG + TEFF^2"`` or a list
        of ``((label_index, power), ...)`` tuples. The constant term is always added first.

    Notes
    -----
    ``get_label_vector`` returns shape ``(K, N)`` (K terms including the constant), the
    orientation AnniesLasso used; the design matrix for training is its transpose.
    """

    def __init__(self, label_names, order=None, terms=None):
        self.label_names = tuple(str(n) for n in label_names)
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"label names repeat: {self.label_names}")
        if not self.label_names:
            raise ValueError("at least one label is needed")
        if (order is None) == (terms is None):
            raise ValueError("give exactly one of order or terms")
        if terms is None:
            order = int(order)
            if order < 1:
                raise ValueError("order must be >= 1")
            terms = _all_terms(len(self.label_names), order)
        elif isinstance(terms, str):
            terms = parse_terms(terms, self.label_names)
        else:
            terms = [tuple(sorted((int(i), int(p)) for i, p in t)) for t in terms]
        self.terms = [()] + [t for t in terms if t]
        self.order = max(sum(p for _, p in t) for t in self.terms)
        self._max_power = np.zeros(len(self.label_names), dtype=int)
        for t in self.terms:
            for i, p in t:
                self._max_power[i] = max(self._max_power[i], p)
        # Each term as `order` slots indexing [1, x_0, ..., x_{L-1}]: x_i^2 * x_j -> (i+1, i+1, j+1),
        # so the label vector is a product of `order` gathers (no loop over terms).
        slots = np.zeros((len(self.terms), self.order), dtype=np.intp)
        for k, t in enumerate(self.terms):
            flat = [i + 1 for i, p in t for _ in range(p)]
            slots[k, : len(flat)] = flat
        self._slots = slots
        # The derivative of a term is a constant times another monomial; when that monomial is
        # itself a term (always, for full polynomials) the Jacobian is one gather of the vector.
        index = {t: k for k, t in enumerate(self.terms)}
        deriv_index = np.zeros((len(self.terms), len(self.label_names)), dtype=np.intp)
        deriv_coef = np.zeros((len(self.terms), len(self.label_names)))
        closed = True
        for k, t in enumerate(self.terms):
            for i, p in t:
                lower = tuple((j, q - 1 if j == i else q) for j, q in t if not (j == i and q == 1))
                if lower not in index:
                    closed = False
                    continue
                deriv_index[k, i] = index[lower]
                deriv_coef[k, i] = p
        self._deriv = (deriv_index, deriv_coef) if closed else None

    @property
    def n_labels(self):
        return len(self.label_names)

    @property
    def n_terms(self):
        """Number of terms K, including the constant."""
        return len(self.terms)

    @property
    def human_readable_label_terms(self):
        """Term names such as ``["1", "TEFF", "LOGG", "TEFF^2", "LOGG*TEFF"]``."""
        out = []
        for t in self.terms:
            if not t:
                out.append("1")
                continue
            out.append("*".join(self.label_names[i] + (f"^{p}" if p > 1 else "") for i, p in t))
        return out

    def get_human_readable_label_vector(self):
        """The label vector as one string: ``"1 + TEFF + LOGG + TEFF^2"``."""
        return " + ".join(self.human_readable_label_terms)

    def __repr__(self):
        return f"<PolynomialVectorizer {self.get_human_readable_label_vector()}>"

    def __eq__(self, other):
        return isinstance(other, PolynomialVectorizer) and (self.label_names, self.terms) == (
            other.label_names,
            other.terms,
        )

    def _powers(self, x):
        """powers[i][p] = x[:, i]**p for p up to the largest power label i takes."""
        return [
            [np.ones(x.shape[0])] + [x[:, i] ** p for p in range(1, self._max_power[i] + 1)]
            for i in range(x.shape[1])
        ]

    def _as_2d(self, scaled_labels):
        x = np.asarray(scaled_labels, dtype=float)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.n_labels:
            raise ValueError(f"labels must have shape (N, {self.n_labels}), got {np.shape(scaled_labels)}")
        return x

    def get_label_vector(self, scaled_labels):
        """Evaluate every term.

        Parameters
        ----------
        scaled_labels : array_like, shape (N, L) or (L,)
            Scaled labels.

        Returns
        -------
        ndarray, shape (K, N)
            The label vector of each star (first row is 1).
        """
        return self._vector_rows(self._as_2d(scaled_labels)).T

    def _vector_rows(self, x):
        """Label vectors as rows, shape (N, K)."""
        ext = np.empty((x.shape[0], x.shape[1] + 1))
        ext[:, 0] = 1.0
        ext[:, 1:] = x
        out = ext[:, self._slots[:, 0]]
        for j in range(1, self._slots.shape[1]):
            out *= ext[:, self._slots[:, j]]
        return out

    def get_label_vector_derivative(self, scaled_labels):
        """Analytic derivative of every term with respect to every scaled label.

        Parameters
        ----------
        scaled_labels : array_like, shape (L,) or (N, L)

        Returns
        -------
        ndarray, shape (K, L) for one star or (N, K, L) for many
        """
        single = np.ndim(scaled_labels) == 1
        out = self._derivative_rows(self._as_2d(scaled_labels))
        return out[0] if single else out

    def _derivative_rows(self, x, V=None, transposed=False):
        """Derivatives (N, K, L) at scaled labels ``x`` (N, L), or (N, L, K) when ``transposed``.

        ``V``: the label vectors at ``x``, when known.
        """
        if self._deriv is not None:
            idx, coef = self._deriv
            V = self._vector_rows(x) if V is None else V
            return V[:, idx.T] * coef.T if transposed else V[:, idx] * coef
        out = self._derivative_loop(x)
        return np.ascontiguousarray(np.transpose(out, (0, 2, 1))) if transposed else out

    def _derivative_loop(self, x):
        """Derivatives (N, K, L) term by term, for term sets not closed under differentiation."""
        pw = self._powers(x)
        n = x.shape[0]
        out = np.zeros((n, self.n_terms, self.n_labels))
        for k, t in enumerate(self.terms):
            for j, (i, p) in enumerate(t):
                # d/dx_i of x_i^p * rest = p x_i^(p-1) * rest
                v = p * pw[i][p - 1]
                for jj, (ii, pp) in enumerate(t):
                    if jj != j:
                        v = v * pw[ii][pp]
                out[:, k, i] = v
        return out

    def to_dict(self):
        """JSON-safe description, inverse of :meth:`from_dict`."""
        return {
            "class": "PolynomialVectorizer",
            "label_names": list(self.label_names),
            "terms": [[list(f) for f in t] for t in self.terms[1:]],
        }

    @classmethod
    def from_dict(cls, d):
        if d.get("class") != "PolynomialVectorizer":
            raise ValueError(f"unknown vectorizer class {d.get('class')!r}")
        return cls(d["label_names"], terms=[tuple(tuple(f) for f in t) for t in d["terms"]])
