"""APOGEE wavelength grids, computed from formulas (no data files).

The apStar grid is log-linear: ``lambda_i = 10**(CRVAL1 + CDELT1 * (i + 1 - CRPIX1))`` Angstrom
(vacuum), with ``CRVAL1 = 4.179``, ``CDELT1 = 6e-6``, ``CRPIX1 = 1`` and ``NWAVE = 8575`` in
DR12-DR17 apStar headers. The "gap-removed" grids used by many models keep only the pixels on
the three detector chips:

- **7214** (DR12 chip ranges): apStar pixels ``[322:3242]``, ``[3648:6048]``, ``[6412:8306]``.
- **7514** (DR13+ chip ranges): apStar pixels ``[246:3274]``, ``[3585:6080]``, ``[6344:8335]``.

Everything here is plain numpy so the numerics and the readers can share it.
"""

from __future__ import annotations

import numpy as np

APSTAR_CRVAL1 = 4.179
APSTAR_CDELT1 = 6e-6
APSTAR_NWAVE = 8575

#: apStar pixel (start, stop) ranges kept by the gap-removed grids, keyed by pixel count.
CHIPS_DR12 = ((322, 3242), (3648, 6048), (6412, 8306))
CHIPS_DR13PLUS = ((246, 3274), (3585, 6080), (6344, 8335))
GAP_REMOVED_CHIPS = {7214: CHIPS_DR12, 7514: CHIPS_DR13PLUS}

#: Chip boundaries on the full apStar grid: the middle of each inter-chip gap. DR17 flux is
#: finite only in about [202:3324], [3538:6130], [6295:8382], so every chip's data lies inside.
APSTAR_CHIPS = ((0, 3431), (3431, 6212), (6212, APSTAR_NWAVE))

#: Wavelengths closer than this (Angstrom) are "the same grid" (about 5e-5 of a pixel).
GRID_ATOL = 1e-5


def log_linear_wavelength(crval1=APSTAR_CRVAL1, cdelt1=APSTAR_CDELT1, nwave=APSTAR_NWAVE, crpix1=1):
    """Vacuum wavelength (Angstrom) of a log-linear grid as described by FITS keywords.

    Parameters
    ----------
    crval1 : float
        log10 wavelength at reference pixel ``crpix1`` (1-based).
    cdelt1 : float
        Step in log10 wavelength.
    nwave : int
        Number of pixels.
    crpix1 : float
        1-based reference pixel.

    Returns
    -------
    ndarray, shape (nwave,)
    """
    nwave = int(nwave)
    if nwave <= 0:
        raise ValueError(f"nwave must be positive, got {nwave}")
    i = np.arange(nwave, dtype=np.float64)
    return 10.0 ** (float(crval1) + float(cdelt1) * (i + 1.0 - float(crpix1)))


def apstar_wavelength():
    """The 8575-pixel apStar grid, 15100.80-16999.81 Angstrom."""
    return log_linear_wavelength()


def gap_removed_indices(n_pixels):
    """apStar pixel indices that make up a gap-removed grid.

    Parameters
    ----------
    n_pixels : {7214, 7514}
        The grid: 7214 (DR12 chip ranges) or 7514 (DR13+ chip ranges).

    Returns
    -------
    ndarray of int64, shape (n_pixels,)

    Raises
    ------
    ValueError
        For any other pixel count.
    """
    n_pixels = int(n_pixels)
    if n_pixels not in GAP_REMOVED_CHIPS:
        raise ValueError(f"no gap-removed APOGEE grid with {n_pixels} pixels (known: 7214, 7514)")
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in GAP_REMOVED_CHIPS[n_pixels]])


def gap_removed_wavelength(n_pixels, base=None):
    """Wavelength of the 7214 or 7514 grid, as a selection of ``base`` (default: apStar grid)."""
    base = apstar_wavelength() if base is None else np.asarray(base, dtype=np.float64)
    return base[gap_removed_indices(n_pixels)]


def chip_slices(n_pixels):
    """(start, stop) pixel ranges of the three detector chips on a known APOGEE grid.

    Parameters
    ----------
    n_pixels : {8575, 7214, 7514}

    Returns
    -------
    tuple of (int, int)
        Contiguous ranges that together cover every pixel of the grid.

    Raises
    ------
    ValueError
        For an unknown pixel count.
    """
    n_pixels = int(n_pixels)
    if n_pixels == APSTAR_NWAVE:
        return APSTAR_CHIPS
    if n_pixels in GAP_REMOVED_CHIPS:
        lengths = [b - a for a, b in GAP_REMOVED_CHIPS[n_pixels]]
        edges = np.concatenate([[0], np.cumsum(lengths)])
        return tuple((int(edges[i]), int(edges[i + 1])) for i in range(3))
    raise ValueError(f"no APOGEE chip layout for {n_pixels} pixels (known: 8575, 7214, 7514)")


