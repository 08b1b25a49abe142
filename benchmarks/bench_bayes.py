"""Benchmark: the O(1/n) Bayesian posterior (THEORY.md §5.2) for many inputs.

Prints, for N_A training and N_B test inputs (default 50 + 200, depth 3, width 64, one output):

* ``prior_statistics`` on the N = N_A + N_B inputs (K, K^{1} exact; V factored, S = 4096 Monte
  Carlo draws per propagated source, 8·S for the last) — the input of everything below, cold
  (compile included) and warm;
* the §5.2 contractions alone (``nlo_moments`` given the statistics), cold and warm;
* ``nlo_posterior_moments`` and ``BayesianPosterior(order=1, form="gaussian")`` end to end, warm;
* the baseline in the same run: every source with S = 4096 draws (the previous default), its time
  and Monte Carlo error, and the efficiency ratio (variance × time) of the current allocation;
* the naive path at N = 20 (8 + 12): the exact dense vertex (O(N⁴) four-dimensional Gaussian
  integrals per layer) and the dense contractions, against the factored path at the same N, with
  the ratio; and the exact mixture posterior (``form="mixture"``) at N = 20.

Usage: ``PYTHONPATH=. python benchmarks/bench_bayes.py [--quick] [--activation relu|tanh]``.
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
from eft_prob.distributions import BayesianPosterior  # noqa: E402
from eft_prob.theory import four_point_vertex, nlo_posterior_moments, prior_statistics  # noqa: E402
from eft_prob.theory.bayes import nlo_moments  # noqa: E402


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - t


def warm(fn, *args, repeat=3, **kwargs):
    """Best of ``repeat`` warm calls (the machine may be shared)."""
    fn(*args, **kwargs)
    return min(timed(fn, *args, **kwargs)[1] for _ in range(repeat))


def main(quick: bool = False, activation: str = "relu", dense: bool = True):
    rng = np.random.default_rng(0)
    spec = ep.MLPSpec.at_criticality(3, (64, 64), 1, activation)
    nA, nB = (20, 60) if quick else (50, 200)
    X, XT = rng.normal(size=(nA, 3)), rng.normal(size=(nB, 3))
    y = np.asarray(ep.distributions.NetworkPrior(spec, X).sample(jax.random.key(0)))
    D = np.concatenate([X, XT])
    s2 = 0.01
    print(f"# {activation}, depth {spec.depth}, width 64, N_A = {nA}, N_B = {nB}, jax {jax.__version__}")
    print(f"# backend {jax.default_backend()}, devices {jax.devices()}, load average {os.getloadavg()}\n")
    rows = []
    st, t_cold = timed(prior_statistics, spec, D)
    rows.append(("prior_statistics (factored V, S=4096), cold", t_cold))
    rows.append(("prior_statistics, warm", warm(prior_statistics, spec, D, repeat=1)))
    G = st.K + st.K1 / st.width
    r, t_cold = timed(nlo_moments, G, st.V, st.width, y, s2)
    mc = (
        float(np.abs(r.mean_se).max() / np.abs(r.mean - r.gp_mean).max()),
        float(np.abs(r.covariance_se).max() / np.abs(r.covariance - np.kron(r.gp_covariance, np.eye(1))).max()),
    )
    rows.append(("§5.2 contractions (nlo_moments), cold", t_cold))
    t_contract = warm(nlo_moments, G, st.V, st.width, y, s2)
    rows.append(("§5.2 contractions (nlo_moments), warm", t_contract))
    rows.append(("nlo_posterior_moments end to end, warm", warm(nlo_posterior_moments, spec, X, y, XT, s2, repeat=1)))
    post = lambda: BayesianPosterior(spec, X, y, XT, s2, order=1, form="gaussian").scale_tril
    rows.append(("BayesianPosterior(order=1, form='gaussian'), warm", warm(post, repeat=1)))

    # baseline in the same run: every source with the same S = 4096 draws (the previous default)
    # against the current allocation (8·S draws for the cheap last source), at equal accuracy per second
    def mc_error(r):
        return (
            float(np.abs(r.mean_se).max() / np.abs(r.mean - r.gp_mean).max()),
            float(np.abs(r.covariance_se).max() / np.abs(r.covariance - np.kron(r.gp_covariance, np.eye(1))).max()),
        )

    st_u = prior_statistics(spec, D, last_samples=4096)
    r_u = nlo_moments(G, st_u.V, st_u.width, y, s2)
    mc_u = mc_error(r_u)
    t_stat_u = warm(prior_statistics, spec, D, last_samples=4096, repeat=1)
    t_contract_u = warm(nlo_moments, G, st_u.V, st_u.width, y, s2)
    t_stat = rows[1][1]
    rows.append(("baseline: prior_statistics, S = 4096 for every source, warm", t_stat_u))
    rows.append(("baseline: §5.2 contractions, S = 4096 for every source, warm", t_contract_u))
    eff = [(eu**2 * (t_stat_u + t_contract_u)) / (e**2 * (t_stat + t_contract)) for eu, e in zip(mc_u, mc)]

    if dense:
        # the naive path at N = 20: exact dense V and dense contractions, vs factored at the same N
        n_a, n_b = 8, 12
        d20 = D[: n_a + n_b]
        y20 = y[:n_a]
        Vd, t_dense_v = timed(four_point_vertex, spec, d20)
        t_dense_v = warm(four_point_vertex, spec, d20, repeat=1)
        st20 = prior_statistics(spec, d20, factored=True)
        G20 = st20.K + st20.K1 / st20.width
        t_dense_c = warm(nlo_moments, G20, Vd, st20.width, y20, s2)
        t_fact_v = warm(prior_statistics, spec, d20, factored=True, repeat=1)
        t_fact_c = warm(nlo_moments, G20, st20.V, st20.width, y20, s2)
        a, b = nlo_moments(G20, Vd, st20.width, y20, s2), nlo_moments(G20, st20.V, st20.width, y20, s2)
        rel = float(np.abs(a.mean - b.mean).max() / np.abs(a.mean - a.gp_mean).max())
        rows.append(("N=20: dense exact V (four_point_vertex), warm", t_dense_v))
        rows.append(("N=20: dense contractions, warm", t_dense_c))
        rows.append(("N=20: factored statistics, warm", t_fact_v))
        rows.append(("N=20: factored contractions, warm", t_fact_c))
        mix = lambda: BayesianPosterior(spec, X[:n_a], y20, XT[:n_b], s2, order=1, form="mixture").scale_trils
        rows.append(("N=20: BayesianPosterior(order=1, form='mixture'), warm", warm(mix, repeat=1)))

    print("| step | time |")
    print("|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.3f} s |")
    print(
        f"\nMonte Carlo standard error at N={nA + nB}, largest entries, 1/n mean term / 1/n covariance term: "
        f"uniform S=4096 {mc_u[0]:.0%} / {mc_u[1]:.0%}; last source 8·S {mc[0]:.0%} / {mc[1]:.0%}; "
        f"efficiency (variance × time, uniform / current) {eff[0]:.1f}x / {eff[1]:.1f}x"
    )
    if dense:
        print(
            f"N=20 dense/factored: statistics {t_dense_v / t_fact_v:.1f}x, contractions {t_dense_c / t_fact_c:.2f}x; "
            f"Monte Carlo error of the factored 1/n mean term: {rel:.1%} of it"
        )
        # the dense vertex has C(N+3, 4) distinct entries: its cost at N_A + N_B, extrapolated
        from math import comb

        N = nA + nB
        print(
            f"dense V at N={N} (extrapolated from N=20 by C(N+3,4)): "
            f"{t_dense_v * comb(N + 3, 4) / comb(23, 4) / 3600:.1f} h and {N**4 * 8 / 2**30:.1f} GiB; "
            f"factored path end to end: {rows[4][1]:.1f} s"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {peak:.0f} MiB; load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    warnings.simplefilter("ignore", ep.ApproximationWarning)  # the Monte Carlo error is printed instead
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20 + 60 inputs instead of 50 + 200")
    p.add_argument("--activation", default="relu", choices=("relu", "tanh"))
    p.add_argument("--no-dense", action="store_true", help="skip the N = 20 dense baseline (e.g. on a GPU)")
    a = p.parse_args()
    main(a.quick, a.activation, not a.no_dense)
