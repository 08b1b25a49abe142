"""Benchmark against the reference implementation, Neural Tangents 0.6.5, with peak memory.

Four worker processes, so that each peak resident memory (``ru_maxrss``) belongs to one job:

1. ours, analytic: ``eft_prob.theory.output_kernels`` (NNGP K and NTK Θ of the output layer, float64)
   for N inputs, depth 5 (four hidden layers), ReLU and erf;
2. NT, analytic: stax ``kernel_fn(X, None, ("nngp", "ntk"))`` of the same network (float64), under
   the pinned interpreter ``--ref-python`` (jax 0.5.3; ``nt_reference_worker.py`` never imports
   eft_prob); agreement with (1) is checked to ~1e-10;
3. ours, Monte Carlo: ``eft_prob.mc_kernels.kernel_moments`` (mean AND variance of the NNGP metric and
   the empirical NTK) over M initializations at width n, float32 networks (NT's default precision)
   with float64 accumulators; a cold call (compilation included), then ``--repeats`` warm calls with
   new keys (min reported); XLA's memory analysis of the compiled program; ``--f64`` adds float64;
4. NT, Monte Carlo: ``nt.monte_carlo_kernel_fn`` (mean only) with ``--ref-samples`` samples, each
   timed; when that is fewer than M, NT's time for M samples is extrapolated as
   first sample (with compilation) + (M − 1) × mean of the others (NT's estimator is a Python loop
   of one compiled per-sample function, so the cost is linear in the number of samples).

Parameterization: Dense(W_std = √C_W, b_std = √C_b, parameterization='ntk') is eft_prob's network
with λ_W = C_W and λ_b = C_b.  The two Monte Carlo means estimate the same expectations from
different random draws: their difference is compared with its standard error (from our variance;
NT's NNGP estimator f fᵀ has the extra output-sampling variance K_αα K_ββ + K_αβ², added), and each
with the infinite-width theory, which they miss by the O(1/n) corrections.

Usage (repository root)::

    PYTHONPATH=. python benchmarks/bench_reference.py [--quick] [--ref-python /tmp/ntenv/bin/python]
        [--ref-samples 4] [--f64] [--json out.json]

The reference environment: ``python3 -m venv /tmp/ntenv && /tmp/ntenv/bin/pip install jax==0.5.3
jaxlib==0.5.3 tf2jax==0.3.6 neural-tangents==0.6.5``.  Results: ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

FULL = {"n_inputs": 1000, "width": 512, "n_networks": 256, "ref_samples": 4, "repeats": 1}
QUICK = {"n_inputs": 200, "width": 128, "n_networks": 64, "ref_samples": 64, "repeats": 2}


def _config(args, tmp):
    size = dict(QUICK if args.quick else FULL)
    for k in ("n_inputs", "width", "n_networks", "ref_samples", "repeats"):
        if getattr(args, k) is not None:
            size[k] = getattr(args, k)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(size["n_inputs"], 8)) / np.sqrt(8)  # ‖x‖ ≈ 1, input_dim 8 as bench_kernels
    np.save(os.path.join(tmp, "X.npy"), X)
    return {
        **size,
        "inputs": os.path.join(tmp, "X.npy"),
        "depth": 5,
        "activations": ["relu", "erf"],
        "mc_activation": "relu",
        "C_b": {"relu": 0.1, "erf": 0.1},
        "C_W": {"relu": 2.0, "erf": 1.5},
        "seed": 1,
        "analytic_repeats": 5,
        "f64": bool(args.f64),
    }


# ------------------------------------------------------------------------------------------------
# our workers (this interpreter)


def _spec(cfg, act):
    import eft_prob as ep

    C_b, C_W = cfg["C_b"][act], cfg["C_W"][act]
    hidden = (cfg["width"],) * (cfg["depth"] - 1)
    return ep.MLPSpec(8, hidden, 1, act, C_b=C_b, C_W=C_W, lambda_b=C_b, lambda_W=C_W)


def _ours_analytic(cfg):
    import jax

    import eft_prob as ep

    X = np.load(cfg["inputs"])
    out = {}
    for act in cfg["activations"]:
        spec = _spec(cfg, act)
        t0 = time.perf_counter()
        K, T = jax.block_until_ready(ep.theory.output_kernels(spec, X))
        out[f"{act}_cold_s"] = time.perf_counter() - t0
        times = []
        for _ in range(cfg["analytic_repeats"]):
            t0 = time.perf_counter()
            jax.block_until_ready(ep.theory.output_kernels(spec, X))
            times.append(time.perf_counter() - t0)
        out[f"{act}_times_s"] = np.array(times)
        out[f"{act}_nngp"], out[f"{act}_ntk"] = np.asarray(K), np.asarray(T)
    return out


def _ours_mc(cfg):
    import jax

    import eft_prob as ep
    from eft_prob import mc_kernels as mk

    X = np.load(cfg["inputs"])
    spec = _spec(cfg, cfg["mc_activation"])
    M = cfg["n_networks"]
    out = {}
    for dtype in ["float32"] + (["float64"] if cfg["f64"] else []):
        with jax.enable_x64(True):  # XLA's own account of the compiled program's buffers
            _, program, args = mk._setup(spec, X, M, jax.random.key(0), dtype, None, None)
            mem = program.lower(*args).compile().memory_analysis()
        for f in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"):
            out[f"{dtype}_xla_{f}"] = getattr(mem, f, -1) if mem is not None else -1
        t0 = time.perf_counter()
        m = mk.kernel_moments(spec, X, M, jax.random.key(0), dtype=dtype)
        out[f"{dtype}_cold_s"] = time.perf_counter() - t0
        times = []
        for r in range(cfg["repeats"]):
            t0 = time.perf_counter()
            m = mk.kernel_moments(spec, X, M, jax.random.key(1 + r), dtype=dtype)
            times.append(time.perf_counter() - t0)
        out[f"{dtype}_times_s"] = np.array(times)
        for f in ("nngp_mean", "nngp_var", "ntk_mean", "ntk_var"):
            out[f"{dtype}_{f}"] = getattr(m, f)
    with jax.enable_x64(True):
        out["theory_nngp"], out["theory_ntk"] = (np.asarray(a) for a in ep.theory.output_kernels(spec, X))
    out["jax_version"] = np.array(jax.__version__)
    out["eft_prob_version"] = np.array(ep.__version__)
    return out


def _worker(kind, config_path, out_path):
    cfg = json.load(open(config_path))
    out = {"ours-analytic": _ours_analytic, "ours-mc": _ours_mc}[kind](cfg)
    out["maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    np.savez(out_path, **out)


# ------------------------------------------------------------------------------------------------
# driver


def _run(cmd, what, env=None, timeout=3600):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{what} failed (exit {proc.returncode}); its output is above")
    return wall


def _z_summary(diff, se):
    z = np.abs(diff) / se
    return {"rms_z": float(np.sqrt(np.mean(z**2))), "frac_z_gt_3": float(np.mean(z > 3)), "max_z": float(z.max())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (N=200, width 128, 64 networks)")
    ap.add_argument("--ref-python", default="/tmp/ntenv/bin/python", help="interpreter with neural-tangents 0.6.5")
    ap.add_argument("--ref-samples", type=int, help="NT Monte Carlo samples actually run (default 4; quick: all)")
    ap.add_argument("--n-inputs", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--n-networks", type=int)
    ap.add_argument("--repeats", type=int, help="warm calls of our Monte Carlo (min reported)")
    ap.add_argument("--f64", action="store_true", help="also time our Monte Carlo in float64")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", nargs=3, metavar=("KIND", "CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(*args.worker)
    if not os.path.exists(args.ref_python):
        raise SystemExit(f"--ref-python {args.ref_python!r} does not exist; create the environment (see --help)")

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(args, tmp)
        cfg_path = os.path.join(tmp, "config.json")
        json.dump(cfg, open(cfg_path, "w"))
        env_ours = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env_ref = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAX_ENABLE_X64")}
        env_ref.update(TF_CPP_MIN_LOG_LEVEL="3")
        res, wall = {}, {}
        jobs = [
            ("ours-analytic", [sys.executable, __file__, "--worker", "ours-analytic"], env_ours),
            ("nt-analytic", [args.ref_python, os.path.join(HERE, "nt_reference_worker.py"), "analytic"], env_ref),
            ("ours-mc", [sys.executable, __file__, "--worker", "ours-mc"], env_ours),
            ("nt-mc", [args.ref_python, os.path.join(HERE, "nt_reference_worker.py"), "mc"], env_ref),
        ]
        for name, cmd, env in jobs:
            out = os.path.join(tmp, f"{name}.npz")
            print(f"# running {name} ...", flush=True)
            wall[name] = _run(cmd + [cfg_path, out], name, env=env)
            with np.load(out) as z:
                res[name] = {k: z[k] for k in z.files}
    load_end = os.getloadavg()
    report = _report(cfg, res, wall, load_start, load_end)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def _report(cfg, res, wall, load_start, load_end):
    oa, na, om, nm = res["ours-analytic"], res["nt-analytic"], res["ours-mc"], res["nt-mc"]
    gib = lambda b: float(b) / 2**30
    N, n, M = cfg["n_inputs"], cfg["width"], cfg["n_networks"]
    versions = {"ours_jax": str(om["jax_version"]), "eft_prob": str(om["eft_prob_version"]),
                "ref_jax": str(na["jax_version"]), "neural_tangents": str(na["nt_version"])}  # fmt: skip
    rep = {"config": cfg, "load_start": load_start, "load_end": load_end, "versions": versions}
    print(f"\n# N = {N} inputs (dim 8), depth 5; load average {load_start} at start, {load_end} at end")
    print(f"# ours: jax {versions['ours_jax']}, eft_prob {versions['eft_prob']};"
          f" reference: jax {versions['ref_jax']}, neural-tangents {versions['neural_tangents']}\n")  # fmt: skip

    print("## Analytic kernels (float64), min over", cfg["analytic_repeats"], "warm calls\n")
    print("| activation | ours (s) | NT (s) | ours/NT | ours cold (s) | NT cold (s) | max rel. diff NNGP"
          " | max rel. diff NTK | same, off the diagonal |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    rep["analytic"] = {}
    for act in cfg["activations"]:
        t_o, t_n = float(oa[f"{act}_times_s"].min()), float(na[f"{act}_times_s"].min())
        dk = float(np.max(np.abs(oa[f"{act}_nngp"] - na[f"{act}_nngp"])) / np.max(np.abs(na[f"{act}_nngp"])))
        dt = float(np.max(np.abs(oa[f"{act}_ntk"] - na[f"{act}_ntk"])) / np.max(np.abs(na[f"{act}_ntk"])))
        # NT's arc-cosine takes sqrt(K_αα K_ββ - K_αβ²), rounding error ~1e-16 K² on the diagonal, whose
        # square root costs half the digits there; off the diagonal both are exact to ~1e-15
        off = ~np.eye(N, dtype=bool)
        T_o, T_n = oa[f"{act}_ntk"], na[f"{act}_ntk"]
        d_off = float(np.max(np.abs(T_o - T_n)[off]) / np.max(np.abs(T_n)))
        rep["analytic"][act] = {"ours_s": t_o, "nt_s": t_n, "ratio": t_o / t_n,
                                "ours_cold_s": float(oa[f"{act}_cold_s"]), "nt_cold_s": float(na[f"{act}_cold_s"]),
                                "nngp_rel_diff": dk, "ntk_rel_diff": dt,
                                "ntk_rel_diff_offdiag": d_off}  # fmt: skip
        print(f"| {act} | {t_o:.3f} | {t_n:.3f} | {t_o / t_n:.2f} | {float(oa[f'{act}_cold_s']):.2f} |"
              f" {float(na[f'{act}_cold_s']):.2f} | {dk:.1e} | {dt:.1e} | {d_off:.1e} |")  # fmt: skip

    S = len(nm["mc_sample_times_s"])
    st = nm["mc_sample_times_s"]
    per = float(st[1:].mean()) if S > 1 else float(st[0])
    nt_M = float(st[0]) + (M - 1) * per if S < M else float(nm["mc_total_s"])
    ours = float(om["float32_times_s"].min())
    mc = {"ours_f32_s": ours, "ours_f32_cold_s": float(om["float32_cold_s"]), "nt_samples_run": S,
          "nt_first_sample_s": float(st[0]), "nt_per_sample_s": per, "nt_M_s": nt_M,
          "nt_M_extrapolated": S < M, "ratio_ours_over_nt": ours / nt_M}  # fmt: skip
    if cfg["f64"]:
        mc["ours_f64_s"] = float(om["float64_times_s"].min())
        mc["ours_f64_cold_s"] = float(om["float64_cold_s"])
    print(f"\n## Monte Carlo kernels: {M} initializations, width {n}, {cfg['mc_activation']}, float32 networks\n")
    print("| | ours: mean + variance of NNGP and NTK | NT monte_carlo_kernel_fn: means |")
    print("|---|---|---|")
    est = f" (extrapolated from {S} samples)" if S < M else ""
    warm = f"{ours:.1f} (warm, min of {len(om['float32_times_s'])}); cold {mc['ours_f32_cold_s']:.1f}"
    print(f"| time for {M} networks (s) | {warm} | {nt_M:.0f}{est} |")
    print(f"| per network (s) | {ours / M:.3f} | {per:.2f} (first, with compilation: {float(st[0]):.1f}) |")
    print(f"| ratio ours/NT | {ours / nt_M:.4f} (NT/ours = {nt_M / ours:.0f}x) | |")
    print(f"| peak RSS of the process (GiB) | {gib(om['maxrss_bytes']):.2f} | {gib(nm['maxrss_bytes']):.2f} |")
    print(f"| XLA temp buffers (GiB) | {gib(om['float32_xla_temp_size_in_bytes']):.3f} | |")
    if cfg["f64"]:
        print(f"| float64 networks (s) | {mc['ours_f64_s']:.1f} (cold {mc['ours_f64_cold_s']:.1f}) | |")
    mc["ours_maxrss_gib"], mc["nt_maxrss_gib"] = gib(om["maxrss_bytes"]), gib(nm["maxrss_bytes"])
    mc["ours_xla_temp_gib"] = gib(om["float32_xla_temp_size_in_bytes"])
    rep["analytic_maxrss_gib"] = {"ours": gib(oa["maxrss_bytes"]), "nt": gib(na["maxrss_bytes"])}
    print(f"\npeak RSS, analytic: ours {gib(oa['maxrss_bytes']):.2f} GiB, NT {gib(na['maxrss_bytes']):.2f} GiB")

    # agreement: the same statistics from different random draws
    mG, vG, mT, vT = (om[f"float32_{f}"] for f in ("nngp_mean", "nngp_var", "ntk_mean", "ntk_var"))
    d = np.diag(mG)
    v_ff = np.outer(d, d) + mG**2 + vG  # Var of one output's f_α f_β: E[G_αα G_ββ + G_αβ²] + Var G_αβ
    checks = {
        "NNGP: ours - NT": _z_summary(mG - nm["mc_nngp_mean"], np.sqrt(vG / M + v_ff / S)),
        "NTK: ours - NT": _z_summary(mT - nm["mc_ntk_mean"], np.sqrt(vT / M + vT / S)),
        "NNGP: ours - K": _z_summary(mG - om["theory_nngp"], np.sqrt(vG / M)),
        "NTK: ours - Θ": _z_summary(mT - om["theory_ntk"], np.sqrt(vT / M)),
        "NNGP: NT - K": _z_summary(nm["mc_nngp_mean"] - om["theory_nngp"], np.sqrt(v_ff / S)),
        "NTK: NT - Θ": _z_summary(nm["mc_ntk_mean"] - om["theory_ntk"], np.sqrt(vT / S)),
    }
    for k, a, b in (("NNGP", mG, om["theory_nngp"]), ("NTK", mT, om["theory_ntk"])):
        mc[f"ours_{k}_rel_frobenius_vs_theory"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    print(f"\n## Agreement of the Monte Carlo means (z = difference / its standard error, over all {N}² entries)\n")
    print("| comparison | rms z | fraction |z| > 3 | max |z| |")
    print("|---|---|---|---|")
    for k, s in checks.items():
        print(f"| {k} | {s['rms_z']:.2f} | {s['frac_z_gt_3']:.4f} | {s['max_z']:.1f} |")
    rel_G, rel_T = mc["ours_NNGP_rel_frobenius_vs_theory"], mc["ours_NTK_rel_frobenius_vs_theory"]
    print(
        f"\nours vs infinite-width theory, relative Frobenius error: NNGP {rel_G:.2e}, NTK {rel_T:.2e}"
        f" (1/n corrections at n = {n} plus Monte Carlo error)"
    )
    mc["agreement"] = checks
    rep["mc"] = mc
    rep["wall_s"] = wall
    print(f"\nworker wall times (s): {', '.join(f'{k} {v:.0f}' for k, v in wall.items())}")
    return rep


if __name__ == "__main__":
    main()
