"""Validate the O(1/n) mean and covariance of GD-trained networks against trained ensembles (manual run).

    python benchmarks/validate_trained_nlo.py [--quick] [--cases tanh,gelu,tanh2] [--out results.npz]

For each case (depth 3, 1-D inputs, three training points with a well-conditioned NTK Gram,
test points incl. one extrapolation) and width n, an ensemble of real networks drawn from the
prior is trained by full-batch GD (λ-scaled rates, η = 1/λ_max(Θ̃), to convergence) and the
mean and covariance of the trained test outputs are estimated with control variates (see
tests/theory/ntk_mc.py:trained_moment_estimates; the mean's control variate, centred on the exact
infinite-width NTK, removes the H^{1} part of the 1/n coefficient, which tests/theory/
test_ntk_stats_mc.py checks separately, so the mean rows compare with mean1 − Π H1 Θ̃⁻¹ y).  The table
shows n·(estimate − order 0), which the theory predicts to be that coefficient + O(1/n); fits of
c + b/n (and c + b/n + b₂/n²) give the extrapolated coefficient c ± se to compare with the prediction.
This takes ~1 hour on 2 CPU cores; tests/theory/test_training_nlo.py runs a small version in CI.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import eft_prob as ep  # noqa: E402
from eft_prob.theory.training import nlo_trained_coefficients  # noqa: E402
from tests.conftest import fit_inverse_powers  # noqa: E402
from tests.theory.ntk_mc import h1_mean_part, trained_ensemble, trained_moment_estimates  # noqa: E402

XA = np.array([[-1.2], [0.1], [1.3]])
XB = np.array([[-0.6], [0.6], [2.0]])  # 2.0 extrapolates
Y1 = np.array([[0.5], [-0.4], [0.3]])
Y2 = np.array([[0.5, -0.2], [-0.4, 0.6], [0.3, 0.1]])

TANH_WIDTHS = (16, 24, 32, 48, 64, 96, 128, 256, 512)
TANH_SIZES = (20000, 16000, 12000, 10000, 8000, 6000, 4000, 1500, 600)
CASES = {
    "tanh": dict(
        act="tanh",
        kw=dict(C_b=0.1, C_W=1.5, lambda_b=0.5, lambda_W=1.0),
        y=Y1,
        runs=list(zip(TANH_WIDTHS, TANH_SIZES)),
    ),
    "gelu": dict(
        act="gelu",
        kw=dict(C_b=0.1, C_W=2.0, lambda_b=0.5, lambda_W=1.0),
        y=Y1,
        runs=[(16, 16000), (32, 10000), (64, 6000), (128, 3000)],
    ),
    # the widths: 64 ... 1024 (the c + b/n fits use n >= 32 rows)
    "tanh_wide": dict(
        act="tanh",
        kw=dict(C_b=0.1, C_W=1.5, lambda_b=0.5, lambda_W=1.0),
        y=Y1,
        runs=[(64, 4000), (128, 3000), (256, 2000), (512, 1500), (1024, 1000)],
        steps=250,  # finite steps (the theory is evaluated at the same t): residual loss ~1e-9
    ),
    "gelu_wide": dict(
        act="gelu",
        kw=dict(C_b=0.1, C_W=2.0, lambda_b=0.5, lambda_W=1.0),
        y=Y1,
        runs=[(64, 3000), (128, 2000), (256, 1500), (512, 800)],
        steps=250,
    ),
    "tanh2": dict(  # two output neurons: cross-neuron terms (the n_L factors of THEORY.md §9.5)
        act="tanh",
        kw=dict(C_b=0.1, C_W=1.5, lambda_b=0.5, lambda_W=1.0),
        y=Y2,
        runs=[(16, 10000), (32, 6000), (64, 4000)],
    ),
}


def run_case(name, case, quick, steps=400, save=None):
    y = case["y"]
    mk = lambda n: ep.MLPSpec(1, (n, n), y.shape[1], case["act"], **case["kw"])
    X = np.concatenate([XA, XB])
    k = ep.theory.kernels(mk(8), X)
    K, Th = np.asarray(k.nngp[-1]), np.asarray(k.ntk[-1])
    eta = 1.0 / np.linalg.eigvalsh(Th[:3, :3])[-1]
    th = nlo_trained_coefficients(mk(8), XA, y, XB, eta, case.get("steps"))
    h1 = h1_mean_part(np.asarray(ep.theory.ntk_statistics(mk(8), X, derivatives=False).H1), Th, 3, y)
    out = {"widths": [], "mean": [], "se_mean": [], "cov": [], "se_cov": [], "max_loss": [], "seconds": []}
    raw = {}
    for n, M in case["runs"]:
        M = max(200, M // 10) if quick else M
        t0 = time.time()
        chunk = int(max(8, min(512, 2**22 // (n * n))))
        ens = trained_ensemble(mk(n), XA, y, XB, eta, steps, M, jax.random.key(7919 * n + len(name)), chunk=chunk)
        m, sm, c, sc = trained_moment_estimates(ens, K, Th, 3, y)
        raw.update({f"n{n}_{k}": v for k, v in ens.items()})
        for key, v in zip(("widths", "mean", "se_mean", "cov", "se_cov"), (n, m, sm, c, sc)):
            out[key].append(v)
        out["max_loss"].append(float(ens["loss"].max()))
        out["seconds"].append(time.time() - t0)
        dt, loss = time.time() - t0, ens["loss"].max()
        print(f"  {name}: n={n:4d} M={M:6d} {dt:7.1f}s  max final loss {loss:.1e}", flush=True)
        if save is not None:  # keep what is finished (a long run may be stopped)
            save({k: np.array(v) for k, v in out.items()}, raw)
    res = {k: np.array(v) for k, v in out.items()}
    res.update(mean0=th.mean0, mean1=th.mean1, cov0=th.cov0, cov1=th.cov1, eta=eta, h1=h1, **raw)
    res = {k: np.asarray(v) for k, v in res.items()}
    return res


def _fit(widths, values, ses, powers):
    (c, *_), (sc, *_), chi2 = fit_inverse_powers(widths, values, ses, (0, *powers))
    return c, sc, chi2


def report(name, r):
    W = r["widths"]
    nB = r["mean0"].shape[0]
    rows = []
    d_mean = W[:, None] * (r["mean"].reshape(len(W), -1) - r["mean0"].ravel())
    s_mean = W[:, None] * r["se_mean"].reshape(len(W), -1)
    iu = np.triu_indices(r["cov0"].shape[0])
    d_cov = W[:, None] * (r["cov"][:, iu[0], iu[1]] - r["cov0"][iu])
    s_cov = W[:, None] * r["se_cov"][:, iu[0], iu[1]]
    labels = [f"mean[{b},{i}]" for b in range(nB) for i in range(r["mean0"].shape[1])]
    labels += [f"cov[{a},{b}]" for a, b in zip(*iu)]
    # the mean's control variate removes the H^{1} part (tests/theory/ntk_mc.py): compare without it
    pred = np.concatenate([(r["mean1"] - r["h1"]).ravel(), r["cov1"][iu]])
    vals, ses = np.concatenate([d_mean, d_cov], 1), np.concatenate([s_mean, s_cov], 1)
    print(f"\n== {name}: n·(ensemble − order 0) per width, fits, and the O(1/n) prediction (η = {r['eta']:.4f})")
    print(
        f"   (mean rows without the H1 part Π H1 Θ̃⁻¹ y = {np.round(r['h1'].ravel(), 4)}, full mean1 = "
        f"{np.round(r['mean1'].ravel(), 4)})"
    )
    head = "".join(f"{f'n={n}':>17s}" for n in W)
    print("quantity     " + head + f"{'c+b/n':>17s}{'c+b/n+b2/n²':>17s}{'theory':>9s}")
    for j, lab in enumerate(labels):
        c1, s1, _ = _fit(W[W >= 32], vals[W >= 32, j], ses[W >= 32, j], (1,)) if np.sum(W >= 32) >= 2 else (np.nan,) * 3
        c2, s2, _ = _fit(W, vals[:, j], ses[:, j], (1, 2)) if len(W) >= 3 else (np.nan,) * 3
        cells = "".join(f"{v:8.3f}±{s:<8.3f}" for v, s in zip(vals[:, j], ses[:, j]))
        print(f"{lab:12s} {cells}{c1:8.3f}±{s1:<8.3f}{c2:8.3f}±{s2:<8.3f}{pred[j]:9.3f}")
        rows.append((lab, c1, s1, c2, s2, pred[j]))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = {}
    for name in args.cases.split(","):
        print(f"running {name} ...", flush=True)

        def save(part, raw, name=name):
            if args.out:
                np.savez_compressed(args.out + f".{name}.partial.npz", **part, **raw)

        results[name] = run_case(name, CASES[name], args.quick, CASES[name].get("steps", 400), save)
        if args.out:
            np.savez_compressed(args.out, **{f"{c}/{k}": v for c, r in results.items() for k, v in r.items()})
        report(name, results[name])


if __name__ == "__main__":
    main()
