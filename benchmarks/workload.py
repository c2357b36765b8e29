"""Deterministic, APOGEE-sized synthetic workload for benchmarking The Cannon.

Everything is generated in memory from a seed (no files), so the reference
benchmark (AnniesLasso, run in its own venv) and our own benchmark see
bit-identical inputs.  The module imports numpy only.

The "truth" is an exactly quadratic model in scaled labels
``x = (label - fiducials) / scales``::

    flux = theta @ [1, x_0, ..., x_{L-1}, x_i * x_j (i <= j)]

so a quadratic Cannon can represent it exactly and every error measured
against the truth comes from noise, scatter, bad pixels and the optimisers.
Because any affine re-scaling of a quadratic is still a quadratic, the
fiducials/scales a Cannon implementation picks do not matter.

Term order of ``true_theta`` (shape (P, K)): the constant, the L linear terms
in label order, then the products ``x_i * x_j`` for ``i <= j`` in
lexicographic order (see ``term_names``).  This is NOT necessarily the order
used by any Cannon vectorizer; compare model fluxes, not coefficients.
"""

import numpy as np

__all__ = ["BASE_LABELS", "ABUNDANCE_LABELS", "make_workload", "true_flux",
           "quadratic_design"]

BASE_LABELS = ("TEFF", "LOGG", "FE_H")
ABUNDANCE_LABELS = ("C_FE", "N_FE", "O_FE", "NA_FE", "MG_FE", "AL_FE", "SI_FE",
                    "S_FE", "K_FE", "CA_FE", "TI_FE", "V_FE", "MN_FE", "NI_FE")
_ALPHA = ("O_FE", "MG_FE", "SI_FE", "S_FE", "CA_FE", "TI_FE")

# Scaling of the truth model: centre and half-width of the label domain, so
# that x lies in [-1, 1] for every label the generator can produce.
_TRUTH_FIDUCIAL = {"TEFF": 4500.0, "LOGG": 2.0, "FE_H": -0.55}
_TRUTH_SCALE = {"TEFF": 700.0, "LOGG": 1.5, "FE_H": 0.95}
_ABUND_FIDUCIAL, _ABUND_SCALE = 0.0, 0.3

# Fractions of the pixel budget.
_SCATTER_PIXEL_FRACTION = 0.20   # pixels with intrinsic scatter s = 0.01
_TRUE_SCATTER = 0.01
_BAD_PIXEL_FRACTION = 0.025      # per-star random bad pixels (ivar = 0)
_ELEMENT_PIXEL_FRACTION = 0.03   # pixels each abundance affects


def quadratic_design(scaled_labels):
    """Quadratic design matrix in the term order of ``true_theta``.

    Parameters
    ----------
    scaled_labels : ndarray, shape (N, L)

    Returns
    -------
    ndarray, shape (N, K) with K = 1 + L + L (L + 1) / 2
    """
    x = np.atleast_2d(np.asarray(scaled_labels, dtype=float))
    n, n_labels = x.shape
    i, j = np.triu_indices(n_labels)
    return np.hstack([np.ones((n, 1)), x, x[:, i] * x[:, j]])


def _term_names(label_names):
    i, j = np.triu_indices(len(label_names))
    quad = [f"{label_names[a]}^2" if a == b else f"{label_names[a]}*{label_names[b]}"
            for a, b in zip(i, j)]
    return ["1", *label_names, *quad]


def true_flux(labels, workload):
    """Noise-free truth flux at physical ``labels`` (N, L) -> (N, P)."""
    x = (np.atleast_2d(labels) - workload["fiducials"]) / workload["scales"]
    return quadratic_design(x) @ workload["true_theta"].T


def _draw_labels(rng, n, label_names):
    """Giant-branch labels with realistic correlations, physical units."""
    teff = rng.uniform(3800.0, 5200.0, n)
    # Red giant branch: logg rises with Teff; metal-poor giants are hotter at
    # fixed logg, so shift logg up a little at low [Fe/H].
    fe_h = np.clip(rng.normal(-0.25, 0.3, n) - 0.25 * rng.exponential(0.5, n), -1.5, 0.4)
    logg = 1.0 + 0.00175 * (teff - 4000.0) - 0.35 * fe_h + rng.normal(0, 0.4, n)
    logg = np.clip(logg, 0.5, 3.5)
    columns = {"TEFF": teff, "LOGG": logg, "FE_H": fe_h}

    abundances = [name for name in label_names if name not in columns]
    if abundances:
        m = len(abundances)
        # Shared "alpha" factor plus a weaker common factor -> correlated X_FE.
        corr = np.full((m, m), 0.15) + 0.85 * np.eye(m)
        alpha_idx = [k for k, a in enumerate(abundances) if a in _ALPHA]
        for a in alpha_idx:
            for b in alpha_idx:
                if a != b:
                    corr[a, b] = 0.6
        draws = rng.multivariate_normal(np.zeros(m), corr, size=n) * 0.08
        for k, name in enumerate(abundances):
            value = draws[:, k]
            if name in _ALPHA:
                # alpha-enhancement of the metal-poor (thick disc / halo) stars
                value = value + np.clip(-0.3 * fe_h, 0.0, 0.3) - 0.05
            columns[name] = np.clip(value, -0.3, 0.3)
    return np.column_stack([columns[name] for name in label_names])


