"""Hostile strings in every task and CLI parameter (catalogue 39): stored verbatim as data or
rejected with a clear error; the tables always survive.

Complements tests/test_tasks.py (hostile tag on TrainModel; label/code-version/sha256/format of
TrainModel and InferAll), tests/test_cli.py (hostile --labels) and tests/test_store_write.py
(hostile strings at the store level).
"""

import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from astra_cannon import cli, flags as F, pipeline, store
from astra_cannon.io import example as ex
from astra_cannon.models import CannonResult, Spectrum, TaskRun
from test_faults_common import (  # noqa: F401 - fixtures
    faults_env, faults_model_file, integrity, tasks_module, trained_job)

HOSTILE = [
    "x'); DROP TABLE cannon_result; --",
    "' OR '1'='1",
    "../../etc/passwd",
    "\u00e9\u4e2d\"\\ %s %(x)s {} ;",
    "A" * 5000,
]
# FITS tables hold ASCII only: identifiers read from files are the ASCII hostile strings.
HOSTILE_IDS = [h for h in HOSTILE if h.isascii()] + ["\"\\ %s %(x)s {} ;"]


def _tables_survive():
    with pipeline.connected():
        return (CannonResult.select().count(), TaskRun.select().count(), Spectrum.select().count())


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("name", ["label_names", "code_version", "training_set_sha256", "format",
                                  "chunk_key", "segments", "rerun_token"])
def test_hostile_infer_chunk_parameters_are_rejected_at_construction(example_dir, name, value):
    from test_faults_common import small_job

    tasks = tasks_module()  # construction only: no database needed
    good = tasks.job_tasks(small_job(example_dir))[0].requires()[0]
    params = dict(good.param_kwargs)
    params[name] = value
    with pytest.raises(ValueError):
        tasks.InferChunk(**params)


@pytest.fixture
def hostile_files(trained_job, tmp_path):
    """An example-layout file whose identifiers are hostile strings, and a path-traversal path."""
    with fits.open(trained_job.spectra[0]) as hdul:
        flux, ivar = hdul["FLUX"].data[:len(HOSTILE_IDS)], hdul["IVAR"].data[:len(HOSTILE_IDS)]
        wl = np.array(hdul["WAVELENGTH"].data)
    ids = Table({"IDENTIFIER": np.array(HOSTILE_IDS), "ROW": np.arange(len(HOSTILE_IDS)),
                 "SNR": np.full(len(HOSTILE_IDS), 100.0)})
    path = tmp_path / "x'; DROP TABLE spectrum; --.fits"
    ex._write_fits(path, [fits.PrimaryHDU(), ex._image(flux, "FLUX"), ex._image(ivar, "IVAR"),
                          ex._wavelength_hdu(wl), ex._named(fits.table_to_hdu(ids), "IDS")])
    # A relative path climbing out of the working directory to a file that is not FITS.
    traversal = os.path.relpath("/etc/passwd", os.getcwd())
    assert ".." in traversal and os.path.exists(traversal)
    return str(path), traversal


def test_cli_run_stores_hostile_tag_identifiers_and_paths_verbatim(trained_job, hostile_files, capsys):
    path, traversal = hostile_files
    tag = "x'); DROP TABLE task_run; -- \u00e9 \" \\ %s {}"
    code = cli.main(["run", "--training-set", trained_job.training_set, "--spectra", path, traversal,
                     "--chunk-size", "20", "--tag", tag, "-q"])
    assert code == 0, capsys.readouterr()
    with pipeline.connected():
        rows = {r["identifier"]: r for r in store.read_results()}
        runs = list(TaskRun.select())
        spectra = {s.identifier: s.path for s in Spectrum.select()}
    assert set(HOSTILE_IDS) <= set(rows)  # identifiers stored exactly as written in the file
    assert all(rows[h]["status"] == "ok" for h in HOSTILE_IDS)
    assert spectra[HOSTILE_IDS[0]] == path  # the quote-laden file name, verbatim
    passwd = [r for i, r in rows.items() if i not in HOSTILE_IDS]
    assert len(passwd) == 1 and passwd[0]["flags"] & F.UNREADABLE_INPUT and passwd[0]["teff"] is None
    assert {r.parameters.get("tag") for r in runs if r.task_family != "astra_cannon.TrainModel"} == {tag}
    assert _tables_survive() == (len(HOSTILE_IDS) + 1, len(runs), len(HOSTILE_IDS) + 1)


@pytest.mark.parametrize("argv", [
    ["run", "--code-version", "1.0'; DROP TABLE cannon_result; --"],
    ["run", "--labels", "TEFF,LOGG') OR 1=1 --"],
    ["run", "--labels", "../../etc/passwd"],
    ["run", "--regularization", "nan"],
    ["status", "--model", "1; DROP TABLE task_run"],
    ["export", "--model", "x' OR '1'='1"],
])
def test_hostile_cli_values_exit_2_with_a_message_and_tables_survive(trained_job, argv, capsys):
    if argv[0] == "run":
        argv = argv + ["--training-set", trained_job.training_set, "--spectra", *trained_job.spectra]
    assert cli.main(argv) == 2
    assert "astra-cannon: error:" in capsys.readouterr().err
    assert _tables_survive() == (0, 1, 0)  # only the TrainModel run of the fixture


@pytest.mark.parametrize("argv", [
    ["run", "--format", "example' OR 1=1"],
    ["run", "--chunk-size", "1; DROP TABLE cannon_result"],
    ["run", "--order", "2 OR 1=1"],
])
def test_hostile_cli_values_of_typed_options_are_usage_errors(trained_job, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert _tables_survive() == (0, 1, 0)


def test_hostile_training_set_path_fails_training_clearly(trained_job, capsys):
    traversal = os.path.relpath("/etc/passwd", os.getcwd())
    code = cli.main(["run", "--training-set", traversal, "--spectra", *trained_job.spectra, "-q"])
    err = capsys.readouterr().err
    assert code == 1  # read before scheduling (label names from its header): nothing ran
    assert "astra-cannon: error: OSError" in err and "FITS" in err
    assert _tables_survive() == (0, 1, 0)


def test_hostile_sqlite_file_name_in_the_database_url_is_just_a_file_name(tmp_path, capsys):
    target = tmp_path / "x'; DROP TABLE cannon_result; --.sqlite"
    assert cli.main(["--database-url", f"sqlite:///{target}", "db", "migrate"]) == 0
    assert target.exists()
    assert cli.main(["--database-url", f"sqlite:///{target}", "status"]) == 0
    assert "Task runs:" in capsys.readouterr().out
