"""Package data: the APOGEE 7214-pixel grid, a real quadratic Cannon model and its labels.

Everything here is read from files inside the installed package (never from the source
tree's ``shared`` folder). Sources and licences are in ``ATTRIBUTION.md`` next to this file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent

BOVY_MODEL_FILE = "bovy_cannon_dr10_apokasc_gc.npz"
BOVY_LABELS_FILE = "bovy_cannon_dr10_training_labels.npz"
WAVELENGTH_FILE = "apogee_wavelength_7214.npz"

# apStar header keywords and the DR12-era chip ranges that make up the 7214-pixel grid.
APSTAR_CRVAL1 = 4.179
APSTAR_CDELT1 = 6e-6
APSTAR_CHIPS_DR12 = ((322, 3242), (3648, 6048), (6412, 8306))


def data_path(name: str) -> Path:
    """Return the path of a shipped data file.

    Raises
    ------
    FileNotFoundError
        If the file is not part of the installed package.
    """
    path = DATA_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"package data file {name!r} is missing from {DATA_DIR}")
    return path


def _load(name: str) -> dict:
    with np.load(data_path(name), allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def compute_apogee_wavelength() -> np.ndarray:
    """Compute the 7214-pixel APOGEE vacuum wavelength grid (Angstrom) from its formula."""
    index = np.concatenate([np.arange(a, b) for a, b in APSTAR_CHIPS_DR12])
    return 10.0 ** (APSTAR_CRVAL1 + APSTAR_CDELT1 * index)


def apogee_wavelength() -> np.ndarray:
    """Return the shipped 7214-pixel APOGEE vacuum wavelength grid (Angstrom), shape (7214,)."""
    return _load(WAVELENGTH_FILE)["wavelength"]


def apogee_chips() -> np.ndarray:
    """Return the (start, stop) pixel ranges of the three detectors on the 7214 grid, (3, 2)."""
    return _load(WAVELENGTH_FILE)["chips_7214"]


def bovy_model_arrays() -> dict:
    """Return the raw arrays of the shipped Bovy quadratic Cannon model.

    Returns
    -------
    dict
        ``coeffs`` (15, 7214), ``scatter`` (7214,), ``baseline_labels`` (4,),
        ``label_names`` (4,), ``term_names`` (15,).
    """
    return _load(BOVY_MODEL_FILE)


def bovy_training_labels() -> dict:
    """Return the labels of the model's 1801 training stars.

    Returns
    -------
    dict
        ``apogee_id`` (1801,) str, ``labels`` (1801, 4) float64, ``label_names`` (4,) str.
    """
    return _load(BOVY_LABELS_FILE)
