"""The pipeline against Luigi's central scheduler (luigid on loopback) with two workers."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from astra_cannon import pipeline
from astra_cannon.models import CannonResult, TaskRun

REPO = Path(__file__).resolve().parents[1]
LUIGID = shutil.which("luigid") or str(Path(sys.executable).with_name("luigid"))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def luigid(tmp_path):
    """A luigid on 127.0.0.1 and a free port; killed at the end (bounded start-up wait)."""
    if not os.path.exists(LUIGID):
        pytest.skip("luigid is not installed")
    port = _free_port()
    log = open(tmp_path / "luigid.log", "w")
    proc = subprocess.Popen([LUIGID, "--address", "127.0.0.1", "--port", str(port),
                             "--state-path", str(tmp_path / "state.pickle"), "--logdir", str(tmp_path)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"luigid exited with {proc.returncode}: {(tmp_path / 'luigid.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("luigid did not start listening within 30 s")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=10)
        log.close()


@pytest.mark.luigid
def test_two_workers_through_luigid_write_exactly_one_row_per_spectrum(luigid, example_dir, tmp_path, db_url):
    env = dict(os.environ, ASTRA_CANNON_DATABASE_URL=db_url, ASTRA_CANNON_WORK_DIR=str(tmp_path / "work"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [sys.executable, "-m", "astra_cannon.cli", "run", "--example-dir", str(example_dir),
            "--chunk-size", "30", "--workers", "2", "--scheduler-url", luigid]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 to run" in proc.stdout
    with pipeline.connected(db_url):
        n_rows = CannonResult.select().count()
        n_keys = CannonResult.select(CannonResult.model, CannonResult.spectrum).distinct().count()
        runs = list(TaskRun.select(TaskRun.status, TaskRun.pid))
    assert n_rows == n_keys == 120
    assert {r.status for r in runs} == {"done"} and len(runs) == 1 + 4
    # Chunks ran in forked worker processes, not in the scheduling process.
    assert len({r.pid for r in runs}) >= 2
