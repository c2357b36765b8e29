"""Diagnostic figures: one-to-one label comparisons, model coefficients, spectrum residuals.

Matplotlib is optional (``pip install 'astra_cannon[plot]'``) and imported only when a figure
is drawn. Figures are rendered with the Agg canvas directly (no pyplot, no global backend
switch), so they work on headless machines and inside worker processes. Every function writes
a PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["one_to_one", "theta_and_scatter", "spectrum_residuals", "label_axis_name"]

_LABEL_TEX = {
    "TEFF": (r"$T_{\rm eff}$", "K"),
    "LOGG": (r"$\log g$", "dex"),
    "FE_H": ("[Fe/H]", "dex"),
    "M_H": ("[M/H]", "dex"),
    "ALPHA_FE": (r"[$\alpha$/Fe]", "dex"),
    "ALPHA_M": (r"[$\alpha$/M]", "dex"),
    "VSINI": (r"$v\sin i$", "km s$^{-1}$"),
    "VMIC": (r"$v_{\rm mic}$", "km s$^{-1}$"),
    "VMAC": (r"$v_{\rm mac}$", "km s$^{-1}$"),
}

_DPI = 150
_DATA_COLOR = "0.15"
_MODEL_COLOR = "#d62728"
_POINT_COLOR = "#1f4e9c"
_SIGMA_COLOR = "#2a9df4"


def _figure(figsize):
    """A matplotlib Figure on an Agg canvas, or a clear ImportError."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "astra_cannon.plot needs matplotlib; install it with "
            "`pip install 'astra_cannon[plot]'` (the `plot` extra)") from exc
    fig = Figure(figsize=figsize, dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI, facecolor="white")
    return path


def label_axis_name(name: str, with_unit: bool = True) -> str:
    """A typeset axis name for a label, e.g. ``"TEFF"`` -> ``"$T_{\\rm eff}$ [K]"``.

    Unknown ``X_H`` / ``X_FE`` abundances become ``[X/H]`` / ``[X/Fe]`` in dex; anything else
    is returned as given.
    """
    upper = str(name).upper()
    if upper in _LABEL_TEX:
        text, unit = _LABEL_TEX[upper]
    elif upper.endswith("_H") or upper.endswith("_FE"):
        element, ref = upper.rsplit("_", 1)
        text, unit = f"[{element.capitalize()}/{ref.capitalize()}]", "dex"
    else:
        return str(name)
    return f"{text} [{unit}]" if with_unit else text


def _unit(name):
    return _LABEL_TEX.get(str(name).upper(), (None, "dex" if str(name).upper().endswith(("_H", "_FE")) else ""))[1]


def _segments(wavelength, factor=5.0):
    """Index ranges of contiguous pixels; a step > ``factor`` x the median step is a chip gap."""
    wavelength = np.asarray(wavelength, dtype=np.float64)
    if wavelength.size < 2:
        return [(0, wavelength.size)]
    step = np.diff(wavelength)
    breaks = np.flatnonzero(step > factor * np.median(step)) + 1
    edges = np.concatenate([[0], breaks, [wavelength.size]])
    return list(zip(edges[:-1], edges[1:]))


def _with_gaps(wavelength, *arrays, factor=5.0):
    """Insert NaN at chip gaps so that line plots are not joined across them."""
    segments = _segments(wavelength, factor)
    out = []
    for array in (wavelength, *arrays):
        array = np.asarray(array, dtype=np.float64)
        parts = []
        for a, b in segments:
            parts.append(array[a:b])
            parts.append([np.nan])
        out.append(np.concatenate(parts[:-1]))
    return out


def _robust_std(x):
    return 1.4826 * np.median(np.abs(x - np.median(x))) if x.size else np.nan


# --------------------------------------------------------------------------------------------

