"""APOGEE-like example data made from a real quadratic Cannon model (Bovy 2015, BSD-3).

``generate_example(directory)`` writes a complete, deterministic example: a training set, test
spectra split over several files, the true labels and a manifest. Labels are resampled from the
1801 real APOGEE DR10 training labels of the shipped model; spectra are that model plus its
intrinsic scatter plus noise, on the 7214-pixel APOGEE vacuum wavelength grid.

File layout (``directory`` after ``generate_example``)::

    manifest.json                 parameters, label names, file list (sha256, size, rows)
    training_set.fits             HDU0 PRIMARY  header only (provenance, licence, seed)
                                  HDU1 LABELS   table: APOGEE_ID, TEFF, LOGG, FE_H, ALPHA_FE, SNR
                                  HDU2 FLUX     image (N, 7214) float32, normalised flux
                                  HDU3 IVAR     image (N, 7214) float32, 0 = masked pixel
                                  HDU4 WAVELENGTH image (7214,) float64, vacuum Angstrom
    spectra/example-spectra-NN.fits
                                  HDU0 PRIMARY  header only
                                  HDU1 FLUX     image (n, 7214) float32 (NaN at some bad pixels)
                                  HDU2 IVAR     image (n, 7214) float32
                                  HDU3 WAVELENGTH image (7214,) float64
                                  HDU4 IDS      table: IDENTIFIER, ROW, SNR
    truth.ecsv                    IDENTIFIER, FILE, ROW, SOURCE_ID, TEFF, LOGG, FE_H, ALPHA_FE,
                                  SNR, KIND ("good", "all_masked", "all_nan", "few_pixels"),
                                  EXPECTED_FLAGS (bits of astra_cannon.flags, 0 for good)

Every HDU carries CHECKSUM/DATASUM cards (deterministic: no timestamps), so the same seed gives
byte-identical files. Labels are in TEFF [K], LOGG [dex, cgs], FE_H [dex], ALPHA_FE [dex].
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import flags as _flags
from ..data import apogee_wavelength, bovy_model_arrays, bovy_training_labels
from .base import Spectra

__all__ = [
    "BovyModel",
    "bovy_model",
    "generate_example",
    "read_example_spectra",
    "read_example_training_set",
    "example_truth",
    "read_manifest",
]

EXAMPLE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TRAINING_NAME = "training_set.fits"
TRUTH_NAME = "truth.ecsv"
SPECTRA_DIR = "spectra"

ORIGIN = ("astra_cannon synthetic example from the Bovy (2015) quadratic Cannon model, "
          "GitHub jobovy/apogee commit 84678d0")
LICENSE = "BSD-3-Clause, (c) 2013 Jo Bovy; see astra_cannon/data/ATTRIBUTION.md"

# Jitter added to resampled real labels: small next to the label ranges, so the example keeps
# the real label correlations (e.g. Teff-logg giant branch) while avoiding exact duplicates.
DEFAULT_JITTER = {"TEFF": 30.0, "LOGG": 0.06, "FE_H": 0.03, "ALPHA_FE": 0.015}

# Bad pixels get ivar 0; the reader puts this neutral continuum value in non-finite flux.
MASKED_FLUX_VALUE = 1.0


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BovyModel:
    """The shipped quadratic Cannon model of Bovy (2015), evaluated without any fitting code.

    Attributes
    ----------
    coeffs : ndarray, shape (K, P)
        Coefficients, one row per term (K = 15 for 4 labels, P = 7214 pixels).
    scatter : ndarray, shape (P,)
        Intrinsic scatter per pixel (flux units).
    baseline_labels : ndarray, shape (L,)
        Labels subtracted before building the term vector.
    label_names : tuple of str
        ``("TEFF", "LOGG", "FE_H", "ALPHA_FE")``.
    term_names : tuple of str
        Human-readable terms in row order of ``coeffs``: ``"1"``, ``"TEFF"``, ``"TEFF*LOGG"``...
    term_indices : tuple of tuple of int
        Label indices multiplied together for each term (empty for the constant).
    wavelength : ndarray, shape (P,)
        Vacuum wavelength in Angstrom.
    label_range : ndarray, shape (2, L)
        Minimum and maximum of the model's real training labels (its range of validity).
    """

    coeffs: np.ndarray
    scatter: np.ndarray
    baseline_labels: np.ndarray
    label_names: tuple
    term_names: tuple
    term_indices: tuple
    wavelength: np.ndarray
    label_range: np.ndarray

    def design_matrix(self, labels) -> np.ndarray:
        """Return the term vectors, shape (N, K), for labels of shape (N, L) or (L,)."""
        x = np.atleast_2d(np.asarray(labels, dtype=np.float64))
        if x.ndim != 2 or x.shape[1] != len(self.label_names):
            raise ValueError(f"labels have shape {x.shape}, expected (N, {len(self.label_names)}) "
                             f"({', '.join(self.label_names)})")
        x = x - self.baseline_labels
        columns = [np.prod(x[:, list(idx)], axis=1) if idx else np.ones(len(x))
                   for idx in self.term_indices]
        return np.stack(columns, axis=1)

    def flux(self, labels) -> np.ndarray:
        """Return the normalised model flux, shape (N, P), for labels of shape (N, L)."""
        return self.design_matrix(labels) @ self.coeffs

    __call__ = flux

    def in_range(self, labels) -> np.ndarray:
        """True for each row of ``labels`` inside the model's training label range."""
        labels = np.atleast_2d(labels)
        return np.all((labels >= self.label_range[0]) & (labels <= self.label_range[1]), axis=1)


