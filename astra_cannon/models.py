"""peewee tables of astra_cannon, bound at run time through :data:`database_proxy`.

Tables
------
``cannon_model``  (:class:`TrainedModel`)  one row per trained model file;
    unique on ``(training_set_hash, parameters_hash)``.
``spectrum``      (:class:`Spectrum`)      one row per input spectrum; unique ``identifier``.
``task_run``      (:class:`TaskRun`)       provenance: one row per task attempt; a task is
    complete when a row with its ``task_id`` has ``status = 'done'``.
``cannon_result`` (:class:`CannonResult`)  one row per (model, spectrum), overwritten in place
    by reruns.

``cannon_result`` has one nullable float column per label in :data:`LABEL_COLUMNS` plus
``e_<label>`` (square root of the covariance diagonal), so plain SQL works on both backends::

    SELECT teff, e_teff, logg, fe_h FROM cannon_result WHERE rchi2 < 3;

The view ``cannon_result_view`` adds the spectrum ``identifier`` and the model ``model_name``
to every result column (created by migration 0001)::

    SELECT identifier, model_name, teff, logg, fe_h FROM cannon_result_view WHERE flags = 0;

Conventions: a missing value (failed fit, NaN, inf) is SQL ``NULL`` on every backend, never NaN.
``labels`` holds every fitted label (including those without a column) as a JSON object, and
``covariance`` the full L x L matrix as little-endian float64 bytes in ``label_names`` order
(decode with :func:`covariance_from_blob`). ``flags`` is a bit field of
:mod:`astra_cannon.flags`; ``status`` is ``'ok'`` or ``'failed'``.

The schema itself is created and upgraded by the numbered scripts in
``astra_cannon.migrations`` (see :func:`astra_cannon.db.migrate`), never by
``create_tables`` on these classes.
"""

from __future__ import annotations

import datetime
import json
import math
import re

import numpy as np
import peewee as pw

__all__ = [
    "database_proxy",
    "BaseModel",
    "TrainedModel",
    "Spectrum",
    "TaskRun",
    "CannonResult",
    "ValidationRun",
    "LABEL_COLUMNS",
    "TASK_STATUSES",
    "label_column",
    "sanitise_json",
    "RawJSON",
    "covariance_to_blob",
    "covariance_from_blob",
]

database_proxy = pw.DatabaseProxy()

#: Label columns of ``cannon_result``: standard APOGEE/ASPCAP labels in lower case.
#: Abundances are ``[X/Fe]`` except ``fe_h`` and ``m_h``; ``c_1_fe`` is neutral carbon (CI) and
#: ``ti_2_fe`` singly ionised titanium (TiII). Adding a label needs a migration.
LABEL_COLUMNS = (
    "teff", "logg", "fe_h", "m_h", "alpha_fe", "alpha_m",
    "v_micro", "v_macro", "vsini",
    "c_fe", "c_1_fe", "n_fe", "o_fe", "na_fe", "mg_fe", "al_fe", "si_fe", "p_fe", "s_fe",
    "k_fe", "ca_fe", "ti_fe", "ti_2_fe", "v_fe", "cr_fe", "mn_fe", "co_fe", "ni_fe", "cu_fe",
    "ge_fe", "rb_fe", "ce_fe", "nd_fe", "yb_fe",
)

TASK_STATUSES = ("pending", "running", "done", "failed")

# Spellings (after normalisation) that are not simply the column name.
_ALIASES = {
    "t_eff": "teff", "log_g": "logg", "logg_": "logg",
    "vmicro": "v_micro", "vmic": "v_micro", "vturb": "v_micro", "xi": "v_micro",
    "vmacro": "v_macro", "vmac": "v_macro",
    "v_sini": "vsini", "v_sin_i": "vsini",
    "ci_fe": "c_1_fe", "c1_fe": "c_1_fe", "tiii_fe": "ti_2_fe", "ti2_fe": "ti_2_fe",
    "feh": "fe_h", "mh": "m_h", "alpham": "alpha_m", "alphafe": "alpha_fe",
}


def label_column(label_name: str) -> str:
    """Return the ``cannon_result`` column for a label name.

    Parameters
    ----------
    label_name : str
        e.g. ``"TEFF"``, ``"Teff"``, ``"LOGG"``, ``"FE_H"``, ``"[Fe/H]"``, ``"[alpha/M]"``,
        ``"VMICRO"``, ``"CI_FE"``, ``"X_FE"`` style names.

    Returns
    -------
    str
        A member of :data:`LABEL_COLUMNS`.

    Raises
    ------
    ValueError
        When the label has no column (it is still stored in the ``labels`` JSON).
    """
    text = str(label_name).strip().lower()
    # "[Fe/H]" -> "fe_h"; "[alpha/M]" -> "alpha_m"
    text = re.sub(r"^\[(.+)/(.+)\]$", r"\1_\2", text)
    text = re.sub(r"[^a-z0-9]+", "_", text).strip("_")
    text = _ALIASES.get(text, text)
    if text in LABEL_COLUMNS:
        return text
    raise ValueError(f"label {label_name!r} has no cannon_result column (known: {', '.join(LABEL_COLUMNS)})")


