"""Benchmark the reference implementation (AnniesLasso, PyPI ``annieslasso``).

Run with the separate venv, never with /work/venv::

    /work/venv-al/bin/python benchmarks/bench_reference.py            # all cases
    /work/venv-al/bin/python benchmarks/bench_reference.py --quick    # smoke run

Single process (AL's ``threads`` does not parallelise anyway); BLAS threads as
the environment provides (reported via threadpoolctl).  Writes
benchmarks/results/reference.json (after every case, so partial runs keep
what they measured).
"""

import argparse
import contextlib
import io
import logging
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import metrics  # noqa: E402
from workload import make_workload, summarize, true_flux  # noqa: E402

# --- runtime shims for AL on numpy 2 / Python 3.11 (never edit the package) ---
# annieslasso 0.2.96 already imports RankWarning from numpy.exceptions and
# Iterable from collections.abc; these keep older 0.2.9x releases importable.
if not hasattr(np, "RankWarning"):
    np.RankWarning = UserWarning
import collections  # noqa: E402
import collections.abc  # noqa: E402
if not hasattr(collections, "Iterable"):
    collections.Iterable = collections.abc.Iterable

import thecannon  # noqa: E402
from thecannon import fitting as al_fitting  # noqa: E402
from thecannon.vectorizer import PolynomialVectorizer  # noqa: E402

# AL's fit_pixel_fixed_scatter returns s2 as a 1-element array (defect #6);
# numpy >= 2.? refuses to store that in a float slot.  Unwrap it to a float.
_al_fit_pixel = al_fitting.fit_pixel_fixed_scatter


def _fit_pixel_scalar_s2(*args, **kwargs):
    theta, s2, meta = _al_fit_pixel(*args, **kwargs)
    return theta, float(np.asarray(s2).ravel()[0]), meta


al_fitting.fit_pixel_fixed_scatter = _fit_pixel_scalar_s2

logging.getLogger("thecannon").setLevel(logging.WARNING)


@contextlib.contextmanager
def _quiet():
    """Swallow AL's stdout progress bar and count the warnings it raises."""
    caught = []
    with warnings.catch_warnings(record=True) as caught, \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        yield caught


def _warning_summary(caught):
    out = {}
    for w in caught:
        key = f"{w.category.__name__}: {str(w.message)[:80]}"
        out[key] = out.get(key, 0) + 1
    return out


def _stack_cov(covs, n_labels):
    """AL returns None for a failed spectrum's covariance; make it NaN."""
    nan = np.full((n_labels, n_labels), np.nan)
    return np.array([nan if c is None else np.asarray(c, dtype=float) for c in covs])


def run_case(name, n_labels, n_train, n_test, pixels=None, regularization=None,
             do_test=True, seed=0, repeat=1):
    """Train (and test) AL on one workload; return a JSON-safe dict of figures."""
    w = make_workload(n_labels=n_labels, n_train=n_train, n_test=300, seed=seed)
    pix = np.arange(w["train_flux"].shape[1]) if pixels is None else pixels
    vec = PolynomialVectorizer(w["label_names"], 2)
    model = thecannon.CannonModel(
        w["train_labels"], w["train_flux"][:, pix], w["train_ivar"][:, pix], vec,
        regularization=regularization)
    result = {"case": name, "workload": summarize(w), "n_pixels_used": int(pix.size),
              "regularization": regularization, "n_terms": int(model.design_matrix.shape[1])}

    with _quiet() as caught:
        theta, s2, _meta = common.repeated(model.train, repeat, result, "train")
    result["train_warnings"] = _warning_summary(caught)
    if pixels is not None:
        result["train_s_extrapolated_8575px"] = result["train_s"] * 8575 / pix.size
    sub = dict(w, scatter_pixels=w["scatter_pixels"][pix])
    result["s2_recovery"] = metrics.scatter_recovery(s2, sub)
    result["theta_zero_fraction"] = float(np.mean(np.abs(theta[:, 1:]) < 1e-6))
    result["peak_rss_mb_after_train"] = common.peak_rss_mb()

    if do_test:
        flux, ivar, labels = (w["test_flux"][:n_test][:, pix], w["test_ivar"][:n_test][:, pix],
                              w["test_labels"][:n_test])
        with _quiet() as caught:
            fit, cov, meta = common.repeated(lambda: model.test(flux, ivar), repeat, result, "test")
        t_test = result["test_s"]
        result["test_warnings"] = _warning_summary(caught)
        result["n_test"] = int(n_test)
        result["test_s_per_spectrum"] = t_test / n_test
        fit = np.asarray(fit, dtype=float)
        cov_scaled = _stack_cov(cov, n_labels)
        scales = model._scales
        cov_phys = cov_scaled * scales[None, :, None] * scales[None, None, :]
        result["label_scales_al"] = scales.tolist()
        result["label_fiducials_al"] = model._fiducials.tolist()
        result["labels_cov_converted"] = metrics.label_recovery(fit, labels, cov_phys,
                                                                w["label_names"])
        result["labels_cov_as_returned_scaled"] = metrics.label_recovery(
            fit, labels, cov_scaled, w["label_names"])
        result["fail_messages"] = sorted({m.get("fail_message") for m in meta
                                          if m.get("fail_message")})
        result["model_flux_error_at_test_labels"] = metrics.model_flux_error(
            model(labels), true_flux(labels, w)[:, pix])
        result["peak_rss_mb_after_test"] = common.peak_rss_mb()
    return result


