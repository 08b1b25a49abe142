"""The 1/n expansion of the prior against real random networks: a sweep over activation, depth, width.

tanh and ReLU at criticality, two inputs, equal hidden widths n ∈ WIDTHS, depths L ∈ DEPTHS.  The
output-layer metric Ĝ^(L) of many networks (:func:`eft_prob.ensemble.prior_kernels`, the
Rao–Blackwellized estimator of THEORY.md §12 item 9: given the layers below, z_{i;·} is exactly
N(0, Ĝ), iid over i) gives, free of output-layer sampling noise,

* the kernel  E[z_{i;α} z_{i;β}] = E[Ĝ_αβ];  order 0: K,  order 1: K + K^{1}/n;
* the connected four-point function, i ≠ k,
  E[z_{i;α1} z_{i;α2} z_{k;α3} z_{k;α4}] - E[zz]E[zz] = Cov(Ĝ_{α1α2}, Ĝ_{α3α4});  order 0: 0,
  order 1: V_{(α1α2)(α3α4)}/n — all six index patterns of two inputs.  The diagonal patterns
  (αα)(αα) are the single-input fourth cumulant, E z⁴ - 3(E z²)² = 3 Var(Ĝ_αα).

Standard errors: sd/√M for a mean (after exact-mean-zero control variates for the kernel, see
:func:`_controlled_mean`); for a covariance the delta method (to O(1/M) the sample covariance is
the mean of (Ĝ_p - μ_p)(Ĝ_q - μ_q), so its s.e. is that product's sd/√M).

The expansion parameter is ε = max_α V_{(αα)(αα)}/(n K_αα²) (= 5(L-1)/n for ReLU).  Where
ε <= EPS_MAX, for every quantity and entry the residual r(n) = MC - order 1 is fitted over the
in-regime widths by weighted least squares:

* r = a/n + b/n² (+ c/n³ when four widths are in the regime): a = 0 within N_SIGMA s.e., i.e.
  n·(MC - order 0) tends to the theory's coefficient K^{1} or V and the order-1 residual has no
  1/n part — with an s.e. of a small enough that a missing or wrong coefficient fails;
* r = b/n² alone describes every in-regime width within N_SIGMA σ (b's own error included): the
  order-1 prediction agrees with the networks up to a truncation term ∝ 1/n², n²·r constant;
* L = 2 has no truncation at all (the first layer's neurons are iid Gaussian, so E Ĝ^(2) = K^(2)
  and Cov Ĝ^(2) = V^(2)/n exactly): there b = 0 too.

The c/n³ term: the tanh (00)(11) vertex is tiny (V ≈ 3e-4 at L = 8 against a 1/n² coefficient
≈ 0.07), so at n = 16 its 1/n³ term is comparable to V/n and biases a two-term fit by ~3σ.

ReLU with one input has exact finite-width moments (THEORY.md §4.4): Ĝ_αα/K_αα = Π_{ℓ<L} f_ℓ
with f_ℓ = (2/n)χ²_{B_ℓ}, B_ℓ ~ Binomial(n, ½), all independent, so E Ĝ_αα = K_αα and
E Ĝ_αα² = K_αα²(1 + 5/n)^{L-1}, and the moments up to four give exact standard errors.  They
check the residual deterministically at every width, bound the truncation bias of the two-term
fit (this is what justifies EPS_MAX) and, outside the regime, show the 1/n theory failing.

The depth-L networks are the first L layers of the depth-max(DEPTHS) ones (same distribution:
equal widths, the same (C_b, C_W) in every layer), so one ensemble per width serves all depths.
The networks are drawn in function space (``prior_kernels(..., sampler="kernels")``: each
layer's preactivations given the metric below, their exact conditional law), O(n·N²) per layer
instead of O(n²·N) for the weights: about 4 s per width on 2 CPU cores, mostly compilation
(10–24 s per width with the weights).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eft_prob as ep
from eft_prob import gauss
from eft_prob.activations import get_activation
from tests.conftest import fit_inverse_powers

pytestmark = pytest.mark.slow

# Two inputs of different norms at an angle that is not special (cos ≈ -0.13); the scale 1.4 puts
# K^(1) ≈ 1, where tanh is well inside its nonlinear range.
X = 1.4 * np.array([[1.0, 0.3], [-0.4, 0.9]])
WIDTHS = (16, 32, 64, 128)
DEPTHS = (2, 4, 8)
# M ∝ 1/n: the cost ∝ M n² grows only like n, and n·Cov keeps a relative s.e. ≈ 1.5·sqrt(2/M)
# or better; the small widths, where the 1/n² residual is large, get the most networks.
N_NETWORKS = {16: 80_000, 32: 40_000, 64: 16_000, 128: 8_000}
# In-regime: ε <= 0.6.  For ReLU the exact moments show the two-term fit's 1/n coefficient then
# off by < 0.5 s.e. (asserted below); ReLU L = 8 keeps only n = 64, 128 (ε = 0.55, 0.27).
EPS_MAX = 0.6
N_SIGMA = 4.5
# V and K^{1} (each normalized by its n_{L-1}) do not depend on a common hidden width; they are
# computed at a width deep inside the 1/n regime.
THEORY_WIDTH = 4096
PAIRS = ((0, 0), (0, 1), (1, 1))
ENTRIES = tuple((p, q) for i, p in enumerate(PAIRS) for q in PAIRS[i:])  # the 6 distinct V entries
DIAG = ((0, ENTRIES.index(((0, 0), (0, 0)))), (2, ENTRIES.index(((1, 1), (1, 1)))))  # (PAIRS, ENTRIES)
SEEDS = {"tanh": 1000, "relu": 2000}


class Sweep(NamedTuple):
    """Theory and Monte Carlo of one activation; d indexes DEPTHS, j WIDTHS, e PAIRS / ENTRIES."""

    K: np.ndarray  # (d, 3) kernel K^(L) on PAIRS
    K1: np.ndarray  # (d, 3) K^{1}(L)
    V: np.ndarray  # (d, 6) V^(L) on ENTRIES
    eps: np.ndarray  # (d, j) expansion parameter ε
    mean: np.ndarray  # (d, j, 3) E Ĝ
    mean_se: np.ndarray
    cov: np.ndarray  # (d, j, 6) Cov(Ĝ_p, Ĝ_q)
    cov_se: np.ndarray


def _kernel_map(act: str, chunk: int = 8192):
    """m(G) = C_b + C_W⟨σσ⟩_G on (M, 3) entries (G_00, G_01, G_11): E[Ĝ^(ℓ+1) | Ĝ^(ℓ)] = m(Ĝ^(ℓ)).

    Closed forms where the activation has them (ReLU); otherwise a 64-node one-dimensional rule on
    the diagonal and the 32-node two-dimensional rule of ``eft_prob.gauss`` off it (errors < 1e-14
    and < 1e-8 against 64 nodes for these kernels, far below every standard error here).
    """
    a = get_activation(act)
    C_b, C_W = a.critical

    def diag(k):
        if a.pair is not None:
            return a.pair(k, k, k)[0]
        return gauss.expect_1d(lambda z: a.fn(z) ** 2, k, n=64)

    @jax.jit
    def m(g):
        off = gauss.pair_moments(a, g[:, 0], g[:, 2], g[:, 1], orders={"smooth2": 32})[0]
        return C_b + C_W * jnp.stack([diag(g[:, 0]), off, diag(g[:, 2])], axis=1)

    def chunked(g):  # fixed-size chunks: bounded quadrature arrays, one compilation
        out = []
        for c in range(0, len(g), chunk):
            block = g[c : c + chunk]
            pad = np.repeat(block[-1:], chunk - len(block), axis=0)
            out.append(np.asarray(m(jnp.asarray(np.concatenate([block, pad]))))[: len(block)])
        return np.concatenate(out)

    return chunked


def _controlled_mean(gs, ms):
    """E Ĝ^(L) with the martingale differences D_ℓ = Ĝ^(ℓ+1) - m(Ĝ^(ℓ)), ℓ = 1..L-1, as controls.

    Given layers 1..ℓ-1, z^(ℓ) is exactly N(0, Ĝ^(ℓ)), so E[Ĝ^(ℓ+1) | Ĝ^(ℓ)] = m(Ĝ^(ℓ)) and every
    D_ℓ has mean zero exactly: mean(Ĝ^(L) - D·β) estimates E Ĝ^(L) for any fixed β.  With β from
    least squares it removes the O(1/√n) fluctuations of Ĝ^(L) (to linear order Ĝ^(L) - K^(L) is
    a combination of the D_ℓ), leaving the O(1/n) signal with an O(1/n) spread; estimating β costs
    an O(1/M) bias, negligible here.  ``gs``: [Ĝ^(1), ..., Ĝ^(L)] and ``ms``: [m(Ĝ^(1)), ...,
    m(Ĝ^(L-1))], as (M, 3) entries; returns (mean (3,), s.e. (3,)).
    """
    D = np.concatenate([g - mg for g, mg in zip(gs[1:], ms)], axis=1)
    y = gs[-1]
    beta = np.linalg.lstsq(D - D.mean(0), y - y.mean(0), rcond=None)[0]
    R = y - D @ beta  # D itself, not D - mean(D): its mean is known to be zero
    M, p = D.shape
    return R.mean(0), R.std(0, ddof=1) / math.sqrt(M) * math.sqrt((M - 1) / (M - 1 - p))


@functools.cache
def sweep(act: str) -> Sweep:
    L_max = max(DEPTHS)
    wide = ep.MLPSpec.at_criticality(2, (THEORY_WIDTH,) * (L_max - 1), 1, act)
    K_all = np.asarray(ep.theory.nngp(wide, X, all_layers=True))
    K1_all = np.asarray(ep.theory.nlo_kernel(wide, X, all_layers=True))
    V_all = np.asarray(ep.theory.four_point_vertex(wide, X, all_layers=True))
    rows = [L - 1 for L in DEPTHS]
    K = np.array([[K_all[ell][p] for p in PAIRS] for ell in rows])
    K1 = np.array([[K1_all[ell][p] for p in PAIRS] for ell in rows])
    V = np.array([[V_all[ell][p + q] for p, q in ENTRIES] for ell in rows])
    Vdiag = np.array([[V_all[ell][(a,) * 4] / K_all[ell][a, a] ** 2 for a in (0, 1)] for ell in rows])
    eps = Vdiag.max(axis=1)[:, None] / np.array(WIDTHS)[None, :]
    m = _kernel_map(act)
    # A scale-invariant σ at criticality has m(G)_αα = G_αα, so Ĝ^(L)_αα - K_αα = Σ_ℓ D_ℓ and the
    # controlled diagonal would be K by construction: there the plain mean is kept.
    controlled = [1] if get_activation(act).universality == "scale-invariant" else [0, 1, 2]

    shape = (len(DEPTHS), len(WIDTHS))
    mean, mean_se = np.zeros((*shape, 3)), np.zeros((*shape, 3))
    cov, cov_se = np.zeros((*shape, 6)), np.zeros((*shape, 6))
    for j, n in enumerate(WIDTHS):
        spec = ep.MLPSpec.at_criticality(2, (n,) * (L_max - 1), 1, act)
        M = N_NETWORKS[n]
        Gs = ep.ensemble.prior_kernels(spec, X, M, jax.random.key(SEEDS[act] + n), layers=True, sampler="kernels")
        gs = [np.stack([np.asarray(G[:, a, b]) for a, b in PAIRS], axis=1) for G in Gs]  # (M, 3) per layer
        ms = [m(g) for g in gs[:-1]]
        for d, L in enumerate(DEPTHS):
            g = gs[L - 1]
            mean[d, j], mean_se[d, j] = g.mean(0), g.std(0, ddof=1) / math.sqrt(M)
            if L > 2:  # at L = 2 the only control, Ĝ^(2) - K^(2), would leave nothing random
                cm, cse = _controlled_mean(gs[:L], ms[: L - 1])
                mean[d, j, controlled], mean_se[d, j, controlled] = cm[controlled], cse[controlled]
            dg = g - g.mean(0)
            Y = np.stack([dg[:, PAIRS.index(p)] * dg[:, PAIRS.index(q)] for p, q in ENTRIES], axis=1)
            cov[d, j], cov_se[d, j] = Y.sum(0) / (M - 1), Y.std(0, ddof=1) / math.sqrt(M)
    return Sweep(K, K1, V, eps, mean, mean_se, cov, cov_se)


def _quantity(s: Sweep, what: str):
    """(MC, s.e., order-0 value, 1/n coefficient): the first two (d, j, e), the last two (d, e)."""
    if what == "kernel":
        return s.mean, s.mean_se, s.K, s.K1
    return s.cov, s.cov_se, np.zeros_like(s.V), s.V


def _check_order_one(act: str, what: str):
    """The in-regime assertions of the module docstring; returns {(L, e): (a, se_a)}."""
    s = sweep(act)
    est, se, order0, coef = _quantity(s, what)
    labels = PAIRS if what == "kernel" else ENTRIES
    n = np.array(WIDTHS, float)
    fits = {}
    for d, L in enumerate(DEPTHS):
        ok = s.eps[d] <= EPS_MAX
        assert ok.sum() >= 2, (act, L, "fewer than two in-regime widths")
        powers = (1, 2, 3) if ok.sum() >= 4 else (1, 2)
        for e, label in enumerate(labels):
            where = f"{what} {act} L={L} {label}"
            r = est[d, ok, e] - order0[d, e] - coef[d, e] / n[ok]
            s_r = se[d, ok, e]
            c, se_c, _ = fit_inverse_powers(n[ok], r, s_r, powers)
            assert abs(c[0]) <= N_SIGMA * se_c[0], (where, "1/n part of the order-1 residual", c[0], se_c[0])
            (b,), (se_b,), _ = fit_inverse_powers(n[ok], r, s_r, (2,))
            z = np.abs(r - b / n[ok] ** 2) / np.sqrt(s_r**2 + (se_b / n[ok] ** 2) ** 2)
            assert np.all(z <= N_SIGMA), (where, "order 1 + b/n²", r, b, se_b, z)
            if L == 2:  # exact at order 1: no truncation term
                assert abs(b) <= N_SIGMA * se_b, (where, "L = 2 is exact", b, se_b)
            fits[L, e] = (c[0], se_c[0])
    return fits


@pytest.mark.parametrize("act", [pytest.param("tanh", marks=pytest.mark.heavy), "relu"])
def test_kernel_is_order_one_theory_up_to_one_over_width_squared(act):
    s = sweep(act)
    fits = _check_order_one(act, "kernel")
    for d, L in enumerate(DEPTHS[1:], start=1):
        # teeth: order 0 (K^{1} = 0) fails by >= 10 s.e. on the largest K^{1} entry
        e = int(np.argmax(np.abs(s.K1[d])))
        assert abs(s.K1[d, e]) >= 10 * fits[L, e][1], (act, L, s.K1[d], fits[L, e])


@pytest.mark.parametrize("act", [pytest.param("tanh", marks=pytest.mark.heavy), "relu"])
def test_four_point_function_is_order_one_theory_up_to_one_over_width_squared(act):
    s = sweep(act)
    fits = _check_order_one(act, "four-point")
    for d, L in enumerate(DEPTHS):
        for e in range(len(ENTRIES)):
            # teeth: the 1/n coefficient of every entry is pinned to 10% of the largest V entry
            # (an error of half of it fails by 5 s.e.; tanh and ReLU at L <= 4 reach ~2%)
            assert fits[L, e][1] <= 0.1 * np.abs(s.V[d]).max(), (act, L, ENTRIES[e], fits[L, e], s.V[d])


# --------------------------------------------------------------------------------------------
# ReLU, one input: exact finite-width moments.


def _relu_ratio_moments(n: int, L: int) -> np.ndarray:
    """E[(Ĝ_αα/K_αα)^k], k = 0..4, for ReLU at criticality (C_b = 0, C_W = 2), equal widths n."""
    B = np.arange(n + 1)
    pmf = np.array([math.comb(n, b) for b in B], float) / 2.0**n
    Ef = [1.0]
    for k in range(1, 5):
        rising = np.prod([B + 2 * i for i in range(k)], axis=0)  # E[(χ²_B)^k | B]
        Ef.append((2.0 / n) ** k * float(pmf @ rising))
    return np.array(Ef) ** (L - 1)


def _relu_exact(n: int, L: int, K: float):
    """Exact Var Ĝ_αα and the exact s.e. of the mean and of the sample variance over N_NETWORKS[n]."""
    m = _relu_ratio_moments(n, L)
    var = m[2] - 1.0
    c4 = m[4] - 4 * m[3] + 6 * m[2] - 3.0  # E(Ĝ/K - 1)⁴, as E Ĝ/K = 1
    M = N_NETWORKS[n]
    return K**2 * var, K * math.sqrt(var / M), K**2 * math.sqrt((c4 - var**2) / M)


def test_relu_exact_moments_formula():
    """THEORY.md §4.4: E[(Ĝ/K)²] = (1 + 5/n)^{L-1} and E Ĝ = K; one neuron: E f^k = 2^k (2k-1)!!/2."""
    for n in (3, 16, 128):
        m = _relu_ratio_moments(n, 5)
        assert m[1] == pytest.approx(1.0, rel=1e-12)
        assert m[2] == pytest.approx((1 + 5 / n) ** 4, rel=1e-12)
    assert _relu_ratio_moments(1, 2)[1:].tolist() == pytest.approx([1.0, 6.0, 60.0, 840.0], rel=1e-12)


def test_relu_single_input_exact_moments_at_every_width():
    """Kernel diagonal and fourth cumulant against the exact finite-width moments, in and out of the regime.

    The exact residual Var Ĝ - V/n = K²[(1 + 5/n)^{L-1} - 1 - 5(L-1)/n] is the whole truncation
    (1/n² and beyond), so the MC residual is checked with no fitted allowance.  The two-term fit,
    applied to the exact residuals at the in-regime widths, has a 1/n part < 0.5 s.e.: the bias
    EPS_MAX admits.  The MC's fitted 1/n² coefficient agrees with the exact residual's.
    """
    s = sweep("relu")
    n = np.array(WIDTHS, float)
    for d, L in enumerate(DEPTHS):
        ok = s.eps[d] <= EPS_MAX
        for a, e in DIAG:
            K = s.K[d, a]
            np.testing.assert_allclose(s.V[d, e], 5 * (L - 1) * K**2, rtol=1e-9)  # ε = 5(L-1)/n
            assert abs(s.K1[d, a]) < 1e-10 * K
            exact = np.array([_relu_exact(w, L, K) for w in WIDTHS])  # (j, 3): var, s.e. mean, s.e. var
            assert np.all(np.abs(s.mean[d, :, a] - K) <= N_SIGMA * exact[:, 1]), (L, a, s.mean[d, :, a], K)
            z = (s.cov[d, :, e] - exact[:, 0]) / exact[:, 2]
            assert np.all(np.abs(z) <= N_SIGMA), (L, a, s.cov[d, :, e], exact[:, 0], z)
            r_mc = s.cov[d, ok, e] - s.V[d, e] / n[ok]
            r_exact = exact[ok, 0] - s.V[d, e] / n[ok]
            (a_ex, b_ex), _, _ = fit_inverse_powers(n[ok], r_exact, exact[ok, 2], (1, 2))
            (_, b_mc), (se_a, se_b), _ = fit_inverse_powers(n[ok], r_mc, exact[ok, 2], (1, 2))
            assert abs(a_ex) < 0.5 * se_a, (L, "truncation bias of the two-term fit", a_ex, se_a)
            assert abs(b_mc - b_ex) <= N_SIGMA * se_b, (L, a, b_mc, b_ex, se_b)


def test_relu_one_over_width_theory_fails_outside_the_regime():
    """ε > EPS_MAX (ReLU L = 8 at n = 16, 32; L = 4 at n = 16): V/n misses the fourth cumulant by > 5σ.

    σ is the exact s.e. of the sample variance: the sample's own estimate of it is unreliable for
    these heavy-tailed Ĝ (excess kurtosis ≈ 470 at L = 8, n = 16).
    """
    s = sweep("relu")
    outside = [(d, j) for d in range(len(DEPTHS)) for j in range(len(WIDTHS)) if s.eps[d, j] > EPS_MAX]
    assert (DEPTHS.index(8), WIDTHS.index(16)) in outside
    for d, j in outside:
        L, n = DEPTHS[d], WIDTHS[j]
        for a, e in DIAG:
            se_var = _relu_exact(n, L, s.K[d, a])[2]
            z = (s.cov[d, j, e] - s.V[d, e] / n) / se_var
            assert z > 5, (L, n, a, s.cov[d, j, e], s.V[d, e] / n, se_var, z)
