"""The separable theta covariance (astra_cannon.model_noise) against the exact one, and the
test step's use of it against the same covariance given pixel by pixel."""

import numpy as np
import pytest

from astra_cannon import CannonModel, engines
from astra_cannon import flags as F
from astra_cannon.engines import label_spectra, train_pixels, unpack_symmetric
from astra_cannon.model import ModelFileError
from astra_cannon.model_noise import SeparableCovariance, separable_theta_covariance


def _design(truth, labels):
    return truth.vectorizer.get_label_vector((labels - truth.fiducials) / truth.scales).T


def _exact_by_pixel(A, ivar, s2, censored=None):
    """``(A^T W_p A)^-1`` pixel by pixel, zero on censored terms."""
    out = []
    for p in range(ivar.shape[1]):
        w = ivar[:, p] / (1.0 + ivar[:, p] * s2[p])
        free = np.ones(A.shape[1], dtype=bool) if censored is None else ~censored[p]
        C = np.zeros((A.shape[1],) * 2)
        Af = A[:, free]
        C[np.ix_(free, free)] = np.linalg.inv((Af * w[:, None]).T @ Af)
        out.append(C)
    return np.array(out)


def _relative_error(sep, exact):
    got = np.array([sep.matrix(p) for p in range(len(exact))])
    return np.linalg.norm(got - exact, axis=(1, 2)) / np.linalg.norm(exact, axis=(1, 2))


