"""Table definitions and value conversions (no database needed unless stated)."""

import numpy as np
import pytest

from astra_cannon import store
from astra_cannon.models import (
    LABEL_COLUMNS,
    CannonResult,
    covariance_from_blob,
    covariance_to_blob,
    label_column,
    sanitise_json,
)
from fixtures_db import FakeModel, fake_chunk, spectrum_sources


@pytest.mark.parametrize("name, column", [
    ("TEFF", "teff"), ("Teff", "teff"), ("LOGG", "logg"), ("log_g", "logg"), ("FE_H", "fe_h"),
    ("[Fe/H]", "fe_h"), ("[M/H]", "m_h"), ("[alpha/M]", "alpha_m"), ("ALPHA_FE", "alpha_fe"),
    ("VMICRO", "v_micro"), ("VMACRO", "v_macro"), ("VSINI", "vsini"), ("CI_FE", "c_1_fe"),
    ("TIII_FE", "ti_2_fe"), ("MG_FE", "mg_fe"), ("[Ni/Fe]", "ni_fe"),
])
def test_label_names_map_to_lower_case_columns(name, column):
    assert label_column(name) == column


@pytest.mark.parametrize("name", ["AGE", "teff; DROP TABLE x", "", "[Fe/H]x"])
def test_unknown_labels_have_no_column(name):
    with pytest.raises(ValueError, match="no cannon_result column"):
        label_column(name)


def test_every_label_column_has_an_error_column():
    fields = {f.name for f in CannonResult._meta.sorted_fields}
    assert len(LABEL_COLUMNS) >= 30
    assert all(c in fields and "e_" + c in fields for c in LABEL_COLUMNS)


def test_sanitise_json_makes_numpy_and_non_finite_values_json_safe():
    value = {"a": np.int64(3), "b": np.float32(0.5), "c": [np.nan, np.inf, -np.inf], "d": np.arange(2),
             "e": (np.bool_(True), None), 5: b"x"}
    assert sanitise_json(value) == {"a": 3, "b": 0.5, "c": [None, None, None], "d": [0, 1],
                                    "e": [True, None], "5": "x"}


def test_covariance_blob_is_little_endian_float64():
    cov = np.arange(9.0).reshape(3, 3).astype(">f8")
    blob = covariance_to_blob(cov)
    assert blob == np.arange(9.0).astype("<f8").tobytes()
    np.testing.assert_array_equal(covariance_from_blob(memoryview(blob)), np.arange(9.0).reshape(3, 3))
    with pytest.raises(ValueError, match="square"):
        covariance_from_blob(blob[:16])


def test_labels_without_a_column_are_kept_in_json_and_covariance(db):
    names = ("TEFF", "AGE")
    model = store.register_model(name="m", model=FakeModel(label_names=names), path="/m", file_checksum="c",
                                 parameters={})
    pks = store.register_spectra(spectrum_sources(2))
    labels, cov, meta = fake_chunk(2, label_names=names)
    run = store.begin_task_run(task_family="T", task_id="c", parameters={})
    store.write_chunk(task_run=run, model_pk=model.id, spectrum_pks=pks, label_names=names, labels=labels,
                      cov=cov, meta=meta)
    row = store.read_results(model.id, [pks[0]])[0]
    assert row["teff"] == pytest.approx(labels[0, 0]) and row["labels"]["AGE"] == pytest.approx(labels[0, 1])
    np.testing.assert_array_equal(row["covariance"], cov[0])
    assert row["label_names"] == list(names)


def test_two_labels_mapping_to_one_column_are_rejected(db):
    labels, cov, meta = fake_chunk(1, label_names=("FE_H", "[Fe/H]"))
    run = store.begin_task_run(task_family="T", task_id="c", parameters={})
    with pytest.raises(ValueError, match="twice"):
        store.write_chunk(task_run=run, model_pk=1, spectrum_pks=[1], label_names=("FE_H", "[Fe/H]"),
                          labels=labels, cov=cov, meta=meta)
