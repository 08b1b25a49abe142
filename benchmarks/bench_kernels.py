"""Benchmark: infinite-width kernels and the trained-network prediction, eft_prob vs plain NumPy.

Measures, in float64 on the CPU:

1. ``eft_prob.theory.kernels(spec, X)`` (NNGP K^(ℓ) and NTK Θ^(ℓ) of all L layers) for N random inputs
   (input_dim 8, ‖x‖ ≈ 1), a depth-5 MLP, ReLU (C_W = 2) and erf (C_W = π/4): the jitted call with
   ``regularize=False`` (compile time reported separately) and the eager call with ``regularize=True``
   (which adds the PSD check);
2. the infinite-width trained distribution for N_A train / N_B test inputs: eager
   ``eft_prob.theory.gd_prediction`` (converged, ``steps=None``, and a finite number of steps), and a
   jitted function of (X, y, X_test) calling ``theory.training.gd_moments`` on the blocks of
   ``theory.kernels(..., regularize=False)``;
3. a plain NumPy float64 baseline of the same recursions (arc-cosine / arcsine closed forms) and of the
   GD prediction (``numpy.linalg.eigh``), checked against eft_prob to ~1e-10, with the ratios
   baseline time / eft_prob time;
4. the peak resident memory of the process.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/bench_kernels.py [--n-inputs 1000] [--repeats 5] [--json out.json]

See ``benchmarks/README.md`` for how to read the output.  Every timing is the wall-clock time of a call
followed by ``block_until_ready``; "min" is the best of ``--repeats`` calls (the figure compared with the
targets: the least disturbed by other processes), "median" and "max" show the spread.
"""

from __future__ import annotations

import os
import sys


def _early_blas_threads(argv):
    """--blas-threads must act before NumPy / SciPy load OpenBLAS, so it is read here, not by argparse."""
    for i, a in enumerate(argv):
        value = (
            a.split("=", 1)[1]
            if a.startswith("--blas-threads=")
            else (argv[i + 1] if a == "--blas-threads" and i + 1 < len(argv) else None)
        )
        if value is not None:
            for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[var] = value


_early_blas_threads(sys.argv[1:])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_platforms", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import eft_prob  # noqa: E402
from eft_prob.spec import MLPSpec  # noqa: E402
from eft_prob.theory import gd_prediction, kernels, output_kernels  # noqa: E402
from eft_prob.theory.training import gd_moments  # noqa: E402

# Targets set by the project (seconds, best of the repeats, on the 2-core development machine).
TARGET_KERNELS_S = 0.10
TARGET_GD_S = 0.05

INPUT_DIM = 8
HIDDEN = (512,) * 4  # depth L = 5; the widths do not enter the infinite-width kernels
CASES = (("relu", 2.0), ("erf", math.pi / 4))
GD_STEPS = 100
TOL = 1e-10


# ------------------------------------------------------------------------------------------------
# Plain NumPy float64 baseline (independent of eft_prob; THEORY.md §3.5, §4.5; book §10.2).


def np_pair(activation: str, K):
    """(⟨σ_ασ_β⟩_K, ⟨σ'_ασ'_β⟩_K) for an (N, N) kernel K, closed forms."""
    d = np.diag(K)
    if activation == "relu":
        # Arc-cosine kernels (Cho & Saul): cos ψ = K12/√(K11K22),
        # ⟨σσ⟩ = √(K11K22)/(2π) [sin ψ + (π−ψ) cos ψ],  ⟨σ'σ'⟩ = (π−ψ)/(2π).
        s = np.sqrt(np.outer(d, d))
        cos = np.clip(K / s, -1.0, 1.0)
        psi = np.arccos(cos)
        ss = s / (2 * np.pi) * (np.sin(psi) + (np.pi - psi) * cos)
        dd = (np.pi - psi) / (2 * np.pi)
        return ss, dd
    if activation == "erf":
        # Arcsine kernels (Williams 1997), σ' = (2/√π) e^{-z²}.
        a = 1 + 2 * d
        den = np.outer(a, a)
        ss = (2 / np.pi) * np.arcsin(2 * K / np.sqrt(den))
        dd = (4 / np.pi) / np.sqrt(den - 4 * K * K)
        return ss, dd
    raise ValueError(activation)


def np_kernels(activation: str, X, C_b, C_W, lambda_b=1.0, lambda_W=1.0, depth=5):
    """NNGP and NTK of all layers, shape (L, N, N) each: Θ' = λ_b + λ_W⟨σσ⟩ + C_W⟨σ'σ'⟩Θ."""
    G = X @ X.T / X.shape[1]
    G = (G + G.T) / 2
    K = C_b + C_W * G
    T = lambda_b + lambda_W * G
    Ks, Ts = [K], [T]
    for _ in range(depth - 1):
        ss, dd = np_pair(activation, K)
        K, T = C_b + C_W * ss, lambda_b + lambda_W * ss + C_W * dd * T
        Ks.append(K)
        Ts.append(T)
    return np.stack(Ks), np.stack(Ts)


