"""Synthetic spectra generated on the fly from a tiny "synthetic source" file.

A survey-sized test set (10^5 - 10^6 spectra of 7214 pixels, 6-60 GB as float64) is never
stored: a source file of a few hundred bytes names the generating model, a seed and a row
count, and the reader makes rows ``[start, stop)`` when asked. Used by the scale benchmark
(``benchmarks/scale_pipeline.py``) and the scale/fault tests.

Source file (JSON, any name; ``write_synthetic_source`` writes one)::

    {"format": "astra_cannon.synthetic", "version": 1,
     "model": "bovy",            # astra_cannon.io.example.bovy_model (only model so far)
     "seed": 1, "count": 2000,   # rows 0 .. count-1 of this file
     "first_row": 0,             # global row of row 0: identifiers and randomness use it
     "snr_range": [50, 200], "bad_pixel_fraction": 0.02, "prefix": "synth"}

Determinism: everything about global row ``g`` (labels, S/N, noise offset, bad pixels) comes
from a counter-based hash of ``(seed, g)`` (splitmix64), so a row is identical however the
rows are cut into files, chunks or ranges. Noise is a window of a fixed bank of standard
normals (made once per seed) starting at a per-row offset: gathering a window costs a memory
copy, where drawing 7214 fresh normals per spectrum would cost more than fitting it. The
windows of different rows overlap, which is irrelevant for throughput and recovery tests but
means the noise of two rows is not independent.

Spectra are the model flux plus the model's intrinsic scatter and photon-like noise
``sqrt(f) / snr`` (combined into one Gaussian), normalised, on the 7214-pixel APOGEE grid,
with about ``bad_pixel_fraction`` of pixels masked (ivar 0; half of them NaN flux).
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np

from .. import flags as F
from .base import Spectra

__all__ = ["SOURCE_FORMAT", "write_synthetic_source", "read_source", "count_synthetic",
           "read_synthetic", "synthetic_truth"]

SOURCE_FORMAT = "astra_cannon.synthetic"
SOURCE_VERSION = 1
MODELS = ("bovy",)
_BANK_SIZE = 1 << 20  # normals in the noise bank (8 MB); windows of P pixels start anywhere
_MAX_SOURCE_BYTES = 1 << 16  # a source file is tiny; refuse to parse anything big
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def write_synthetic_source(path, *, count, seed=1, first_row=0, model="bovy",
                           snr_range=(50.0, 200.0), bad_pixel_fraction=0.02, prefix="synth"):
    """Write a synthetic source file (atomically) and return its content.

    Parameters
    ----------
    path : str or os.PathLike
    count : int
        Rows in this file (>= 1).
    seed : int
        Seed of the whole synthetic survey (>= 0).
    first_row : int
        Global row number of this file's first row (>= 0): files ``[0, n)``, ``[n, 2n)``, ...
        of one seed make one survey with unique identifiers.
    model : {"bovy"}
    snr_range : (float, float)
    bad_pixel_fraction : float
        Fraction of masked pixels per spectrum, in [0, 0.5].
    prefix : str
        Identifier prefix; identifiers are ``f"{prefix}-{seed}-{global_row:09d}"``.

    Returns
    -------
    dict

    Raises
    ------
    ValueError
        For out-of-range parameters.
    """
    source = {"format": SOURCE_FORMAT, "version": SOURCE_VERSION, "model": model, "seed": seed,
              "count": count, "first_row": first_row, "snr_range": list(snr_range),
              "bad_pixel_fraction": bad_pixel_fraction, "prefix": prefix}
    source = _validate(source, os.fspath(path))
    tmp = f"{os.fspath(path)}.part"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(source, fh, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)
    return source


def _validate(source, path):
    def bad(why):
        return ValueError(f"{path}: not a valid synthetic source ({why})")

    if not isinstance(source, dict) or source.get("format") != SOURCE_FORMAT:
        raise bad(f"'format' must be {SOURCE_FORMAT!r}")
    if source.get("version") != SOURCE_VERSION:
        raise bad(f"version {source.get('version')!r}, expected {SOURCE_VERSION}")
    if source.get("model") not in MODELS:
        raise bad(f"unknown model {source.get('model')!r}; expected one of {MODELS}")
    out = dict(source)
    for key, low in (("seed", 0), ("count", 1), ("first_row", 0)):
        value = source.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low or value >= 2**40:
            raise bad(f"{key!r} must be an integer in [{low}, 2**40), got {value!r}")
    try:
        lo, hi = (float(v) for v in source.get("snr_range", (50.0, 200.0)))
        frac = float(source.get("bad_pixel_fraction", 0.02))
    except (TypeError, ValueError):
        raise bad("snr_range must be two numbers and bad_pixel_fraction a number") from None
    if not (0 < lo <= hi < 1e6):
        raise bad(f"snr_range must satisfy 0 < low <= high, got {[lo, hi]}")
    if not (0.0 <= frac <= 0.5):
        raise bad(f"bad_pixel_fraction must be in [0, 0.5], got {frac}")
    prefix = str(source.get("prefix", "synth"))
    if not prefix or len(prefix) > 64 or not all(c.isalnum() or c in "-_." for c in prefix):
        raise bad(f"prefix must be 1-64 letters, digits or -_. (got {prefix[:80]!r})")
    out.update(snr_range=[lo, hi], bad_pixel_fraction=frac, prefix=prefix)
    return out


def read_source(path) -> dict:
    """Read and validate a synthetic source file.

    Raises
    ------
    OSError
        Missing or unreadable file.
    ValueError
        Not a synthetic source (wrong format, bad JSON, out-of-range values, too big).
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        raw = fh.read(_MAX_SOURCE_BYTES + 1)
    if len(raw) > _MAX_SOURCE_BYTES:
        raise ValueError(f"{path}: larger than {_MAX_SOURCE_BYTES} bytes; not a synthetic source")
    try:
        source = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a valid synthetic source (not JSON: {exc})") from None
    return _validate(source, path)


