"""Pseudo-continuum normalisation, vectorised over spectra (numpy only).

For each detector chip, a smooth function is fitted by weighted linear least squares to the
*continuum pixels* of every spectrum at once (one batched solve per chip, no loop over
spectra); the flux is divided by it and the inverse variance propagated as
``ivar * continuum**2``.

Bases (``basis=``):

- ``"sinusoid"`` (default; Casey et al. 2016 style): ``1, sin(2 pi k lambda / L),
  cos(2 pi k lambda / L)`` for ``k = 1..order``, with length scale ``L`` in Angstrom
  (default ``order=3``, ``L=1400``), i.e. ``2*order + 1`` terms per chip.
- ``"chebyshev"``: Chebyshev polynomials ``T_0..T_order`` of the wavelength mapped to [-1, 1]
  across the chip.

Where the continuum is not finite or <= 0, or the chip had too few continuum pixels with
ivar > 0 (``min_pixels``, default ``2 * n_terms``), the pixels get ivar 0 and flux
``fill_value``; nothing warns. Continuum pixels come from a mask (e.g.
:func:`astra_cannon.io.grid.load_continuum_mask`) or from a trained model with
:func:`continuum_pixels_from_model`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from . import flags as F
from .io import grid as _grid

BASES = ("sinusoid", "chebyshev")
DEFAULT_ORDER = 3
DEFAULT_LENGTH_SCALE = 1400.0


def design_matrix(wavelength, basis="sinusoid", order=DEFAULT_ORDER, length_scale=DEFAULT_LENGTH_SCALE,
                  domain=None):
    """Basis functions evaluated at ``wavelength``.

    Parameters
    ----------
    wavelength : array_like, shape (P,)
        Angstrom.
    basis : {"sinusoid", "chebyshev"}
    order : int
        Highest harmonic (sinusoid) or polynomial degree (chebyshev); >= 0.
    length_scale : float
        Sinusoid length scale L in Angstrom.
    domain : (float, float), optional
        Chebyshev: the wavelengths mapped to -1 and +1 (default: min and max of ``wavelength``).

    Returns
    -------
    ndarray, shape (P, M)
        ``M = 2*order + 1`` (sinusoid) or ``order + 1`` (chebyshev).
    """
    wl = np.asarray(wavelength, dtype=np.float64)
    order = int(order)
    if order < 0:
        raise ValueError(f"order must be >= 0, got {order}")
    if basis == "sinusoid":
        if not length_scale > 0:
            raise ValueError(f"length_scale must be positive, got {length_scale}")
        k = np.arange(1, order + 1, dtype=np.float64)
        phase = 2.0 * np.pi * wl[:, None] * k[None, :] / float(length_scale)
        cols = [np.ones((wl.size, 1))]
        for j in range(order):  # interleave sin/cos per harmonic for a stable column order
            cols += [np.sin(phase[:, j:j + 1]), np.cos(phase[:, j:j + 1])]
        return np.hstack(cols)
    if basis == "chebyshev":
        lo, hi = (float(np.min(wl)), float(np.max(wl))) if domain is None else map(float, domain)
        x = np.zeros_like(wl) if hi == lo else (2.0 * wl - (lo + hi)) / (hi - lo)
        return np.polynomial.chebyshev.chebvander(x, order)
    raise ValueError(f"unknown basis {basis!r}; expected one of {BASES}")


def _as_mask(continuum_mask, n_pixels):
    mask = np.asarray(continuum_mask)
    if mask.dtype == bool:
        if mask.shape != (n_pixels,):
            raise ValueError(f"continuum mask has shape {mask.shape}, spectra have {n_pixels} pixels")
        return mask
    idx = mask.astype(np.int64).ravel()
    if np.any(idx < 0) or np.any(idx >= n_pixels):
        raise ValueError("continuum pixel indices out of range")
    out = np.zeros(n_pixels, dtype=bool)
    out[idx] = True
    return out


def _default_chips(n_pixels):
    try:
        return _grid.chip_slices(n_pixels)
    except ValueError:
        return ((0, n_pixels),)


@dataclass
class ContinuumResult:
    """Output of :func:`normalise`.

    Attributes
    ----------
    flux, ivar : ndarray, shape (S, P)
        Normalised flux and propagated inverse variance (0 where masked).
    continuum : ndarray, shape (S, P)
        The fitted continuum (NaN where no fit).
    chips : tuple of (int, int)
        Pixel ranges fitted independently.
    chip_ok : ndarray of bool, shape (S, n_chips)
        False where a chip had too few continuum pixels (that chip is masked).
    n_continuum_pixels : ndarray of int, shape (S, n_chips)
        Continuum pixels with ivar > 0 used per chip.
    """

    flux: np.ndarray
    ivar: np.ndarray
    continuum: np.ndarray
    chips: tuple
    chip_ok: np.ndarray
    n_continuum_pixels: np.ndarray


def fit_continuum(flux, ivar, wavelength, continuum_mask, *, chips=None, basis="sinusoid",
                  order=DEFAULT_ORDER, length_scale=DEFAULT_LENGTH_SCALE, min_pixels=None):
    """Fit the pseudo-continuum of every spectrum, chip by chip.

    Parameters
    ----------
    flux, ivar : array_like, shape (S, P) or (P,)
        Unnormalised flux and inverse variance. Non-finite flux or ivar, or ivar <= 0, gives a
        pixel no weight.
    wavelength : array_like, shape (P,)
    continuum_mask : array_like of bool, shape (P,), or integer indices
        The continuum pixels.
    chips : sequence of (start, stop), optional
        Pixel ranges fitted independently; default: the three APOGEE chips for 8575, 7214 or
        7514 pixels, else the whole spectrum.
    basis, order, length_scale
        See :func:`design_matrix`.
    min_pixels : int, optional
        Fewest weighted continuum pixels for a chip fit (default ``2 * n_terms``).

    Returns
    -------
    continuum : ndarray, shape (S, P)
        NaN in failed chips and outside every chip.
    chip_ok : ndarray of bool, shape (S, n_chips)
    n_used : ndarray of int, shape (S, n_chips)
    chips : tuple of (int, int)
    """
    flux = np.atleast_2d(np.asarray(flux, dtype=np.float64))
    ivar = np.atleast_2d(np.asarray(ivar, dtype=np.float64))
    wl = np.asarray(wavelength, dtype=np.float64)
    s, p = flux.shape
    if ivar.shape != flux.shape or wl.shape != (p,):
        raise ValueError(f"flux {flux.shape}, ivar {ivar.shape} and wavelength {wl.shape} do not match")
    cmask = _as_mask(continuum_mask, p)
    chips = tuple((int(a), int(b)) for a, b in (_default_chips(p) if chips is None else chips))

    usable = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
    weight = np.where(usable & cmask[None, :], ivar, 0.0)
    y = np.where(usable, flux, 0.0)

    continuum = np.full((s, p), np.nan)
    chip_ok = np.zeros((s, len(chips)), dtype=bool)
    n_used = np.zeros((s, len(chips)), dtype=np.int64)
    for c, (a, b) in enumerate(chips):  # a loop over 3 chips, vectorised over spectra
        chip_wl = wl[a:b]
        full = design_matrix(chip_wl, basis, order, length_scale, domain=(chip_wl.min(), chip_wl.max()))
        m = full.shape[1]
        need = 2 * m if min_pixels is None else int(min_pixels)
        cols = np.flatnonzero(cmask[a:b])
        A = full[cols]                                   # (Pc, M), continuum pixels only
        W = weight[:, a:b][:, cols]                      # (S, Pc)
        Y = y[:, a:b][:, cols]
        n_used[:, c] = np.count_nonzero(W > 0, axis=1)
        # Scale each spectrum's weights to max 1 so tiny or huge ivars cannot over/underflow.
        wmax = W.max(axis=1, initial=0.0)
        W = W / np.where(wmax > 0, wmax, 1.0)[:, None]
        ata = np.matmul((W[:, :, None] * A[None, :, :]).transpose(0, 2, 1), A)  # (S, M, M), BLAS
        atb = (W * Y) @ A
        ok = n_used[:, c] >= max(need, m)
        # A tiny ridge keeps the batched solve from raising on a near-singular spectrum.
        tr = np.trace(ata, axis1=1, axis2=2)
        ata = ata + (1e-12 * np.where(tr > 0, tr, 1.0) / m)[:, None, None] * np.eye(m)
        ata[~ok] = np.eye(m)
        atb[~ok] = 0.0
        coeffs = np.linalg.solve(ata, atb[..., None])[..., 0]
        cont = coeffs @ full.T
        ok &= np.all(np.isfinite(coeffs), axis=1)
        cont[~ok] = np.nan
        continuum[:, a:b] = cont
        chip_ok[:, c] = ok
    return continuum, chip_ok, n_used, chips


def normalise(flux, ivar, wavelength, continuum_mask, *, fill_value=1.0, **fit_kwargs):
    """Continuum-normalise a batch of spectra.

    Parameters
    ----------
    flux, ivar : array_like, shape (S, P) or (P,)
    wavelength : array_like, shape (P,)
    continuum_mask : array_like
        Boolean (P,) or pixel indices of the continuum pixels.
    fill_value : float
        Flux put where the normalised flux is undefined (continuum <= 0 or NaN, or non-finite
        input); those pixels always get ivar 0.
    **fit_kwargs
        ``chips``, ``basis``, ``order``, ``length_scale``, ``min_pixels``: see
        :func:`fit_continuum`.

    Returns
    -------
    ContinuumResult
    """
    flux = np.atleast_2d(np.asarray(flux, dtype=np.float64))
    ivar = np.atleast_2d(np.asarray(ivar, dtype=np.float64))
    continuum, chip_ok, n_used, chips = fit_continuum(flux, ivar, wavelength, continuum_mask, **fit_kwargs)
    valid = np.isfinite(continuum) & (continuum > 0)
    defined = valid & np.isfinite(flux)
    norm_flux = np.full(flux.shape, float(fill_value))
    np.divide(flux, continuum, out=norm_flux, where=defined)
    good_ivar = defined & np.isfinite(ivar) & (ivar > 0)
    norm_ivar = np.zeros(flux.shape)
    with np.errstate(over="ignore", invalid="ignore"):
        np.multiply(ivar, np.square(continuum, where=good_ivar, out=np.zeros(flux.shape)), out=norm_ivar,
                    where=good_ivar)
    bad = ~np.isfinite(norm_ivar) | ~np.isfinite(norm_flux)
    norm_ivar[bad] = 0.0
    norm_flux[bad] = float(fill_value)
    return ContinuumResult(norm_flux, norm_ivar, continuum, chips, chip_ok, n_used)


def normalise_spectra(spectra, continuum_mask, *, renormalise=False, **kwargs):
    """Normalise a :class:`~astra_cannon.io.base.Spectra` batch; returns ``(Spectra, ContinuumResult)``.

    Spectra that already carry a failure flag keep NaN flux and zero ivar. A spectrum left
    with no usable pixel gets ``NO_INFORMATION``; failed chips are listed in
    ``meta[i]["continuum_failed_chips"]``.

    Raises
    ------
    ValueError
        When the batch is already normalised and ``renormalise`` is False.
    """
    if spectra.normalised and not renormalise:
        raise ValueError("spectra are already normalised; pass renormalise=True to fit a new continuum")
    res = normalise(spectra.flux, spectra.ivar, spectra.wavelength, continuum_mask, **kwargs)
    flags = spectra.flags.copy()
    failed = (flags & F.FAILURE_FLAGS) != 0
    res.flux[failed] = np.nan
    res.ivar[failed] = 0.0
    reasons, meta = list(spectra.reasons), [dict(m) for m in spectra.meta]
    for i in np.flatnonzero(~failed & ~np.any(res.ivar > 0, axis=1)):
        flags[i] |= F.NO_INFORMATION
        reasons[i] = "no usable pixel after continuum normalisation"
    for i in np.flatnonzero(~np.all(res.chip_ok, axis=1) & ~failed):
        meta[i]["continuum_failed_chips"] = [int(c) for c in np.flatnonzero(~res.chip_ok[i])]
    out = dataclasses.replace(spectra, flux=res.flux, ivar=res.ivar, flags=flags, reasons=reasons, meta=meta,
                              normalised=True)
    return out, res


def continuum_pixels_from_model(theta, s2=None, *, baseline_tol=0.01, coeff_tol=0.01, s2_max=None,
                                n_per_chip=None, chips=None):
    """Choose continuum pixels from a trained Cannon model (Ness et al. 2015 style).

    A continuum pixel has a baseline spectrum near 1 (``|theta[:, 0] - 1|`` small) and
    responds little to the labels (every ``|theta[:, 1:]|`` small).

    Parameters
    ----------
    theta : array_like, shape (P, K)
        Model coefficients, constant term first (trained on scaled labels).
    s2 : array_like, shape (P,), optional
        Intrinsic scatter; with ``s2_max`` pixels above it are excluded.
    baseline_tol, coeff_tol : float
        Thresholds on ``|theta0 - 1|`` and ``max |theta[1:]|`` (threshold mode).
    s2_max : float, optional
    n_per_chip : int, optional
        Instead of thresholds, take the ``n_per_chip`` best pixels of each chip, ranked by
        ``max(|theta0 - 1|, max|theta[1:]|)`` (guarantees every chip can be fitted).
    chips : sequence of (start, stop), optional
        Used with ``n_per_chip`` (default as in :func:`fit_continuum`).

    Returns
    -------
    ndarray of bool, shape (P,)
    """
    theta = np.asarray(theta, dtype=np.float64)
    if theta.ndim != 2 or theta.shape[1] < 1:
        raise ValueError(f"theta must have shape (P, K), got {theta.shape}")
    p = theta.shape[0]
    base = np.abs(theta[:, 0] - 1.0)
    resp = np.max(np.abs(theta[:, 1:]), axis=1) if theta.shape[1] > 1 else np.zeros(p)
    eligible = np.isfinite(base) & np.isfinite(resp)
    if s2 is not None and s2_max is not None:
        s2 = np.asarray(s2, dtype=np.float64)
        eligible &= np.isfinite(s2) & (s2 <= s2_max)
    if n_per_chip is None:
        return eligible & (base <= baseline_tol) & (resp <= coeff_tol)
    score = np.where(eligible, np.maximum(base, resp), np.inf)
    mask = np.zeros(p, dtype=bool)
    for a, b in (_default_chips(p) if chips is None else chips):
        local = score[a:b]
        best = np.argsort(local, kind="stable")[: int(n_per_chip)]
        best = best[np.isfinite(local[best])]
        mask[a + best] = True
    return mask
