"""Per-label censoring: stop a label from influencing pixels where it has no physical business.

A censored label contributes nothing at a pixel: every term of the label vector that contains
that label (linear, squared and cross terms) has its coefficient fixed at zero there. This is
how abundance labels are kept to their own absorption lines (Casey et al. 2016).

``censors`` maps a label name to either

- a boolean array of shape ``(P,)``: True where the label is **censored** (excluded), or
- a list of wavelength ranges ``[[lo, hi], ...]`` (``None`` for an open end) in which the
  label is censored; this form needs the model's ``dispersion``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["censor_mask", "censored_terms", "censors_to_json"]


def censor_mask(censors, label_names, n_pixels, dispersion=None):
    """Boolean ``(P, L)`` array, True where a label is censored at a pixel.

    Raises
    ------
    ValueError
        Unknown label name, wrong mask length, or wavelength ranges without a dispersion.
    """
    mask = np.zeros((n_pixels, len(label_names)), dtype=bool)
    if not censors:
        return mask
    index = {name: i for i, name in enumerate(label_names)}
    for name, value in dict(censors).items():
        if name not in index:
            raise ValueError(f"censors name unknown label {name!r}; labels are {list(label_names)}")
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
            if dispersion is None:
                raise ValueError(f"censor ranges for {name!r} need the model's dispersion")
            wl = np.asarray(dispersion, dtype=float)
            m = np.zeros(n_pixels, dtype=bool)
            for lo, hi in value:
                lo = -np.inf if lo is None else float(lo)
                hi = np.inf if hi is None else float(hi)
                m |= (wl >= lo) & (wl <= hi)
        else:
            m = np.asarray(value, dtype=bool)
            if m.shape != (n_pixels,):
                raise ValueError(f"censor mask for {name!r} has shape {m.shape}, expected ({n_pixels},)")
        mask[:, index[name]] = m
    return mask


def censored_terms(mask, vectorizer):
    """``(P, K)`` boolean: a term is censored where any of its labels is censored."""
    P = mask.shape[0]
    out = np.zeros((P, vectorizer.n_terms), dtype=bool)
    for k, term in enumerate(vectorizer.terms):
        for i, _ in term:
            out[:, k] |= mask[:, i]
    return out


def censors_to_json(mask, label_names):
    """JSON-safe summary: for each censored label the pixel indices censored."""
    return {name: np.flatnonzero(mask[:, i]).tolist() for i, name in enumerate(label_names) if mask[:, i].any()}
