# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 — Gradient descent: trained ensembles vs. the NTK and the 1/n distribution of p(f*)
#
# Draw networks from the prior, train each by full-batch gradient descent on ½Σ(f(x) − y)² (the
# λ-scaled learning rates of THEORY.md §1.3, global step η) to convergence, and look at the
# distribution of their outputs f* at test inputs.
#
# * Infinite width (THEORY.md §8.2–8.3): the NTK is frozen, the model is linear in its parameters,
#   and p(f*) is Gaussian with mean Θ_BA Θ̃⁻¹ y — independent of η and of the number of steps
#   ("algorithm independence"): `TrainedNetwork(spec, X, y, X_test, η, order=0)`.
# * Width n (THEORY.md §9.5): NTK fluctuations, the dNTK and the ddNTKs shift the mean by O(1/n),
#   and part of that shift depends on η — the learning algorithm matters at finite width:
#   `TrainedNetwork(..., order=1)` (mean and covariance, `eft_prob.theory.nlo_trained_moments`).
#
# We train ensembles with `eft_prob.ensemble.train` at several widths, measure n·(ensemble − NTK)
# with standard errors, and compare with the O(1/n) coefficient; then measure the η dependence with
# paired ensembles (the same initializations trained at two learning rates).
#
# Set `EFT_PROB_SMOKE=1` for a fast run with small ensembles (used in CI).

# %%
import os

import jax
import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import eft_prob as ep
from eft_prob.distributions import TrainedNetwork
from eft_prob.theory.training import nlo_trained_coefficients

jax.config.update("jax_enable_x64", True)  # a user program: float64 ensembles
SMOKE = os.environ.get("EFT_PROB_SMOKE") == "1"
RUNS = ((16, 600), (48, 400)) if SMOKE else ((16, 8000), (24, 8000), (32, 6000), (48, 5000), (64, 4000), (96, 3000))
PAIRED = (16, 400) if SMOKE else (24, 3000)  # width, networks for the learning-rate comparison
FIG = os.environ.get("EFT_PROB_FIGURES", "figures")
os.makedirs(FIG, exist_ok=True)
pd.set_option("display.width", 160)

# %% [markdown]
# ## 1. Data, architecture and learning rate
#
# Three training inputs and three test inputs (x = 2 extrapolates).  Full-batch GD needs about
# 9·κ steps to converge, κ = λ_max/λ_min of the training NTK Gram Θ̃, and finite-width NTK
# fluctuations reach the trained outputs through Θ̃⁻¹ — so we keep the Gram well conditioned (few,
# well separated inputs; C_b > 0 so that the prior also holds even functions).  The activation is
# tanh: the O(1/n) trained distribution needs a smooth σ (dNTK and ddNTK statistics).

# %%
X = np.array([[-1.2], [0.1], [1.3]])
y = np.array([[0.5], [-0.4], [0.3]])
X_test = np.array([[-0.6], [0.6], [2.0]])


def make_spec(n):
    return ep.MLPSpec(1, (n, n), 1, "tanh", C_b=0.1, C_W=1.5, lambda_b=0.5, lambda_W=1.0)


theta = np.asarray(ep.theory.ntk(make_spec(16), np.concatenate([X, X_test])))
lam = np.linalg.eigvalsh(theta[:3, :3])
eta = 1.0 / lam[-1]  # half the stability bound 2/λ_max
steps = 400
print(f"Θ̃ eigenvalues {np.round(lam, 3)}, κ = {lam[-1] / lam[0]:.1f}; η = {eta:.4f} (bound {2 / lam[-1]:.4f})")
print(f"slowest mode after {steps} steps: (1 − η λ_min)^steps = {(1 - eta * lam[0]) ** steps:.1e}")

# %% [markdown]
# ## 2. The theory: order 0 and the O(1/n) coefficients
#
# `nlo_trained_coefficients` returns mean₀ + mean₁/n and cov₀ + cov₁/n; the coefficients do not
# depend on n (all hidden widths scale together).  `TrainedNetwork(order=1)` is the Gaussian with
# these moments at the spec's width.

# %%
coef = nlo_trained_coefficients(make_spec(16), X, y, X_test, eta, None)  # steps=None: converged
mean0, mean1 = np.asarray(coef.mean0)[:, 0], np.asarray(coef.mean1)[:, 0]
var0, var1 = np.diagonal(np.asarray(coef.cov0)), np.diagonal(np.asarray(coef.cov1))
print(pd.DataFrame({"x_test": X_test[:, 0], "mean₀": mean0, "mean₁": mean1, "var₀": var0, "var₁": var1}).round(4))

