"""Survey readers: many files in, one :class:`~astra_cannon.io.base.Spectra` batch out.

``read_spectra(paths, format="auto", wavelength=None)`` is the entry point used by the tasks.
One bad file never stops a batch: it becomes a flagged spectrum (NaN flux, zero ivar, a reason
naming the path). Exceptions are kept for broken configuration (unknown format, no paths).
"""

from __future__ import annotations

import os

import numpy as np

from .. import flags as F
from . import grid
from .apstar import failed_spectra, read_apstar
from .aspcapstar import read_aspcapstar
from .base import Spectra

__all__ = ["Spectra", "read_spectra", "read_apstar", "read_aspcapstar", "detect_format",
           "to_gap_removed", "select_pixels", "count_spectra", "FORMATS", "ROW_RANGE_FORMATS"]

FORMATS = ("auto", "apstar", "aspcapstar", "example", "synthetic")
# Formats whose reader can make any row range of a file without reading the rest
# (read_spectra(..., rows=range(start, stop))).
ROW_RANGE_FORMATS = ("synthetic",)


def count_spectra(path, format="example"):
    """Number of spectra in a file without reading the pixels, or ``None`` when unknown.

    Pipelines use it to cut files into chunks by rows. Only formats with a cheap count answer
    (the example layout, from its FLUX header; synthetic sources, from their JSON); otherwise,
    or for a file that cannot be opened, ``None`` (a chunk then takes the whole file and the
    reader flags bad files).
    """
    if format == "synthetic":
        from .synthetic import count_synthetic  # a JSON file of a few hundred bytes

        return count_synthetic(path)
    if format != "example":
        return None
    try:
        from astropy.io import fits

        header = fits.getheader(os.fspath(path), "FLUX")
        return int(header["NAXIS2"]) if int(header.get("NAXIS", 0)) == 2 else 1
    except Exception:  # noqa: BLE001 - the reader reports the real problem per spectrum
        return None


def detect_format(path):
    """Guess a file's format from its name, else from its HDU layout.

    ``apStar*``/``asStar*`` -> ``"apstar"``; ``aspcapStar*`` -> ``"aspcapstar"``; otherwise a
    file whose HDU3 is an integer image (a pixel bitmask) is ``"apstar"`` and any other is
    ``"aspcapstar"``. An unreadable file is ``"apstar"`` (its reader then flags it).
    """
    name = os.path.basename(os.fspath(path))
    if name.startswith(("aspcapStar",)):
        return "aspcapstar"
    if name.startswith(("apStar", "asStar")):
        return "apstar"
    try:
        from astropy.io import fits

        with fits.open(os.fspath(path), memmap=False) as hdul:
            if len(hdul) > 3 and hdul[3].header.get("BITPIX", 0) > 0 and hdul[3].header.get("NAXIS", 0) >= 1:
                return "apstar"
            return "aspcapstar"
    except Exception:  # noqa: BLE001 - the reader will flag it with the real error
        return "apstar"


def _read_one(path, fmt, *, rows, pixmask, verify_checksum, file_checksum):
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "apstar":
        return read_apstar(path, rows=rows, pixmask=pixmask, verify_checksum=verify_checksum,
                           file_checksum=file_checksum)
    if fmt == "aspcapstar":
        return read_aspcapstar(path, verify_checksum=verify_checksum, file_checksum=file_checksum)
    if fmt == "synthetic":
        from .synthetic import read_synthetic  # generates only the rows asked for

        return read_synthetic(path, rows=None if isinstance(rows, str) else rows)
    try:
        from .example import read_example_spectra  # lazy: another module, optional here

        return read_example_spectra(path)
    except Exception as exc:  # noqa: BLE001 - per-file failure -> flagged spectrum
        return failed_spectra(path, exc)


