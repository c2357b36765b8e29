"""APOGEE pixel bitmask (``APOGEE_PIXMASK``, apStar HDU3) and which bits to honour.

Bit names and meanings follow the public SDSS APOGEE_PIXMASK definition (bits 0-14 are the
same from DR10 to DR17):

====  ===============  ==========================================================
bit   name             meaning
====  ===============  ==========================================================
0     BADPIX           marked bad in the bad-pixel mask (or strong persistence jump)
1     CRPIX            cosmic ray
2     SATPIX           saturated
3     UNFIXABLE        unfixable in the 3-D reduction
4     BADDARK          bad in the dark frame
5     BADFLAT          bad in the flat field
6     BADERR           error set very high
7     NOSKY            no sky available from the sky fibres
8     LITTROW_GHOST    in the Littrow ghost, may be affected
9     PERSIST_HIGH     in a high-persistence region
10    PERSIST_MED      in a medium-persistence region
11    PERSIST_LOW      in a low-persistence region
12    SIG_SKYLINE      near a sky line with significant flux compared with the object
13    SIG_TELLURIC     near a telluric line with significant absorption
14    NOT_ENOUGH_PSF   less than 50 percent of the PSF in good pixels
====  ===============  ==========================================================

Default set honoured (pixel gets ivar 0): :data:`DEFAULT_BAD_BITS` = the instrumental failures
(bits 0-7), ``PERSIST_HIGH``, ``SIG_SKYLINE`` and ``NOT_ENOUGH_PSF``. The warning-level bits
``LITTROW_GHOST``, ``PERSIST_MED``, ``PERSIST_LOW`` and ``SIG_TELLURIC`` are *not* masked by
default: in DR17 combined spectra they cover ~10% of pixels, the telluric correction is already
applied and the combination already down-weights affected visits. Pass ``pixmask=`` to the
readers (bit names or an integer) to change this; ``pixmask=0`` honours no bit.
"""

from __future__ import annotations

import numpy as np

_PIXMASK = (
    (0, "BADPIX", "marked bad in the bad-pixel mask"),
    (1, "CRPIX", "cosmic ray"),
    (2, "SATPIX", "saturated"),
    (3, "UNFIXABLE", "unfixable"),
    (4, "BADDARK", "bad in the dark frame"),
    (5, "BADFLAT", "bad in the flat field"),
    (6, "BADERR", "error set very high"),
    (7, "NOSKY", "no sky available from the sky fibres"),
    (8, "LITTROW_GHOST", "in the Littrow ghost, may be affected"),
    (9, "PERSIST_HIGH", "in a high-persistence region"),
    (10, "PERSIST_MED", "in a medium-persistence region"),
    (11, "PERSIST_LOW", "in a low-persistence region"),
    (12, "SIG_SKYLINE", "near a sky line with significant flux compared with the object"),
    (13, "SIG_TELLURIC", "near a telluric line with significant absorption"),
    (14, "NOT_ENOUGH_PSF", "less than 50 percent of the PSF in good pixels"),
)

PIXMASK_BITS = {name: bit for bit, name, _ in _PIXMASK}
PIXMASK_DESCRIPTIONS = {name: text for _, name, text in _PIXMASK}

DEFAULT_BAD_BITS = (
    "BADPIX", "CRPIX", "SATPIX", "UNFIXABLE", "BADDARK", "BADFLAT", "BADERR", "NOSKY",
    "PERSIST_HIGH", "SIG_SKYLINE", "NOT_ENOUGH_PSF",
)


def pixmask_value(names):
    """Integer with the bits of ``names`` set.

    Parameters
    ----------
    names : iterable of str, or str
        Bit names from :data:`PIXMASK_BITS` (case-insensitive).

    Returns
    -------
    int

    Raises
    ------
    ValueError
        For an unknown bit name.
    """
    if isinstance(names, str):
        names = [names]
    value = 0
    for name in names:
        key = str(name).strip().upper()
        if key not in PIXMASK_BITS:
            raise ValueError(f"unknown APOGEE_PIXMASK bit {name!r}; known: {', '.join(PIXMASK_BITS)}")
        value |= 1 << PIXMASK_BITS[key]
    return value


DEFAULT_PIXMASK = pixmask_value(DEFAULT_BAD_BITS)


def resolve_pixmask(pixmask):
    """Turn the readers' ``pixmask`` argument into an integer.

    ``None`` -> :data:`DEFAULT_PIXMASK`; an int -> itself; bit names -> their OR.
    """
    if pixmask is None:
        return DEFAULT_PIXMASK
    if isinstance(pixmask, (int, np.integer)):
        if pixmask < 0:
            raise ValueError(f"pixmask must be non-negative, got {pixmask}")
        return int(pixmask)
    return pixmask_value(pixmask)


def decode_pixmask(value):
    """Names of the APOGEE_PIXMASK bits set in one integer, lowest bit first."""
    value = int(value)
    return [name for bit, name, _ in _PIXMASK if value & (1 << bit)]


def bad_pixels(bitmask, pixmask=None):
    """Boolean array, True where ``bitmask`` has any honoured bit set.

    Parameters
    ----------
    bitmask : array_like of int
        Per-pixel APOGEE_PIXMASK values (any integer dtype or byte order).
    pixmask : int or iterable of str, optional
        Bits to honour; default :data:`DEFAULT_PIXMASK`.

    Returns
    -------
    ndarray of bool, same shape as ``bitmask``
    """
    value = resolve_pixmask(pixmask)
    bits = np.asarray(bitmask)
    if not np.issubdtype(bits.dtype, np.integer):
        # Masks written as floats still carry exact small integers; non-finite -> treat as bad.
        bits_f = np.asarray(bits, dtype=np.float64)
        finite = np.isfinite(bits_f)
        bits = np.where(finite, bits_f, 0).astype(np.int64)
        return ((bits & value) != 0) | ~finite
    return (bits.astype(np.int64) & value) != 0