def _draw_theta(rng, label_names, n_pixels):
    """Truth coefficients with realistic line depths and sparse abundance terms."""
    n_labels = len(label_names)
    is_line = rng.random(n_pixels) < 0.55
    depth = np.where(is_line,
                     np.minimum(0.03 + rng.exponential(0.09, n_pixels), 0.30),
                     rng.uniform(0.0, 0.02, n_pixels))
    i_q, j_q = np.triu_indices(n_labels)
    n_terms = 1 + n_labels + len(i_q)
    theta = np.zeros((n_pixels, n_terms))
    # Tiny continuum-placement offsets, so some fluxes sit slightly above 1.
    theta[:, 0] = 1.0 - depth + rng.uniform(-0.003, 0.008, n_pixels)

    lin = np.zeros((n_pixels, n_labels))
    # Lines weaken with Teff for most species (flux up), strengthen for a few.
    teff_sign = np.where(rng.random(n_pixels) < 0.85, 1.0, -1.0)
    lin[:, 0] = teff_sign * rng.uniform(0.10, 0.28, n_pixels) * depth
    lin[:, 1] = rng.normal(0.0, 0.06, n_pixels) * depth
    lin[:, 2] = -rng.uniform(0.08, 0.20, n_pixels) * depth

    affected = np.zeros((n_pixels, n_labels), dtype=bool)
    line_pixels = np.flatnonzero(depth > 0.05)
    n_affected = int(round(_ELEMENT_PIXEL_FRACTION * n_pixels))
    for k in range(3, n_labels):
        pix = rng.choice(line_pixels, size=min(n_affected, line_pixels.size), replace=False)
        lin[pix, k] = -rng.uniform(0.08, 0.25, pix.size) * depth[pix]
        affected[pix, k] = True
    theta[:, 1:1 + n_labels] = lin

    # Quadratic terms: curvature among Teff/logg/[Fe/H] everywhere, and an
    # abundance's own curvature and cross-term with Teff where it acts.
    quad = np.zeros((n_pixels, len(i_q)))
    for q, (a, b) in enumerate(zip(i_q, j_q)):
        if a < 3 and b < 3:
            quad[:, q] = rng.normal(0.0, 0.03, n_pixels) * depth
        elif a == 0 and b >= 3:
            quad[:, q] = np.where(affected[:, b], rng.normal(0.0, 0.03, n_pixels) * depth, 0.0)
        elif a == b:
            quad[:, q] = np.where(affected[:, a], -rng.uniform(0.0, 0.04, n_pixels) * depth, 0.0)
    theta[:, 1 + n_labels:] = quad
    return theta, depth


def _observe(rng, labels, workload):
    """Noisy fluxes, ivars and S/N for the given physical labels."""
    n = labels.shape[0]
    n_pixels = workload["true_theta"].shape[0]
    flux = true_flux(labels, workload)
    snr = rng.uniform(50.0, 200.0, n)
    sigma = workload["pixel_noise_shape"][None, :] / snr[:, None]
    s = np.sqrt(workload["true_s2"])[None, :]
    flux = flux + rng.standard_normal((n, n_pixels)) * np.sqrt(sigma ** 2 + s ** 2)
    ivar = 1.0 / sigma ** 2
    bad = rng.random((n, n_pixels)) < _BAD_PIXEL_FRACTION
    ivar[bad] = 0.0
    flux[bad] = 1.0   # documented fill value for bad pixels
    return flux, ivar, snr


