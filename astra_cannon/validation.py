"""Cross-validation and the choice of the regularisation strength Lambda.

Pure numerics on arrays (numpy and :class:`~astra_cannon.model.CannonModel`): no files, no
database, no Luigi. Typical use::

    cv = cross_validate(labels, flux, ivar, PolynomialVectorizer(names, 2), n_folds=5)
    cv["scatter"]["TEFF"], cv["bias"]["TEFF"], cv["predicted"]

    choice = choose_regularization(labels, flux, ivar, vec, grid=10.0 ** np.arange(-1, 5))
    model = CannonModel(labels, flux, ivar, vec, regularization=choice["best_regularization"])

Both are deterministic for a given ``seed``.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from . import flags as _flags
from .model import CannonModel

__all__ = ["cross_validate", "choose_regularization", "label_statistics", "validation_chi2",
           "RegularizationGridWarning"]


class RegularizationGridWarning(UserWarning):
    """The best regularisation strength lies at the edge of the grid searched."""


def _robust_std(x):
    return float(1.4826 * np.median(np.abs(x - np.median(x)))) if x.size else float("nan")


def label_statistics(truth, predicted, label_names, use=None) -> dict:
    """Bias and scatter of ``predicted - truth`` per label.

    Parameters
    ----------
    truth, predicted : ndarray, shape (N, L)
    label_names : sequence of str
    use : ndarray of bool, shape (N,), optional
        Stars to include (default: all with finite predictions).

    Returns
    -------
    dict
        ``bias`` (mean), ``median_bias``, ``scatter`` (standard deviation), ``robust_scatter``
        (1.4826 x median absolute deviation) and ``rms``, each a dict label -> float; ``n``.
    """
    truth = np.asarray(truth, dtype=float)
    predicted = np.asarray(predicted, dtype=float)
    ok = np.all(np.isfinite(predicted), axis=1) & np.all(np.isfinite(truth), axis=1)
    if use is not None:
        ok &= np.asarray(use, dtype=bool)
    delta = (predicted - truth)[ok]
    out = {"bias": {}, "median_bias": {}, "scatter": {}, "robust_scatter": {}, "rms": {}, "n": int(ok.sum())}
    for j, name in enumerate(label_names):
        d = delta[:, j]
        empty = d.size == 0
        out["bias"][name] = float("nan") if empty else float(np.mean(d))
        out["median_bias"][name] = float("nan") if empty else float(np.median(d))
        out["scatter"][name] = float("nan") if empty else float(np.std(d))
        out["robust_scatter"][name] = _robust_std(d)
        out["rms"][name] = float("nan") if empty else float(np.sqrt(np.mean(d**2)))
    return out


def _folds(n, n_folds, seed):
    if not 2 <= n_folds <= n:
        raise ValueError(f"n_folds must be between 2 and the number of stars ({n}), got {n_folds}")
    order = np.random.default_rng(seed).permutation(n)
    fold = np.empty(n, dtype=np.int64)
    for k, idx in enumerate(np.array_split(order, n_folds)):
        fold[idx] = k
    return fold


def _as_arrays(labels, flux, ivar):
    labels = np.atleast_2d(np.asarray(labels, dtype=float))
    flux = np.atleast_2d(np.asarray(flux, dtype=float))
    ivar = np.atleast_2d(np.asarray(ivar, dtype=float))
    if flux.shape != ivar.shape or flux.shape[0] != labels.shape[0]:
        raise ValueError(f"shapes disagree: labels {labels.shape}, flux {flux.shape}, ivar {ivar.shape}")
    return labels, flux, ivar


def cross_validate(labels, flux, ivar, vectorizer, n_folds=5, regularization=None, censors=None, seed=0,
                   dispersion=None, progress=None, theta_covariance="auto", **test_kwargs) -> dict:
    """K-fold cross-validation of a Cannon model: train on K-1 folds, test on the held-out one.

    Parameters
    ----------
    labels : array_like, shape (N, L)
        Reference labels, in the order of ``vectorizer.label_names``.
    flux, ivar : array_like, shape (N, P)
        Normalised training spectra and inverse variances (ivar 0 = masked).
    vectorizer : PolynomialVectorizer
    n_folds : int
        Number of folds (``N`` gives leave-one-out).
    regularization : float or ndarray of shape (P,), optional
        Lambda passed to every :class:`CannonModel`.
    censors : dict, optional
        Censoring passed to every :class:`CannonModel`.
    seed : int
        Seed of the random assignment of stars to folds.
    dispersion : ndarray, shape (P,), optional
        Wavelengths (needed when ``censors`` uses wavelength ranges).
    progress : callable, optional
        Called as ``progress(folds_done, n_folds)`` after each fold.
    theta_covariance : {"auto", "exact", "separable", "none"} or bool
        Passed to :meth:`CannonModel.train` (whether the test step corrects for the model's noise).
    **test_kwargs
        Passed to :meth:`CannonModel.test` (e.g. ``n_init``, ``max_iterations``).

    Returns
    -------
    dict
        ``label_names``; per-star ``truth``, ``predicted`` and ``errors`` (N, L) (square root of
        the covariance diagonal), ``fold`` (N,), ``flags`` (N,), ``r_chi_sq`` (N,);
        ``bias``, ``median_bias``, ``scatter`` (std), ``robust_scatter`` (1.4826 MAD),
        ``rms`` (dicts label -> float, over stars without a failure flag); ``n_used``,
        ``n_failed``, ``n_folds``, ``seed``, ``regularization``, ``t_train`` and ``t_test``
        (seconds per fold).

    Raises
    ------
    ValueError
        Inconsistent shapes or an impossible number of folds (and whatever
        :class:`CannonModel` raises for bad training data).
    """
    labels, flux, ivar = _as_arrays(labels, flux, ivar)
    n, n_labels = labels.shape
    fold = _folds(n, int(n_folds), seed)
    predicted = np.full((n, n_labels), np.nan)
    errors = np.full((n, n_labels), np.nan)
    star_flags = np.zeros(n, dtype=np.int64)
    r_chi_sq = np.full(n, np.nan)
    t_train, t_test = [], []
    for k in range(int(n_folds)):
        held = fold == k
        model = CannonModel(labels[~held], flux[~held], ivar[~held], vectorizer, dispersion=dispersion,
                            regularization=regularization, censors=censors)
        t0 = time.perf_counter()
        model.train(theta_covariance=theta_covariance)
        t1 = time.perf_counter()
        pred, cov, meta = model.test(flux[held], ivar[held], **test_kwargs)
        t_test.append(time.perf_counter() - t1)
        t_train.append(t1 - t0)
        predicted[held] = pred
        with np.errstate(invalid="ignore"):
            errors[held] = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
        star_flags[held] = [m["flags"] for m in meta]
        r_chi_sq[held] = [np.nan if m["r_chi_sq"] is None else m["r_chi_sq"] for m in meta]
        if progress is not None:
            progress(k + 1, int(n_folds))
    failed = (star_flags & _flags.FAILURE_FLAGS).astype(bool) | ~np.all(np.isfinite(predicted), axis=1)
    names = list(vectorizer.label_names)
    stats = label_statistics(labels, predicted, names, use=~failed)
    return {
        "label_names": names,
        "truth": labels,
        "predicted": predicted,
        "errors": errors,
        "fold": fold,
        "flags": star_flags,
        "r_chi_sq": r_chi_sq,
        "bias": stats["bias"],
        "median_bias": stats["median_bias"],
        "scatter": stats["scatter"],
        "robust_scatter": stats["robust_scatter"],
        "rms": stats["rms"],
        "n_used": stats["n"],
        "n_failed": int(failed.sum()),
        "n_folds": int(n_folds),
        "seed": seed,
        "regularization": regularization,
        "t_train": t_train,
        "t_test": t_test,
    }


def validation_chi2(model, labels, flux, ivar):
    """Per-pixel chi2 and negative log-likelihood of held-out spectra at their *true* labels.

    The model's prediction at the reference labels is compared with the observed flux, with
    the inverse variance adjusted by the model's intrinsic scatter,
    ``ivar / (1 + ivar * s2)`` (as AnniesLasso and Casey et al. 2016 do).

    Parameters
    ----------
    model : CannonModel
        A trained model.
    labels : ndarray, shape (M, L)
    flux, ivar : ndarray, shape (M, P)

    Returns
    -------
    chi2 : ndarray, shape (P,)
        Summed over the stars; NaN at dead pixels (infinite ``s2``).
    nll : ndarray, shape (P,)
        ``0.5 * sum(chi2_i - log(adjusted ivar_i) + log(2 pi))`` over usable pixels; NaN at
        dead pixels.
    n_used : ndarray of int, shape (P,)
        Number of stars with a usable value at each pixel.
    """
    predicted = model(np.atleast_2d(labels))
    s2 = np.asarray(model.s2, dtype=float)
    dead = ~np.isfinite(s2)
    usable = (ivar > 0) & np.isfinite(flux) & np.isfinite(ivar)
    iv = np.where(usable, ivar, 0.0)
    adjusted = iv / (1.0 + iv * np.where(dead, 0.0, s2))
    resid = np.where(usable, flux - predicted, 0.0)
    chi2 = np.sum(adjusted * resid**2, axis=0)
    with np.errstate(divide="ignore"):
        log_term = np.where(usable, np.log(np.where(usable, adjusted, 1.0)), 0.0)
    n_used = usable.sum(axis=0)
    nll = 0.5 * (chi2 - log_term.sum(axis=0) + n_used * np.log(2 * np.pi))
    chi2 = np.where(dead, np.nan, chi2)
    nll = np.where(dead, np.nan, nll)
    return chi2, nll, n_used


def choose_regularization(labels, flux, ivar, vectorizer, grid, validation_fraction=0.2, seed=0,
                          censors=None, dispersion=None, criterion="nll", progress=None) -> dict:
    """Choose the L1 strength Lambda by how well each model predicts held-out spectra.

    The stars are split once into a training part and a validation part
    (``validation_fraction``); for every Lambda in ``grid`` a model is trained on the training
    part and its prediction at the validation stars' *true* labels is scored with
    :func:`validation_chi2` (inverse variance adjusted by the model's own ``s2``), summed over
    validation stars and over the pixels that are alive in every model. The lowest total wins.
    When it is the smallest or largest value of the grid a :class:`RegularizationGridWarning`
    is issued and ``at_grid_edge`` is True: the optimum may lie outside the grid.

    Why the default criterion is the negative log-likelihood and not chi2 alone: each model
    re-estimates ``s2``, and an over-regularised model moves its systematic errors into a larger
    ``s2``, which *lowers* its chi2 (below 1 per pixel). Chi2 with each model's own ``s2``
    (``criterion="chi2"``, the AnniesLasso/Casey et al. 2016 recipe) therefore drifts to the
    largest Lambda of any grid. The Gaussian NLL adds ``-log(adjusted ivar)``, which charges for
    that inflated scatter; for a common ``s2`` it ranks models exactly as chi2 does.

    Parameters
    ----------
    labels : array_like, shape (N, L)
    flux, ivar : array_like, shape (N, P)
    vectorizer : PolynomialVectorizer
    grid : sequence of float
        Lambda values (>= 0, at least two distinct); they are sorted.
    validation_fraction : float
        Fraction of stars held out for validation (0 < f < 1).
    seed : int
        Seed of the random split.
    censors : dict, optional
    dispersion : ndarray, shape (P,), optional
    criterion : {"nll", "chi2"}
        ``"nll"`` (default): Gaussian negative log-likelihood; ``"chi2"``: chi2 alone (see
        above for why it favours over-regularised models).
    progress : callable, optional
        Called as ``progress(models_done, n_models)`` after each Lambda.

    Returns
    -------
    dict
        ``grid`` (sorted list), ``chi2``, ``r_chi2`` (chi2 per usable validation pixel) and
        ``nll`` (lists, one per Lambda), ``criterion``, ``best_regularization``,
        ``best_index``, ``at_grid_edge`` (bool), ``edge`` (None, "lower" or "upper"),
        ``per_pixel_best`` (ndarray (P,), the Lambda minimising each pixel's criterion; NaN
        at pixels dead in some model), ``n_pixels_used``, ``n_train``, ``n_validation``,
        ``train_index``, ``validation_index``, ``t_train`` (seconds per Lambda), ``seed``.

    Raises
    ------
    ValueError
        For a bad grid, fraction or criterion, or too few stars on either side.
    """
    labels, flux, ivar = _as_arrays(labels, flux, ivar)
    grid = np.unique(np.asarray(grid, dtype=float))
    if grid.size < 2 or not np.all(np.isfinite(grid)) or np.any(grid < 0):
        raise ValueError(f"grid needs at least two distinct finite values >= 0, got {grid.tolist()}")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if criterion not in ("chi2", "nll"):
        raise ValueError(f"criterion must be 'chi2' or 'nll', not {criterion!r}")
    n = len(labels)
    n_val = int(round(validation_fraction * n))
    if n_val < 1 or n - n_val < vectorizer.n_terms:
        raise ValueError(f"{n} stars cannot be split into {n - n_val} training (need >= "
                         f"{vectorizer.n_terms} terms) and {n_val} validation stars")
    order = np.random.default_rng(seed).permutation(n)
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])

    chi2 = np.empty((grid.size, flux.shape[1]))
    nll = np.empty_like(chi2)
    n_used = None
    t_train = []
    for g, lam in enumerate(grid):
        model = CannonModel(labels[train], flux[train], ivar[train], vectorizer, dispersion=dispersion,
                            regularization=float(lam), censors=censors)
        t0 = time.perf_counter()
        model.train()
        t_train.append(time.perf_counter() - t0)
        chi2[g], nll[g], n_used = validation_chi2(model, labels[val], flux[val], ivar[val])
        if progress is not None:
            progress(g + 1, grid.size)

    score = chi2 if criterion == "chi2" else nll
    alive = np.all(np.isfinite(score), axis=0)
    if not alive.any():
        raise ValueError("no pixel is usable in every model: cannot compare regularisation strengths")
    total = score[:, alive].sum(axis=1)
    best = int(np.argmin(total))
    edge = "lower" if best == 0 else "upper" if best == grid.size - 1 else None
    if edge:
        hint = ("regularisation does not help on this grid; try smaller values"
                if edge == "lower" else "try larger values")
        warnings.warn(f"best regularization {grid[best]:g} is at the {edge} edge of the grid "
                      f"[{grid[0]:g} .. {grid[-1]:g}]: {hint}", RegularizationGridWarning, stacklevel=2)
    per_pixel = np.full(flux.shape[1], np.nan)
    per_pixel[alive] = grid[np.argmin(score[:, alive], axis=0)]
    n_pix_used = int(n_used[alive].sum())
    return {
        "grid": grid.tolist(),
        "chi2": chi2[:, alive].sum(axis=1).tolist(),
        "r_chi2": (chi2[:, alive].sum(axis=1) / max(n_pix_used, 1)).tolist(),
        "nll": nll[:, alive].sum(axis=1).tolist(),
        "criterion": criterion,
        "best_regularization": float(grid[best]),
        "best_index": best,
        "at_grid_edge": edge is not None,
        "edge": edge,
        "per_pixel_best": per_pixel,
        "n_pixels_used": int(alive.sum()),
        "n_train": int(train.size),
        "n_validation": int(val.size),
        "train_index": train,
        "validation_index": val,
        "t_train": t_train,
        "seed": seed,
    }
