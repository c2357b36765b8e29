"""Helpers shared by bench_reference.py and bench_core.py (stdlib + numpy only)."""

import json
import os
import platform
import resource
import sys
import time

import numpy as np

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Evenly spaced pixel subset used for the regularised-training cases.
REG_N_PIXELS = 500
REG_LAMBDA = 1000.0


def reg_pixel_subset(n_pixels, n_subset=REG_N_PIXELS):
    """Deterministic, evenly spaced pixel indices (includes scatter pixels pro rata)."""
    return np.unique(np.linspace(0, n_pixels - 1, n_subset).round().astype(int))


def peak_rss_mb():
    """Peak resident set size of this process so far, in MiB (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def git_state():
    """The checkout measured: HEAD and whether the package had uncommitted changes (JSON-safe)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "astra_cannon"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"head": head, "package_modified": bool(dirty)}


def environment():
    """JSON-safe description of the machine, BLAS and library versions."""
    import scipy
    env = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    env["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info
        env["threadpools"] = [
            {k: info.get(k) for k in ("internal_api", "version", "num_threads",
                                       "threading_layer", "architecture")}
            for info in threadpool_info()
        ]
    except ImportError:
        env["threadpools"] = "threadpoolctl not installed"
    return env


def write_json(path, payload):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1, default=_json_default, allow_nan=True)
    os.replace(tmp, path)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def label_rows(case_name, recovery):
    """Flatten a metrics.label_recovery dict into table rows."""
    rows = []
    for name, e in recovery["labels"].items():
        rows.append({"case": case_name, "label": name, "bias": e["bias"], "rms": e["rms"],
                     "median_sigma": e["median_sigma"], "pull_std": e["pull_std"]})
    return rows


def repeated(fn, n, result, prefix):
    """Run ``fn`` ``n`` times under :class:`Timer`; record the best (fastest) run as
    ``{prefix}_s`` / ``_cpu_s`` and every run's wall time as ``{prefix}_s_runs``.

    On a shared 2-core virtual machine one run can be 10-50% slow for reasons outside the
    process; the best of a few runs is the repeatable figure, and both codes get the same
    treatment. Returns the last run's return value.
    """
    walls, out, best = [], None, None
    for _ in range(max(1, n)):
        with Timer() as tm:
            out = fn()
        walls.append(tm.wall)
        if best is None or tm.wall < best.wall:
            best = tm
    best.record(result, prefix)
    result[f"{prefix}_s_runs"] = walls
    return out


class Timer:
    """Context manager: wall time (perf_counter), process CPU time, and load average.

    CPU time (all threads of this process) is less sensitive than wall time to other
    processes sharing the 2 cores; the 1-minute load average says how busy the machine was.
    """

    def __enter__(self):
        self.load_before = os.getloadavg()[0]
        self._cpu0 = time.process_time()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._t0
        self.cpu = time.process_time() - self._cpu0
        self.load_after = os.getloadavg()[0]
        return False

    def record(self, result, prefix):
        result[f"{prefix}_s"] = self.wall
        result[f"{prefix}_cpu_s"] = self.cpu
        result[f"{prefix}_loadavg1_before_after"] = [self.load_before, self.load_after]
