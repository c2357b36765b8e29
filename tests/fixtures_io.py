"""Fixtures: io. Synthetic apStar/aspcapStar files written with astropy, and the real files.

Synthetic spectra have a known smooth continuum times Gaussian absorption lines that keep
clear of a fixed set of continuum pixels (every 15th pixel inside the chips), so continuum
recovery can be checked to well below 0.5%.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from astra_cannon.io import grid

SHARED_CANDIDATES = (Path(__file__).resolve().parents[1] / ".." / "shared", Path("/work/shared"))
REAL_APSTAR = ("apStar-dr17-2M19485057+5005279.fits", "apStar-dr17-2M17335483-2753043.fits")


def shared_data_path(*parts):
    """Path under the shared data folder, or None when it is absent."""
    for base in SHARED_CANDIDATES:
        p = base.joinpath("data", *parts)
        if p.exists():
            return p.resolve()
    return None


def synthetic_continuum_mask(n_pixels=grid.APSTAR_NWAVE, step=15):
    """Every ``step``-th pixel inside the DR13+ chip ranges (on the 8575 grid), as bool."""
    mask = np.zeros(grid.APSTAR_NWAVE, dtype=bool)
    for a, b in grid.CHIPS_DR13PLUS:
        mask[np.arange(a + 5, b - 5, step)] = True
    return grid.mask_to_grid(mask, n_pixels)


def true_continuum(wavelength, scale=1000.0, phase=0.0):
    """A smooth continuum that is *not* exactly in either fitting basis."""
    x = (np.asarray(wavelength) - 16000.0) / 1000.0
    return scale * (1.0 + 0.12 * np.sin(2 * np.pi * x / 2.7 + phase) + 0.05 * x**2 - 0.03 * x**3)


def synthetic_normalised(wavelength, cont_mask, rng, n_lines=400):
    """A normalised spectrum: Gaussian lines kept >= 6 pixels from every continuum pixel."""
    p = wavelength.size
    cont_idx = np.flatnonzero(cont_mask)
    candidates = np.setdiff1d(np.arange(p), np.concatenate([cont_idx + d for d in range(-6, 7)]))
    centres = rng.choice(candidates, size=min(n_lines, candidates.size), replace=False)
    pix = np.arange(p)[:, None]
    depth = rng.uniform(0.05, 0.6, centres.size)
    lines = depth * np.exp(-0.5 * ((pix - centres[None, :]) / 1.1) ** 2)
    return np.clip(1.0 - lines.sum(axis=1), 0.05, None)


def make_apstar_arrays(rng, n_rows=1, snr=200.0, scale=1000.0):
    """(flux, sigma, mask, continuum, normalised) on the 8575 grid, with DR17-like gaps."""
    wl = grid.apstar_wavelength()
    cmask = synthetic_continuum_mask()
    norm = synthetic_normalised(wl, cmask, rng)
    cont = np.array([true_continuum(wl, scale * (1 + 0.1 * r), 0.3 * r) for r in range(n_rows)])
    flux = cont * norm
    sigma = flux / snr
    flux = flux + rng.normal(size=flux.shape) * sigma
    outside = np.ones(wl.size, dtype=bool)
    for a, b in ((202, 3324), (3538, 6130), (6295, 8382)):
        outside[a:b] = False
    flux[:, outside] = np.nan
    sigma[:, outside] = np.nan
    mask = np.zeros(flux.shape, dtype=np.int64)
    return flux, sigma, mask, cont, norm


def write_apstar(path, flux, sigma, mask=None, header=None, big_endian=True, checksum=False,
                 crval1=grid.APSTAR_CRVAL1, cdelt1=grid.APSTAR_CDELT1, nwave=None, keywords=True):
    """Write an apStar-like file (HDU1 flux, HDU2 sigma, HDU3 mask) and return its path."""
    from astropy.io import fits

    flux = np.asarray(flux)
    primary = fits.PrimaryHDU()
    if keywords:
        primary.header["CRVAL1"] = crval1
        primary.header["CDELT1"] = cdelt1
        primary.header["CRPIX1"] = 1
        primary.header["CTYPE1"] = "LOG-LINEAR"
        primary.header["NWAVE"] = int(flux.shape[-1] if nwave is None else nwave)
    for k, v in (header or {}).items():
        primary.header[k] = v
    order = ">" if big_endian else "<"
    hdus = [primary, fits.ImageHDU(np.asarray(flux, dtype=f"{order}f8")),
            fits.ImageHDU(np.asarray(sigma, dtype=f"{order}f8"))]
    if mask is not None:
        hdus.append(fits.ImageHDU(np.asarray(mask, dtype=f"{order}i8")))
    fits.HDUList(hdus).writeto(path, overwrite=True, checksum=checksum)
    return str(path)


def write_aspcapstar(path, flux, sigma, header=None, keywords=True):
    """Write an aspcapStar-like file (HDU1 normalised flux, HDU2 error, HDU3 model)."""
    from astropy.io import fits

    primary = fits.PrimaryHDU()
    if keywords:
        primary.header["CRVAL1"] = grid.APSTAR_CRVAL1
        primary.header["CDELT1"] = grid.APSTAR_CDELT1
    for k, v in (header or {}).items():
        primary.header[k] = v
    fits.HDUList([primary, fits.ImageHDU(np.asarray(flux, dtype=">f4")),
                  fits.ImageHDU(np.asarray(sigma, dtype=">f4")),
                  fits.ImageHDU(np.asarray(flux, dtype=">f4"))]).writeto(path, overwrite=True)
    return str(path)


@pytest.fixture
def io_rng():
    return np.random.default_rng(20240601)


@pytest.fixture
def apstar_file(tmp_path, io_rng):
    """A good synthetic 3-visit apStar file (5 rows); returns (path, arrays dict)."""
    flux, sigma, mask, cont, norm = make_apstar_arrays(io_rng, n_rows=5)
    mask[:, 1000] = 1 << 0      # BADPIX: honoured by default
    mask[:, 1001] = 1 << 13     # SIG_TELLURIC: not honoured by default
    header = {"OBJID": "2M00000001+0000001", "SNR": 200.0, "NVISITS": 3,
              "SNRVIS1": 100.0, "SNRVIS2": 110.0, "SNRVIS3": 120.0}
    path = write_apstar(tmp_path / "apStar-synth-2M00000001+0000001.fits", flux, sigma, mask, header)
    return path, {"flux": flux, "sigma": sigma, "mask": mask, "continuum": cont, "normalised": norm}


@pytest.fixture
def hostile_files(tmp_path, io_rng):
    """Paths of damaged inputs, keyed by what is wrong with them."""
    flux, sigma, mask, _, _ = make_apstar_arrays(io_rng, n_rows=2)
    good = write_apstar(tmp_path / "apStar-good.fits", flux, sigma, mask, {"OBJID": "GOOD"}, checksum=True)
    raw = Path(good).read_bytes()
    files = {"good": good}
    files["not_fits"] = str(tmp_path / "apStar-notfits.fits")
    Path(files["not_fits"]).write_bytes(b"this is not a FITS file\n" * 200)
    files["truncated"] = str(tmp_path / "apStar-truncated.fits")
    Path(files["truncated"]).write_bytes(raw[: len(raw) // 2])
    files["empty"] = str(tmp_path / "apStar-empty.fits")
    Path(files["empty"]).write_bytes(b"")
    files["missing"] = str(tmp_path / "apStar-does-not-exist.fits")
    files["wrong_length"] = write_apstar(tmp_path / "apStar-short.fits", flux[:, :8000], sigma[:, :8000],
                                         mask[:, :8000])
    files["wrong_grid"] = write_apstar(tmp_path / "apStar-shifted.fits", flux, sigma, mask, crval1=4.1791)
    files["all_masked"] = write_apstar(tmp_path / "apStar-allmasked.fits", flux, sigma,
                                       np.ones_like(mask))
    damaged = bytearray(raw)
    damaged[-20000] ^= 0xFF  # inside the last image's data
    files["bad_checksum"] = str(tmp_path / "apStar-badchecksum.fits")
    Path(files["bad_checksum"]).write_bytes(bytes(damaged))
    return files


@pytest.fixture
def real_apstar_paths():
    """The two real DR17 apStar files (skips when the shared folder is absent)."""
    paths = [shared_data_path("real_spectra", name) for name in REAL_APSTAR]
    if any(p is None for p in paths):
        pytest.skip("shared real apStar files are not available")
    return [str(p) for p in paths]


@pytest.fixture
def shared_continuum_mask_8575():
    """The Cannon continuum pixels (The_Payne repo, MIT) moved to the 8575 grid; skips if absent."""
    p = shared_data_path("apogee_grid", "payne_cannon_cont_pixels_7214.npz")
    if p is None:
        pytest.skip("shared continuum mask not available")
    with np.load(p) as data:
        return grid.mask_to_grid(data["pixels_cannon"], grid.APSTAR_NWAVE)
