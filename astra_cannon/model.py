"""CannonModel: training set, training, the test step, prediction and model files."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import tempfile
import time
import zipfile

import numpy as np

from . import flags as F
from .censoring import censor_mask, censored_terms, censors_to_json
from .engines import (_basis, label_spectra, monomial_basis_for, theta_pairs_for, theta_table,
                      theta_table_layout, train_pixels)
from .fitting import jsonable
from .model_noise import SeparableCovariance
from .vectorizer import PolynomialVectorizer

__all__ = ["CannonModel", "ModelFileError", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
_FORMAT = "astra_cannon.model"


class ModelFileError(Exception):
    """A model file is missing, damaged, or does not match what the caller expects."""


def _native(a, name, ndim=None):
    """float64, native byte order, C-contiguous; a clear error for the wrong rank."""
    arr = np.asarray(a)
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    return arr


def _sha256(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype.str).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _sha256_of_table(a):
    """sha256 of an array's bytes without copying them (e.g. a memory-mapped table)."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(a)).cast("B")).hexdigest()


# Test-step tables smaller than this are rebuilt in memory (milliseconds) rather than kept in a file.
_TABLE_FILE_MIN_BYTES = 32 * 2**20


def _code_version():
    from . import __version__

    return __version__


_NO_THETA_COV = "no theta covariance kept"
_SEPARABLE_OFF = "separable theta covariance off"
#: Warn when the separable theta covariance is further than this (relative Frobenius error)
#: from the exact one at a checked pixel (17-label benchmark: 13 % at worst).
SEPARABLE_ERROR_WARNING = 0.3


