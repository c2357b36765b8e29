"""0002: index cannon_result(model_id, status).

"Rerun failed" and the pending-spectra query select one model's rows by status
(``status = 'failed'``); without this index both scan the whole result table.
"""

INDEX = "cannon_result_model_id_status"


def up(migrator, db):
    migrator.migrate(migrator.add_index("cannon_result", ("model_id", "status"), name=INDEX))


def down(migrator, db):
    migrator.migrate(migrator.drop_index("cannon_result", INDEX))
