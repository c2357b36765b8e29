"""0004: store every float column as DOUBLE PRECISION on PostgreSQL.

peewee's ``FloatField`` is ``REAL`` there, a 4-byte float (7 digits: Teff to 0.001 K, a chi2 of
8000 to 0.001), while SQLite's ``REAL`` is 8 bytes: the two backends returned different values
for the same fit, and sub-1e-7 differences (e.g. from batching) could round apart. On SQLite
this is a no-op. ``cannon_result_view`` depends on the columns, so PostgreSQL needs it dropped
and re-created (with its own definition, read back first) around the change. Stored values
convert through their decimal text, so they read back as before.
"""

from peewee import PostgresqlDatabase

TABLES = ("cannon_model", "task_run", "cannon_result", "validation_run")
VIEW = "cannon_result_view"


def _retype(db, source, target, using):
    if not isinstance(db, PostgresqlDatabase):  # (pooled and extended ones are subclasses)
        return
    columns = db.execute_sql(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND data_type = %s AND table_name IN %s "
        "ORDER BY table_name, ordinal_position", (source, TABLES)).fetchall()
    if not columns:
        return
    view = db.execute_sql("SELECT pg_get_viewdef(%s::regclass, true)", (VIEW,)).fetchone()[0] \
        if db.execute_sql("SELECT to_regclass(%s)", (VIEW,)).fetchone()[0] else None
    with db.atomic():
        if view is not None:
            db.execute_sql(f"DROP VIEW {VIEW}")
        for table, column in columns:
            quoted = f'"{column}"'
            db.execute_sql(f'ALTER TABLE "{table}" ALTER COLUMN {quoted} TYPE {target} '
                           f"USING {using.format(column=quoted)}")
        if view is not None:
            db.execute_sql(f"CREATE VIEW {VIEW} AS {view}")


def up(migrator, db):
    # Through the shortest decimal text of each 4-byte value, so that a stored 4812.573 reads
    # back as 4812.573 (as it did), not as its binary expansion 4812.5732421875.
    _retype(db, "real", "DOUBLE PRECISION", "{column}::text::double precision")


def down(migrator, db):
    _retype(db, "double precision", "REAL", "{column}::real")
