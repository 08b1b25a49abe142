"""Benchmark: the O(1/n) prior statistics (K, K^{1}, V) and the posterior for many inputs.

Two tables, each measured in this run:

1. **Factored vs dense vertex at N = 20** (depth 4, ReLU and tanh at criticality, width 64): the
   exact dense V (O(N⁴) four-dimensional Gaussian integrals per layer, the baseline) against
   ``prior_statistics(..., factored=True)`` (exact K and K^{1}; V as the covariance of the random
   kernel with a Monte Carlo source: S = 4096 draws per propagated source, 8·S for the last), with
   the factored V's error: the largest |V_fact − V_dense| relative to max |V|, the same in units
   of the reported Monte Carlo standard error (``FactoredVertex.dense(with_error=True)``), and the
   error of the O(1/n) posterior mean and covariance terms (8 training + 12 test inputs).
2. **N = 1000 inputs at depth 10** (width 512): ``prior_statistics`` (cold = compile included,
   warm) and ``nlo_posterior_marginals`` for N_A = 100 training + N_B = 900 test inputs (means and
   marginal variances at O(1/n), with their Monte Carlo standard errors relative to the 1/n terms).

3. With ``--joint``, the joint O(1/n) posterior covariance over all N_B test inputs
   (``nlo_posterior_moments``, O(S·N_A·N_B²) per layer), cold and warm, its diagonal against the
   marginals of table 2 (the same draws) and its Monte Carlo error.

4. With ``--likelihood``, the order-1 likelihood's inner loop under NUTS: ``jax.jit(jax.value_and_grad)``
   of the dense ``prior_statistics`` (K, K^{1}, V) in (C_W, C_b) for a few inputs (depth 3, width
   10, as in notebooks/04), cold (tracing and compilation included) and warm.  The baseline, in the
   same run, is the two-pass path ``prior_statistics`` used before 2026-11-27 (the K, K^{1}
   recursion, then a second pass for V); the one-pass path carries K and K^{1} along with V.

5. With ``--remat``, reverse-mode differentiation with and without ``jax.checkpoint`` on every
   quadrature chunk (``theory.vertex._REMAT``, on since 2026-11-28; the baseline is the same code
   with it off): ``jax.jit(jax.value_and_grad)`` of the dense ``prior_statistics`` as in 4 (N = 4
   and 8), and of the trained O(1/n) moments (``nlo_trained_coefficients``, tanh, 4 + 2 inputs,
   width 16, η = 0.1) in (C_W, C_b).  Each variant runs in its own process, so its peak resident
   memory is its own.

6. With ``--unroll``, the inner loop of the smooth pair integrals (``gauss.inner_sums``) unrolled 4
   times against not unrolled (``gauss.inner_unroll``: 4 above 2048 pairs, i.e. N >= 64, since
   2026-11-29; 4 everywhere before), tanh: ``jax.jit(jax.value_and_grad)`` of the order-1
   ``NetworkPrior`` log density of notebooks/04 (N = 2, depth 3, width 10, 1000 data sets) and of
   the dense ``prior_statistics`` (N = 8), cold (tracing and compilation, no persistent cache) and
   warm, and ``prior_statistics`` at N = 128 and 1000 (depth 10, width 64), forward.  Each variant
   runs in its own process.

7. With ``--shift``, the smooth pair integrals' inner axis from σ's addition theorem
   (``gauss.shift_rule``, wherever ``theory.kernels._shift_ok`` allows it, since 2026-11-29) against
   direct evaluation of σ at every node, tanh at criticality, depth 10, width 64, forward: the NNGP
   and NTK kernels and ``prior_statistics`` (K, K^{1}, factored V) at N = 128 and 1000, each
   variant in its own process without the compilation cache, cold and warm.

The process's peak resident memory is printed after each row (it only grows).

Usage: ``PYTHONPATH=. python benchmarks/bench_vertex.py [--quick] [--activations relu tanh] [--joint]
[--likelihood] [--remat] [--unroll] [--shift]``
(``--quick``: N = 12 and N = 200).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

import eft_prob as ep  # noqa: E402
from eft_prob.theory import four_point_vertex, nlo_posterior_marginals, nlo_posterior_moments, prior_statistics  # noqa: E402
from eft_prob.theory.bayes import nlo_moments  # noqa: E402


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - t


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def dense_vs_factored(act: str, N: int, rng) -> None:
    spec = ep.MLPSpec.at_criticality(3, [64] * 3, 1, act)
    X = rng.normal(size=(N, 3))
    nA = 8 * N // 20
    y = np.sin(2 * X[:nA, :1])
    Vd, t_d = timed(four_point_vertex, spec, X)
    _, t_f_cold = timed(prior_statistics, spec, X, factored=True)
    st, t_f = timed(prior_statistics, spec, X, factored=True)
    Vf, se = (np.asarray(a) for a in st.V.dense(with_error=True))
    Vd = np.asarray(Vd)
    rel = np.abs(Vf - Vd).max() / np.abs(Vd).max()
    z = np.abs(Vf - Vd) / np.maximum(se, 1e-300 + 1e-12 * np.abs(Vd).max())
    G = st.K + st.K1 / st.width
    a, b = nlo_moments(G, Vd, st.width, y, 0.01), nlo_moments(G, st.V, st.width, y, 0.01)
    dm = np.abs(np.asarray(b.mean - a.mean)).max() / np.abs(np.asarray(a.mean - a.gp_mean)).max()
    c0 = np.kron(np.asarray(a.gp_covariance), np.eye(1))
    dc = np.abs(np.asarray(b.covariance - a.covariance)).max() / np.abs(np.asarray(a.covariance) - c0).max()
    zm = np.abs(np.asarray(b.mean - a.mean)) / np.maximum(np.asarray(b.mean_se), 1e-300)
    print(
        f"| {act} | {N} | {t_d:.1f} s | {t_f:.3f} s ({t_f_cold:.1f} s cold) | {t_d / t_f:.0f}x | {rel:.2%} | "
        f"{z.max():.1f} | {dm:.1%} (max z {zm.max():.1f}) | {dc:.1%} | {peak_gib():.2f} |"
    )


def many_inputs(act: str, nA: int, nB: int, depth: int, rng) -> None:
    spec = ep.MLPSpec.at_criticality(8, [512] * (depth - 1), 1, act)
    X = rng.normal(size=(nA, 8)) / np.sqrt(8)
    XT = rng.normal(size=(nB, 8)) / np.sqrt(8)
    y = np.sin(3 * X[:, :1])
    D = np.concatenate([X, XT])
    _, t_cold = timed(prior_statistics, spec, D)
    st, t_warm = timed(prior_statistics, spec, D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ep.ApproximationWarning)  # the error is printed instead
        _, p_cold = timed(nlo_posterior_marginals, spec, X, y, XT, 0.01)
        r, p_warm = timed(nlo_posterior_marginals, spec, X, y, XT, 0.01)
    em = float(np.abs(r.mean_se).max() / np.abs(r.mean - r.gp_mean).max())
    ev = float(np.abs(r.variance_se).max() / np.abs(r.variance - r.gp_variance[:, None]).max())
    print(
        f"| {act} | {nA + nB} ({nA} + {nB}) | {depth} | {t_cold:.1f} s | {t_warm:.1f} s | {p_cold:.1f} s | "
        f"{p_warm:.1f} s | {em:.0%} / {ev:.0%} | {st.V.rank} | {peak_gib():.2f} |"
    )
    return spec, X, y, XT, r


def joint(act: str, case) -> None:
    """The joint O(1/n) posterior covariance over all N_B test inputs (``nlo_posterior_moments``), its
    diagonal against the marginals of the same draws, and its Monte Carlo error."""
    spec, X, y, XT, marg = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ep.ApproximationWarning)
        _, t_cold = timed(nlo_posterior_moments, spec, X, y, XT, 0.01)
        r, t_warm = timed(nlo_posterior_moments, spec, X, y, XT, 0.01)
    diag = np.abs(np.diagonal(np.asarray(r.covariance)) - np.asarray(marg.variance)[:, 0]).max()
    c1 = np.asarray(r.covariance) - np.asarray(r.gp_covariance)
    ec = float(np.abs(np.asarray(r.covariance_se)).max() / np.abs(c1).max())
    print(
        f"| {act} | {len(X) + len(XT)} ({len(X)} + {len(XT)}) | {t_cold:.1f} s | {t_warm:.1f} s | {diag:.1e} | "
        f"{ec:.0%} | {peak_gib():.2f} |"
    )


def likelihood(act: str, N: int, rng) -> None:
    """value_and_grad of the dense prior statistics in (C_W, C_b): one pass against two."""
    from eft_prob.theory.vertex import _compute

    X = rng.normal(size=(N, 2))
    spec = lambda p: ep.MLPSpec(2, (10, 10), 2, act, C_W=p[0], C_b=p[1])
    summary = lambda K, K1, V: jnp.sum(K) + jnp.sum(K1) + jnp.sum(V**2)

    def one_pass(p):
        st = prior_statistics(spec(p), X)
        return summary(st.K, st.K1, st.V)

    def two_passes(p):  # the former dense path of prior_statistics
        K, G, _ = _compute(spec(p), X, False, False, False, None)
        return summary(K, (G + G.T) / 2, four_point_vertex(spec(p), X))

    p0 = jnp.asarray([1.5, 0.2])
    row = []
    for fn in (two_passes, one_pass):
        f = jax.jit(jax.value_and_grad(fn))
        (v, g), t_cold = timed(f, p0)
        _, t_warm = timed(f, p0 + 1e-3)
        t_warm = min(t_warm, timed(f, p0 + 2e-3)[1])
        row.append((float(v), np.asarray(g), t_cold, t_warm))
    (v0, g0, c0, w0), (v1, g1, c1, w1) = row
    rel = max(abs(v1 - v0) / abs(v0), float(np.abs(g1 - g0).max() / np.abs(g0).max()))
    print(
        f"| {act} | {N} | {c0:.1f} s | {c1:.1f} s | {c0 / c1:.2f}x | {w0 * 1e3:.1f} ms | {w1 * 1e3:.1f} ms | "
        f"{w0 / w1:.2f}x | {rel:.0e} | {peak_gib():.2f} |"
    )


def remat_case(act: str, N: int, remat: bool) -> None:
    """One variant of table 5 in this process: prints a JSON line (times, value, gradient, peak RSS)."""
    import json

    from eft_prob.theory import vertex
    from eft_prob.theory.training import nlo_trained_coefficients

    vertex._REMAT = remat
    rng = np.random.default_rng(0)
    p0 = jnp.asarray([1.5, 0.2])
    if act == "trained":
        XA, XB, y = rng.normal(size=(4, 2)), rng.normal(size=(2, 2)), rng.normal(size=(4, 1))

        def f(p):
            c = nlo_trained_coefficients(ep.MLPSpec(2, (16, 16), 1, "tanh", C_W=p[0] - 0.3, C_b=p[1]), XA, y, XB, 0.1)
            return jnp.sum(c.mean1) + jnp.sum(c.cov1)
    else:
        X = rng.normal(size=(N, 2))

        def f(p):
            st = prior_statistics(ep.MLPSpec(2, (10, 10), 2, act, C_W=p[0], C_b=p[1]), X)
            return jnp.sum(st.K) + jnp.sum(st.K1) + jnp.sum(st.V**2)

    g = jax.jit(jax.value_and_grad(f))
    (v, grad), cold = timed(g, p0)
    warm = min(timed(g, p0 + k * 1e-3)[1] for k in range(1, 6))
    print(json.dumps(dict(cold=cold, warm=warm, value=float(v), grad=np.asarray(grad).tolist(), peak=peak_gib())))


def _variant(*args: str, env=None) -> dict:
    """Run this script with ``args`` (a hidden ``--*-case`` option) in its own process; its last
    stdout line, a JSON object (times, value, optional gradient, peak RSS)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _variant_difference(a: dict, b: dict) -> float:
    """Largest relative difference of two variants' values and (if both have one) gradients."""
    rel = abs(b["value"] - a["value"]) / abs(a["value"])
    if "grad" in a and "grad" in b:
        ga, gb = np.asarray(a["grad"]), np.asarray(b["grad"])
        rel = max(rel, float(np.abs(gb - ga).max() / np.abs(ga).max()))
    return rel


