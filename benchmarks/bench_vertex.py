"""Benchmark: the O(1/n) prior statistics (K, K^{1}, V) for many inputs.

Prints, for N inputs at depth 10 (ReLU and tanh at criticality, width 64):

* ``prior_statistics`` with the factored vertex (exact K and K^{1}; V as the covariance of the
  random kernel, Monte Carlo source with S = 4096 draws per layer), cold (compile included) and
  warm;
* one contraction Σ V X X (what the O(1/n) formulas need), warm;
* the dense exact vertex (O(N⁴) four-dimensional Gaussian integrals per layer) at N = 10 and 16
  as the baseline, with the factored path's relative error against it at the same N;
* peak resident memory of the process.

Usage: ``PYTHONPATH=. python benchmarks/bench_vertex.py [--quick]``.
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import eft_prob as ep  # noqa: E402
from eft_prob.theory import four_point_vertex, prior_statistics  # noqa: E402


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - t


def main(quick: bool = False):
    rng = np.random.default_rng(0)
    print("| activation | N | factored cold | factored warm | contraction | dense (exact) | rel. err. of factored |")
    print("|---|---|---|---|---|---|---|")
    for act in ("relu", "tanh"):
        spec = ep.MLPSpec.at_criticality(3, [64] * 9, 1, act)
        for N in (10, 16) if quick else (10, 16, 100):
            X = rng.normal(size=(N, 3))
            st, cold = timed(prior_statistics, spec, X, factored=True, samples=4096)
            st, warm = timed(prior_statistics, spec, X, factored=True, samples=4096)
            A = np.eye(N)[None]
            _, t_c = timed(st.V.contract, A)
            _, t_c = timed(st.V.contract, A)
            dense, err = "—", "—"
            if N <= 16:
                Vd, t_d = timed(four_point_vertex, spec, X)
                Vf = np.asarray(st.V.dense())
                dense = f"{t_d:.1f} s"
                err = f"{np.abs(Vf - Vd).max() / np.abs(Vd).max():.2%}"
            print(f"| {act} | {N} | {cold:.1f} s | {warm:.2f} s | {t_c * 1e3:.0f} ms | {dense} | {err} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory: {peak:.0f} MiB")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="skip N = 100")
    main(p.parse_args().quick)
