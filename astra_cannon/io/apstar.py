"""Read APOGEE apStar files (DR12-DR17 layout) into :class:`~astra_cannon.io.base.Spectra`.

Layout (DR17): HDU0 header (``CRVAL1``, ``CDELT1``, ``NWAVE``, ``SNR``, ``NVISITS``, ...),
HDU1 flux (1e-17 erg/s/cm^2/A), HDU2 flux error (sigma), HDU3 APOGEE_PIXMASK, each of shape
(rows, 8575) and big-endian. Rows 0-1 are combined spectra and visits start at row 2 (a
one-visit star has only the two combined rows); old files may hold a single 1-D spectrum.

A file that cannot be read never raises: it becomes one spectrum with NaN flux, zero ivar, the
``UNREADABLE_INPUT`` flag and a reason naming the path and the error. The helpers at the bottom
are shared with :mod:`astra_cannon.io.aspcapstar`.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings

import numpy as np

from .. import flags as F
from . import bitmask, grid
from .base import Spectra

_ROW_CHOICES = ("combined", "visits", "all")


class UnreadableFile(Exception):
    """Internal: a file-level problem that must become a flagged spectrum."""

    def __init__(self, message, flag=F.UNREADABLE_INPUT):
        super().__init__(message)
        self.flag = flag


def read_apstar(path, *, rows="combined", pixmask=None, verify_checksum=False, file_checksum=True):
    """Read one apStar file.

    Parameters
    ----------
    path : str or os.PathLike
        The apStar file.
    rows : {"combined", "visits", "all"} or int or sequence of int
        Which rows of the 2-D arrays to return: ``"combined"`` (row 0, the default),
        ``"visits"`` (rows 2 onward; row 0 when the file holds a single visit), ``"all"``, or
        explicit row numbers. A 1-D (old) file has exactly one row.
    pixmask : int or iterable of str, optional
        APOGEE_PIXMASK bits whose pixels get ivar 0; default
        :data:`astra_cannon.io.bitmask.DEFAULT_PIXMASK`; ``0`` honours none.
    verify_checksum : bool
        Check ``CHECKSUM``/``DATASUM`` where present; a mismatch flags the file unreadable.
    file_checksum : bool
        Record the sha256 of the file bytes in ``sources[i]["sha256"]`` (for provenance).

    Returns
    -------
    Spectra
        Native float64 flux and ivar, unnormalised. Pixels get ivar 0 where the flux is not
        finite, sigma is not finite or <= 0, or an honoured mask bit is set. A file that cannot
        be read, or has no usable pixel, gives flagged spectra (see the module docstring).

    Raises
    ------
    ValueError
        For an invalid ``rows`` string or ``pixmask`` (configuration, not data).
    """
    path = os.fspath(path)
    if isinstance(rows, str) and rows not in _ROW_CHOICES:
        raise ValueError(f"rows must be one of {_ROW_CHOICES} or row numbers, got {rows!r}")
    bitmask.resolve_pixmask(pixmask)  # a bad pixmask is configuration: raise, do not flag
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hdus, header, checksum_status = read_hdus(path, (1, 2, 3), verify_checksum, optional=(3,))
            check_caught_warnings(caught)
        flux, sigma, mask = hdus[1], hdus[2], hdus[3]
        flux = np.atleast_2d(flux)
        sigma = np.atleast_2d(sigma)
        if flux.ndim != 2 or sigma.shape != flux.shape:
            raise UnreadableFile(f"flux {flux.shape} and sigma {sigma.shape} differ in shape", F.BAD_INPUT_SHAPE)
        if mask is not None:
            mask = np.atleast_2d(mask)
            if mask.shape != flux.shape:
                raise UnreadableFile(f"bitmask {mask.shape} and flux {flux.shape} differ in shape", F.BAD_INPUT_SHAPE)
        wavelength, wl_source = header_wavelength(header, hdus.get("header1"), flux.shape[1], default_8575=True)
        row_index = select_rows(rows, flux.shape[0])
    except Exception as exc:  # noqa: BLE001 - every per-file failure becomes a flagged spectrum
        return failed_spectra(path, exc)

    bad = bitmask.bad_pixels(mask[row_index], pixmask) if mask is not None else None
    flux_out, ivar = ivar_from_sigma(flux[row_index], sigma[row_index], bad)
    base_meta = header_meta(header)
    base_meta["wavelength_source"] = wl_source
    if mask is None:
        base_meta["warning"] = "no pixel bitmask HDU"
    sha = sha256_file(path) if file_checksum else None
    name = os.path.basename(path)
    meta, sources, identifiers = [], [], []
    for r in row_index:
        m = dict(base_meta, row=int(r), kind=row_kind(int(r), flux.shape[0]))
        if m["kind"] == "visit":
            m["snr"] = json_float(header.get(f"SNRVIS{int(r) - 1}"))
        meta.append(m)
        sources.append({"path": path, "hdu": 1, "row": int(r), "checksum": checksum_status, "sha256": sha})
        identifiers.append(f"{name}[{int(r)}]")
    out = Spectra(identifiers=identifiers, flux=flux_out, ivar=ivar, wavelength=wavelength,
                  sources=sources, normalised=False, meta=meta)
    flag_empty(out)
    return out


def row_kind(row, n_rows):
    """``"combined"`` for rows 0-1 of a multi-row file (and a 1-D file), else ``"visit"``."""
    return "combined" if (row < 2 or n_rows == 1) else "visit"


def select_rows(rows, n_rows):
    """Row numbers to read for the ``rows`` argument of :func:`read_apstar`."""
    if isinstance(rows, str):
        if rows not in _ROW_CHOICES:
            raise ValueError(f"rows must be one of {_ROW_CHOICES} or row numbers, got {rows!r}")
        if rows == "combined":
            return np.array([0])
        if rows == "visits":
            return np.arange(2, n_rows) if n_rows > 2 else np.array([0])
        return np.arange(n_rows)
    index = np.atleast_1d(np.asarray(rows, dtype=np.int64))
    if index.size == 0 or np.any(index < 0) or np.any(index >= n_rows):
        raise UnreadableFile(f"rows {index.tolist()} not in a file with {n_rows} rows", F.BAD_INPUT_SHAPE)
    return index


# --------------------------------------------------------------------------- shared helpers

def read_hdus(path, numbers, verify_checksum=False, optional=()):
    """Copy image HDUs out of a FITS file as native arrays.

    Returns ``(arrays, primary_header, checksum_status)`` where ``arrays[n]`` is a native
    float64 (or int64 for integer data) copy of HDU ``n`` (``None`` for a missing optional HDU)
    and ``arrays["header1"]`` is HDU1's header. ``checksum_status`` is ``"ok"``, ``"absent"`` or
    ``"not checked"``. Raises on any problem (the caller turns it into a flag).
    """
    from astropy.io import fits

    if not os.path.exists(path):
        raise UnreadableFile("file does not exist")
    if os.path.getsize(path) == 0:
        raise UnreadableFile("file is empty")
    arrays = {}
    with fits.open(path, memmap=False, lazy_load_hdus=False) as hdul:
        status = "not checked"
        if verify_checksum:
            # Must run before any .data access: astropy recomputes from loaded data afterwards.
            status = verify_checksums(hdul)
        header = hdul[0].header.copy()
        arrays["header1"] = hdul[1].header.copy() if len(hdul) > 1 else None
        for n in numbers:
            if n >= len(hdul) or hdul[n].data is None:
                if n in optional:
                    arrays[n] = None
                    continue
                raise UnreadableFile(f"HDU{n} is missing or empty ({len(hdul)} HDUs)")
            data = np.asarray(hdul[n].data)
            if data.dtype.kind not in "iuf" or data.ndim not in (1, 2):
                raise UnreadableFile(f"HDU{n} is not a 1-D or 2-D numeric image ({data.dtype}, {data.shape})",
                                     F.BAD_INPUT_SHAPE)
            kind = np.int64 if data.dtype.kind in "iu" else np.float64
            arrays[n] = np.array(data, dtype=kind)  # native byte order, a copy
    return arrays, header, status


def verify_checksums(hdul):
    """``"ok"`` when every present CHECKSUM/DATASUM matches, ``"absent"`` when none is present.

    Raises
    ------
    UnreadableFile
        On a mismatch, naming the HDU.
    """
    seen = False
    for i, hdu in enumerate(hdul):
        if "CHECKSUM" in hdu.header:
            seen = True
            if hdu.verify_checksum() == 0:
                raise UnreadableFile(f"checksum mismatch in HDU{i}")
        if "DATASUM" in hdu.header:
            seen = True
            if hdu.verify_datasum() == 0:
                raise UnreadableFile(f"datasum mismatch in HDU{i}")
    return "ok" if seen else "absent"


def check_caught_warnings(caught):
    """Raise for astropy warnings that mean the file is damaged (e.g. truncated)."""
    for w in caught:
        text = str(w.message)
        if "truncated" in text.lower() or "corrupt" in text.lower():
            raise UnreadableFile(text.strip())


def header_wavelength(header, header1, n_pixels, default_8575=False):
    """Wavelength grid from ``CRVAL1``/``CDELT1``/``CRPIX1``/``NWAVE`` (HDU0, else HDU1).

    Returns ``(wavelength, source)``; ``source`` names where the grid came from. Raises
    :class:`UnreadableFile` with ``BAD_INPUT_SHAPE`` when ``NWAVE`` disagrees with the data.
    """
    for where, h in (("HDU0", header), ("HDU1", header1)):
        if h is not None and "CRVAL1" in h and "CDELT1" in h:
            nwave = int(h.get("NWAVE", n_pixels))
            if nwave != n_pixels:
                raise UnreadableFile(f"header NWAVE={nwave} but the data have {n_pixels} pixels", F.BAD_INPUT_SHAPE)
            crval, cdelt, crpix = float(h["CRVAL1"]), float(h["CDELT1"]), float(h.get("CRPIX1", 1))
            ctype = str(h.get("CTYPE1", "LOG-LINEAR")).upper()
            linear = ctype == "LINEAR" or h.get("DC-FLAG", 1) == 0
            if linear:
                wl = crval + cdelt * (np.arange(n_pixels, dtype=np.float64) + 1.0 - crpix)
            else:
                wl = grid.log_linear_wavelength(crval, cdelt, n_pixels, crpix)
            return wl, f"{where} header"
    if default_8575 and n_pixels == grid.APSTAR_NWAVE:
        return grid.apstar_wavelength(), "default apStar grid (no header keywords)"
    raise UnreadableFile(f"no CRVAL1/CDELT1 header keywords for {n_pixels} pixels", F.BAD_INPUT_SHAPE)


def ivar_from_sigma(flux, sigma, bad=None):
    """Native float64 ``(flux, ivar)``; ivar = sigma**-2, or 0 where the pixel is unusable.

    A pixel is unusable when flux is not finite, sigma is not finite or <= 0, or ``bad`` is
    True. Non-finite flux values become NaN. No floating-point warnings are emitted.
    """
    flux = np.array(flux, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    ok = np.isfinite(flux) & np.isfinite(sigma) & (sigma > 0)
    if bad is not None:
        ok &= ~np.asarray(bad, dtype=bool)
    ivar = np.zeros(flux.shape, dtype=np.float64)
    with np.errstate(over="ignore", under="ignore", divide="ignore"):
        np.divide(1.0, np.square(sigma, where=ok, out=np.ones_like(ivar)), out=ivar, where=ok)
    ivar[~np.isfinite(ivar)] = 0.0  # sigma so small its square underflows
    flux[~np.isfinite(flux)] = np.nan
    return flux, ivar


def flag_empty(spectra):
    """Flag spectra with no usable pixel as ``NO_INFORMATION`` (in place)."""
    empty = ~np.any(spectra.ivar > 0, axis=1)
    for i in np.flatnonzero(empty & (spectra.flags == 0)):
        spectra.flags[i] |= F.NO_INFORMATION
        spectra.reasons[i] = f"{spectra.sources[i].get('path')}: no usable pixel (all masked or non-finite)"


def failed_spectra(path, exc, wavelength=None, identifier=None):
    """One flagged spectrum standing in for a file that could not be read."""
    wavelength = grid.apstar_wavelength() if wavelength is None else np.asarray(wavelength, dtype=np.float64)
    flag = getattr(exc, "flag", F.UNREADABLE_INPUT)
    if isinstance(exc, UnreadableFile):
        message = str(exc)
    else:
        message = f"{type(exc).__name__}: {exc}"
    p = wavelength.shape[0]
    return Spectra(
        identifiers=[identifier or os.path.basename(os.fspath(path))],
        flux=np.full((1, p), np.nan), ivar=np.zeros((1, p)), wavelength=wavelength,
        flags=np.array([flag], dtype=np.int64), reasons=[f"{os.fspath(path)}: {message}"],
        sources=[{"path": os.fspath(path), "hdu": None, "row": None, "checksum": None, "sha256": None}],
        meta=[{"error": message}],
    )


_META_KEYS = {
    "OBJID": "object_id", "APOGEE_ID": "object_id", "OBJECT": "object_id",
    "SNR": "snr", "NVISITS": "nvisits", "FIELD": "field", "TELESCOP": "telescope",
    "VHELIO": "vhelio", "STARFLAG": "starflag", "RV_TEFF": "rv_teff", "RV_LOGG": "rv_logg",
    "RV_FEH": "rv_feh",
}


def header_meta(header):
    """JSON-safe per-spectrum extras from a primary header (first of synonyms wins)."""
    meta = {}
    for key, name in _META_KEYS.items():
        if name in meta or key not in header:
            continue
        value = header[key]
        if isinstance(value, str):
            meta[name] = value.strip()
        elif isinstance(value, (bool, np.bool_)):
            meta[name] = bool(value)
        elif isinstance(value, (int, np.integer)):
            meta[name] = int(value)
        else:
            meta[name] = json_float(value)
    return meta


def json_float(value):
    """float, or None for missing / non-finite / non-numeric values."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def sha256_file(path, chunk=1 << 20):
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