def make_workload(n_labels=3, n_train=1000, n_test=300, n_pixels=8575, seed=0):
    """Generate a deterministic APOGEE-sized Cannon workload.

    Parameters
    ----------
    n_labels : {3, 17}
        3 = TEFF, LOGG, FE_H; 17 adds 14 abundances X_FE.
    n_train, n_test : int
        Number of training and test stars.
    n_pixels : int
        Number of pixels (APOGEE: 8575).
    seed : int
        Seed; the truth model depends only on (seed, n_labels, n_pixels), the
        training set only on (seed, n_labels, n_train) and so on, so changing
        ``n_test`` does not change the training set.

    Returns
    -------
    dict
        ``label_names`` (list), ``train_labels`` (n_train, L), ``train_flux``,
        ``train_ivar`` (n_train, P), ``train_snr`` (n_train,), ``test_labels``,
        ``test_flux``, ``test_ivar``, ``test_snr``, ``true_theta`` (P, K),
        ``true_s2`` (P,), ``scatter_pixels`` (P,) bool, ``line_depth`` (P,),
        ``fiducials``, ``scales`` (L,) of the truth model, ``term_names``,
        ``pixel_noise_shape`` (P,), ``seed``.  Bad pixels have ivar 0, flux 1.

    Raises
    ------
    ValueError
        If ``n_labels`` is not 3 or 17, or a size is not positive.
    """
    if n_labels not in (3, 17):
        raise ValueError(f"n_labels must be 3 or 17, not {n_labels!r}")
    if min(n_train, n_test, n_pixels) < 1:
        raise ValueError("n_train, n_test and n_pixels must be positive")
    label_names = list(BASE_LABELS) + (list(ABUNDANCE_LABELS) if n_labels == 17 else [])

    model_rng = np.random.default_rng([seed, 0, n_labels, n_pixels])
    theta, depth = _draw_theta(model_rng, label_names, n_pixels)
    scatter_pixels = np.zeros(n_pixels, dtype=bool)
    scatter_pixels[model_rng.choice(n_pixels, int(round(_SCATTER_PIXEL_FRACTION * n_pixels)),
                                    replace=False)] = True
    # Smooth throughput pattern: noise per pixel varies by ~x0.8..1.5.
    grid = np.linspace(0.0, 1.0, n_pixels)
    noise_shape = 1.1 + 0.25 * np.sin(2 * np.pi * (3 * grid + model_rng.random())) \
        + 0.1 * np.cos(2 * np.pi * 11 * grid)

    workload = {
        "label_names": label_names,
        "fiducials": np.array([_TRUTH_FIDUCIAL.get(n, _ABUND_FIDUCIAL) for n in label_names]),
        "scales": np.array([_TRUTH_SCALE.get(n, _ABUND_SCALE) for n in label_names]),
        "true_theta": theta,
        "true_s2": np.where(scatter_pixels, _TRUE_SCATTER ** 2, 0.0),
        "scatter_pixels": scatter_pixels,
        "line_depth": depth,
        "term_names": _term_names(label_names),
        "pixel_noise_shape": noise_shape,
        "seed": seed,
    }

    train_rng = np.random.default_rng([seed, 1, n_labels, n_pixels, n_train])
    test_rng = np.random.default_rng([seed, 2, n_labels, n_pixels, n_test])
    for name, rng, n in (("train", train_rng, n_train), ("test", test_rng, n_test)):
        labels = _draw_labels(rng, n, label_names)
        flux, ivar, snr = _observe(rng, labels, workload)
        workload[f"{name}_labels"] = labels
        workload[f"{name}_flux"] = flux
        workload[f"{name}_ivar"] = ivar
        workload[f"{name}_snr"] = snr
    return workload


def summarize(workload):
    """Short dict of workload statistics (JSON-safe) for benchmark reports."""
    f, iv = workload["train_flux"], workload["train_ivar"]
    good = iv > 0
    return {
        "n_labels": len(workload["label_names"]),
        "n_train": int(f.shape[0]),
        "n_test": int(workload["test_flux"].shape[0]),
        "n_pixels": int(f.shape[1]),
        "seed": int(workload["seed"]),
        "flux_p01_p99_good": [float(np.percentile(f[good], 1)), float(np.percentile(f[good], 99))],
        "bad_pixel_fraction": float(1.0 - good.mean()),
        "scatter_pixel_fraction": float(workload["scatter_pixels"].mean()),
        "snr_range": [float(workload["train_snr"].min()), float(workload["train_snr"].max())],
    }


if __name__ == "__main__":  # quick look: python benchmarks/workload.py
    import json
    for L in (3, 17):
        w = make_workload(n_labels=L, n_train=200, n_test=20)
        print(json.dumps(summarize(w)))
        print("  label min", np.round(w["train_labels"].min(0), 2))
        print("  label max", np.round(w["train_labels"].max(0), 2))
        tf = true_flux(w["train_labels"], w)
        print("  true flux range", float(tf.min()), float(tf.max()))