def np_gd_prediction(activation, X, y, X_test, C_b, C_W, learning_rate=None, steps=None, depth=5):
    """Mean (N_B, 1) and covariance (N_B, N_B) of the trained infinite-width outputs."""
    nA = X.shape[0]
    Ks, Ts = np_kernels(activation, np.concatenate([X, X_test]), C_b, C_W, depth=depth)
    K, T = Ks[-1], Ts[-1]
    K_AA, K_AB, K_BB = K[:nA, :nA], K[:nA, nA:], K[nA:, nA:]
    lam, U = np.linalg.eigh(T[:nA, :nA])
    tiny = lam <= 1e-13 * np.max(np.abs(lam))
    lam_safe = np.where(tiny, 1.0, lam)
    if steps is None:
        phi = np.where(tiny, 0.0, 1.0 / lam_safe)
    else:
        growth = -np.expm1(steps * np.log1p(-learning_rate * lam))  # 1 − (1 − ηλ)^t, 0 < ηλ < 1 here
        phi = np.where(tiny, learning_rate * steps, growth / lam_safe)
    P = ((T[nA:, :nA] @ U) * phi) @ U.T
    mean = P @ y
    PK = P @ K_AB
    cov = K_BB - PK - PK.T + P @ K_AA @ P.T
    return mean, (cov + cov.T) / 2


# ------------------------------------------------------------------------------------------------
# Timing helpers.


def block(x):
    return jax.block_until_ready(x)


def timed(fn, repeats):
    """Run fn() `repeats` times; return (list of seconds, last result)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = block(fn())
        times.append(time.perf_counter() - t0)
    return times, out


def first_call(fn):
    t0 = time.perf_counter()
    out = block(fn())
    return time.perf_counter() - t0, out


def stats(times):
    t = np.asarray(times)
    return {"min": float(t.min()), "median": float(np.median(t)), "max": float(t.max()), "n": len(times)}


def rel_err(a, b):
    """max |a − b| / max |b|."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def rel_err_layers(a, b):
    return max(rel_err(a[i], b[i]) for i in range(b.shape[0]))


# ------------------------------------------------------------------------------------------------


def eft_kernels(act, C_W, X, repeats):
    """Time eft_prob.theory.kernels (jitted, and eager with the PSD check); return rows and outputs."""
    spec = MLPSpec(INPUT_DIM, HIDDEN, 1, act, C_b=0.0, C_W=C_W)
    Xj = jnp.asarray(X)
    tag = f"{act}(C_W={C_W:.4g})"
    N = X.shape[0]

    jitted = jax.jit(lambda X: kernels(spec, X, regularize=False))
    t_first, out = first_call(lambda: jitted(Xj))
    t_jit, out = timed(lambda: jitted(Xj), repeats)

    # what nngp(spec, X) and ntk(spec, X) compute: the output layer only, both kernels in one pass
    jitted_out = jax.jit(lambda X: output_kernels(spec, X, regularize=False))
    t_first_out, out_last = first_call(lambda: jitted_out(Xj))
    t_out, out_last = timed(lambda: jitted_out(Xj), repeats)

    eager = lambda: kernels(spec, Xj)  # regularize=True: PSD check of K^(L) and Θ^(L)
    with warnings.catch_warnings(record=True) as caught:  # a RegularizationWarning would be a finding
        warnings.simplefilter("always")
        t_eager_first, _ = first_call(eager)
        t_eager, out_eager = timed(eager, repeats)

    rows = {
        f"kernels/{act}/output/jit": {
            "what": f"nngp+ntk (output layer) {tag} N={N} L={spec.depth}, jit",
            "eft_prob": stats(t_out),
            "compile_first_call_s": t_first_out,
            "target_s": TARGET_KERNELS_S,
        },
        f"kernels/{act}/jit": {
            "what": f"kernels, all layers {tag} N={N} L={spec.depth}, jit",
            "eft_prob": stats(t_jit),
            "compile_first_call_s": t_first,
            "target_s": None,
        },
        f"kernels/{act}/eager+psd": {
            "what": f"kernels {tag} N={N} L={spec.depth}, eager, regularize=True",
            "eft_prob": stats(t_eager),
            "first_call_s": t_eager_first,
            "target_s": None,
            "warnings": sorted({f"{w.category.__name__}: {w.message}" for w in caught}),
        },
    }
    outs = {
        "jit": (np.asarray(out.nngp), np.asarray(out.ntk)),
        "output": (np.asarray(out_last.nngp)[None], np.asarray(out_last.ntk)[None]),
        "eager": (np.asarray(out_eager.nngp), np.asarray(out_eager.ntk)),
    }
    return rows, outs


