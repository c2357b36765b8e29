"""The astra-cannon command: run, status, rerun-failed, export, db, flags, errors and exit codes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from astra_cannon import cli, flags

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cli_env(tmp_path, monkeypatch, db_url):
    from luigi.configuration import get_config

    monkeypatch.setenv("ASTRA_CANNON_DATABASE_URL", db_url)
    monkeypatch.setenv("ASTRA_CANNON_WORK_DIR", str(tmp_path / "work"))
    cfg = get_config()
    saved = cfg.get("scheduler", "retry_count", None)
    cfg.set("scheduler", "retry_count", "1")
    yield db_url
    if saved is not None:
        cfg.set("scheduler", "retry_count", saved)


def _small(example_dir):
    spectra = sorted(str(p) for p in (Path(example_dir) / "spectra").glob("*.fits"))[:1]
    return ["--training-set", str(Path(example_dir) / "training_set.fits"), "--spectra", *spectra,
            "--chunk-size", "20"]


def test_flags_prints_the_documentation(capsys):
    assert cli.main(["flags"]) == 0
    assert capsys.readouterr().out.strip() == flags.documentation()


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "train", "infer", "status", "rerun-failed", "db", "export", "flags"):
        assert command in out
    assert "ASTRA_CANNON_DATABASE_URL" in out


def test_db_migrate_then_status(cli_env, capsys):
    assert cli.main(["db", "migrate"]) == 0
    assert "applied" in capsys.readouterr().out
    assert cli.main(["db", "migrate"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert cli.main(["db", "status"]) == 0
    assert "applied  0001_initial" in capsys.readouterr().out


def test_run_status_export_and_a_second_run_that_does_nothing(cli_env, example_dir, capsys, tmp_path):
    args = _small(example_dir)
    assert cli.main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert "0 complete, 2 to run" in out and "results: 39 ok, 1 failed" in out
    assert "SELECT identifier" in out and "cannon_result_view" in out

    assert cli.main(["run", *args]) == 0
    assert "2 complete, 0 to run" in capsys.readouterr().out

    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "astra_cannon.InferChunk: done 2" in out and "Failed spectra: 1" in out

    output = tmp_path / "out.fits"
    assert cli.main(["export", "-o", str(output)]) == 0
    assert output.exists() and "wrote 40 rows (1 failed)" in capsys.readouterr().out
    assert cli.main(["export", "-o", str(output)]) == 2  # exists: refused without --overwrite

    assert cli.main(["rerun-failed", *args]) == 0
    assert "with failed spectra to re-fit" in capsys.readouterr().out


def test_a_failing_run_exits_30_and_status_shows_the_error(cli_env, example_dir, capsys, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    args = _small(example_dir)
    assert cli.main(["infer", *args, "--model-dir", str(blocker / "models")]) == 30
    out = capsys.readouterr().out
    assert "FAILED" in out and "astra_cannon.TrainModel" in out
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "Failed task runs (unresolved): 1" in out and "NotADirectoryError" in out


def test_a_damaged_model_file_is_retrained_not_used(cli_env, example_dir, capsys):
    args = _small(example_dir)
    assert cli.main(["train", *args]) == 0
    model = next((Path(os.environ["ASTRA_CANNON_WORK_DIR"]) / "models").glob("*.npz"))
    model.write_bytes(model.read_bytes()[:100])
    assert cli.main(["infer", *args]) == 0
    assert "results: 39 ok, 1 failed" in capsys.readouterr().out
    from astra_cannon import CannonModel

    assert CannonModel.read(model).is_trained


@pytest.mark.parametrize("argv", [
    ["run", "--spectra", "a.fits"],                      # spectra without a training set
    ["run", "--labels", "TEFF; DROP TABLE cannon_result"],
    ["run", "--chunk-size", "0"],
    ["export", "--model", "no-such-model"],
])
def test_bad_input_exits_2_with_a_message(cli_env, argv, capsys, example_dir):
    argv = argv + (["--example-dir", str(example_dir)] if argv[0] == "run" else [])
    assert cli.main(argv) == 2
    assert "astra-cannon: error:" in capsys.readouterr().err


def test_theta_covariance_comes_from_the_option_then_the_configuration(cli_env, example_dir, monkeypatch):
    def job(*extra):
        args = cli.build_parser().parse_args(["train", *_small(example_dir), *extra])
        return cli._job(args)

    assert job().theta_covariance == "auto"
    monkeypatch.setenv("ASTRA_CANNON_THETA_COVARIANCE", "never")
    assert job().theta_covariance == "never"
    assert job("--theta-covariance", "always").theta_covariance == "always"
    assert job("--theta-covariance", "separable").theta_covariance == "separable"
    monkeypatch.setenv("ASTRA_CANNON_THETA_COVARIANCE", "sometimes")
    with pytest.raises(ValueError, match="theta_covariance"):
        job()


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2


def test_console_entry_runs_as_a_module():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "astra_cannon.cli", "flags"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "NO_INFORMATION" in proc.stdout
