"""Pipeline library: the work behind the Luigi tasks, callable and testable without Luigi.

The tasks in :mod:`astra_cannon.tasks` are thin: they decide *what* to run and call these
functions, which read inputs, train or fit, and hand rows to :mod:`astra_cannon.store` (the one
writer). Nothing here imports Luigi.

Job model
---------
A :class:`Job` names a training set, the spectra to label and the model options. The model's
identity (what makes a different model, hence new result rows) is
:func:`model_identity`: the training-set file's sha256, the sorted label names, the polynomial
order, the regularisation and the code version. The spectra are cut into chunks
(:func:`plan_chunks`): a chunk is a list of :class:`Segment` (file, row range), identified by
:func:`chunk_key`. One ``InferChunk`` task runs per chunk; what is still to do per spectrum lives
in SQL (:func:`astra_cannon.store.pending_spectrum_pks`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import time
import traceback as _traceback
from pathlib import Path

import numpy as np

from . import __version__, config, db, flags as F, store
from .models import CannonResult, TaskRun, TrainedModel
from .io import FORMATS  # one list of reader formats, shared with the CLI and tasks

__all__ = [
    "Job",
    "Segment",
    "FORMATS",
    "DEFAULT_CHUNK_SIZE",
    "file_sha256",
    "normalise_label_names",
    "model_identity",
    "model_name",
    "model_path",
    "count_spectra",
    "plan_chunks",
    "chunk_key",
    "segments_to_json",
    "segments_from_json",
    "read_training_set",
    "train_and_register",
    "find_model",
    "read_chunk",
    "fit_spectra",
    "normalise_for_model",
    "continuum_mask_for_grid",
    "read_training_provenance",
    "model_plot_path",
    "infer_chunk",
    "rchi2_threshold",
    "flag_large_rchi2",
    "rerun_tokens",
    "status_report",
    "format_status",
    "connected",
    "example_job",
    "result_query",
]

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 500
# Label names reach SQL only as bound values or through label_column(); still, refuse anything
# that does not look like a label so hostile strings never reach a file name or a log line.
_LABEL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\[\]/]{0,63}$")


# --------------------------------------------------------------------------------------------
# identities


def file_sha256(path) -> str:
    """Return the sha256 hex digest of a file's bytes.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def normalise_label_names(label_names) -> tuple:
    """Return label names as a sorted tuple, validated.

    Parameters
    ----------
    label_names : str or sequence of str
        Comma-separated string or a sequence.

    Returns
    -------
    tuple of str
        Sorted (so reordering labels does not change the model's identity).

    Raises
    ------
    ValueError
        Empty, duplicated or malformed names (anything but letters, digits, ``_[]/``).
    """
    if isinstance(label_names, str):
        names = [n.strip() for n in label_names.split(",")]
    else:
        names = [str(n).strip() for n in label_names]
    names = [n for n in names if n]
    if not names:
        raise ValueError("no label names given")
    bad = [n for n in names if not _LABEL_RE.match(n)]
    if bad:
        raise ValueError(f"invalid label name(s) {bad!r}: use letters, digits and _ (e.g. TEFF, FE_H)")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate label names in {names!r}")
    return tuple(sorted(names))


# Which theta covariance training keeps for the test step's model-noise correction
# (CannonModel.train's ``theta_covariance``): "auto" keeps the exact one up to 256 MB (3 labels)
# and the separable one above (17 labels: the exact one takes 0.5 GB and ~5x the training
# time); "always" the exact one, "separable", "never" none (uncertainties without the model's
# noise: 3-6x too small at 17 labels x 1000 stars).
_THETA_COVARIANCE_TRAIN = {"auto": "auto", "always": "exact", "separable": "separable", "never": "none"}
THETA_COVARIANCE = tuple(_THETA_COVARIANCE_TRAIN)


def check_theta_covariance(value) -> str:
    if value not in THETA_COVARIANCE:
        raise ValueError(f"theta_covariance must be one of {THETA_COVARIANCE}, got {value!r}")
    return value


def model_identity(*, training_set_sha256, label_names, order, regularization, code_version,
                   theta_covariance="auto") -> dict:
    """The significant parameters of a model, as a JSON-safe dict (also the stored parameters).

    Changing any of them makes a new model row, hence new result rows; old rows stay untouched.
    ``theta_covariance`` (:data:`THETA_COVARIANCE`) enters only when it is not "auto", so the
    identities of models trained before it existed are unchanged.
    """
    identity = {
        "training_set_sha256": str(training_set_sha256),
        "label_names": list(normalise_label_names(label_names)),
        "order": int(order),
        "regularization": float(regularization),
        "code_version": str(code_version),
    }
    if check_theta_covariance(theta_covariance) != "auto":
        identity["theta_covariance"] = theta_covariance
    return identity


