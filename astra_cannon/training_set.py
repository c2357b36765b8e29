"""Assemble a Cannon training set from a label table and a batch of spectra.

Steps, in this order (every dropped star is counted and named in ``TrainingSet.dropped``):

1. ``missing_identifier``: rows whose identifier is empty or masked.
2. ``cuts``: quality cuts. ``cuts`` is a dict ``column -> (min, max)`` (inclusive, ``None``
   for an open side); ``flag_cuts`` a dict ``column -> bitmask`` rejecting rows with any of
   those bits set; ``require`` a list of boolean columns that must be True. A missing value in
   a cut column fails the cut. Column names are case-insensitive.
3. ``missing_labels``: rows with a missing (masked, sentinel, non-finite) label.
   ``missing="raise"`` raises ``ValueError`` naming them; ``missing="drop"`` drops them.
4. ``bad_spectrum`` / ``no_spectrum``: the star has only flagged spectra (failure bits) /
   no spectrum. Stars are matched to spectra by identifier: ``spectrum_ids`` if given, else
   each spectrum's ``meta["object_id"]`` (apStar ``OBJID``), else its identifier. When a star
   has several usable spectra, the one with the highest ``meta["snr"]`` is used.
5. ``duplicates``: a star listed more than once (allStar repeats stars across fields and
   telescopes). ``duplicates="snr"`` (default) keeps the row with the highest S/N (table
   column ``snr_column``, default a column named ``SNR`` if any, else the spectrum's S/N);
   ties, and rows without S/N, are broken by the smallest label tuple, so the choice does not
   depend on row order. ``duplicates="first"`` keeps the first row in table order.

The output rows are sorted by identifier. ``TrainingSet.hash`` is a sha256 over the label
names (sorted), and per star (sorted by identifier) the identifier, the labels (in sorted-name
order) and the flux, ivar and wavelength bytes: it does not depend on the table's row order or
on the order of ``label_names``. Label pairs with ``|rho| >= correlation_threshold`` are
reported in ``TrainingSet.warnings`` (and logged), as is a constant label.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np

from . import flags as F

logger = logging.getLogger(__name__)

DROP_REASONS = ("missing_identifier", "cuts", "missing_labels", "bad_spectrum", "no_spectrum", "duplicates")
_HASH_VERSION = b"astra_cannon training set v1\n"
_MAX_NAMED = 20


@dataclass
class TrainingSet:
    """A training set ready for :class:`astra_cannon.CannonModel`.

    Attributes
    ----------
    labels : ndarray, shape (N, L)
        Native float64, in the order of ``label_names``.
    label_names : list of str
        As requested by the caller.
    identifiers : list of str
        Star identifiers, sorted.
    flux, ivar : ndarray, shape (N, P)
        The matched spectra (non-finite flux -> 1 with ivar 0; negative or non-finite ivar -> 0).
    wavelength : ndarray, shape (P,)
    dropped : dict
        ``reason -> {"count": int, "identifiers": [...]}`` for every reason in
        :data:`DROP_REASONS` (``"cuts"`` also has ``"by_column"`` counts).
    hash : str
        Hex sha256, independent of row and label-column order.
    warnings : list of str
        Strong label correlations, constant labels, unnormalised spectra, unused spectra.
    correlations : list of (str, str, float)
        Label pairs with ``|rho| >= correlation_threshold``.
    spectrum_identifiers : list of str
        ``Spectra.identifiers`` of the spectrum used for each star.
    n_input : int
        Rows in the label table.
    """

    labels: np.ndarray
    label_names: list
    identifiers: list
    flux: np.ndarray
    ivar: np.ndarray
    wavelength: np.ndarray
    dropped: dict
    hash: str
    warnings: list = field(default_factory=list)
    correlations: list = field(default_factory=list)
    spectrum_identifiers: list = field(default_factory=list)
    n_input: int = 0

    def __len__(self):
        return self.labels.shape[0]

    def provenance(self):
        """JSON-safe summary (counts, dropped identifiers, hash, warnings)."""
        return {"n_input": int(self.n_input), "n_stars": len(self), "label_names": list(self.label_names),
                "hash": self.hash, "dropped": self.dropped, "warnings": list(self.warnings)}


def _describe(ids):
    ids = list(ids)
    shown = ", ".join(ids[:_MAX_NAMED])
    return shown + (f" ... and {len(ids) - _MAX_NAMED} more" if len(ids) > _MAX_NAMED else "")


def _cut_mask(table, cuts, flag_cuts, require):
    from .io.labels import find_column, label_array

    keep = np.ones(len(table), dtype=bool)
    by_column = {}
    for name, bounds in (cuts or {}).items():
        try:
            lo, hi = bounds
        except (TypeError, ValueError):
            raise ValueError(f"cut for {name!r} must be (min, max), got {bounds!r}") from None
        v = label_array(table, [name])[:, 0]
        ok = np.isfinite(v)
        if lo is not None:
            ok &= v >= lo
        if hi is not None:
            ok &= v <= hi
        by_column[find_column(table, name)] = int(np.count_nonzero(keep & ~ok))
        keep &= ok
    for name, bits in (flag_cuts or {}).items():
        col = table[find_column(table, name)]
        data = np.asarray(col)
        if data.dtype.kind not in "iu":
            raise ValueError(f"flag column {name!r} is not an integer column ({data.dtype})")
        missing = np.broadcast_to(np.asarray(getattr(col, "mask", False), dtype=bool), data.shape)
        ok = ~missing & ((data.astype(np.int64) & int(bits)) == 0)
        by_column[find_column(table, name)] = int(np.count_nonzero(keep & ~ok))
        keep &= ok
    for name in require or ():
        col = table[find_column(table, name)]
        data = np.asarray(col)
        missing = np.broadcast_to(np.asarray(getattr(col, "mask", False), dtype=bool), data.shape)
        ok = ~missing & data.astype(bool)
        by_column[find_column(table, name)] = int(np.count_nonzero(keep & ~ok))
        keep &= ok
    return keep, by_column


def _spectrum_index(spectra, spectrum_ids):
    """star id -> (index of best usable spectrum or None, any spectrum at all)."""
    if spectrum_ids is None:
        spectrum_ids = [str((m or {}).get("object_id") or ident).strip()
                        for m, ident in zip(spectra.meta, spectra.identifiers)]
    spectrum_ids = [str(s).strip() for s in spectrum_ids]
    if len(spectrum_ids) != len(spectra):
        raise ValueError(f"{len(spectrum_ids)} spectrum_ids for {len(spectra)} spectra")
    usable = (np.asarray(spectra.flags) & F.FAILURE_FLAGS) == 0
    best = {}
    for i, sid in enumerate(spectrum_ids):
        snr = (spectra.meta[i] or {}).get("snr")
        snr = float(snr) if isinstance(snr, (int, float)) and np.isfinite(snr) else -np.inf
        cur = best.get(sid)
        if not usable[i]:
            best.setdefault(sid, None)
            continue
        if cur is None or snr > cur[1]:
            best[sid] = (i, snr)
    return {sid: (v[0] if v else None) for sid, v in best.items()}


def training_set_hash(identifiers, labels, label_names, flux, ivar, wavelength=None):
    """sha256 of a training set, independent of row order and of the order of label columns.

    Parameters
    ----------
    identifiers : sequence of str
        Unique per row.
    labels : array_like, shape (N, L)
    label_names : sequence of str
    flux, ivar : array_like, shape (N, P)
    wavelength : array_like, shape (P,), optional

    Returns
    -------
    str
    """
    labels = np.asarray(labels, dtype=np.float64).reshape(len(identifiers), -1)
    names = [str(n) for n in label_names]
    col_order = np.argsort(np.array(names, dtype=object).astype(str), kind="stable")
    row_order = sorted(range(len(identifiers)), key=lambda i: str(identifiers[i]))
    flux = np.asarray(flux, dtype="<f8")
    ivar = np.asarray(ivar, dtype="<f8")
    h = hashlib.sha256(_HASH_VERSION)
    h.update(("\x1f".join(names[j] for j in col_order) + "\n").encode())
    if wavelength is not None:
        h.update(np.ascontiguousarray(np.asarray(wavelength, dtype="<f8")).tobytes())
    for i in row_order:
        h.update(str(identifiers[i]).encode() + b"\x00")
        row = labels[i, col_order] + 0.0  # -0.0 -> 0.0
        h.update(np.ascontiguousarray(row, dtype="<f8").tobytes())
        h.update(np.ascontiguousarray(flux[i]).tobytes())
        h.update(np.ascontiguousarray(ivar[i]).tobytes())
    return h.hexdigest()


def label_correlations(labels, label_names, threshold=0.9):
    """Pairs ``(a, b, rho)`` with ``|rho| >= threshold`` and the names of constant labels."""
    labels = np.asarray(labels, dtype=np.float64)
    pairs, constant = [], []
    if labels.shape[0] < 3:
        return pairs, constant
    std = labels.std(axis=0)
    constant = [str(label_names[j]) for j in np.flatnonzero(~(std > 0))]
    centred = labels - labels.mean(axis=0)
    safe = np.where(std > 0, std, 1.0)
    rho = (centred.T @ centred) / labels.shape[0] / np.outer(safe, safe)
    for a in range(labels.shape[1]):
        for b in range(a + 1, labels.shape[1]):
            if std[a] > 0 and std[b] > 0 and abs(rho[a, b]) >= threshold:
                pairs.append((str(label_names[a]), str(label_names[b]), float(rho[a, b])))
    return pairs, constant


def assemble_training_set(labels, spectra, label_names, *, id_column="APOGEE_ID", spectrum_ids=None,
                          cuts=None, flag_cuts=None, require=None, missing="raise", duplicates="snr",
                          snr_column=None, correlation_threshold=0.9):
    """Build a :class:`TrainingSet` (see the module docstring for the rules).

    Parameters
    ----------
    labels : astropy.table.Table or str or os.PathLike
        Label table, or a path read with :func:`astra_cannon.io.labels.read_label_table`.
    spectra : astra_cannon.io.base.Spectra
        Candidate spectra (normalised for training).
    label_names : sequence of str
        Label columns (case-insensitive), in the model's order.
    id_column : str
        Star identifier column.
    spectrum_ids : sequence of str, optional
        Star identifier of each spectrum (default ``meta["object_id"]`` or the identifier).
    cuts : dict, optional
        ``column -> (min, max)``; ``None`` for an open bound; inclusive.
    flag_cuts : dict, optional
        ``column -> int``: rows with any of these bits set are dropped.
    require : sequence of str, optional
        Boolean columns that must be True.
    missing : {"raise", "drop"}
        What to do with rows missing a label.
    duplicates : {"snr", "first"}
    snr_column : str, optional
        S/N column for ``duplicates="snr"`` (default: ``SNR`` when present).
    correlation_threshold : float

    Returns
    -------
    TrainingSet

    Raises
    ------
    ValueError
        ``missing="raise"`` and some rows miss labels (named); no star left; bad options.
    KeyError
        A named column does not exist.
    """
    from .io.labels import clean_table, label_array, read_label_table, string_column

    if missing not in ("raise", "drop"):
        raise ValueError(f"missing must be 'raise' or 'drop', got {missing!r}")
    if duplicates not in ("snr", "first"):
        raise ValueError(f"duplicates must be 'snr' or 'first', got {duplicates!r}")
    label_names = [str(n) for n in label_names]
    if not label_names:
        raise ValueError("no label names")
    if len({n.lower() for n in label_names}) != len(label_names):
        raise ValueError(f"label names repeat: {label_names}")
    # Tables given directly get the same sentinel/non-finite cleaning as files.
    table = clean_table(labels) if hasattr(labels, "colnames") else read_label_table(labels)
    n_input = len(table)

    ids = np.array(string_column(table, id_column), dtype=object)
    values = label_array(table, label_names)
    snr = None
    if duplicates == "snr":
        name = snr_column
        if name is None and any(c.strip().lower() == "snr" for c in table.colnames):
            name = "SNR"
        if name is not None:
            snr = label_array(table, [name])[:, 0]

    dropped = {r: {"count": 0, "identifiers": []} for r in DROP_REASONS}
    alive = np.ones(n_input, dtype=bool)

    def drop(reason, mask):
        idx = np.flatnonzero(alive & mask)
        dropped[reason]["count"] += int(idx.size)
        dropped[reason]["identifiers"] += [str(ids[i]) if ids[i] else f"<row {i}>" for i in idx]
        alive[idx] = False

    drop("missing_identifier", ids == "")
    keep, by_column = _cut_mask(table, cuts, flag_cuts, require)
    drop("cuts", ~keep)
    dropped["cuts"]["by_column"] = by_column

    no_label = ~np.all(np.isfinite(values), axis=1)
    if missing == "raise" and np.any(alive & no_label):
        bad = [str(ids[i]) for i in np.flatnonzero(alive & no_label)]
        raise ValueError(f"{len(bad)} training stars miss a label ({', '.join(label_names)}): {_describe(bad)}; "
                         "pass missing='drop' to drop them")
    drop("missing_labels", no_label)

    index = _spectrum_index(spectra, spectrum_ids)
    # match[i]: spectrum row, None (only flagged spectra) or -1 (no spectrum at all).
    match = [index[s] if s in index else -1 for s in ids]
    drop("bad_spectrum", np.array([m is None for m in match], dtype=bool))
    drop("no_spectrum", np.array([m is not None and m < 0 for m in match], dtype=bool))

    # De-duplicate: group alive rows by identifier and keep one per group.
    rows = np.flatnonzero(alive)
    if duplicates == "snr":
        def score(i):
            # Highest S/N first; then the smallest label tuple, so row order never decides.
            s = snr[i] if snr is not None else (spectra.meta[match[i]] or {}).get("snr")
            s = float(s) if s is not None and np.isfinite(float(s)) else -np.inf
            return (-s, tuple(values[i]))

        ranked = sorted(rows, key=lambda i: (str(ids[i]), score(i)))
    else:
        ranked = sorted(rows, key=lambda i: (str(ids[i]), i))
    seen, dup = set(), np.zeros(n_input, dtype=bool)
    for i in ranked:
        if ids[i] in seen:
            dup[i] = True
        seen.add(ids[i])
    drop("duplicates", dup)

    final = sorted(np.flatnonzero(alive), key=lambda i: str(ids[i]))
    if not final:
        raise ValueError(f"no training star left out of {n_input}: "
                         + ", ".join(f"{k} {v['count']}" for k, v in dropped.items() if v["count"]))
    spec_rows = np.array([match[i] for i in final], dtype=np.int64)
    flux = np.array(spectra.flux[spec_rows], dtype=np.float64)
    ivar = np.array(spectra.ivar[spec_rows], dtype=np.float64)
    ivar[~np.isfinite(ivar) | (ivar < 0)] = 0.0
    bad_flux = ~np.isfinite(flux)
    ivar[bad_flux] = 0.0
    flux[bad_flux] = 1.0
    out_ids = [str(ids[i]) for i in final]
    out_labels = values[final]

    warns = []
    if not spectra.normalised:
        warns.append("training spectra are not continuum-normalised")
    pairs, constant = label_correlations(out_labels, label_names, correlation_threshold)
    for a, b, rho in pairs:
        warns.append(f"labels {a} and {b} are strongly correlated (rho = {rho:+.3f}, |rho| >= {correlation_threshold})")
    for name in constant:
        warns.append(f"label {name} is constant over the training set")
    unused = len(spectra) - len(set(spec_rows.tolist()))
    if unused:
        warns.append(f"{unused} of {len(spectra)} spectra were not used")
    for w in warns:
        logger.warning("training set: %s", w)

    digest = training_set_hash(out_ids, out_labels, label_names, flux, ivar, spectra.wavelength)
    return TrainingSet(labels=out_labels, label_names=label_names, identifiers=out_ids, flux=flux, ivar=ivar,
                       wavelength=np.array(spectra.wavelength, dtype=np.float64), dropped=dropped, hash=digest,
                       warnings=warns, correlations=pairs,
                       spectrum_identifiers=[spectra.identifiers[j] for j in spec_rows], n_input=n_input)