def numpy_kernels(act, C_W, X, repeats, rows, outs):
    np_fn = lambda: np_kernels(act, X, 0.0, C_W, depth=len(HIDDEN) + 1)
    np_fn()  # warm-up
    t_np, (K_np, T_np) = timed(np_fn, repeats)
    errors = {}
    for mode, (K, T) in outs.items():
        errors[f"nngp_{mode}_vs_numpy"] = rel_err_layers(K, K_np[-K.shape[0] :])
        errors[f"ntk_{mode}_vs_numpy"] = rel_err_layers(T, T_np[-T.shape[0] :])
    for row in rows.values():
        row["numpy"] = stats(t_np)
        row["errors"] = errors


def gd_learning_rate(act, C_W, X):
    """η = 1/(2 λ_max(Θ̃)): a quarter of the GD stability bound 2/λ_max (so no StabilityWarning)."""
    spec = MLPSpec(INPUT_DIM, HIDDEN, 1, act, C_b=0.0, C_W=C_W)
    T = kernels(spec, jnp.asarray(X)).ntk[-1]
    return 0.5 / float(jnp.linalg.eigvalsh(T)[-1])


def eft_gd(act, C_W, X, y, X_test, eta, repeats):
    spec = MLPSpec(INPUT_DIM, HIDDEN, 1, act, C_b=0.0, C_W=C_W)
    nA, nB = X.shape[0], X_test.shape[0]
    Xj, yj, Xtj = jnp.asarray(X), jnp.asarray(y), jnp.asarray(X_test)
    tag = f"{act}(C_W={C_W:.4g})"

    def jit_gd(steps):
        def f(X, y, Xt):
            K, T = output_kernels(spec, jnp.concatenate([X, Xt]), regularize=False)
            return gd_moments(
                K[:nA, :nA],
                K[:nA, nA:],
                K[nA:, nA:],
                T[:nA, :nA],
                T[nA:, :nA],
                y,
                None if steps is None else eta,
                steps,
            )

        jf = jax.jit(f)
        return lambda: jf(Xj, yj, Xtj)

    variants = {
        "eager/converged": (lambda: gd_prediction(spec, Xj, yj, Xtj), None, False),
        f"eager/steps={GD_STEPS}": (lambda: gd_prediction(spec, Xj, yj, Xtj, eta, GD_STEPS), GD_STEPS, False),
        "jit/converged": (jit_gd(None), None, True),
        f"jit/steps={GD_STEPS}": (jit_gd(GD_STEPS), GD_STEPS, True),
    }
    rows, outs = {}, {}
    for name, (call, steps, is_jit) in variants.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t_first, _ = first_call(call)
            t_eft, out = timed(call, repeats)
        key = f"gd/{act}/{name}"
        rows[key] = {
            "what": f"gd prediction {tag} {nA} train / {nB} test, {name}",
            "eft_prob": stats(t_eft),
            ("compile_first_call_s" if is_jit else "first_call_s"): t_first,
            "target_s": TARGET_GD_S,
            "learning_rate": eta if steps is not None else None,
            "steps": steps,
            "warnings": sorted({f"{w.category.__name__}: {w.message}" for w in caught}),
        }
        outs[key] = (np.asarray(out.mean), np.asarray(out.cov))
    return rows, outs


def numpy_gd(act, C_W, X, y, X_test, eta, repeats, rows, outs):
    cache = {}
    for key, row in rows.items():
        steps = row["steps"]
        if steps not in cache:
            np_fn = lambda steps=steps: np_gd_prediction(act, X, y, X_test, 0.0, C_W, eta, steps, len(HIDDEN) + 1)
            np_fn()
            cache[steps] = timed(np_fn, repeats)
        t_np, (mean_np, cov_np) = cache[steps]
        mean, cov = outs[key]
        row["numpy"] = stats(t_np)
        row["errors"] = {"mean_vs_numpy": rel_err(mean, mean_np), "cov_vs_numpy": rel_err(cov, cov_np)}


# ------------------------------------------------------------------------------------------------