def count_synthetic(path):
    """Row count of a synthetic source without generating anything, or ``None`` if unreadable."""
    try:
        return int(read_source(path)["count"])
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=2)
def _model():
    from .example import bovy_model

    return bovy_model()


@functools.lru_cache(maxsize=4)
def _bank(seed, n_pixels):
    bank = np.random.default_rng([int(seed), 0x5EED]).standard_normal(_BANK_SIZE + n_pixels)
    bank.setflags(write=False)
    return bank


def _hash_uniform(seed, rows, stream, size=None):
    """Uniforms in [0, 1) from splitmix64(seed, row, stream[, j]): shape (n,) or (n, size)."""
    rows = np.asarray(rows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
             + rows * np.uint64(0xBF58476D1CE4E5B9) + np.uint64(stream) * np.uint64(0x94D049BB133111EB))
        if size is not None:
            x = x[:, None] + np.arange(1, size + 1, dtype=np.uint64)[None, :] * np.uint64(0xD6E8FEB86659FD93)
        x = x & _MASK64
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _normal(seed, rows, stream):
    u1 = _hash_uniform(seed, rows, stream)
    u2 = _hash_uniform(seed, rows, stream + 1)
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


def synthetic_truth(source, rows):
    """True labels and S/N of global rows of a source (no pixels).

    Parameters
    ----------
    source : dict
        From :func:`read_source`.
    rows : array_like of int
        Global row numbers.

    Returns
    -------
    labels : ndarray (n, 4)
        TEFF, LOGG, FE_H, ALPHA_FE (the Bovy model's label order).
    snr : ndarray (n,)
    """
    from ..data import bovy_training_labels
    from .example import DEFAULT_JITTER

    model, seed = _model(), source["seed"]
    rows = np.asarray(rows, dtype=np.int64)
    real = bovy_training_labels()["labels"]
    pick = np.minimum((_hash_uniform(seed, rows, 1) * len(real)).astype(np.int64), len(real) - 1)
    sigma = np.array([DEFAULT_JITTER[n] for n in model.label_names])
    jitter = np.stack([_normal(seed, rows, 10 + 2 * j) for j in range(len(sigma))], axis=1)
    labels = real[pick] + jitter * sigma
    lo, hi = model.label_range
    labels = np.clip(np.where(labels < lo, 2 * lo - labels, np.where(labels > hi, 2 * hi - labels, labels)), lo, hi)
    s_lo, s_hi = source["snr_range"]
    snr = s_lo + (s_hi - s_lo) * _hash_uniform(seed, rows, 2)
    return labels, snr


