"""Diagnostic figures are written as real PNG files and refuse inconsistent input."""

import sys
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from astra_cannon import plot  # noqa: E402
from astra_cannon.data import apogee_wavelength  # noqa: E402
from astra_cannon.io.example import bovy_model  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path, min_bytes=20_000):
    data = path.read_bytes()
    return data[:8] == PNG_SIGNATURE and len(data) > min_bytes


def test_one_to_one_writes_png_with_errors_and_nan_rows(tmp_path):
    rng = np.random.default_rng(0)
    truth = np.column_stack([rng.uniform(4000, 5000, 200), rng.uniform(1, 3, 200)])
    pred = truth + rng.normal(0, [50, 0.1], truth.shape)
    pred[3] = np.nan  # a failed star is left out, not plotted as garbage
    out = plot.one_to_one(truth, pred, ["TEFF", "LOGG"], tmp_path / "sub" / "o2o.png",
                          errors=np.full(truth.shape, 0.1), title="test")
    assert out == tmp_path / "sub" / "o2o.png" and _is_png(out)


def test_one_to_one_rejects_mismatched_shapes(tmp_path):
    with pytest.raises(ValueError, match="do not agree"):
        plot.one_to_one(np.zeros((5, 2)), np.zeros((5, 3)), ["A", "B"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="errors"):
        plot.one_to_one(np.zeros((5, 2)), np.zeros((5, 2)), ["A", "B"], tmp_path / "x.png",
                        errors=np.zeros((4, 2)))


def test_theta_and_scatter_accepts_models_dicts_and_pairs(tmp_path):
    bovy = bovy_model()
    assert _is_png(plot.theta_and_scatter(bovy, tmp_path / "bovy.png", terms=[0]))
    theta = bovy.coeffs.T[:1500]
    s2 = bovy.scatter[:1500] ** 2
    as_dict = {"theta": theta, "s2": s2, "term_names": list(bovy.term_names), "wavelength": bovy.wavelength[:1500]}
    assert _is_png(plot.theta_and_scatter(as_dict, tmp_path / "dict.png", terms=["TEFF", "TEFF*LOGG"]))
    assert _is_png(plot.theta_and_scatter((theta[:300], s2[:300]), tmp_path / "pair.png", terms="all"))
    # Duck-typed CannonModel: theta (P, K), s2, dispersion, vectorizer.human_readable_label_terms.
    fake = SimpleNamespace(theta=theta, s2=s2, dispersion=bovy.wavelength[:1500], is_trained=True,
                           vectorizer=SimpleNamespace(human_readable_label_terms=list(bovy.term_names)))
    assert _is_png(plot.theta_and_scatter(fake, tmp_path / "model.png", terms=[0, "TEFF*LOGG"]))


def test_theta_and_scatter_rejects_untrained_models_and_unknown_terms(tmp_path):
    with pytest.raises(ValueError, match="not trained"):
        plot.theta_and_scatter(SimpleNamespace(theta=None, s2=None, is_trained=False), tmp_path / "x.png")
    with pytest.raises(ValueError, match="unknown term"):
        plot.theta_and_scatter(bovy_model(), tmp_path / "x.png", terms=["VSINI"])
    with pytest.raises(ValueError, match="wavelength"):
        plot.theta_and_scatter((np.ones((10, 3)), np.ones(10)), tmp_path / "x.png", wavelength=np.ones(9))


def test_spectrum_residuals_writes_png_and_skips_masked_pixels(tmp_path):
    model = bovy_model()
    wl = model.wavelength
    clean = model.flux([[4700, 2.4, -0.1, 0.05]])[0]
    rng = np.random.default_rng(2)
    flux = clean + rng.normal(0, 0.01, wl.size)
    ivar = np.full(wl.size, 1e4)
    flux[:50] = np.nan
    ivar[:50] = 0
    out = plot.spectrum_residuals(wl, flux, ivar, clean, tmp_path / "spec.png", title="star")
    assert _is_png(out)
    with pytest.raises(ValueError, match="share one shape"):
        plot.spectrum_residuals(wl, flux[:-1], ivar, clean, tmp_path / "bad.png")


def test_chip_gaps_break_lines_on_the_apogee_grid():
    wl = apogee_wavelength()
    assert plot._segments(wl) == [(0, 2920), (2920, 5320), (5320, 7214)]
    x, y = plot._with_gaps(wl, np.ones_like(wl))
    assert x.size == wl.size + 2 and np.isnan(y).sum() == 2


def test_label_axis_names_carry_units():
    assert plot.label_axis_name("TEFF") == r"$T_{\rm eff}$ [K]"
    assert plot.label_axis_name("MG_FE") == "[Mg/Fe] [dex]"
    assert plot.label_axis_name("custom") == "custom"


def test_missing_matplotlib_gives_a_clear_import_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"astra_cannon\[plot\]"):
        plot.one_to_one(np.zeros((3, 1)), np.zeros((3, 1)), ["TEFF"], tmp_path / "x.png")


def test_theta_and_scatter_draws_a_trained_cannon_model(example_dir, tmp_path):
    from astra_cannon import CannonModel, PolynomialVectorizer
    from astra_cannon.io.example import read_example_training_set

    labels, names, _, flux, ivar, wavelength = read_example_training_set(example_dir)
    pixels = slice(2800, 3400)  # spans the first chip gap
    model = CannonModel(labels, flux[:, pixels], ivar[:, pixels], PolynomialVectorizer(names, 2),
                        dispersion=wavelength[pixels])
    model.train()
    out = plot.theta_and_scatter(model, tmp_path / "trained.png", terms=["TEFF", "TEFF^2"])
    assert _is_png(out)
