"""CannonModel: training recovers a known model, the test step is honest, files round-trip."""

import json
import zipfile

import numpy as np
import pytest

from astra_cannon import CannonModel, ModelFileError, PolynomialVectorizer
from astra_cannon import flags as F


def test_training_recovers_generating_theta_and_scatter(trained):
    model, truth = trained
    # theta: the model's prediction at fresh labels matches the truth's to well below the noise
    labels = truth.labels(200)
    assert np.sqrt(np.mean((model(labels) - truth.flux(labels)) ** 2)) < 2e-3
    s = np.sqrt(model.s2)
    scatter_pixels = truth.s > 0
    # unbiased: the median recovered scatter in the s = 0.01 pixels is within 5% of it
    assert np.median(s[scatter_pixels]) == pytest.approx(0.01, rel=0.05)
    assert np.median(s[~scatter_pixels]) < 0.002


@pytest.mark.slow
def test_pulls_are_unit_normal_over_many_spectra(trained):
    model, truth = trained
    labels, flux, ivar = truth.sample(400)
    got, cov, meta = model.test(flux, ivar)
    sigma = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    pulls = (got - labels) / sigma
    assert all(m["status"] == "ok" for m in meta)
    std = pulls.std(axis=0)
    assert np.all(np.abs(std - 1) < 0.1), std
    assert np.all(np.abs(pulls.mean(axis=0)) < 0.2)


def test_covariance_is_physical_symmetric_and_positive(trained):
    model, truth = trained
    labels, flux, ivar = truth.sample(30)
    _, cov, _ = model.test(flux, ivar)
    np.testing.assert_allclose(cov, np.transpose(cov, (0, 2, 1)), rtol=1e-12)
    assert np.all(np.linalg.eigvalsh(cov) > 0)
    # Teff uncertainty is in kelvin, not in scaled units (scale 800 K would give ~1e-3)
    assert np.median(np.sqrt(cov[:, 0, 0])) > 1.0


def test_multiple_starts_record_the_winner(trained):
    model, truth = trained
    _, flux, ivar = truth.sample(5)
    starts = np.array([truth.fiducials, truth.fiducials + truth.scales * 0.5, truth.fiducials - truth.scales])
    labels, cov, meta = model.test(flux, ivar, initial_labels=starts)
    for m in meta:
        assert 0 <= m["best_result_index"] < 3
        np.testing.assert_allclose(m["x0"], starts[m["best_result_index"]])


def test_meta_is_json_safe_with_reference_keys(trained):
    model, truth = trained
    _, flux, ivar = truth.sample(3)
    ivar[1] = 0
    _, _, meta = model.test(flux, ivar)
    text = json.dumps(meta, allow_nan=False)
    assert "NaN" not in text
    for key in ("chi_sq", "r_chi_sq", "snr", "n_pixels", "ier", "nfev", "best_result_index", "x0", "flags",
                "fail_message", "status", "label_names", "method", "t_elapsed"):
        assert key in meta[0]


def test_bad_pixels_at_test_time_are_masked_not_fatal(trained, recwarn):
    model, truth = trained
    labels, flux, ivar = truth.sample(4, nan_bad=False)
    dirty_flux, dirty_ivar = flux.copy(), ivar.copy()
    dirty_flux[0, :10] = np.nan
    dirty_flux[1, 10:20] = np.inf
    dirty_ivar[2, 20:30] = -1
    dirty_ivar[3, 30:40] = np.nan
    masked = ivar.copy()
    for i, sl in enumerate([slice(0, 10), slice(10, 20), slice(20, 30), slice(30, 40)]):
        masked[i, sl] = 0
    got, cov, meta = model.test(dirty_flux, dirty_ivar)
    expected, _, _ = model.test(flux, masked)
    assert np.all(np.isfinite(got)) and all(m["flags"] == 0 for m in meta)
    # bad values behave exactly like ivar = 0 at those pixels
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_no_information_and_few_pixels_give_nan_and_flags(trained):
    model, truth = trained
    _, flux, ivar = truth.sample(3)
    ivar[0] = 0
    ivar[1, 3:] = 0
    got, cov, meta = model.test(flux, ivar)
    assert np.all(np.isnan(got[:2])) and np.all(np.isnan(cov[:2]))
    assert meta[0]["flags"] & F.NO_INFORMATION and meta[0]["status"] == "failed"
    assert meta[0]["fail_message"] == "Pixels contained no information"
    assert meta[1]["flags"] & F.FEW_PIXELS and "Too few usable pixels" in meta[1]["fail_message"]
    assert meta[2]["status"] == "ok"