def training_theta_covariance(identity):
    """``CannonModel.train``'s ``theta_covariance`` for a model identity."""
    return _THETA_COVARIANCE_TRAIN[identity.get("theta_covariance", "auto")]


def model_name(identity: dict) -> str:
    """A stable, filename-safe model name, e.g. ``cannon-o2-4labels-1a2b3c4d5e6f``."""
    digest = store.parameters_hash(identity)[:12]
    return f"cannon-o{identity['order']}-{len(identity['label_names'])}labels-{digest}"


def model_path(identity: dict, model_dir=None) -> Path:
    """Where the model file for ``identity`` lives (``<work_dir>/models/<name>.npz`` by default)."""
    directory = Path(model_dir) if model_dir else config.work_dir() / "models"
    return directory / f"{model_name(identity)}.npz"


# --------------------------------------------------------------------------------------------
# chunks


@dataclasses.dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of one spectra file (``stop=None``: every row of the file)."""

    path: str
    start: int = 0
    stop: int | None = None

    def contains(self, path, row) -> bool:
        if os.path.realpath(str(path)) != os.path.realpath(self.path):
            return False
        row = 0 if row is None else int(row)
        return row >= self.start and (self.stop is None or row < self.stop)

    def size(self) -> int:
        return 1 if self.stop is None else self.stop - self.start


def count_spectra(path, format="example"):
    """Number of spectra in a file without reading the pixels (see :func:`astra_cannon.io.count_spectra`)."""
    from .io import count_spectra as _count

    return _count(path, format)


def plan_chunks(paths, chunk_size=DEFAULT_CHUNK_SIZE, format="example") -> list:
    """Cut spectra files into chunks of about ``chunk_size`` spectra.

    Parameters
    ----------
    paths : sequence of str or Path
        Spectra files, in order (made absolute).
    chunk_size : int
        Spectra per chunk (>= 1). Files are split by rows when their row count is known
        cheaply (see :func:`count_spectra`); otherwise a file counts as one spectrum.
    format : str
        Reader format, see :data:`FORMATS`.

    Returns
    -------
    list of list of Segment
        Deterministic for the same inputs.

    Raises
    ------
    ValueError
        For ``chunk_size < 1`` or no paths.
    """
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    if not paths:
        raise ValueError("no spectra files given")
    chunks, current, filled = [], [], 0
    for path in paths:
        n = count_spectra(path, format)
        if n is None:
            current.append(Segment(path))
            filled += 1
        else:
            start = 0
            while start < n:
                take = min(n - start, chunk_size - filled)
                current.append(Segment(path, start, start + take))
                filled += take
                start += take
                if filled >= chunk_size:
                    chunks.append(current)
                    current, filled = [], 0
        if filled >= chunk_size:
            chunks.append(current)
            current, filled = [], 0
    if current:
        chunks.append(current)
    return chunks


def segments_to_json(segments) -> str:
    """Canonical JSON for a chunk's segments (a Luigi parameter value)."""
    return json.dumps([[s.path, s.start, s.stop] for s in segments], separators=(",", ":"))


def segments_from_json(text) -> list:
    """Parse :func:`segments_to_json` output, validating it.

    Raises
    ------
    ValueError
        For anything but a list of ``[path, start, stop]``.
    """
    try:
        items = json.loads(text)
        segments = [Segment(str(p), int(a), None if b is None else int(b)) for p, a, b in items]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"malformed chunk segments {str(text)[:200]!r}: {exc}") from None
    if not segments:
        raise ValueError("a chunk needs at least one segment")
    return segments


def chunk_key(segments, format="example") -> str:
    """Identity of a chunk: sha256 (24 hex) of its format and segments."""
    text = format + "|" + segments_to_json(segments)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


# --------------------------------------------------------------------------------------------
# training


