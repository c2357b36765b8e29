"""Benchmark our core numerics (astra_cannon.CannonModel and the per-pixel seed path).

Run with the project venv::

    PYTHONPATH=/work/main /work/venv/bin/python benchmarks/bench_core.py            # 3 and 17 labels
    PYTHONPATH=/work/main /work/venv/bin/python benchmarks/bench_core.py --quick    # smoke run
    PYTHONPATH=/work/main /work/venv/bin/python benchmarks/bench_core.py --labels 3 --n-train 2000

Uses the same deterministic workloads as bench_reference.py (benchmarks/workload.py),
prints the same figures, writes benchmarks/results/core.json and, when
benchmarks/results/reference.json exists, prints a side-by-side comparison.
"""

import argparse
import json
import os
import sys
import time
import tracemalloc
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import metrics  # noqa: E402
from workload import make_workload, summarize, true_flux  # noqa: E402

from astra_cannon import CannonModel, PolynomialVectorizer  # noqa: E402
from astra_cannon import fitting  # noqa: E402


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _traced_peak_mb(fn):
    """Peak traced Python/numpy allocation (MiB) while running ``fn`` (a second, untimed run)."""
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2 ** 20


def _flag_histogram(meta):
    hist = {}
    for m in meta:
        key = f"{m.get('status')}:{m.get('flags')}"
        hist[key] = hist.get(key, 0) + 1
    return hist