def print_case(r):
    print(f"\n=== {r['case']}  (AL, {r['n_pixels_used']} px, K={r['n_terms']}, "
          f"Lambda={r['regularization']})")
    line = f"train {r['train_s']:.2f} s (cpu {r['train_cpu_s']:.2f} s, load {[round(v, 1) for v in r['train_loadavg1_before_after']]})"
    if "train_s_extrapolated_8575px" in r:
        line += f" (extrapolated to 8575 px: {r['train_s_extrapolated_8575px']:.1f} s)"
    if "test_s_per_spectrum" in r:
        line += (f"; test {r['test_s_per_spectrum'] * 1e3:.1f} ms/spectrum over {r['n_test']}"
                 f" (cpu {r['test_cpu_s'] / r['n_test'] * 1e3:.1f} ms)"
                 f"; failed {r['labels_cov_converted']['n_failed']}")
    print(line)
    s = r["s2_recovery"]
    print(f"median s (true 0.01) = {s['median_s_true_0.01']:.5f}; median s (true 0) = "
          f"{s['median_s_true_0']:.2e}; theta |c|<1e-6 fraction = {r['theta_zero_fraction']:.3f}")
    if "labels_cov_converted" in r:
        rows = common.label_rows("AL", r["labels_cov_converted"])
        raw = r["labels_cov_as_returned_scaled"]["labels"]
        for row in rows:
            row["pull_std_unconverted"] = raw[row["label"]]["pull_std"]
        print(metrics.fmt_table(rows, ["label", "bias", "rms", "median_sigma", "pull_std",
                                       "pull_std_unconverted"]))
        print(f"model flux error at test labels: {r['model_flux_error_at_test_labels']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["3x1000", "17x1000", "3x1000_reg"],
                   help="any of 3x1000 17x1000 3x1000_reg 3x2000 17x2000")
    p.add_argument("--n-test-3", type=int, default=300)
    p.add_argument("--n-test-17", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="tiny smoke run, no JSON")
    p.add_argument("--repeat", type=int, default=1,
                   help="time training and the test step this many times; the best run counts")
    p.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "reference.json"))
    args = p.parse_args(argv)

    payload = {"implementation": f"annieslasso {thecannon.__version__} (module thecannon)",
               "environment": common.environment(),
               "shims": ["fit_pixel_fixed_scatter wrapped to return float s2 (defect #6)",
                         "np.RankWarning / collections.Iterable aliased if missing"],
               "cases": {}}
    print(f"{payload['implementation']}; numpy {np.__version__}; "
          f"threadpools: {payload['environment']['threadpools']}")

    if args.quick:
        r = run_case("quick", 3, 200, 10, pixels=common.reg_pixel_subset(8575, 300))
        print_case(r)
        return

    for case in args.cases:
        n_labels, rest = case.split("x")
        n_labels = int(n_labels)
        n_train = int(rest.split("_")[0])
        n_test = args.n_test_3 if n_labels == 3 else args.n_test_17
        if case.endswith("_reg"):
            pix = common.reg_pixel_subset(8575)
            for lam in (None, common.REG_LAMBDA):
                key = f"{n_labels}x{n_train}_{common.REG_N_PIXELS}px_lambda{lam or 0:g}"
                r = run_case(key, n_labels, n_train, n_test, pixels=pix,
                             regularization=lam, do_test=False, repeat=args.repeat)
                payload["cases"][key] = r
                print_case(r)
                common.write_json(args.out, payload)
        else:
            r = run_case(case, n_labels, n_train, n_test, repeat=args.repeat)
            payload["cases"][case] = r
            print_case(r)
            common.write_json(args.out, payload)
        sys.stdout.flush()
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