def read_training_set(path, label_names=None):
    """Read a training set (the example FITS layout) and select labels.

    Parameters
    ----------
    path : str or Path
        ``training_set.fits`` in the layout of :mod:`astra_cannon.io.example`.
    label_names : sequence of str, optional
        Labels to train on (default all); returned sorted.

    Returns
    -------
    labels : ndarray (N, L)
    label_names : tuple of str (sorted)
    flux, ivar : ndarray (N, P)
    wavelength : ndarray (P,)

    Raises
    ------
    OSError
        Unreadable training set.
    ValueError
        A requested label is not in the file.
    """
    from .io.example import read_example_training_set

    labels, names, _ids, flux, ivar, wavelength = read_example_training_set(path)
    wanted = normalise_label_names(label_names if label_names else names)
    missing = [n for n in wanted if n not in names]
    if missing:
        raise ValueError(f"labels {missing} are not in the training set {path} (it has {list(names)})")
    columns = [list(names).index(n) for n in wanted]
    return labels[:, columns], wanted, flux, ivar, wavelength


def read_training_provenance(path) -> dict | None:
    """The assembly provenance stored in a training-set file, or ``None``.

    Training sets assembled from survey files (:func:`astra_cannon.workflow.assemble_training_file`)
    carry a ``PROVENANCE`` HDU: the label table and spectra used, the quality cuts, and every
    dropped star with its reason. Files without it (e.g. the bundled example) give ``None``.
    """
    from astropy.io import fits

    try:
        with fits.open(path, memmap=False) as hdul:
            if "PROVENANCE" not in hdul:
                return None
            raw = np.asarray(hdul["PROVENANCE"].data, dtype=np.uint8).tobytes()
        return json.loads(raw.decode("utf-8"))
    except (OSError, KeyError, ValueError) as exc:
        log.warning("cannot read the provenance of training set %s: %s", path, exc)
        return None


def model_plot_path(model_file) -> Path:
    """Where the theta/s2 figure of a model file goes: ``<model>.theta.png`` next to it."""
    model_file = Path(model_file)
    return model_file.with_name(model_file.stem + ".theta.png")


def _plot_model_quietly(model, path, title=None):
    """Draw the theta/s2 figure; return its path, or ``None`` (logged) when it cannot be drawn.

    Plots are diagnostics: a missing matplotlib or a drawing error never fails training.
    """
    try:
        from . import plot
        import matplotlib  # noqa: F401 - optional dependency: skip cleanly without it
    except ImportError as exc:
        log.info("matplotlib is not available (%s): model plot skipped", exc)
        return None
    try:
        return str(plot.theta_and_scatter(model, path, title=title))
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        log.warning("could not draw the model plot %s: %s: %s", path, type(exc).__name__, exc)
        return None


def train_and_register(*, training_set, identity, path, model_name_=None, report=None, plots=True):
    """Train a model, write it atomically, draw its theta/s2 figure and register it.

    Parameters
    ----------
    training_set : str or Path
    identity : dict
        From :func:`model_identity`; its ``training_set_sha256`` must match the file.
    path : str or Path
        Model file to write (replaced atomically).
    report : callable, optional
        ``report(message, percent)`` at each stage (Luigi status messages).
    plots : bool
        Write ``<model>.theta.png`` next to the model file (skipped, with a log line, when
        matplotlib is missing or drawing fails).

    Returns
    -------
    (CannonModel, TrainedModel, dict)
        The trained model, its database row and a summary (with ``plots`` and, for assembled
        survey training sets, ``training_set``: dropped stars and their reasons).

    Raises
    ------
    ValueError
        When the training set changed since the task was scheduled (sha256 mismatch).
    """
    from . import CannonModel, PolynomialVectorizer

    report = report or (lambda message, percent: None)
    t0 = time.perf_counter()
    report("checking the training set", 0)
    actual = file_sha256(training_set)
    if actual != identity["training_set_sha256"]:
        raise ValueError(f"training set {training_set} changed: sha256 {actual[:16]}..., "
                         f"expected {identity['training_set_sha256'][:16]}...")
    report("reading the training set", 5)
    labels, names, flux, ivar, wavelength = read_training_set(training_set, identity["label_names"])
    vectorizer = PolynomialVectorizer(list(names), identity["order"])
    model = CannonModel(labels, flux, ivar, vectorizer, dispersion=wavelength,
                        regularization=identity["regularization"] or None)
    report(f"training on {labels.shape[0]} stars x {flux.shape[1]} pixels", 10)
    _, _, meta = model.train(theta_covariance=training_theta_covariance(identity))
    report("writing the model file", 80)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.write(path)  # atomic: temporary file + os.replace
    checksum = file_sha256(path)
    plot_paths = []
    if plots:
        report("drawing the model figure", 90)
        drawn = _plot_model_quietly(model, model_plot_path(path), title=model_name_ or model_name(identity))
        plot_paths = [drawn] if drawn else []
    row = store.register_model(name=model_name_ or model_name(identity), model=model, path=str(path),
                               file_checksum=checksum, parameters=identity)
    summary = {"n_stars": int(labels.shape[0]), "n_pixels": int(flux.shape[1]),
               "t_train": time.perf_counter() - t0, "model_pk": row.id, "path": str(path),
               "warnings": model.metadata.get("warnings", []),
               "n_dead_pixels": meta.get("n_dead_pixels"), "plots": plot_paths}
    provenance = read_training_provenance(training_set)
    if provenance is not None:
        summary["training_set"] = provenance
    report("done", 100)
    return model, row, summary