def print_table(results, meta):
    print()
    print(
        f"eft_prob {meta['eft_prob']}  jax {meta['jax']}  numpy {meta['numpy']}  "
        f"CPU: {meta['cpu_count']} cores  backend {meta['backend']}  float64"
    )
    print(f"OPENBLAS_NUM_THREADS={meta['OPENBLAS_NUM_THREADS']}  XLA_FLAGS={meta['XLA_FLAGS']}")
    print(
        f"load average at start {meta['loadavg_start']}, at end {meta['loadavg_end']} "
        "(other processes slow every figure down; compare 'min')"
    )
    print()
    hdr = (
        f"{'case':68s} {'eft min':>9s} {'median':>8s} {'max':>8s} {'compile':>8s} "
        f"{'numpy min':>9s} {'np/eft':>7s} {'target':>7s}  status  {'max rel err':>11s}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in results.values():
        e, n = r["eft_prob"], r["numpy"]
        comp = r.get("compile_first_call_s", r.get("first_call_s"))
        ratio = n["min"] / e["min"]
        tgt = r["target_s"]
        status = "" if tgt is None else ("ok" if e["min"] <= tgt else "MISS")
        err = max(r["errors"].values())
        ms = lambda s: f"{1e3 * s:7.1f}ms"
        print(
            f"{r['what']:68s} {ms(e['min']):>9s} {ms(e['median']):>8s} {ms(e['max']):>8s} "
            f"{ms(comp):>8s} {ms(n['min']):>9s} {ratio:7.2f} "
            f"{'' if tgt is None else ms(tgt):>7s}  {status:6s}  {err:11.1e}"
            f"{'' if err <= TOL else '  > tol!'}"
        )
        for w in r.get("warnings", []):
            print(f"    warning: {w[:150]}")
    print()
    print("compile: first call of the jitted function (trace + compile + one run); for eager rows, the")
    print("first eager call.  np/eft > 1: eft_prob is faster than the NumPy baseline.  max rel err:")
    print(f"max|eft − numpy| / max|numpy| over layers and outputs (tolerance {TOL:g}).")
    print(f"peak RSS: {meta['peak_rss_mib']:.0f} MiB   total wall time: {meta['wall_s']:.1f} s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-inputs", type=int, default=1000, help="N for the kernel benchmark (default 1000)")
    p.add_argument("--n-train", type=int, default=200, help="training inputs for GD (default 200)")
    p.add_argument("--n-test", type=int, default=500, help="test inputs for GD (default 500)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument(
        "--blas-threads",
        metavar="N",
        help="set OPENBLAS/OMP/MKL_NUM_THREADS=N for this run "
        "(default: leave the environment as it is); see benchmarks/README.md",
    )
    args = p.parse_args(argv)
    if args.repeats < 1 or args.n_inputs < 2 or args.n_train < 2 or args.n_test < 1:
        p.error("need --repeats >= 1, --n-inputs >= 2, --n-train >= 2, --n-test >= 1")

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    rng = np.random.default_rng(args.seed)
    gauss_inputs = lambda n: rng.normal(size=(n, INPUT_DIM)) / math.sqrt(INPUT_DIM)
    X = gauss_inputs(args.n_inputs)
    X_A, X_B = gauss_inputs(args.n_train), gauss_inputs(args.n_test)
    y_A = np.sin(2 * X_A.sum(axis=1, keepdims=True))

    # Phase 1: eft_prob only.  Phase 2: the NumPy baseline.  (NumPy's OpenBLAS threads keep spinning
    # for a while after each call; interleaving them with the eft_prob timings slows those down.)
    eft_rows, eft_outs, etas = {}, {}, {}
    for act, C_W in CASES:
        print(f"[bench] eft_prob kernels {act} ...", file=sys.stderr, flush=True)
        eft_rows[("k", act)], eft_outs[("k", act)] = eft_kernels(act, C_W, X, args.repeats)
    for act, C_W in CASES:
        print(f"[bench] eft_prob gd {act} ...", file=sys.stderr, flush=True)
        etas[act] = gd_learning_rate(act, C_W, X_A)
        eft_rows[("g", act)], eft_outs[("g", act)] = eft_gd(act, C_W, X_A, y_A, X_B, etas[act], args.repeats)
    for act, C_W in CASES:
        print(f"[bench] numpy baseline {act} ...", file=sys.stderr, flush=True)
        numpy_kernels(act, C_W, X, args.repeats, eft_rows[("k", act)], eft_outs[("k", act)])
        numpy_gd(act, C_W, X_A, y_A, X_B, etas[act], args.repeats, eft_rows[("g", act)], eft_outs[("g", act)])
    results = {}
    for kind in ("k", "g"):
        for act, _ in CASES:
            results.update(eft_rows[(kind, act)])

    meta = {
        "eft_prob": getattr(eft_prob, "__version__", "?"),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "x64": bool(jax.config.jax_enable_x64),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
        "loadavg_start": tuple(round(v, 2) for v in load_start),
        "loadavg_end": tuple(round(v, 2) for v in os.getloadavg()),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "wall_s": time.perf_counter() - t_start,
        "args": vars(args),
        "tolerance": TOL,
    }
    print_table(results, meta)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=2)
        print(f"wrote {args.json}")
    bad = [k for k, r in results.items() if max(r["errors"].values()) > TOL]
    if bad:
        print(f"CROSS-CHECK FAILED (> {TOL:g}): {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
