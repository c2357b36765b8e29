"""Paired rounds: AnniesLasso, then ours, on the same workload, several times in a row.

On a shared virtual machine the speed of both codes drifts by 10-50% within an hour, so a
ratio is only meaningful between runs made minutes apart. Each round runs
``bench_reference.py`` (in AnniesLasso's own venv) and then ``bench_core.py`` on one case and
records both; the ratio of every round and their median are printed and written to JSON::

    python benchmarks/paired.py --labels 3 --rounds 5
    OPENBLAS_NUM_THREADS=1 python benchmarks/paired.py --labels 17 --rounds 3 --n-test 100

``--threads`` runs our side with that many BLAS threads (our default parallelism) while
AnniesLasso keeps the environment's setting (it gains nothing from more threads).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402


def _run(cmd, env):
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-2000:] + done.stderr[-4000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", type=int, default=3, choices=(3, 17))
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=None, help="default 300 (3 labels), 100 (17)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per round on each side; the best counts (a first run pays for cold caches)")
    p.add_argument("--threads", type=int, default=None, help="BLAS threads of our side")
    p.add_argument("--al-python", default="/work/venv-al/bin/python")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    n_test = args.n_test or (300 if args.labels == 3 else 100)
    case = f"{args.labels}x{args.n_train}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    ours_env = dict(env)
    if args.threads:
        ours_env["OPENBLAS_NUM_THREADS"] = str(args.threads)
    rounds, sources = [], []  # the source each round of ours measured (a tree edited meanwhile shows)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            ref, core = os.path.join(tmp, f"ref{i}.json"), os.path.join(tmp, f"core{i}.json")
            _run([args.al_python, os.path.join(HERE, "bench_reference.py"), "--cases", case,
                  f"--n-test-{args.labels}", str(n_test), "--repeat", str(args.repeat), "--out", ref], env)
            _run([args.python, os.path.join(HERE, "bench_core.py"), "--labels", str(args.labels),
                  "--n-train", str(args.n_train), "--n-test", str(n_test), "--no-reg",
                  "--no-tracemalloc", "--seed-pixels", "0", "--repeat", str(args.repeat), "--out", core,
                  "--reference", ref], ours_env)
            with open(ref) as fh:
                al = json.load(fh)["cases"][case]
            with open(core) as fh:
                core_payload = json.load(fh)
            ours = core_payload["cases"][case]
            r = {"al_train_s": al["train_s"], "ours_train_s": ours["train_s"],
                 "al_test_ms": al["test_s_per_spectrum"] * 1e3,
                 "ours_test_ms": ours["test_s_per_spectrum"] * 1e3}
            r["train_x"] = r["al_train_s"] / r["ours_train_s"]
            r["test_x"] = r["al_test_ms"] / r["ours_test_ms"]
            rounds.append(r)
            sources.append(core_payload.get("source_sha256_12"))
            print(f"round {i + 1}: train AL {r['al_train_s']:.2f} s, ours {r['ours_train_s']:.3f} s "
                  f"({r['train_x']:.1f}x); test AL {r['al_test_ms']:.2f} ms, ours "
                  f"{r['ours_test_ms']:.3f} ms ({r['test_x']:.1f}x)", flush=True)
    summary = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"median of {len(rounds)} rounds: train {summary['train_x']:.1f}x "
          f"(AL {summary['al_train_s']:.2f} s, ours {summary['ours_train_s']:.3f} s), test "
          f"{summary['test_x']:.1f}x (AL {summary['al_test_ms']:.2f} ms, ours {summary['ours_test_ms']:.3f} ms)")
    out = args.out or os.path.join(common.RESULTS_DIR, f"paired_{case}_{args.threads or 'env'}threads.json")
    common.write_json(out, {"case": case, "n_test": n_test, "threads_ours": args.threads,
                            "environment": common.environment(), "git": common.git_state(),
                            "source_sha256_12": sources, "rounds": rounds, "median": summary})
    if any(src != sources[0] for src in sources):
        print("warning: the source changed between rounds (see source_sha256_12)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
