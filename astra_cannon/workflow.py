"""The scientist's workflow around a job: survey training sets, cross-validation, the choice of
regularisation, figures and progress bars.

Like :mod:`astra_cannon.pipeline`, this is library code behind the Luigi tasks and the CLI (no
Luigi here): the tasks ``CrossValidate`` and ``ChooseRegularization`` and the commands
``astra-cannon validate``, ``choose-regularization`` and ``plot`` call these functions, and
every database write goes through :mod:`astra_cannon.store`.

- :func:`assemble_training_file`: label table (FITS/ECSV/CSV) + survey spectra (apStar,
  aspcapStar) -> a training-set file in the example layout, continuum-normalised with the
  shipped mask, with quality cuts; dropped stars and their reasons are kept in the file's
  ``PROVENANCE`` HDU and end up in the ``TrainModel`` task-run summary.
- :func:`run_cross_validation`: k-fold CV on a job's training set; per-label bias and scatter,
  a one-to-one PNG, one ``validation_run`` row.
- :func:`run_choose_regularization`: a Lambda grid scored on held-out stars; the chosen
  Lambda, whether it is at the edge of the grid, one ``validation_run`` row.
- :func:`plot_model`, :func:`plot_residuals`: figures from the command line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from . import __version__, config, flags as F, pipeline, store

__all__ = [
    "progress_bar",
    "parse_cuts",
    "assemble_training_file",
    "write_training_file",
    "cross_validation_parameters",
    "regularization_parameters",
    "run_cross_validation",
    "run_choose_regularization",
    "find_validation_run",
    "format_cross_validation",
    "format_regularization",
    "plot_model",
    "plot_residuals",
    "validation_dir",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# progress


class _NoBar:
    """Stands in for a tqdm bar when progress is off."""

    def update(self, n=1):
        return None

    def set_description(self, text):
        return None

    def set_postfix_str(self, text):
        return None

    def close(self):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def progress_bar(total, desc, enabled=None, unit="it"):
    """A tqdm progress bar on stderr, or a no-op object.

    Parameters
    ----------
    total : int
    desc : str
    enabled : bool, optional
        Default: only when stderr is a terminal (never in logs or pipes).
    unit : str

    Returns
    -------
    tqdm.tqdm or a no-op object with ``update``, ``set_description``, ``close``.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but a progress bar is never worth a crash
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# survey training sets


def parse_cuts(items) -> dict:
    """Parse ``COLUMN:MIN:MAX`` strings (either bound may be empty) into ``{column: (min, max)}``.

    Examples: ``"SNR:100:"`` keeps S/N >= 100; ``"LOGG::3.9"`` keeps log g <= 3.9.

    Raises
    ------
    ValueError
        For anything else (the message shows the expected form).
    """
    cuts = {}
    for item in items or ():
        parts = str(item).split(":")
        if len(parts) != 3 or not parts[0].strip():
            raise ValueError(f"cut {item!r} must look like COLUMN:MIN:MAX (e.g. SNR:100: or LOGG::3.9)")
        name = parts[0].strip()
        try:
            lo = float(parts[1]) if parts[1].strip() else None
            hi = float(parts[2]) if parts[2].strip() else None
        except ValueError:
            raise ValueError(f"cut {item!r}: MIN and MAX must be numbers or empty") from None
        if lo is None and hi is None:
            raise ValueError(f"cut {item!r} has neither a minimum nor a maximum")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"cut {item!r}: minimum above maximum")
        cuts[name] = (lo, hi)
    return cuts


def _read_survey_spectra(paths, format, wavelength, batch_size=50, show_progress=None):
    """Read spectra files in batches (one progress-bar step per batch) onto one grid."""
    from .io import read_spectra
    from .io.base import Spectra

    paths = [os.fspath(p) for p in paths]
    batches = []
    with contextlib.closing(progress_bar(len(paths), "reading spectra", show_progress, unit="file")) as bar:
        for start in range(0, len(paths), batch_size):
            part = paths[start:start + batch_size]
            batches.append(read_spectra(part, format=format, wavelength=wavelength,
                                        select_model_pixels=wavelength is not None))
            if wavelength is None:
                wavelength = batches[0].wavelength
            bar.update(len(part))
    return Spectra.concatenate(batches) if len(batches) > 1 else batches[0]


