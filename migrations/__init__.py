"""Numbered schema migrations of the astra_cannon database (installed as ``astra_cannon.migrations``).

Each ``NNNN_name.py`` defines ``up(migrator, db)`` and ``down(migrator, db)`` for
:mod:`playhouse.migrations` (peewee's own runner; history table ``schema_migration``).
Apply them with :func:`astra_cannon.db.migrate` (or ``astra_cannon.db.connect``), or with
peewee's CLI::

    pwmigrate <database-url> status -d "$(python -c 'import astra_cannon.migrations as m, os; print(os.path.dirname(m.__file__))')"

Scripts declare frozen copies of the tables they touch and are never edited once released;
a schema change is a new numbered script (plus the matching change in ``astra_cannon.models``).
"""

import pathlib

DIRECTORY = pathlib.Path(__file__).resolve().parent
