"""The synthetic reader behind the scale benchmark, and a synthetic job through Luigi."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from astra_cannon import flags as F, io, pipeline
from astra_cannon.io import synthetic as syn
from test_faults_common import (  # noqa: F401 - fixtures
    build, faults_env, faults_model_file, integrity, tasks_module, trained_job)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "s.json"
    syn.write_synthetic_source(path, count=50, seed=11, first_row=1000)
    return path


def test_synthetic_is_a_registered_format_counted_without_generating(source):
    assert "synthetic" in io.FORMATS and "synthetic" in pipeline.FORMATS
    assert io.count_spectra(source, "synthetic") == 50
    assert source.stat().st_size < 400  # a survey of any size is a few hundred bytes


def test_rows_are_the_same_however_the_file_is_sliced(source):
    whole = io.read_spectra([source], format="synthetic")
    part = io.read_spectra([source], format="synthetic", rows=range(20, 30))
    assert part.identifiers == whole.identifiers[20:30] == [f"synth-11-{1000 + r:09d}" for r in range(20, 30)]
    np.testing.assert_allclose(part.flux, whole.flux[20:30], rtol=1e-12)  # BLAS blocking only
    np.testing.assert_array_equal(part.ivar > 0, whole.ivar[20:30] > 0)
    assert [s["row"] for s in part.sources] == list(range(20, 30))
    assert whole.normalised and whole.flux.dtype == np.float64 and whole.flux.shape == (50, 7214)


def test_spectra_follow_the_recipe(source):
    spectra = syn.read_synthetic(source)
    masked = 1 - (spectra.ivar > 0).mean(axis=1)
    assert np.all((masked > 0.01) & (masked <= 0.021))
    assert np.all(np.isfinite(spectra.flux)) and abs(np.median(spectra.flux) - 1) < 0.2
    labels, snr = syn.synthetic_truth(syn.read_source(source), 1000 + np.arange(50))
    assert np.all((snr >= 50) & (snr <= 200))
    model = syn._model()
    resid = (spectra.flux - model.flux(labels)) * np.sqrt(spectra.ivar)
    good = spectra.ivar > 0
    assert 0.9 < np.std(resid[good]) < 1.6  # photon noise plus the model's intrinsic scatter


@pytest.mark.parametrize("content", [
    "not json", json.dumps({"format": "other"}),
    json.dumps({"format": syn.SOURCE_FORMAT, "version": 1, "model": "bovy", "seed": 1, "count": -5, "first_row": 0}),
    json.dumps({"format": syn.SOURCE_FORMAT, "version": 1, "model": "../../etc/passwd", "seed": 1, "count": 5,
                "first_row": 0}),
])
def test_invalid_sources_are_one_flagged_spectrum_and_count_none(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert io.count_spectra(path, "synthetic") is None
    spectra = io.read_spectra([path], format="synthetic")
    assert len(spectra) == 1 and spectra.flags[0] & F.UNREADABLE_INPUT and "synthetic" in spectra.reasons[0]
    with pytest.raises(ValueError):
        syn.read_source(path)


def test_a_synthetic_job_runs_through_luigi_with_tasks_growing_with_chunks(trained_job, tmp_path):
    paths = []
    for k in range(3):
        path = tmp_path / f"s{k}.json"
        syn.write_synthetic_source(path, count=20, seed=2, first_row=20 * k)
        paths.append(str(path))
    job = pipeline.Job(training_set=trained_job.training_set, spectra=tuple(paths), format="synthetic",
                       chunk_size=20, label_names=trained_job.label_names)
    result, code = build(job)
    assert code == 0, result.summary_text
    assert re.search(r"Scheduled (\d+) tasks", result.summary_text).group(1) == "5"  # 3 chunks + 2
    state = integrity()
    assert state["rows"] == state["keys"] == state["spectra"] == 60 and state["unmarked"] == 0
    with pipeline.connected():
        from astra_cannon import store

        rows = store.read_results()
    source = syn.read_source(paths[0])
    truth, _ = syn.synthetic_truth(source, np.arange(60))
    by_row = {int(r["identifier"].rsplit("-", 1)[1]): r for r in rows}
    logg = np.array([by_row[i]["logg"] for i in range(60)])
    assert np.median(np.abs(logg - truth[:, 1])) < 0.25  # the model recovers the generating labels


@pytest.mark.slow
def test_scale_benchmark_script_runs_and_reports_every_figure(tmp_path):
    out = tmp_path / "figures.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale_pipeline.py"), "-n", "600",
                           "--chunk-size", "200", "--n-train", "60", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = json.loads(out.read_text())
    assert figures["rows"] == 600 and figures["n_chunks"] == 3 and figures["luigi_scheduled_tasks"] == 5
    for key in ("spectra_per_s", "db_rows_per_s", "peak_rss_self_mb", "loadavg_before", "sum_chunk_fit_s"):
        assert figures[key] is not None