def same_grid(a, b, atol=GRID_ATOL):
    """True when two wavelength arrays have the same length and agree within ``atol`` Angstrom."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= atol))


def identify_grid(wavelength, atol=GRID_ATOL):
    """Name a wavelength array: ``"apstar_8575"``, ``"gap_removed_7214"``, ``"gap_removed_7514"``
    or ``None`` when it is none of the APOGEE grids."""
    wavelength = np.asarray(wavelength, dtype=np.float64)
    n = wavelength.shape[0] if wavelength.ndim == 1 else -1
    if n == APSTAR_NWAVE and same_grid(wavelength, apstar_wavelength(), atol):
        return "apstar_8575"
    if n in GAP_REMOVED_CHIPS and same_grid(wavelength, gap_removed_wavelength(n), atol):
        return f"gap_removed_{n}"
    return None


def subset_indices(wavelength, subset, atol=GRID_ATOL):
    """Indices ``i`` such that ``wavelength[i]`` equals ``subset`` pixel for pixel.

    Used to put a spectrum onto a model grid that is an exact subset of its own grid (for
    example apStar 8575 -> 7214 or 7514); no interpolation ever happens.

    Returns
    -------
    ndarray of int64 or None
        ``None`` when some subset pixel has no counterpart within ``atol`` Angstrom.
    """
    wavelength = np.asarray(wavelength, dtype=np.float64)
    subset = np.asarray(subset, dtype=np.float64)
    if wavelength.ndim != 1 or subset.ndim != 1 or wavelength.size == 0 or subset.size == 0:
        return None
    order = np.argsort(wavelength, kind="stable")
    pos = np.clip(np.searchsorted(wavelength[order], subset), 1, wavelength.size - 1)
    left, right = order[pos - 1], order[pos]
    pick = np.where(np.abs(wavelength[left] - subset) <= np.abs(wavelength[right] - subset), left, right)
    if wavelength.size == 1:
        pick = np.zeros(subset.size, dtype=np.int64)
    if not np.all(np.abs(wavelength[pick] - subset) <= atol):
        return None
    return pick.astype(np.int64)


# ------------------------------------------------------------------ pixel masks between grids

#: Package-data file with the shipped continuum-pixel mask (see ``load_continuum_mask``).
DEFAULT_CONTINUUM_MASK = "cannon_continuum_pixels_7214.npz"


def mask_to_grid(mask, n_pixels):
    """Move a per-pixel boolean mask between the 8575, 7514 and 7214 APOGEE grids.

    Gap-removed -> apStar puts the mask at its apStar pixels (False elsewhere); apStar ->
    gap-removed selects; 7214 <-> 7514 goes through the apStar grid (pixels outside the target
    chips are dropped, new pixels are False).

    Parameters
    ----------
    mask : array_like of bool, shape (8575,), (7514,) or (7214,)
    n_pixels : {8575, 7514, 7214}

    Returns
    -------
    ndarray of bool, shape (n_pixels,)
    """
    mask = np.asarray(mask, dtype=bool).ravel()
    n_in, n_pixels = mask.size, int(n_pixels)
    if n_in == APSTAR_NWAVE:
        full = mask
    elif n_in in GAP_REMOVED_CHIPS:
        full = np.zeros(APSTAR_NWAVE, dtype=bool)
        full[gap_removed_indices(n_in)] = mask
    else:
        raise ValueError(f"no APOGEE grid with {n_in} pixels (known: 8575, 7514, 7214)")
    if n_pixels == APSTAR_NWAVE:
        return full.copy()
    return full[gap_removed_indices(n_pixels)]


def load_continuum_mask(n_pixels=APSTAR_NWAVE, name=DEFAULT_CONTINUUM_MASK, directory=None):
    """Load a continuum-pixel mask shipped in ``astra_cannon/data/`` and put it on a grid.

    The file is ``.npy`` (one boolean array) or ``.npz`` (the first boolean array, or the
    first array when none is boolean), on the 8575, 7514 or 7214 grid.

    Parameters
    ----------
    n_pixels : {8575, 7514, 7214}
        Grid of the returned mask.
    name : str
        File name inside ``astra_cannon/data`` (or ``directory``).
    directory : str, optional
        Read from here instead of the package data folder.

    Returns
    -------
    ndarray of bool, shape (n_pixels,)

    Raises
    ------
    FileNotFoundError
        When the package does not ship ``name``.
    """
    import os

    if directory is None:
        directory = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
    path = os.path.join(os.fspath(directory), name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no continuum mask {name!r} in {directory}; pass a mask explicitly "
                                "or choose pixels with continuum.continuum_pixels_from_model")
    data = np.load(path, allow_pickle=False)
    if isinstance(data, np.ndarray):
        arr = data
    else:
        with data:
            arrays = [data[k] for k in data.files]
        bools = [a for a in arrays if a.dtype == bool]
        arr = bools[0] if bools else arrays[0]
    return mask_to_grid(np.asarray(arr).astype(bool), n_pixels)
