"""Flag bits: stable values, decoding, and the README documents exactly these bits."""

import pathlib

import pytest

from astra_cannon import flags


def test_bits_are_distinct_powers_of_two():
    values = list(flags.BITS.values())
    assert len(set(values)) == len(values)
    assert all(v & (v - 1) == 0 for v in values)


def test_decode_and_failure():
    value = flags.NO_INFORMATION | flags.OUTSIDE_TRAINING_HULL
    assert flags.decode(value) == ["NO_INFORMATION", "OUTSIDE_TRAINING_HULL"]
    assert flags.is_failure(value)
    assert not flags.is_failure(flags.OUTSIDE_TRAINING_HULL | flags.AT_INITIAL_GUESS)


def test_readme_documents_every_bit():
    readme = pathlib.Path(__file__).resolve().parent.parent / "README.md"
    if not readme.exists():
        pytest.skip("README.md not next to the tests")
    assert flags.documentation() in readme.read_text()
