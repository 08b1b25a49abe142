"""Benchmark: the O(1/n) moments of gradient-descent-trained outputs (``nlo_trained_coefficients``).

Their NTK, dNTK and ddNTK statistics are dense tables over four inputs at a time (24⁴-node nested
Gaussian rules per four-input subset), so the cost grows like N⁴ in N = N_A + N_B.  For each size
(depth 3, width 64, one output, gradient flow to convergence) this prints, measured in this run:

* the baseline: the full nested grids (``ntk_stats._HALF_GRID = False``), warm;
* the current path: odd σ use half of the outer nodes (point symmetry), cold (compile and the
  gather indices included) and warm;
* the ratio baseline/current and the largest difference of the 1/n mean and covariance
  coefficients between the two, relative to their largest entries (rounding only);
* the process's peak resident memory (it only grows).

GELU (C_b = 0.173, C_W = 1.983, its critical point) is not odd: there both paths are the same code,
and the ratio shows the measurement noise.

Usage: ``PYTHONPATH=. python benchmarks/bench_trained.py [--large] [--activations tanh gelu]``
(``--large`` adds 16 + 16 inputs: about 3 minutes for tanh on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
import warnings

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import eft_prob as ep  # noqa: E402
from eft_prob.theory import ntk_stats  # noqa: E402
from eft_prob.theory.training import nlo_trained_coefficients  # noqa: E402


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run(spec, X, y, Xt, half: bool):
    """(coefficients, cold s, warm s) with the half grid on or off (fresh compilation each)."""
    ntk_stats._HALF_GRID = half
    jax.clear_caches()
    t = time.perf_counter()
    jax.block_until_ready(nlo_trained_coefficients(spec, X, y, Xt))
    cold = time.perf_counter() - t
    t = time.perf_counter()
    c = jax.block_until_ready(nlo_trained_coefficients(spec, X, y, Xt + 1e-3))  # new values, same shapes
    return c, cold, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--large", action="store_true", help="also 16 + 16 inputs")
    p.add_argument("--activations", nargs="+", default=["tanh", "gelu"], choices=["tanh", "gelu"])
    args = p.parse_args()
    sizes = [(4, 5), (8, 8)] + ([(16, 16)] if args.large else [])
    print(f"# jax {jax.__version__}, backend {jax.default_backend()}, load average {os.getloadavg()}\n")
    print(
        "| activation | N_A + N_B | full grid (baseline) warm | half grid cold | half grid warm | ratio "
        "| max rel. diff. of mean1 / cov1 | peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    warnings.simplefilter("ignore", ep.CostWarning)
    for act in args.activations:
        if act == "gelu":
            spec = ep.MLPSpec(3, (64, 64), 1, "gelu", C_b=0.173, C_W=1.983)
        else:
            spec = ep.MLPSpec.at_criticality(3, (64, 64), 1, act)
        rng = np.random.default_rng(0)
        for nA, nB in sizes:
            X, Xt = rng.normal(size=(nA, 3)), rng.normal(size=(nB, 3))
            y = np.sin(X[:, :1])
            base, _, t_base = run(spec, X, y, Xt, half=False)
            cur, cold, warm = run(spec, X, y, Xt, half=True)
            rel = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
            print(
                f"| {act} | {nA} + {nB} | {t_base:.2f} s | {cold:.2f} s | {warm:.2f} s | {t_base / warm:.2f}x | "
                f"{rel(cur.mean1, base.mean1):.1e} / {rel(cur.cov1, base.cov1):.1e} | {peak_gib():.2f} |",
                flush=True,
            )
    ntk_stats._HALF_GRID = True
    print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