class CannonModel:
    """A data-driven model of spectra as polynomials in stellar labels.

    Parameters
    ----------
    training_set_labels : array_like, shape (N, L)
        Labels of the training stars in the order of ``vectorizer.label_names``.
    training_set_flux, training_set_ivar : array_like, shape (N, P)
        Normalised flux and inverse variance. ``ivar == 0`` marks a masked pixel (its flux
        may be NaN); elsewhere flux must be finite.
    vectorizer : PolynomialVectorizer
        The label vector.
    dispersion : array_like, shape (P,), optional
        Wavelengths (vacuum Angstrom). Needed for censoring by wavelength range.
    regularization : float or array_like of shape (P,), optional
        L1 strength Lambda on the non-constant coefficients (0 or None for none).
    censors : dict, optional
        Label name -> boolean mask ``(P,)`` (True = censored) or list of wavelength ranges
        (see :mod:`astra_cannon.censoring`).

    Raises
    ------
    ValueError
        Wrong shapes, non-finite labels (rows named), non-finite or negative ivar,
        non-finite flux where ivar > 0, a label without spread.

    Notes
    -----
    ``theta`` has shape ``(P, K)`` (pixels first). Labels are scaled as
    ``(label - fiducials) / scales`` with ``fiducials`` the training-set median and
    ``scales`` the 2.5-97.5 percentile range. Every covariance this class returns is in
    physical label units.
    """

    def __init__(self, training_set_labels, training_set_flux, training_set_ivar, vectorizer, dispersion=None,
                 regularization=None, censors=None):
        if not isinstance(vectorizer, PolynomialVectorizer):
            raise TypeError("vectorizer must be a PolynomialVectorizer")
        self.vectorizer = vectorizer
        labels = _native(training_set_labels, "training_set_labels")
        labels = np.atleast_2d(labels)
        flux = _native(training_set_flux, "training_set_flux", 2)
        ivar = _native(training_set_ivar, "training_set_ivar", 2)
        N, L = labels.shape
        if L != vectorizer.n_labels:
            raise ValueError(f"training_set_labels has {L} columns but the vectorizer has {vectorizer.n_labels} labels "
                             f"{list(vectorizer.label_names)}")
        if flux.shape[0] != N or ivar.shape != flux.shape:
            raise ValueError(f"shapes disagree: labels {labels.shape}, flux {flux.shape}, ivar {ivar.shape}")
        bad_rows = np.flatnonzero(~np.all(np.isfinite(labels), axis=1))
        if bad_rows.size:
            raise ValueError(f"non-finite training labels in rows {bad_rows[:20].tolist()}"
                             f"{' ...' if bad_rows.size > 20 else ''} ({bad_rows.size} stars); drop them first")
        if not np.all(np.isfinite(ivar)) or np.any(ivar < 0):
            n = int(np.count_nonzero(~np.isfinite(ivar) | (ivar < 0)))
            raise ValueError(f"training_set_ivar has {n} non-finite or negative values; use ivar = 0 for masked pixels")
        badflux = (ivar > 0) & ~np.isfinite(flux)
        if badflux.any():
            rows = np.unique(np.nonzero(badflux)[0])
            raise ValueError(f"non-finite training flux where ivar > 0 ({int(badflux.sum())} pixels, stars "
                             f"{rows[:20].tolist()}); set ivar = 0 for those pixels")
        self.training_set_labels = labels
        self.training_set_flux = flux
        self.training_set_ivar = ivar
        P = flux.shape[1]
        self.dispersion = None if dispersion is None else _native(dispersion, "dispersion", 1)
        if self.dispersion is not None and self.dispersion.shape != (P,):
            raise ValueError(f"dispersion has {self.dispersion.size} points for {P} pixels")
        self.regularization = self._check_regularization(regularization, P)
        self.censors = censors
        self.censor_mask = censor_mask(censors, vectorizer.label_names, P, self.dispersion)
        self.fiducials = np.median(labels, axis=0)
        self.scales = np.percentile(labels, 97.5, axis=0) - np.percentile(labels, 2.5, axis=0)
        flat = self.scales <= 0
        if flat.any():
            raise ValueError(f"labels without spread in the training set: {[vectorizer.label_names[i] for i in np.flatnonzero(flat)]}")
        self.theta = None
        self.s2 = None
        self.theta_cov = None
        self.metadata = {}
        self._training_set_hash = None
        self._check_correlations()

    # -- construction helpers -------------------------------------------------------------

    @staticmethod
    def _check_regularization(regularization, P):
        if regularization is None:
            return 0.0
        reg = np.asarray(regularization, dtype=float)
        if reg.ndim == 0:
            reg = float(reg)
            ok = np.isfinite(reg) and reg >= 0
        else:
            if reg.shape != (P,):
                raise ValueError(f"regularization must be a scalar or shape ({P},), got {reg.shape}")
            ok = np.all(np.isfinite(reg)) and np.all(reg >= 0)
        if not ok:
            raise ValueError("regularization must be finite and >= 0")
        return reg

    def _check_correlations(self):
        """Record label pairs with |rho| >= 0.9: the model cannot tell such labels apart."""
        warnings_ = []
        x = self.training_set_labels
        if x.shape[0] > 2 and x.shape[1] > 1:
            with np.errstate(all="ignore"):
                rho = np.corrcoef(x, rowvar=False)
            names = self.vectorizer.label_names
            for i in range(len(names)):
                for j in range(i + 1, len(names)):
                    if np.isfinite(rho[i, j]) and abs(rho[i, j]) >= 0.9:
                        warnings_.append(f"labels {names[i]} and {names[j]} are strongly correlated (rho = {rho[i, j]:.3f})")
        self.metadata["warnings"] = warnings_

    # -- properties -----------------------------------------------------------------------

    @property
    def label_names(self):
        return self.vectorizer.label_names

    @property
    def is_trained(self):
        return self.theta is not None and self.s2 is not None

    @property
    def n_pixels(self):
        return self.training_set_flux.shape[1] if self.training_set_flux is not None else self.theta.shape[0]

    @property
    def design_matrix(self):
        """``(N, K)`` label vectors of the training set."""
        return self.vectorizer.get_label_vector(self._scale(self.training_set_labels)).T

    @property
    def training_set_hash(self):
        """sha256 of the training set, independent of star order and label column order.

        Each star's labels (in sorted label-name order), flux and ivar are hashed; the sorted
        digests are hashed together with the sorted label names.
        """
        if self._training_set_hash is None:
            if self.training_set_flux is None:
                raise AttributeError("this model was read without its training set and has no stored hash")
            order = np.argsort(self.label_names)
            digests = sorted(
                hashlib.sha256(lab[order].tobytes() + fl.tobytes() + iv.tobytes()).digest()
                for lab, fl, iv in zip(self.training_set_labels, self.training_set_flux, self.training_set_ivar)
            )
            h = hashlib.sha256(json.dumps(sorted(self.label_names)).encode())
            for d in digests:
                h.update(d)
            self._training_set_hash = h.hexdigest()
        return self._training_set_hash

    def _scale(self, labels):
        return (np.asarray(labels, dtype=float) - self.fiducials) / self.scales

    def _require_trained(self):
        if not self.is_trained:
            raise RuntimeError("the model is not trained: call train() or read a trained model")

    # -- training ---------------------------------------------------------------------------

    def train(self, max_iterations=8, theta_covariance="auto", solver="auto", progress=None, **kwargs):
        """Fit theta and the intrinsic scatter s2 at every pixel.

        All pixels are solved together (normal equations built with one matrix product per
        block, batched solves); ``s2`` is re-estimated without bias and the weights refreshed
        until it settles. L1 regularisation uses feature-sign search, vectorised across pixels.

        Parameters
        ----------
        max_iterations : int, optional
            Alternations between theta and s2.
        theta_covariance : {"auto", "exact", "separable", "none"} or bool, optional
            Keep each pixel's theta covariance so that :meth:`test` can correct for the model's
            own noise (see ``model_uncertainty``). "exact" (or True) keeps every pixel's
            packed covariance; "separable" keeps ``Cov(theta_p) ~ C / a_p``, one shared
            matrix and one scale per pixel (see :mod:`astra_cannon.model_noise`; within ~10 % of
            the exact one on survey-like weights, with equally honest label pulls); "none"
            (or False) keeps nothing, and the test step's uncertainties then miss the model's
            noise. "auto" keeps the exact form when it takes at most 256 MB and the separable
            one otherwise: a 17-label quadratic model at 8575 pixels would need 0.5 GB, and
            building it (every pixel's 171 x 171 normal matrix and inverse) makes training
            about 5x slower (24 s against 4-5 s for 1000 stars on one core).
        solver : {"auto", "direct", "cg"}, optional
            How each pixel's weighted least-squares problem is solved: normal equations built
            and factorised per pixel, or preconditioned conjugate gradients (faster for many
            terms). "auto" picks "cg" above 40 terms unless L1, censoring or the theta
            covariance needs the normal matrices. Both reach the same theta to within 1e-3 of
            its standard error.
        progress : callable, optional
            ``progress(n_pixels_done)``, e.g. a tqdm ``update``.

        Returns
        -------
        theta : ndarray, shape (P, K)
        s2 : ndarray, shape (P,)
            Intrinsic variance per pixel; ``inf`` where a pixel has too few usable stars.
        meta : dict
            Training summary (JSON-safe) plus per-pixel arrays ``objective`` and ``dead``.
        """
        if kwargs:
            raise TypeError(f"unknown keyword arguments: {sorted(kwargs)}")
        cens = censored_terms(self.censor_mask, self.vectorizer)
        theta, s2, info = train_pixels(
            self.design_matrix, self.training_set_flux, self.training_set_ivar,
            regularization=self.regularization, censored_terms=cens if cens.any() else None,
            max_iterations=max_iterations, theta_covariance=theta_covariance, solver=solver, progress=progress,
            pair_monomials=_basis(self.vectorizer.n_labels, tuple(self.vectorizer.terms)).pair_group)
        self.theta, self.s2 = theta, s2
        self._set_theta_cov(info["theta_cov"], copy=False)
        summary = {
            "t_train": info["t_train"],
            "n_iterations": info["n_iterations"],
            "solver": info["solver"],
            "pixels_per_iteration": info["pixels_per_iteration"],
            "cg_iterations": info["cg_iterations"],
            "n_dead_pixels": int(info["dead"].sum()),
            "lasso_unconverged": info["lasso_unconverged"],
            "n_stars": int(self.training_set_flux.shape[0]),
            "n_pixels": int(self.training_set_flux.shape[1]),
            "trained": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "code_version": _code_version(),
        }
        summary["theta_covariance"] = info["theta_covariance"]
        if info["separable_error"] is not None:
            summary["separable_error"] = info["separable_error"]
        self.metadata["training"] = summary
        warned = [w for w in self.metadata.get("warnings", [])
                  if not w.startswith((_NO_THETA_COV, _SEPARABLE_OFF))]
        check = info["separable_error"]
        if check is not None and check["max"] is not None and check["max"] > SEPARABLE_ERROR_WARNING:
            warned.append(f"{_SEPARABLE_OFF} by up to {100 * check['max']:.0f}% (pixel {check['worst_pixel']}; "
                          f"median {100 * check['median']:.0f}% over {check['n_pixels']} pixels checked): the "
                          f"training weights are far from separable (e.g. many stars masked at some "
                          f"pixels), so the model-noise correction is approximate there; "
                          f"train(theta_covariance='exact') keeps the exact one")
        if self.theta_cov is None:
            K = self.vectorizer.n_terms
            warned.append(f"{_NO_THETA_COV}: the test step's uncertainties exclude the model's own noise "
                          f"({summary['n_stars']} training stars for {K} terms; at 17 labels x 1000 stars they "
                          f"were 3-6x too small); train(theta_covariance='separable') keeps it "
                          f"(in the pipeline theta_covariance = auto or separable)")
        self.metadata["warnings"] = warned
        meta = dict(summary, objective=info["objective"], dead=info["dead"])
        return theta, s2, meta

    # -- prediction and the test step -----------------------------------------------------

    def __call__(self, labels):
        """Model spectra at physical ``labels`` of shape (N, L) or (L,): returns (N, P) or (P,)."""
        self._require_trained()
        single = np.ndim(labels) == 1
        v = self.vectorizer.get_label_vector(self._scale(np.atleast_2d(labels)))
        flux = (self.theta @ v).T
        return flux[0] if single else flux

    def default_starts(self, n_init=16):
        """Candidate starting points: the fiducial point plus ``n_init`` training stars.

        The training stars are spread along the first principal component of the scaled
        labels (evenly in rank), so the candidates follow the real label distribution
        (e.g. the giant branch) instead of a box of independent percentiles.
        """
        points = [self.fiducials]
        labels = self.training_set_labels
        if n_init > 0 and labels is not None and len(labels):
            x = self._scale(labels)
            xc = x - x.mean(axis=0)
            _, _, vt = np.linalg.svd(xc, full_matrices=False)
            order = np.argsort(xc @ vt[0], kind="stable")
            picks = order[np.unique(np.linspace(0, len(order) - 1, n_init).round().astype(int))]
            points.extend(labels[picks])
        return np.array(points)

    def test(self, flux, ivar, initial_labels=None, n_init=16, n_optimise=3, max_iterations=100, batch_size=None,
             rchi2_threshold=None, hull_tolerance=0.1, model_uncertainty=True, progress=None):
        """Fit labels to many spectra.

        Each spectrum's chi2 is evaluated at every candidate start (the fiducial point plus
        ``n_init`` training stars, or ``initial_labels``); Levenberg-Marquardt runs from the best
        ``n_optimise`` of them (from all of ``initial_labels`` when given), for all spectra at
        once, and the lowest chi2 wins.

        Parameters
        ----------
        flux, ivar : array_like, shape (S, P) or (P,)
            Normalised flux and inverse variance. Non-finite flux, non-finite or negative ivar
            mark a pixel as unusable (no error).
        initial_labels : array_like, shape (L,), (C, L) or (S, C, L), optional
            Starting points in physical units.
        n_init, n_optimise : int
            Number of training-set candidates; number of them optimised.
        max_iterations : int
            Levenberg-Marquardt iterations per start.
        batch_size : int, optional
            Spectra per batch (memory grows with ``batch_size * K^2``); by default 1024 below 28
            terms, 256 from there.
        rchi2_threshold : float, optional
            Flag ``LARGE_RCHI2`` above this reduced chi2.
        hull_tolerance : float
            Flag ``OUTSIDE_TRAINING_HULL`` when a label leaves the training range widened by
            this fraction of the range on each side (a documented proxy for the convex hull).
        model_uncertainty : bool
            Correct the fit for the model's own noise (from the finite training set): its
            expected squared error is subtracted from the objective (a corrected score, which
            removes the pull towards the training set's centre, and widens the fit's response to
            the data's noise, which the covariance includes), and its variance at the fitted
            labels (``v^T Cov(theta_p) v`` per pixel) is included in chi2 and the label
            uncertainties, to first order. Spectra whose labels the model's noise dominates
            keep the plain fit, flagged ``MODEL_NOISE_DOMINATED``, with its expected bias in the
            covariance. Needs ``theta_cov`` from training (exact or separable, kept by
            default); otherwise ignored.
        progress : callable, optional
            ``progress(n_spectra_done)``.

        Returns
        -------
        labels : ndarray, shape (S, L)
            NaN for spectra that could not be fitted.
        cov : ndarray, shape (S, L, L)
            Label covariance in physical units (symmetric).
        meta : list of dict
            One JSON-safe dict per spectrum: ``chi_sq, r_chi_sq, snr, n_pixels, ier, nfev,
            best_result_index, x0, flags, fail_message, status, label_names, method,
            t_elapsed``.

        Raises
        ------
        ValueError
            When the pixel count differs from the model's.

        Notes
        -----
        The first call builds the table of products of theta's columns that the test step
        needs (``P K (K + 1) / 2`` numbers, float64 below 28 terms; from 28 terms up, without the
        model-noise pass, the float32 table of distinct monomials, see
        :mod:`astra_cannon.monomials`: 196 MB and ~1 s for 17 labels at 8575 pixels) and the
        model keeps it for later calls while ``theta`` is unchanged (up to 1.25 GB; larger
        tables are built per batch).
        """
        out = self.test_arrays(flux, ivar, initial_labels=initial_labels, n_init=n_init, n_optimise=n_optimise,
                               max_iterations=max_iterations, batch_size=batch_size,
                               rchi2_threshold=rchi2_threshold, hull_tolerance=hull_tolerance,
                               model_uncertainty=model_uncertainty, progress=progress)
        return out["labels"], out["cov"], self.meta_from_arrays(out)

    def test_arrays(self, flux, ivar, initial_labels=None, n_init=16, n_optimise=3, max_iterations=100,
                    batch_size=None, rchi2_threshold=None, hull_tolerance=0.1, model_uncertainty=True,
                    progress=None):
        """Like :meth:`test`, but returns the per-spectrum results as a dict of arrays.

        Keys: ``labels, cov, chi2, rchi2, snr, n_pixels, ier, nfev, start_index, x0, flags,
        t_elapsed`` (per-spectrum share of the batch time). Pipelines use this form.
        """
        self._require_trained()
        t0 = time.perf_counter()
        # Bad values (NaN/inf flux, ivar <= 0 or NaN) are masked batch by batch in the engine.
        flux = np.atleast_2d(np.asarray(flux))
        ivar = np.atleast_2d(np.asarray(ivar))
        P = self.theta.shape[0]
        if flux.shape != ivar.shape or flux.ndim != 2 or flux.shape[1] != P:
            raise ValueError(f"flux {flux.shape} and ivar {ivar.shape} must both have shape (S, {P})")
        L = len(self.label_names)
        optimise_all = initial_labels is not None
        if initial_labels is None:
            starts = self.default_starts(n_init)
        else:
            starts = np.asarray(initial_labels, dtype=float)
            if starts.ndim == 1:
                starts = starts[None, :]
            if starts.shape[-1] != L or starts.ndim not in (2, 3) or (starts.ndim == 3 and starts.shape[0] != flux.shape[0]):
                raise ValueError(f"initial_labels must have shape (L,), (C, L) or (S, C, L) with L = {L}, got {starts.shape}")
        basis = monomial_basis_for(self.vectorizer, P)
        out = label_spectra(self.theta, self.s2, self.vectorizer, self.fiducials, self.scales, flux, ivar, starts,
                           n_optimise=n_optimise, optimise_all=optimise_all, max_iterations=max_iterations,
                           batch_size=batch_size, progress=progress,
                           theta_cov=self.theta_cov if model_uncertainty else None,
                           theta_pairs=theta_pairs_for(self, self.theta, basis=basis))
        ok = np.all(np.isfinite(out["labels"]), axis=1)
        if self.training_set_labels is not None and hull_tolerance is not None:
            lo = self.training_set_labels.min(axis=0)
            hi = self.training_set_labels.max(axis=0)
            pad = hull_tolerance * (hi - lo)
            outside = ok & np.any((out["labels"] < lo - pad) | (out["labels"] > hi + pad), axis=1)
            out["flags"][outside] |= F.OUTSIDE_TRAINING_HULL
        if rchi2_threshold is not None:
            out["flags"][ok & (out["rchi2"] > rchi2_threshold)] |= F.LARGE_RCHI2
        out["t_elapsed"] = np.full(flux.shape[0], (time.perf_counter() - t0) / max(1, flux.shape[0]))
        return out

    @property
    def theta_cov(self):
        """Covariance of each pixel's theta: packed, shape (P, K (K + 1) / 2), float32; or its
        separable form, a :class:`~astra_cannon.model_noise.SeparableCovariance` (whose
        ``packed(pixels)`` gives the same layout); or None.

        float32 (7 digits) is what the test step's model-noise correction reads, at half the
        memory and file size (0.5 GB at 17 labels and 8575 pixels). Read-only (assign a new
        array, which is copied, to change it): the test step then reads this very array, with
        no copy and no comparison on every call.
        """
        return self.__dict__.get("_theta_cov")

    @theta_cov.setter
    def theta_cov(self, value):
        self._set_theta_cov(value, copy=True)

    def _set_theta_cov(self, value, copy):
        """``copy=False`` for a fresh array of our own (from training or a file)."""
        if value is not None and not isinstance(value, SeparableCovariance):
            value = np.array(value, dtype=np.float32) if copy else np.asarray(value, dtype=np.float32)
            value.setflags(write=False)
        self.__dict__["_theta_cov"] = value

    def keep_test_table(self, path, model_uncertainty=True, min_bytes=None):
        """Keep the test step's table of theta products in a file, shared by processes.

        A pipeline labels a survey in many processes (a Luigi task each), and every one would
        rebuild the table (~1-1.5 s for 17 labels at 8575 pixels). With this the first process
        writes it to ``path`` (``.npy``, atomically, with a ``path + ".json"`` record of its
        sha256 and of theta's) and every process maps it read-only, so the page cache holds
        one copy for all. A file whose record does not match this model's theta, or whose
        bytes do not match their sha256 (~0.1 s for 196 MB), is rebuilt. Where the file
        cannot be written the table is kept in memory only.

        Parameters
        ----------
        path : str or path-like
            Where the table lives (e.g. beside the model file).
        model_uncertainty : bool
            As for :meth:`test`: which table the test step will use depends on it.
        min_bytes : int, optional
            Smaller tables are not worth a file (default 32 MB); returns None for them.

        Returns
        -------
        str or None
            The table's path, or None when no file is kept.
        """
        self._require_trained()
        P, K = self.theta.shape
        theta_cov = self.theta_cov if model_uncertainty else None
        basis = monomial_basis_for(self.vectorizer, P, theta_cov)
        width, dtype = theta_table_layout(K, basis)
        if P * width * dtype.itemsize < (_TABLE_FILE_MIN_BYTES if min_bytes is None else min_bytes):
            return None
        path = os.fspath(path)
        record_path = path + ".json"
        theta_digest = _sha256(self.theta)
        table = None
        try:
            with open(record_path) as fh:
                record = json.load(fh)
            if record.get("theta_sha256") == theta_digest:
                mapped = np.load(path, mmap_mode="r", allow_pickle=False)
                if (mapped.dtype == dtype and mapped.shape == (P, width)
                        and _sha256_of_table(mapped) == record.get("sha256")):
                    table = mapped
        except (OSError, ValueError, AttributeError):
            pass  # missing, foreign or damaged: rebuilt below
        if table is None:
            table = theta_table(self.theta, basis)
            try:
                directory = os.path.dirname(os.path.abspath(path))
                for target, write in ((path, lambda fh: np.save(fh, table)),
                                      (record_path, lambda fh: fh.write(json.dumps(
                                          {"theta_sha256": theta_digest, "sha256": _sha256_of_table(table),
                                           "dtype": dtype.str, "shape": [P, width]}).encode()))):
                    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
                    try:
                        with os.fdopen(fd, "wb") as fh:
                            write(fh)
                        os.replace(tmp, target)
                    finally:
                        if os.path.exists(tmp):
                            os.unlink(tmp)
                table = np.load(path, mmap_mode="r", allow_pickle=False)
            except OSError:
                path = None  # read-only place: this process keeps its own copy
        self._theta_pairs = (self.theta.copy(), table)
        return path

    def meta_from_arrays(self, out):
        """Per-spectrum metadata dicts (JSON-safe) from :meth:`test_arrays` output."""
        names = list(self.label_names)
        n_labels = len(names)

        def clean(values):
            # tolist() once per column is far cheaper than converting each numpy scalar; NaN
            # and inf (no JSON numbers) become None.
            if np.all(np.isfinite(values)):
                return values.tolist()
            return [v if np.isfinite(v) else None for v in values.tolist()]

        chi2, rchi2, snr = clean(out["chi2"]), clean(out["rchi2"]), clean(out["snr"])
        x0 = [clean(row) for row in out["x0"]] if not np.all(np.isfinite(out["x0"])) else out["x0"].tolist()
        t_el = out["t_elapsed"].tolist()
        flags, n_pix = out["flags"].tolist(), out["n_pixels"].tolist()
        ier, nfev, start = out["ier"].tolist(), out["nfev"].tolist(), out["start_index"].tolist()
        failed = (~np.all(np.isfinite(out["labels"]), axis=1)).tolist()
        meta = []
        for i in range(len(flags)):
            fl = flags[i]
            reason = None
            if fl & F.NO_INFORMATION:
                reason = "Pixels contained no information"
            elif fl & F.FEW_PIXELS:
                reason = f"Too few usable pixels ({n_pix[i]} < {n_labels + 1})"
            elif fl & F.UNNORMALISED_FLUX:
                reason = "mean flux far from 1: the spectrum does not look continuum-normalised"
            elif fl & F.AT_INITIAL_GUESS:
                reason = "Optimized result same as initial value."
            elif fl & F.OPTIMIZER_FAILED:
                reason = f"optimiser did not converge (ier={ier[i]})"
            meta.append({
                "chi_sq": chi2[i], "r_chi_sq": rchi2[i], "snr": snr[i], "n_pixels": n_pix[i], "ier": ier[i],
                "nfev": nfev[i], "best_result_index": start[i], "x0": x0[i], "flags": fl, "fail_message": reason,
                "status": "failed" if failed[i] else "ok", "label_names": names,
                "method": "levenberg_marquardt_batched", "t_elapsed": t_el[i],
            })
        return meta

    # -- files ------------------------------------------------------------------------------

    def write(self, path, include_training_set=False, overwrite=True):
        """Write the model to an ``.npz`` file (no pickles), atomically.

        Parameters
        ----------
        path : str or path-like
        include_training_set : bool
            Also store training flux and ivar (large). Training labels are always stored:
            they define the scaling and the default starting points.
        overwrite : bool
            Replace an existing file.
        """
        self._require_trained()
        path = os.fspath(path)
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(path)
        arrays = {
            "theta": self.theta, "s2": self.s2, "fiducials": self.fiducials, "scales": self.scales,
            "training_set_labels": self.training_set_labels, "censor_mask": self.censor_mask,
            "regularization": np.atleast_1d(np.asarray(self.regularization, dtype=float)),
        }
        if self.dispersion is not None:
            arrays["dispersion"] = self.dispersion
        if isinstance(self.theta_cov, SeparableCovariance):
            arrays["theta_cov_pixel_weights"] = self.theta_cov.pixel_weights
            arrays["theta_cov_shared"] = self.theta_cov.shared
        elif self.theta_cov is not None:
            arrays["theta_cov"] = self.theta_cov
        if include_training_set:
            arrays["training_set_flux"] = self.training_set_flux
            arrays["training_set_ivar"] = self.training_set_ivar
        header = {
            "format": _FORMAT,
            "schema_version": SCHEMA_VERSION,
            "code_version": _code_version(),
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "vectorizer": self.vectorizer.to_dict(),
            "label_names": list(self.label_names),
            "n_pixels": int(self.theta.shape[0]),
            "training_set_hash": self._training_set_hash if self.training_set_flux is None else self.training_set_hash,
            "censors": censors_to_json(self.censor_mask, self.label_names),
            "metadata": jsonable(self.metadata),
            "checksums": {k: _sha256(v) for k, v in arrays.items()},
        }
        arrays["header"] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def read(cls, path, label_names=None, n_pixels=None):
        """Read a model written by :meth:`write`.

        Parameters
        ----------
        path : str or path-like
        label_names : sequence of str, optional
            Raise unless the model has exactly these labels (in this order).
        n_pixels : int, optional
            Raise unless the model has this many pixels.

        Raises
        ------
        ModelFileError
            Missing, truncated or foreign file; object arrays (pickles are refused); wrong
            schema version; checksum mismatch; inconsistent shapes; non-finite theta or
            invalid s2; labels or pixel count other than expected.
        """
        path = os.fspath(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except FileNotFoundError as e:
            raise ModelFileError(f"model file not found: {path}") from e
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
            raise ModelFileError(f"cannot read model file {path}: {type(e).__name__}: {e}") from e
        if "header" not in arrays:
            raise ModelFileError(f"{path} is not an astra_cannon model file (no header)")
        try:
            header = json.loads(arrays.pop("header").tobytes().decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelFileError(f"{path}: damaged header: {e}") from e
        if header.get("format") != _FORMAT:
            raise ModelFileError(f"{path} is not an astra_cannon model file (format {header.get('format')!r})")
        if header.get("schema_version") != SCHEMA_VERSION:
            raise ModelFileError(f"{path}: schema version {header.get('schema_version')!r}, expected {SCHEMA_VERSION}")
        for key in ("theta", "s2", "fiducials", "scales", "training_set_labels", "censor_mask", "regularization"):
            if key not in arrays:
                raise ModelFileError(f"{path}: missing array {key!r}")
        for key, digest in header.get("checksums", {}).items():
            if key not in arrays or _sha256(arrays[key]) != digest:
                raise ModelFileError(f"{path}: checksum mismatch for {key!r} (file damaged or edited)")
        try:
            vec = PolynomialVectorizer.from_dict(header["vectorizer"])
        except (KeyError, ValueError, TypeError) as e:
            raise ModelFileError(f"{path}: bad vectorizer description: {e}") from e
        theta, s2 = arrays["theta"], arrays["s2"]
        P = theta.shape[0] if theta.ndim == 2 else -1
        L = vec.n_labels
        if theta.ndim != 2 or theta.shape[1] != vec.n_terms or s2.shape != (P,) \
                or arrays["fiducials"].shape != (L,) or arrays["scales"].shape != (L,):
            raise ModelFileError(f"{path}: inconsistent shapes: theta {theta.shape}, s2 {s2.shape}, "
                                 f"{vec.n_terms} terms, {L} labels")
        if not np.all(np.isfinite(theta)):
            raise ModelFileError(f"{path}: theta has non-finite values")
        if np.any(np.isnan(s2)) or np.any(s2 < 0) or np.any(s2 == -np.inf):
            raise ModelFileError(f"{path}: s2 has NaN or negative values")
        if label_names is not None and list(label_names) != list(vec.label_names):
            raise ModelFileError(f"{path}: expected labels {list(label_names)}, found {list(vec.label_names)}")
        if n_pixels is not None and int(n_pixels) != P:
            raise ModelFileError(f"{path}: expected {int(n_pixels)} pixels, found {P}")

        model = cls.__new__(cls)
        model.vectorizer = vec
        model.training_set_labels = arrays["training_set_labels"]
        model.training_set_flux = arrays.get("training_set_flux")
        model.training_set_ivar = arrays.get("training_set_ivar")
        model.dispersion = arrays.get("dispersion")
        reg = arrays["regularization"]
        model.regularization = float(reg[0]) if reg.size == 1 else reg
        model.censor_mask = arrays["censor_mask"].astype(bool)
        model.censors = {name: model.censor_mask[:, i] for i, name in enumerate(vec.label_names)
                         if model.censor_mask[:, i].any()} or None
        model.fiducials, model.scales = arrays["fiducials"], arrays["scales"]
        model.theta, model.s2 = theta, s2
        model._set_theta_cov(arrays.get("theta_cov"), copy=False)
        Kt = vec.n_terms * (vec.n_terms + 1) // 2
        if model.theta_cov is not None and (model.theta_cov.shape != (P, Kt)
                                            or not np.all(np.isfinite(model.theta_cov))):
            raise ModelFileError(f"{path}: theta_cov has shape {model.theta_cov.shape} or non-finite values")
        parts = [arrays.get(k) for k in ("theta_cov_pixel_weights", "theta_cov_shared")]
        if any(part is not None for part in parts):
            try:
                separable = SeparableCovariance(*parts)
            except (TypeError, ValueError) as e:
                raise ModelFileError(f"{path}: bad separable theta covariance: {e}") from e
            if model.theta_cov is not None or separable.n_pixels != P or separable.shared.shape[1] != Kt:
                raise ModelFileError(f"{path}: separable theta covariance of {separable.n_pixels} pixels and "
                                     f"{separable.n_terms} terms, or beside an exact one, for a model of {P} "
                                     f"pixels and {vec.n_terms} terms")
            model._set_theta_cov(separable, copy=False)
        model.metadata = header.get("metadata", {})
        model.metadata["file"] = {"code_version": header.get("code_version"), "written": header.get("written")}
        model._training_set_hash = header.get("training_set_hash")
        return model

    def __repr__(self):
        state = "trained" if self.is_trained else "untrained"
        return f"<CannonModel {state}: {self.vectorizer.get_human_readable_label_vector()}; {self.n_pixels} pixels>"
