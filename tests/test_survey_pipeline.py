"""Survey files through the pipeline: apStar (synthetic and the two real DR17 files) and
aspcapStar input, continuum normalisation with the shipped mask, and a chunk full of bad and
hostile files (not FITS, truncated, wrong grid, all pixels masked) next to good ones."""

import warnings
from pathlib import Path

import numpy as np
import pytest

from astra_cannon import flags as F
from astra_cannon import pipeline, store
from astra_cannon.io import grid
from fixtures_io import true_continuum, write_apstar, write_aspcapstar

IDX_7214 = grid.gap_removed_indices(7214)

# Luigi warns once, on first import, about its own configuration (autoload_range); import it
# here so the "no warnings" checks below see only the survey path.
import luigi  # noqa: E402,F401


@pytest.fixture(scope="module")
def example_model(tmp_path_factory):
    """The small example's model (60 stars, 7214 pixels, 4 labels, order 2), trained once."""
    from astra_cannon import CannonModel, PolynomialVectorizer
    from astra_cannon.io.example import generate_example

    directory = tmp_path_factory.mktemp("survey_example")
    generate_example(directory, n_train=60, n_test=10, n_files=1, seed=11)
    labels, names, flux, ivar, wavelength = pipeline.read_training_set(directory / "training_set.fits")
    model = CannonModel(labels, flux, ivar, PolynomialVectorizer(list(names), 2), dispersion=wavelength)
    model.train()
    return model


def _register(model):
    identity = pipeline.model_identity(training_set_sha256=model.training_set_hash, label_names=model.label_names,
                                       order=2, regularization=0.0, code_version="test")
    return store.register_model(name="survey-test", model=model, path="/nowhere.npz", file_checksum="x",
                                parameters=identity)


def synthetic_apstar(path, model, labels, snr=150.0, seed=0, object_id=None, reference=None):
    """An apStar file whose normalised spectrum is ``model(labels)`` times a smooth continuum.

    With ``reference`` (a list), append the exactly normalised noisy spectrum on the model grid
    ``(flux, ivar)``: what a perfect continuum normalisation would give.
    """
    rng = np.random.default_rng(seed)
    wl = grid.apstar_wavelength()
    norm = np.ones(wl.size)
    norm[IDX_7214] = model(np.atleast_2d(labels))[0]
    cont = true_continuum(wl, scale=800.0 + 100 * seed, phase=0.2 * seed)
    flux = (cont * norm)[None, :]
    sigma = flux / snr
    flux = flux + rng.normal(size=flux.shape) * sigma
    outside = np.ones(wl.size, dtype=bool)
    for a, b in ((202, 3324), (3538, 6130), (6295, 8382)):  # DR17: flux finite only here
        outside[a:b] = False
    flux[:, outside] = np.nan
    sigma[:, outside] = np.nan
    if reference is not None:
        reference.append(((flux / cont)[0, IDX_7214], ((cont / sigma) ** 2)[0, IDX_7214]))
    header = {"OBJID": object_id or Path(path).stem, "SNR": snr, "NVISITS": 1}
    return write_apstar(path, flux, sigma, np.zeros(flux.shape, dtype=np.int64), header)


def _truth(model, k):
    """k label vectors well inside the training set."""
    lab = model.training_set_labels
    return np.percentile(lab, [35, 50, 65], axis=0)[: k]


def _rows(model_pk):
    return {r["identifier"]: r for r in store.read_results(model_pk)}


def test_apstar_files_are_normalised_with_the_shipped_mask_and_labelled(db, example_model, tmp_path):
    truth = _truth(example_model, 3)
    reference = []
    paths = [synthetic_apstar(tmp_path / f"apStar-s{i}.fits", example_model, truth[i], seed=i, reference=reference)
             for i in range(3)]
    # What the model gives for perfectly normalised spectra: the pipeline's reading, pixel
    # selection and continuum normalisation must reproduce it closely.
    expected = example_model.test(np.array([r[0] for r in reference]), np.array([r[1] for r in reference]))[0]
    row = _register(example_model)
    run = store.begin_task_run(task_family="test", task_id="apstar", parameters={})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the survey path must not warn
        summary = pipeline.infer_chunk(model=example_model, model_pk=row.id,
                                       segments=[pipeline.Segment(p) for p in paths], format="apstar", task_run=run)
    assert summary["n_ok"] == 3 and summary["n_failed"] == 0
    rows = _rows(row.id)
    names = list(example_model.label_names)
    for i, p in enumerate(paths):
        r = rows[Path(p).name + "[0]"]
        assert r["status"] == "ok" and r["n_pixels"] > 7000
        assert r["teff"] == pytest.approx(expected[i, names.index("TEFF")], abs=40)
        assert r["logg"] == pytest.approx(expected[i, names.index("LOGG")], abs=0.1)
        assert r["fe_h"] == pytest.approx(expected[i, names.index("FE_H")], abs=0.04)


