"""Label tables (FITS, ECSV, CSV) with sentinels turned into missing values.

Survey catalogues write "no value" as sentinels (-9999, -9999.99, -999, ...; allStar uses
float32 -9999.99 = -9999.990234375) or as NaN/inf. :func:`read_label_table` returns an astropy
``Table`` whose numeric columns are masked wherever a value is a sentinel or not finite, and
whose string columns are stripped. Column names keep their spelling; look them up
case-insensitively with :func:`find_column`. :func:`label_array` gives a native float64 (N, L)
array with NaN for every missing value.
"""

from __future__ import annotations

import os

import numpy as np

#: Values treated as missing in numeric columns (compared with a relative tolerance of 1e-6,
#: so float32 copies such as -9999.990234375 match).
DEFAULT_SENTINELS = (-9999.0, -9999.99, -999.0, -999.99, 9999.0, 9999.99)

_FORMATS = {".fits": "fits", ".fit": "fits", ".fts": "fits", ".fits.gz": "fits", ".ecsv": "ecsv",
            ".csv": "csv"}


def _guess_format(path):
    lower = os.fspath(path).lower()
    for ext in sorted(_FORMATS, key=len, reverse=True):
        if lower.endswith(ext):
            return _FORMATS[ext]
    raise ValueError(f"cannot tell the table format of {os.fspath(path)!r}; pass format='fits', 'ecsv' or 'csv'")


def sentinel_mask(values, sentinels=DEFAULT_SENTINELS):
    """True where a numeric array holds a sentinel or a non-finite value."""
    v = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(v)
    for s in sentinels:
        bad |= np.isclose(v, float(s), rtol=1e-6, atol=0.0)
    return bad


def clean_table(table, sentinels=DEFAULT_SENTINELS):
    """Mask sentinels and non-finite values in every numeric column; strip string columns.

    Parameters
    ----------
    table : astropy.table.Table
    sentinels : sequence of float

    Returns
    -------
    astropy.table.Table
        A new masked table (``Table(masked=True)``); the input is not modified.
    """
    from astropy.table import MaskedColumn, Table

    out = Table(masked=True, meta=dict(table.meta))
    for name in table.colnames:
        col = table[name]
        data = np.asarray(col)
        old_mask = np.asarray(getattr(col, "mask", np.zeros(data.shape, dtype=bool)), dtype=bool)
        old_mask = np.broadcast_to(old_mask, data.shape)
        if data.dtype.kind in "iuf":
            native = data.astype(data.dtype.newbyteorder("="))
            bad = sentinel_mask(native, sentinels) | old_mask
            out[name] = MaskedColumn(native, mask=bad, unit=col.unit, description=col.description)
        elif data.dtype.kind in "SU":
            text = np.char.strip(data.astype(str))
            out[name] = MaskedColumn(text, mask=old_mask | (text == ""), description=col.description)
        else:
            out[name] = MaskedColumn(data, mask=old_mask, unit=col.unit, description=col.description)
    return out


def read_label_table(path, format=None, sentinels=DEFAULT_SENTINELS, hdu=1):
    """Read a label table and mark missing values.

    Parameters
    ----------
    path : str or os.PathLike
    format : {"fits", "ecsv", "csv"}, optional
        Default: from the file extension.
    sentinels : sequence of float
        Numeric values meaning "missing" (see :data:`DEFAULT_SENTINELS`); ``()`` for none.
    hdu : int
        FITS extension holding the table.

    Returns
    -------
    astropy.table.Table
        Masked table (see :func:`clean_table`).

    Raises
    ------
    OSError, ValueError
        When the file cannot be read as a table (a label table is configuration: no flagging).
    """
    from astropy.table import Table

    fmt = format or _guess_format(path)
    path = os.fspath(path)
    if fmt == "fits":
        table = Table.read(path, format="fits", hdu=hdu)
    elif fmt == "ecsv":
        table = Table.read(path, format="ascii.ecsv")
    elif fmt == "csv":
        table = Table.read(path, format="ascii.csv")  # empty fields come back masked
    else:
        raise ValueError(f"unknown table format {fmt!r}; expected 'fits', 'ecsv' or 'csv'")
    return clean_table(table, sentinels)


def find_column(table, name):
    """The real column name matching ``name`` case-insensitively (surrounding spaces ignored).

    Raises
    ------
    KeyError
        When no column matches, or more than one does (listing the columns).
    """
    key = str(name).strip().lower()
    hits = [c for c in table.colnames if c.strip().lower() == key]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise KeyError(f"no column {name!r} (case-insensitive) in table with columns {table.colnames}")
    raise KeyError(f"column {name!r} is ambiguous: {hits}")


def label_array(table, names):
    """Native float64 array (N, L) of the ``names`` columns, NaN where missing.

    Raises
    ------
    KeyError
        For a missing column. ValueError for a non-numeric one.
    """
    cols = []
    for name in names:
        col = table[find_column(table, name)]
        data = np.asarray(col)
        if data.dtype.kind not in "iufb" or data.ndim != 1:
            raise ValueError(f"label column {name!r} is not a 1-D numeric column ({data.dtype}, {data.shape})")
        values = data.astype(np.float64)
        mask = np.asarray(getattr(col, "mask", np.zeros(values.shape, dtype=bool)), dtype=bool)
        values = np.where(np.broadcast_to(mask, values.shape) | ~np.isfinite(values), np.nan, values)
        cols.append(values)
    if not cols:
        return np.zeros((len(table), 0))
    return np.column_stack(cols)


def string_column(table, name):
    """A column as a list of stripped strings (missing -> ``""``)."""
    col = table[find_column(table, name)]
    data = np.asarray(col)
    if data.dtype.kind == "S":
        data = np.char.decode(data, "utf-8", "replace")
    text = [str(v).strip() for v in data.tolist()]
    mask = np.broadcast_to(np.asarray(getattr(col, "mask", False), dtype=bool), (len(text),))
    return ["" if m else t for t, m in zip(text, mask)]