def _nan_rows(batch, wavelength, flag, reason):
    """Replace every spectrum of ``batch`` by a flagged NaN spectrum on ``wavelength``."""
    n, p = len(batch), wavelength.shape[0]
    if reason is None:
        reasons = list(batch.reasons)
    else:
        reasons = [reason if r is None else f"{r}; {reason}" for r in batch.reasons]
    return Spectra(identifiers=list(batch.identifiers), flux=np.full((n, p), np.nan), ivar=np.zeros((n, p)),
                   wavelength=wavelength, flags=batch.flags | flag, reasons=reasons,
                   sources=list(batch.sources), normalised=batch.normalised, meta=list(batch.meta))


def _failed(batch):
    return bool(np.any(batch.flags & (F.UNREADABLE_INPUT | F.BAD_INPUT_SHAPE | F.BAD_WAVELENGTH_GRID)))


def read_spectra(paths, format="auto", wavelength=None, *, rows="combined", pixmask=None,
                 verify_checksum=False, file_checksum=True, select_model_pixels=False,
                 atol=grid.GRID_ATOL):
    """Read many spectrum files into one batch on one wavelength grid.

    Parameters
    ----------
    paths : str, os.PathLike or iterable of them
        Files to read; the order of the output follows them (several rows per apStar file
        when ``rows`` asks for them).
    format : {"auto", "apstar", "aspcapstar", "example", "synthetic"}
        ``"auto"`` decides per file (see :func:`detect_format`); ``"example"`` calls
        :func:`astra_cannon.io.example.read_example_spectra`; ``"synthetic"`` generates
        spectra from a source file (:mod:`astra_cannon.io.synthetic`), only the rows asked
        for when ``rows`` is a range or sequence of row numbers.
    wavelength : array_like, optional
        The model's grid. A spectrum with a different pixel count is flagged
        ``BAD_INPUT_SHAPE``; one with the same count but other wavelengths (beyond ``atol``
        Angstrom) is flagged ``BAD_WAVELENGTH_GRID``. Nothing is ever resampled. Without it,
        the grid of the first readable file is the batch grid (the apStar grid if none is).
    rows, pixmask, verify_checksum, file_checksum
        Passed to the readers (see :func:`~astra_cannon.io.apstar.read_apstar`).
    select_model_pixels : bool
        When True and ``wavelength`` is an exact subset of a spectrum's grid (e.g. a model on
        the 7214 or 7514 gap-removed grid and an 8575-pixel apStar file), keep exactly those
        pixels by index selection instead of flagging the spectrum.
    atol : float
        Wavelength tolerance in Angstrom for "same grid".

    Returns
    -------
    Spectra
        Flagged spectra have NaN flux, zero ivar and a reason. When normalised and
        unnormalised files are mixed, the ones that differ from the first readable file are
        flagged ``PROCESSING_ERROR``. A file given twice gets ``DUPLICATE_INPUT`` on its
        later copies.

    Raises
    ------
    ValueError
        For an unknown ``format``, no paths, or an invalid ``rows`` argument.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("no paths to read")
    if isinstance(rows, str) and rows not in ("combined", "visits", "all"):
        raise ValueError(f"rows must be 'combined', 'visits', 'all' or row numbers, got {rows!r}")

    batches = [_read_one(p, format, rows=rows, pixmask=pixmask, verify_checksum=verify_checksum,
                         file_checksum=file_checksum) for p in paths]

    model_grid = wavelength is not None
    if model_grid:
        ref = np.asarray(wavelength, dtype=np.float64)
        if ref.ndim != 1 or ref.size == 0:
            raise ValueError(f"wavelength must be a non-empty 1-D array, got shape {ref.shape}")
    else:
        readable = [b for b in batches if not _failed(b)]
        ref = readable[0].wavelength if readable else grid.apstar_wavelength()

    normalised = next((b.normalised for b in batches if not _failed(b)), False)
    out, seen = [], set()
    for path, b in zip(paths, batches):
        if _failed(b):
            if b.wavelength.shape != ref.shape:
                b = _nan_rows(b, ref, 0, None)
        elif grid.same_grid(b.wavelength, ref, atol):
            b.wavelength = ref
        elif model_grid and select_model_pixels and (idx := grid.subset_indices(b.wavelength, ref, atol)) is not None:
            b = Spectra(identifiers=b.identifiers, flux=b.flux[:, idx], ivar=b.ivar[:, idx], wavelength=ref,
                        flags=b.flags, reasons=b.reasons, sources=b.sources, normalised=b.normalised,
                        meta=[dict(m, pixel_selection=f"{idx.size} of {b.wavelength.size} pixels") for m in b.meta])
        elif b.wavelength.shape != ref.shape:
            b = _nan_rows(b, ref, F.BAD_INPUT_SHAPE,
                          f"{path}: {b.wavelength.shape[0]} pixels but the batch grid has {ref.shape[0]}")
        else:
            diff = float(np.max(np.abs(b.wavelength - ref)))
            b = _nan_rows(b, ref, F.BAD_WAVELENGTH_GRID,
                          f"{path}: wavelength grid differs from the batch grid by up to {diff:.4g} A")
        if not _failed(b) and b.normalised != normalised:
            state = "normalised" if b.normalised else "unnormalised"
            b = _nan_rows(b, ref, F.PROCESSING_ERROR,
                          f"{path}: {state} flux in a batch that is {'' if normalised else 'un'}normalised")
        b.normalised = normalised
        key = os.path.realpath(path)
        if key in seen:
            b.flags = b.flags | F.DUPLICATE_INPUT
        seen.add(key)
        out.append(b)
    return Spectra.concatenate(out) if len(out) > 1 else out[0]


def select_pixels(spectra, wavelength, atol=grid.GRID_ATOL):
    """Put a batch onto a grid that is an exact subset of its own, by index selection.

    Parameters
    ----------
    spectra : Spectra
    wavelength : array_like
        Target grid; every pixel must exist in ``spectra.wavelength`` within ``atol``.

    Returns
    -------
    Spectra
        A new batch (copies of the selected columns); flags, reasons, sources and meta kept.

    Raises
    ------
    ValueError
        When the target grid is not a subset of the spectra's grid (no interpolation is done).
    """
    target = np.asarray(wavelength, dtype=np.float64)
    idx = grid.subset_indices(spectra.wavelength, target, atol)
    if idx is None:
        raise ValueError(f"the {target.size}-pixel grid is not a subset of the spectra's "
                         f"{spectra.wavelength.size}-pixel grid (within {atol} A); refusing to resample")
    return Spectra(identifiers=list(spectra.identifiers), flux=spectra.flux[:, idx].copy(),
                   ivar=spectra.ivar[:, idx].copy(), wavelength=target.copy(), flags=spectra.flags.copy(),
                   reasons=list(spectra.reasons), sources=list(spectra.sources), normalised=spectra.normalised,
                   meta=list(spectra.meta))


def to_gap_removed(spectra, n_pixels):
    """Put 8575-pixel apStar spectra onto the 7214 (DR12) or 7514 (DR13+) gap-removed grid.

    Pure index selection of the chip pixels (see :mod:`astra_cannon.io.grid`); use it when the
    model was trained on that grid. The target wavelengths are taken from the spectra's own
    grid, so header-derived values are kept exactly.

    Parameters
    ----------
    spectra : Spectra
        On the 8575-pixel apStar grid.
    n_pixels : {7214, 7514}

    Returns
    -------
    Spectra

    Raises
    ------
    ValueError
        When the spectra are not on the apStar grid or ``n_pixels`` is unknown.
    """
    if grid.identify_grid(spectra.wavelength) != "apstar_8575":
        raise ValueError(f"to_gap_removed needs spectra on the 8575-pixel apStar grid, "
                         f"got {spectra.wavelength.size} pixels")
    return select_pixels(spectra, spectra.wavelength[grid.gap_removed_indices(n_pixels)])