def test_wrong_pixel_count_raises_naming_shapes(trained):
    model, truth = trained
    _, flux, ivar = truth.sample(2)
    with pytest.raises(ValueError, match=r"\(S, 300\)"):
        model.test(flux[:, :-1], ivar[:, :-1])


def test_big_endian_and_float32_inputs_give_the_same_answer(trained):
    model, truth = trained
    _, flux, ivar = truth.sample(3, nan_bad=False)
    a, _, _ = model.test(flux, ivar)
    b, _, _ = model.test(flux.astype(">f8"), ivar.astype(">f8"))
    c, _, _ = model.test(flux.astype(np.float32), ivar.astype(np.float32))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose((c - a) / model.scales, 0, atol=1e-4)


def test_results_are_deterministic_and_batch_size_independent(trained):
    model, truth = trained
    _, flux, ivar = truth.sample(20)
    a, ca, _ = model.test(flux, ivar, batch_size=7)
    b, cb, _ = model.test(flux, ivar, batch_size=256)
    # BLAS blocking differs with the batch, so agreement is to the optimiser's tolerance
    sigma = np.sqrt(np.diagonal(ca, axis1=1, axis2=2))
    np.testing.assert_allclose((a - b) / sigma, 0, atol=1e-4)
    c, _, _ = model.test(flux, ivar, batch_size=7)
    np.testing.assert_array_equal(a, c)


def test_outside_training_range_is_flagged(trained):
    model, truth = trained
    far = truth.fiducials + truth.scales * np.array([3.0, 0, 0])
    flux = truth.flux(far[None])
    ivar = np.full_like(flux, 1e4)
    got, _, meta = model.test(flux, ivar, initial_labels=far)
    assert meta[0]["flags"] & F.OUTSIDE_TRAINING_HULL