def _generate(source, rel_rows):
    """Flux, ivar and S/N of rows (relative to the file); masked pixels already flux 1, ivar 0.

    Written as few full passes over (n, P) as possible (in-place operations): generation must
    stay cheap next to fitting, as reading a file would be.
    """
    from .example import MASKED_FLUX_VALUE

    model, seed = _model(), source["seed"]
    rows = source["first_row"] + rel_rows
    n, p = rows.size, model.wavelength.size
    labels, snr = synthetic_truth(source, rows)
    clean = model.flux(labels)
    var = np.maximum(clean, 0.05)  # photon-like variance sqrt(f)^2 / snr^2
    var /= (snr**2)[:, None]
    ivar = np.reciprocal(var)
    var += model.scatter[None, :] ** 2  # plus the intrinsic scatter: one Gaussian
    np.sqrt(var, out=var)
    offsets = (_hash_uniform(seed, rows, 3) * _BANK_SIZE).astype(np.int64)
    flux = np.lib.stride_tricks.sliding_window_view(_bank(seed, p), p)[offsets]
    flux *= var
    flux += clean
    k = int(round(source["bad_pixel_fraction"] * p))
    if k and n:
        bad = np.minimum((_hash_uniform(seed, rows, 4, size=k) * p).astype(np.int64), p - 1)
        r = np.repeat(np.arange(n), k).reshape(n, k)
        ivar[r, bad] = 0.0
        # Half of the masked pixels are NaN in a real reduction; readers turn those into flux
        # MASKED_FLUX_VALUE with ivar 0, which is what is stored here directly.
        half = k // 2
        flux[r[:, :half], bad[:, :half]] = MASKED_FLUX_VALUE
    return flux, ivar, snr


def read_synthetic(path, rows=None) -> Spectra:
    """Generate the spectra of a synthetic source file.

    Parameters
    ----------
    path : str or os.PathLike
        A synthetic source file.
    rows : None, slice, range or sequence of int
        Rows of this file to generate (``0 <= row < count``); default all. Rows outside the
        file are dropped.

    Returns
    -------
    Spectra
        Normalised, native float64, on the 7214-pixel APOGEE grid. Masked pixels have ivar 0;
        half of them flux 1, as the example reader leaves NaN flux. ``sources`` hold the path and
        the row in this file; ``meta`` the S/N. An unreadable or invalid source gives one
        spectrum flagged ``UNREADABLE_INPUT`` with the reason.
    """
    model = _model()
    try:
        source = read_source(path)
    except (OSError, ValueError) as exc:
        return Spectra(identifiers=[os.path.basename(os.fspath(path))],
                       flux=np.full((1, model.wavelength.size), np.nan),
                       ivar=np.zeros((1, model.wavelength.size)), wavelength=model.wavelength,
                       flags=[F.UNREADABLE_INPUT], reasons=[f"{os.fspath(path)}: {type(exc).__name__}: {exc}"],
                       sources=[{"path": os.fspath(path), "hdu": None, "row": None, "checksum": None}],
                       normalised=True, meta=[{}])
    count = source["count"]
    if rows is None:
        rel = np.arange(count, dtype=np.int64)
    elif isinstance(rows, slice):
        rel = np.arange(count, dtype=np.int64)[rows]
    else:
        rel = np.asarray(list(rows) if isinstance(rows, range) else rows, dtype=np.int64).ravel()
        rel = rel[(rel >= 0) & (rel < count)]
    flux, ivar, snr = _generate(source, rel)
    prefix, seed, first = source["prefix"], source["seed"], source["first_row"]
    path = os.fspath(path)
    return Spectra(
        identifiers=[f"{prefix}-{seed}-{first + r:09d}" for r in rel.tolist()],
        flux=flux, ivar=ivar, wavelength=model.wavelength,
        flags=np.zeros(rel.size, dtype=np.int64), reasons=[None] * rel.size,
        sources=[{"path": path, "hdu": None, "row": r, "checksum": None} for r in rel.tolist()],
        normalised=True,
        meta=[{"snr": s} for s in snr.tolist()],
    )