def _parse_terms(term_names, label_names):
    index = {name: i for i, name in enumerate(label_names)}
    parsed = []
    for term in term_names:
        if term == "1":
            parsed.append(())
            continue
        try:
            parsed.append(tuple(index[part] for part in term.split("*")))
        except KeyError as exc:
            raise ValueError(f"term {term!r} uses an unknown label {exc.args[0]!r}") from None
    return tuple(parsed)


def bovy_model() -> BovyModel:
    """Load the shipped Bovy (2015) quadratic Cannon model.

    Returns
    -------
    BovyModel
        Coefficients, term layout and a vectorised ``flux(labels)``.
    """
    arrays = bovy_model_arrays()
    label_names = tuple(str(n) for n in arrays["label_names"])
    term_names = tuple(str(n) for n in arrays["term_names"])
    labels = bovy_training_labels()["labels"]
    model = BovyModel(
        coeffs=arrays["coeffs"],
        scatter=arrays["scatter"],
        baseline_labels=arrays["baseline_labels"],
        label_names=label_names,
        term_names=term_names,
        term_indices=_parse_terms(term_names, label_names),
        wavelength=apogee_wavelength(),
        label_range=np.array([labels.min(axis=0), labels.max(axis=0)]),
    )
    if model.coeffs.shape != (len(term_names), model.wavelength.size):
        raise ValueError(f"model coefficients {model.coeffs.shape} do not match "
                         f"{len(term_names)} terms x {model.wavelength.size} pixels")
    return model


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------

def _draw_labels(rng, n, model, jitter):
    """Resample real labels, jitter them, and reflect/clip them into the model's range."""
    source = bovy_training_labels()
    pick = rng.integers(0, len(source["labels"]), size=n)
    sigma = np.array([jitter[name] for name in model.label_names])
    labels = source["labels"][pick] + rng.standard_normal((n, len(sigma))) * sigma
    lo, hi = model.label_range
    # Reflect once at the edges (keeps density near the edge), then clip what is still out.
    labels = np.where(labels < lo, 2 * lo - labels, labels)
    labels = np.where(labels > hi, 2 * hi - labels, labels)
    labels = np.clip(labels, lo, hi)
    return labels, source["apogee_id"][pick]