def load_model(row, label_names=None):
    """Read a registered model for inference and check it against its registry checksum.

    The test step's table of theta products is kept beside the model file
    (``<model>.test-table.npy``, :meth:`CannonModel.keep_test_table`) once it is large
    (e.g. 196 MB for 17 labels): every Luigi task maps the same file instead of rebuilding it.

    Raises
    ------
    ModelFileError
        Unreadable or foreign file, other labels, or a checksum differing from the registry's.
    """
    from .model import CannonModel, ModelFileError

    model = CannonModel.read(row.path, label_names=label_names)
    if file_sha256(row.path) != row.file_checksum:
        raise ModelFileError(f"{row.path} differs from the registered model file (checksum)")
    model.keep_test_table(f"{row.path}.test-table.npy")
    return model


def find_model(identity) -> TrainedModel | None:
    """Return the registered model row for ``identity`` (newest if several), or ``None``."""
    query = (TrainedModel.select()
             .where(TrainedModel.parameters_hash == store.parameters_hash(identity))
             .order_by(TrainedModel.id.desc()))
    return query.first()


# --------------------------------------------------------------------------------------------
# inference


def read_chunk(segments, format, wavelength):
    """Read a chunk's spectra on the model's grid.

    Each file is read once per segment; rows outside the segment are dropped. An unreadable
    file yields one flagged spectrum (in the segment that starts at row 0).

    Returns
    -------
    Spectra
    """
    from .io import ROW_RANGE_FORMATS, read_spectra
    from .io.base import Spectra

    batches = []
    for seg in segments:
        # select_model_pixels: an 8575-pixel apStar file feeds a model on a gap-removed grid by
        # index selection (never resampling); other grids are flagged by the reader.
        if format in ROW_RANGE_FORMATS and seg.stop is not None:
            # the reader makes just the segment's rows
            batches.append(read_spectra([seg.path], format=format, wavelength=wavelength,
                                        select_model_pixels=True, rows=range(seg.start, seg.stop)))
            continue
        batch = read_spectra([seg.path], format=format, wavelength=wavelength, select_model_pixels=True)
        n = len(batch)
        start = min(seg.start, n)
        stop = n if seg.stop is None else min(seg.stop, n)
        if start == 0 and stop == n:
            batches.append(batch)
            continue
        keep = slice(start, stop)
        batches.append(Spectra(
            identifiers=list(batch.identifiers[keep]), flux=batch.flux[keep], ivar=batch.ivar[keep],
            wavelength=batch.wavelength, flags=batch.flags[keep], reasons=list(batch.reasons[keep]),
            sources=list(batch.sources[keep]), normalised=batch.normalised, meta=list(batch.meta[keep])))
    batches = [b for b in batches if len(b)]
    if not batches:
        return None
    return Spectra.concatenate(batches) if len(batches) > 1 else batches[0]


def normalise_for_model(model, spectra, n_per_chip=150):
    """Continuum-normalise unnormalised spectra (e.g. apStar) before fitting.

    Normalised batches are returned unchanged. The model was trained on normalised flux, so
    fitting raw flux would give silent garbage. On an APOGEE grid (8575, 7514 or 7214 pixels)
    the shipped continuum-pixel mask defines the pseudo-continuum
    (:func:`continuum_mask_for_grid`); on any other grid, pixels whose baseline is near 1 and
    that respond little to the labels
    (:func:`astra_cannon.continuum.continuum_pixels_from_model`). ``meta[i]["continuum"]``
    says which was used.

    Returns
    -------
    Spectra
    """
    if spectra is None or spectra.normalised:
        return spectra
    from .continuum import continuum_pixels_from_model, normalise_spectra

    mask = continuum_mask_for_grid(spectra.wavelength)
    source = "shipped continuum mask"
    if mask is None:
        mask = continuum_pixels_from_model(model.theta, model.s2, n_per_chip=n_per_chip)
        source = "model continuum pixels"
    normalised, _ = normalise_spectra(spectra, mask)
    normalised.meta = [dict(m, continuum=source) for m in normalised.meta]
    return normalised