def bench_model(w, name, n_test, pixels=None, regularization=None, do_test=True,
                trace_memory=True, repeat=1):
    """Train (and test) our CannonModel; the figures bench_reference.py prints for AL."""
    pix = np.arange(w["train_flux"].shape[1]) if pixels is None else pixels
    vec = PolynomialVectorizer(w["label_names"], 2)

    def new_model():
        return CannonModel(w["train_labels"], w["train_flux"][:, pix], w["train_ivar"][:, pix],
                           vec, regularization=regularization)

    model = new_model()
    result = {"case": name, "workload": summarize(w), "n_pixels_used": int(pix.size),
              "regularization": regularization, "n_terms": int(vec.n_terms)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theta, s2, train_meta = common.repeated(model.train, repeat, result, "train")
    result["train_warnings"] = sorted({f"{c.category.__name__}: {str(c.message)[:80]}"
                                       for c in caught})
    if isinstance(train_meta, dict):
        result["train_meta"] = {k: v for k, v in train_meta.items()
                                if isinstance(v, (int, float, str, bool, type(None)))}
        result["pixels_per_iteration"] = train_meta.get("pixels_per_iteration")
    if pixels is not None:
        result["train_s_extrapolated_8575px"] = result["train_s"] * 8575 / pix.size
    result["s2_recovery"] = metrics.scatter_recovery(
        s2, dict(w, scatter_pixels=w["scatter_pixels"][pix]))
    result["theta_zero_fraction"] = float(np.mean(np.abs(np.asarray(theta)[:, 1:]) < 1e-6))
    result["peak_rss_mb_after_train"] = common.peak_rss_mb()
    if trace_memory:
        result["train_tracemalloc_peak_mb"] = _traced_peak_mb(lambda: new_model().train())

    if do_test:
        flux, ivar = w["test_flux"][:n_test][:, pix], w["test_ivar"][:n_test][:, pix]
        labels = w["test_labels"][:n_test]
        with common.Timer() as tm:
            fit, cov, meta = model.test(flux, ivar)
        tm.record(result, "test")
        result["n_test"] = int(n_test)
        result["test_s_per_spectrum"] = tm.wall / n_test
        result["test_cpu_s_per_spectrum"] = tm.cpu / n_test
        # The first call also builds the table of theta products the model then keeps (about
        # 1.5 s at 17 labels; a pipeline keeps it in a file): the steady state is the next.
        tm.record(result, "test_first_call")
        result["test_first_call_s_per_spectrum"] = result["test_s_per_spectrum"]
        common.repeated(lambda: model.test(flux, ivar), repeat, result, "test")
        result["test_s_per_spectrum"] = result["test_s"] / n_test
        result["test_cpu_s_per_spectrum"] = result["test_cpu_s"] / n_test
        result["labels_cov_converted"] = metrics.label_recovery(fit, labels, cov,
                                                                w["label_names"])
        result["test_status_flags"] = _flag_histogram(meta)
        # AL starts from the fiducials only; time ours the same way too (like for like).
        with common.Timer() as tm1:
            fit1, cov1, meta1 = model.test(flux, ivar, initial_labels=model.fiducials)
        tm1.record(result, "test_single_start")
        result["test_single_start_s_per_spectrum"] = tm1.wall / n_test
        result["test_single_start_cpu_s_per_spectrum"] = tm1.cpu / n_test
        result["labels_single_start"] = metrics.label_recovery(fit1, labels, cov1,
                                                               w["label_names"])
        result["fail_messages"] = sorted({m.get("fail_message") for m in meta
                                          if m.get("fail_message")})
        result["model_flux_error_at_test_labels"] = metrics.model_flux_error(
            model(labels), true_flux(labels, w)[:, pix])
        result["peak_rss_mb_after_test"] = common.peak_rss_mb()
        if trace_memory:
            result["test_tracemalloc_peak_mb"] = _traced_peak_mb(
                lambda: model.test(flux[:20], ivar[:20]))
    return model, result


def bench_seed_path(w, model, n_pixels=200, n_spectra=20, model_result=None):
    """Per-pixel / per-spectrum seed functions vs the batched model, same run.

    Speed-ups are given from wall time and from process CPU time (the latter is robust
    to other processes competing for the 2 cores).
    """
    P = w["train_flux"].shape[1]
    pix = common.reg_pixel_subset(P, n_pixels)
    A = model.vectorizer.get_label_vector(
        (w["train_labels"] - model.fiducials) / model.scales).T
    K = A.shape[1]
    thetas, s2s = np.empty((pix.size, K)), np.empty(pix.size)
    with common.Timer() as t_pix:
        for k, p in enumerate(pix):  # the seed path is per pixel by design
            f, iv = w["train_flux"][:, p], w["train_ivar"][:, p]
            start, _ = fitting.fit_theta_by_linalg(f, iv, 0.0, A)
            fiducial = np.hstack([1.0, np.zeros(K - 1)])
            thetas[k], s2s[k], _ = fitting.fit_pixel_fixed_scatter(
                f, iv, [(start, "linear_algebra"), (fiducial, "fiducial")], A, 0.0, None)

    flux, ivar = w["test_flux"][:n_spectra], w["test_ivar"][:n_spectra]
    seed_labels = np.empty((n_spectra, len(w["label_names"])))
    with common.Timer() as t_spec:
        for s in range(n_spectra):  # the seed path is per spectrum by design
            seed_labels[s], _, _ = fitting.fit_spectrum(
                flux[s], ivar[s], model.fiducials, model.vectorizer, model.theta, model.s2,
                model.fiducials, model.scales)
    with common.Timer() as t_batch:
        batch_labels, _, _ = model.test(flux, ivar, initial_labels=model.fiducials)
    with common.Timer() as t_default:
        model.test(flux, ivar)

    out = {
        "n_pixels": int(pix.size),
        "n_spectra": int(n_spectra),
        "seed_train_s_per_pixel": t_pix.wall / pix.size,
        "seed_train_cpu_s_per_pixel": t_pix.cpu / pix.size,
        "seed_train_s_extrapolated_all_pixels": t_pix.wall / pix.size * P,
        "seed_train_cpu_s_extrapolated_all_pixels": t_pix.cpu / pix.size * P,
        "seed_fit_spectrum_s_per_spectrum": t_spec.wall / n_spectra,
        "seed_fit_spectrum_cpu_s_per_spectrum": t_spec.cpu / n_spectra,
        "batch_test_s_per_spectrum_same_spectra": t_batch.wall / n_spectra,
        "batch_test_cpu_s_per_spectrum_same_spectra": t_batch.cpu / n_spectra,
        "batch_test_default_starts_s_per_spectrum_same_spectra": t_default.wall / n_spectra,
        "batch_test_default_starts_cpu_s_per_spectrum_same_spectra": t_default.cpu / n_spectra,
        "loadavg1": [t_pix.load_before, t_default.load_after],
        "max_abs_theta_diff_vs_model": float(np.nanmax(np.abs(thetas - model.theta[pix]))),
        "max_abs_model_flux_diff_vs_model_train_set": float(np.nanmax(np.abs(
            A @ thetas.T - A @ np.asarray(model.theta)[pix].T))),
        "median_abs_s_diff_vs_model": float(np.nanmedian(np.abs(
            np.sqrt(s2s) - np.sqrt(np.asarray(model.s2)[pix])))),
        "max_abs_label_diff_vs_model_scaled": float(np.nanmax(np.abs(
            (seed_labels - batch_labels) / model.scales))),
    }
    if model_result is not None:
        out["train_speedup_model_vs_seed"] = (out["seed_train_s_extrapolated_all_pixels"]
                                              / model_result["train_s"])
        out["train_speedup_model_vs_seed_cpu"] = (
            out["seed_train_cpu_s_extrapolated_all_pixels"] / model_result["train_cpu_s"])
    out["test_speedup_model_vs_seed"] = (out["seed_fit_spectrum_s_per_spectrum"]
                                         / out["batch_test_s_per_spectrum_same_spectra"])
    out["test_speedup_model_vs_seed_cpu"] = (out["seed_fit_spectrum_cpu_s_per_spectrum"]
                                             / out["batch_test_cpu_s_per_spectrum_same_spectra"])
    return out


def print_seed(sd):
    print(f"seed path: fit_pixel_fixed_scatter {sd['seed_train_s_per_pixel'] * 1e3:.2f} ms/pixel "
          f"(cpu {sd['seed_train_cpu_s_per_pixel'] * 1e3:.2f}) over {sd['n_pixels']} px "
          f"(-> {sd['seed_train_s_extrapolated_all_pixels']:.1f} s for all pixels); speed-up of "
          f"model.train: {sd.get('train_speedup_model_vs_seed', 0):.1f}x wall, "
          f"{sd.get('train_speedup_model_vs_seed_cpu', 0):.1f}x cpu")
    print(f"seed path: fit_spectrum {sd['seed_fit_spectrum_s_per_spectrum'] * 1e3:.2f} ms/spectrum "
          f"(cpu {sd['seed_fit_spectrum_cpu_s_per_spectrum'] * 1e3:.2f}) vs model.test (1 start) "
          f"{sd['batch_test_s_per_spectrum_same_spectra'] * 1e3:.2f} ms/spectrum (cpu "
          f"{sd['batch_test_cpu_s_per_spectrum_same_spectra'] * 1e3:.2f}) over {sd['n_spectra']}; "
          f"speed-up {sd['test_speedup_model_vs_seed']:.1f}x wall, "
          f"{sd['test_speedup_model_vs_seed_cpu']:.1f}x cpu; model.test default starts "
          f"{sd['batch_test_default_starts_s_per_spectrum_same_spectra'] * 1e3:.2f} ms/spectrum")
    print(f"agreement: max|dtheta| {sd['max_abs_theta_diff_vs_model']:.2e} (max|dflux| on the "
          f"training set {sd['max_abs_model_flux_diff_vs_model_train_set']:.2e}), median|ds| "
          f"{sd['median_abs_s_diff_vs_model']:.2e}, max|dlabel| (scaled) "
          f"{sd['max_abs_label_diff_vs_model_scaled']:.2e}")


def print_case(r, impl="ours"):
    print(f"\n=== {r['case']}  ({impl}, {r['n_pixels_used']} px, K={r['n_terms']}, "
          f"Lambda={r['regularization']})")
    line = (f"train {r['train_s']:.2f} s (cpu {r['train_cpu_s']:.2f} s, load "
            f"{[round(v, 1) for v in r['train_loadavg1_before_after']]})")
    if "train_s_extrapolated_8575px" in r:
        line += f" (extrapolated to 8575 px: {r['train_s_extrapolated_8575px']:.1f} s)"
    if "train_tracemalloc_peak_mb" in r:
        line += f", tracemalloc peak {r['train_tracemalloc_peak_mb']:.0f} MiB"
    line += f", peak RSS so far {r['peak_rss_mb_after_train']:.0f} MiB"
    print(line)
    tm = r.get("train_meta", {})
    if "solver" in tm:
        print(f"solver {tm['solver']}, pixels per alternation {r.get('pixels_per_iteration')}, "
              f"CG iterations per pixel and alternation {tm.get('cg_iterations', 0):.1f}")
    if "test_s_per_spectrum" in r:
        print(f"test {r['test_s_per_spectrum'] * 1e3:.2f} ms/spectrum (cpu "
              f"{r['test_cpu_s_per_spectrum'] * 1e3:.2f} ms) over {r['n_test']} (first call, building the "
              f"theta table: {r.get('test_first_call_s_per_spectrum', float('nan')) * 1e3:.2f} ms); "
              f"failed {r['labels_cov_converted']['n_failed']}; status:flags "
              f"{r['test_status_flags']}")
        print(f"test, one start at the fiducials (as AL): "
              f"{r['test_single_start_s_per_spectrum'] * 1e3:.2f} ms/spectrum (cpu "
              f"{r['test_single_start_cpu_s_per_spectrum'] * 1e3:.2f} ms); failed "
              f"{r['labels_single_start']['n_failed']}")
    s = r["s2_recovery"]
    print(f"median s (true 0.01) = {s['median_s_true_0.01']:.5f}; median s (true 0) = "
          f"{s['median_s_true_0']:.2e}; theta |c|<1e-6 fraction = {r['theta_zero_fraction']:.3f}")
    if "labels_cov_converted" in r:
        rows = common.label_rows(impl, r["labels_cov_converted"])
        print(metrics.fmt_table(rows, ["label", "bias", "rms", "median_sigma", "pull_std"]))
        print(f"model flux error at test labels: {r['model_flux_error_at_test_labels']}")


def print_seed(sd):
    print(f"seed path: fit_pixel_fixed_scatter {sd['seed_train_s_per_pixel'] * 1e3:.2f} ms/pixel "
          f"over {sd['n_pixels']} px (-> {sd['seed_train_s_extrapolated_all_pixels']:.1f} s for "
          f"all pixels); speed-up of model.train: {sd.get('train_speedup_model_vs_seed', 0):.1f}x")
    print(f"seed path: fit_spectrum {sd['seed_fit_spectrum_s_per_spectrum'] * 1e3:.2f} ms/spectrum "
          f"vs model.test (1 start, fiducials) {sd['batch_test_s_per_spectrum_same_spectra'] * 1e3:.2f}"
          f" ms/spectrum over {sd['n_spectra']}; speed-up {sd['test_speedup_model_vs_seed']:.1f}x"
          f" (model.test default starts: "
          f"{sd['batch_test_default_starts_s_per_spectrum_same_spectra'] * 1e3:.2f} ms/spectrum)")
    print(f"agreement: max|dtheta| {sd['max_abs_theta_diff_vs_model']:.2e}, median|ds| "
          f"{sd['median_abs_s_diff_vs_model']:.2e}, max|dlabel| (scaled) "
          f"{sd['max_abs_label_diff_vs_model_scaled']:.2e}")


def compare(core, ref_path):
    """Print ours vs AL for every case both files have."""
    if not os.path.exists(ref_path):
        print(f"\n(no {ref_path}: run bench_reference.py for a comparison)")
        return
    with open(ref_path) as fh:
        ref = json.load(fh)
    rows = []
    for key, ours in core["cases"].items():
        theirs = ref["cases"].get(key)
        if theirs is None:
            continue
        row = {"case": key, "train_s AL": theirs["train_s"], "train_s ours": ours["train_s"],
               "train x": theirs["train_s"] / ours["train_s"],
               "train cpu x": theirs["train_cpu_s"] / ours["train_cpu_s"],
               "s(0.01) AL": theirs["s2_recovery"]["median_s_true_0.01"],
               "s(0.01) ours": ours["s2_recovery"]["median_s_true_0.01"]}
        if "test_s_per_spectrum" in ours and "test_s_per_spectrum" in theirs:
            row.update({"test ms AL": theirs["test_s_per_spectrum"] * 1e3,
                        "test ms ours": ours["test_s_per_spectrum"] * 1e3,
                        "test ms ours 1start": ours["test_single_start_s_per_spectrum"] * 1e3,
                        "test x": theirs["test_s_per_spectrum"] / ours["test_s_per_spectrum"],
                        "test 1start x": theirs["test_s_per_spectrum"]
                        / ours["test_single_start_s_per_spectrum"],
                        "test cpu x": theirs["test_cpu_s"] / ours["test_cpu_s"]
                        * ours["n_test"] / theirs["n_test"]})
        rows.append(row)
    if not rows:
        print("\n(no case in common with reference.json)")
        return
    print(f"\n=== ours vs {ref['implementation']} (same workloads; 'x' = AL time / our time;"
          " AL tests from 1 start, ours by default scores 17 and optimises 3)")
    print(metrics.fmt_table(rows, ["case", "train_s AL", "train_s ours", "train x", "train cpu x",
                                   "test ms AL", "test ms ours", "test x", "test cpu x",
                                   "test ms ours 1start", "test 1start x",
                                   "s(0.01) AL", "s(0.01) ours"]))
    lrows = []
    for key, ours in core["cases"].items():
        theirs = ref["cases"].get(key)
        if theirs is None or "labels_cov_converted" not in ours \
                or "labels_cov_converted" not in theirs:
            continue
        for lab, e in ours["labels_cov_converted"]["labels"].items():
            a = theirs["labels_cov_converted"]["labels"][lab]
            lrows.append({"case": key, "label": lab, "rms AL": a["rms"], "rms ours": e["rms"],
                          "bias AL": a["bias"], "bias ours": e["bias"],
                          "pull_std AL": a["pull_std"], "pull_std ours": e["pull_std"]})
    if lrows:
        print(metrics.fmt_table(lrows, ["case", "label", "bias AL", "bias ours", "rms AL",
                                        "rms ours", "pull_std AL", "pull_std ours"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", type=int, nargs="+", default=[3, 17], choices=[3, 17])
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=None,
                   help="test spectra for every label count (overrides the next two)")
    p.add_argument("--n-test-3", type=int, default=300)
    p.add_argument("--n-test-17", type=int, default=200)
    p.add_argument("--seed-pixels", type=int, default=200)
    p.add_argument("--seed-spectra", type=int, default=20)
    p.add_argument("--no-reg", action="store_true", help="skip the regularised-training cases")
    p.add_argument("--no-tracemalloc", action="store_true",
                   help="skip the second, memory-traced train/test runs")
    p.add_argument("--quick", action="store_true",
                   help="small smoke run (200 train, 10 test, 300 px); writes core_quick.json")
    p.add_argument("--repeat", type=int, default=1,
                   help="time training and the test step this many times; the best run counts")
    p.add_argument("--out", default=None)
    p.add_argument("--reference", default=os.path.join(common.RESULTS_DIR, "reference.json"),
                   help="reference JSON to compare against")
    args = p.parse_args(argv)

    out = args.out or os.path.join(common.RESULTS_DIR,
                                   "core_quick.json" if args.quick else "core.json")
    import astra_cannon
    payload = {"implementation": f"astra_cannon {astra_cannon.__version__}",
               "environment": common.environment(), "argv": sys.argv[1:], "cases": {}}
    # The core is still changing: record which source the figures belong to.
    import hashlib
    src = os.path.dirname(astra_cannon.__file__)
    payload["source_sha256_12"] = {
        f: hashlib.sha256(open(os.path.join(src, f), "rb").read()).hexdigest()[:12]
        for f in ("model.py", "engines.py", "fitting.py", "vectorizer.py", "monomials.py", "model_noise.py")
        if os.path.exists(os.path.join(src, f))}
    print(f"{payload['implementation']}; numpy {np.__version__}; "
          f"threadpools: {payload['environment']['threadpools']}")

    n_train = 200 if args.quick else args.n_train
    for n_labels in args.labels:
        n_test = args.n_test or (args.n_test_3 if n_labels == 3 else args.n_test_17)
        if args.quick:
            n_test = 10
        w = make_workload(n_labels=n_labels, n_train=n_train, n_test=300)
        key = f"{n_labels}x{n_train}"
        pixels = common.reg_pixel_subset(8575, 300) if args.quick else None
        model, r = bench_model(w, key, n_test, pixels=pixels,
                               trace_memory=not args.no_tracemalloc, repeat=args.repeat)
        print_case(r)
        if not args.quick and args.seed_pixels > 0 and args.seed_spectra > 0:  # 0 skips the seed path
            r["seed_path"] = bench_seed_path(w, model, args.seed_pixels, args.seed_spectra, r)
            print_seed(r["seed_path"])
        payload["cases"][key] = r
        common.write_json(out, payload)

        if n_labels == 3 and not args.no_reg:
            pix = common.reg_pixel_subset(8575, 100 if args.quick else common.REG_N_PIXELS)
            for lam in (None, common.REG_LAMBDA):
                rkey = f"{n_labels}x{n_train}_{pix.size}px_lambda{lam or 0:g}"
                _, rr = bench_model(w, rkey, n_test, pixels=pix, regularization=lam,
                                    do_test=False, trace_memory=False, repeat=args.repeat)
                print_case(rr)
                payload["cases"][rkey] = rr
                common.write_json(out, payload)
            if not args.quick:
                # Our trainer should manage Lambda = 1000 on every pixel, so measure it.
                _, rr = bench_model(w, f"{key}_lambda1000", n_test,
                                    regularization=common.REG_LAMBDA, trace_memory=False, repeat=args.repeat)
                print_case(rr)
                payload["cases"][rr["case"]] = rr
                common.write_json(out, payload)
        if n_labels == 17 and not args.no_reg and not args.quick:
            # Every pixel at Lambda = 1000 (AnniesLasso needs about a day for this).
            _, rr = bench_model(w, f"{key}_lambda1000", n_test, regularization=common.REG_LAMBDA,
                                do_test=False, trace_memory=False, repeat=args.repeat)
            print_case(rr)
            payload["cases"][rr["case"]] = rr
            common.write_json(out, payload)
        del w, model
    print(f"\nwrote {out}")
    compare(payload, args.reference)


if __name__ == "__main__":
    main()