def _simulate(rng, model, labels, snr, bad_fraction):
    """Model flux + intrinsic scatter + photon-like noise, with 2-3% bad pixels.

    Noise sigma_i = sqrt(f_i) / snr (normalised photon noise: the continuum has S/N = snr).
    ivar excludes the intrinsic scatter: that is what the Cannon's s2 has to learn.
    """
    n, p = len(labels), model.wavelength.size
    clean = model.flux(labels)
    sigma = np.sqrt(np.clip(clean, 0.05, None)) / snr[:, None]
    flux = clean + model.scatter * rng.standard_normal((n, p)) + sigma * rng.standard_normal((n, p))
    ivar = 1.0 / sigma**2
    frac = rng.uniform(*bad_fraction, size=n)
    u = rng.random((n, p))
    bad = u < frac[:, None]
    ivar[bad] = 0.0
    # About half of the bad pixels also get NaN flux, as real reductions do at dead pixels.
    flux[bad & (u < 0.5 * frac[:, None])] = np.nan
    return flux.astype(np.float32), ivar.astype(np.float32)


def _spoil(rng, flux, ivar, kind, n_labels):
    """Make one test spectrum deliberately unusable (in place); return its expected flags."""
    if kind == "all_masked":
        ivar[:] = 0.0
        return _flags.NO_INFORMATION
    if kind == "all_nan":
        flux[:] = np.nan
        ivar[:] = 0.0
        return _flags.NO_INFORMATION
    if kind == "few_pixels":
        keep = rng.choice(flux.size, size=n_labels - 1, replace=False)  # fewer than L + 1
        good = ivar[keep].copy()
        ivar[:] = 0.0
        ivar[keep] = np.where(good > 0, good, 1e4)
        flux[keep] = np.where(np.isfinite(flux[keep]), flux[keep], 1.0)
        return _flags.FEW_PIXELS
    raise ValueError(f"unknown bad-spectrum kind {kind!r}")


def _primary_header(kind, seed, extra=None):
    from astropy.io import fits

    header = fits.Header()
    header["ORIGIN"] = ("astra_cannon", "software that wrote this file")
    header["EXAMPLE"] = (kind, "astra_cannon example file type")
    header["EXVERS"] = (EXAMPLE_FORMAT_VERSION, "example file layout version")
    header["SEED"] = (int(seed), "random seed of generate_example")
    header["SYNTHETI"] = (True, "synthetic spectra, not real observations")
    header["WAVETYPE"] = ("vacuum", "wavelength in vacuum Angstrom")
    header["NORMALIS"] = (True, "flux is continuum-normalised")
    for key, value in (extra or {}).items():
        header[key] = value
    header["COMMENT"] = ORIGIN
    header["COMMENT"] = "Licence: " + LICENSE
    return header


def _write_fits(path, hdus):
    from astropy.io import fits

    hdul = fits.HDUList(hdus)
    for hdu in hdul:
        hdu.add_checksum(when="")  # no timestamp in the comment: same seed, same bytes
    tmp = Path(str(path) + ".part")
    hdul.writeto(tmp, overwrite=True)
    os.replace(tmp, path)  # never leave a half-written file under the final name


def _image(data, name, unit=None):
    from astropy.io import fits

    hdu = fits.ImageHDU(data, name=name)
    if unit:
        hdu.header["BUNIT"] = unit
    return hdu


