"""The ``astra-cannon`` command: train, label, inspect and export.

Run ``astra-cannon run`` with no arguments to generate the bundled example into the work
directory (if absent), train on it and label every example spectrum through Luigi on SQLite
(or ``ASTRA_CANNON_DATABASE_URL``). ``astra-cannon --help`` and ``astra-cannon COMMAND --help``
describe every option.

Exit codes: 0 success; 2 usage or configuration error; 1 other errors; for Luigi runs the
``[retcode]`` values of the shipped ``luigi.cfg`` (30 a task failed, 35 scheduling failed,
e.g. the database was unreachable, 20 missing input, 25 not run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.parse
import warnings

__all__ = ["main", "build_parser"]

EPILOG = """\
examples:
  astra-cannon run                              # the bundled example job, end to end
  astra-cannon run --workers 2                  # two worker processes
  astra-cannon run --scheduler-url http://127.0.0.1:8082   # use a running luigid
  astra-cannon infer --training-set train.fits --spectra spectra/*.fits --labels TEFF,LOGG,FE_H
  astra-cannon infer --format apstar --spectra apStar-*.fits    # raw apStar files, example model
  astra-cannon train --label-table allStar.fits --training-spectra apStar-*.fits \
      --labels TEFF,LOGG,FE_H --cut SNR:100: --cut LOGG::3.9      # survey training set
  astra-cannon validate --folds 5                # k-fold cross-validation, one-to-one PNG
  astra-cannon choose-regularization --grid 0,10,100,1000
  astra-cannon plot model                        # theta and s2 against wavelength (PNG)
  astra-cannon plot residuals SPECTRUM_ID        # a spectrum, its model and the residuals
  astra-cannon status                           # task runs, failures and their reasons
  astra-cannon rerun-failed                     # re-fit failed spectra and failed chunks
  astra-cannon export -o results.fits           # results as a FITS table
  astra-cannon db migrate                       # create or upgrade the schema

configuration: ASTRA_CANNON_DATABASE_URL (default sqlite:///<work dir>/astra_cannon.sqlite),
ASTRA_CANNON_WORK_DIR (default ./astra_cannon_work), or the [astra_cannon] section of luigi.cfg.
"""


def _say(text, quiet=False):
    if not quiet:
        print(text, flush=True)


def _tasks_module():
    # Installed: astra_cannon.tasks. In a source checkout the same package is the top-level
    # folder tasks/ (setup.cfg maps it), so fall back to that.
    try:
        from astra_cannon import tasks
    except ImportError:
        import importlib
        import pathlib

        root = str(pathlib.Path(__file__).resolve().parent.parent)
        if root not in sys.path:
            sys.path.insert(0, root)
        tasks = importlib.import_module("tasks")
    return tasks


def _public_url(url) -> str:
    """The database URL without its password (for printing)."""
    parts = urllib.parse.urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


# --------------------------------------------------------------------------------------------
# parser


def _formats():
    from .io import FORMATS

    return FORMATS


def _job_options(parser):
    g = parser.add_argument_group("job (default: the bundled example in <work dir>/example)")
    g.add_argument("--training-set", metavar="PATH", help="training-set FITS file (example layout)")
    g.add_argument("--spectra", metavar="PATH", nargs="+", help="spectra files to label")
    g.add_argument("--format", default="example", choices=_formats(),
                   help="spectra file format (default: %(default)s)")
    g.add_argument("--labels", metavar="NAMES", help="comma-separated labels (default: all in the training set)")
    g.add_argument("--order", type=int, default=2, help="polynomial order (default: %(default)s)")
    g.add_argument("--regularization", type=float, default=0.0, help="L1 strength (default: %(default)s)")
    g.add_argument("--theta-covariance", choices=("auto", "always", "separable", "never"), default=None,
                   help="the theta covariance that corrects the labels and uncertainties for the "
                        "model's own noise: auto keeps the exact one up to 256 MB (3 labels) and the "
                        "separable one above (17 labels); always the exact one (17 labels: 0.5 GB and "
                        "~5x the training time); separable; never none (default: [astra_cannon] "
                        "theta_covariance or auto)")
    g.add_argument("--chunk-size", type=int, default=None,
                   help="spectra per task (default: [astra_cannon] chunk_size or 500)")
    g.add_argument("--code-version", default=None, help="code version (default: the package version)")
    g.add_argument("--model-dir", default=None, help="model files directory (default: <work dir>/models)")
    g.add_argument("--example-dir", default=None, help="example directory (default: <work dir>/example)")
    g.add_argument("--n-train", type=int, default=300, help="example training stars (default: %(default)s)")
    g.add_argument("--n-test", type=int, default=3000, help="example spectra (default: %(default)s)")
    g.add_argument("--n-files", type=int, default=6, help="example spectra files (default: %(default)s)")
    g.add_argument("--seed", type=int, default=2026, help="example random seed (default: %(default)s)")
    t = parser.add_argument_group("training set from survey files (instead of --training-set)")
    t.add_argument("--label-table", metavar="PATH",
                   help="label table (FITS, ECSV or CSV; -9999 etc. are missing values); needs --labels")
    t.add_argument("--training-spectra", metavar="PATH", nargs="+",
                   help="apStar/aspcapStar files of the training stars (matched by OBJID / --id-column)")
    t.add_argument("--training-format", default="auto", choices=("auto", "apstar", "aspcapstar"),
                   help="format of --training-spectra (default: %(default)s)")
    t.add_argument("--id-column", default="APOGEE_ID", help="star identifier column (default: %(default)s)")
    t.add_argument("--cut", metavar="COLUMN:MIN:MAX", action="append", default=[],
                   help="quality cut, repeatable; either bound may be empty, e.g. SNR:100: or LOGG::3.9")
    t.add_argument("--training-grid", type=int, default=7214, choices=(7214, 7514),
                   help="gap-removed grid for apStar training spectra (default: %(default)s)")


def _run_options(parser):
    g = parser.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=1, help="worker processes (default: %(default)s)")
    g.add_argument("--scheduler-url", default=None,
                   help="URL of a running luigid, e.g. http://127.0.0.1:8082 (default: local scheduler)")
    g.add_argument("--tag", default="", help="free text stored with every task run")
    g.add_argument("--log-level", default="WARNING", help="Luigi log level (default: %(default)s)")
    g.add_argument("-q", "--quiet", action="store_true", help="print only the final summary")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``astra-cannon``."""
    parser = argparse.ArgumentParser(
        prog="astra-cannon", description="The Cannon as an Astra-style Luigi/peewee pipeline.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=None,
                        help="peewee database URL (overrides ASTRA_CANNON_DATABASE_URL)")
    parser.add_argument("--work-dir", default=None, help="work directory (overrides ASTRA_CANNON_WORK_DIR)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", help="train and label (the bundled example with no arguments)",
                       description="Train a model and label all spectra through Luigi. With no job "
                                   "options, generate the bundled example (if absent) and label it.")
    _job_options(p)
    _run_options(p)
    p = sub.add_parser("infer", help="label spectra (trains first when needed)",
                       description="Label spectra chunk by chunk; already labelled chunks are skipped.")
    _job_options(p)
    _run_options(p)
    p = sub.add_parser("train", help="train the model only")
    _job_options(p)
    _run_options(p)
    p = sub.add_parser("rerun-failed", help="re-fit failed spectra and failed chunks",
                       description="Re-fit spectra whose result rows are failures (overwritten in "
                                   "place) and rerun chunks whose task failed.")
    _job_options(p)
    _run_options(p)

    p = sub.add_parser("validate", help="k-fold cross-validation of the job's model",
                       description="Cross-validate the job's model (labels, order, Lambda) on its "
                                   "training set: print per-label bias and scatter, write a one-to-one "
                                   "PNG and store a validation_run row. A repeated run prints the stored "
                                   "result.")
    _job_options(p)
    _run_options(p)
    p.add_argument("--folds", type=int, default=5, help="number of folds (default: %(default)s)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the fold assignment (default: %(default)s)")

    p = sub.add_parser("choose-regularization", help="choose the L1 strength Lambda on held-out stars",
                       description="Train one model per Lambda on part of the training set and score "
                                   "each on the held-out stars; print the table, warn when the best "
                                   "Lambda is at the edge of the grid, store a validation_run row.")
    _job_options(p)
    _run_options(p)
    p.add_argument("--grid", default="0,10,100,1000", help="comma-separated Lambda values (default: %(default)s)")
    p.add_argument("--validation-fraction", type=float, default=0.2,
                   help="fraction of stars held out (default: %(default)s)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the split (default: %(default)s)")

    p = sub.add_parser("plot", help="figures as PNG files: model coefficients, spectrum residuals")
    plotsub = p.add_subparsers(dest="plot_command", metavar="FIGURE")
    plotsub.required = True
    q = plotsub.add_parser("model", help="theta and s2 against wavelength")
    q.add_argument("--model", default=None, help="model primary key or name (default: newest)")
    q.add_argument("-o", "--output", default=None, help="PNG file (default: <model file>.theta.png)")
    q = plotsub.add_parser("residuals", help="a labelled spectrum, its model and the residuals")
    q.add_argument("spectrum", help="spectrum identifier (as in cannon_result_view.identifier)")
    q.add_argument("--model", default=None, help="model primary key or name (default: newest)")
    q.add_argument("--format", default="auto", choices=_formats(), help="file format (default: %(default)s)")
    q.add_argument("-o", "--output", default=None, help="PNG file (default: <work dir>/plots/...)")

    p = sub.add_parser("status", help="task runs, failed task runs and failed spectra")
    p.add_argument("--model", default=None, help="model primary key (default: all models)")
    p.add_argument("--limit", type=int, default=20, help="failures listed (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("export", help="write results to a FITS table")
    p.add_argument("-o", "--output", default=None, help="output file (default: <work dir>/results-<model>.fits)")
    p.add_argument("--model", default=None, help="model primary key or name (default: newest)")
    p.add_argument("--ok-only", action="store_true", help="leave out failed fits")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")

    p = sub.add_parser("db", help="database schema: migrate or status")
    dbsub = p.add_subparsers(dest="db_command", metavar="ACTION")
    dbsub.required = True
    dbsub.add_parser("migrate", help="apply pending migrations")
    dbsub.add_parser("status", help="list migrations and whether they are applied")

    sub.add_parser("flags", help="document the result flag bits")
    return parser


# --------------------------------------------------------------------------------------------
# commands


def _job(args):
    from . import config, pipeline

    options = dict(order=args.order, regularization=args.regularization,
                   chunk_size=(args.chunk_size if args.chunk_size is not None
                               else config.get("chunk_size", pipeline.DEFAULT_CHUNK_SIZE, int)),
                   model_dir=args.model_dir,
                   theta_covariance=(args.theta_covariance if args.theta_covariance is not None
                                     else config.get("theta_covariance", "auto")))
    if args.code_version:
        options["code_version"] = args.code_version
    if args.labels:
        options["label_names"] = pipeline.normalise_label_names(args.labels)
    needs_spectra = args.command not in ("train", "validate", "choose-regularization")
    training_set = args.training_set
    if args.label_table or args.training_spectra:
        training_set = _assemble_training_set(args)
    if training_set:
        if not args.spectra and needs_spectra:
            raise ValueError("--spectra is required with --training-set or --label-table")
        return pipeline.Job(training_set=training_set, spectra=tuple(args.spectra or ()),
                            format=args.format, **options)
    example = pipeline.example_job(args.example_dir, n_train=args.n_train, n_test=args.n_test,
                                   n_files=args.n_files, seed=args.seed, **options)
    if args.spectra:
        if not any(os.path.exists(p) for p in args.spectra):
            raise ValueError(f"none of the --spectra files exists ({args.spectra[0]!r}, ...); "
                             "give --training-set too to label them with your own model")
        # Your spectra, labelled with the bundled example's model (7214-pixel grid).
        example = pipeline.Job(training_set=example.training_set, spectra=tuple(args.spectra),
                               format=args.format, **dict(options, label_names=example.label_names))
    return example


def _assemble_training_set(args):
    """--label-table + --training-spectra -> an assembled training-set file (printed)."""
    from . import workflow

    if args.training_set:
        raise ValueError("give either --training-set or --label-table/--training-spectra, not both")
    if not (args.label_table and args.training_spectra):
        raise ValueError("--label-table and --training-spectra go together")
    if not args.labels:
        raise ValueError("--labels is required with --label-table (e.g. --labels TEFF,LOGG,FE_H)")
    cuts = workflow.parse_cuts(args.cut)
    show = not args.quiet and sys.stderr.isatty()
    path, ts = workflow.assemble_training_file(
        args.label_table, args.training_spectra, pipeline_labels(args.labels), format=args.training_format,
        id_column=args.id_column, cuts=cuts, n_pixels=args.training_grid, show_progress=show)
    dropped = ", ".join(f"{k} {v['count']}" for k, v in ts.dropped.items() if v["count"])
    _say(f"training set: {len(ts)} of {ts.n_input} stars kept ({dropped or 'none dropped'}) -> {path}",
         args.quiet)
    for warning in ts.warnings:
        _say(f"  warning: {warning}", args.quiet)
    return str(path)


def pipeline_labels(text):
    from . import pipeline

    return list(pipeline.normalise_label_names(text))


class _ChunkProgress:
    """A tqdm bar over InferChunk tasks, fed by Luigi events in this process (workers = 1)."""

    bar = None
    _installed = False

    @classmethod
    def install(cls, tasks):
        if cls._installed:
            return
        import luigi

        def advance(task, *args):
            if cls.bar is not None:
                cls.bar.update(1)

        tasks.InferChunk.event_handler(luigi.Event.SUCCESS)(advance)
        tasks.InferChunk.event_handler(luigi.Event.FAILURE)(advance)
        cls._installed = True


def _cmd_pipeline(args):
    from . import config, db, pipeline, store

    tasks = _tasks_module()
    t0 = time.perf_counter()
    job = _job(args)
    url = config.database_url()
    try:
        db.connect(url, migrate=True)  # schema up to date before any worker starts
    except Exception as exc:  # noqa: BLE001 - peewee/driver OperationalError and friends
        # Nothing can be scheduled without the database: the scheduling-error code, as Luigi
        # itself returns when complete() cannot reach it.
        from luigi.retcodes import retcode

        print(f"astra-cannon: cannot reach the database {_public_url(url)}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return int(retcode().scheduling_error) or 35
    db.close()
    kind = "train" if args.command == "train" else "infer"
    # A progress bar over chunks when a person watches and the chunks run in this process;
    # otherwise (quiet, a log file, worker processes) one line per chunk.
    bar_wanted = (kind == "infer" and not args.quiet and sys.stderr.isatty() and args.workers == 1)
    roots = tasks.job_tasks(job, kind=kind, rerun_failed=args.command == "rerun-failed",
                            progress=not args.quiet and not bar_wanted, tag=args.tag)
    root = roots[0]
    n_to_run = 0
    if kind == "infer":
        chunk_tasks = root.requires()
        with pipeline.connected(url):
            done = store.completed_task_ids([t.task_id for t in chunk_tasks])
        n_spectra = sum(s.size() for t in chunk_tasks for s in t._segments)
        reruns = sum(1 for t in chunk_tasks if t.rerun_failed)
        n_to_run = len(chunk_tasks) - len(done)
        _say(f"{len(job.spectra)} files, ~{n_spectra} spectra in {len(chunk_tasks)} chunks of up to "
             f"{job.chunk_size}: {len(done)} complete, {n_to_run} to run"
             + (f" ({reruns} with failed spectra to re-fit)" if reruns else ""), args.quiet)
    _say(f"database: {_public_url(url)}; workers: {args.workers}; scheduler: "
         f"{args.scheduler_url or 'local'}", args.quiet)
    from . import workflow

    if bar_wanted and n_to_run:
        _ChunkProgress.install(tasks)
        _ChunkProgress.bar = workflow.progress_bar(n_to_run, "labelling", True, unit="chunk")
    try:
        result = tasks.build(roots, workers=args.workers, scheduler_url=args.scheduler_url,
                             log_level=args.log_level)
    finally:
        if _ChunkProgress.bar is not None:
            _ChunkProgress.bar.close()
            _ChunkProgress.bar = None
    code = tasks.exit_code(result, roots)
    elapsed = time.perf_counter() - t0

    identity = root.identity()
    with pipeline.connected(url):
        row = pipeline.find_model(identity)
        report = pipeline.status_report(row.id if row is not None else None, limit=5)
    counts = next((r for r in report["results"] if row is not None and r["model_pk"] == row.id), None)
    print(f"{'done' if code == 0 else 'FAILED'} in {elapsed:.1f} s (exit code {code})")
    if code != 0:
        print(result.summary_text.strip())
        seen = set()
        for f in report["failed_task_runs"]:
            if f["task_id"] not in seen:
                seen.add(f["task_id"])
                print(f"  failed: {f['task_id']}: {f['error_type']}: {(f['error_message'] or '').strip()[:200]}")
        print("see `astra-cannon status`; fix the cause, then `astra-cannon rerun-failed` "
              "(or run again)")
    if row is not None:
        print(f"model: {row.name} (id {row.id}) at {row.path}")
        if counts:
            print(f"results: {counts['ok']} ok, {counts['failed']} failed "
                  f"(table cannon_result, view cannon_result_view) in {_public_url(url)}")
        query = pipeline.result_query(row.name, identity["label_names"])
        if url.startswith("sqlite:///"):
            print(f"read them:  sqlite3 {url[len('sqlite:///'):]} \"{query}\"")
        else:
            print(f"read them:  {query}")
        print("or export:  astra-cannon export -o results.fits")
    return code


def _cmd_validation(args):
    """``validate`` and ``choose-regularization``: one Luigi task, then the stored row."""
    from . import config, db, pipeline, workflow

    tasks = _tasks_module()
    t0 = time.perf_counter()
    job = _job(args)
    url = config.database_url()
    db.connect(url, migrate=True)
    db.close()
    if args.command == "validate":
        kind, store_kind = "validate", "cross_validation"
        roots = tasks.job_tasks(job, kind=kind, progress=not args.quiet, tag=args.tag,
                                n_folds=args.folds, seed=args.split_seed)
        what = f"{args.folds}-fold cross-validation"
    else:
        try:
            grid = [float(v) for v in args.grid.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--grid must be comma-separated numbers, got {args.grid!r}") from None
        kind, store_kind = "regularization", "regularization"
        roots = tasks.job_tasks(job, kind=kind, progress=not args.quiet, tag=args.tag, grid=grid,
                                seed=args.split_seed, validation_fraction=args.validation_fraction)
        what = f"regularisation choice over Lambda = {', '.join(f'{g:g}' for g in sorted(set(grid)))}"
    root = roots[0]
    with pipeline.connected(url):
        stored = workflow.find_validation_run(store_kind, root.parameters())
    if stored is None or not root.complete():
        _say(f"{what} on {job.training_set} (labels {', '.join(job.resolved_label_names())}, "
             f"order {job.order}); this trains several models", args.quiet)
    result = tasks.build(roots, workers=1, scheduler_url=args.scheduler_url, log_level=args.log_level)
    code = tasks.exit_code(result)
    with pipeline.connected(url):
        row = workflow.find_validation_run(store_kind, root.parameters())
        failures = pipeline.status_report(limit=5)["failed_task_runs"]
    if code != 0 or row is None:
        print(f"FAILED after {time.perf_counter() - t0:.1f} s (exit code {code or 1})")
        for f in failures:
            if f["task_id"] == root.task_id:
                print(f"  {f['error_type']}: {(f['error_message'] or '').strip()[:300]}")
                break
        return code or 1
    text = (workflow.format_cross_validation(row) if store_kind == "cross_validation"
            else workflow.format_regularization(row))
    print(text)
    if row.get("at_grid_edge"):
        print("astra-cannon: warning: the best Lambda is at the edge of the grid; extend the grid",
              file=sys.stderr)
    print(f"stored as validation_run {row['id']} in {_public_url(url)} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _cmd_plot(args):
    from . import export, pipeline, workflow

    with pipeline.connected(migrate=True):
        model = export._model_row(args.model)
        if args.plot_command == "model":
            path = workflow.plot_model(model, args.output)
        else:
            path = workflow.plot_residuals(model, args.spectrum, args.output, format=args.format)
    print(f"wrote {path}")
    return 0


def _cmd_status(args):
    from . import pipeline

    with pipeline.connected(migrate=True):
        report = pipeline.status_report(int(args.model) if args.model else None, limit=args.limit)
    if args.json:
        print(json.dumps(report, default=str, indent=2))
    else:
        print(pipeline.format_status(report))
    return 0


def _cmd_export(args):
    from . import config, export, pipeline

    with pipeline.connected(migrate=True):
        model = export._model_row(args.model)
        output = args.output or str(config.work_dir() / f"results-{model.name}.fits")
        info = export.export_results(output, model=model, include_failed=not args.ok_only,
                                     overwrite=args.overwrite)
    print(f"wrote {info['n_rows']} rows ({info['n_failed']} failed) of model {info['model_name']} "
          f"to {info['path']}")
    return 0


def _cmd_db(args):
    from . import config, db

    database = db.connect(config.database_url(), migrate=False)
    try:
        if args.db_command == "migrate":
            applied = db.migrate(database)
            print("applied: " + ", ".join(applied) if applied else "schema is up to date")
        else:
            for name, applied in db.migration_status(database):
                print(f"{'applied' if applied else 'pending'}  {name}")
    finally:
        db.close()
    return 0


def _cmd_flags(args):
    from . import flags

    print(flags.documentation())
    return 0


COMMANDS = {"run": _cmd_pipeline, "infer": _cmd_pipeline, "train": _cmd_pipeline,
            "rerun-failed": _cmd_pipeline, "validate": _cmd_validation,
            "choose-regularization": _cmd_validation, "plot": _cmd_plot,
            "status": _cmd_status, "export": _cmd_export,
            "db": _cmd_db, "flags": _cmd_flags}


def main(argv=None) -> int:
    """Entry point of ``astra-cannon``; returns the exit code.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``).
    """
    # Luigi warns on import that a default will change (autoload_range); it concerns Luigi's
    # own range tools, which astra-cannon does not use, so keep operators' output clean.
    warnings.filterwarnings("ignore", message=r"\s*Autoloading range tasks", category=DeprecationWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    # Environment, so that Luigi worker processes and the config module see the same values.
    if args.database_url:
        os.environ["ASTRA_CANNON_DATABASE_URL"] = args.database_url
    if args.work_dir:
        os.environ["ASTRA_CANNON_WORK_DIR"] = os.path.abspath(args.work_dir)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileExistsError, LookupError) as exc:
        print(f"astra-cannon: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `astra-cannon status | head`
        return 0
    except KeyboardInterrupt:
        print("astra-cannon: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line, non-zero exit
        print(f"astra-cannon: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