def one_to_one(truth, predicted, label_names, path, errors=None, title=None):
    """Predicted against true labels, one panel per label, with a residual strip underneath.

    Parameters
    ----------
    truth, predicted : array_like, shape (N, L)
        Reference and predicted labels; rows with a non-finite value in a label are left out
        of that label's panel and statistics.
    label_names : sequence of str
        L label names (``TEFF``, ``LOGG``, ``FE_H``... get typeset names and units).
    path : str or Path
        Output PNG file.
    errors : array_like, shape (N, L), optional
        1-sigma uncertainties of ``predicted``, drawn as vertical error bars.
    title : str, optional
        Figure title.

    Returns
    -------
    Path
        ``path``. Each panel is annotated with N, the bias (mean of predicted - truth), the
        standard deviation and the robust scatter (1.4826 x MAD).

    Raises
    ------
    ValueError
        If the shapes disagree.
    """
    truth = np.atleast_2d(np.asarray(truth, dtype=np.float64))
    predicted = np.atleast_2d(np.asarray(predicted, dtype=np.float64))
    label_names = list(label_names)
    if truth.shape != predicted.shape or truth.shape[1] != len(label_names):
        raise ValueError(f"truth {truth.shape}, predicted {predicted.shape} and "
                         f"{len(label_names)} label names do not agree")
    if errors is not None:
        errors = np.atleast_2d(np.asarray(errors, dtype=np.float64))
        if errors.shape != truth.shape:
            raise ValueError(f"errors {errors.shape} differ from labels {truth.shape}")

    n_labels = len(label_names)
    fig = _figure((3.5 * n_labels + 0.4, 4.6))
    grid = fig.add_gridspec(2, n_labels, height_ratios=(3, 1), hspace=0.05, wspace=0.38,
                            left=0.07 if n_labels > 2 else 0.14, right=0.98, bottom=0.14,
                            top=0.88 if title else 0.95)
    alpha = float(np.clip(30.0 / max(len(truth), 1), 0.15, 0.8))
    for j, name in enumerate(label_names):
        ok = np.isfinite(truth[:, j]) & np.isfinite(predicted[:, j])
        x, y = truth[ok, j], predicted[ok, j]
        delta = y - x
        ax = fig.add_subplot(grid[0, j])
        rax = fig.add_subplot(grid[1, j], sharex=ax)
        if errors is not None:
            e = errors[ok, j]
            ax.errorbar(x, y, yerr=np.where(np.isfinite(e), e, 0), fmt="none",
                        ecolor=_POINT_COLOR, alpha=min(alpha, 0.3), lw=0.6, zorder=1)
        ax.scatter(x, y, s=6, color=_POINT_COLOR, alpha=alpha, lw=0, zorder=2, rasterized=True)
        rax.scatter(x, delta, s=6, color=_POINT_COLOR, alpha=alpha, lw=0, rasterized=True)
        if x.size:
            lo = min(x.min(), y.min())
            hi = max(x.max(), y.max())
            pad = 0.05 * (hi - lo or 1.0)
            lim = (lo - pad, hi + pad)
            ax.plot(lim, lim, color="0.4", lw=0.8, ls="--", zorder=3)
            ax.set_xlim(lim)
            ax.set_ylim(lim)
            rlim = max(4 * _robust_std(delta), np.nanpercentile(np.abs(delta), 99), 1e-12)
            rax.set_ylim(-1.1 * rlim, 1.1 * rlim)
        rax.axhline(0, color="0.4", lw=0.8, ls="--")
        unit = _unit(name)
        bias = np.mean(delta) if delta.size else np.nan
        std = np.std(delta) if delta.size else np.nan
        fmt = "{:.0f}" if unit == "K" else "{:.3f}"
        text = (f"N = {delta.size}\n"
                f"bias = {fmt.format(bias)} {unit}\n"
                f"$\\sigma$ = {fmt.format(std)} {unit}\n"
                f"$\\sigma_{{\\rm rob}}$ = {fmt.format(_robust_std(delta))} {unit}")
        ax.text(0.04, 0.96, text, transform=ax.transAxes, va="top", ha="left", fontsize=8,
                bbox=dict(boxstyle="round,pad=0.3", fc="white", ec="0.8", alpha=0.9))
        ax.set_ylabel("Predicted " + label_axis_name(name), fontsize=9)
        rax.set_xlabel("Reference " + label_axis_name(name), fontsize=9)
        rax.set_ylabel(r"$\Delta$" + (f" [{unit}]" if unit else ""), fontsize=9)
        ax.tick_params(labelbottom=False, labelsize=8, direction="in", top=True, right=True)
        rax.tick_params(labelsize=8, direction="in", top=True, right=True)
        for a in (ax, rax):
            a.locator_params(nbins=5)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _theta_arrays(model_or_arrays, wavelength):
    """(theta (P, K), scatter (P,), term names, wavelength) from a model, dict or tuple."""
    obj = model_or_arrays
    term_names = None
    if isinstance(obj, dict):
        theta = obj.get("theta")
        if theta is None and "coeffs" in obj:
            theta = np.asarray(obj["coeffs"]).T
        s2 = obj.get("s2")
        scatter = np.sqrt(s2) if s2 is not None else obj.get("scatter")
        term_names = obj.get("term_names")
        wavelength = obj.get("wavelength", obj.get("dispersion")) if wavelength is None else wavelength
    elif isinstance(obj, (tuple, list)):
        theta, s2 = obj[0], obj[1]
        scatter = np.sqrt(s2)
    elif hasattr(obj, "coeffs"):  # BovyModel: coefficients are (K, P), scatter not squared
        theta, scatter = np.asarray(obj.coeffs).T, obj.scatter
        term_names = obj.term_names
        wavelength = obj.wavelength if wavelength is None else wavelength
    else:  # CannonModel
        if not getattr(obj, "is_trained", True) or getattr(obj, "theta", None) is None:
            raise ValueError("the model is not trained: no theta to plot")
        theta, scatter = obj.theta, np.sqrt(obj.s2)
        vec = getattr(obj, "vectorizer", None)
        term_names = getattr(vec, "human_readable_label_terms", None)
        if wavelength is None:
            wavelength = getattr(obj, "dispersion", None)
    theta = np.atleast_2d(np.asarray(theta, dtype=np.float64))
    scatter = np.asarray(scatter, dtype=np.float64)
    if scatter.shape != (theta.shape[0],):
        raise ValueError(f"theta {theta.shape} (pixels x terms) and scatter {scatter.shape} disagree")
    if term_names is None or len(term_names) != theta.shape[1]:
        term_names = ["1"] + [f"term {k}" for k in range(1, theta.shape[1])]
    term_names = [str(t) for t in term_names]
    if wavelength is None:
        wavelength = np.arange(theta.shape[0], dtype=np.float64)
        xlabel = "Pixel"
    else:
        wavelength = np.asarray(wavelength, dtype=np.float64)
        xlabel = r"Vacuum wavelength [$\rm \AA$]"
    if wavelength.shape != (theta.shape[0],):
        raise ValueError(f"wavelength {wavelength.shape} does not match {theta.shape[0]} pixels")
    return theta, scatter, term_names, wavelength, xlabel


