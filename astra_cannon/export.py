"""Export results from the database to a FITS table (astropy), with units and descriptions.

One row per (model, spectrum). Failed fits keep their row: NaN labels, ``FLAGS`` with a failure
bit and ``REASON``. Column descriptions go into the ``TTYPEn`` header comments; units into
``TUNITn``. The file is written to a temporary name and moved into place (never half-written).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import __version__, flags as F, store
from .models import TrainedModel

__all__ = ["export_results", "label_unit", "results_table"]

# FITS has no "dex": logarithmic labels get no TUNIT and say "[dex]" in their description.
_UNITS = {"teff": "K", "v_micro": "km / s", "v_macro": "km / s", "vsini": "km / s"}
_DESCRIPTIONS = {
    "IDENTIFIER": "spectrum identifier",
    "SPECTRUM_PK": "spectrum.id in the database",
    "MODEL_PK": "cannon_model.id in the database",
    "CHI2": "chi-squared of the best fit",
    "RCHI2": "reduced chi-squared of the best fit",
    "SNR": "signal-to-noise ratio of the spectrum",
    "N_PIXELS": "number of usable pixels",
    "IER": "optimiser return code",
    "NFEV": "number of model evaluations",
    "X0_INDEX": "index of the starting point that won",
    "FLAGS": "bit field of astra_cannon.flags (astra-cannon flags)",
    "STATUS": "ok or failed",
    "REASON": "why the fit failed or was flagged",
    "TASK_RUN_PK": "task_run.id that wrote this row",
    "COVARIANCE": "label covariance matrix in LABEL_NAMES order",
}


def label_unit(label_name) -> str:
    """Physical unit of a label: K for Teff, km/s for velocities, dex otherwise (logg in cgs)."""
    from .models import label_column

    try:
        column = label_column(label_name)
    except ValueError:
        return "dex"
    return _UNITS.get(column, "dex")


def _fits_unit(unit):
    return None if unit == "dex" else unit


def _model_row(model):
    if model is None:
        row = TrainedModel.select().order_by(TrainedModel.id.desc()).first()
        if row is None:
            raise LookupError("no trained model in the database")
        return row
    if isinstance(model, TrainedModel):
        return model
    text = str(model)
    query = TrainedModel.select()
    query = query.where(TrainedModel.id == int(text)) if text.isdigit() else query.where(TrainedModel.name == text)
    row = query.order_by(TrainedModel.id.desc()).first()
    if row is None:
        raise LookupError(f"no model {text!r} in the database")
    return row


def results_table(model=None, include_failed=True):
    """Build an astropy Table of one model's results.

    Parameters
    ----------
    model : int, str or TrainedModel, optional
        Model primary key or name; default the newest model.
    include_failed : bool
        Keep failed fits (NaN labels, failure flags, reason).

    Returns
    -------
    astropy.table.Table
        Columns ``IDENTIFIER``, one column per label and ``E_<label>``, fit summary,
        ``FLAGS``, ``STATUS``, ``REASON``, ``COVARIANCE`` (L x L); ``meta`` holds the model.

    Raises
    ------
    LookupError
        When the model does not exist.
    """
    from astropy.table import Column, Table

    row = _model_row(model)
    names = [str(n) for n in row.label_names]
    L = len(names)
    results = store.read_results(row.id)
    if not include_failed:
        results = [r for r in results if r["status"] != "failed"]
    n = len(results)
    values = np.full((n, L), np.nan)
    errors = np.full((n, L), np.nan)
    cov = np.full((n, L, L), np.nan)
    for i, r in enumerate(results):
        labels = r.get("labels") or {}
        for j, name in enumerate(names):
            v = labels.get(name)
            values[i, j] = np.nan if v is None else float(v)
        c = r.get("covariance")
        if c is not None and c.shape == (L, L):
            cov[i] = c
            with np.errstate(invalid="ignore"):
                errors[i] = np.sqrt(np.where(np.diag(c) >= 0, np.diag(c), np.nan))

    def col(key, dtype, fill):
        return np.array([fill if r.get(key) is None else r.get(key) for r in results], dtype=dtype)

    table = Table()
    table["IDENTIFIER"] = Column(np.array([str(r["identifier"]) for r in results], dtype=str),
                                 description=_DESCRIPTIONS["IDENTIFIER"])
    table["SPECTRUM_PK"] = Column(col("spectrum_pk", np.int64, -1), description=_DESCRIPTIONS["SPECTRUM_PK"])
    table["MODEL_PK"] = Column(np.full(n, row.id, dtype=np.int64), description=_DESCRIPTIONS["MODEL_PK"])
    for j, name in enumerate(names):
        unit = label_unit(name)
        table[name.upper()] = Column(values[:, j], unit=_fits_unit(unit), description=f"{name} [{unit}]")
        table["E_" + name.upper()] = Column(errors[:, j], unit=_fits_unit(unit),
                                            description=f"uncertainty of {name} [{unit}]")
    table["CHI2"] = Column(col("chi2", np.float64, np.nan), description=_DESCRIPTIONS["CHI2"])
    table["RCHI2"] = Column(col("rchi2", np.float64, np.nan), description=_DESCRIPTIONS["RCHI2"])
    table["SNR"] = Column(col("snr", np.float64, np.nan), description=_DESCRIPTIONS["SNR"])
    for key, name in (("n_pixels", "N_PIXELS"), ("ier", "IER"), ("nfev", "NFEV"), ("x0_index", "X0_INDEX")):
        table[name] = Column(col(key, np.int64, -1), description=_DESCRIPTIONS[name] + " (-1: none)")
    table["FLAGS"] = Column(col("flags", np.int64, 0), description=_DESCRIPTIONS["FLAGS"])
    table["STATUS"] = Column(np.array([str(r["status"]) for r in results], dtype=str),
                             description=_DESCRIPTIONS["STATUS"])
    table["REASON"] = Column(np.array([str(r.get("reason") or "") for r in results], dtype=str),
                             description=_DESCRIPTIONS["REASON"])
    table["TASK_RUN_PK"] = Column(col("task_run_pk", np.int64, -1), description=_DESCRIPTIONS["TASK_RUN_PK"])
    table["COVARIANCE"] = Column(cov, description=_DESCRIPTIONS["COVARIANCE"])
    table.meta.update({
        "MODEL": (row.name, "cannon_model.name"),
        "MODELPK": (row.id, "cannon_model.id"),
        "TSHASH": (str(row.training_set_hash)[:64], "training-set hash"),
        "ORDER": (row.polynomial_order if row.polynomial_order is not None else -1, "polynomial order"),
        "CODEVERS": (str(row.code_version), "astra_cannon version that trained the model"),
        "EXPVERS": (__version__, "astra_cannon version that exported this file"),
        "LABELS": (",".join(names), "label names (order of COVARIANCE)"),
        "FAILBITS": (F.FAILURE_FLAGS, "FLAGS bits that mean no labels"),
    })
    return table


def export_results(path, model=None, include_failed=True, overwrite=False) -> dict:
    """Write one model's results to a FITS binary table.

    Parameters
    ----------
    path : str or Path
        Output file (``.fits``).
    model : int, str or TrainedModel, optional
        Model primary key or name; default the newest model.
    include_failed : bool
        Keep failed fits (NaN labels).
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    dict
        ``path``, ``n_rows``, ``n_failed``, ``model_name``.

    Raises
    ------
    FileExistsError
        When ``path`` exists and ``overwrite`` is False.
    LookupError
        When the model does not exist.
    """
    from astropy.io import fits

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (use overwrite)")
    table = results_table(model, include_failed=include_failed)
    meta = dict(table.meta)
    table.meta.clear()
    hdu = fits.table_to_hdu(table)
    hdu.name = "CANNON"
    for i, name in enumerate(table.colnames, start=1):
        description = table[name].description
        if description:
            hdu.header.comments[f"TTYPE{i}"] = description[:47]
    for key, (value, comment) in meta.items():
        # A long value (the 64-digit hash) leaves no room for a comment on an 80-byte card.
        hdu.header[key] = (value, comment) if len(str(value)) + len(comment) < 60 else value
    primary = fits.PrimaryHDU()
    primary.header["ORIGIN"] = ("astra_cannon", "software that wrote this file")
    primary.header["MODEL"] = meta["MODEL"]
    hdul = fits.HDUList([primary, hdu])
    for h in hdul:
        h.add_checksum()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        hdul.writeto(tmp, overwrite=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    n_failed = int(np.sum(np.asarray(table["STATUS"]) == "failed")) if len(table) else 0
    return {"path": str(path), "n_rows": len(table), "n_failed": n_failed, "model_name": meta["MODEL"][0]}