def write_training_file(path, training_set, provenance) -> Path:
    """Write a :class:`~astra_cannon.training_set.TrainingSet` in the example training-set layout.

    HDUs: ``LABELS`` (APOGEE_ID and one column per label), ``FLUX``, ``IVAR``, ``WAVELENGTH``,
    and ``PROVENANCE`` (UTF-8 JSON bytes). The bytes depend only on the content (checksums
    without timestamps), so the same inputs give the same file and hence the same model
    identity. Written to a temporary file, then renamed.

    Returns
    -------
    Path
    """
    from astropy.io import fits
    from astropy.table import Table

    table = Table({"APOGEE_ID": np.array(training_set.identifiers, dtype=str)})
    for j, name in enumerate(training_set.label_names):
        table[str(name).upper()] = training_set.labels[:, j]
    labels_hdu = fits.table_to_hdu(table)
    labels_hdu.name = "LABELS"
    text = json.dumps(provenance, sort_keys=True, default=str).encode("utf-8")
    hdus = fits.HDUList([
        fits.PrimaryHDU(),
        labels_hdu,
        fits.ImageHDU(np.asarray(training_set.flux, dtype=np.float32), name="FLUX"),
        fits.ImageHDU(np.asarray(training_set.ivar, dtype=np.float32), name="IVAR"),
        fits.ImageHDU(np.asarray(training_set.wavelength, dtype=np.float64), name="WAVELENGTH"),
        fits.ImageHDU(np.frombuffer(text, dtype=np.uint8), name="PROVENANCE"),
    ])
    hdus[0].header["ORIGIN"] = ("astra_cannon", "assembled from survey files")
    hdus[0].header["TSHASH"] = training_set.hash  # order-free sha256; no room left for a comment
    for hdu in hdus:
        hdu.add_checksum(when="")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.part")
    hdus.writeto(tmp, overwrite=True)
    os.replace(tmp, path)
    return path