def test_separable_covariance_is_exact_for_separable_weights(truth):
    """ivar = (S/N of the star)^2 x (throughput of the pixel), fixed s2 = 0: W_p = a_p b exactly."""
    rng = np.random.default_rng(3)
    labels = truth.labels(200)
    A = _design(truth, labels)
    P = 60
    ivar = rng.uniform(50, 200, (200, 1)) ** 2 * rng.uniform(0.5, 1.5, (1, P))
    sep = separable_theta_covariance(A, ivar, np.zeros(P))
    assert sep.shared.shape == (1, A.shape[1] * (A.shape[1] + 1) // 2)
    assert np.max(_relative_error(sep, _exact_by_pixel(A, ivar, np.zeros(P)))) < 1e-10


def test_separable_covariance_is_close_to_the_exact_one_for_survey_like_weights(truth):
    """Bad pixels (3 %) and intrinsic scatter in 20 % of the pixels make the weights not quite
    separable: the form stays within 15 % (Frobenius) of the exact covariance."""
    labels, flux, ivar = truth.sample(300)
    A = _design(truth, labels)
    theta, s2, info = train_pixels(A, flux, ivar, theta_covariance="separable")
    sep = info["theta_cov"]
    assert isinstance(sep, SeparableCovariance) and info["theta_covariance"] == "separable"
    exact = _exact_by_pixel(A, ivar, s2)
    err = _relative_error(sep, exact)
    assert np.median(err) < 0.08 and np.max(err) < 0.15, (np.median(err), np.max(err))
    # training's exact form (at the weights of its last solve, just before s2's last update)
    _, _, info_exact = train_pixels(A, flux, ivar, theta_covariance="exact")
    trained = unpack_symmetric(info_exact["theta_cov"].astype(float), A.shape[1])
    assert np.max(np.linalg.norm(trained - exact, axis=(1, 2)) / np.linalg.norm(exact, axis=(1, 2))) < 0.01
    assert np.max(_relative_error(sep, trained)) < 0.15


def test_censored_terms_have_no_noise_in_the_separable_covariance(truth):
    """One shared inverse per censoring pattern, on its free terms only (exact here: separable
    weights)."""
    rng = np.random.default_rng(4)
    labels = truth.labels(150)
    A = _design(truth, labels)
    P, K = 40, A.shape[1]
    ivar = rng.uniform(50, 200, (150, 1)) ** 2 * np.ones((1, P))
    censored = np.zeros((P, K), dtype=bool)
    censored[:15, 1] = True          # one label's linear term off in some pixels
    censored[30:, [2, 5]] = True     # another pattern
    sep = separable_theta_covariance(A, ivar, np.zeros(P), censored)
    assert sep.shared.shape[0] == 3
    assert np.max(_relative_error(sep, _exact_by_pixel(A, ivar, np.zeros(P), censored))) < 1e-10
    assert np.all(sep.matrix(0)[1] == 0) and np.all(sep.matrix(35)[:, 5] == 0)


def test_dead_pixels_get_no_covariance(truth):
    labels, flux, ivar = truth.sample(100)
    A = _design(truth, labels)
    s2 = np.full(ivar.shape[1], 1e-4)
    s2[[3, 7]] = np.inf
    sep = separable_theta_covariance(A, ivar, s2)
    assert np.all(sep.pixel_weights[[3, 7]] == 0) and np.all(sep.pixel_weights[[0, 1, 2]] > 0)


def test_separable_covariance_rejects_mismatched_parts():
    with pytest.raises(ValueError, match="separable covariance"):
        SeparableCovariance(np.ones((5, 2)), np.ones((1, 6)))
    with pytest.raises(ValueError, match="separable covariance"):
        SeparableCovariance(np.ones((5, 1)), np.ones((1, 7)))  # 7 is no K (K + 1) / 2
    with pytest.raises(ValueError, match="finite"):
        SeparableCovariance(np.full((5, 1), np.nan), np.ones((1, 6)))


def test_weighted_sum_is_the_sum_over_pixels_of_the_weighted_covariances():
    rng = np.random.default_rng(5)
    U = rng.random((30, 2))
    C = rng.normal(size=(2, 10))
    sep = SeparableCovariance(U, C)
    w = rng.random((4, 30))
    expected = np.einsum("sp,pk->sk", w, np.array([U[p] @ C for p in range(30)]))
    np.testing.assert_allclose(sep.weighted_sum(w), expected, rtol=1e-12)
    np.testing.assert_allclose(sep.packed([2, 5]), U[[2, 5]] @ C, rtol=1e-12)


@pytest.fixture(scope="module")
def quartic_separable():
    """A 35-term model (3 labels, order 4; the polynomial path) with the separable covariance."""
    from fixtures_numerics import TruthModel

    t = TruthModel(n_pixels=400, seed=21, order=4)
    labels, flux, ivar = t.sample(400)
    model = CannonModel(labels, flux, ivar, t.vectorizer)
    model.train(theta_covariance="separable")
    return model, t


@pytest.mark.parametrize("path", ["polynomial", "k_by_k"])
def test_the_test_step_reads_the_separable_form_as_the_same_covariance_given_per_pixel(quartic_separable, path):
    """(w @ U) @ C and the shared matrices' products give the fit that the same covariance,
    written out pixel by pixel, gives on the general path."""
    from astra_cannon.engines import _pairs_table

    model, t = quartic_separable
    _, flux, ivar = t.sample(30)
    args = (model.theta, model.s2, model.vectorizer, model.fiducials, model.scales, flux, ivar,
            model.default_starts())
    kw = {} if path == "polynomial" else dict(theta_pairs=_pairs_table(model.theta, np.float64))
    sep = label_spectra(*args, theta_cov=model.theta_cov, **kw)
    packed = label_spectra(*args, theta_cov=model.theta_cov.packed().astype(np.float32), **kw)
    sigma = np.sqrt(np.diagonal(packed["cov"], axis1=1, axis2=2))
    np.testing.assert_allclose((sep["labels"] - packed["labels"]) / sigma, 0, atol=1e-4)
    np.testing.assert_allclose(np.sqrt(np.diagonal(sep["cov"], axis1=1, axis2=2)), sigma, rtol=1e-4)
    np.testing.assert_array_equal(sep["flags"], packed["flags"])
    plain = label_spectra(*args, **kw)
    assert np.max(np.abs(sep["labels"] - plain["labels"]) / sigma) > 0.1  # the correction ran


def test_separable_model_noise_gives_unit_pulls(quartic_separable):
    """400 training stars for 35 terms: without the correction the pulls are 2-3.5."""
    model, t = quartic_separable
    labels, flux, ivar = t.sample(200)
    out = model.test_arrays(flux, ivar)
    assert not np.any(out["flags"] & F.FAILURE_FLAGS)
    pulls = ((out["labels"] - labels) / np.sqrt(np.diagonal(out["cov"], axis1=1, axis2=2))).std(axis=0)
    assert np.all(np.abs(pulls - 1) < 0.1), pulls


def test_auto_keeps_the_separable_form_where_the_exact_one_is_too_large(truth, monkeypatch):
    labels, flux, ivar = truth.sample(120)
    model = CannonModel(labels, flux, ivar, truth.vectorizer)
    model.train()
    assert isinstance(model.theta_cov, np.ndarray) and model.metadata["training"]["theta_covariance"] == "exact"
    monkeypatch.setattr(engines, "_PAIRS_CACHE_BYTES", 1000)
    model.train()
    assert isinstance(model.theta_cov, SeparableCovariance)
    assert model.metadata["training"]["theta_covariance"] == "separable"
    assert not any(w.startswith("no theta covariance kept") for w in model.metadata["warnings"])
    model.train(theta_covariance="none")
    assert model.theta_cov is None and model.metadata["training"]["theta_covariance"] == "none"
    with pytest.raises(ValueError, match="theta_covariance"):
        model.train(theta_covariance="sometimes")


def test_a_separable_covariance_round_trips_through_the_model_file(quartic_separable, tmp_path):
    model, t = quartic_separable
    path = model.write(tmp_path / "m.npz")
    back = CannonModel.read(path)
    assert back.theta_cov == model.theta_cov
    _, flux, ivar = t.sample(5)
    np.testing.assert_array_equal(back.test_arrays(flux, ivar)["labels"], model.test_arrays(flux, ivar)["labels"])


def test_a_damaged_separable_covariance_in_a_model_file_is_refused(quartic_separable, tmp_path):
    import json

    model, _ = quartic_separable
    path = model.write(tmp_path / "m.npz")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(arrays["header"].tobytes().decode())
    arrays["theta_cov_pixel_weights"] = arrays["theta_cov_pixel_weights"][:-1]  # one pixel short
    header["checksums"].pop("theta_cov_pixel_weights")
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ModelFileError, match="separable theta covariance"):
        CannonModel.read(tmp_path / "bad.npz")


