"""astra_cannon.config: environment over Luigi config over default."""

import pathlib

import pytest
from luigi.configuration import get_config

from astra_cannon import config


@pytest.fixture
def luigi_section(monkeypatch):
    """Set ``[astra_cannon]`` options in Luigi's config for one test, restoring it afterwards."""
    parser = get_config()
    added = []

    def set_option(option, value):
        parser.set("astra_cannon", option, value)
        added.append(option)

    for var in ("ASTRA_CANNON_DATABASE_URL", "ASTRA_CANNON_WORK_DIR", "ASTRA_CANNON_CHUNK_SIZE"):
        monkeypatch.delenv(var, raising=False)
    yield set_option
    for option in added:
        parser.remove_option("astra_cannon", option)


def test_default_database_is_sqlite_file_in_work_dir(luigi_section, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config.work_dir() == tmp_path / "astra_cannon_work" and config.work_dir().is_dir()
    assert config.database_url() == f"sqlite:///{tmp_path / 'astra_cannon_work' / 'astra_cannon.sqlite'}"


def test_luigi_config_overrides_default(luigi_section, tmp_path):
    luigi_section("database_url", "postgresql://user@host/from_luigi")
    luigi_section("work_dir", str(tmp_path / "from_luigi"))
    assert config.database_url() == "postgresql://user@host/from_luigi"
    assert config.work_dir() == tmp_path / "from_luigi"


def test_environment_overrides_luigi_config(luigi_section, tmp_path, monkeypatch):
    luigi_section("database_url", "postgresql://user@host/from_luigi")
    luigi_section("work_dir", str(tmp_path / "from_luigi"))
    monkeypatch.setenv("ASTRA_CANNON_DATABASE_URL", "sqlite:////tmp/from_env.sqlite")
    monkeypatch.setenv("ASTRA_CANNON_WORK_DIR", str(tmp_path / "from_env"))
    assert config.database_url() == "sqlite:////tmp/from_env.sqlite"
    assert config.work_dir() == tmp_path / "from_env"


def test_work_dir_setting_moves_the_default_database(luigi_section, tmp_path, monkeypatch):
    monkeypatch.setenv("ASTRA_CANNON_WORK_DIR", str(tmp_path / "w"))
    assert config.database_url() == f"sqlite:///{tmp_path / 'w' / 'astra_cannon.sqlite'}"


def test_get_converts_types_and_reports_bad_values(luigi_section, monkeypatch):
    assert config.get("chunk_size", 100, int) == 100
    luigi_section("chunk_size", "250")
    assert config.get("chunk_size", 100, int) == 250
    monkeypatch.setenv("ASTRA_CANNON_CHUNK_SIZE", "500")
    assert config.get("chunk_size", 100, int) == 500
    monkeypatch.setenv("ASTRA_CANNON_CHUNK_SIZE", "lots")
    with pytest.raises(ValueError, match="chunk_size"):
        config.get("chunk_size", 100, int)
    monkeypatch.setenv("ASTRA_CANNON_CHUNK_SIZE", "yes")
    assert config.get("chunk_size", type=bool) is True


def test_connect_uses_configured_url(luigi_section, tmp_path, monkeypatch):
    from astra_cannon import db

    path = pathlib.Path(tmp_path / "cfg" / "x.sqlite")
    monkeypatch.setenv("ASTRA_CANNON_DATABASE_URL", f"sqlite:///{path}")
    database = db.connect()
    try:
        assert path.exists() and database.pragma("journal_mode") == "wal"
        assert database.pragma("foreign_keys") == 1 and database.pragma("busy_timeout") == 30000
    finally:
        db.close()
