"""Fixtures: example data written by astra_cannon.io.example (small, generated once)."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def example_dir(tmp_path_factory):
    """A small example data set: 60 training spectra, 120 test spectra in 3 files."""
    from astra_cannon.io.example import generate_example

    directory = tmp_path_factory.mktemp("example")
    generate_example(directory, n_train=60, n_test=120, n_files=3, seed=7)
    return directory


@pytest.fixture(scope="session")
def shared_data_dir():
    """/work/shared/data (read-only reference data); skips the test when it is absent."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("shared reference data (../shared/data) not available")
    return path
