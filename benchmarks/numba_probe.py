"""What a compiled, fused kernel would gain on the 3-label test step's statistics sweep.

The test step's largest part at 3 labels is :class:`astra_cannon.engines.SpectrumStatistics`:
per block of pixels, about a dozen numpy passes (weights ``1 / (1/ivar + s2)``, the bad-pixel
mask, ``w f``, ``sum w f^2``, the float32 copies for ``G`` and the S/N, the flux sum) feed three
matrix products (``Q``, ``c``, ``G``). This probe replaces the passes with one numba kernel
per block (two loops over each row: float64, then float32), keeps the same products and the
same S/N median, checks that the results equal the engine's, and prints both sweep times and
what the whole test step would take with the fused sweep.

It answers one question (does numba earn a place as an optional dependency?) and is not part of
the package: numba is needed only here::

    pip install numba
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python benchmarks/numba_probe.py [--n-test 300] [--rounds 5]
"""

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

try:
    import numba
except ImportError:  # pragma: no cover - the probe's one requirement
    sys.exit("numba_probe.py needs numba: pip install numba")

from workload import make_workload  # noqa: E402

from astra_cannon import engines  # noqa: E402
from astra_cannon.model import CannonModel  # noqa: E402
from astra_cannon.vectorizer import PolynomialVectorizer  # noqa: E402

# reassoc: the row sums may be vectorised (they are then summed in another order than numpy's,
# so they agree to rounding, not bit for bit); no assumption about inf or NaN is allowed.
_FASTMATH = {"reassoc", "contract"}


@numba.njit(nogil=True, error_model="numpy", fastmath=_FASTMATH)
def fused_block(flux, ivar, s2, p0, n, w, wf, fm, w32, snr, bad, e, fsum):
    """Weights, masked flux, ``w f``, ``sum w f^2``, flux sums, float32 weights and S/N values
    of pixels ``p0 .. p0 + n`` of every spectrum (``s2`` inf at dead pixels)."""
    S = flux.shape[0]
    for s in range(S):
        es = 0.0
        for j in range(n):
            p = p0 + j
            iv = ivar[s, p]
            f = flux[s, p]
            ww = 1.0 / (1.0 / iv + s2[p])
            good = (iv > 0) & (iv < np.inf) & (np.abs(f) < np.inf) & (ww > 0)
            ww = ww if good else 0.0
            f = f if good else 0.0
            w[s, j] = ww
            fm[s, j] = f
            x = ww * f
            wf[s, j] = x
            es += x * f
            bad[s, p] = not good
        e[s] += es
        fs = np.float32(0.0)
        for j in range(n):
            a = np.float32(w[s, j])
            w32[s, j] = a
            b = np.float32(fm[s, j])
            fs += b
            snr[s, p0 + j] = b * np.sqrt(a)
        fsum[s] += fs


def fused_sweep(theta, pairs, cov32, s2_dead, flux, ivar, width, parts=None):
    """Q (packed), c, e, G (packed), S/N and mean flux of every spectrum, as the engine's."""
    S, P = flux.shape
    Kt = pairs.shape[1]
    q, c, g = np.zeros((S, Kt)), np.zeros((S, theta.shape[1])), np.zeros((S, Kt), dtype=np.float32)
    e, fsum = np.zeros(S), np.zeros(S)
    # the engine's per-thread scratch arrays: fresh ones would be page-faulted in on every call
    w, wf, fm = (engines._scratch(f"probe{i}", (S, width)) for i in range(3))
    w32 = engines._scratch("probe_w32", (S, width), np.float32)
    snr = engines._scratch("probe_snr", (S, P), np.float32)
    bad = engines._scratch("probe_bad", (S, P), bool)
    t_kernel = t_products = 0.0
    for p0 in range(0, P, width):
        n = min(width, P - p0)
        sl = slice(p0, p0 + n)
        t0 = time.process_time()
        fused_block(flux, ivar, s2_dead, p0, n, w, wf, fm, w32, snr, bad, e, fsum)
        t1 = time.process_time()
        q += w[:, :n] @ pairs[sl]
        c += wf[:, :n] @ theta[sl]
        g += w32[:, :n] @ cov32[sl]
        t_kernel, t_products = t_kernel + t1 - t0, t_products + time.process_time() - t1
    if parts is not None:
        parts.append((t_kernel, t_products))
    flat = np.flatnonzero(bad)
    rows = flat // P
    n_bad = np.bincount(rows, minlength=S)
    engines._fill_bad_with_infs(snr.reshape(-1), flat, rows, n_bad)
    median = engines._balanced_median(snr, n_bad)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_flux = fsum / (P - n_bad)
    return q, c, e, g, median, mean_flux


