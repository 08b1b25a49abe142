"""Validate the O(1/n) Bayesian posterior (THEORY.md §5.2) against NUTS posteriors of real finite-width MLPs.

    python benchmarks/validate_bayes_nlo.py [--quick] [--cases tanh1d,relu2d] [--widths 8,16,32,64]
                                            [--json out.json]

For each case (a small regression data set: 6 training points, 1-D or 2-D inputs, 4–5 test points
incl. extrapolations) and hidden width n, NUTS samples the weights of the Bayesian MLP
(``eft_prob.inference.run_nuts``) and gives the posterior predictive mean and variance of f(X_test)
with ESS-based Monte Carlo standard errors.  These are compared with

* order 0: the infinite-width GP posterior (``theory.bayes.gp_posterior``, NNGP kernel K),
* order 1: the §5.2 formulas (``theory.nlo_posterior_moments``; exact dense vertex, N <= 24).

Quantities q_j: the posterior mean and variance at every test point (variances of the noise-free f).
With Δ^th = order 1 − order 0 and Δ^nuts = NUTS − order 0, the fraction of the finite-width
deviation that the order-1 theory explains is the weighted projection

    ratio = Σ_j w_j Δ^th_j Δ^nuts_j / Σ_j w_j (Δ^th_j)²,   w_j = 1 / MCSE_j²,

which is linear in the NUTS estimates: it is the posterior mean of one scalar per draw,
s_t = Σ_j c_j g_j(f_t) (g = f for a mean, (f − f̄)² for a variance), so its standard error is the
ESS-based MCSE of s_t — autocorrelation and the correlation of the quantities across test points
included.  ``z_dev`` = (projection of Δ^nuts on Δ^th)/se = ratio/se(ratio): how well the
finite-width deviation itself is resolved.  Residuals: χ² = Σ_j ((NUTS_j − theory_j)/MCSE_j)² for
order 0 and order 1 (dof = number of quantities; MCSE correlations across quantities ignored there).

Expected: Δ shrinks ~1/n, so the small widths resolve it best; at n = 8 the O(1/n²) terms can be
visible (ratio ≠ 1 by a few s.e.); at n = 64 the deviation is usually unresolved (ratio with a large
s.e.).  The script prints a table and, with ``--json``, writes every number.  NUTS cost per
effective sample of f(X_test) (sampling time incl. compilation / min bulk ESS) is recorded per run.
tests/test_bayes_validation.py runs a small version in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
import xarray as xr

jax.config.update("jax_enable_x64", True)

import eft_prob as ep  # noqa: E402
from eft_prob import _arviz, inference  # noqa: E402
from eft_prob.theory import nlo_posterior_moments  # noqa: E402
from eft_prob.theory.bayes import gp_posterior  # noqa: E402

# -- data sets ------------------------------------------------------------------------------------
X1 = np.linspace(-1.0, 1.0, 6)[:, None]
X1_TEST = np.array([[-1.5], [-0.5], [0.1], [0.7], [1.6]])  # two extrapolations
_ANG = np.linspace(0.0, 2 * np.pi, 6, endpoint=False) + 0.3
_RAD = np.array([1.0, 0.6, 1.3, 0.8, 1.1, 0.5])
X2 = np.stack([_RAD * np.cos(_ANG), _RAD * np.sin(_ANG)], 1)
X2_TEST = np.array([[0.2, -0.1], [0.5, 0.5], [-0.9, 0.2], [0.3, -1.2], [1.6, 0.4]])


def _y1(amp):
    return amp * np.sin(2.5 * X1)


def _y2(amp):
    return amp * (np.sin(2 * X2[:, :1]) + X2[:, 1:] ** 2 - 0.5)


# activation, depth, (C_b, C_W), inputs, targets, test inputs, noise variance
CASES = {
    "tanh1d": dict(act="tanh", depth=3, C_b=0.0, C_W=1.0, X=X1, y=_y1(1.5), X_test=X1_TEST, noise_var=0.1),
    "relu2d": dict(act="relu", depth=3, C_b=0.0, C_W=2.0, X=X2, y=_y2(1.0), X_test=X2_TEST, noise_var=0.2),
    "tanh2d": dict(act="tanh", depth=2, C_b=0.0, C_W=1.0, X=X2, y=_y2(2.0), X_test=X2_TEST, noise_var=0.2),
    "relu1d": dict(act="relu", depth=2, C_b=0.1, C_W=2.0, X=X1, y=_y1(2.0), X_test=X1_TEST, noise_var=0.2),
}
WIDTHS = (8, 16, 32, 64)
NUTS_FULL = dict(num_chains=4, num_warmup=500, num_samples=1500)
NUTS_QUICK = dict(num_chains=2, num_warmup=300, num_samples=600)


def spec_of(case: dict, width: int) -> ep.MLPSpec:
    d = case["X"].shape[1]
    return ep.MLPSpec(d, (width,) * (case["depth"] - 1), 1, case["act"], C_b=case["C_b"], C_W=case["C_W"])


# -- theory ---------------------------------------------------------------------------------------
def theory_moments(case: dict, width: int) -> dict:
    """Posterior mean and variance of f(X_test) (one output) at order 0 and order 1."""
    spec = spec_of(case, width)
    args = (spec, case["X"], case["y"], case["X_test"], case["noise_var"])
    g = gp_posterior(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ep.RegimeWarning)  # small widths are the point here
        r = nlo_posterior_moments(*args)
    return {
        "mean0": np.asarray(g.mean)[:, 0],
        "var0": np.diag(np.asarray(g.cov)),
        "mean1": np.asarray(r.mean)[:, 0],
        "var1": np.diag(np.asarray(r.covariance)),
    }


# -- NUTS and the analysis ------------------------------------------------------------------------
def run_case(case: dict, width: int, *, seed: int, **nuts) -> tuple[np.ndarray, dict]:
    """NUTS draws of f(X_test) (chains, draws, N_B) and sampler health (convergence_summary attrs)."""
    spec = spec_of(case, width)
    t = time.perf_counter()
    idata = inference.run_nuts(
        spec, case["X"], case["y"], case["X_test"], noise_var=case["noise_var"], seed=seed, **nuts
    )
    wall = time.perf_counter() - t
    summary = inference.convergence_summary(idata, ["f_test"])
    post = _arviz.get_group(idata, "posterior")
    draws = np.asarray(post["f_test"].transpose("chain", "draw", ...).values, float)[..., 0]
    health = {k: float(v) for k, v in summary.attrs.items()}
    health["wall_s"] = wall
    health["chain_method"] = str(_arviz.get_attrs(idata).get("chain_method"))
    return draws, health


def _mcse(per_draw: np.ndarray) -> tuple[float, float]:
    """(mean, ESS-based MCSE) of a scalar per draw (chains, draws)."""
    ds = xr.Dataset({"s": (("chain", "draw"), per_draw)})
    ess = float(_arviz.ess(ds, "mean")["s"].values)
    return float(per_draw.mean()), float(per_draw.std(ddof=1) / np.sqrt(ess))


def nuts_quantities(draws: np.ndarray):
    """Per-draw quantities g (chains, draws, 2·N_B): f at each test point, then (f − f̄)²."""
    mean = draws.mean(axis=(0, 1))
    return np.concatenate([draws, (draws - mean) ** 2], axis=-1)


def analyse(draws: np.ndarray, th: dict) -> dict:
    """ratio ± se, z of the deviation, χ² of NUTS against order 0 and order 1 (see the module docstring)."""
    g = nuts_quantities(draws)
    q = g.shape[-1]
    est, se = np.empty(q), np.empty(q)
    for j in range(q):
        est[j], se[j] = _mcse(g[..., j])
    o0 = np.concatenate([th["mean0"], th["var0"]])
    o1 = np.concatenate([th["mean1"], th["var1"]])
    d_th = o1 - o0
    w = 1.0 / se**2
    norm = np.sum(w * d_th**2)
    c = w * d_th / norm
    ratio, ratio_se = _mcse(g @ c)
    ratio = ratio - float(c @ o0)
    z0 = (est - o0) / se
    z1 = (est - o1) / se
    nb = q // 2
    return {
        "ratio": ratio,
        "ratio_se": ratio_se,
        "z_dev": ratio / ratio_se,
        "chi2_order0": float(np.sum(z0**2)),
        "chi2_order1": float(np.sum(z1**2)),
        "dof": q,
        "nuts_mean": est[:nb].tolist(),
        "nuts_mean_se": se[:nb].tolist(),
        "nuts_var": est[nb:].tolist(),
        "nuts_var_se": se[nb:].tolist(),
        "z_order0": z0.tolist(),
        "z_order1": z1.tolist(),
        "theory_shift_in_se": (d_th / se).tolist(),
        **{k: np.asarray(v).tolist() for k, v in th.items()},
    }


def validate(name: str, width: int, *, seed: int = 0, **nuts) -> dict:
    case = CASES[name]
    th = theory_moments(case, width)
    draws, health = run_case(case, width, seed=seed, **nuts)
    res = analyse(draws, th)
    res.update(case=name, width=width, seed=seed, **nuts, health=health)
    return res


# -- main -----------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"NUTS {NUTS_QUICK} instead of {NUTS_FULL}")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write all results here")
    a = p.parse_args(argv)
    nuts = NUTS_QUICK if a.quick else NUTS_FULL
    widths = [int(w) for w in a.widths.split(",")]
    print(f"# jax {jax.__version__}, backend {jax.default_backend()}, NUTS {nuts}, load {os.getloadavg()}")
    header = (
        f"{'case':8} {'n':>4} {'ratio':>7} {'± se':>6} {'z_dev':>6} {'χ²₀':>8} {'χ²₁':>8} {'dof':>3} "
        f"{'minESS':>6} {'div':>4} {'R̂max':>6} {'s/ESS':>6} {'wall s':>6}"
    )
    results = []
    print(header, flush=True)
    for name in a.cases.split(","):
        for n in widths:
            r = validate(name, n, seed=a.seed, **nuts)
            r["loadavg"] = os.getloadavg()
            results.append(r)
            h = r["health"]
            print(
                f"{name:8} {n:4d} {r['ratio']:7.3f} {r['ratio_se']:6.3f} {r['z_dev']:6.1f} {r['chi2_order0']:8.1f} "
                f"{r['chi2_order1']:8.1f} {r['dof']:3d} {h['min_ess_bulk']:6.0f} {h['num_divergent']:4.0f} "
                f"{h['max_r_hat']:6.3f} {h['seconds_per_ess']:6.3f} {h['wall_s']:6.1f}",
                flush=True,
            )
            if a.json:
                with open(a.json, "w") as fh:
                    json.dump({"nuts": nuts, "results": results}, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