# %% [markdown]
# ## 3. Trained ensembles at several widths
#
# Estimator with a control variate.  Each network's infinite-width linearized prediction from its
# own initialization, g = z_B(0) − Θ_BA Θ̃⁻¹ z_A(0), has mean exactly 0 and carries most of the
# network-to-network spread of f*; the average of f* − g estimates E[f*] with a much smaller
# standard error (independent networks, so se = sd/√M).  (`TrainResult` keeps the initial outputs
# for exactly this purpose.)

# %%
Lproj = np.concatenate([-theta[3:, :3] @ np.linalg.inv(theta[:3, :3]), np.eye(3)], axis=1)


def trained_mean(res):
    """Control-variate estimate of E[f*(X_test)] and its standard error (test points,)."""
    ok = ~res.diverged
    z0 = np.concatenate([res.train_init, res.test_init], axis=1)[ok, :, 0]
    r = res.test_final[ok, :, 0] - z0 @ Lproj.T
    return r.mean(0), r.std(0, ddof=1) / np.sqrt(ok.sum()), res


ens = {}
for n, M in RUNS:
    m, se, res = trained_mean(ep.ensemble.train(make_spec(n), X, y, X_test, M, eta, steps, jax.random.key(n)))
    ens[n] = (m, se, res)
    print(f"n = {n:3d}, M = {M:5d}: max final loss {res.loss.max():.1e}, diverged {res.diverged.sum()}")
rows = [
    (n, X_test[b, 0], n * (m[b] - mean0[b]), n * se[b], mean1[b], (n * (m[b] - mean0[b]) - mean1[b]) / (n * se[b]))
    for n, (m, se, _) in ens.items()
    for b in range(3)
]
table = pd.DataFrame(rows, columns=["width", "x_test", "n·(ens − NTK)", "se", "theory mean₁", "z"])
print(table.round(3).to_string(index=False))

# %% [markdown]
# |z| ≲ 2 at the wider networks: the ensemble mean is the NTK mean plus mean₁/n.  The theory is the
# 1/n term only; expect visible O(1/n²) deviations at the narrowest widths (THEORY.md §9.5 advises
# fitting a/n + b/n² when comparing below n ≈ 512).

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
ax = axes[0]
W = np.array([n for n, _ in RUNS])
for b in range(3):
    d = np.array([n * (ens[n][0][b] - mean0[b]) for n in W])
    s = np.array([n * ens[n][1][b] for n in W])
    ax.errorbar(1 / W, d, s, fmt="o", color=f"C{b}", capsize=3, label=f"x = {X_test[b, 0]}: ensemble ± se")
    ax.plot([0, 1.1 / W.min()], [mean1[b]] * 2, "--", color=f"C{b}", lw=1.2, label=f"x = {X_test[b, 0]}: theory mean₁")
ax.axhline(0, color="0.6", lw=0.8)
ax.set_xlabel("1 / width")
ax.set_ylabel("n · (ensemble mean − NTK mean)")
ax.set_title(f"Trained mean at O(1/n) (tanh, L = 3, η = {eta:.3f}, converged)", fontsize=10)
ax.legend(fontsize=7, ncol=2)

