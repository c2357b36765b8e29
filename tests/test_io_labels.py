"""Label tables in FITS, ECSV and CSV: sentinels and non-finite values become missing."""

import numpy as np
import pytest
from astropy.table import Table

from astra_cannon.io.labels import find_column, label_array, read_label_table, sentinel_mask, string_column

IDS = ["2M0001 ", "2M0002", "2M0003", "2M0004", "2M0005"]
TEFF = [4800.0, -9999.0, 5000.0, np.nan, 4500.0]
LOGG = [2.5, 2.1, -9999.99, 2.0, np.inf]
FEH = [-0.1, 0.0, 0.1, 0.2, -999.0]


def _table(float32=False):
    dtype = np.float32 if float32 else np.float64
    return Table({"APOGEE_ID": IDS, "Teff": np.array(TEFF, dtype), "logg": np.array(LOGG, dtype),
                  "Fe_H": np.array(FEH, dtype), "ASPCAPFLAG": np.array([0, 1, 0, 4, 0], dtype=">i8")})


EXPECTED_MISSING = np.array([[False, True, False, True, False],
                             [False, False, True, False, True],
                             [False, False, False, False, True]]).T


def _write(tmp_path, fmt):
    t = _table(float32=(fmt == "fits"))
    path = tmp_path / f"labels.{fmt}"
    if fmt == "fits":
        t.write(path, format="fits")
    elif fmt == "ecsv":
        t.write(path, format="ascii.ecsv")
    else:
        t.write(path, format="ascii.csv")
    return path


@pytest.mark.parametrize("fmt", ["fits", "ecsv", "csv"])
def test_sentinels_and_nonfinite_become_missing_in_every_format(tmp_path, fmt):
    table = read_label_table(_write(tmp_path, fmt))
    values = label_array(table, ["TEFF", "LOGG", "FE_H"])
    assert values.dtype == np.float64 and values.dtype.byteorder in "=<|"
    np.testing.assert_array_equal(np.isnan(values), EXPECTED_MISSING)
    assert values[0, 0] == pytest.approx(4800.0)
    assert string_column(table, "apogee_id")[0] == "2M0001"


def test_empty_csv_fields_are_missing(tmp_path):
    path = tmp_path / "gaps.csv"
    path.write_text("APOGEE_ID,TEFF,LOGG\n2M1,4800,\n2M2,,2.5\n")
    values = label_array(read_label_table(path), ["teff", "logg"])
    np.testing.assert_array_equal(np.isnan(values), [[False, True], [True, False]])


def test_float32_sentinel_from_allstar_matches():
    assert sentinel_mask(np.float32(-9999.99))
    assert not sentinel_mask(-9998.0)


def test_column_lookup_is_case_insensitive_and_clear_when_missing_or_ambiguous():
    t = Table({"TEFF": [1.0], "teff": [2.0], "LOGG": [3.0]})
    assert find_column(t, " logg ") == "LOGG"
    with pytest.raises(KeyError, match="ambiguous"):
        find_column(t, "Teff")
    with pytest.raises(KeyError, match="FE_H"):
        find_column(t, "FE_H")


def test_unknown_extension_needs_a_format(tmp_path):
    with pytest.raises(ValueError, match="format"):
        read_label_table(tmp_path / "labels.txt")