def sanitise_json(value):
    """Return ``value`` with numpy types as Python types and NaN/inf as ``None``.

    Dicts keep their keys (converted to ``str``), tuples/sets/arrays become lists, bytes are
    decoded as UTF-8 (with replacement). Anything else unknown becomes ``str(value)`` so that a
    provenance write never fails on an exotic object.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): sanitise_json(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return sanitise_json(value.tolist())
    if isinstance(value, (list, tuple, set, frozenset)):
        return [sanitise_json(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    return str(value)


def _dumps(value) -> str:
    return json.dumps(sanitise_json(value), allow_nan=False, sort_keys=False)


def covariance_to_blob(cov) -> bytes | None:
    """Encode an L x L covariance as little-endian float64 bytes (``None`` stays ``None``)."""
    if cov is None:
        return None
    return np.ascontiguousarray(cov, dtype="<f8").tobytes()


def covariance_from_blob(blob, n_labels: int | None = None) -> np.ndarray | None:
    """Decode a ``covariance`` blob (``bytes`` on SQLite, ``memoryview`` on PostgreSQL).

    Parameters
    ----------
    blob : bytes, memoryview or None
    n_labels : int, optional
        Number of labels; inferred from the blob size when omitted.

    Returns
    -------
    numpy.ndarray or None
        Native float64 array of shape (L, L); NaN entries mean "not available".

    Raises
    ------
    ValueError
        When the blob size is not a square number of float64 values.
    """
    if blob is None:
        return None
    flat = np.frombuffer(bytes(blob), dtype="<f8").astype(np.float64)
    n = n_labels if n_labels is not None else int(round(math.sqrt(flat.size)))
    if n * n != flat.size:
        raise ValueError(f"covariance blob holds {flat.size} values, not a square matrix")
    return flat.reshape(n, n)


class RawJSON(str):
    """JSON text already encoded (and known to be finite): stored as is by SanitisedJSONField."""


class SanitisedJSONField(pw.Field):
    """JSON column (TEXT on SQLite, JSONB on PostgreSQL) that never rejects a value: numpy
    scalars become Python numbers and NaN/inf become ``null``.

    Stores plain JSON text rather than using ``peewee.JSONField``, which needs SQLite >= 3.38
    and wraps every value in a SQL function call.
    """

    field_type = "JSON"

    def db_value(self, value):
        if value is None or isinstance(value, (pw.Node, RawJSON)):
            return value
        return _dumps(value)

    def python_value(self, value):
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = bytes(value).decode("utf-8")
        if isinstance(value, str):
            return json.loads(value)
        return value  # psycopg2 has already decoded JSONB


class FiniteFloatField(pw.DoubleField):
    """Double-precision column (8 bytes on every backend: peewee's ``FloatField`` is a 4-byte
    ``REAL`` on PostgreSQL) that stores NaN and +-inf as NULL on every backend (PostgreSQL would
    keep NaN, SQLite turns it into NULL: we make them agree) and accepts numpy scalars."""

    def db_value(self, value):
        if value is None or isinstance(value, pw.Node):
            return value
        value = float(value)
        return value if math.isfinite(value) else None


def _now():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


class BaseModel(pw.Model):
    class Meta:
        database = database_proxy
        legacy_table_names = False


class TrainedModel(BaseModel):
    """A trained Cannon model file and the parameters that made it."""

    name = pw.TextField()
    label_names = SanitisedJSONField()
    polynomial_order = pw.IntegerField(null=True)
    regularization = FiniteFloatField(null=True)
    censoring = SanitisedJSONField(null=True)
    training_set_hash = pw.CharField(max_length=128)
    path = pw.TextField()
    file_checksum = pw.CharField(max_length=128)
    code_version = pw.CharField(max_length=64)
    parameters = SanitisedJSONField()
    parameters_hash = pw.CharField(max_length=64)
    created = pw.DateTimeField(default=_now)

    class Meta:
        table_name = "cannon_model"
        indexes = ((("training_set_hash", "parameters_hash"), True),)


class Spectrum(BaseModel):
    """One input spectrum: a file, an HDU and a row inside it."""

    identifier = pw.TextField(unique=True)
    path = pw.TextField()
    checksum = pw.CharField(max_length=128, null=True)
    hdu = pw.IntegerField(null=True)
    row = pw.IntegerField(null=True)
    created = pw.DateTimeField(default=_now)

    class Meta:
        table_name = "spectrum"


class TaskRun(BaseModel):
    """Provenance of one task attempt; ``status='done'`` is the completion marker."""

    task_family = pw.TextField()
    task_id = pw.TextField(index=True)
    parameters = SanitisedJSONField(null=True)
    parameters_hash = pw.CharField(max_length=64, null=True)
    code_version = pw.CharField(max_length=64, null=True)
    status = pw.CharField(max_length=16, default="pending")
    host = pw.TextField(null=True)
    pid = pw.IntegerField(null=True)
    started = pw.DateTimeField(null=True)
    finished = pw.DateTimeField(null=True)
    elapsed = FiniteFloatField(null=True)
    error_type = pw.TextField(null=True)
    error_message = pw.TextField(null=True)
    traceback = pw.TextField(null=True)
    summary = SanitisedJSONField(null=True)

    class Meta:
        table_name = "task_run"


def _label_fields():
    fields = {}
    for name in LABEL_COLUMNS:
        fields[name] = FiniteFloatField(null=True)
        fields["e_" + name] = FiniteFloatField(null=True)
    return fields


class CannonResult(BaseModel):
    """Labels of one spectrum under one model (one row per (model, spectrum))."""

    model = pw.ForeignKeyField(TrainedModel, backref="results", on_delete="CASCADE")
    spectrum = pw.ForeignKeyField(Spectrum, backref="results", on_delete="CASCADE")
    task_run = pw.ForeignKeyField(TaskRun, null=True, backref="results", on_delete="SET NULL")

    label_names = SanitisedJSONField(null=True)
    labels = SanitisedJSONField(null=True)
    covariance = pw.BlobField(null=True)

    chi2 = FiniteFloatField(null=True)
    rchi2 = FiniteFloatField(null=True)
    snr = FiniteFloatField(null=True)
    n_pixels = pw.IntegerField(null=True)
    ier = pw.IntegerField(null=True)
    nfev = pw.IntegerField(null=True)
    x0_index = pw.IntegerField(null=True)
    x0 = SanitisedJSONField(null=True)
    t_elapsed = FiniteFloatField(null=True)
    flags = pw.BigIntegerField(default=0)
    reason = pw.TextField(null=True)
    status = pw.CharField(max_length=16, default="ok")

    created = pw.DateTimeField(default=_now)
    updated = pw.DateTimeField(default=_now)

    class Meta:
        table_name = "cannon_result"
        indexes = (
            (("model", "spectrum"), True),
            # added by migration 0002: serves "rerun failed" and pending queries
            (("model", "status"), False),
        )


for _name, _field in _label_fields().items():
    CannonResult._meta.add_field(_name, _field)
del _name, _field

#: Columns rewritten when a result is upserted (everything except the key and ``created``).
RESULT_UPDATE_FIELDS = tuple(
    f for f in CannonResult._meta.sorted_fields if f.name not in ("id", "model", "spectrum", "created")
)



class ValidationRun(BaseModel):
    """A cross-validation or regularisation-choice run on one training set (migration 0003).

    ``kind`` is ``'cross_validation'`` or ``'regularization'``; one row per (kind,
    ``parameters_hash``), overwritten in place by a rerun. ``bias``/``scatter`` hold per-label
    values (JSON objects label -> float) for cross-validation; ``chosen_regularization`` and
    ``at_grid_edge`` the regularisation choice; ``results`` everything else (robust scatter,
    per-Lambda scores, counts, timings); ``plot_paths`` the PNG files written.
    """

    kind = pw.CharField(max_length=32)
    model_name = pw.TextField(null=True)
    training_set_hash = pw.CharField(max_length=128)
    label_names = SanitisedJSONField()
    parameters = SanitisedJSONField()
    parameters_hash = pw.CharField(max_length=64)
    n_stars = pw.IntegerField(null=True)
    bias = SanitisedJSONField(null=True)
    scatter = SanitisedJSONField(null=True)
    chosen_regularization = FiniteFloatField(null=True)
    at_grid_edge = pw.BooleanField(null=True)
    results = SanitisedJSONField(null=True)
    plot_paths = SanitisedJSONField(null=True)
    task_run = pw.ForeignKeyField(TaskRun, null=True, backref="validation_runs", on_delete="SET NULL")
    created = pw.DateTimeField(default=_now)

    class Meta:
        table_name = "validation_run"
        indexes = ((("kind", "parameters_hash"), True),)


ALL_MODELS = (TrainedModel, Spectrum, TaskRun, CannonResult, ValidationRun)