def test_training_rejects_bad_input_clearly(truth):
    labels, flux, ivar = truth.sample(50, nan_bad=False)
    vec = truth.vectorizer
    bad = labels.copy()
    bad[[3, 7], 1] = np.nan
    with pytest.raises(ValueError, match=r"rows \[3, 7\]"):
        CannonModel(bad, flux, ivar, vec)
    neg = ivar.copy()
    neg[0, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        CannonModel(labels, flux, neg, vec)
    nanflux = flux.copy()
    nanflux[2, 5] = np.nan
    with pytest.raises(ValueError, match="ivar > 0"):
        CannonModel(labels, nanflux, ivar, vec)
    with pytest.raises(ValueError, match="shapes disagree"):
        CannonModel(labels, flux[:-1], ivar[:-1], vec)
    with pytest.raises(ValueError, match="3 columns"):
        CannonModel(labels, flux, ivar, PolynomialVectorizer(["A", "B"], 2))
    nanflux_masked = nanflux.copy()
    ivar2 = ivar.copy()
    ivar2[2, 5] = 0
    CannonModel(labels, nanflux_masked, ivar2, vec)  # NaN flux where ivar == 0 is a masked pixel


def test_correlated_labels_are_reported(truth):
    labels, flux, ivar = truth.sample(60)
    labels[:, 1] = 2.5 + (labels[:, 0] - 4800) / 800 * 2 + 0.01 * np.random.default_rng(0).normal(size=60)
    model = CannonModel(labels, flux, ivar, truth.vectorizer)
    assert any("TEFF and LOGG" in w for w in model.metadata["warnings"])


def test_training_set_hash_ignores_star_and_label_order(truth):
    labels, flux, ivar = truth.sample(40)
    a = CannonModel(labels, flux, ivar, truth.vectorizer).training_set_hash
    perm = np.random.default_rng(0).permutation(40)
    b = CannonModel(labels[perm], flux[perm], ivar[perm], truth.vectorizer).training_set_hash
    vec2 = PolynomialVectorizer(["FE_H", "TEFF", "LOGG"], 2)
    c = CannonModel(labels[:, [2, 0, 1]], flux, ivar, vec2).training_set_hash
    d = CannonModel(labels + 1e-9, flux, ivar, truth.vectorizer).training_set_hash
    assert a == b == c != d


def test_regularised_training_with_censoring_by_wavelength(truth):
    labels, flux, ivar = truth.sample(150)
    wl = np.linspace(15100, 17000, flux.shape[1])
    model = CannonModel(labels, flux, ivar, truth.vectorizer, dispersion=wl, regularization=10.0,
                        censors={"FE_H": [[None, 15500.0], [16800.0, None]]})
    theta, s2, meta = model.train()
    cens = (wl <= 15500) | (wl >= 16800)
    fe_terms = [k for k, t in enumerate(truth.vectorizer.terms) if any(i == 2 for i, _ in t)]
    assert np.all(theta[np.ix_(cens, fe_terms)] == 0)
    assert np.any(theta[np.ix_(~cens, fe_terms)] != 0)


def test_write_read_round_trip(trained, tmp_path):
    model, truth = trained
    path = model.write(tmp_path / "m.npz")
    again = CannonModel.read(path)
    for attr in ("theta", "s2", "fiducials", "scales", "training_set_labels", "censor_mask", "theta_cov"):
        np.testing.assert_array_equal(getattr(again, attr), getattr(model, attr))
        assert getattr(again, attr).dtype == getattr(model, attr).dtype
    assert again.vectorizer == model.vectorizer
    assert again.training_set_hash == model.training_set_hash
    assert again.regularization == model.regularization
    _, flux, ivar = truth.sample(4)
    np.testing.assert_array_equal(again.test(flux, ivar)[0], model.test(flux, ivar)[0])
    full = CannonModel.read(model.write(tmp_path / "full.npz", include_training_set=True))
    np.testing.assert_array_equal(full.training_set_flux, model.training_set_flux)


def test_a_model_file_with_a_float64_theta_covariance_reads_as_float32(trained, tmp_path):
    """Files written before the covariance was kept in float32 read as they did, at half the memory."""
    import json

    from astra_cannon.model import _sha256

    model, truth = trained
    path = model.write(tmp_path / "m.npz")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(arrays["header"].tobytes())
    arrays["theta_cov"] = arrays["theta_cov"].astype(np.float64)
    header["checksums"]["theta_cov"] = _sha256(arrays["theta_cov"])
    arrays["header"] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    np.savez(tmp_path / "old.npz", **arrays)
    old = CannonModel.read(tmp_path / "old.npz")
    assert old.theta_cov.dtype == np.float32 and not old.theta_cov.flags.writeable
    np.testing.assert_array_equal(old.theta_cov, model.theta_cov)
    _, flux, ivar = truth.sample(3)
    np.testing.assert_array_equal(old.test(flux, ivar)[1], model.test(flux, ivar)[1])


def test_damaged_or_mismatched_model_files_raise_model_file_error(trained, tmp_path):
    model, _ = trained
    good = model.write(tmp_path / "good.npz")
    raw = open(good, "rb").read()
    cases = {
        "truncated.npz": raw[: len(raw) // 2],
        "empty.npz": b"",
        "random.npz": np.random.default_rng(0).bytes(5000),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelFileError):
            CannonModel.read(tmp_path / name)
    with pytest.raises(ModelFileError, match="not found"):
        CannonModel.read(tmp_path / "missing.npz")
    with pytest.raises(ModelFileError, match="expected labels"):
        CannonModel.read(good, label_names=["TEFF", "LOGG"])
    with pytest.raises(ModelFileError, match="expected 8575 pixels, found 300"):
        CannonModel.read(good, n_pixels=8575)

    def rewrite(name, edit):
        with np.load(good, allow_pickle=False) as d:
            arrays = {k: d[k] for k in d.files}
        edit(arrays)
        path = tmp_path / name
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
        return path

    def set_header(arrays, **changes):
        header = json.loads(arrays["header"].tobytes())
        header.update(changes)
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)

    with pytest.raises(ModelFileError, match="schema version"):
        CannonModel.read(rewrite("schema.npz", lambda a: set_header(a, schema_version=99)))

    def nan_theta(a):
        a["theta"] = a["theta"].copy()
        a["theta"][0, 0] = np.nan
        header = json.loads(a["header"].tobytes())
        header["checksums"].pop("theta")
        a["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)

    with pytest.raises(ModelFileError, match="non-finite"):
        CannonModel.read(rewrite("nan.npz", nan_theta))

    def tamper(a):
        a["s2"] = a["s2"] * 2

    with pytest.raises(ModelFileError, match="checksum"):
        CannonModel.read(rewrite("tampered.npz", tamper))

    def objects(a):
        a["theta"] = np.array([{"x": 1}], dtype=object)

    with pytest.raises(ModelFileError):
        CannonModel.read(rewrite("pickle.npz", objects))
    assert zipfile.is_zipfile(good)


def test_unnormalised_flux_is_flagged_not_fitted(trained):
    model, truth = trained
    _, flux, ivar = truth.sample(3)
    flux[1] *= 1e6
    ivar[1] /= 1e12
    got, cov, meta = model.test(flux, ivar)
    assert meta[1]["flags"] & F.UNNORMALISED_FLUX and meta[1]["status"] == "failed"
    assert np.all(np.isnan(got[1])) and np.all(np.isfinite(got[[0, 2]]))


def test_model_uncertainty_correction_removes_pull_towards_training_centre():
    from fixtures_numerics import TruthModel

    truth = TruthModel(n_pixels=1000, seed=4)
    labels, flux, ivar = truth.sample(60)  # a small training set: a noisy model
    model = CannonModel(labels, flux, ivar, truth.vectorizer)
    model.train()
    assert model.theta_cov is not None
    test_labels = truth.labels(40)
    clean = truth.flux(test_labels)
    ivar = np.full_like(clean, 1e4)
    naive, _, _ = model.test(clean, ivar, model_uncertainty=False)
    corrected, cov, _ = model.test(clean, ivar, model_uncertainty=True)
    rms_naive = np.sqrt(np.mean(((naive - test_labels) / model.scales) ** 2, axis=0))
    rms_corrected = np.sqrt(np.mean(((corrected - test_labels) / model.scales) ** 2, axis=0))
    assert np.all(rms_corrected < 0.5 * rms_naive), (rms_naive, rms_corrected)
    # the naive fit is biased towards the training-set centre (labels shrink)
    spread = lambda x: np.std((x - model.fiducials) / model.scales, axis=0)  # noqa: E731
    assert np.all(spread(naive) < spread(test_labels))


def test_iteration_limit_is_flagged_optimizer_failed(trained):
    model, truth = trained
    _, flux, ivar = truth.sample(4)
    far = truth.fiducials + truth.scales * 0.8
    got, _, meta = model.test(flux, ivar, initial_labels=far, max_iterations=1, model_uncertainty=False)
    assert all(m["flags"] & F.OPTIMIZER_FAILED and m["ier"] == 5 for m in meta)
    assert all("did not converge" in m["fail_message"] for m in meta)


def test_a_fit_that_never_moves_is_flagged_at_initial_guess(trained):
    model, truth = trained
    _, flux, ivar = truth.sample(3)
    best, _, _ = model.test(flux, ivar, model_uncertainty=False)
    again, _, meta = model.test(flux, ivar, initial_labels=best[:, None, :], model_uncertainty=False)
    assert all(m["flags"] & F.AT_INITIAL_GUESS for m in meta)
    np.testing.assert_allclose(again, best)
    moved, _, meta = model.test(flux, ivar, model_uncertainty=False)
    assert not any(m["flags"] & F.AT_INITIAL_GUESS for m in meta)


def test_model_noise_correction_is_not_applied_where_the_model_noise_dominates():
    from fixtures_numerics import TruthModel

    truth = TruthModel(n_pixels=300, seed=8, order=3)  # 20 terms
    labels, flux, ivar = truth.sample(26)  # barely more stars than terms: a very noisy model
    model = CannonModel(labels, flux, ivar, truth.vectorizer)
    model.train()
    test_labels, tflux, tivar = truth.sample(30)
    plain, _, _ = model.test(tflux, tivar, model_uncertainty=False)
    guarded, cov, meta = model.test(tflux, tivar, model_uncertainty=True)
    assert np.all(np.isfinite(guarded)) and np.all(np.isfinite(cov))
    rms = lambda x: np.sqrt(np.mean(((x - test_labels) / model.scales) ** 2))  # noqa: E731
    # never the runaway fits an over-large correction would give
    assert rms(guarded) < 1.5 * rms(plain)
    # those that keep the plain fit say so, and carry its bias in their covariance
    dominated = np.array([bool(m["flags"] & F.MODEL_NOISE_DOMINATED) for m in meta])
    assert dominated.any()
    _, plain_cov, _ = model.test(tflux, tivar, model_uncertainty=False)
    sigma = lambda c: np.sqrt(np.diagonal(c, axis1=1, axis2=2))  # noqa: E731
    assert np.all(np.abs(guarded[dominated] - plain[dominated]) < 1e-4 * sigma(plain_cov[dominated]))
    assert np.all(sigma(cov[dominated]) > sigma(plain_cov[dominated]))
    assert not any(m["flags"] & F.FAILURE_FLAGS for m in meta)


def test_a_fit_that_never_moves_is_flagged_at_initial_guess_on_the_single_precision_path(trained, monkeypatch):
    from astra_cannon import engines

    model, truth = trained
    monkeypatch.setattr(engines, "_SINGLE_PRECISION_MIN_TERMS", 1)  # float32 Q and the float64 polish
    _, flux, ivar = truth.sample(3)
    best, _, _ = model.test(flux, ivar, model_uncertainty=False)
    assert model._theta_pairs[1].dtype == np.float32
    again, cov, meta = model.test(flux, ivar, initial_labels=best[:, None, :], model_uncertainty=False)
    assert all(m["flags"] & F.AT_INITIAL_GUESS for m in meta)
    assert np.all(np.abs(again - best) <= 1e-4 * np.sqrt(np.diagonal(cov, axis1=1, axis2=2)))
    moved, _, meta = model.test(flux, ivar, model_uncertainty=False)
    assert not any(m["flags"] & F.AT_INITIAL_GUESS for m in meta)


def test_test_table_kept_in_a_file_is_shared_checked_and_rebuilt_when_stale(trained, tmp_path):
    model, truth = trained
    _, flux, ivar = truth.sample(20)
    path = tmp_path / "model.test-table.npy"
    expected, cov_expected, _ = CannonModel.read(_written(model, tmp_path)).test(flux, ivar)

    first = CannonModel.read(_written(model, tmp_path))
    assert first.keep_test_table(path, min_bytes=0) == str(path)
    assert path.exists() and (tmp_path / "model.test-table.npy.json").exists()
    second = CannonModel.read(_written(model, tmp_path))
    second.keep_test_table(path, min_bytes=0)
    assert isinstance(second._theta_pairs[1], np.memmap)  # mapped, not rebuilt
    labels, cov, _ = second.test(flux, ivar)
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(cov, cov_expected)

    # a damaged table is noticed (sha256) and rebuilt, never used
    table = np.load(path)
    table[3, 2] += 1.0
    np.save(path, table)
    third = CannonModel.read(_written(model, tmp_path))
    third.keep_test_table(path, min_bytes=0)
    np.testing.assert_array_equal(third.test(flux, ivar)[0], expected)
    from astra_cannon.engines import theta_table

    np.testing.assert_array_equal(np.load(path), theta_table(model.theta))

    # another theta (a retrained model) does not take this table
    other = CannonModel.read(_written(model, tmp_path))
    other.theta = other.theta * (1 + 1e-9)
    other.keep_test_table(path, min_bytes=0)
    np.testing.assert_array_equal(np.asarray(other._theta_pairs[1][:, 0]), other.theta[:, 0] ** 2)

    # small tables stay in memory unless asked
    assert CannonModel.read(_written(model, tmp_path)).keep_test_table(tmp_path / "small.npy") is None


def _written(model, directory):
    path = directory / "model.npz"
    if not path.exists():
        model.write(path)
    return path


def test_model_noise_covariance_is_the_corrected_fits_sandwich_computed_pixel_by_pixel():
    """The covariance of the corrected-score fit, against ``(1 + eps) Hc^-1 H Hc^-1`` built pixel
    by pixel from the Jacobian and each pixel's theta covariance (no Q or G statistics):
    ``H = sum_p w_p J_p J_p^T``, ``Hc = H - sum_p w_p D^T Cov(theta_p) D``."""
    from astra_cannon.engines import khatri_rao_upper, pack_weights, unpack_symmetric
    from fixtures_numerics import TruthModel

    truth = TruthModel(n_pixels=800, seed=12)
    labels, flux, ivar = truth.sample(60)  # a small training set: the correction matters
    model = CannonModel(labels, flux, ivar, truth.vectorizer)
    model.train()
    _, tflux, tivar = truth.sample(40)
    got, cov, meta = model.test(tflux, tivar)
    assert not any(m["flags"] & (F.FAILURE_FLAGS | F.MODEL_NOISE_DOMINATED) for m in meta), \
        [F.decode(m["flags"]) for m in meta]
    x = model._scale(got)
    V = model.vectorizer._vector_rows(x)
    D = model.vectorizer._derivative_rows(x) / model.scales[None, None, :]  # (S, K, L), physical
    C = unpack_symmetric(model.theta_cov, V.shape[1])  # (P, K, K)
    good = (tivar > 0) & np.isfinite(tflux)
    w = np.where(good, 1.0 / (1.0 / np.where(good, tivar, 1.0) + model.s2), 0.0)
    J = np.einsum("pk,skl->spl", model.theta, D)
    H = np.einsum("sp,spl,spm->slm", w, J, J)
    B = np.einsum("sp,skl,pkj,sjm->slm", w, D, C, D)
    m = (khatri_rao_upper(V) * pack_weights(V.shape[1])) @ model.theta_cov.T  # v^T Cov(theta_p) v
    eps = np.sum(w * m, axis=1) / good.sum(axis=1)
    Hc_inv = np.linalg.inv(H - B)
    expected = (1 + eps)[:, None, None] * Hc_inv @ H @ Hc_inv
    share = np.array([np.linalg.eigvalsh(np.linalg.solve(h, b)).max() for h, b in zip(H, B)])
    assert np.median(share) > 0.05 and np.median(eps) > 0.01  # the test means something
    ratio = np.sqrt(np.diagonal(cov, axis1=1, axis2=2) / np.diagonal(expected, axis1=1, axis2=2))
    assert np.all(np.abs(ratio - 1) < 1e-3), (ratio.min(), ratio.max())
    np.testing.assert_allclose(cov, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    # the reported chi2: plain (noise + model variance), to first order in eps
    r = np.where(good, tflux - V @ model.theta.T, 0.0)
    w_model = np.where(good, 1.0 / (1.0 / np.where(good, tivar, 1.0) + model.s2 + m), 0.0)
    chi2 = np.array([d["chi_sq"] for d in meta])
    # (eps: median 0.1, up to 3 in a few pixels of the edge stars, where first order is coarse)
    np.testing.assert_allclose(chi2, np.sum(w_model * r**2, axis=1), rtol=2e-2)


def test_pulls_are_unit_normal_over_realisations_of_a_small_training_set():
    """Statistically: 30 training sets of 40 stars (10 terms), each a fresh draw of the training
    noise, each tested on the same 60 labels with fresh noise. The corrected fits' pulls must be
    N(0, 1); without the model-noise correction they are 1.4-2x too wide (the test's power)."""
    from fixtures_numerics import TruthModel

    truth = TruthModel(n_pixels=300, seed=21)
    rng = np.random.default_rng(5)
    train_labels = truth.labels(40)
    test_labels = truth.fiducials + truth.scales * 0.3 * rng.normal(size=(60, 3))

    def noisy(labels):
        n, P = len(labels), truth.theta.shape[0]
        sigma = np.ones((n, P)) / rng.uniform(50, 200, size=(n, 1))
        flux = truth.flux(labels) + truth.s * rng.normal(size=(n, P)) + sigma * rng.normal(size=(n, P))
        return flux, 1.0 / sigma**2

    pulls, plain = [], []
    for _ in range(30):
        model = CannonModel(train_labels, *noisy(train_labels), truth.vectorizer)
        model.train()
        tflux, tivar = noisy(test_labels)
        for corrected, out in ((True, pulls), (False, plain)):
            got, cov, meta = model.test(tflux, tivar, model_uncertainty=corrected)
            assert not any(m["flags"] & F.FAILURE_FLAGS for m in meta)
            out.append((got - test_labels) / np.sqrt(np.diagonal(cov, axis1=1, axis2=2)))
    pulls, plain = np.concatenate(pulls), np.concatenate(plain)
    # 1800 pulls per label, correlated within a training set: std within 10%, mean near 0
    assert np.all(np.abs(pulls.std(axis=0) - 1) < 0.1), pulls.std(axis=0)
    assert np.all(np.abs(pulls.mean(axis=0)) < 0.15), pulls.mean(axis=0)
    assert np.all(plain.std(axis=0) > 1.3), plain.std(axis=0)


def test_theta_covariance_is_a_read_only_float32_copy_that_the_test_step_reads(trained, monkeypatch):
    from astra_cannon import model as model_module

    model, truth = trained
    saved = model.theta_cov
    assert saved.dtype == np.float32 and not saved.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        model.theta_cov *= 4.0  # no edit in place: nothing derived from it can go stale
    seen = []
    label_spectra = model_module.label_spectra
    monkeypatch.setattr(model_module, "label_spectra", lambda *a, **k: seen.append(k["theta_cov"]) or label_spectra(*a, **k))
    _, flux, ivar = truth.sample(3)
    model.test(flux, ivar)
    assert seen[-1] is saved  # read as it is: no float32 copy per call
    mine = np.array(saved, dtype=float)
    try:
        model.theta_cov = mine  # assigned arrays are copied
        mine *= 2.0
        np.testing.assert_array_equal(model.theta_cov, saved)
        assert model.theta_cov.dtype == np.float32 and not model.theta_cov.flags.writeable
    finally:
        model.theta_cov = saved


@pytest.mark.parametrize("single", [False, True], ids=["float64", "float32"])
def test_a_corrected_fit_that_leaves_the_convex_region_takes_one_newton_step_from_the_plain_fit(
        single, monkeypatch):
    """With 30 stars for 10 terms, Q - G is not convex everywhere: a fit that wanders off falls
    back to the first-order corrected estimate, one Gauss-Newton step of the corrected objective
    from the plain optimum, checked here against that step built pixel by pixel."""
    from astra_cannon import engines
    from astra_cannon.engines import unpack_symmetric
    from fixtures_numerics import TruthModel

    if single:
        # the K x K path in float32 (a 28+ term model whose polynomial table does not fit)
        from astra_cannon import model as model_module

        monkeypatch.setattr(engines, "_SINGLE_PRECISION_MIN_TERMS", 1)
        for module in (engines, model_module):
            monkeypatch.setattr(module, "monomial_basis_for", lambda *args, **kwargs: None)
    steps = []
    newton_step = engines._newton_step

    def recorded(Q, c, vectorizer, x):
        out = newton_step(Q, c, vectorizer, x)
        steps.append((x.copy(), out.copy()))
        return out

    monkeypatch.setattr(engines, "_newton_step", recorded)
    truth = TruthModel(n_pixels=300, seed=21)
    rng = np.random.default_rng(5)
    train_labels = truth.labels(30)
    test_labels = truth.fiducials + truth.scales * 0.3 * rng.normal(size=(60, 3))
    P = truth.theta.shape[0]
    for _ in range(40):
        sigma = np.ones((30, P)) / rng.uniform(50, 200, size=(30, 1))
        flux = truth.flux(train_labels) + truth.s * rng.normal(size=(30, P)) + sigma * rng.normal(size=(30, P))
        model = CannonModel(train_labels, flux, 1 / sigma**2, truth.vectorizer)
        model.train()
        tsigma = np.ones((60, P)) / rng.uniform(50, 200, size=(60, 1))
        tflux = truth.flux(test_labels) + truth.s * rng.normal(size=(60, P)) + tsigma * rng.normal(size=(60, P))
        tivar = 1 / tsigma**2
        steps.clear()
        got, cov, meta = model.test(tflux, tivar)
        if steps:
            break
    assert steps, "no corrected fit left the convex region: the test lost its power"
    assert not any(m["flags"] & F.FAILURE_FLAGS for m in meta)
    assert np.all(np.isfinite(got)) and np.all(np.isfinite(cov))
    plain, _, _ = model.test(tflux, tivar, model_uncertainty=False)
    x_plain = np.concatenate([s[0] for s in steps])
    x_step = np.concatenate([s[1] for s in steps])
    scaled = model._scale(plain)
    rows = [int(np.argmin(np.abs(scaled - x).sum(axis=1))) for x in x_plain]
    assert np.allclose(scaled[rows], x_plain, atol=1e-4)  # the step starts at the plain optimum
    C = unpack_symmetric(model.theta_cov, truth.vectorizer.n_terms)
    for i, x, x1 in zip(rows, x_plain, x_step):
        v = model.vectorizer._vector_rows(x[None])[0]
        D = model.vectorizer._derivative_rows(x[None])[0]  # (K, L)
        w = 1.0 / (1.0 / tivar[i] + model.s2)
        J = model.theta @ D  # (P, L)
        r = tflux[i] - model.theta @ v
        Hc = np.einsum("p,pl,pm->lm", w, J, J) - np.einsum("p,kl,pkj,jm->lm", w, D, C, D)
        g = -np.einsum("p,pl,p->l", w, J, r) - np.einsum("p,kl,pkj,j->l", w, D, C, v)
        np.testing.assert_allclose(x1, x - np.linalg.solve(Hc, g), atol=1e-5)
        # the result: that step, unless it too leaves the convex region (then the flagged plain fit)
        dominated = bool(meta[i]["flags"] & F.MODEL_NOISE_DOMINATED)
        np.testing.assert_allclose(model._scale(got[i:i + 1])[0], x if dominated else x1, atol=1e-5)


def test_a_model_without_theta_covariance_warns_that_its_uncertainties_exclude_the_model_noise(truth):
    labels, flux, ivar = truth.sample(80)
    model = CannonModel(labels, flux, ivar, truth.vectorizer)
    model.train(theta_covariance=False)
    assert any(w.startswith("no theta covariance kept") and "80 training stars for 10 terms" in w
               for w in model.metadata["warnings"])
    model.train()  # "auto" keeps it at this size: the warning goes
    assert model.theta_cov is not None
    assert not any(w.startswith("no theta covariance kept") for w in model.metadata["warnings"])