def assemble_training_file(label_table, spectra_paths, label_names, *, format="auto", id_column="APOGEE_ID",
                           cuts=None, missing="drop", n_pixels=7214, output_dir=None, show_progress=None):
    """Assemble a training set from a label table and survey spectra, and write it to a file.

    Parameters
    ----------
    label_table : str or Path
        FITS, ECSV or CSV table (sentinels such as -9999 are missing values).
    spectra_paths : sequence of str or Path
        apStar or aspcapStar files; stars are matched by ``OBJID`` (apStar) or file name.
    label_names : sequence of str
        Label columns (case-insensitive).
    format : {"auto", "apstar", "aspcapstar"}
    id_column : str
        Star identifier column of the table.
    cuts : dict, optional
        ``column -> (min, max)`` quality cuts (see :func:`parse_cuts`).
    missing : {"drop", "raise"}
        Stars missing a label.
    n_pixels : {7214, 7514} or None
        Put apStar spectra on this gap-removed grid (pixel selection, never resampling);
        ``None`` keeps the grid of the first readable file.
    output_dir : str or Path, optional
        Default ``<work dir>/training_sets``.
    show_progress : bool, optional
        Progress bar while reading (default: when stderr is a terminal).

    Returns
    -------
    (Path, TrainingSet)
        The file, named ``training-set-<hash12>.fits``, and the assembled set. An existing
        file with that name is reused as is (same content, same bytes).

    Raises
    ------
    ValueError, KeyError
        From :func:`astra_cannon.training_set.assemble_training_set` (no star left, a named
        column missing, ...).
    """
    from .continuum import normalise_spectra
    from .io import grid
    from .io.labels import read_label_table
    from .training_set import assemble_training_set

    label_names = [str(n).upper() for n in label_names]
    paths = sorted(os.path.abspath(os.fspath(p)) for p in spectra_paths)
    if not paths:
        raise ValueError("no training spectra files given")
    wavelength = grid.gap_removed_wavelength(n_pixels) if n_pixels and format != "aspcapstar" else None
    spectra = _read_survey_spectra(paths, format, wavelength, show_progress=show_progress)
    continuum = "as given (normalised input)" if spectra.normalised else "shipped continuum mask"
    if not spectra.normalised:
        mask = pipeline.continuum_mask_for_grid(spectra.wavelength)
        if mask is None:
            raise ValueError(f"the training spectra are not normalised and their {spectra.wavelength.size}-pixel "
                             "grid has no shipped continuum mask")
        spectra, _ = normalise_spectra(spectra, mask)
    table = read_label_table(label_table)
    ts = assemble_training_set(table, spectra, label_names, id_column=id_column, cuts=cuts, missing=missing)
    failed = [{"identifier": spectra.identifiers[i], "flags": F.decode(int(spectra.flags[i])),
               "reason": spectra.reasons[i]}
              for i in np.flatnonzero(spectra.flags & F.FAILURE_FLAGS)]
    provenance = {
        "label_table": os.path.abspath(os.fspath(label_table)),
        "label_table_sha256": pipeline.file_sha256(label_table),
        "spectra": paths,
        "format": format,
        "grid_pixels": int(spectra.wavelength.size),
        "continuum": continuum,
        "cuts": {k: list(v) for k, v in (cuts or {}).items()},
        "missing": missing,
        "id_column": id_column,
        "unreadable_spectra": failed,
        "code_version": __version__,
        **ts.provenance(),
    }
    directory = Path(output_dir) if output_dir else config.work_dir() / "training_sets"
    path = directory / f"training-set-{ts.hash[:12]}.fits"
    if not path.exists():
        write_training_file(path, ts, provenance)
    return path, ts


# --------------------------------------------------------------------------------------------
# cross-validation and regularisation


def validation_dir() -> Path:
    """Where validation figures go: ``<work dir>/validation``."""
    return config.work_dir() / "validation"


def cross_validation_parameters(identity, n_folds, seed) -> dict:
    """The parameters that define a cross-validation run (stored, and hashed into its key)."""
    return {**identity, "n_folds": int(n_folds), "seed": int(seed)}


def regularization_parameters(identity, grid, validation_fraction, seed) -> dict:
    """The parameters of a regularisation choice (the identity's own Lambda does not count)."""
    ident = {k: v for k, v in identity.items() if k != "regularization"}
    return {**ident, "grid": [float(g) for g in sorted(set(float(x) for x in grid))],
            "validation_fraction": float(validation_fraction), "seed": int(seed)}


def _training_arrays(training_set, identity):
    actual = pipeline.file_sha256(training_set)
    if actual != identity["training_set_sha256"]:
        raise ValueError(f"training set {training_set} changed: sha256 {actual[:16]}..., "
                         f"expected {identity['training_set_sha256'][:16]}...")
    return pipeline.read_training_set(training_set, identity["label_names"])