def _term_tex(term):
    """``"TEFF^2*LOGG"`` -> typeset product of label names with powers."""
    if term.strip() in ("1", ""):
        return r"$\theta_0$ (constant)"
    parts = []
    for factor in term.split("*"):
        name, _, power = factor.strip().partition("^")
        text = label_axis_name(name, with_unit=False)
        parts.append(text + (f"$^{{{power}}}$" if power else ""))
    return r"$\theta$: " + r" $\times$ ".join(parts)


def theta_and_scatter(model_or_arrays, path, wavelength=None, terms="linear", title=None):
    """Spectral derivatives (theta) of chosen terms and the intrinsic scatter, per pixel.

    Parameters
    ----------
    model_or_arrays : CannonModel, BovyModel, dict or (theta, s2)
        A trained :class:`~astra_cannon.CannonModel` (``theta`` (P, K), ``s2``, ``dispersion``,
        term names from its vectorizer), the shipped :class:`~astra_cannon.io.example.BovyModel`,
        a dict with ``theta`` (P, K) or ``coeffs`` (K, P), ``s2`` or ``scatter``, optional
        ``term_names`` and ``wavelength``, or a ``(theta, s2)`` pair.
    path : str or Path
        Output PNG file.
    wavelength : ndarray, shape (P,), optional
        Overrides the model's wavelength; pixel index when none is known.
    terms : "linear", "all" or sequence of int or str
        Terms to draw: ``"linear"`` (default) is the constant and first-order terms.
    title : str, optional
        Figure title.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        For an untrained model, inconsistent shapes or unknown terms.
    """
    theta, scatter, term_names, wavelength, xlabel = _theta_arrays(model_or_arrays, wavelength)
    if isinstance(terms, str):
        if terms == "linear":
            chosen = [k for k, t in enumerate(term_names) if "*" not in t and "^" not in t]
        elif terms == "all":
            chosen = list(range(len(term_names)))
        else:
            raise ValueError(f"terms must be 'linear', 'all' or a list, not {terms!r}")
    else:
        chosen = []
        for t in terms:
            if isinstance(t, (int, np.integer)):
                if not 0 <= t < len(term_names):
                    raise ValueError(f"term index {t} out of range (0..{len(term_names) - 1})")
                chosen.append(int(t))
            elif t in term_names:
                chosen.append(term_names.index(t))
            else:
                raise ValueError(f"unknown term {t!r}; known: {', '.join(term_names)}")
    n = len(chosen) + 1
    fig = _figure((11, 1.55 * n + 0.9))
    grid = fig.add_gridspec(n, 1, hspace=0.08, left=0.1, right=0.98, bottom=0.6 / (1.55 * n + 0.9),
                            top=1 - (0.45 if title else 0.15) / (1.55 * n + 0.9))
    axes = []
    for row, k in enumerate(chosen):
        ax = fig.add_subplot(grid[row, 0], sharex=axes[0] if axes else None)
        x, y = _with_gaps(wavelength, theta[:, k])
        ax.plot(x, y, color=_DATA_COLOR, lw=0.5)
        if k != 0:
            ax.axhline(0, color="0.6", lw=0.6, ls=":")
        ax.set_ylabel(_term_tex(term_names[k]), fontsize=8)
        axes.append(ax)
    ax = fig.add_subplot(grid[n - 1, 0], sharex=axes[0] if axes else None)
    x, y = _with_gaps(wavelength, scatter)
    ax.plot(x, y, color=_MODEL_COLOR, lw=0.5)
    ax.set_ylabel("Scatter $s$", fontsize=8)
    ax.set_ylim(bottom=0)
    axes.append(ax)
    for a in axes:
        a.tick_params(labelsize=8, direction="in", top=True, right=True)
        a.tick_params(labelbottom=False)
        a.yaxis.set_label_coords(-0.065, 0.5)
    axes[-1].tick_params(labelbottom=True)
    axes[-1].set_xlabel(xlabel, fontsize=9)
    axes[-1].set_xlim(np.nanmin(wavelength), np.nanmax(wavelength))
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def spectrum_residuals(wavelength, flux, ivar, model_flux, path, title=None):
    """One spectrum with its model (top) and the residuals with the 1-sigma band (bottom).

    Each detector (contiguous run of pixels) gets its own column, so chip gaps are neither
    joined by lines nor waste horizontal space. Masked pixels (ivar 0 or non-finite flux) are
    not drawn.

    Parameters
    ----------
    wavelength : ndarray, shape (P,)
        Vacuum wavelength in Angstrom.
    flux, ivar, model_flux : ndarray, shape (P,)
        Observed normalised flux, its inverse variance, and the model flux.
    path : str or Path
        Output PNG file.
    title : str, optional
        Figure title (e.g. identifier and labels).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        If the arrays do not all have shape (P,).
    """
    wavelength = np.asarray(wavelength, dtype=np.float64)
    flux, ivar, model_flux = (np.asarray(a, dtype=np.float64).ravel() for a in (flux, ivar, model_flux))
    if not (flux.shape == ivar.shape == model_flux.shape == wavelength.shape):
        raise ValueError(f"wavelength {wavelength.shape}, flux {flux.shape}, ivar {ivar.shape} "
                         f"and model {model_flux.shape} must share one shape (P,)")
    good = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
    shown = np.where(good, flux, np.nan)
    sigma = np.full_like(flux, np.nan)
    sigma[good] = 1.0 / np.sqrt(ivar[good])
    resid = shown - model_flux

    segments = _segments(wavelength)
    widths = [wavelength[b - 1] - wavelength[a] for a, b in segments]
    fig = _figure((12, 5.0))
    grid = fig.add_gridspec(2, len(segments), width_ratios=widths, height_ratios=(2.6, 1),
                            hspace=0.06, wspace=0.04, left=0.07, right=0.985, bottom=0.115,
                            top=0.9 if title else 0.96)
    # Limits from the model and the bulk of the data: one cosmic-ray-like pixel must not
    # squash the whole spectrum.
    finite_model = model_flux[np.isfinite(model_flux)]
    if good.any():
        lo_hi = np.nanpercentile(shown[good], [0.1, 99.9])
        y_top = (min(lo_hi[0], finite_model.min(initial=np.inf)),
                 max(lo_hi[1], finite_model.max(initial=-np.inf)))
    else:
        y_top = (0.0, 1.2)
    span = y_top[1] - y_top[0] or 1.0
    r_lim = 4 * np.nanmedian(sigma) if good.any() else 0.1
    r_lim = max(r_lim, np.nanpercentile(np.abs(resid[good]), 99.5) if good.any() else 0.0)
    chi2 = np.sum(ivar[good] * resid[good] ** 2)
    for c, (a, b) in enumerate(segments):
        ax = fig.add_subplot(grid[0, c])
        rax = fig.add_subplot(grid[1, c], sharex=ax)
        w = wavelength[a:b]
        ax.plot(w, shown[a:b], color=_DATA_COLOR, lw=0.7, label="data")
        ax.plot(w, model_flux[a:b], color=_MODEL_COLOR, lw=0.45, alpha=0.8, label="model")
        rax.plot(w, resid[a:b], color=_DATA_COLOR, lw=0.4)
        rax.axhline(0, color=_MODEL_COLOR, lw=0.6)
        # The noise envelope goes on top of the (dense) residuals so that it stays visible.
        rax.plot(w, sigma[a:b], color=_SIGMA_COLOR, lw=0.6, label=r"$\pm1\sigma$ noise")
        rax.plot(w, -sigma[a:b], color=_SIGMA_COLOR, lw=0.6)
        ax.set_xlim(w[0], w[-1])
        ax.set_ylim(y_top[0] - 0.05 * span, y_top[1] + 0.08 * span)
        rax.set_ylim(-1.15 * r_lim, 1.15 * r_lim)
        ax.tick_params(labelbottom=False, labelsize=8, direction="in", top=True, right=True)
        rax.tick_params(labelsize=8, direction="in", top=True, right=True)
        rax.locator_params(axis="x", nbins=4)
        if c:
            ax.tick_params(labelleft=False)
            rax.tick_params(labelleft=False)
        else:
            ax.set_ylabel("Normalised flux", fontsize=9)
            rax.set_ylabel("Data $-$ model", fontsize=9)
        if c == 0:
            ax.legend(loc="lower left", fontsize=8, frameon=True, ncol=2)
            rax.legend(loc="lower left", fontsize=7, frameon=True)
    fig.supxlabel(r"Vacuum wavelength [$\rm \AA$]", fontsize=9, y=0.03)
    n_good = int(good.sum())
    # chi2 per pixel with the inverse variance given here (the fit's stored rchi2 may also
    # include the model's own variance)
    summary = f"{n_good} pixels, $\\chi^2$/pixel (this ivar) = {chi2 / max(n_good, 1):.2f}"
    fig.text(0.985, 0.965 if not title else 0.91, summary, ha="right", va="bottom", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)
