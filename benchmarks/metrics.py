"""Accuracy figures shared by both benchmark sides (numpy only, JSON-safe output)."""

import numpy as np

__all__ = ["label_recovery", "scatter_recovery", "model_flux_error", "fmt_table"]


def label_recovery(fit_labels, true_labels, cov, label_names):
    """Bias, rms, and pull statistics per label.

    Parameters
    ----------
    fit_labels, true_labels : ndarray, shape (S, L), physical units
    cov : ndarray, shape (S, L, L), physical units (or None)
    label_names : list of str

    Returns
    -------
    dict
        ``n_failed`` and, per label, ``bias``, ``rms``, ``std``, ``pull_std``,
        ``pull_mean`` and ``median_sigma`` (NaN when cov is None).
    """
    fit = np.asarray(fit_labels, dtype=float)
    ok = np.all(np.isfinite(fit), axis=1)
    diff = fit[ok] - np.asarray(true_labels, dtype=float)[ok]
    out = {"n_ok": int(ok.sum()), "n_failed": int((~ok).sum()), "labels": {}}
    sigma = None
    if cov is not None:
        diag = np.diagonal(np.asarray(cov, dtype=float)[ok], axis1=1, axis2=2)
        with np.errstate(invalid="ignore"):
            sigma = np.sqrt(np.where(diag >= 0, diag, np.nan))
    for k, name in enumerate(label_names):
        d = diff[:, k]
        entry = {"bias": float(np.mean(d)), "rms": float(np.sqrt(np.mean(d ** 2))),
                 "std": float(np.std(d)), "pull_std": float("nan"),
                 "pull_mean": float("nan"), "median_sigma": float("nan")}
        if sigma is not None:
            s = sigma[:, k]
            good = np.isfinite(s) & (s > 0)
            if good.any():
                pull = d[good] / s[good]
                entry.update(pull_std=float(np.std(pull)), pull_mean=float(np.mean(pull)),
                             median_sigma=float(np.median(s[good])))
        out["labels"][name] = entry
    return out


def scatter_recovery(s2, workload):
    """Median recovered s in pixels with true s = 0.01 and with true s = 0."""
    s2 = np.asarray(s2, dtype=float)
    with np.errstate(invalid="ignore"):
        s = np.sqrt(s2)
    mask = workload["scatter_pixels"][: s.size]
    finite = np.isfinite(s)
    return {
        "median_s_true_0.01": float(np.median(s[mask & finite])),
        "p16_p84_s_true_0.01": [float(v) for v in np.percentile(s[mask & finite], [16, 84])],
        "median_s_true_0": float(np.median(s[~mask & finite])),
        "frac_zero_s_true_0": float(np.mean(s[~mask & finite] == 0)),
        "n_nonfinite_s2": int((~finite).sum()),
    }


def model_flux_error(model_flux, true_flux):
    """rms and max |model - truth| of noise-free fluxes at the same labels."""
    d = np.asarray(model_flux, dtype=float) - np.asarray(true_flux, dtype=float)
    return {"rms": float(np.sqrt(np.nanmean(d ** 2))), "max_abs": float(np.nanmax(np.abs(d)))}


def fmt_table(rows, columns):
    """Plain-text table: ``rows`` is a list of dicts, ``columns`` a list of keys."""
    cells = [[str(c) for c in columns]]
    for row in rows:
        cells.append([_fmt(row.get(c, "")) for c in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v):
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)
