"""Training-set assembly: cuts, missing labels, matching, de-duplication, hash, correlations."""

import numpy as np
import pytest
from astropy.table import Table

from astra_cannon import flags as F
from astra_cannon.io.base import Spectra
from astra_cannon.io.labels import clean_table
from astra_cannon.training_set import assemble_training_set, training_set_hash

NAMES = ["TEFF", "LOGG", "FE_H"]


def _spectra(ids, rng, flags=None, snr=None):
    n, p = len(ids), 50
    flux = 1 + 0.01 * rng.normal(size=(n, p))
    flux[0, 3] = np.nan
    return Spectra(identifiers=[f"apStar-{i}.fits[0]" for i in ids], flux=flux, ivar=np.full((n, p), 1e4),
                   wavelength=np.linspace(15100, 15200, p), flags=flags, normalised=True,
                   meta=[{"object_id": i, "snr": (snr[k] if snr else 100.0)} for k, i in enumerate(ids)])


def _table(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return clean_table(Table({
        "APOGEE_ID": [f"2M{k:04d}" for k in range(n)],
        "teff": rng.uniform(4000, 5200, n), "logg": rng.uniform(1, 3.5, n), "fe_h": rng.uniform(-1, 0.3, n),
        "SNR": rng.uniform(50, 300, n), "ASPCAPFLAG": np.zeros(n, dtype=np.int64),
        "GOOD": np.ones(n, dtype=bool),
    }))


def test_assembles_matched_sorted_training_set():
    rng = np.random.default_rng(1)
    table = _table()
    spectra = _spectra([f"2M{k:04d}" for k in reversed(range(8))], rng)
    ts = assemble_training_set(table, spectra, NAMES)
    assert ts.identifiers == sorted(ts.identifiers) and len(ts) == 8
    assert ts.labels.shape == (8, 3) and ts.flux.shape == (8, 50)
    k = ts.identifiers.index("2M0007")
    np.testing.assert_allclose(ts.labels[k], [table["teff"][7], table["logg"][7], table["fe_h"][7]])
    assert ts.spectrum_identifiers[k] == "apStar-2M0007.fits[0]"
    # the NaN flux pixel of the first spectrum (2M0007) is neutralised
    assert ts.flux[k, 3] == 1.0 and ts.ivar[k, 3] == 0
    assert all(v["count"] == 0 for v in ts.dropped.values())
    assert len(ts.hash) == 64


def test_missing_labels_raise_with_identifiers_or_drop_with_record():
    rng = np.random.default_rng(2)
    table = _table()
    table["teff"].mask[2] = True
    table["fe_h"][5] = np.nan
    table = clean_table(table)
    spectra = _spectra([f"2M{k:04d}" for k in range(8)], rng)
    with pytest.raises(ValueError, match="2M0002.*2M0005"):
        assemble_training_set(table, spectra, NAMES)
    ts = assemble_training_set(table, spectra, NAMES, missing="drop")
    assert ts.dropped["missing_labels"] == {"count": 2, "identifiers": ["2M0002", "2M0005"]}
    assert len(ts) == 6 and "2M0002" not in ts.identifiers


def test_cuts_flags_and_required_columns_drop_and_report():
    rng = np.random.default_rng(3)
    table = _table()
    table["teff"][0] = 3000.0
    table["ASPCAPFLAG"][1] = 1 << 23
    table["GOOD"][2] = False
    spectra = _spectra([f"2M{k:04d}" for k in range(8)], rng)
    ts = assemble_training_set(table, spectra, NAMES, cuts={"TEFF": (3500, None), "LOGG": (None, 10)},
                               flag_cuts={"aspcapflag": 1 << 23}, require=["good"])
    assert ts.dropped["cuts"]["count"] == 3
    assert ts.dropped["cuts"]["identifiers"] == ["2M0000", "2M0001", "2M0002"]
    assert ts.dropped["cuts"]["by_column"] == {"teff": 1, "logg": 0, "ASPCAPFLAG": 1, "GOOD": 1}
    with pytest.raises(KeyError, match="VSINI"):
        assemble_training_set(table, spectra, NAMES, cuts={"VSINI": (0, 1)})


def test_stars_without_usable_spectra_are_dropped_by_reason():
    rng = np.random.default_rng(4)
    ids = [f"2M{k:04d}" for k in range(6)]  # 2M0006, 2M0007 have no spectrum
    flags = np.zeros(6, dtype=np.int64)
    flags[1] = F.UNREADABLE_INPUT
    ts = assemble_training_set(_table(), _spectra(ids, rng, flags=flags), NAMES)
    assert ts.dropped["bad_spectrum"]["identifiers"] == ["2M0001"]
    assert ts.dropped["no_spectrum"]["identifiers"] == ["2M0006", "2M0007"]
    assert len(ts) == 5


def test_duplicates_keep_highest_snr_or_first():
    rng = np.random.default_rng(5)
    table = _table(4)
    dup = table[[1]].copy()
    dup["SNR"][0] = table["SNR"][1] + 100
    dup["teff"][0] = 9999.5
    both = clean_table(Table(np.concatenate([np.asarray(table.filled()), np.asarray(dup.filled())])))
    spectra = _spectra([f"2M{k:04d}" for k in range(4)], rng)
    ts = assemble_training_set(both, spectra, NAMES)
    assert ts.dropped["duplicates"] == {"count": 1, "identifiers": ["2M0001"]}
    assert ts.labels[ts.identifiers.index("2M0001"), 0] == 9999.5
    first = assemble_training_set(both, spectra, NAMES, duplicates="first")
    assert first.labels[first.identifiers.index("2M0001"), 0] == pytest.approx(table["teff"][1])


def test_hash_ignores_row_and_label_order_but_not_content():
    rng = np.random.default_rng(6)
    table = _table()
    spectra = _spectra([f"2M{k:04d}" for k in range(8)], rng)
    ts = assemble_training_set(table, spectra, NAMES)
    shuffled = table[np.random.default_rng(9).permutation(len(table))]
    ts2 = assemble_training_set(shuffled, spectra, ["FE_H", "TEFF", "LOGG"])
    assert ts2.hash == ts.hash
    np.testing.assert_array_equal(ts2.labels[:, [1, 2, 0]], ts.labels)
    changed = table.copy()
    changed["logg"][3] += 1e-9
    assert assemble_training_set(changed, spectra, NAMES).hash != ts.hash
    h = training_set_hash(["b", "a"], [[1.0, 2.0], [3.0, 4.0]], ["x", "y"], np.ones((2, 3)), np.ones((2, 3)))
    assert h == training_set_hash(["a", "b"], [[4.0, 3.0], [2.0, 1.0]], ["y", "x"], np.ones((2, 3)), np.ones((2, 3)))


def test_strongly_correlated_labels_are_reported():
    rng = np.random.default_rng(7)
    table = _table(30)
    table["logg"] = (table["teff"] - 4000) / 400 + rng.normal(0, 0.05, 30)
    spectra = _spectra([f"2M{k:04d}" for k in range(30)], rng)
    ts = assemble_training_set(table, spectra, NAMES)
    assert [(a, b) for a, b, _ in ts.correlations] == [("TEFF", "LOGG")]
    assert any("TEFF and LOGG are strongly correlated" in w for w in ts.warnings)
    assert ts.provenance()["hash"] == ts.hash


def test_label_table_can_be_read_from_a_path(tmp_path):
    rng = np.random.default_rng(8)
    t = _table(5)
    t["teff"][4] = -9999.0
    path = tmp_path / "labels.csv"
    t.write(path, format="ascii.csv")
    ts = assemble_training_set(str(path), _spectra([f"2M{k:04d}" for k in range(5)], rng), NAMES,
                               missing="drop")
    assert ts.dropped["missing_labels"]["identifiers"] == ["2M0004"] and len(ts) == 4


def test_bad_options_raise():
    rng = np.random.default_rng(9)
    spectra = _spectra(["2M0000"], rng)
    with pytest.raises(ValueError, match="missing"):
        assemble_training_set(_table(), spectra, NAMES, missing="ignore")
    with pytest.raises(ValueError, match="no training star"):
        assemble_training_set(_table(), _spectra(["nobody"], rng), NAMES)