def remat_table(activations) -> None:
    print("## Reverse mode with and without a checkpoint per quadrature chunk (each variant in its own process)\n")
    print(
        "| what | N | plain cold | checkpoint cold | plain warm | checkpoint warm | ratio (warm) | "
        "max rel. difference (value, gradient) | peak RSS GiB plain / checkpoint |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    cases = [(a, n) for a in activations for n in (4, 8)] + [("trained", 6)]
    for act, N in cases:
        a, b = (_variant("--remat-case", act, str(N), str(int(remat))) for remat in (False, True))
        rel = _variant_difference(a, b)
        what = "trained O(1/n) moments, tanh, 4 + 2" if act == "trained" else f"prior statistics, {act}"
        print(
            f"| {what} | {N} | {a['cold']:.1f} s | {b['cold']:.1f} s | {a['warm'] * 1e3:.0f} ms | "
            f"{b['warm'] * 1e3:.0f} ms | {a['warm'] / b['warm']:.2f}x | {rel:.0e} | "
            f"{a['peak']:.2f} / {b['peak']:.2f} |",
            flush=True,
        )
    print(f"\nload average at the end {os.getloadavg()}")


def _forward_times(run, N: int):
    """(value, cold, warm) of a forward ``run``: warm = best of 2 (N > 200) or 5 further calls."""
    v, cold = timed(run)
    return v, cold, min(timed(run)[1] for _ in range(2 if N > 200 else 5))


def unroll_case(case: str, unroll: int) -> None:
    """One variant of table 6 in this process: prints a JSON line (times, value, gradient, peak RSS)."""
    import json

    from eft_prob import gauss
    from eft_prob.distributions import NetworkPrior

    gauss._UNROLL_MIN_PAIRS = 0 if unroll == 4 else 1 << 40
    rng = np.random.default_rng(0)
    if case in ("likelihood", "stats8"):
        X = np.array([[2.0, 0.0], [0.1, 0.3]]) if case == "likelihood" else rng.normal(size=(8, 2))
        y = rng.normal(size=(1000, 2, 2))
        spec = lambda p: ep.MLPSpec(2, (10, 10), 2, "tanh", C_W=p[0], C_b=p[1])
        if case == "likelihood":
            f = lambda p: NetworkPrior(spec(p), X, order=1, noise_var=0.1).log_prob(y).sum()
        else:
            f = lambda p: (lambda st: jnp.sum(st.V**2) + jnp.sum(st.K1))(prior_statistics(spec(p), X))
        g = jax.jit(jax.value_and_grad(f))
        p0 = jnp.asarray([1.5, 0.2])
        (v, grad), cold = timed(g, p0)
        warm = min(timed(g, p0 + k * 1e-3)[1] for k in range(1, 6))
        out = dict(value=float(v), grad=np.asarray(grad).tolist())
    else:
        N = int(case)
        X = rng.normal(size=(N, 3))
        spec = ep.MLPSpec.at_criticality(3, (64,) * 9, 1, "tanh")
        v, cold, warm = _forward_times(lambda: jax.block_until_ready(prior_statistics(spec, X).K1), N)
        out = dict(value=float(jnp.sum(v)))  # forward only: no gradient
    print(json.dumps(dict(cold=cold, warm=warm, peak=peak_gib(), **out)))


def unroll_table() -> None:
    print("## The pair integrals' inner loop: unrolled 4 vs not unrolled (each variant in its own process)\n")
    print(
        "| what | N | unroll 4 cold | unroll 1 cold | unroll 4 warm | unroll 1 warm | warm ratio 4/1 | landed | "
        "max rel. difference | peak RSS GiB 4 / 1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    from eft_prob import gauss

    env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")
    for case, N, what in (
        ("likelihood", 2, "value_and_grad, order-1 NetworkPrior log_prob (notebooks/04)"),
        ("stats8", 8, "value_and_grad, dense prior_statistics, depth 3"),
        ("128", 128, "prior_statistics, depth 10"),
        ("1000", 1000, "prior_statistics, depth 10"),
    ):
        a, b = (_variant("--unroll-case", case, str(unroll), env=env) for unroll in (4, 1))
        rel = _variant_difference(a, b)
        print(
            f"| {what} | {N} | {a['cold']:.1f} s | {b['cold']:.1f} s | {a['warm'] * 1e3:.1f} ms | "
            f"{b['warm'] * 1e3:.1f} ms | {a['warm'] / b['warm']:.2f}x | {gauss.inner_unroll(N)} | {rel:.0e} | "
            f"{a['peak']:.2f} / {b['peak']:.2f} |",
            flush=True,
        )
    print(f"\nload average at the end {os.getloadavg()}")


def shift_case(case: str, on: bool) -> None:
    """One variant of table 7 in this process: prints a JSON line (times, value, peak RSS)."""
    import importlib
    import json

    from eft_prob.theory import vertex

    if not on:  # both modules read kernels._shift_ok under their own name
        never = lambda spec, X: False
        importlib.import_module("eft_prob.theory.kernels")._shift_ok = never
        vertex._shift_ok = never
    what, N = case.split(":")
    X = np.random.default_rng(0).normal(size=(int(N), 3))
    spec = ep.MLPSpec.at_criticality(3, (64,) * 9, 1, "tanh")
    if what == "kernels":
        run = lambda: jax.block_until_ready(ep.theory.kernels(spec, X).ntk)
    else:
        run = lambda: jax.block_until_ready(prior_statistics(spec, X).K1)
    v, cold, warm = _forward_times(run, int(N))
    print(json.dumps(dict(cold=cold, warm=warm, peak=peak_gib(), value=float(jnp.sum(v)))))


def shift_table() -> None:
    print("## The pair integrals' inner axis by σ's addition theorem vs direct evaluation (own processes)\n")
    print(
        "| what | N | direct cold | shift cold | direct warm | shift warm | ratio (warm) | max rel. difference "
        "| peak RSS GiB direct / shift |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")
    for case, what in (
        ("kernels:1000", "NNGP and NTK (theory.kernels), tanh, depth 10"),
        ("stats:128", "prior_statistics, tanh, depth 10"),
        ("stats:1000", "prior_statistics, tanh, depth 10"),
    ):
        a, b = (_variant("--shift-case", case, str(int(on)), env=env) for on in (False, True))
        print(
            f"| {what} | {case.split(':')[1]} | {a['cold']:.1f} s | {b['cold']:.1f} s | {a['warm']:.2f} s | "
            f"{b['warm']:.2f} s | {a['warm'] / b['warm']:.2f}x | {_variant_difference(a, b):.0e} | "
            f"{a['peak']:.2f} / {b['peak']:.2f} |",
            flush=True,
        )
    print(f"\nload average at the end {os.getloadavg()}")


def main(quick: bool, activations, many_only: bool = False, with_joint: bool = False, lik: bool = False) -> None:
    rng = np.random.default_rng(0)
    print(f"# jax {jax.__version__}, backend {jax.default_backend()}, load average {os.getloadavg()}\n")
    if lik:
        print("## The order-1 likelihood under NUTS: value_and_grad of the dense prior statistics\n")
        print(
            "| activation | N | two passes cold | one pass cold | ratio | two passes warm | one pass warm | ratio | "
            "max rel. difference (value, gradient) | peak RSS GiB |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for act in activations:
            for N in (2, 4) if quick else (2, 4, 8):
                likelihood(act, N, rng)
        print(f"\nload average at the end {os.getloadavg()}")
        return
    print("## Factored vs dense vertex (depth 4, width 64; posterior terms: 40% training inputs, σ² = 0.01)\n")
    print(
        "| activation | N | dense (exact) | factored | dense/factored | max rel. err. of V | max |err|/s.e. | "
        "err. of 1/n mean term | err. of 1/n cov. term | peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for act in [] if many_only else activations:
        dense_vs_factored(act, 12 if quick else 20, rng)
    print("\n## Many inputs: prior statistics and the O(1/n) posterior marginals (width 512, σ² = 0.01)\n")
    print(
        "| activation | N (N_A + N_B) | depth | prior_statistics cold | warm | nlo_posterior_marginals cold | warm | "
        "MC s.e. / 1/n term (mean / variance) | rank of V | peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    cases = {act: many_inputs(act, 20 if quick else 100, 180 if quick else 900, 10, rng) for act in activations}
    if with_joint:
        print("\n## The joint O(1/n) posterior covariance over all test inputs (same inputs and draws)\n")
        print(
            "| activation | N (N_A + N_B) | nlo_posterior_moments cold | warm | max |diag − marginals| | "
            "MC s.e. / 1/n cov. term | peak RSS GiB |"
        )
        print("|---|---|---|---|---|---|---|")
        for act, case in cases.items():
            joint(act, case)
    print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N = 12 and N = 200 instead of 20 and 1000")
    p.add_argument("--activations", nargs="+", default=["relu", "tanh"], choices=["relu", "tanh", "gelu"])
    p.add_argument("--many-only", action="store_true", help="only the second table (e.g. on a GPU)")
    p.add_argument("--joint", action="store_true", help="also the joint posterior covariance (a third table)")
    p.add_argument("--likelihood", action="store_true", help="only the order-1 likelihood table (one vs two passes)")
    p.add_argument("--remat", action="store_true", help="only table 5 (reverse mode with and without checkpoints)")
    p.add_argument("--remat-case", nargs=3, metavar=("ACT", "N", "REMAT"), help=argparse.SUPPRESS)
    p.add_argument("--unroll", action="store_true", help="only table 6 (the pair integrals' loop unrolled 4 vs 1)")
    p.add_argument("--unroll-case", nargs=2, metavar=("CASE", "UNROLL"), help=argparse.SUPPRESS)
    p.add_argument("--shift", action="store_true", help="only table 7 (the pair integrals by the addition theorem)")
    p.add_argument("--shift-case", nargs=2, metavar=("CASE", "ON"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.shift_case:
        shift_case(a.shift_case[0], bool(int(a.shift_case[1])))
    elif a.shift:
        shift_table()
    elif a.unroll_case:
        unroll_case(a.unroll_case[0], int(a.unroll_case[1]))
    elif a.unroll:
        unroll_table()
    elif a.remat_case:
        remat_case(a.remat_case[0], int(a.remat_case[1]), bool(int(a.remat_case[2])))
    elif a.remat:
        remat_table(a.activations)
    else:
        main(a.quick, a.activations, a.many_only, a.joint, a.likelihood)
