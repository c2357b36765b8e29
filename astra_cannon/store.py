"""Every write to the astra_cannon database goes through this module.

Write protocol (see ``write_chunk``): fit with no database access, then ONE transaction upserts
the chunk's ``cannon_result`` rows (unique on (model, spectrum), so reruns overwrite in place)
and marks the chunk's ``task_run`` row ``done``. A crash at any point therefore leaves either
nothing of the chunk or all of it plus its marker, and completion (``task_complete``) is one
``SELECT`` on the marker.

All functions use the database bound by :func:`astra_cannon.db.connect` (connecting with the
configured URL if nothing is bound yet).

Test-only fault injection: :func:`fault_point` SIGKILLs the current process when the
environment variable ``ASTRA_CANNON_KILL_AT`` equals the point's name. Points, in order:
``before_results`` (write lock held, nothing written), ``before_marker`` (results written,
marker not), ``before_commit`` (everything written, not committed) and ``after_commit``.
Never set this variable outside tests.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import signal
import socket
import sqlite3
import traceback as _traceback

import numpy as np
import peewee as pw

from . import __version__, db, flags as flagbits
from .models import (
    RESULT_UPDATE_FIELDS,
    CannonResult,
    RawJSON,
    Spectrum,
    TaskRun,
    TrainedModel,
    ValidationRun,
    covariance_to_blob,
    covariance_from_blob,
    label_column,
    sanitise_json,
)

__all__ = [
    "register_model",
    "register_spectra",
    "begin_task_run",
    "finish_task_run",
    "write_chunk",
    "task_complete",
    "completed_task_ids",
    "pending_spectrum_pks",
    "failed_results",
    "failed_task_runs",
    "read_results",
    "write_validation_run",
    "read_validation_runs",
    "VALIDATION_KINDS",
    "parameters_hash",
    "fault_point",
    "FAULT_POINTS",
    "KILL_ENV",
]

log = logging.getLogger(__name__)

KILL_ENV = "ASTRA_CANNON_KILL_AT"
FAULT_POINTS = ("before_results", "before_marker", "before_commit", "after_commit")

# SQLite refuses statements with more bound variables than this (999 before 3.32).
_SQLITE_MAX_VARIABLES = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999
_IN_CHUNK = 900  # identifiers per "IN (...)" query: safe on every backend


def fault_point(name: str) -> None:
    """Test-only: SIGKILL this process when ``ASTRA_CANNON_KILL_AT == name``.

    Parameters
    ----------
    name : str
        One of :data:`FAULT_POINTS`.
    """
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def parameters_hash(parameters) -> str:
    """Return the sha256 hex digest of ``parameters`` as canonical JSON (sorted keys,
    numpy values converted, NaN/inf as null)."""
    text = json.dumps(sanitise_json(parameters), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _chunks(seq, size):
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


def _batch_size(n_columns: int) -> int:
    return max(1, _SQLITE_MAX_VARIABLES // max(1, n_columns))


def _pk(obj) -> int:
    return int(getattr(obj, "id", obj))


# --------------------------------------------------------------------------------------------
# models and spectra


def register_model(*, name, model, path, file_checksum, parameters) -> TrainedModel:
    """Record a trained model file (idempotent).

    Parameters
    ----------
    name : str
        Human-readable name (stored verbatim).
    model : object
        A trained ``CannonModel`` or any object with ``label_names``, ``training_set_hash``
        and optionally ``vectorizer.order``, ``regularization``, ``censors``.
    path : str or os.PathLike
        Where the model file is.
    file_checksum : str
        sha256 of the model file.
    parameters : dict
        The training parameters; their canonical hash and ``training_set_hash`` identify the
        model.

    Returns
    -------
    TrainedModel
        The row; registering the same (training set, parameters) again returns the same row,
        with ``name``, ``path`` and ``file_checksum`` updated to the latest call.

    Raises
    ------
    ValueError
        When the model has no ``training_set_hash`` or ``label_names``.
    """
    ts_hash = getattr(model, "training_set_hash", None)
    label_names = getattr(model, "label_names", None)
    if not ts_hash or label_names is None or len(label_names) == 0:
        raise ValueError("register_model needs a trained model with training_set_hash and label_names")
    vectorizer = getattr(model, "vectorizer", None)
    order = getattr(vectorizer, "order", None)
    regularization = getattr(model, "regularization", None)
    if regularization is not None and np.ndim(regularization) != 0:
        regularization = None  # per-pixel values live in the model file and ``parameters``
    row = dict(
        name=str(name),
        label_names=[str(n) for n in label_names],
        polynomial_order=None if order is None else int(order),
        regularization=None if regularization is None else float(regularization),
        censoring=getattr(model, "censors", None),
        training_set_hash=str(ts_hash),
        path=os.fspath(path),
        file_checksum=str(file_checksum),
        code_version=__version__,
        parameters=sanitise_json(parameters),
        parameters_hash=parameters_hash(parameters),
        created=_now(),
    )
    with db.atomic_write():
        (TrainedModel.insert(**row)
         .on_conflict(conflict_target=[TrainedModel.training_set_hash, TrainedModel.parameters_hash],
                      preserve=[TrainedModel.name, TrainedModel.path, TrainedModel.file_checksum])
         .execute())
    return TrainedModel.get((TrainedModel.training_set_hash == row["training_set_hash"])
                            & (TrainedModel.parameters_hash == row["parameters_hash"]))


def register_spectra(sources) -> list[int]:
    """Record input spectra (idempotent) and return their primary keys.

    Parameters
    ----------
    sources : iterable of dict
        Each with ``identifier`` (unique name, stored verbatim) and ``path``, and optionally
        ``hdu``, ``row``, ``checksum``. Re-registering an identifier updates its path, hdu, row
        and checksum.

    Returns
    -------
    list of int
        ``spectrum.id`` for each source, in input order (duplicates get the same id).

    Raises
    ------
    ValueError
        When a source lacks ``identifier`` or ``path``.
    """
    sources = list(sources)
    unique = {}
    for source in sources:
        try:
            identifier = str(source["identifier"])
            path = os.fspath(source["path"])
        except KeyError as exc:
            raise ValueError(f"spectrum source {source!r} lacks {exc.args[0]!r}") from None
        if identifier in unique:
            continue
        hdu, row = source.get("hdu"), source.get("row")
        unique[identifier] = (
            identifier, str(path),
            None if hdu is None else int(hdu),
            None if row is None else int(row),
            source.get("checksum"),
            _now(),
        )
    if not unique:
        return []
    fields = [Spectrum.identifier, Spectrum.path, Spectrum.hdu, Spectrum.row, Spectrum.checksum,
              Spectrum.created]
    # Sorted, so concurrent registrations lock rows in the same order (no PostgreSQL deadlock).
    rows = [unique[k] for k in sorted(unique)]
    with db.atomic_write():
        for batch in _chunks(rows, _batch_size(len(fields))):
            (Spectrum.insert_many(batch, fields=fields)
             .on_conflict(conflict_target=[Spectrum.identifier],
                          preserve=[Spectrum.path, Spectrum.hdu, Spectrum.row, Spectrum.checksum])
             .execute())
    pks = {}
    keys = sorted(unique)
    for batch in _chunks(keys, _IN_CHUNK):
        query = Spectrum.select(Spectrum.id, Spectrum.identifier).where(Spectrum.identifier.in_(batch))
        pks.update({identifier: pk for pk, identifier in query.tuples()})
    return [pks[str(source["identifier"])] for source in sources]


# --------------------------------------------------------------------------------------------
# task runs (provenance and completion markers)


def begin_task_run(*, task_family, task_id, parameters, code_version=None) -> TaskRun:
    """Insert a ``running`` task_run row for one attempt of a task (own transaction).

    Parameters
    ----------
    task_family, task_id : str
        Luigi's ``task_family`` and ``task_id``.
    parameters : dict
        Significant parameters (stored as sanitised JSON, with their hash).
    code_version : str, optional
        Defaults to ``astra_cannon.__version__``.

    Returns
    -------
    TaskRun
    """
    host = socket.gethostname()
    row = TaskRun(
        task_family=str(task_family),
        task_id=str(task_id),
        parameters=sanitise_json(parameters),
        parameters_hash=parameters_hash(parameters),
        code_version=str(code_version or __version__),
        status="running",
        host=host,
        pid=os.getpid(),
        started=_now(),
    )
    with db.atomic_write():
        _close_dead_attempts(str(task_id), host)
        row.save(force_insert=True)
    return row


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, TypeError, ValueError):
        return True  # exists but not ours, or unknown: do not guess
    return True


def _close_dead_attempts(task_id, host):
    """Mark earlier ``running`` attempts of this task on this host whose process is gone.

    A SIGKILL (or a power cut) fires no handler, so such a row would say ``running`` forever.
    Only this host's processes can be checked; other hosts' rows are left alone.
    """
    stale = [r.id for r in TaskRun.select(TaskRun.id, TaskRun.pid).where(
        (TaskRun.task_id == task_id) & (TaskRun.status == "running") & (TaskRun.host == host))
        if r.pid != os.getpid() and not _pid_alive(r.pid)]
    if stale:
        TaskRun.update({TaskRun.status: "failed", TaskRun.error_type: "Killed",
                        TaskRun.error_message: "the process ended without finishing (killed or crashed); "
                                               "closed by a later attempt",
                        TaskRun.finished: _now()}).where(TaskRun.id.in_(stale)).execute()


def _finish_values(task_run, status, summary):
    now = _now()
    started = getattr(task_run, "started", None)
    if not isinstance(started, datetime.datetime):
        started = TaskRun.select(TaskRun.started).where(TaskRun.id == _pk(task_run)).scalar()
    elapsed = (now - started).total_seconds() if isinstance(started, datetime.datetime) else None
    values = {TaskRun.status: status, TaskRun.finished: now, TaskRun.elapsed: elapsed}
    if summary is not None:
        values[TaskRun.summary] = sanitise_json(summary)
    return values


def finish_task_run(task_run, *, status, error=None, traceback=None, summary=None) -> bool:
    """Mark a task run ``done`` or ``failed`` in its own transaction.

    Never raises (a failure here is logged) so that it cannot mask the task's own error.

    Parameters
    ----------
    task_run : TaskRun or int
    status : {"done", "failed"}
    error : BaseException or str, optional
        Stored as ``error_type`` (the exception class name) and ``error_message``.
    traceback : str, optional
        Formatted traceback; taken from ``error`` when it is an exception and this is omitted.
    summary : dict, optional
        JSON summary (counts etc.), merged into any summary already stored (e.g. by
        :func:`write_chunk`).

    Returns
    -------
    bool
        True when the row was updated.
    """
    try:
        if status not in ("done", "failed"):
            raise ValueError(f"status must be 'done' or 'failed', not {status!r}")
        values = _finish_values(task_run, status, summary)
        if error is not None:
            values[TaskRun.error_type] = type(error).__name__ if isinstance(error, BaseException) else "Error"
            values[TaskRun.error_message] = str(error)
            if traceback is None and isinstance(error, BaseException) and error.__traceback__ is not None:
                traceback = "".join(_traceback.format_exception(type(error), error, error.__traceback__))
        if traceback is not None:
            values[TaskRun.traceback] = str(traceback)
        with db.atomic_write():
            if summary is not None:
                # Merge with what write_chunk stored (counts) rather than replace it.
                old = TaskRun.select(TaskRun.summary).where(TaskRun.id == _pk(task_run)).scalar()
                if isinstance(old, dict) and isinstance(values[TaskRun.summary], dict):
                    values[TaskRun.summary] = {**old, **values[TaskRun.summary]}
            n = TaskRun.update(values).where(TaskRun.id == _pk(task_run)).execute()
        if isinstance(task_run, TaskRun):
            task_run.status = status
        return n == 1
    except Exception:  # noqa: BLE001 - documented: never raise over the task's own error
        log.exception("could not record task run %s as %s", _pk(task_run), status)
        return False


def task_complete(task_id) -> bool:
    """True when a ``done`` task_run exists for ``task_id`` (one SELECT)."""
    return (TaskRun.select(TaskRun.id)
            .where((TaskRun.task_id == str(task_id)) & (TaskRun.status == "done"))
            .exists())


def completed_task_ids(task_ids) -> set:
    """Return the subset of ``task_ids`` that have a ``done`` task_run (bulk query)."""
    task_ids = sorted({str(t) for t in task_ids})
    done = set()
    for batch in _chunks(task_ids, _IN_CHUNK):
        query = (TaskRun.select(TaskRun.task_id).distinct()
                 .where(TaskRun.task_id.in_(batch) & (TaskRun.status == "done")))
        done.update(t for (t,) in query.tuples())
    return done


# --------------------------------------------------------------------------------------------
# results


_META_DEFAULTS = dict(chi_sq=None, r_chi_sq=None, snr=None, n_pixels=None, ier=None, nfev=None,
                      best_result_index=None, x0=None, flags=0, fail_message=None, status="ok",
                      t_elapsed=None)


def _optional_int(value):
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _column_map(label_names):
    columns = {}
    for j, name in enumerate(label_names):
        try:
            column = label_column(name)
        except ValueError:
            continue  # kept in the labels JSON only
        if column in columns.values():
            raise ValueError(f"labels {label_names!r} map to the column {column!r} twice")
        columns[j] = column
    return columns


def _result_rows(task_run_pk, model_pk, spectrum_pks, label_names, labels, cov, meta, reasons):
    S, L = labels.shape
    columns = _column_map(label_names)
    fields = ([CannonResult.model, CannonResult.spectrum, CannonResult.task_run,
               CannonResult.label_names, CannonResult.labels, CannonResult.covariance,
               CannonResult.chi2, CannonResult.rchi2, CannonResult.snr, CannonResult.n_pixels,
               CannonResult.ier, CannonResult.nfev, CannonResult.x0_index, CannonResult.x0,
               CannonResult.t_elapsed, CannonResult.flags, CannonResult.reason,
               CannonResult.status, CannonResult.created, CannonResult.updated]
              + [getattr(CannonResult, c) for c in columns.values()]
              + [getattr(CannonResult, "e_" + c) for c in columns.values()])

    # Per-label errors from the covariance diagonal, vectorised over the chunk.
    if cov is not None:
        diag = np.diagonal(cov, axis1=1, axis2=2)
        with np.errstate(invalid="ignore"):
            errors = np.where(np.isfinite(diag) & (diag >= 0), np.sqrt(np.abs(diag)), np.nan)
    else:
        errors = np.full((S, L), np.nan)
    finite = np.isfinite(labels).all(axis=1)
    label_idx = list(columns)
    now = _now()
    names = [str(n) for n in label_names]
    names_json = RawJSON(json.dumps(names))  # identical for every row: encode once

    # First occurrence of each spectrum wins; later ones only set DUPLICATE_INPUT on it.
    first, duplicates = {}, {}
    for i, pk in enumerate(spectrum_pks):
        if pk in first:
            duplicates[pk] = duplicates.get(pk, 0) + 1
        else:
            first[pk] = i

    rows, n_failed, flag_counts = [], 0, {}
    for pk in sorted(first):
        i = first[pk]
        m = dict(_META_DEFAULTS)
        if meta is not None and meta[i]:
            m.update(meta[i])
        row_flags = int(m.get("flags") or 0)
        if pk in duplicates:
            row_flags |= flagbits.DUPLICATE_INPUT
        reason = reasons[i] if reasons is not None and reasons[i] else m.get("fail_message")
        failed = (m.get("status") == "failed") or flagbits.is_failure(row_flags) or not finite[i]
        if failed:
            if not flagbits.is_failure(row_flags):
                # Keep "status = failed" and "flags has a failure bit" equivalent.
                row_flags |= flagbits.PROCESSING_ERROR
                if not reason and not finite[i]:
                    reason = "non-finite labels without a failure flag"
            if not reason:
                reason = ", ".join(flagbits.decode(row_flags))
            values = [None] * len(label_idx)
            errs = [None] * len(label_idx)
            labels_json, blob = None, None
            n_failed += 1
        else:
            values = [float(labels[i, j]) for j in label_idx]
            errs = [float(errors[i, j]) for j in label_idx]
            labels_json = RawJSON(json.dumps(dict(zip(names, labels[i].tolist()))))  # finite
            blob = covariance_to_blob(cov[i]) if cov is not None else None
        for bit in flagbits.decode(row_flags):
            flag_counts[bit] = flag_counts.get(bit, 0) + 1
        rows.append((
            int(model_pk), int(pk), task_run_pk, names_json, labels_json, blob,
            m.get("chi_sq"), m.get("r_chi_sq"), m.get("snr"), _optional_int(m.get("n_pixels")),
            _optional_int(m.get("ier")), _optional_int(m.get("nfev")),
            _optional_int(m.get("best_result_index")), m.get("x0"), m.get("t_elapsed"),
            row_flags, None if reason is None else str(reason), "failed" if failed else "ok",
            now, now, *values, *errs,
        ))
    summary = dict(n_spectra=len(spectrum_pks), n_results=len(rows), n_failed=n_failed,
                   n_ok=len(rows) - n_failed, n_duplicates=sum(duplicates.values()),
                   flag_counts=flag_counts)
    return fields, rows, summary


def _validate_chunk(spectrum_pks, label_names, labels, cov, meta, reasons):
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim == 1 and len(label_names) == 1:
        labels = labels[:, None]
    S = len(spectrum_pks)
    if labels.shape != (S, len(label_names)):
        raise ValueError(f"labels have shape {labels.shape}, expected ({S}, {len(label_names)}) "
                         "(spectra, labels)")
    if cov is not None:
        cov = np.asarray(cov, dtype=np.float64)
        if cov.shape != (S, len(label_names), len(label_names)):
            raise ValueError(f"cov has shape {cov.shape}, expected ({S}, {len(label_names)}, {len(label_names)})")
    for what, seq in (("meta", meta), ("reasons", reasons)):
        if seq is not None and len(seq) != S:
            raise ValueError(f"{what} has {len(seq)} entries for {S} spectra")
    return labels, cov


_TEMPLATES: dict = {}


def _values_template(database, fields, upsert, row):
    """Split peewee's upsert SQL into (prefix, one-row placeholder group, suffix), or None.

    Derived from peewee's own rendering of one and of two rows, and checked, so the text
    (quoting, placeholders, ON CONFLICT clause) is peewee's for this backend.
    """
    key = (type(database), database.param, tuple(f.name for f in fields))
    if key not in _TEMPLATES:
        sql1, params1 = CannonResult.insert_many([row], fields=fields).on_conflict(**upsert).sql()
        sql2, _ = CannonResult.insert_many([row, row], fields=fields).on_conflict(**upsert).sql()
        n = len(sql2) - len(sql1) - 2
        common = 0
        while common < len(sql1) and sql1[common] == sql2[common]:
            common += 1
        start = common - n
        template = None
        if len(params1) == len(fields) and n > 0 and start >= 0:
            prefix, group, suffix = sql1[:start], sql1[start:common], sql1[common:]
            if prefix + group + ", " + group + suffix == sql2 and group.startswith("("):
                template = (prefix, group, suffix)
        _TEMPLATES[key] = template
    return _TEMPLATES[key]


def _upsert_statements(database, fields, rows, upsert):
    """Return ``[(sql, params)]`` upserting ``rows`` (tuples in ``fields`` order) in batches.

    peewee renders ~90 columns x thousands of rows slowly (about 0.5 ms per row) although the
    statement only repeats one placeholder group per row; so the statement is assembled from
    peewee's rendering of a single row, and the parameters are converted by the fields' own
    ``db_value`` in peewee's row-major order. Falls back to peewee's full rendering if the
    split cannot be verified.
    """
    if not rows:
        return []
    converters = [f.db_value for f in fields]
    template = _values_template(database, fields, upsert, rows[0])
    statements = []
    for batch in _chunks(rows, _batch_size(len(fields))):
        if template is None:
            statements.append(CannonResult.insert_many(batch, fields=fields).on_conflict(**upsert).sql())
            continue
        prefix, group, suffix = template
        params = [convert(value) for row in batch for convert, value in zip(converters, row)]
        statements.append((prefix + ", ".join([group] * len(batch)) + suffix, params))
    return statements


def write_chunk(*, task_run, model_pk, spectrum_pks, label_names, labels, cov, meta,
                reasons=None, summary=None) -> dict:
    """Write one chunk's results and mark its task run done, in ONE transaction.

    Parameters
    ----------
    task_run : TaskRun or int
        The run from :func:`begin_task_run`; marked ``done`` (with ``finished``, ``elapsed``
        and ``summary``) in the same transaction as the results.
    model_pk : int or TrainedModel
    spectrum_pks : sequence of int
        ``spectrum.id`` of each row of ``labels``. A repeated pk keeps its first row and gets
        the ``DUPLICATE_INPUT`` flag.
    label_names : sequence of str
        Label order of ``labels`` and ``cov``; labels without a ``cannon_result`` column are
        kept in the ``labels`` JSON and the covariance blob only.
    labels : array (S, L)
        Physical units; NaN rows are failures.
    cov : array (S, L, L) or None
    meta : list of S dicts or None
        ``CannonModel.test`` metadata (``chi_sq, r_chi_sq, snr, n_pixels, ier, nfev,
        best_result_index, x0, flags, fail_message, status, t_elapsed``); missing keys are NULL.
    reasons : list of S str or None, optional
        Failure reasons overriding ``fail_message`` (e.g. unreadable input files).
    summary : dict, optional
        Merged into the counts stored in ``task_run.summary``.

    Returns
    -------
    dict
        The stored summary: ``n_spectra, n_results, n_ok, n_failed, n_duplicates,
        flag_counts`` plus ``summary``.

    Raises
    ------
    ValueError
        On inconsistent shapes (before anything is written).
    peewee.DatabaseError
        When the write fails; the transaction is rolled back (no results, no marker).
    """
    label_names = [str(n) for n in label_names]
    spectrum_pks = [int(pk) for pk in spectrum_pks]
    labels, cov = _validate_chunk(spectrum_pks, label_names, labels, cov, meta, reasons)
    run_pk = _pk(task_run)
    fields, rows, counts = _result_rows(run_pk, _pk(model_pk), spectrum_pks, label_names,
                                        labels, cov, meta, reasons)
    stored_summary = dict(counts, **(summary or {}))
    upsert = dict(conflict_target=[CannonResult.model, CannonResult.spectrum],
                  preserve=list(RESULT_UPDATE_FIELDS))
    database = db.get_database()
    # Render before taking the write lock, so other writers queue only for the execution.
    statements = _upsert_statements(database, fields, rows, upsert)
    with db.atomic_write(database):
        fault_point("before_results")
        for sql, params in statements:
            database.execute_sql(sql, params)
        fault_point("before_marker")
        values = _finish_values(task_run, "done", stored_summary)
        if TaskRun.update(values).where(TaskRun.id == run_pk).execute() != 1:
            raise pw.IntegrityError(f"task_run {run_pk} does not exist; chunk not written")
        fault_point("before_commit")
    fault_point("after_commit")
    if isinstance(task_run, TaskRun):
        task_run.status = "done"
    return stored_summary


def pending_spectrum_pks(model_pk, spectrum_pks, include_failed=False) -> list[int]:
    """Return the spectra (input order, de-duplicated) without a result for this model.

    Parameters
    ----------
    model_pk : int or TrainedModel
    spectrum_pks : sequence of int
    include_failed : bool
        Also return spectra whose result is a failure (``status = 'failed'``), to rerun them.
    """
    wanted = list(dict.fromkeys(int(pk) for pk in spectrum_pks))
    done = set()
    for batch in _chunks(sorted(wanted), _IN_CHUNK):
        cond = (CannonResult.model == _pk(model_pk)) & CannonResult.spectrum.in_(batch)
        if include_failed:
            cond &= CannonResult.status != "failed"
        done.update(pk for (pk,) in CannonResult.select(CannonResult.spectrum).where(cond).tuples())
    return [pk for pk in wanted if pk not in done]


def failed_results(model_pk=None) -> list[dict]:
    """Return failed result rows (NULL labels), oldest spectrum first.

    Each dict has ``result_pk, model_pk, model_name, spectrum_pk, identifier, path, hdu, row,
    flags, flag_names, reason, task_run_pk, task_id, updated``.
    """
    query = (CannonResult
             .select(CannonResult.id, CannonResult.model, TrainedModel.name, CannonResult.spectrum,
                     Spectrum.identifier, Spectrum.path, Spectrum.hdu, Spectrum.row,
                     CannonResult.flags, CannonResult.reason, CannonResult.task_run,
                     TaskRun.task_id, CannonResult.updated)
             .join(Spectrum, on=(CannonResult.spectrum == Spectrum.id))
             .switch(CannonResult)
             .join(TrainedModel, on=(CannonResult.model == TrainedModel.id))
             .switch(CannonResult)
             .join(TaskRun, pw.JOIN.LEFT_OUTER, on=(CannonResult.task_run == TaskRun.id))
             .where(CannonResult.status == "failed")
             .order_by(CannonResult.model, CannonResult.spectrum))
    if model_pk is not None:
        query = query.where(CannonResult.model == _pk(model_pk))
    keys = ("result_pk", "model_pk", "model_name", "spectrum_pk", "identifier", "path", "hdu",
            "row", "flags", "reason", "task_run_pk", "task_id", "updated")
    out = []
    for values in query.tuples():
        item = dict(zip(keys, values))
        item["flag_names"] = flagbits.decode(item["flags"] or 0)
        out.append(item)
    return out


def failed_task_runs(include_resolved=False) -> list[dict]:
    """Return failed task runs, newest first.

    Parameters
    ----------
    include_resolved : bool
        Also return failures of tasks that have since completed.

    Returns
    -------
    list of dict
        ``task_run_pk, task_family, task_id, error_type, error_message, started, finished,
        host, pid``.
    """
    query = TaskRun.select(TaskRun.id, TaskRun.task_family, TaskRun.task_id, TaskRun.error_type,
                           TaskRun.error_message, TaskRun.started, TaskRun.finished,
                           TaskRun.host, TaskRun.pid).where(TaskRun.status == "failed")
    if not include_resolved:
        Done = TaskRun.alias()
        done = Done.select(Done.task_id).where(Done.status == "done")
        query = query.where(TaskRun.task_id.not_in(done))
    keys = ("task_run_pk", "task_family", "task_id", "error_type", "error_message", "started",
            "finished", "host", "pid")
    return [dict(zip(keys, values)) for values in query.order_by(TaskRun.id.desc()).tuples()]


def read_results(model_pk=None, spectrum_pks=None) -> list[dict]:
    """Return result rows as dicts (label columns, fit summary, ``identifier``), with the
    ``covariance`` decoded to an (L, L) float64 array (or ``None``)."""
    query = (CannonResult.select(CannonResult, Spectrum.identifier)
             .join(Spectrum, on=(CannonResult.spectrum == Spectrum.id))
             .order_by(CannonResult.model, CannonResult.spectrum))
    if model_pk is not None:
        query = query.where(CannonResult.model == _pk(model_pk))
    if spectrum_pks is not None:
        query = query.where(CannonResult.spectrum.in_([int(pk) for pk in spectrum_pks]))
    out = []
    for row in query.dicts():
        names = row.get("label_names") or []
        row["covariance"] = covariance_from_blob(row["covariance"], len(names) if names else None)
        row["model_pk"] = row.pop("model")
        row["spectrum_pk"] = row.pop("spectrum")
        row["task_run_pk"] = row.pop("task_run")
        out.append(row)
    return out



# --------------------------------------------------------------------------------------------
# validation runs (cross-validation, regularisation choice)

#: Values of ``validation_run.kind``.
VALIDATION_KINDS = ("cross_validation", "regularization")


def write_validation_run(*, kind, parameters, training_set_hash, label_names, task_run=None,
                         model_name=None, n_stars=None, bias=None, scatter=None,
                         chosen_regularization=None, at_grid_edge=None, results=None,
                         plot_paths=None, summary=None) -> ValidationRun:
    """Store a cross-validation or regularisation-choice result (upsert), and mark its task
    run done in the same transaction.

    Parameters
    ----------
    kind : {"cross_validation", "regularization"}
    parameters : dict
        Everything that defines the run (model identity, folds, grid, seed...); its canonical
        hash with ``kind`` is the row's key, so a rerun overwrites the row in place.
    training_set_hash : str
    label_names : sequence of str
    task_run : TaskRun or int, optional
        Marked ``done`` (with ``summary``) in the same transaction as the row.
    model_name : str, optional
    n_stars : int, optional
    bias, scatter : dict, optional
        Per-label values (label -> float; NaN stored as null).
    chosen_regularization : float, optional
    at_grid_edge : bool, optional
    results : dict, optional
        Any further JSON-safe detail (numpy values are converted).
    plot_paths : list of str, optional
    summary : dict, optional
        Stored in ``task_run.summary``.

    Returns
    -------
    ValidationRun
        The stored row.

    Raises
    ------
    ValueError
        For an unknown ``kind``.
    peewee.DatabaseError
        When the write fails (nothing is written).
    """
    if kind not in VALIDATION_KINDS:
        raise ValueError(f"kind must be one of {VALIDATION_KINDS}, not {kind!r}")
    p_hash = parameters_hash({"kind": kind, **dict(parameters)})
    row = dict(
        kind=kind,
        model_name=None if model_name is None else str(model_name),
        training_set_hash=str(training_set_hash),
        label_names=[str(n) for n in label_names],
        parameters=sanitise_json(parameters),
        parameters_hash=p_hash,
        n_stars=_optional_int(n_stars),
        bias=None if bias is None else sanitise_json(bias),
        scatter=None if scatter is None else sanitise_json(scatter),
        chosen_regularization=chosen_regularization,
        at_grid_edge=None if at_grid_edge is None else bool(at_grid_edge),
        results=None if results is None else sanitise_json(results),
        plot_paths=None if plot_paths is None else [str(p) for p in plot_paths],
        task_run=None if task_run is None else _pk(task_run),
        created=_now(),
    )
    preserve = [getattr(ValidationRun, k) for k in row if k not in ("kind", "parameters_hash")]
    with db.atomic_write():
        (ValidationRun.insert(**row)
         .on_conflict(conflict_target=[ValidationRun.kind, ValidationRun.parameters_hash], preserve=preserve)
         .execute())
        if task_run is not None:
            values = _finish_values(task_run, "done", summary or {})
            if TaskRun.update(values).where(TaskRun.id == _pk(task_run)).execute() != 1:
                raise pw.IntegrityError(f"task_run {_pk(task_run)} does not exist")  # pragma: no cover
    if isinstance(task_run, TaskRun):
        task_run.status = "done"
    return ValidationRun.get((ValidationRun.kind == kind) & (ValidationRun.parameters_hash == p_hash))


def read_validation_runs(kind=None, training_set_hash=None, limit=None) -> list[dict]:
    """Return stored validation runs as dicts, newest first.

    Parameters
    ----------
    kind : str, optional
        ``"cross_validation"`` or ``"regularization"``.
    training_set_hash : str, optional
    limit : int, optional
    """
    query = ValidationRun.select().order_by(ValidationRun.id.desc())
    if kind is not None:
        query = query.where(ValidationRun.kind == str(kind))
    if training_set_hash is not None:
        query = query.where(ValidationRun.training_set_hash == str(training_set_hash))
    if limit is not None:
        query = query.limit(int(limit))
    out = []
    for row in query.dicts():
        row["task_run_pk"] = row.pop("task_run")
        out.append(row)
    return out