def test_the_shipped_continuum_mask_is_used_on_apogee_grids_only(example_model):
    from astra_cannon.io.base import Spectra

    mask = pipeline.continuum_mask_for_grid(example_model.dispersion)
    assert mask is not None and mask.shape == (7214,) and 400 < mask.sum() < 700
    assert pipeline.continuum_mask_for_grid(np.linspace(15000, 17000, 7214)) is None
    raw = Spectra(identifiers=["a"], flux=np.full((1, 7214), 500.0), ivar=np.full((1, 7214), 1e-2),
                  wavelength=example_model.dispersion, normalised=False)
    out = pipeline.normalise_for_model(example_model, raw)
    assert out.normalised and out.meta[0]["continuum"] == "shipped continuum mask"
    assert np.allclose(out.flux, 1.0)


def test_aspcapstar_files_are_labelled_without_renormalising(db, example_model, tmp_path):
    truth = _truth(example_model, 2)
    rng = np.random.default_rng(3)
    paths, flux, ivar = [], [], []
    for i in range(2):
        norm = example_model(truth[i:i + 1])[0]
        sigma = norm / 200.0
        noisy = (norm + rng.normal(size=norm.size) * sigma).astype(np.float32)  # as stored (float32)
        paths.append(write_aspcapstar(tmp_path / f"aspcapStar-s{i}.fits", noisy, sigma))
        flux.append(noisy.astype(float))
        ivar.append(1.0 / sigma.astype(np.float32).astype(float) ** 2)
    expected = example_model.test(np.array(flux), np.array(ivar))[0]
    row = _register(example_model)
    run = store.begin_task_run(task_family="test", task_id="aspcap", parameters={})
    summary = pipeline.infer_chunk(model=example_model, model_pk=row.id,
                                   segments=[pipeline.Segment(p) for p in paths], format="aspcapstar", task_run=run)
    assert summary["n_ok"] == 2
    rows = _rows(row.id)
    teff = list(example_model.label_names).index("TEFF")
    for i, p in enumerate(paths):  # read as given (already normalised): the same labels
        assert rows[Path(p).name]["teff"] == pytest.approx(expected[i, teff], abs=0.5)


