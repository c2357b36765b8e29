"""Scale benchmark: label a survey-sized synthetic set through Luigi and the database.

    python benchmarks/scale_pipeline.py                          # 100,000 spectra, SQLite, 1 worker
    python benchmarks/scale_pipeline.py -n 1000000 --workers 2
    python benchmarks/scale_pipeline.py --start-postgres --workers 2      # throwaway PostgreSQL
    python benchmarks/scale_pipeline.py --database-url postgresql://user@host/db \\
        --scheduler-url http://luigid-host:8082 --workers 2     # one machine of a cluster

What runs: a training set in the example layout (``generate_example``, ``--n-train`` stars)
trains a quadratic model (4 labels by default, K = 15) through ``TrainModel``; then
``InferAll`` fans out over ``InferChunk`` tasks of ``--chunk-size`` spectra. The spectra are
never stored: tiny JSON "synthetic source" files (:mod:`astra_cannon.io.synthetic`, format
``synthetic``) hold a seed, a row count and the generating model (Bovy 2015), and the reader
makes the rows when a chunk asks for them. One source file per chunk by default
(``--rows-per-file``), because ``pipeline.read_chunk`` reads a whole file per segment.

Printed (and written as JSON with ``--json PATH``): spectra per second end to end (labelling,
and including training), peak RSS of this process and of the worker processes
(``resource.getrusage`` RUSAGE_SELF / RUSAGE_CHILDREN, maxrss), database rows per second, the
number of tasks Luigi scheduled (grows with chunks, not spectra), the time split per phase
summed over chunks from ``task_run.summary`` (read+generate, fit, the rest of the chunk = DB
registration/pending query/write), Luigi overhead (wall time not spent inside chunks), and the
load average before and after (the machine may be shared).

Distributed recipe (many machines; see also benchmarks/FAULTS.md)
-----------------------------------------------------------------
1. One PostgreSQL server reachable by every machine; ``astra-cannon --database-url URL db
   migrate`` once (workers then find the schema current). SQLite is single-host only.
2. One ``luigid --port 8082 --state-path /var/lib/luigid/state.pickle`` reachable by every
   machine (its ``[scheduler]`` settings: retry_delay, retry_count, record_task_history=false).
3. The same code version, model directory and spectra paths on every machine (a shared file
   system, or the same relative layout; the training set's sha256, not its path, is the
   model's identity). Train once first (``astra-cannon train ...``) so machines do not race
   to train the same model (harmless but wasteful: the model is registered idempotently).
4. On each machine: ``ASTRA_CANNON_DATABASE_URL=URL astra-cannon infer --training-set T
   --spectra S... --scheduler-url http://luigid:8082 --workers N`` (N = cores). luigid hands
   each chunk to exactly one worker; completed chunks are skipped by every machine (one bulk
   query); a machine that dies leaves its chunk unmarked and luigid re-assigns it after the
   worker's heartbeat times out; a rerun of anything writes one row per (model, spectrum).
5. ``astra-cannon status`` from anywhere; ``astra-cannon rerun-failed`` after fixing causes.
Tested: tests/test_luigid.py (luigid on loopback, 2 workers, both backends) and
tests/test_faults_*.py (kill -9, concurrent runs, database loss).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _tasks():
    try:
        from astra_cannon import tasks
    except ImportError:  # source checkout
        import tasks
    return tasks


def write_sources(directory, n_spectra, rows_per_file, seed=1):
    """Write ``ceil(n / rows_per_file)`` synthetic source files; return their paths."""
    from astra_cannon.io.synthetic import write_synthetic_source

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, first in enumerate(range(0, n_spectra, rows_per_file)):
        path = directory / f"synthetic-{k:06d}.json"
        write_synthetic_source(path, count=min(rows_per_file, n_spectra - first), seed=seed, first_row=first)
        paths.append(str(path))
    return paths


class ThrowawayPostgres:
    """A PostgreSQL cluster in a temporary directory, Unix socket only (Debian binaries)."""

    def __init__(self):
        import glob

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            raise RuntimeError("no /usr/lib/postgresql/*/bin/initdb: install Debian's postgresql")
        self.bin = os.path.dirname(bins[-1])
        self.tmp = tempfile.mkdtemp(prefix="astra_cannon_scale_pg_")
        self.as_postgres = os.geteuid() == 0
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]

    def _run(self, *cmd):
        cmd = list(cmd)
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> str:
        if self.as_postgres:
            shutil.chown(self.tmp, user="postgres")
        data = os.path.join(self.tmp, "data")
        self._run(f"{self.bin}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
        # Durable settings left at their defaults except fsync-related ones the test fixture
        # also relaxes; the figures are for a scratch server, not a tuned production one.
        self._run(f"{self.bin}/pg_ctl", "-D", data, "-l", os.path.join(self.tmp, "log"), "-w", "-o",
                  f"-k {self.tmp} -c listen_addresses='' -p {self.port} -c max_connections=100 "
                  "-c synchronous_commit=off", "start")
        return f"postgresql://postgres@/postgres?host={urllib.parse.quote(self.tmp)}&port={self.port}"

    def stop(self):
        try:
            self._run(f"{self.bin}/pg_ctl", "-D", os.path.join(self.tmp, "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _maxrss_mb(who):
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: kilobytes


def _chunk_phases():
    """Sum of per-chunk times from task_run.summary of the InferChunk runs that completed."""
    from astra_cannon.models import TaskRun

    totals = {"t_read": 0.0, "t_fit": 0.0, "t_total": 0.0, "n_fitted": 0, "n_failed": 0, "chunks": 0}
    query = TaskRun.select(TaskRun.summary, TaskRun.elapsed).where(
        (TaskRun.task_family == "astra_cannon.InferChunk") & (TaskRun.status == "done"))
    for summary, elapsed in query.tuples():
        summary = summary or {}
        totals["chunks"] += 1
        totals["t_total"] += elapsed or 0.0  # begin_task_run .. write_chunk's commit
        for key in ("t_read", "t_fit", "n_fitted", "n_failed"):
            totals[key] += summary.get(key) or 0
    return totals


def run(args) -> dict:
    from astra_cannon import db, pipeline
    from astra_cannon.io.example import generate_example
    from astra_cannon.models import CannonResult

    tasks = _tasks()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="astra_cannon_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["ASTRA_CANNON_WORK_DIR"] = str(work)
    url = args.database_url or f"sqlite:///{work / 'scale.sqlite'}"
    os.environ["ASTRA_CANNON_DATABASE_URL"] = url
    load_before = os.getloadavg()

    train_dir = work / "training"
    if not (train_dir / "manifest.json").exists():
        generate_example(train_dir, n_train=args.n_train, n_test=1, n_files=1, seed=args.seed,
                         bad_spectra=())
    rows_per_file = args.rows_per_file or args.chunk_size
    t0 = time.perf_counter()
    sources = write_sources(work / "sources", args.n_spectra, rows_per_file, seed=args.seed)
    t_sources = time.perf_counter() - t0
    job = pipeline.Job(training_set=str(train_dir / "training_set.fits"), spectra=tuple(sources),
                       format="synthetic", chunk_size=args.chunk_size,
                       label_names=tuple(args.labels.split(",")) if args.labels else None,
                       order=args.order)
    db.connect(url, migrate=True)
    db.close()

    t0 = time.perf_counter()
    result = tasks.build(tasks.job_tasks(job, kind="train"), workers=1, scheduler_url=args.scheduler_url)
    t_train = time.perf_counter() - t0
    if tasks.exit_code(result) != 0:
        raise SystemExit(f"training failed:\n{result.summary_text}")

    roots = tasks.job_tasks(job, kind="infer", progress=args.progress)
    t0 = time.perf_counter()
    n_chunks = len(roots[0].requires())
    t_plan = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = tasks.build(roots, workers=args.workers, scheduler_url=args.scheduler_url)
    t_infer = time.perf_counter() - t0
    code = tasks.exit_code(result)
    scheduled = re.search(r"Scheduled (\d+) tasks", result.summary_text or "")

    with pipeline.connected(url):
        n_rows = CannonResult.select().count()
        n_failed = CannonResult.select().where(CannonResult.status == "failed").count()
        phases = _chunk_phases()
    in_chunks = phases["t_total"]
    out = {
        "n_spectra": args.n_spectra, "chunk_size": args.chunk_size, "rows_per_file": rows_per_file,
        "n_chunks": n_chunks, "workers": args.workers, "labels": list(job.resolved_label_names()),
        "order": args.order, "n_train": args.n_train,
        "backend": "postgresql" if url.startswith("postgres") else "sqlite",
        "scheduler": args.scheduler_url or "local", "exit_code": code,
        "luigi_scheduled_tasks": int(scheduled.group(1)) if scheduled else None,
        "t_sources": t_sources, "t_train": t_train, "t_plan": t_plan, "t_infer": t_infer,
        "spectra_per_s": args.n_spectra / t_infer,
        "spectra_per_s_incl_training": args.n_spectra / (t_infer + t_train),
        "rows": n_rows, "rows_failed": n_failed, "db_rows_per_s": n_rows / t_infer,
        "sum_chunk_read_s": phases["t_read"], "sum_chunk_fit_s": phases["t_fit"],
        "sum_chunk_db_and_other_s": in_chunks - phases["t_read"] - phases["t_fit"],
        "sum_chunk_total_s": in_chunks,
        "luigi_overhead_s": t_infer - in_chunks / max(1, args.workers),
        "peak_rss_self_mb": _maxrss_mb(resource.RUSAGE_SELF),
        "peak_rss_children_mb": _maxrss_mb(resource.RUSAGE_CHILDREN),
        "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
    }
    if not args.keep and not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return out


def report(out) -> str:
    lines = [
        f"{out['n_spectra']} spectra, {out['n_chunks']} chunks of {out['chunk_size']}, labels "
        f"{','.join(out['labels'])} (order {out['order']}), {out['backend']}, {out['workers']} worker(s), "
        f"scheduler {out['scheduler']}, exit code {out['exit_code']}",
        f"  labelling: {out['t_infer']:.1f} s -> {out['spectra_per_s']:.0f} spectra/s end to end "
        f"({out['spectra_per_s_incl_training']:.0f}/s including {out['t_train']:.1f} s training)",
        f"  database: {out['rows']} rows ({out['rows_failed']} failed), {out['db_rows_per_s']:.0f} rows/s",
        f"  Luigi scheduled {out['luigi_scheduled_tasks']} tasks (chunks + InferAll + TrainModel)",
        f"  summed over chunks: read/generate {out['sum_chunk_read_s']:.1f} s, fit {out['sum_chunk_fit_s']:.1f} s, "
        f"DB and rest {out['sum_chunk_db_and_other_s']:.1f} s; Luigi/scheduling overhead "
        f"{out['luigi_overhead_s']:.1f} s (planning {out['t_plan']:.2f} s)",
        f"  peak RSS: this process {out['peak_rss_self_mb']:.0f} MB, largest worker child "
        f"{out['peak_rss_children_mb']:.0f} MB",
        f"  load average before {tuple(round(x, 2) for x in out['loadavg_before'])}, after "
        f"{tuple(round(x, 2) for x in out['loadavg_after'])} on {out['cpu_count']} cores",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--n-spectra", type=int, default=100_000)
    parser.add_argument("--chunk-size", type=int, default=2000)
    parser.add_argument("--rows-per-file", type=int, default=None,
                        help="rows per synthetic source file (default: the chunk size)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--database-url", default=None, help="default: SQLite in the work dir")
    parser.add_argument("--start-postgres", action="store_true",
                        help="start a throwaway PostgreSQL (Debian binaries) for the run")
    parser.add_argument("--scheduler-url", default=None, help="luigid URL (default: local scheduler)")
    parser.add_argument("--labels", default=None, help="comma-separated (default: all 4)")
    parser.add_argument("--order", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work-dir", default=None, help="default: a temporary directory, deleted")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--json", default=None, help="append the figures as one JSON line here")
    args = parser.parse_args(argv)
    server = None
    if args.start_postgres:
        server = ThrowawayPostgres()
        args.database_url = server.start()
    try:
        out = run(args)
    finally:
        if server is not None:
            from astra_cannon import db

            db.close()
            server.stop()
    print(report(out))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(out) + "\n")
    return 0 if out["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