def _wavelength_hdu(wavelength):
    hdu = _image(np.asarray(wavelength, dtype=np.float64), "WAVELENGTH", "Angstrom")
    hdu.header["WAVETYPE"] = ("vacuum", "vacuum wavelength")
    return hdu


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def generate_example(directory, n_train=300, n_test=3000, n_files=6, seed=2026,
                     snr_range=(50.0, 200.0), bad_pixel_fraction=(0.02, 0.03),
                     bad_spectra=("all_masked", "all_nan", "few_pixels", "all_masked"),
                     jitter=None, overwrite=False) -> dict:
    """Write a deterministic APOGEE-like example data set (see the module docstring for layout).

    Parameters
    ----------
    directory : str or Path
        Output directory (created if needed).
    n_train : int
        Number of training spectra (all usable).
    n_test : int
        Number of test spectra, including the deliberately bad ones.
    n_files : int
        Number of test spectra files; rows are split as evenly as possible.
    seed : int
        Random seed; the same seed gives byte-identical files.
    snr_range : (float, float)
        Per-spectrum S/N is drawn uniformly from this range.
    bad_pixel_fraction : (float, float)
        Per-spectrum fraction of masked pixels (ivar 0, about half with NaN flux).
    bad_spectra : sequence of str
        Kinds of deliberately unusable test spectra, one spectrum each, placed in random rows:
        ``"all_masked"`` (ivar 0 everywhere), ``"all_nan"`` (NaN flux, ivar 0) and
        ``"few_pixels"`` (fewer usable pixels than labels + 1).
    jitter : dict, optional
        Gaussian sigma per label added to resampled real labels (default ``DEFAULT_JITTER``).
    overwrite : bool
        Replace an existing example in ``directory``.

    Returns
    -------
    dict
        The manifest (also written to ``manifest.json``): parameters, ``label_names``,
        ``training_set``, ``spectra`` (list of file entries), ``truth``, ``bad_spectra``,
        ``n_pixels``; file entries hold a path relative to ``directory``, sha256, size and rows.

    Raises
    ------
    FileExistsError
        If ``directory`` already holds an example and ``overwrite`` is False.
    ValueError
        For inconsistent sizes (e.g. fewer test spectra than files).
    """
    from astropy.io import fits
    from astropy.table import Table

    directory = Path(directory)
    n_train, n_test, n_files = int(n_train), int(n_test), int(n_files)
    if n_train < 1 or n_files < 1 or n_test < n_files:
        raise ValueError(f"need n_train >= 1, n_files >= 1 and n_test >= n_files "
                         f"(got {n_train}, {n_test}, {n_files})")
    if len(bad_spectra) > n_test:
        raise ValueError("more bad spectra requested than test spectra")
    if (directory / MANIFEST_NAME).exists() and not overwrite:
        raise FileExistsError(f"{directory / MANIFEST_NAME} exists; pass overwrite=True")
    (directory / SPECTRA_DIR).mkdir(parents=True, exist_ok=True)

    model = bovy_model()
    jitter = {**DEFAULT_JITTER, **(jitter or {})}
    names = list(model.label_names)
    rng = np.random.default_rng(seed)

    # Training set.
    train_labels, train_ids = _draw_labels(rng, n_train, model, jitter)
    train_snr = rng.uniform(*snr_range, size=n_train)
    train_flux, train_ivar = _simulate(rng, model, train_labels, train_snr, bad_pixel_fraction)
    table = Table({"APOGEE_ID": train_ids.astype(str)})
    for i, name in enumerate(names):
        table[name] = train_labels[:, i]
    table["SNR"] = train_snr
    training_path = directory / TRAINING_NAME
    _write_fits(training_path, [
        fits.PrimaryHDU(header=_primary_header("training_set", seed, {"NSPEC": n_train})),
        _named(fits.table_to_hdu(table), "LABELS"),
        _image(train_flux, "FLUX"),
        _image(train_ivar, "IVAR"),
        _wavelength_hdu(model.wavelength),
    ])

    # Test spectra: labels and S/N for all first, then noise file by file (bounded memory).
    test_labels, test_sources = _draw_labels(rng, n_test, model, jitter)
    test_snr = rng.uniform(*snr_range, size=n_test)
    bad_rows = rng.choice(n_test, size=len(bad_spectra), replace=False)
    kind = np.full(n_test, "good", dtype="<U16")
    kind[bad_rows] = list(bad_spectra)
    expected = np.zeros(n_test, dtype=np.int64)
    identifiers = np.array([f"example-{seed}-{i:05d}" for i in range(n_test)])
    file_column = np.empty(n_test, dtype="<U64")
    row_column = np.empty(n_test, dtype=np.int64)
    spectra_entries = []
    for k, rows in enumerate(np.array_split(np.arange(n_test), n_files)):
        flux, ivar = _simulate(rng, model, test_labels[rows], test_snr[rows], bad_pixel_fraction)
        for j, row in enumerate(rows):
            if kind[row] != "good":
                expected[row] = _spoil(rng, flux[j], ivar[j], kind[row], len(names))
        relative = f"{SPECTRA_DIR}/example-spectra-{k:02d}.fits"
        ids = Table({"IDENTIFIER": identifiers[rows], "ROW": np.arange(len(rows)),
                     "SNR": test_snr[rows]})
        path = directory / relative
        _write_fits(path, [
            fits.PrimaryHDU(header=_primary_header("spectra", seed, {"NSPEC": len(rows), "FILEIDX": k})),
            _image(flux, "FLUX"),
            _image(ivar, "IVAR"),
            _wavelength_hdu(model.wavelength),
            _named(fits.table_to_hdu(ids), "IDS"),
        ])
        file_column[rows] = relative
        row_column[rows] = np.arange(len(rows))
        spectra_entries.append({"path": relative, "n_spectra": int(len(rows)),
                                "sha256": _sha256(path), "size_bytes": path.stat().st_size})

    truth = Table({"IDENTIFIER": identifiers, "FILE": file_column, "ROW": row_column,
                   "SOURCE_ID": test_sources.astype(str)})
    units = {"TEFF": "K", "LOGG": "dex", "FE_H": "dex", "ALPHA_FE": "dex"}
    for i, name in enumerate(names):
        truth[name] = test_labels[:, i]
        truth[name].unit = units.get(name)
    truth["SNR"] = test_snr
    truth["KIND"] = kind
    truth["EXPECTED_FLAGS"] = expected
    truth.meta = {"seed": int(seed), "origin": ORIGIN, "license": LICENSE,
                  "description": "true labels of the astra_cannon example test spectra"}
    truth_path = directory / TRUTH_NAME
    truth.write(truth_path, format="ascii.ecsv", overwrite=True)

    manifest = {
        "format_version": EXAMPLE_FORMAT_VERSION,
        "origin": ORIGIN,
        "license": LICENSE,
        "parameters": {"n_train": n_train, "n_test": n_test, "n_files": n_files, "seed": int(seed),
                       "snr_range": [float(v) for v in snr_range],
                       "bad_pixel_fraction": [float(v) for v in bad_pixel_fraction],
                       "jitter": {k: float(v) for k, v in jitter.items()}},
        "label_names": names,
        "label_units": [units.get(n) for n in names],
        "n_pixels": int(model.wavelength.size),
        "wavelength": {"min": float(model.wavelength[0]), "max": float(model.wavelength[-1]),
                       "medium": "vacuum", "unit": "Angstrom"},
        "training_set": {"path": TRAINING_NAME, "n_spectra": n_train,
                         "sha256": _sha256(training_path), "size_bytes": training_path.stat().st_size},
        "spectra": spectra_entries,
        "truth": {"path": TRUTH_NAME, "sha256": _sha256(truth_path),
                  "size_bytes": truth_path.stat().st_size},
        "bad_spectra": [{"identifier": str(identifiers[r]), "file": str(file_column[r]),
                         "row": int(row_column[r]), "kind": str(kind[r]),
                         "expected_flags": int(expected[r]),
                         "expected_flag_names": _flags.decode(int(expected[r]))}
                        for r in sorted(bad_rows)],
    }
    tmp = directory / (MANIFEST_NAME + ".part")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, directory / MANIFEST_NAME)
    return manifest


