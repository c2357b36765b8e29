"""0001: create cannon_model, spectrum, task_run, cannon_result and cannon_result_view.

The models below are a frozen copy of the schema at this version, deliberately independent of
``astra_cannon.models`` (which keeps changing): never edit this file, add a new migration.
"""

import datetime

from peewee import (
    BigIntegerField,
    BlobField,
    CharField,
    DateTimeField,
    FloatField,
    ForeignKeyField,
    Field,
    IntegerField,
    Model,
    TextField,
)

LABEL_COLUMNS = (
    "teff", "logg", "fe_h", "m_h", "alpha_fe", "alpha_m",
    "v_micro", "v_macro", "vsini",
    "c_fe", "c_1_fe", "n_fe", "o_fe", "na_fe", "mg_fe", "al_fe", "si_fe", "p_fe", "s_fe",
    "k_fe", "ca_fe", "ti_fe", "ti_2_fe", "v_fe", "cr_fe", "mn_fe", "co_fe", "ni_fe", "cu_fe",
    "ge_fe", "rb_fe", "ce_fe", "nd_fe", "yb_fe",
)

VIEW = "cannon_result_view"


class JSONField(Field):
    """JSON as text: TEXT on SQLite, JSONB on PostgreSQL (no SQLite >= 3.38 requirement)."""

    field_type = "JSON"


def _models(db):
    class Base(Model):
        class Meta:
            database = db
            legacy_table_names = False

    class TrainedModel(Base):
        name = TextField()
        label_names = JSONField()
        polynomial_order = IntegerField(null=True)
        regularization = FloatField(null=True)
        censoring = JSONField(null=True)
        training_set_hash = CharField(max_length=128)
        path = TextField()
        file_checksum = CharField(max_length=128)
        code_version = CharField(max_length=64)
        parameters = JSONField()
        parameters_hash = CharField(max_length=64)
        created = DateTimeField(default=datetime.datetime.now)

        class Meta:
            table_name = "cannon_model"
            indexes = ((("training_set_hash", "parameters_hash"), True),)

    class Spectrum(Base):
        identifier = TextField(unique=True)
        path = TextField()
        checksum = CharField(max_length=128, null=True)
        hdu = IntegerField(null=True)
        row = IntegerField(null=True)
        created = DateTimeField(default=datetime.datetime.now)

        class Meta:
            table_name = "spectrum"

    class TaskRun(Base):
        task_family = TextField()
        task_id = TextField(index=True)
        parameters = JSONField(null=True)
        parameters_hash = CharField(max_length=64, null=True)
        code_version = CharField(max_length=64, null=True)
        status = CharField(max_length=16, default="pending")
        host = TextField(null=True)
        pid = IntegerField(null=True)
        started = DateTimeField(null=True)
        finished = DateTimeField(null=True)
        elapsed = FloatField(null=True)
        error_type = TextField(null=True)
        error_message = TextField(null=True)
        traceback = TextField(null=True)
        summary = JSONField(null=True)

        class Meta:
            table_name = "task_run"

    class CannonResult(Base):
        model = ForeignKeyField(TrainedModel, on_delete="CASCADE")
        spectrum = ForeignKeyField(Spectrum, on_delete="CASCADE")
        task_run = ForeignKeyField(TaskRun, null=True, on_delete="SET NULL")
        label_names = JSONField(null=True)
        labels = JSONField(null=True)
        covariance = BlobField(null=True)
        chi2 = FloatField(null=True)
        rchi2 = FloatField(null=True)
        snr = FloatField(null=True)
        n_pixels = IntegerField(null=True)
        ier = IntegerField(null=True)
        nfev = IntegerField(null=True)
        x0_index = IntegerField(null=True)
        x0 = JSONField(null=True)
        t_elapsed = FloatField(null=True)
        flags = BigIntegerField(default=0)
        reason = TextField(null=True)
        status = CharField(max_length=16, default="ok")
        created = DateTimeField(default=datetime.datetime.now)
        updated = DateTimeField(default=datetime.datetime.now)

        class Meta:
            table_name = "cannon_result"
            indexes = ((("model", "spectrum"), True),)

    for name in LABEL_COLUMNS:
        CannonResult._meta.add_field(name, FloatField(null=True))
        CannonResult._meta.add_field("e_" + name, FloatField(null=True))

    return [TrainedModel, Spectrum, TaskRun, CannonResult]


def _view_sql():
    labels = ", ".join(f"r.{c}, r.e_{c}" for c in LABEL_COLUMNS)
    return (
        f"CREATE VIEW {VIEW} AS SELECT r.id, s.identifier, m.name AS model_name, "
        f"r.model_id, r.spectrum_id, r.task_run_id, {labels}, "
        "r.chi2, r.rchi2, r.snr, r.n_pixels, r.ier, r.nfev, r.x0_index, r.t_elapsed, "
        "r.flags, r.reason, r.status, r.created, r.updated "
        "FROM cannon_result r "
        "JOIN spectrum s ON s.id = r.spectrum_id "
        "JOIN cannon_model m ON m.id = r.model_id"
    )


def up(migrator, db):
    db.create_tables(_models(db))
    db.execute_sql(_view_sql())


def down(migrator, db):
    db.execute_sql(f"DROP VIEW IF EXISTS {VIEW}")
    db.drop_tables(_models(db))