def test_training_measures_the_separable_error_and_warns_where_the_weights_are_far_from_separable(truth):
    labels, flux, ivar = truth.sample(300)
    model = CannonModel(labels, flux, ivar, truth.vectorizer)
    model.train(theta_covariance="separable")
    check = model.metadata["training"]["separable_error"]
    assert check["n_pixels"] >= 32 and check["max"] < 0.15
    assert not any(w.startswith("separable theta covariance off") for w in model.metadata["warnings"])
    # The hotter half of the stars masked in ten pixels: those pixels' weights are far from
    # the stars' common profile.
    hot = labels[:, 0] > np.median(labels[:, 0])
    ivar = ivar.copy()
    ivar[np.ix_(hot, np.arange(10))] = 0.0
    model = CannonModel(labels, flux, ivar, truth.vectorizer)
    model.train(theta_covariance="separable")
    check = model.metadata["training"]["separable_error"]
    assert check["max"] > 0.3 and check["worst_pixel"] < 10
    p = check["worst_pixel"]
    exact = _exact_by_pixel(model.design_matrix[:, :], ivar[:, [p]], model.s2[[p]])[0]
    got = model.theta_cov.matrix(p)
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) == pytest.approx(check["max"], rel=1e-6)
    assert any(w.startswith("separable theta covariance off") and f"pixel {p}" in w
               for w in model.metadata["warnings"])
    model.train()  # "auto" keeps the exact one at this size: the warning goes
    assert not any(w.startswith("separable theta covariance off") for w in model.metadata["warnings"])