def _named(hdu, name):
    hdu.name = name
    return hdu


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def read_manifest(directory) -> dict:
    """Read ``manifest.json`` of an example directory."""
    return json.loads((Path(directory) / MANIFEST_NAME).read_text())


def _clean(flux, ivar):
    """Native float64 copies with ivar 0 wherever flux or ivar is unusable."""
    flux = np.array(flux, dtype=np.float64)
    ivar = np.array(ivar, dtype=np.float64)
    bad = ~np.isfinite(flux) | ~np.isfinite(ivar) | (ivar < 0)
    ivar[bad] = 0.0
    flux[~np.isfinite(flux)] = MASKED_FLUX_VALUE
    return flux, ivar


def _unreadable(path, reason, wavelength):
    wl = apogee_wavelength() if wavelength is None else np.asarray(wavelength, dtype=np.float64)
    return Spectra(
        identifiers=[str(path)],
        flux=np.full((1, wl.size), np.nan),
        ivar=np.zeros((1, wl.size)),
        wavelength=wl,
        flags=[_flags.UNREADABLE_INPUT],
        reasons=[reason],
        sources=[{"path": str(path), "hdu": None, "row": None, "checksum": None}],
        normalised=True,
        meta=[{}],
    )


def _read_one(path, wavelength):
    from astropy.io import fits

    path = Path(path)
    try:
        checksum = _sha256(path)
        with warnings.catch_warnings():
            # astropy reports a checksum mismatch as a warning; we make it a flagged failure.
            warnings.simplefilter("error")
            with fits.open(path, checksum=True, memmap=False) as hdul:
                flux = hdul["FLUX"].data
                ivar = hdul["IVAR"].data
                file_wl = np.asarray(hdul["WAVELENGTH"].data, dtype=np.float64)
                ids = hdul["IDS"].data
                identifiers = [str(v).strip() for v in ids["IDENTIFIER"]]
                snr = np.asarray(ids["SNR"], dtype=np.float64)
                flux, ivar = _clean(flux, ivar)
    except Exception as exc:  # one bad file must not stop a batch
        return _unreadable(path, f"cannot read {path.name}: {type(exc).__name__}: {exc}", wavelength)

    n = len(identifiers)
    if flux.ndim != 2 or flux.shape != ivar.shape or flux.shape[0] != n or flux.shape[1] != file_wl.size:
        return _unreadable(path, f"{path.name}: inconsistent FLUX {flux.shape}, IVAR {ivar.shape}, "
                                 f"{n} identifiers, {file_wl.size} wavelengths", wavelength)
    flag = np.zeros(n, dtype=np.int64)
    reasons = [None] * n
    grid = file_wl
    if wavelength is not None:
        grid = np.asarray(wavelength, dtype=np.float64)
        if grid.shape != file_wl.shape or not np.allclose(grid, file_wl, rtol=0, atol=1e-6):
            flag[:] = _flags.BAD_WAVELENGTH_GRID
            reasons = [f"{path.name}: wavelength grid ({file_wl.size} px) differs from the "
                       f"requested grid ({grid.size} px)"] * n
            flux = np.full((n, grid.size), np.nan)
            ivar = np.zeros((n, grid.size))
    usable = (ivar > 0).sum(axis=1)
    empty = (usable == 0) & (flag == 0)
    flag[empty] |= _flags.NO_INFORMATION
    for i in np.flatnonzero(empty):
        reasons[i] = "no usable pixel (ivar is zero or flux non-finite everywhere)"
    return Spectra(
        identifiers=identifiers,
        flux=flux,
        ivar=ivar,
        wavelength=grid,
        flags=flag,
        reasons=reasons,
        sources=[{"path": str(path), "hdu": "FLUX", "row": i, "checksum": checksum} for i in range(n)],
        normalised=True,
        meta=[{"snr": float(s), "n_pixels": int(u)} for s, u in zip(snr, usable)],
    )