def continuum_mask_for_grid(wavelength):
    """The shipped continuum-pixel mask on an APOGEE grid, or ``None`` for any other grid.

    ``astra_cannon/data/cannon_continuum_pixels_7214.npz`` (the Cannon continuum pixels, via
    The Payne, MIT) moved onto the 8575, 7514 or 7214 grid when ``wavelength`` is one of them.

    Parameters
    ----------
    wavelength : array_like, shape (P,)

    Returns
    -------
    ndarray of bool, shape (P,), or None
    """
    from .io import grid

    name = grid.identify_grid(wavelength)
    if name is None:
        return None
    n_pixels = int(np.asarray(wavelength).shape[0])
    try:
        return grid.load_continuum_mask(n_pixels)
    except FileNotFoundError as exc:  # a broken installation: fall back, but say so
        log.warning("%s; choosing continuum pixels from the model instead", exc)
        return None


def _source_rows(spectra):
    """Spectrum sources for :func:`store.register_spectra` (HDU names are not stored)."""
    rows = []
    for identifier, src in zip(spectra.identifiers, spectra.sources):
        hdu = src.get("hdu")
        try:
            hdu = None if hdu is None else int(hdu)
        except (TypeError, ValueError):
            hdu = None  # e.g. "FLUX": the spectrum table stores HDU numbers only
        rows.append({"identifier": str(identifier), "path": str(src.get("path") or ""),
                     "hdu": hdu, "row": src.get("row"), "checksum": src.get("checksum")})
    return rows


def flag_large_rchi2(meta, threshold):
    """Set ``LARGE_RCHI2`` (a warning bit: labels are kept) in the metadata of every successful
    fit whose reduced chi2 exceeds ``threshold`` (``None``: do nothing). Modifies ``meta``."""
    if threshold is None:
        return meta
    for m in meta:
        if not m or m.get("status") == "failed":
            continue
        rchi2 = m.get("r_chi_sq")
        if rchi2 is not None and np.isfinite(rchi2) and rchi2 > threshold:
            m["flags"] = int(m.get("flags") or 0) | F.LARGE_RCHI2
    return meta


def fit_spectra(model, spectra):
    """Fit every usable spectrum of a batch; reader-flagged failures are not fitted.

    Parameters
    ----------
    model : CannonModel
    spectra : Spectra

    Returns
    -------
    labels : ndarray (S, L)
    cov : ndarray (S, L, L)
    meta : list of S dict
    reasons : list of S (str or None)
    """
    S, L = len(spectra), len(model.label_names)
    labels = np.full((S, L), np.nan)
    cov = np.full((S, L, L), np.nan)
    meta = [None] * S
    reasons = list(spectra.reasons)
    reader_flags = np.asarray(spectra.flags, dtype=np.int64)
    usable = (reader_flags & F.FAILURE_FLAGS) == 0
    idx = np.flatnonzero(usable)
    if idx.size:
        lab, cv, mt = model.test(spectra.flux[idx], spectra.ivar[idx])
        labels[idx], cov[idx] = lab, cv
        for k, i in enumerate(idx):
            m = dict(mt[k])
            m["flags"] = int(m.get("flags") or 0) | int(reader_flags[i])
            extra = spectra.meta[i] if spectra.meta and spectra.meta[i] else {}
            if extra.get("continuum"):
                m["continuum"] = extra["continuum"]
            meta[i] = m
    for i in np.flatnonzero(~usable):
        reason = reasons[i] or ", ".join(F.decode(int(reader_flags[i])))
        reasons[i] = reason
        extra = spectra.meta[i] if spectra.meta and spectra.meta[i] else {}
        meta[i] = {"flags": int(reader_flags[i]), "status": "failed", "fail_message": reason,
                   "snr": extra.get("snr"), "n_pixels": extra.get("n_pixels")}
    return labels, cov, meta, reasons


