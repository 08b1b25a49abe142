"""Benchmark: one computation split across jax.distributed processes, against one process in the same run.

P processes (default 2) are started on 127.0.0.1 and connected by ``eft_prob.distributed.initialize``;
the baseline is one process.  Every process sees the host's CPU as one device (no simulated
devices).  Each workload is timed cold (first call: compilation included) and warm (a second call on
new values of the same shapes), and the slowest process counts:

* ``distributed.kernel_moments``: Monte Carlo mean and variance of the NNGP metric and the NTK over M
  prior networks (depth 3, width 512, tanh, N inputs; default M = 64, N = 200);
* ``distributed.trained_marginals``: the trained O(1/n) marginals (depth 3, tanh, width 64, gradient
  flow, 8 training + N_TEST test inputs in batches of 24; default N_TEST = 48, two batches).

Printed: the wall times, the ratio one process / P processes (warm), the largest difference between
the two layouts' results relative to their largest entry, and the peak resident memory of a process.
On one host the processes share its cores, so this measures what the split costs (per-process
compilation, the gathers, the agreement on failures), not a cluster's speed-up: on P hosts each
process computes 1/P of the work.

Usage: ``PYTHONPATH=. python benchmarks/bench_distributed.py [--processes 2] [--networks 64]
[--inputs 200] [--test 48]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

_CHILD = "--child"


def child(port: int, index: int, count: int, out: str, networks: int, inputs: int, n_test: int) -> None:
    """One process: connect (count > 1), run both workloads twice, write times and results."""
    import resource

    import jax
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    from eft_prob import MLPSpec, distributed

    if count > 1:
        distributed.initialize(f"127.0.0.1:{port}", count, index, timeout_s=120)
    rng = np.random.default_rng(0)
    times, results = {}, {}

    spec = MLPSpec(4, (512, 512), 1, "tanh", C_b=0.1)
    X = rng.normal(size=(inputs, 4))
    for label, seed in (("cold", 0), ("warm", 1)):
        t = time.perf_counter()
        m = distributed.kernel_moments(spec, X, networks, jax.random.key(seed))
        times[f"moments {label}"] = time.perf_counter() - t
    results["moments"] = np.stack([m.nngp_mean, m.nngp_var, m.ntk_mean, m.ntk_var])

    spec = MLPSpec(2, (64, 64), 1, "tanh", C_b=0.1)
    Xa, Xt = rng.normal(size=(8, 2)), rng.normal(size=(n_test, 2))
    y = np.sin(Xa[:, :1])
    for label, shift in (("cold", 0.0), ("warm", 1e-3)):
        t = time.perf_counter()
        r = distributed.trained_marginals(spec, Xa, y, Xt + shift, batch_size=24)
        jax.block_until_ready(r)
        times[f"marginals {label}"] = time.perf_counter() - t
    results["marginals"] = np.concatenate([np.asarray(r.mean1).ravel(), np.asarray(r.cov1).ravel()])

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if index == 0:
        np.savez(out + ".npz", **results)
    with open(f"{out}.{index}.json", "w") as f:
        json.dump({"times": times, "peak_gib": peak}, f)


def launch(count: int, tmp: str, args) -> tuple[dict, float, str]:
    """Run ``count`` child processes; (slowest time per workload, largest peak GiB, results file)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tmp, f"p{count}")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, __file__, _CHILD, str(port)]
    rest = [out, str(args.networks), str(args.inputs), str(args.test)]
    procs = [subprocess.Popen([*cmd, str(i), str(count), *rest], env=env) for i in range(count)]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a process of the {count}-process run failed (exit {p.returncode})")
    reports = []
    for i in range(count):
        with open(f"{out}.{i}.json") as f:
            reports.append(json.load(f))
    times = {k: max(r["times"][k] for r in reports) for k in reports[0]["times"]}
    return times, max(r["peak_gib"] for r in reports), out + ".npz"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--networks", type=int, default=64, help="networks of the kernel moments (M)")
    p.add_argument("--inputs", type=int, default=200, help="inputs of the kernel moments (N)")
    p.add_argument("--test", type=int, default=48, help="test inputs of the trained marginals (N_TEST)")
    args = p.parse_args()

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        one, peak1, f1 = launch(1, tmp, args)
        many, peakP, fP = launch(args.processes, tmp, args)
        a, b = np.load(f1), np.load(fP)
        diff = {k: float(np.max(np.abs(b[k] - a[k])) / np.max(np.abs(a[k]))) for k in a.files}
    P = args.processes
    print(f"\n{os.cpu_count()} CPU cores; 1 process against {P} processes on 127.0.0.1 (the slowest process)")
    print(f"| work | 1 process cold / warm | {P} processes cold / warm | ratio (warm) | max rel. diff. | peak RSS |")
    print("|---|---|---|---|---|---|")
    rows = {
        "moments": f"kernel_moments, M = {args.networks}, N = {args.inputs}, depth 3, width 512",
        "marginals": f"trained_marginals, 8 + {args.test}, depth 3, width 64, batch 24",
    }
    for k, label in rows.items():
        c1, w1, cP, wP = one[f"{k} cold"], one[f"{k} warm"], many[f"{k} cold"], many[f"{k} warm"]
        print(
            f"| {label} | {c1:.1f} / {w1:.1f} s | {cP:.1f} / {wP:.1f} s | {w1 / wP:.2f}x | {diff[k]:.1e} | "
            f"{peak1:.1f} / {peakP:.1f} GiB |"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == _CHILD:
        port, index, count, out, networks, inputs, n_test = sys.argv[2:9]
        child(int(port), int(index), int(count), out, int(networks), int(inputs), int(n_test))
    else:
        main()