def _hostile_chunk(tmp_path, model):
    truth = _truth(model, 2)
    good = [synthetic_apstar(tmp_path / f"apStar-good{i}.fits", model, truth[i], seed=i) for i in range(2)]
    raw = Path(good[0]).read_bytes()
    bad = {}
    bad["not_fits"] = tmp_path / "apStar-notfits.fits"
    bad["not_fits"].write_bytes(b"SIMPLE? no, this is a text file\n" * 300)
    bad["truncated"] = tmp_path / "apStar-truncated.fits"
    bad["truncated"].write_bytes(raw[: len(raw) // 3])
    flux = np.ones((1, 8575)) * 1000.0
    bad["wrong_grid"] = Path(write_apstar(tmp_path / "apStar-shifted.fits", flux, flux / 100,
                                          np.zeros((1, 8575), dtype=np.int64), crval1=4.1791))
    bad["all_masked"] = Path(write_apstar(tmp_path / "apStar-allmasked.fits", flux, flux / 100,
                                          np.ones((1, 8575), dtype=np.int64)))
    return good, {k: str(v) for k, v in bad.items()}


def test_bad_and_hostile_files_give_flagged_rows_while_the_rest_of_the_chunk_is_labelled(db, example_model,
                                                                                         tmp_path):
    good, bad = _hostile_chunk(tmp_path, example_model)
    paths = [good[0], bad["not_fits"], bad["truncated"], bad["wrong_grid"], bad["all_masked"], good[1]]
    row = _register(example_model)
    run = store.begin_task_run(task_family="test", task_id="hostile", parameters={})
    summary = pipeline.infer_chunk(model=example_model, model_pk=row.id,
                                   segments=[pipeline.Segment(p) for p in paths], format="apstar", task_run=run)
    assert summary["n_results"] == 6 and summary["n_ok"] == 2 and summary["n_failed"] == 4
    assert store.task_complete("hostile")
    by_path = {r["identifier"].split("[")[0]: r for r in store.read_results(row.id)}
    for p in good:
        r = by_path[Path(p).name]
        assert r["status"] == "ok" and np.isfinite(r["teff"])
    expected = {"not_fits": F.UNREADABLE_INPUT, "truncated": F.UNREADABLE_INPUT,
                "wrong_grid": F.BAD_WAVELENGTH_GRID | F.BAD_INPUT_SHAPE, "all_masked": F.NO_INFORMATION}
    for kind, bits in expected.items():
        r = by_path[Path(bad[kind]).name]
        assert r["status"] == "failed" and r["teff"] is None, kind
        assert r["flags"] & bits, (kind, F.decode(r["flags"]))
        assert r["reason"] and len(r["reason"]) > 5, kind


def test_one_cli_run_over_a_hostile_chunk_labels_the_good_files(cli_env, example_dir, example_model, tmp_path,
                                                                 capsys):
    from astra_cannon import cli

    good, bad = _hostile_chunk(tmp_path, example_model)
    args = ["infer", "--example-dir", str(example_dir), "--format", "apstar", "-q",
            "--spectra", good[0], *bad.values(), good[1]]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "results: 2 ok, 4 failed" in out
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "Failed spectra: 4" in out and "apStar-notfits.fits" in out


@pytest.fixture
def cli_env(tmp_path, monkeypatch, sqlite_url):
    from luigi.configuration import get_config

    monkeypatch.setenv("ASTRA_CANNON_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("ASTRA_CANNON_WORK_DIR", str(tmp_path / "work"))
    cfg = get_config()
    saved = cfg.get("scheduler", "retry_count", None)
    cfg.set("scheduler", "retry_count", "1")
    yield sqlite_url
    if saved is not None:
        cfg.set("scheduler", "retry_count", saved)


def test_real_dr17_apstar_files_get_labels_or_an_honest_flag(db, example_model, real_apstar_paths):
    row = _register(example_model)
    run = store.begin_task_run(task_family="test", task_id="real", parameters={})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = pipeline.infer_chunk(model=example_model, model_pk=row.id,
                                       segments=[pipeline.Segment(p) for p in real_apstar_paths], format="apstar",
                                       task_run=run)
    assert summary["n_results"] == 2
    rows = {r["identifier"]: r for r in store.read_results(row.id)}
    giant = rows["apStar-dr17-2M17335483-2753043.fits[0]"]   # M giant: RV_TEFF 3677, RV_LOGG 0.53
    dwarf = rows["apStar-dr17-2M19485057+5005279.fits[0]"]   # dwarf: RV_TEFF 5226, RV_LOGG 5.0
    for r in (giant, dwarf):
        assert r["status"] == "ok" and r["n_pixels"] > 6500 and r["snr"] > 50
    assert 3300 < giant["teff"] < 4100 and giant["logg"] < 1.8
    # The dwarf lies outside the giants' training set: it must say so, never pass silently.
    assert dwarf["flags"] & (F.OUTSIDE_TRAINING_HULL | F.LARGE_RCHI2)


def test_cli_trains_from_a_label_table_and_survey_files_recording_dropped_stars(cli_env, example_model,
                                                                               tmp_path, capsys):
    from astropy.table import Table

    from astra_cannon import cli
    from astra_cannon.models import TaskRun

    rng = np.random.default_rng(5)
    lab = example_model.training_set_labels
    names = list(example_model.label_names)
    n = 14
    picks = lab[rng.choice(len(lab), n, replace=False)]
    ids = [f"2M{i:08d}" for i in range(n)]
    spectra_dir = tmp_path / "spectra"
    spectra_dir.mkdir()
    paths = [synthetic_apstar(spectra_dir / f"apStar-{ids[i]}.fits", example_model, picks[i], seed=i,
                              object_id=ids[i]) for i in range(n - 1)]  # the last star has no spectrum
    snr = np.full(n, 150.0)
    snr[0] = 20.0                                          # fails the S/N cut
    teff = picks[:, names.index("TEFF")].copy()
    teff[1] = -9999.0                                      # a sentinel: missing label
    table = Table({"APOGEE_ID": ids, "TEFF": teff, "LOGG": picks[:, names.index("LOGG")], "SNR": snr})
    table.write(tmp_path / "labels.csv", format="ascii.csv")

    args = ["train", "--label-table", str(tmp_path / "labels.csv"), "--training-spectra", *paths,
            "--training-format", "apstar", "--labels", "TEFF,LOGG", "--order", "1", "--cut", "SNR:100:"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "training set: 11 of 14 stars kept" in out and "done" in out
    from astra_cannon import db

    db.connect(cli_env)
    try:
        run = TaskRun.get(TaskRun.task_family == "astra_cannon.TrainModel")
        ts = run.summary["training_set"]
        assert run.summary["n_stars"] == 11
        assert ts["dropped"]["cuts"]["identifiers"] == [ids[0]]
        assert ts["dropped"]["missing_labels"]["identifiers"] == [ids[1]]
        assert ts["dropped"]["no_spectrum"]["identifiers"] == [ids[-1]]
        assert ts["cuts"] == {"SNR": [100.0, None]} and ts["continuum"] == "shipped continuum mask"
        assert Path(run.summary["plots"][0]).exists()
    finally:
        db.close()
    # Same inputs, same training-set file, same model: nothing to do the second time.
    assert cli.main(args) == 0
    db.connect(cli_env)
    try:
        assert TaskRun.select().where(TaskRun.task_family == "astra_cannon.TrainModel").count() == 1
    finally:
        db.close()