def rchi2_threshold() -> float | None:
    """The ``LARGE_RCHI2`` threshold: ``[astra_cannon] rchi2_threshold`` or
    ``ASTRA_CANNON_RCHI2_THRESHOLD`` (default 3.0; 0 or a negative value switches it off)."""
    value = config.get("rchi2_threshold", 3.0, float)
    return float(value) if value and value > 0 else None


def infer_chunk(*, model, model_pk, segments, format, task_run, rerun_failed=False, progress=None,
                report=None) -> dict:
    """Label one chunk and write it with its completion marker in one transaction.

    Parameters
    ----------
    model : CannonModel
    model_pk : int
    segments : list of Segment
    format : str
    task_run : TaskRun
        From :func:`store.begin_task_run`; marked done by :func:`store.write_chunk`.
    rerun_failed : bool
        Also re-fit spectra whose stored result is a failure (overwritten in place).
    progress : callable, optional
        ``progress(text)`` for one-line progress messages.
    report : callable, optional
        ``report(message, percent)`` at each stage (Luigi status message and progress bar).

    Returns
    -------
    dict
        Summary stored in ``task_run.summary``: counts, ``n_fitted``, ``n_skipped``, times.
    """
    report = report or (lambda message, percent: None)
    t0 = time.perf_counter()
    n_files = len({seg.path for seg in segments})
    report(f"reading {n_files} file(s)", 0)
    spectra = read_chunk(segments, format, model.dispersion)
    t_read = time.perf_counter() - t0
    if spectra is None:
        return store.write_chunk(task_run=task_run, model_pk=model_pk, spectrum_pks=[],
                                 label_names=model.label_names, labels=np.zeros((0, len(model.label_names))),
                                 cov=None, meta=[], summary={"n_fitted": 0, "n_skipped": 0})
    pks = store.register_spectra(_source_rows(spectra))
    pending = set(store.pending_spectrum_pks(model_pk, pks, include_failed=rerun_failed))
    # Only spectra still to do (all of them on a first run); a spectrum listed twice stays
    # twice here and write_chunk keeps its first row with DUPLICATE_INPUT.
    n_total = len(pks)
    take = [i for i, pk in enumerate(pks) if pk in pending]
    if len(take) < len(pks):
        spectra = _subset(spectra, take)
        pks = [pks[i] for i in take]
    t1 = time.perf_counter()
    if len(pks) and not spectra.normalised:
        report(f"continuum-normalising {len(pks)} spectra", 20)
        spectra = normalise_for_model(model, spectra)
    if len(pks):
        report(f"fitting {len(pks)} spectra ({n_total - len(pks)} already done)", 30)
        labels, cov, meta, reasons = fit_spectra(model, spectra)
        flag_large_rchi2(meta, rchi2_threshold())
    else:
        L = len(model.label_names)
        labels, cov, meta, reasons = np.zeros((0, L)), None, [], []
    t_fit = time.perf_counter() - t1
    report(f"writing {len(pks)} results", 90)
    extra = {"n_fitted": len(pks), "n_skipped": n_total - len(pks), "t_read": t_read, "t_fit": t_fit,
             "rerun_failed": bool(rerun_failed)}
    summary = store.write_chunk(task_run=task_run, model_pk=model_pk, spectrum_pks=pks,
                                label_names=list(model.label_names), labels=labels, cov=cov, meta=meta,
                                reasons=reasons, summary=extra)
    summary["t_total"] = time.perf_counter() - t0
    report(f"done: {len(pks)} fitted, {summary.get('n_failed', 0)} failed", 100)
    if progress is not None:
        progress(f"fitted {len(pks)} spectra ({summary.get('n_failed', 0)} failed) "
                 f"in {summary['t_total']:.1f} s")
    return summary


def _subset(spectra, idx):
    from .io.base import Spectra

    idx = list(idx)
    return Spectra(identifiers=[spectra.identifiers[i] for i in idx], flux=spectra.flux[idx],
                   ivar=spectra.ivar[idx], wavelength=spectra.wavelength, flags=spectra.flags[idx],
                   reasons=[spectra.reasons[i] for i in idx], sources=[spectra.sources[i] for i in idx],
                   normalised=spectra.normalised, meta=[spectra.meta[i] for i in idx])


