"""Luigi tasks of astra_cannon: train a model, label spectra chunk by chunk.

``TrainModel``   one per model identity (training-set sha256, sorted labels, order,
                 regularisation, code version); writes the model file and registers it.
``InferChunk``   one per chunk of spectra; reads, fits and writes the chunk's rows together
                 with its completion marker in one transaction.
``InferAll``     a ``WrapperTask`` over every chunk, with one bulk completion query.

The tasks are thin: the work is in :mod:`astra_cannon.pipeline`. Completion is answered by the
database (``task_run`` rows with ``status = 'done'``); database errors propagate from
``complete()`` so Luigi marks the task UNKNOWN instead of recomputing everything. Each task
opens and closes its own connection (no connection survives a fork into a worker).

Only what changes the answer is significant: the model identity, the chunk's content
(``chunk_key``), the input format, the code version and the rerun token. Paths, workers,
progress and free-text tags are not.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading

import luigi

from astra_cannon import __version__, config, pipeline, store

__all__ = ["TrainingSetFile", "TrainModel", "InferChunk", "InferAll", "LabelNamesParameter",
           "clear_completion_cache"]

NAMESPACE = "astra_cannon"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TOKEN = re.compile(r"^[0-9a-f]{0,64}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")

# Task ids known to be complete, per database URL, for the duration of one build (runner.build
# and runner.job_tasks clear it: a URL may name a re-created database in a long-lived process).
# Only "done" is cached: completion is monotonic, so a cached True cannot hide work; the cache
# lets InferAll answer for all its chunks with one bulk query instead of one query per chunk.
_known_complete: dict = {}
_cache_lock = threading.Lock()


def clear_completion_cache() -> None:
    """Forget cached completion answers (e.g. after deleting rows by hand)."""
    with _cache_lock:
        _known_complete.clear()


def _cached_done(task_id) -> bool:
    return task_id in _known_complete.get(config.database_url(), ())


def _remember_done(task_ids) -> None:
    with _cache_lock:
        _known_complete.setdefault(config.database_url(), set()).update(task_ids)


def task_done_in_database(task_id) -> bool:
    """``complete()`` for tasks whose marker is a done ``task_run`` row (one query, cached).

    Database errors propagate on purpose: Luigi then reports a scheduling failure instead of
    re-running everything during an outage.
    """
    if _cached_done(task_id):
        return True
    with pipeline.connected():
        done = store.task_complete(task_id)
    if done:
        _remember_done([task_id])
    return done


def _say(text) -> None:
    print(f"[astra-cannon] {text}", file=sys.stderr, flush=True)


class LabelNamesParameter(luigi.Parameter):
    """Comma-separated label names, normalised to sorted order (reordering changes nothing)."""

    def normalize(self, x):
        return ",".join(pipeline.normalise_label_names(x))


class TrainingSetFile(luigi.ExternalTask):
    """The training-set file (an external input)."""

    task_namespace = NAMESPACE
    path = luigi.Parameter(description="training-set FITS file")

    def output(self):
        return luigi.LocalTarget(self.path)


class _ModelParameters:
    """Parameters that identify a model, shared by every task of a job."""

    training_set = luigi.Parameter(significant=False, description="training-set file (its sha256 is what counts)")
    training_set_sha256 = luigi.Parameter(description="sha256 of the training-set file")
    label_names = LabelNamesParameter(description="comma-separated labels, e.g. TEFF,LOGG,FE_H")
    order = luigi.IntParameter(default=2, description="polynomial order of the label vector")
    regularization = luigi.FloatParameter(default=0.0, description="L1 regularisation strength")
    code_version = luigi.Parameter(default=__version__, description="code version; a change makes new rows")
    model_dir = luigi.Parameter(default="", significant=False, description="model file directory")
    tag = luigi.Parameter(default="", significant=False, description="free text stored with each task run")
    progress = luigi.BoolParameter(default=False, significant=False, description="print progress lines")
    theta_covariance = luigi.ChoiceParameter(
        choices=pipeline.THETA_COVARIANCE, default="auto",
        description="theta covariance for the model-noise correction: auto (exact up to 256 MB, "
                    "3 labels; separable above, 17 labels), always (exact; 17 labels: 0.5 GB, ~5x the "
                    "training time), separable, never")

    def to_str_params(self, only_significant=False, only_public=False):
        params = super().to_str_params(only_significant=only_significant, only_public=only_public)
        if only_significant and params.get("theta_covariance") == "auto":
            # Left out of the task id at its default, so that the tasks (and the work they
            # record as done) of jobs from before this parameter keep their ids.
            del params["theta_covariance"]
        return params

    def _check_model_parameters(self):
        if not _HEX64.match(self.training_set_sha256):
            raise ValueError(f"training_set_sha256 must be 64 hex digits, got {self.training_set_sha256[:80]!r}")
        if not _VERSION.match(self.code_version):
            raise ValueError(f"code_version must be letters, digits and ._+- (got {self.code_version[:80]!r})")
        if self.order < 1:
            raise ValueError(f"order must be >= 1, got {self.order}")
        if not (self.regularization >= 0 and self.regularization != float("inf")):
            raise ValueError(f"regularization must be finite and >= 0, got {self.regularization}")

    def identity(self) -> dict:
        return pipeline.model_identity(training_set_sha256=self.training_set_sha256,
                                       label_names=self.label_names.split(","), order=self.order,
                                       regularization=self.regularization, code_version=self.code_version,
                                       theta_covariance=self.theta_covariance)

    def model_path(self):
        return pipeline.model_path(self.identity(), self.model_dir or None)

    def _provenance(self) -> dict:
        # Every parameter (significant or not) as given, e.g. hostile tags stored verbatim.
        return dict(self.to_str_params(only_significant=False, only_public=True))

    def _reporter(self):
        """``report(message, percent)`` -> Luigi's status message and progress percentage.

        Both are set by the Luigi worker just before ``run()`` (``None`` when a task is run by
        hand); a scheduler that cannot be told never fails the task.
        """
        def report(message, percent):
            for setter, value in ((self.set_status_message, str(message)),
                                  (self.set_progress_percentage, int(max(0, min(100, percent))))):
                if callable(setter):
                    try:
                        setter(value)
                    except Exception:  # noqa: BLE001 - progress display only
                        pass

        return report

    def _run_recorded(self, work):
        """Run ``work(task_run)`` between begin/finish_task_run, recording any failure."""
        with pipeline.connected():
            task_run = store.begin_task_run(task_family=self.get_task_family(), task_id=self.task_id,
                                            parameters=self._provenance(), code_version=self.code_version)
            try:
                return work(task_run)
            except BaseException as exc:
                store.finish_task_run(task_run, status="failed", error=exc,
                                      traceback=pipeline.format_exception(exc))
                raise


class TrainModel(_ModelParameters, luigi.Task):
    """Train one Cannon model, write its file atomically and register it."""

    task_namespace = NAMESPACE

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_model_parameters()

    def requires(self):
        return TrainingSetFile(path=self.training_set)

    def output(self):
        return luigi.LocalTarget(str(self.model_path()))

    def complete(self):
        path = self.model_path()
        if not os.path.exists(path):
            return False
        if _cached_done(self.task_id):
            return True
        with pipeline.connected():
            row = pipeline.find_model(self.identity()) if store.task_complete(self.task_id) else None
        # A model file replaced or damaged since registration means "train again".
        done = row is not None and os.path.abspath(row.path) == os.path.abspath(path) \
            and pipeline.file_sha256(path) == row.file_checksum
        if done:
            _remember_done([self.task_id])
        return done

    def run(self):
        def work(task_run):
            if self.progress:
                _say(f"training {self.identity()['label_names']} (order {self.order}) on {self.training_set}")
            _, row, summary = pipeline.train_and_register(training_set=self.training_set,
                                                          identity=self.identity(), path=self.model_path(),
                                                          report=self._reporter())
            store.finish_task_run(task_run, status="done", summary=summary)
            if self.progress:
                _say(f"trained model {row.name} ({summary['n_stars']} stars, {summary['n_pixels']} pixels) "
                     f"in {summary['t_train']:.1f} s")
            return summary

        self._run_recorded(work)


class InferChunk(_ModelParameters, luigi.Task):
    """Label one chunk of spectra with the model of :class:`TrainModel`."""

    task_namespace = NAMESPACE
    format = luigi.ChoiceParameter(choices=pipeline.FORMATS, default="example", description="spectra file format")
    chunk_key = luigi.Parameter(description="identity of the chunk (hash of its segments)")
    segments = luigi.Parameter(significant=False, description="JSON [[path, start, stop], ...]")
    chunk_index = luigi.IntParameter(default=0, significant=False)
    n_chunks = luigi.IntParameter(default=1, significant=False)
    rerun_failed = luigi.BoolParameter(default=False, description="re-fit spectra whose result is a failure")
    rerun_token = luigi.Parameter(default="", description="identity of the failures being rerun")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_model_parameters()
        if not _TOKEN.match(self.rerun_token):
            raise ValueError(f"rerun_token must be hex, got {self.rerun_token[:80]!r}")
        self._segments = pipeline.segments_from_json(self.segments)
        if pipeline.chunk_key(self._segments, self.format) != self.chunk_key:
            raise ValueError("chunk_key does not match the segments (use pipeline.chunk_key)")

    def requires(self):
        return self.clone(TrainModel)

    def complete(self):
        return task_done_in_database(self.task_id)

    def run(self):
        label = f"chunk {self.chunk_index + 1}/{self.n_chunks}"

        def work(task_run):
            identity = self.identity()
            row = pipeline.find_model(identity)
            if row is None:
                raise LookupError(f"model {pipeline.model_name(identity)} is not registered; run TrainModel first")
            model = pipeline.load_model(row, label_names=identity["label_names"])
            progress = (lambda text: _say(f"{label}: {text}")) if self.progress else None
            report = self._reporter()
            return pipeline.infer_chunk(model=model, model_pk=row.id, segments=self._segments,
                                        format=self.format, task_run=task_run,
                                        rerun_failed=self.rerun_failed, progress=progress,
                                        report=lambda message, percent: report(f"{label}: {message}", percent))

        self._run_recorded(work)


class InferAll(_ModelParameters, luigi.WrapperTask):
    """Every chunk of a job; complete when every chunk is (one bulk query)."""

    task_namespace = NAMESPACE
    spectra = luigi.ListParameter(description="spectra files")
    format = luigi.ChoiceParameter(choices=pipeline.FORMATS, default="example")
    chunk_size = luigi.IntParameter(default=pipeline.DEFAULT_CHUNK_SIZE, description="spectra per chunk")
    rerun_failed = luigi.BoolParameter(default=False, description="re-fit failed spectra of finished chunks")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_model_parameters()
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        self._chunk_tasks = None

    def chunks(self):
        return pipeline.plan_chunks(self.spectra, self.chunk_size, self.format)

    def requires(self):
        if self._chunk_tasks is None:
            chunks = self.chunks()
            tokens = {}
            if self.rerun_failed:
                with pipeline.connected():
                    row = pipeline.find_model(self.identity())
                    tokens = pipeline.rerun_tokens(row.id, chunks) if row is not None else {}
            tasks = []
            for index, segments in enumerate(chunks):
                common = dict(chunk_key=pipeline.chunk_key(segments, self.format),
                              segments=pipeline.segments_to_json(segments), format=self.format,
                              chunk_index=index, n_chunks=len(chunks),
                              # explicit: clone() would copy InferAll's own rerun_failed
                              rerun_failed=index in tokens, rerun_token=tokens.get(index, ""))
                tasks.append(self.clone(InferChunk, **common))
            self._chunk_tasks = tasks
        return self._chunk_tasks

    def complete(self):
        tasks = self.requires()
        ids = [t.task_id for t in tasks]
        with pipeline.connected():
            done = store.completed_task_ids(ids)
        _remember_done(done)
        return len(done) == len(set(ids))


def provenance_json(task) -> str:
    """The parameters a task stores in ``task_run.parameters`` (for debugging)."""
    return json.dumps(task._provenance(), sort_keys=True)