def read_example_spectra(path, wavelength=None) -> Spectra:
    """Read example test spectra files into one :class:`~astra_cannon.io.base.Spectra`.

    Non-finite flux or ivar and negative ivar become masked pixels (ivar 0, flux 1). A spectrum
    with no usable pixel is flagged ``NO_INFORMATION``; an unreadable or corrupted file (bad
    checksum) gives one row flagged ``UNREADABLE_INPUT``; a file on another wavelength grid than
    ``wavelength`` has every row flagged ``BAD_WAVELENGTH_GRID``.

    Parameters
    ----------
    path : str, Path or sequence of them
        One ``example-spectra-NN.fits`` file, several, or an example directory (all its
        spectra files in manifest order).
    wavelength : ndarray, optional
        The model's wavelength grid; default the file's own grid.

    Returns
    -------
    Spectra
        Normalised spectra with identifiers from the file's IDS table, ``sources`` pointing at
        the file, row and file sha256, and ``meta`` holding ``snr`` and ``n_pixels``.

    Raises
    ------
    ValueError
        If no path is given.
    """
    if isinstance(path, (str, os.PathLike)):
        p = Path(path)
        if p.is_dir():
            paths = [p / entry["path"] for entry in read_manifest(p)["spectra"]]
        else:
            paths = [p]
    else:
        paths = [Path(p) for p in path]
    if not paths:
        raise ValueError("no example spectra files given")
    if wavelength is None and len(paths) > 1:
        wavelength = apogee_wavelength()
    return Spectra.concatenate([_read_one(p, wavelength) for p in paths])