def rerun_tokens(model_pk, chunks) -> dict:
    """Map chunk index -> token for chunks holding failed result rows of a model.

    The token hashes the chunk's failed (spectrum, writing task run) pairs: a rerun task with
    that token is complete once it has run; a later failure written by that rerun changes the
    token, so ``rerun-failed`` can be asked again. One query for all chunks.

    Parameters
    ----------
    model_pk : int
    chunks : list of list of Segment

    Returns
    -------
    dict
        ``{chunk_index: token}`` for chunks that have failures.
    """
    failed = store.failed_results(model_pk)
    by_path = {}
    for item in failed:
        by_path.setdefault(os.path.realpath(str(item["path"])), []).append(item)
    tokens = {}
    for index, segments in enumerate(chunks):
        hits = []
        for seg in segments:
            for item in by_path.get(os.path.realpath(seg.path), ()):
                if seg.contains(item["path"], item["row"]):
                    hits.append((item["spectrum_pk"], item["task_run_pk"]))
        if hits:
            tokens[index] = store.parameters_hash(sorted(hits))[:16]
    return tokens


# --------------------------------------------------------------------------------------------
# database sessions, status


@contextlib.contextmanager
def connected(url=None, migrate=False):
    """Connect (binding the models), yield the database, and close it again.

    Tasks use this around every database use so that no connection is open when Luigi forks
    its workers (each task connects itself).
    """
    database = db.connect(url or config.database_url(), migrate=migrate)
    try:
        yield database
    finally:
        db.close()


def status_report(model_pk=None, limit=20) -> dict:
    """Counts of task runs and results, failed task runs and failed spectra.

    Returns
    -------
    dict
        ``task_runs``: ``{family: {status: n}}``; ``results``: list of per-model counts;
        ``failed_task_runs``: unresolved failures (newest first, at most ``limit``);
        ``failed_spectra``: failed result rows (at most ``limit``), ``n_failed_spectra``.
    """
    from peewee import fn

    runs = {}
    for family, status, n in (TaskRun.select(TaskRun.task_family, TaskRun.status, fn.COUNT(TaskRun.id))
                              .group_by(TaskRun.task_family, TaskRun.status).tuples()):
        runs.setdefault(family, {})[status] = n
    results = []
    query = (CannonResult.select(CannonResult.model, TrainedModel.name, CannonResult.status,
                                 fn.COUNT(CannonResult.id))
             .join(TrainedModel, on=(CannonResult.model == TrainedModel.id))
             .group_by(CannonResult.model, TrainedModel.name, CannonResult.status)
             .order_by(CannonResult.model))
    if model_pk is not None:
        query = query.where(CannonResult.model == int(model_pk))
    per_model = {}
    for pk, name, status, n in query.tuples():
        entry = per_model.setdefault(pk, {"model_pk": pk, "model_name": name, "ok": 0, "failed": 0})
        entry[status] = entry.get(status, 0) + n
    results = list(per_model.values())
    failed_spectra = store.failed_results(model_pk)
    return {
        "task_runs": runs,
        "results": results,
        "failed_task_runs": store.failed_task_runs()[:limit],
        "n_failed_spectra": len(failed_spectra),
        "failed_spectra": failed_spectra[:limit],
    }


def format_status(report) -> str:
    """Human-readable text of :func:`status_report`."""
    lines = ["Task runs:"]
    if not report["task_runs"]:
        lines.append("  (none)")
    for family, counts in sorted(report["task_runs"].items()):
        text = ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))
        lines.append(f"  {family}: {text}")
    lines.append("Results:")
    if not report["results"]:
        lines.append("  (none)")
    for r in report["results"]:
        lines.append(f"  model {r['model_pk']} ({r['model_name']}): {r['ok']} ok, {r['failed']} failed")
    failed = report["failed_task_runs"]
    lines.append(f"Failed task runs (unresolved): {len(failed)}")
    for f in failed:
        message = (f["error_message"] or "").strip().splitlines()
        lines.append(f"  [{f['task_run_pk']}] {f['task_id']} on {f['host']} pid {f['pid']}: "
                     f"{f['error_type']}: {message[0] if message else ''}")
    lines.append(f"Failed spectra: {report['n_failed_spectra']}")
    for s in report["failed_spectra"]:
        lines.append(f"  {s['identifier']} (model {s['model_pk']}): flags {s['flags']} "
                     f"[{', '.join(s['flag_names'])}] {s['reason'] or ''}")
    if report["n_failed_spectra"] > len(report["failed_spectra"]):
        lines.append(f"  ... and {report['n_failed_spectra'] - len(report['failed_spectra'])} more")
    return "\n".join(lines)


