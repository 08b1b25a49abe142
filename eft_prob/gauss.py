"""Gaussian expectations ⟨F⟩_K over one and two sample indices (THEORY.md §0.3, eq. 4.25).

The one place in eft_prob where Gaussian integrals are computed.  Closed forms come from the
activation registry (:mod:`eft_prob.activations`); everything else is quadrature:

* smooth integrands: a tensor trapezoid rule in the whitened coordinates ξ (z = Lξ with L the
  Cholesky factor of the 2×2 kernel), after the map ξ = s·sinh(u), uniform in u.  For integrands
  analytic in a strip the trapezoid rule converges exponentially in the number of nodes (Gauss–
  Hermite only like exp(-c√n)); the sinh map puts nodes where steep activations change (tanh at
  large K has poles at ξ = ±iπ/(2√K)): 80 nodes per dimension give ~1e-15 for tanh up to K = 16
  and ~1e-10 at K = 100, where 64-node Gauss–Hermite errs by 1e-4 at K = 4;
* integrands with kinks at z = 0 (ReLU-like σ, or σ' of them): a kink-aware polar rule.  With
  ξ = r(cos θ, sin θ) the kink lines z_1 = 0 and z_2 = 0 are rays, so the angle is split into the
  four arcs between them (Gauss–Legendre on each arc) and the radius uses the Gauss rule for the
  weight r·e^{-r²/2} on [0, ∞).  On each arc the integrand is analytic, so this rule converges
  exponentially as well, where plain Gauss–Hermite converges only algebraically across a kink.

All rules are differentiable in K (no NaN gradients on the PSD cone, including |ρ| = 1) and
evaluated in chunks so an N×N kernel never materializes N²×(nodes) arrays at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .activations import Activation, _safe_corr

__all__ = [
    "DEFAULT_ORDERS",
    "expect_1d",
    "expect_2d",
    "pair_moments",
    "sigma_moments",
]

#: Default quadrature orders: nodes of the sinh-mapped trapezoid rule for smooth integrands in one
#: and two dimensions (per dimension), (nodes per arc, radial nodes) of the kink-aware polar rule,
#: and nodes of the half-line rule for one-dimensional kinked integrands.
DEFAULT_ORDERS = {"smooth1": 256, "smooth2": 80, "arc": 24, "radial": 32, "half": 64}
_SINH_SCALE, _XI_MAX = 0.5, 9.0

_MAX_CHUNK_ELEMS = 4_000_000


# --------------------------------------------------------------------------------------------
# Rules (numpy, float64, cached).


@functools.cache
def _sinh_trapezoid(n: int):
    """Nodes/weights for ∫ f(ξ) e^{-ξ²/2}/√(2π) dξ: trapezoid in u, ξ = s·sinh(u), |ξ| <= 9."""
    if n < 3:
        raise ValueError(f"quadrature order must be >= 3, got {n}.")
    u_max = np.arcsinh(_XI_MAX / _SINH_SCALE)
    u = np.linspace(-u_max, u_max, n)
    h = u[1] - u[0]
    x = _SINH_SCALE * np.sinh(u)
    w = h * _SINH_SCALE * np.cosh(u) * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
    return x, w


@functools.cache
def _gauss_legendre(n: int):
    return np.polynomial.legendre.leggauss(n)


@functools.cache
def _stieltjes_rule(kind: str, n: int):
    """Gauss rule for a weight on [0, ∞) by the discretized Stieltjes procedure (stable in float64).

    kind="radial": w(r) = r e^{-r²/2} (total mass 1);  kind="half": w(x) = e^{-x²/2}/√(2π) (mass ½).
    The weight is discretized by composite Gauss–Legendre on [0, 16] (e^{-128} beyond), which is
    exact to machine precision for the polynomials of degree < 2n involved.
    """
    t, wt = _gauss_legendre(64)
    x = np.concatenate([k + (t + 1.0) / 2 for k in range(16)])  # 16 unit panels of 64 nodes
    wq = np.tile(wt / 2, 16)
    if kind == "radial":
        w = wq * x * np.exp(-x * x / 2)
    elif kind == "half":
        w = wq * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
    else:  # pragma: no cover - internal
        raise ValueError(kind)
    mass = w.sum()
    a = np.zeros(n)
    b = np.zeros(n)
    p_prev = np.zeros_like(x)
    p = np.ones_like(x) / np.sqrt(mass)
    for k in range(n):
        a[k] = np.sum(w * x * p * p)
        q = (x - a[k]) * p - (np.sqrt(b[k]) * p_prev if k > 0 else 0.0)
        if k + 1 < n:
            b[k + 1] = np.sum(w * q * q)
            p_prev, p = p, q / np.sqrt(b[k + 1])
    J = np.diag(a) + np.diag(np.sqrt(b[1:]), 1) + np.diag(np.sqrt(b[1:]), -1)
    nodes, vecs = np.linalg.eigh(J)
    weights = mass * vecs[0] ** 2
    return nodes, weights


# --------------------------------------------------------------------------------------------
# Elementary expectations over arrays of kernels.


def _orders(orders):
    o = {**DEFAULT_ORDERS, **(orders or {})}
    for k, v in o.items():
        if k not in DEFAULT_ORDERS:
            raise ValueError(f"orders: unknown key {k!r}; known keys are {sorted(DEFAULT_ORDERS)}.")
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 4096:
            raise ValueError(f"orders[{k!r}] must be an integer in [1, 4096], got {v!r}.")
    return o


def _safe_sqrt(x):
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def expect_1d(f: Callable, K, *, kinked: bool = False, n: int | None = None):
    """⟨f(z)⟩ for z ~ N(0, K), elementwise over an array K (shape-preserving).

    ``kinked=True`` splits the line at z = 0 (half-range Gauss rule) for integrands with a kink there.
    """
    K = jnp.asarray(K)
    s = _safe_sqrt(K)[..., None]
    if kinked:
        x, w = _stieltjes_rule("half", n or DEFAULT_ORDERS["half"])
        x, w = jnp.asarray(x, K.dtype), jnp.asarray(w, K.dtype)
        return jnp.sum(w * (f(s * x) + f(-s * x)), axis=-1)
    x, w = _sinh_trapezoid(n or DEFAULT_ORDERS["smooth1"])
    x, w = jnp.asarray(x, K.dtype), jnp.asarray(w, K.dtype)
    return jnp.sum(w * f(s * x), axis=-1)


def _cholesky_2x2(K11, K22, K12):
    # z1 = √K11 ξ1, z2 = √K22 (ρ ξ1 + √((1-ρ)(1+ρ)) ξ2): exact zeros at ρ = ±1, where the
    # textbook l22 = √(K22 - K12²/K11) loses half the digits to cancellation.
    rho, _ = _safe_corr(K11, K22, K12)
    s2 = _safe_sqrt(K22)
    return _safe_sqrt(K11), s2 * rho, s2 * _safe_sqrt((1.0 - rho) * (1.0 + rho))


def _smooth_2d(f, K11, K22, K12, n):
    x, w = _sinh_trapezoid(n)
    dt = jnp.result_type(K11)
    x, w = jnp.asarray(x, dt), jnp.asarray(w, dt)
    l11, l21, l22 = (v[..., None, None] for v in _cholesky_2x2(K11, K22, K12))
    xi1, xi2 = x[:, None], x[None, :]
    z1 = l11 * xi1
    z2 = l21 * xi1 + l22 * xi2
    return jnp.sum(w[:, None] * w[None, :] * f(z1, z2), axis=(-2, -1))


def _polar_2d(f, K11, K22, K12, n_arc, n_rad):
    r, wr = _stieltjes_rule("radial", n_rad)
    t, wt = _gauss_legendre(n_arc)
    dt = jnp.result_type(K11)
    r, wr, t, wt = (jnp.asarray(v, dt) for v in (r, wr, t, wt))
    l11, l21, l22 = _cholesky_2x2(K11, K22, K12)
    # Kink rays: z1 = 0 at θ = π/2, 3π/2; z2 = 0 where (cos θ, sin θ) ⟂ (l21, l22).
    theta0 = jnp.arctan2(-l21, l22)
    two_pi = 2 * jnp.pi
    brk = jnp.stack(
        [
            jnp.full_like(theta0, jnp.pi / 2),
            jnp.full_like(theta0, 3 * jnp.pi / 2),
            jnp.mod(theta0, two_pi),
            jnp.mod(theta0 + jnp.pi, two_pi),
        ],
        axis=-1,
    )
    brk = jnp.sort(brk, axis=-1)
    lo = brk
    hi = jnp.concatenate([brk[..., 1:], brk[..., :1] + two_pi], axis=-1)
    half = (hi - lo) / 2
    mid = (hi + lo) / 2
    theta = mid[..., :, None] + half[..., :, None] * t  # (..., 4, n_arc)
    wtheta = half[..., :, None] * wt / two_pi
    c, s = jnp.cos(theta)[..., None], jnp.sin(theta)[..., None]  # (..., 4, n_arc, 1)
    z1 = l11[..., None, None, None] * c * r
    z2 = (l21[..., None, None, None] * c + l22[..., None, None, None] * s) * r
    vals = jnp.sum(wr * f(z1, z2), axis=-1)  # radial
    return jnp.sum(wtheta * vals, axis=(-2, -1))


def expect_2d(f: Callable, K11, K22, K12, *, kinked: bool = False, orders: dict | None = None):
    """⟨f(z_1, z_2)⟩ for (z_1, z_2) ~ N(0, [[K11, K12], [K12, K22]]), elementwise over arrays.

    ``f`` must broadcast over its two array arguments.  ``kinked=True`` uses the kink-aware polar
    rule (integrand smooth except on the lines z_1 = 0 and z_2 = 0).
    """
    o = _orders(orders)
    K11, K22, K12 = jnp.broadcast_arrays(*(jnp.asarray(v) for v in (K11, K22, K12)))
    if kinked:
        return _polar_2d(f, K11, K22, K12, o["arc"], o["radial"])
    return _smooth_2d(f, K11, K22, K12, o["smooth2"])


# --------------------------------------------------------------------------------------------
# The two-point functions the kernel recursions need.


def pair_moments(act: Activation, K11, K22, K12, *, quadrature: bool = False, orders=None):
    """(⟨σ_1σ_2⟩, ⟨σ'_1σ'_2⟩) for the 2×2 kernel (K11, K22, K12), elementwise over arrays.

    Closed forms when the activation has them (unless ``quadrature=True``), quadrature otherwise.
    """
    if act.pair is not None and not quadrature:
        return act.pair(K11, K22, K12)
    fn, gr = act.fn, act.grad
    ss = expect_2d(lambda a, b: fn(a) * fn(b), K11, K22, K12, kinked=act.kinked, orders=orders)
    dd = expect_2d(lambda a, b: gr(a) * gr(b), K11, K22, K12, kinked=act.kinked, orders=orders)
    return ss, dd


def sigma_moments(act: Activation, K, *, quadrature: bool = False, orders=None):
    """Matrices (⟨σ_ασ_β⟩_K, ⟨σ'_ασ'_β⟩_K) for an (N, N) kernel K.

    With quadrature, every entry (the diagonal included) uses the same two-dimensional rule, so
    duplicated inputs give exactly duplicated rows and the kernel stays PSD; rows are evaluated in
    chunks to bound memory.
    """
    K = jnp.asarray(K)
    d = jnp.diagonal(K)
    if act.pair is not None and not quadrature:
        return act.pair(d[:, None], d[None, :], K)
    N = K.shape[0]
    o = _orders(orders)
    nodes = 4 * o["arc"] * o["radial"] if act.kinked else o["smooth2"] ** 2
    rows = max(1, min(N, _MAX_CHUNK_ELEMS // max(1, N * nodes)))

    def row_block(args):
        k11, k12 = args
        return pair_moments(act, k11[:, None], d[None, :], k12, quadrature=True, orders=orders)

    if rows >= N:
        ss, dd = row_block((d, K))
    else:
        ss, dd = jax.lax.map(lambda a: row_block((a[0][None], a[1][None])), (d, K), batch_size=rows)
        ss, dd = ss.reshape(N, N), dd.reshape(N, N)
    # Quadrature is symmetric only up to rounding; the recursions assume exact symmetry.
    return (ss + ss.T) / 2, (dd + dd.T) / 2