def read_example_training_set(path):
    """Read the example training set.

    Parameters
    ----------
    path : str or Path
        ``training_set.fits`` or the example directory.

    Returns
    -------
    labels : ndarray, shape (N, L)
    label_names : list of str
    identifiers : list of str
        APOGEE IDs of the real stars whose labels were resampled (may repeat).
    flux : ndarray, shape (N, P)
        Non-finite flux replaced by 1 with ivar 0.
    ivar : ndarray, shape (N, P)
    wavelength : ndarray, shape (P,)

    Raises
    ------
    OSError
        If the file is missing, not FITS, or fails its checksum (training must not go on
        with a damaged training set).
    """
    from astropy.io import fits

    path = Path(path)
    if path.is_dir():
        path = path / TRAINING_NAME
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            with fits.open(path, checksum=True, memmap=False) as hdul:
                table = hdul["LABELS"].data
                label_names = [c for c in table.columns.names if c not in ("APOGEE_ID", "SNR")]
                labels = np.stack([np.asarray(table[c], dtype=np.float64) for c in label_names], axis=1)
                identifiers = [str(v).strip() for v in table["APOGEE_ID"]]
                flux, ivar = _clean(hdul["FLUX"].data, hdul["IVAR"].data)
                wavelength = np.asarray(hdul["WAVELENGTH"].data, dtype=np.float64)
        except (OSError, KeyError, ValueError, Warning) as exc:
            raise OSError(f"cannot read example training set {path}: {type(exc).__name__}: {exc}") from exc
    return labels, label_names, identifiers, flux, ivar, wavelength


def example_truth(path):
    """Return the true labels of the example test spectra as an astropy Table.

    Parameters
    ----------
    path : str or Path
        ``truth.ecsv`` or the example directory.

    Returns
    -------
    astropy.table.Table
        Columns IDENTIFIER, FILE, ROW, SOURCE_ID, the label columns (with units), SNR, KIND,
        EXPECTED_FLAGS; one row per test spectrum, in file order.
    """
    from astropy.table import Table

    path = Path(path)
    if path.is_dir():
        path = path / TRUTH_NAME
    return Table.read(path, format="ascii.ecsv")
