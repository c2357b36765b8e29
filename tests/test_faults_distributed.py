"""The many-machine recipe: independent ``astra-cannon infer`` processes (stand-ins for hosts)
sharing one ``luigid`` and one database. luigid hands each chunk to exactly one of them, so no
chunk runs twice (the local scheduler would let both run it; see test_faults_concurrency)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from astra_cannon import pipeline
from astra_cannon.models import TaskRun
from test_faults_common import (  # noqa: F401 - fixtures
    faults_env, faults_model_file, integrity, small_job, trained_job)
from test_luigid import luigid  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.luigid
@pytest.mark.slow  # two CLI processes and a luigid: ~15 s
def test_two_hosts_sharing_luigid_and_the_database_run_every_chunk_exactly_once(trained_job, example_dir,
                                                                                 luigid, tmp_path):
    job = small_job(example_dir, n_files=3)  # 120 spectra, 6 chunks of 20
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [sys.executable, "-m", "astra_cannon.cli", "infer", "--training-set", job.training_set,
            "--spectra", *job.spectra, "--chunk-size", "20", "--scheduler-url", luigid, "-q"]
    hosts = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [h.communicate(timeout=300)[0] for h in hosts]
    # 25 (NOT_RUN) is Luigi's summary for "a chunk I scheduled was finished by another host
    # before I saw it running": the work is complete (checked below), the exit code is not 0.
    # See FAULTS.md, finding 6; the lead is asked to map it to 0 when the roots are complete.
    assert {h.returncode for h in hosts} <= {0, 25}, "\n".join(outputs)
    state = integrity()
    assert state["rows"] == state["keys"] == state["spectra"] == 120
    assert state["unmarked"] == 0 and state["orphans"] == 0
    with pipeline.connected():
        runs = list(TaskRun.select().where(TaskRun.task_family == "astra_cannon.InferChunk"))
    assert len(runs) == 6 and {r.status for r in runs} == {"done"}  # each chunk ran once
    assert len({r.task_id for r in runs}) == 6