# the distribution of f* at one test point, narrowest width: ensemble vs order 0 vs order 1
n0 = int(W.min())
b = 2
res = ens[n0][2]
p0 = TrainedNetwork(make_spec(n0), X, y, X_test, eta, order=0)
p1 = TrainedNetwork(make_spec(n0), X, y, X_test, eta, order=1)
ax = axes[1]
f = res.test_final[~res.diverged, b, 0]
ax.hist(f, bins=60, density=True, color="0.75", label=f"{f.size} trained networks, n = {n0}")
grid = np.linspace(*np.quantile(f, [0.0005, 0.9995]), 400)
for p, name, c in ((p0, "NTK (order 0)", "C1"), (p1, "1/n (order 1)", "C2")):
    mu, sd = float(np.asarray(p.mean)[b, 0]), float(np.sqrt(np.asarray(p.variance)[b, 0]))
    ax.plot(
        grid,
        np.exp(-0.5 * ((grid - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi)),
        color=c,
        lw=2,
        label=f"{name}: mean {mu:.3f}, sd {sd:.3f}",
    )
ax.set_xlabel(f"trained output f*(x = {X_test[b, 0]})")
ax.set_ylabel("density")
ax.set_title(f"p(f*) at x = {X_test[b, 0]} (sample mean {f.mean():.3f}, sd {f.std():.3f})", fontsize=10)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(f"{FIG}/03_trained_mean_vs_width.png", dpi=110)

# %% [markdown]
# ## 4. Algorithm dependence of the O(1/n) mean
#
# At infinite width every learning rate below the stability bound gives the same trained network;
# at O(1/n) the dNTK and ddNTK terms depend on η through the "algorithm projectors" (THEORY.md §9.5),
# strongly so near the bound 2/λ_max where GD oscillates.  Curve: mean₁(η) from the theory
# (η → 0 is gradient flow, `learning_rate=None`).  Points: the same M initializations trained at
# η and at a reference η_ref = 0.5/λ_max; the paired difference n·(f*(η) − f*(η_ref)) has no order-0
# part and a tiny variance, so it measures mean₁(η) − mean₁(η_ref) directly.

# %%
fracs = np.linspace(0.05, 1.95, 39)
curve = np.array(
    [np.asarray(nlo_trained_coefficients(make_spec(16), X, y, X_test, f / lam[-1], None).mean1)[:, 0] for f in fracs]
)
flow = np.asarray(nlo_trained_coefficients(make_spec(16), X, y, X_test, None, None).mean1)[:, 0]
ref = 0.5
test_fracs = (1.0, 1.8) if SMOKE else (0.2, 1.0, 1.5, 1.8)
n_p, M_p = PAIRED
paired_steps = 700  # the slowest mode at η_ref and the oscillating mode near the bound both need more steps
base = ep.ensemble.train(make_spec(n_p), X, y, X_test, M_p, ref / lam[-1], paired_steps, jax.random.key(99))
ref_curve = np.asarray(nlo_trained_coefficients(make_spec(16), X, y, X_test, ref / lam[-1], None).mean1)[:, 0]
points = []
for fr in test_fracs:
    r = ep.ensemble.train(make_spec(n_p), X, y, X_test, M_p, fr / lam[-1], paired_steps, jax.random.key(99))
    ok = ~(r.diverged | base.diverged)
    d = n_p * (r.test_final[ok, :, 0] - base.test_final[ok, :, 0])
    points.append((fr, d.mean(0), d.std(0, ddof=1) / np.sqrt(ok.sum()), max(r.loss.max(), base.loss.max())))

fig, ax = plt.subplots(figsize=(7.5, 4.5))
for b in range(3):
    ax.plot(fracs, curve[:, b] - ref_curve[b], color=f"C{b}", label=f"x = {X_test[b, 0]}: theory")
    ax.plot(0, flow[b] - ref_curve[b], "D", color=f"C{b}", ms=6)
    ax.errorbar(
        [p[0] for p in points],
        [p[1][b] for p in points],
        [p[2][b] for p in points],
        fmt="o",
        color=f"C{b}",
        capsize=3,
        label=f"x = {X_test[b, 0]}: paired ensembles, n = {n_p}",
    )
ax.plot([], [], "kD", ms=6, label="gradient flow (η → 0)")
ax.axvline(2.0, color="0.5", ls=":", lw=1)
ax.axhline(0, color="0.6", lw=0.8)
ax.set_xlabel("η · λ_max(Θ̃)   (GD diverges at 2)")
ax.set_ylabel("mean₁(η) − mean₁(η_ref),  η_ref λ_max = 0.5")
ax.set_title("Learning-rate dependence of the O(1/n) trained mean", fontsize=10)
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(f"{FIG}/03_learning_rate_dependence.png", dpi=110)
print(
    pd.DataFrame(
        [
            (fr, X_test[b, 0], dm[b], ds[b], np.interp(fr, fracs, curve[:, b]) - ref_curve[b])
            for fr, dm, ds, _ in points
            for b in range(3)
        ],
        columns=["η·λ_max", "x_test", "n·Δf* (paired)", "se", "theory Δmean₁"],
    )
    .round(4)
    .to_string(index=False)
)
print("max final training loss of the paired runs:", ", ".join(f"{loss:.1e}" for *_, loss in points))

# %% [markdown]
# The paired ensembles follow the theory's η dependence, including its steep rise toward the
# stability bound: at finite width, how you train matters, at order 1/n.  (The order-0 prediction of
# every point in this plot is exactly zero.)
