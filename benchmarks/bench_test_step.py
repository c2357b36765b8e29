"""Time the batched test step (label inference) alone, with trained models cached on disk.

Run with one BLAS thread so that figures compare across a shared machine::

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. /work/venv/bin/python benchmarks/bench_test_step.py --labels 3
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. /work/venv/bin/python benchmarks/bench_test_step.py --labels 17 --n-test 100

Trained models are written once to ``--cache`` (default ``/tmp/astra_cannon_bench``) and read
back on later runs, so only the test step is timed. Prints wall and process-CPU ms per
spectrum (best of ``--repeat``) for the default path (model-noise correction on, when the
model has ``theta_cov``) and with ``model_uncertainty=False``, plus the label rms and the
pull std ``(fit - truth) / sigma`` per label. ``--save`` writes the fitted labels and
covariances to an ``.npz`` for before/after comparisons.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import metrics  # noqa: E402
from workload import make_workload  # noqa: E402

from astra_cannon import CannonModel, PolynomialVectorizer  # noqa: E402


def trained_model(w, n_labels, n_train, cache, theta_covariance):
    os.makedirs(cache, exist_ok=True)
    tag = {"exact": "cov"}.get(theta_covariance, theta_covariance)
    path = os.path.join(cache, f"model_{n_labels}x{n_train}_{tag}.npz")
    if os.path.exists(path):
        model = CannonModel.read(path)
        # models cached before training recorded the form it kept are retrained
        if "theta_covariance" in model.metadata.get("training", {}):
            return model
    model = CannonModel(w["train_labels"], w["train_flux"], w["train_ivar"],
                        PolynomialVectorizer(w["label_names"], 2))
    model.train(theta_covariance=theta_covariance)
    model.write(path)
    return CannonModel.read(path)


def time_test(model, flux, ivar, repeat, **kwargs):
    walls, cpus, result = [], [], None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        result = model.test(flux, ivar, **kwargs)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    n = len(flux)
    return result, 1e3 * min(walls) / n, 1e3 * min(cpus) / n, [1e3 * t / n for t in walls]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=int, default=3, choices=(3, 17))
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--theta-covariance", default="auto", choices=("auto", "exact", "separable", "none"),
                    help="what training keeps for the model-noise correction (auto: exact up to 256 MB, "
                         "separable above; exact at 17 labels takes 0.5 GB and ~24 s)")
    ap.add_argument("--theta-cov", action="store_true", help="same as --theta-covariance exact")
    ap.add_argument("--cache", default="/tmp/astra_cannon_bench")
    ap.add_argument("--modes", default="default,fast")
    ap.add_argument("--save", help="write labels/cov of each mode to this .npz")
    args = ap.parse_args()

    w = make_workload(n_labels=args.labels, n_train=args.n_train, n_test=max(300, args.n_test))
    model = trained_model(w, args.labels, args.n_train, args.cache,
                          "exact" if args.theta_cov else args.theta_covariance)
    flux, ivar = w["test_flux"][:args.n_test], w["test_ivar"][:args.n_test]
    truth = w["test_labels"][:args.n_test]
    model.test(flux[:8], ivar[:8])  # warm-up (threadpool controller, caches)
    report, saved = {"labels": args.labels, "n_test": args.n_test,
                     "theta_cov": model.metadata["training"]["theta_covariance"]}, {}
    for mode in args.modes.split(","):
        (labels, cov, meta), wall, cpu, walls = time_test(
            model, flux, ivar, args.repeat, model_uncertainty=(mode == "default"))
        acc = metrics.label_recovery(labels, truth, cov, list(w["label_names"]))
        rms = {k: v["rms"] for k, v in acc["labels"].items()}
        pull = {k: v["pull_std"] for k, v in acc["labels"].items()}
        report[mode] = {"wall_ms": wall, "cpu_ms": cpu, "walls": walls, "n_failed": acc["n_failed"],
                        "rms": rms, "pull_std": pull,
                        "nfev_mean": float(np.mean([m["nfev"] for m in meta]))}
        saved[f"{mode}_labels"], saved[f"{mode}_cov"] = labels, cov
        saved[f"{mode}_chi2"] = np.array([m["chi_sq"] if m["chi_sq"] is not None else np.nan for m in meta],
                                         dtype=float)
        print(f"{mode:8s} wall {wall:8.3f} ms/spectrum  cpu {cpu:8.3f} ms/spectrum  "
              f"(walls {', '.join(f'{t:.3f}' for t in walls)})  failed {acc['n_failed']}  "
              f"nfev {report[mode]['nfev_mean']:.1f}")
        names = list(w["label_names"])[:3] if args.labels == 17 else list(w["label_names"])
        print("          rms  " + "  ".join(f"{k}={rms[k]:.5g}" for k in names))
        print("          pull " + "  ".join(f"{k}={pull[k]:.4f}" for k in names))
        if args.labels == 17:
            print(f"          mean pull std over 17 labels {np.mean(list(pull.values())):.4f}; "
                  f"mean rms over X_FE {np.mean([rms[k] for k in list(rms)[3:]]):.5f}")
    if args.save:
        np.savez(args.save, **saved)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
