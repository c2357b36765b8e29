"""Fixtures: numerics. A known quadratic "truth" model and noisy spectra drawn from it."""

import numpy as np
import pytest

from astra_cannon import PolynomialVectorizer

LABEL_NAMES = ("TEFF", "LOGG", "FE_H")
FIDUCIALS = np.array([4800.0, 2.5, -0.2])
SCALES = np.array([800.0, 2.0, 1.0])


class TruthModel:
    """A quadratic model with known theta and s2, and a sampler of noisy spectra."""

    def __init__(self, n_pixels=300, seed=0, scatter_fraction=0.2, scatter=0.01, order=2):
        rng = np.random.default_rng(seed)
        self.vectorizer = PolynomialVectorizer(LABEL_NAMES, order)
        K = self.vectorizer.n_terms
        self.theta = np.zeros((n_pixels, K))
        self.theta[:, 0] = 1.0 + 0.02 * rng.normal(size=n_pixels)
        self.theta[:, 1:] = 0.03 * rng.normal(size=(n_pixels, K - 1))
        self.s = np.where(rng.random(n_pixels) < scatter_fraction, scatter, 0.0)
        self.s2 = self.s**2
        self.fiducials, self.scales = FIDUCIALS, SCALES
        self.rng = rng

    def labels(self, n):
        return self.fiducials + self.scales * 0.3 * self.rng.normal(size=(n, len(LABEL_NAMES)))

    def flux(self, labels):
        x = (labels - self.fiducials) / self.scales
        return (self.theta @ self.vectorizer.get_label_vector(x)).T

    def sample(self, n, snr=(50, 200), bad_fraction=0.03, nan_bad=True):
        """Labels, flux and ivar of ``n`` stars with S/N drawn uniformly from ``snr``."""
        labels = self.labels(n)
        P = self.theta.shape[0]
        sigma = 1.0 / self.rng.uniform(*snr, size=(n, 1)) * np.ones((n, P))
        flux = self.flux(labels) + self.s * self.rng.normal(size=(n, P)) + sigma * self.rng.normal(size=(n, P))
        ivar = 1.0 / sigma**2
        bad = self.rng.random((n, P)) < bad_fraction
        ivar[bad] = 0.0
        if nan_bad:
            flux[bad & (self.rng.random((n, P)) < 0.5)] = np.nan
        return labels, flux, ivar


@pytest.fixture
def truth():
    return TruthModel()


@pytest.fixture(scope="session")
def trained():
    """A model trained on 600 stars from a known truth, plus the truth (shared, read-only)."""
    from astra_cannon import CannonModel

    t = TruthModel(seed=11)
    labels, flux, ivar = t.sample(600)
    model = CannonModel(labels, flux, ivar, t.vectorizer)
    model.train()
    return model, t