def _plot_quietly(function, *args, **kwargs):
    """Call a :mod:`astra_cannon.plot` function; ``None`` (logged) when it cannot draw."""
    try:
        import matplotlib  # noqa: F401 - optional
    except ImportError as exc:
        log.info("matplotlib is not available (%s): figure skipped", exc)
        return None
    try:
        return str(function(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - a figure never fails the computation
        log.warning("could not draw %s: %s: %s", function.__name__, type(exc).__name__, exc)
        return None


def run_cross_validation(*, training_set, identity, n_folds=5, seed=0, plot_dir=None, task_run=None,
                         report=None, plots=True):
    """K-fold cross-validation of the job's model on its training set, stored in the database.

    Parameters
    ----------
    training_set : str or Path
    identity : dict
        :func:`astra_cannon.pipeline.model_identity` (labels, order, Lambda, training-set sha256).
    n_folds : int
    seed : int
        Seed of the assignment of stars to folds.
    plot_dir : str or Path, optional
        Default :func:`validation_dir`.
    task_run : TaskRun, optional
        Marked done in the same transaction as the row.
    report : callable, optional
        ``report(message, percent)``.
    plots : bool
        Write the one-to-one PNG (skipped when matplotlib is missing).

    Returns
    -------
    (ValidationRun, dict)
        The stored row and :func:`astra_cannon.validation.cross_validate`'s result.
    """
    from . import PolynomialVectorizer
    from . import plot as _plot
    from .validation import cross_validate

    report = report or (lambda message, percent: None)
    report("reading the training set", 0)
    labels, names, flux, ivar, wavelength = _training_arrays(training_set, identity)
    vec = PolynomialVectorizer(list(names), identity["order"])
    report(f"{n_folds}-fold cross-validation on {labels.shape[0]} stars", 5)
    t0 = time.perf_counter()
    cv = cross_validate(labels, flux, ivar, vec, n_folds=int(n_folds), seed=int(seed),
                        progress=lambda done, total: report(f"fold {done}/{total} done", 5 + int(80 * done / total)),
                        regularization=identity["regularization"] or None, dispersion=wavelength,
                        theta_covariance=pipeline.training_theta_covariance(identity))
    elapsed = time.perf_counter() - t0
    params = cross_validation_parameters(identity, n_folds, seed)
    name = pipeline.model_name(identity)
    plot_paths = []
    if plots:
        report("drawing the one-to-one figure", 90)
        path = Path(plot_dir or validation_dir()) / f"{name}-cv{int(n_folds)}-seed{int(seed)}.png"
        drawn = _plot_quietly(_plot.one_to_one, cv["truth"], cv["predicted"], cv["label_names"], path,
                              errors=cv["errors"],
                              title=f"{name}: {n_folds}-fold cross-validation ({cv['n_used']} stars)")
        plot_paths = [drawn] if drawn else []
    results = {k: cv[k] for k in ("median_bias", "robust_scatter", "rms", "n_used", "n_failed", "n_folds",
                                  "t_train", "t_test")}
    results["t_total"] = elapsed
    summary = {"n_stars": int(labels.shape[0]), "n_used": cv["n_used"], "n_failed": cv["n_failed"],
               "t_total": elapsed, "plots": plot_paths}
    row = store.write_validation_run(kind="cross_validation", parameters=params,
                                     training_set_hash=identity["training_set_sha256"], label_names=names,
                                     task_run=task_run, model_name=name, n_stars=labels.shape[0],
                                     bias=cv["bias"], scatter=cv["scatter"],
                                     chosen_regularization=None, at_grid_edge=None, results=results,
                                     plot_paths=plot_paths, summary=summary)
    report("done", 100)
    return row, cv


def run_choose_regularization(*, training_set, identity, grid, validation_fraction=0.2, seed=0, task_run=None,
                              report=None):
    """Score a grid of L1 strengths on held-out stars and store the choice.

    Parameters
    ----------
    training_set : str or Path
    identity : dict
        Model identity (its own ``regularization`` is ignored).
    grid : sequence of float
        Lambda values (>= 0, at least two distinct).
    validation_fraction : float
    seed : int
    task_run : TaskRun, optional
    report : callable, optional

    Returns
    -------
    (ValidationRun, dict)
        The stored row and :func:`astra_cannon.validation.choose_regularization`'s result. A
        choice at the edge of the grid is stored with ``at_grid_edge`` true (the warning is
        kept in ``results["warning"]`` and logged, not raised).
    """
    from . import PolynomialVectorizer
    from .validation import RegularizationGridWarning, choose_regularization

    report = report or (lambda message, percent: None)
    report("reading the training set", 0)
    labels, names, flux, ivar, wavelength = _training_arrays(training_set, identity)
    vec = PolynomialVectorizer(list(names), identity["order"])
    report(f"training {len(set(map(float, grid)))} models on {labels.shape[0]} stars", 5)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RegularizationGridWarning)
        choice = choose_regularization(labels, flux, ivar, vec, grid=grid, validation_fraction=validation_fraction,
                                       progress=lambda done, total: report(f"model {done}/{total} trained",
                                                                           5 + int(80 * done / total)),
                                       seed=int(seed), dispersion=wavelength)
    for w in caught:  # re-issue anything that is not the grid-edge warning
        if not issubclass(w.category, RegularizationGridWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    edge_warning = next((str(w.message) for w in caught if issubclass(w.category, RegularizationGridWarning)), None)
    if edge_warning:
        log.warning("%s", edge_warning)
    elapsed = time.perf_counter() - t0
    params = regularization_parameters(identity, grid, validation_fraction, seed)
    results = {k: choice[k] for k in ("grid", "chi2", "r_chi2", "nll", "criterion", "best_index", "edge",
                                      "n_pixels_used", "n_train", "n_validation", "t_train")}
    results["warning"] = edge_warning
    results["t_total"] = elapsed
    summary = {"best_regularization": choice["best_regularization"], "at_grid_edge": choice["at_grid_edge"],
               "t_total": elapsed}
    row = store.write_validation_run(kind="regularization", parameters=params,
                                     training_set_hash=identity["training_set_sha256"], label_names=names,
                                     task_run=task_run, model_name=pipeline.model_name(identity),
                                     n_stars=labels.shape[0], chosen_regularization=choice["best_regularization"],
                                     at_grid_edge=choice["at_grid_edge"], results=results, summary=summary)
    report("done", 100)
    return row, choice


def find_validation_run(kind, parameters):
    """The stored ``validation_run`` row for these parameters (as a dict), or ``None``."""
    from .models import ValidationRun

    key = store.parameters_hash({"kind": kind, **dict(parameters)})
    query = ValidationRun.select().where((ValidationRun.kind == kind) & (ValidationRun.parameters_hash == key))
    return query.dicts().first()


def _fmt(value, name):
    if value is None or not np.isfinite(value):
        return "nan"
    return f"{value:.1f}" if str(name).upper() == "TEFF" else f"{value:.4f}"


def format_cross_validation(row) -> str:
    """A text table of a stored cross-validation row: per label bias, scatter, robust scatter."""
    results = row.get("results") or {}
    robust = results.get("robust_scatter") or {}
    params = row.get("parameters") or {}
    lines = [f"{params.get('n_folds')}-fold cross-validation of {row.get('model_name')} "
             f"({results.get('n_used')} of {row.get('n_stars')} stars used, {results.get('n_failed', 0)} failed fits)",
             f"{'label':<10} {'bias':>10} {'scatter':>10} {'robust':>10}"]
    for name in row.get("label_names") or []:
        lines.append(f"{name:<10} {_fmt((row.get('bias') or {}).get(name), name):>10} "
                     f"{_fmt((row.get('scatter') or {}).get(name), name):>10} {_fmt(robust.get(name), name):>10}")
    for path in row.get("plot_paths") or []:
        lines.append(f"one-to-one figure: {path}")
    return "\n".join(lines)


def format_regularization(row) -> str:
    """A text table of a stored regularisation choice (score per Lambda, the choice marked)."""
    results = row.get("results") or {}
    grid = results.get("grid") or []
    best = results.get("best_index")
    lines = [f"regularisation choice for {row.get('model_name')}: {results.get('n_train')} training, "
             f"{results.get('n_validation')} validation stars, {results.get('n_pixels_used')} pixels, "
             f"criterion {results.get('criterion')}",
             f"{'Lambda':>10} {'nll':>16} {'chi2/pixel':>12} {'t_train/s':>10}"]
    for k, lam in enumerate(grid):
        mark = "  <- best" if k == best else ""
        lines.append(f"{lam:>10g} {results['nll'][k]:>16.1f} {results['r_chi2'][k]:>12.4f} "
                     f"{results['t_train'][k]:>10.1f}{mark}")
    lines.append(f"chosen Lambda: {row.get('chosen_regularization'):g}")
    if row.get("at_grid_edge"):
        lines.append(f"WARNING: {results.get('warning') or 'the best Lambda is at the edge of the grid'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# figures from the command line


def plot_model(model_row, output=None) -> str:
    """Draw theta and s2 against wavelength for a registered model.

    Parameters
    ----------
    model_row : TrainedModel
    output : str or Path, optional
        Default: ``<model>.theta.png`` next to the model file.

    Returns
    -------
    str
        The PNG path.

    Raises
    ------
    ImportError
        Without matplotlib (the ``plot`` extra).
    """
    from . import CannonModel
    from . import plot as _plot

    model = CannonModel.read(model_row.path)
    path = output or pipeline.model_plot_path(model_row.path)
    return str(_plot.theta_and_scatter(model, path, title=model_row.name))


def _guess_format(path) -> str:
    """Reader format of a stored spectrum's file: the example layout has an ``IDS`` table."""
    from astropy.io import fits

    from .io import detect_format

    try:
        with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
            if "IDS" in hdul:
                return "example"
    except Exception:  # noqa: BLE001 - the reader reports the real problem
        pass
    return detect_format(path)


def plot_residuals(model_row, identifier, output=None, format="auto") -> str:
    """Draw a stored spectrum, its model at the stored labels and the residuals.

    The spectrum is read again from its file (as recorded in the ``spectrum`` table), put on
    the model's grid and normalised as the pipeline does.

    Parameters
    ----------
    model_row : TrainedModel
    identifier : str
        ``spectrum.identifier`` (as in ``cannon_result_view``).
    output : str or Path, optional
        Default ``<work dir>/plots/<identifier>-<model>.png``.
    format : str
        Reader format of the spectrum's file.

    Returns
    -------
    str

    Raises
    ------
    LookupError
        No such spectrum, or no successful result of this model for it.
    """
    from . import CannonModel
    from . import plot as _plot
    from .models import CannonResult, Spectrum

    spectrum = Spectrum.get_or_none(Spectrum.identifier == str(identifier))
    if spectrum is None:
        raise LookupError(f"no spectrum {identifier!r} in the database")
    result = CannonResult.get_or_none((CannonResult.model == model_row.id) & (CannonResult.spectrum == spectrum.id))
    if result is None or result.status != "ok" or not result.labels:
        raise LookupError(f"no successful result of model {model_row.name} for {identifier!r}"
                          + (f" (it failed: {result.reason})" if result is not None and result.reason else ""))
    model = CannonModel.read(model_row.path)
    fmt = _guess_format(spectrum.path) if format == "auto" else format
    spectra = pipeline.read_chunk([pipeline.Segment(spectrum.path)], fmt, model.dispersion)
    idx = [i for i, ident in enumerate(spectra.identifiers) if ident == spectrum.identifier]
    if not idx:
        raise LookupError(f"{spectrum.path} no longer holds the spectrum {identifier!r}")
    spectra = pipeline.normalise_for_model(model, pipeline._subset(spectra, idx[:1]))
    labels = np.array([[result.labels[name] for name in model.label_names]])
    model_flux = model(labels)[0]
    safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in spectrum.identifier)
    path = output or config.work_dir() / "plots" / f"{safe}-{model_row.name}.png"
    text = ", ".join(f"{n} {labels[0, j]:.0f}" if n.upper() == "TEFF" else f"{n} {labels[0, j]:.2f}"
                     for j, n in enumerate(model.label_names))
    title = f"{spectrum.identifier}: {text}" + ("" if result.rchi2 is None else f"; stored rchi2 {result.rchi2:.2f}")
    # The fit weighs each pixel by 1 / (sigma^2 + s2): show the same noise (and chi2) here.
    ivar = spectra.ivar[0]
    s2 = np.where(np.isfinite(model.s2), model.s2, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        adjusted = np.where(ivar > 0, ivar / (1.0 + ivar * s2), 0.0)
    return str(_plot.spectrum_residuals(model.dispersion, spectra.flux[0], np.nan_to_num(adjusted), model_flux,
                                        path, title=title))