def _interleaved(fns, rounds):
    """Best CPU time and last result of each function, run in turn ``rounds`` times (this
    machine's speed drifts within minutes: interleaving exposes every one to the same drift)."""
    best, out = [np.inf] * len(fns), [None] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.process_time()
            out[i] = fn()
            best[i] = min(best[i], time.process_time() - t0)
    return best, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    wl = make_workload(3, 1000, 300)
    model = CannonModel(wl["train_labels"], wl["train_flux"], wl["train_ivar"],
                        PolynomialVectorizer(wl["label_names"], 2))
    model.train()
    flux = np.ascontiguousarray(wl["test_flux"][:args.n_test])
    ivar = np.ascontiguousarray(wl["test_ivar"][:args.n_test])
    S, P = flux.shape
    theta, s2 = model.theta, model.s2
    pairs = engines.theta_pairs_for(model, theta)
    cov32 = np.asarray(model.theta_cov, dtype=np.float32)
    s2_dead = np.where(np.isfinite(s2), s2, np.inf)

    def engine():
        return engines.SpectrumStatistics(theta, flux, ivar, s2, theta_pairs=pairs, theta_cov=cov32)

    width = engine()._blocks(P)[0].stop  # the engine's own block width
    parts = []
    fused = lambda: fused_sweep(theta, pairs, cov32, s2_dead, flux, ivar, width, parts)  # noqa: E731
    t_compile = time.perf_counter()
    fused()
    t_compile = time.perf_counter() - t_compile

    parts.clear()
    (t_engine, t_fused, t_test), (st, (q, c, e, g, snr, mean_flux), _) = _interleaved(
        [engine, fused, lambda: model.test(flux, ivar)], args.rounds)
    t_kernel, t_products = min(k for k, _ in parts), min(p for _, p in parts)

    iu, ju = np.triu_indices(theta.shape[1])
    checks = {
        "Q": np.max(np.abs(q - st.Q[:, iu, ju]) / np.abs(st.Q[:, iu, ju]).max(axis=1, keepdims=True)),
        "c": np.max(np.abs(c - st.c) / np.abs(st.c).max(axis=1, keepdims=True)),
        "e": np.max(np.abs(e - st.e) / st.e),
        "G": np.max(np.abs(g - st.G[:, iu, ju]) / np.abs(st.G[:, iu, ju]).max(axis=1, keepdims=True)),
        "snr": np.max(np.abs(snr - st.snr) / st.snr),
        "mean_flux": np.max(np.abs(mean_flux - st.mean_flux)),
    }
    print(f"numba {numba.__version__}, numpy {np.__version__}; {S} spectra x {P} pixels, blocks of {width}")
    print(f"first call (compilation included): {t_compile:.2f} s")
    print("fused against engine, largest relative difference: "
          + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))
    print(f"statistics sweep, engine (numpy):  {1e3 * t_engine / S:.4f} ms per spectrum")
    print(f"statistics sweep, fused (numba):   {1e3 * t_fused / S:.4f} ms per spectrum "
          f"(fused kernel {1e3 * t_kernel / S:.4f}, matrix products {1e3 * t_products / S:.4f})")
    print(f"test step, engine:                 {1e3 * t_test / S:.4f} ms per spectrum")
    print(f"test step with the fused sweep:    {1e3 * (t_test - t_engine + t_fused) / S:.4f} ms per spectrum "
          f"({t_test / (t_test - t_engine + t_fused):.2f}x faster)")
    if max(checks.values()) > 1e-5:
        sys.exit("the fused sweep does not reproduce the engine's statistics")


if __name__ == "__main__":
    main()
