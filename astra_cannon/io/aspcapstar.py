"""Read APOGEE aspcapStar files (continuum-normalised by ASPCAP).

Layout: HDU1 normalised flux, HDU2 flux error, HDU3 the ASPCAP best-fit model (not read). The
pixel count depends on the data release and all are real inputs: 7214 (DR12, DR12 chip
ranges), 7514 (DR13/DR14, DR13+ chip ranges) and 8575 (DR16/DR17, full apStar grid).

Wavelengths: for 8575 pixels, and for any other count with header keywords, the log-linear grid
from ``CRVAL1``/``CDELT1`` (HDU0, else HDU1); for 7214 and 7514 pixels, the gap-removed
selection of the apStar grid built from the header's ``CRVAL1``/``CDELT1`` (default apStar
values when absent), because those files carry the *apStar* keywords but no gaps.

Note: an aspcapStar spectrum is normalised by ASPCAP's own continuum; do not fit it with a
model trained on spectra normalised another way.
"""

from __future__ import annotations

import os
import warnings

from .. import flags as F
from . import grid
from .apstar import (UnreadableFile, check_caught_warnings, failed_spectra, flag_empty, header_meta,
                     ivar_from_sigma, read_hdus, sha256_file)
from .base import Spectra


def aspcapstar_wavelength(header, header1, n_pixels):
    """Wavelength grid of an aspcapStar file with ``n_pixels`` pixels; returns ``(wl, source)``."""
    h = header if (header is not None and "CRVAL1" in header) else header1
    has_keys = h is not None and "CRVAL1" in h and "CDELT1" in h
    crval = float(h["CRVAL1"]) if has_keys else grid.APSTAR_CRVAL1
    cdelt = float(h["CDELT1"]) if has_keys else grid.APSTAR_CDELT1
    if n_pixels in grid.GAP_REMOVED_CHIPS:
        base = grid.log_linear_wavelength(crval, cdelt, grid.APSTAR_NWAVE)
        return grid.gap_removed_wavelength(n_pixels, base), f"gap-removed {n_pixels} grid"
    if has_keys:
        crpix = float(h.get("CRPIX1", 1))
        return grid.log_linear_wavelength(crval, cdelt, n_pixels, crpix), "header"
    if n_pixels == grid.APSTAR_NWAVE:
        return grid.apstar_wavelength(), "default apStar grid (no header keywords)"
    raise UnreadableFile(f"{n_pixels} pixels is no known aspcapStar grid and the header has no CRVAL1/CDELT1",
                         F.BAD_INPUT_SHAPE)


def read_aspcapstar(path, *, verify_checksum=False, file_checksum=True):
    """Read one aspcapStar file.

    Parameters
    ----------
    path : str or os.PathLike
    verify_checksum : bool
        Check ``CHECKSUM``/``DATASUM`` where present; a mismatch flags the file unreadable.
    file_checksum : bool
        Record the sha256 of the file bytes in ``sources[0]["sha256"]``.

    Returns
    -------
    Spectra
        One normalised spectrum (``normalised=True``). ivar is 0 where flux is not finite or
        exactly 0 (ASPCAP writes 0 in unusable pixels), or the error is not finite or <= 0.
        A file that cannot be read gives a flagged spectrum instead of an exception.
    """
    path = os.fspath(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hdus, header, checksum_status = read_hdus(path, (1, 2), verify_checksum)
            check_caught_warnings(caught)
        flux, sigma = hdus[1], hdus[2]
        # Some writers store a (1, P) image; treat it as 1-D.
        flux = flux[0] if (flux.ndim == 2 and flux.shape[0] == 1) else flux
        sigma = sigma[0] if (sigma.ndim == 2 and sigma.shape[0] == 1) else sigma
        if flux.ndim != 1 or sigma.shape != flux.shape:
            raise UnreadableFile(f"expected 1-D flux and error of one shape, got {flux.shape} and {sigma.shape}",
                                 F.BAD_INPUT_SHAPE)
        wavelength, wl_source = aspcapstar_wavelength(header, hdus.get("header1"), flux.shape[0])
    except Exception as exc:  # noqa: BLE001 - per-file failure -> flagged spectrum
        return failed_spectra(path, exc)

    flux_out, ivar = ivar_from_sigma(flux[None, :], sigma[None, :], bad=(flux == 0)[None, :])
    meta = header_meta(header)
    meta.update(wavelength_source=wl_source, row=0, kind="aspcapstar")
    sources = [{"path": path, "hdu": 1, "row": 0, "checksum": checksum_status,
                "sha256": sha256_file(path) if file_checksum else None}]
    out = Spectra(identifiers=[os.path.basename(path)], flux=flux_out, ivar=ivar, wavelength=wavelength,
                  sources=sources, normalised=True, meta=[meta])
    flag_empty(out)
    return out