def result_query(model_name_, label_names) -> str:
    """An SQL query that reads a model's results (for printing to users)."""
    from .models import label_column

    columns = []
    for name in label_names:
        try:
            c = label_column(name)
        except ValueError:
            continue
        columns += [c, "e_" + c]
    cols = ", ".join(["identifier"] + columns + ["rchi2", "flags", "status"])
    return (f"SELECT {cols} FROM cannon_result_view "
            f"WHERE model_name = '{model_name_}' ORDER BY identifier LIMIT 10;")


# --------------------------------------------------------------------------------------------
# jobs


@dataclasses.dataclass
class Job:
    """Everything that defines a labelling job (plain values; no Luigi).

    Attributes
    ----------
    training_set : str
        Training-set file.
    spectra : tuple of str
        Spectra files (absolute paths).
    label_names : tuple of str or None
        Labels (sorted); ``None`` means every label of the training set.
    order : int
    regularization : float
    format : str
    chunk_size : int
    code_version : str
    model_dir : str or None
    theta_covariance : {"auto", "always", "separable", "never"}
        Whether training keeps the theta covariance that the model-noise correction needs
        (see :data:`THETA_COVARIANCE`).
    """

    training_set: str
    spectra: tuple
    label_names: tuple | None = None
    order: int = 2
    regularization: float = 0.0
    format: str = "example"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    code_version: str = __version__
    model_dir: str | None = None
    theta_covariance: str = "auto"

    def __post_init__(self):
        self.training_set = os.path.abspath(os.fspath(self.training_set))
        self.spectra = tuple(os.path.abspath(os.fspath(p)) for p in self.spectra)
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; expected one of {FORMATS}")
        if self.label_names is not None:
            self.label_names = normalise_label_names(self.label_names)
        if int(self.order) < 1:
            raise ValueError(f"order must be >= 1, got {self.order}")
        if not np.isfinite(float(self.regularization)) or float(self.regularization) < 0:
            raise ValueError(f"regularization must be finite and >= 0, got {self.regularization}")
        if int(self.chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        check_theta_covariance(self.theta_covariance)

    def resolved_label_names(self) -> tuple:
        """Label names, reading the training set's header when none were given."""
        if self.label_names is None:
            from astropy.io import fits

            with fits.open(self.training_set, memmap=False) as hdul:
                names = [c for c in hdul["LABELS"].columns.names if c not in ("APOGEE_ID", "SNR")]
            self.label_names = normalise_label_names(names)
        return self.label_names

    def task_parameters(self) -> dict:
        """Parameters for the Luigi tasks (model identity plus where things are)."""
        return {
            "training_set": self.training_set,
            "training_set_sha256": file_sha256(self.training_set),
            "label_names": ",".join(self.resolved_label_names()),
            "order": int(self.order),
            "regularization": float(self.regularization),
            "code_version": str(self.code_version),
            "model_dir": self.model_dir or "",
            "theta_covariance": self.theta_covariance,
        }


def example_job(directory=None, n_train=300, n_test=3000, n_files=6, seed=2026, **job_options) -> Job:
    """The bundled example job, generating the example data into ``directory`` if absent.

    Parameters
    ----------
    directory : str or Path, optional
        Default ``<work_dir>/example``.
    n_train, n_test, n_files, seed
        Passed to :func:`astra_cannon.io.example.generate_example` when generating.
    **job_options
        Other :class:`Job` fields (chunk_size, order, ...).

    Returns
    -------
    Job
    """
    from .io import example

    directory = Path(directory) if directory else config.work_dir() / "example"
    if not (directory / example.MANIFEST_NAME).exists():
        _say(f"generating the example data ({n_train} training stars, {n_test} spectra) in {directory}")
        example.generate_example(directory, n_train=n_train, n_test=n_test, n_files=n_files, seed=seed)
    manifest = example.read_manifest(directory)
    spectra = [directory / entry["path"] for entry in manifest["spectra"]]
    job_options.setdefault("label_names", tuple(manifest["label_names"]))
    return Job(training_set=str(directory / manifest["training_set"]["path"]),
               spectra=tuple(str(p) for p in spectra), format="example", **job_options)


def _say(text):
    print(f"[astra-cannon] {text}", file=sys.stderr, flush=True)


def format_exception(exc) -> str:
    """Formatted traceback of ``exc``."""
    return "".join(_traceback.format_exception(type(exc), exc, exc.__traceback__))
