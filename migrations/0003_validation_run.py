"""0003: create validation_run (cross-validation and regularisation-choice results).

One row per (kind, parameters_hash): ``kind`` is ``'cross_validation'`` or
``'regularization'``; per-label bias and scatter, the chosen Lambda and whether it lies at the
edge of the grid, the plots written and the task run that wrote it. The model below is a
frozen copy of the table at this version: never edit this file, add a new migration.
"""

import datetime

from peewee import (
    BooleanField,
    CharField,
    DateTimeField,
    Field,
    FloatField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
)

TABLE = "validation_run"


class JSONField(Field):
    """JSON as text: TEXT on SQLite, JSONB on PostgreSQL (as in 0001)."""

    field_type = "JSON"


def _models(db):
    class Base(Model):
        class Meta:
            database = db
            legacy_table_names = False

    class TaskRun(Base):
        # Only the key is needed for the foreign key; the table exists since 0001.
        class Meta:
            table_name = "task_run"

    class ValidationRun(Base):
        kind = CharField(max_length=32)
        model_name = TextField(null=True)
        training_set_hash = CharField(max_length=128)
        label_names = JSONField()
        parameters = JSONField()
        parameters_hash = CharField(max_length=64)
        n_stars = IntegerField(null=True)
        bias = JSONField(null=True)
        scatter = JSONField(null=True)
        chosen_regularization = FloatField(null=True)
        at_grid_edge = BooleanField(null=True)
        results = JSONField(null=True)
        plot_paths = JSONField(null=True)
        task_run = ForeignKeyField(TaskRun, null=True, on_delete="SET NULL")
        created = DateTimeField(default=datetime.datetime.now)

        class Meta:
            table_name = TABLE
            indexes = ((("kind", "parameters_hash"), True),)

    return [ValidationRun]


def up(migrator, db):
    db.create_tables(_models(db))


def down(migrator, db):
    db.drop_tables(_models(db))
