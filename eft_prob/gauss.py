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
import itertools
from collections.abc import Callable
from typing import NamedTuple

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


#: unordered pairs per vectorized block of :func:`over_pairs` (twice as many where odd σ halves
#: the grid), and the unrolling of the inner loop of :func:`inner_sums` (measured on 2 CPU cores:
#: tanh pair integrals at N = 250, 48 nodes per axis, 5.4x faster than a materialized
#: (pairs, n, n) grid; 4-fold unrolling another 1.4x; the odd-σ half grid another 1.7x at N = 500)
_PAIR_BATCH = 1024
#: unroll of :func:`inner_sums`' loop for kernels of more than :data:`_UNROLL_MIN_PAIRS` pairs; one
#: below.  Unrolling 4 is 14-16% faster for many pairs (tanh prior_statistics, depth 10: N = 128
#: and 1000), but it quadruples the loop body that XLA compiles: value_and_grad of prior_statistics
#: at N = 2, depth 3 compiled in ~13 s vs ~9.5 s (2 CPU cores), at the same warm speed.  Small
#: kernels are the NUTS likelihoods, where compilation is the cost; both give the same values
#: (benchmarks/README.md, ``bench_vertex.py --unroll``).
_INNER_UNROLL = 4
_UNROLL_MIN_PAIRS = 2048


@functools.cache
def _upper_pairs(N: int):
    return tuple(v.astype(np.int32) for v in np.triu_indices(N))


def over_pairs(pair: Callable, K, batch: int | None = None):
    """``pair(k11, k22, k12) -> (F,)`` for every unordered pair a <= b of the (N, N) kernel K.

    Returns ``(out (F, P), iu, ju)`` with P = N(N+1)/2 and (iu, ju) = ``np.triu_indices(N)``; the
    pairs are evaluated ``batch`` (default :data:`_PAIR_BATCH`) at a time (vmap inside ``lax.map``),
    so memory stays bounded.
    """
    N = K.shape[0]
    batch = _PAIR_BATCH if batch is None else batch
    iu, ju = _upper_pairs(N)
    d = jnp.diagonal(K)
    f = lambda ij: pair(d[ij[0]], d[ij[1]], K[ij[0], ij[1]])
    out = jax.lax.map(f, (iu, ju), batch_size=min(batch, iu.shape[0]))
    return out.T, iu, ju


def inner_unroll(N: int) -> int:
    """The unroll of :func:`inner_sums` for pair integrals over an (N, N) kernel (:data:`_INNER_UNROLL`)."""
    return _INNER_UNROLL if N * (N + 1) // 2 > _UNROLL_MIN_PAIRS else 1


def inner_sums(fns: Callable, c, l22, x, w, parity=None, unroll: int = 1, rule: ShiftRule | None = None, order=None):
    """Inner sums of a nested two-dimensional rule for one pair: for every outer node i,
    ``S_k[i] = Σ_j w_j f_k(c_i + l22·x_j)`` with (f_k) = ``fns(z)`` (a tuple of arrays).

    The sum over the inner nodes j runs as an (unrolled) loop of vector updates over i, so no
    (n, n) grid is stored and σ and its derivatives are evaluated once per grid point.  With
    ``parity`` (±1 per f_k: f_k(−z) = ±f_k(z)), a rule symmetric about 0 (x_{n−1−j} = −x_j, equal
    weights) and c odd in i, the grid is point-symmetric and only the first half of the outer nodes
    is evaluated: S_k[n−1−i] = parity_k·S_k[i].  ``unroll``: of the loop (:func:`inner_unroll`).
    With an addition theorem ``rule`` (:func:`shift_rule`), ``fns`` takes (σ, ..., σ^(order)) at the
    node instead of z, computed from the states of c_i and of the shifts l22·x_j.
    """
    n = c.shape[0]
    if parity is not None:
        c = c[: (n + 1) // 2]
    if rule is None:
        at, shifts = (lambda h: fns(c + h)), l22 * x
    else:
        state_c = rule.split(c)
        at, shifts = (lambda h: fns(rule.values(state_c, h, order))), rule.split(l22 * x)

    def body(acc, hw):
        v = at(hw[0])
        return tuple(a + hw[1] * f for a, f in zip(acc, v)), None

    first = tuple(w[0] * f for f in at(jax.tree_util.tree_map(lambda a: a[0], shifts)))
    rest = jax.tree_util.tree_map(lambda a: a[1:], shifts)
    out, _ = jax.lax.scan(body, first, (rest, w[1:]), unroll=unroll)
    if parity is not None:
        out = tuple(jnp.concatenate([S, p * S[: n // 2][::-1]]) for S, p in zip(out, parity))
    return out


# --------------------------------------------------------------------------------------------
# Addition theorems: σ^(p)(a + b) from per-argument values, for the innermost axis of nested rules.
#
# On the innermost axis of a nested rule σ is evaluated at a + b_j, a the conditional mean on each
# outer node and b_j = l·x_j one of n shifts.  Where σ has an addition theorem (tanh, sin), the
# transcendental functions are evaluated once per outer node and once per shift, and each of the
# n·(outer nodes) grid points costs a few multiplications (and one division for tanh) instead of a
# tanh or sin.  Measured (2 CPU cores, depth 10): the trained O(1/n) marginals, whose three- and
# four-input tables use it, 2.0x faster for tanh and 4.1x for sin; the pair integrals of the kernel
# and vertex recursions (N = 1000) 1.2x (benchmarks/README.md, ``--shift`` of bench_trained.py and
# bench_vertex.py).  The values agree with direct evaluation to rounding (tests/test_gauss.py).


class ShiftRule(NamedTuple):
    """σ and its derivatives at a + b from states of a and b (see :func:`shift_rule`).

    ``split(z)`` -> a state (tuple of arrays of z's shape); ``values(state_a, state_b, order)`` ->
    (σ, σ', ..., σ^(order)) at a + b; ``max_abs``: the arguments |a|, |b| up to which the values are
    accurate to rounding (None: any).
    """

    split: Callable
    values: Callable
    max_abs: float | None


def _tanh_split(z):
    """(1 − tanh z, 1 + tanh z), both to full relative precision (no cancellation) for |z| <= 300."""
    pos = z >= 0
    e = jnp.exp(-2 * jnp.where(pos, z, -z))  # not jnp.abs, whose derivative at z = 0 is not a one-sided one
    big = 2 / (1 + e)  # 1 + |tanh z|
    small = e * big  # 1 − |tanh z|
    return jnp.where(pos, small, big), jnp.where(pos, big, small)


@functools.cache
def _tanh_polys(order: int):
    """Coefficients (low to high) of P_p with tanh^(p)(z) = P_p(tanh z), p = 0..order: P_0 = t and
    P_{p+1} = P_p'·(1 − t²)."""
    P = np.polynomial.polynomial
    polys = [np.array([0.0, 1.0])]
    for _ in range(order):
        polys.append(P.polymul(P.polyder(polys[-1]), [1.0, 0.0, -1.0]))
    return tuple(tuple(float(c) for c in p) for p in polys)


def _tanh_values(sa, sb, order: int):
    # 1 ± tanh(a + b) = (1 ± tanh a)(1 ± tanh b)/(1 + tanh a tanh b), so
    # tanh(a + b) = (q_a q_b − p_a p_b)/(q_a q_b + p_a p_b) with p = 1 − tanh, q = 1 + tanh: the
    # products carry the saturated tails exactly, without the cancellation of (T_a + T_b)/(1 + T_a T_b).
    (pa, qa), (pb, qb) = sa, sb
    A, B = qa * qb, pa * pb
    t = (A - B) / (A + B)
    out = []
    for c in _tanh_polys(order):
        v = jnp.full_like(t, c[-1])
        for ck in c[-2::-1]:
            v = v * t + ck if ck else v * t
        out.append(v)
    return tuple(out)


def _sin_values(sa, sb, order: int):
    (s_a, c_a), (s_b, c_b) = sa, sb
    s, c = s_a * c_b + c_a * s_b, c_a * c_b - s_a * s_b
    return tuple((s, c, -s, -c)[p % 4] for p in range(order + 1))


#: the pair integrals use the addition theorem only above this many pairs (N >= 64): below, its larger
#: program costs more compilation than it saves (tanh kernels, N = 9: 1.0 -> 1.5 s cold; prior_statistics,
#: N = 128: 0.81 vs 0.88 s warm, noise level; N = 1000: 1.19-1.25x faster)
_SHIFT_MIN_PAIRS = 2048


def pair_rule(act: Activation, N: int, shift: bool) -> ShiftRule | None:
    """The addition theorem for the pair integrals over an (N, N) kernel: :func:`shift_rule` when
    ``shift`` and N(N+1)/2 > :data:`_SHIFT_MIN_PAIRS`, else None."""
    return shift_rule(act) if shift and N * (N + 1) // 2 > _SHIFT_MIN_PAIRS else None


@functools.cache
def shift_rule(act: Activation) -> ShiftRule | None:
    """The addition theorem of σ for the registry's tanh and sin (recognized by their functions, so
    ``get_activation("tanh")`` and the spec strings qualify), else None."""
    from .activations import _tanh_grad

    if act.fn is jnp.tanh and act.grad is _tanh_grad:
        return ShiftRule(_tanh_split, _tanh_values, 300.0)
    if _is_sin(act.fn, act.grad):
        return ShiftRule(lambda z: (jnp.sin(z), jnp.cos(z)), _sin_values, None)
    return None


def _is_sin(fn, grad) -> bool:
    """σ = jnp.sin with σ' = jnp.cos: the registry's sin (its addition theorem, its closed forms)."""
    return fn is jnp.sin and grad is jnp.cos


@functools.cache
def is_odd(act: Activation) -> bool:
    """Whether σ(−z) = −σ(z) (to 1e-13 relative on 400 points of (0, 20]): then the two-dimensional
    rules evaluate half of their grid (:func:`inner_sums`).  Decided numerically, so user
    activations benefit too; False when the theory does not run in float64."""
    z = np.linspace(0.05, 20.0, 400)
    with jax.ensure_compile_time_eval():
        a, b = np.asarray(act.fn(jnp.asarray(z))), np.asarray(act.fn(jnp.asarray(-z)))
    if a.dtype != np.float64 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return False
    return bool(np.all(np.abs(a + b) <= 1e-13 * np.maximum(np.abs(a), 1e-300)))


def sigma_moments(act: Activation, K, *, quadrature: bool = False, orders=None, shift: bool = False):
    """Matrices (⟨σ_ασ_β⟩_K, ⟨σ'_ασ'_β⟩_K) for an (N, N) kernel K.

    With quadrature, every entry (the diagonal included) uses the same two-dimensional rule, so
    duplicated inputs give exactly duplicated rows and the kernel stays PSD.  Smooth σ: each
    unordered pair once (:func:`over_pairs`), the inner axis summed as a loop
    (:func:`inner_sums`); kinked σ: rows in chunks to bound memory.  ``shift``: the inner axis by
    σ's addition theorem (:func:`shift_rule`; the caller checks that the arguments stay where it is
    exact, eft_prob.theory.kernels._shift_ok).
    """
    K = jnp.asarray(K)
    d = jnp.diagonal(K)
    if act.pair is not None and not quadrature:
        return act.pair(d[:, None], d[None, :], K)
    N = K.shape[0]
    o = _orders(orders)
    if not act.kinked:
        x, w = (jnp.asarray(v, K.dtype) for v in _sinh_trapezoid(o["smooth2"]))
        fn, gr, odd = act.fn, act.grad, is_odd(act)
        unroll = inner_unroll(N)
        rule = pair_rule(act, N, shift)
        inner = (lambda d: (d[0], d[1])) if rule is not None else (lambda z: (fn(z), gr(z)))

        def pair(k11, k22, k12):
            l11, l21, l22 = _cholesky_2x2(k11, k22, k12)
            I0, I1 = inner_sums(inner, l21 * x, l22, x, w, (-1, 1) if odd else None, unroll, rule, 1)
            a = l11 * x
            return jnp.stack([jnp.sum(w * fn(a) * I0), jnp.sum(w * gr(a) * I1)])

        out, iu, ju = over_pairs(pair, K, 2 * _PAIR_BATCH if odd else None)  # half the grid per pair
        sym = lambda v: jnp.zeros_like(K).at[iu, ju].set(v).at[ju, iu].set(v)
        return sym(out[0]), sym(out[1])
    nodes = 4 * o["arc"] * o["radial"]
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


# --------------------------------------------------------------------------------------------
# Expectations over up to four sample indices (the four-point vertex needs ⟨σσσσ⟩_K).
#
# Tensor rules in whitened coordinates z = Lξ, L the lower-triangular (pivot-free, PSD-safe)
# Cholesky factor of the m×m kernel, so z_k depends on ξ_1..ξ_k only.  The integrand is evaluated
# on a nested grid: z_k lives on the n^k grid of (ξ_1..ξ_k) (trailing singleton axes), so a
# product Π_k f_k(z_k) costs n + n² + ... + n^m evaluations, and the weighted sum is reduced
# innermost axis first.
#
# * smooth integrands: the sinh-mapped trapezoid rule per axis, with the map's scale adapted to
#   the kernel: ξ = s·sinh(u), s = 1.5·min(1, 1/√K_max), |ξ| <= 7 + 2(1.5 - s).  Near-polynomial
#   integrands (small K) want a wide, almost uniform rule (large s); steep ones (tanh at large K)
#   want nodes crowded at the centre (small s).  Measured on 1-D tanh moments, 24 nodes give
#   <= 1e-7 relative error for 0.01 <= K <= 10 (the fixed s = 0.5 rule: 4e-5 at K = 0.05).
# * integrands with kinks at z_k = 0: a nested split rule.  Given ξ_1..ξ_{k-1}, the kink of z_k
#   sits at ξ_k = t = -(Σ_{j<k} L_kj ξ_j)/L_kk; the ξ_k integral is split there and each half-line
#   gets the q-point Gauss rule of the truncated normal weight (interpolated in t from a cached
#   table), on which the integrand is analytic.  After the innermost integration the remaining
#   integrand is analytic except on the kinks of the outer z's, which the outer splits resolve,
#   so the rule converges exponentially in q (plain tensor rules converge algebraically).  The
#   inner integrals smooth the outer integrand only on the scale of the conditional standard
#   deviations, so strongly correlated inputs need more nodes: ReLU ⟨σσσσ⟩ with q = 8 is accurate
#   to ~1e-10 relative for correlations ~0.5 and to ~1e-7 for correlations ~0.8-0.9.

#: Default orders of :func:`expect_nd` for m = 3, 4 (m = 1, 2 use expect_1d / expect_2d):
#: sinh-trapezoid nodes per axis for smooth integrands (32 / 24: ~1e-10 / ~1e-7 relative for
#: tanh-like σ), Gauss nodes per half-line for kinked ones (10 / 8: ~1e-7 or better).
ND_ORDERS = {"smooth3": 32, "smooth4": 24, "kink3": 10, "kink4": 8}
_TN_T, _TN_STEP = 8.5, 0.01


@functools.cache
def _truncated_normal_table(q: int):
    """q-point Gauss rules for the weight φ(ξ) on [t, ∞), t on a uniform grid in [-T, T].

    Discretized Stieltjes procedure (composite Gauss–Legendre, 40 panels × 40 nodes on
    [t, max(t, 0) + 13]) followed by Golub–Welsch, vectorized over t.
    """
    grid = np.arange(-_TN_T, _TN_T + _TN_STEP / 2, _TN_STEP)
    gt, gw = _gauss_legendre(40)
    hi = np.maximum(grid, 0.0) + 13.0
    edges = grid[:, None] + (hi - grid)[:, None] * np.linspace(0.0, 1.0, 41)[None, :]
    a_, b_ = edges[:, :-1, None], edges[:, 1:, None]
    x = ((a_ + b_) / 2 + (b_ - a_) / 2 * gt).reshape(len(grid), -1)
    w = ((b_ - a_) / 2 * gw).reshape(len(grid), -1) * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
    mass = w.sum(1, keepdims=True)
    alpha = np.zeros((len(grid), q))
    beta = np.zeros((len(grid), q))
    p_prev = np.zeros_like(x)
    p = np.ones_like(x) / np.sqrt(mass)
    for k in range(q):
        alpha[:, k] = np.sum(w * x * p * p, 1)
        nxt = (x - alpha[:, k : k + 1]) * p - (np.sqrt(beta[:, k : k + 1]) * p_prev if k > 0 else 0.0)
        if k + 1 < q:
            beta[:, k + 1] = np.sum(w * nxt * nxt, 1)
            p_prev, p = p, nxt / np.sqrt(beta[:, k + 1 : k + 2])
    J = np.zeros((len(grid), q, q))
    idx = np.arange(q)
    J[:, idx, idx] = alpha
    off = np.sqrt(beta[:, 1:])
    J[:, idx[:-1], idx[1:]] = off
    J[:, idx[1:], idx[:-1]] = off
    nodes, vecs = np.linalg.eigh(J)
    weights = mass * vecs[:, 0, :] ** 2
    return grid, nodes, weights


def _right_half_rule(t, q: int):
    """Nodes and weights (..., q) for ∫_t^∞ φ(ξ) g(ξ) dξ (cubic interpolation of the table in t)."""
    grid, X, W = _truncated_normal_table(q)
    dt = jnp.result_type(t)
    X, W = jnp.asarray(X, dt), jnp.asarray(W, dt)
    tc = jnp.clip(t, -_TN_T, _TN_T)
    s = (tc + _TN_T) / _TN_STEP
    i = jnp.clip(jnp.floor(s).astype(jnp.int32) - 1, 0, len(grid) - 4)
    f = (s - i)[..., None]
    lag = (
        -(f - 1) * (f - 2) * (f - 3) / 6,
        f * (f - 2) * (f - 3) / 2,
        -f * (f - 1) * (f - 3) / 2,
        f * (f - 1) * (f - 2) / 6,
    )
    x = sum(c * X[i + k] for k, c in enumerate(lag))
    w = sum(c * W[i + k] for k, c in enumerate(lag))
    # Exact total mass (the interpolated weights are accurate to ~1e-10 absolute).
    w = w * (jax.scipy.special.ndtr(-tc) / jnp.sum(w, -1))[..., None]
    return x, w


def _cholesky_psd(K):
    """Lower-triangular L with L Lᵀ = K for (..., m, m) PSD K, as a nested list of arrays L[i][j].

    Pivots below 1e-13·K_kk (duplicated or collinear inputs, rounding) are set to zero together
    with their column, so singular kernels give exact zeros instead of noise / NaN.
    """
    m = K.shape[-1]
    L = [[None] * m for _ in range(m)]
    for k in range(m):
        Kkk = K[..., k, k]
        d = Kkk - sum((L[k][j] ** 2 for j in range(k)), jnp.zeros_like(Kkk))
        ok = d > 1e-13 * jnp.abs(Kkk)
        lkk = jnp.where(ok, jnp.sqrt(jnp.where(ok, d, 1.0)), 0.0)
        inv = jnp.where(ok, 1.0 / jnp.where(ok, lkk, 1.0), 0.0)
        L[k][k] = lkk
        for i in range(k + 1, m):
            num = K[..., i, k] - sum((L[i][j] * L[k][j] for j in range(k)), jnp.zeros_like(Kkk))
            L[i][k] = num * inv
    return L


def _adapted_sinh(kmax, n: int):
    """Nodes x and weights w (..., n) of the sinh trapezoid adapted to a kernel of largest variance
    ``kmax`` (...,): ξ = s·sinh(u), s = 1.5·min(1, 1/√kmax), |ξ| <= 7 + 2(1.5 − s) (see above)."""
    kmax = jax.lax.stop_gradient(kmax)
    s = 1.5 * jnp.minimum(1.0, jax.lax.rsqrt(jnp.maximum(kmax, 1e-300)))
    xmax = 7.0 + 2.0 * (1.5 - s)
    umax = jnp.arcsinh(xmax / s)
    u = umax[..., None] * jnp.linspace(-1.0, 1.0, n, dtype=jnp.result_type(kmax))
    h = (2.0 * umax / (n - 1))[..., None]
    x = s[..., None] * jnp.sinh(u)
    w = h * s[..., None] * jnp.cosh(u) * jnp.exp(-x * x / 2) / np.sqrt(2 * np.pi)
    return x, w


def _nested_nodes(K, kinked: bool, n: int, half: bool = False, split_last: bool = False):
    """Nested rule for (..., m, m) kernels K: lists zs, ws with, for each axis k = 0..m-1,

    zs[k] of shape (..., n×(k+1), 1×(m-k-1)) — z_k on the grid of ξ_0..ξ_k — and ws[k]
    broadcastable to (..., n×(k+1)) — the weights of ξ_k given ξ_0..ξ_{k-1}.  ``n`` is the number
    of nodes per axis (for kinked rules 2q: q per half-line).

    ``split_last`` (smooth rule): zs and ws for the outer axes 0..m-2 only, and a third item
    (mu, s, x, w) for the innermost one, whose z_{m-1} = mu + s·x_j on node j: mu (..., n×(m-1)) the
    conditional mean on the outer grid, s (...,) the conditional standard deviation L_{m-1,m-1}, x
    and w (..., n_last) the innermost nodes and weights (the same for every outer node).

    ``half`` (smooth rule, n even): only the outer half ξ_0 < 0 (n/2 nodes on axis 0).  The smooth
    grid is point-symmetric (x_{n−1−j} = −x_j, equal weights, the same on every axis), so ξ → −ξ
    maps this half onto the other and z onto −z: for integrands of known parity the full sum is
    (1 + parity) times the half sum.
    """
    if half and (kinked or n % 2):
        raise ValueError(f"_nested_nodes: half=True needs the smooth rule and an even n, got kinked={kinked}, n={n}.")
    if split_last and kinked:
        raise ValueError("_nested_nodes: split_last=True needs the smooth rule.")
    m = K.shape[-1]
    L = _cholesky_psd(K)
    batch = K.shape[:-2]
    dt = K.dtype
    g = lambda a, k: a[(...,) + (None,) * k]  # append k singleton axes
    xis, ws = [], []
    # the conditional mean of z_k given ξ_0..ξ_{k-1}, on their grid (..., n×k)
    cond_mean = lambda k: sum((g(L[k][j], k) * g(xis[j], k - 1 - j) for j in range(k)), jnp.zeros(batch + (1,) * k, dt))
    if not kinked:
        x, w = _adapted_sinh(jnp.max(jnp.diagonal(K, axis1=-2, axis2=-1), axis=-1), n)
        for k in range(m):
            xk, wk = (x[..., : n // 2], w[..., : n // 2]) if half and k == 0 else (x, w)
            shape = batch + (1,) * k + (xk.shape[-1],)
            xis.append(xk.reshape(shape))
            ws.append(wk.reshape(shape))
    else:
        q = n // 2
        for k in range(m):
            c = cond_mean(k)
            lkk = g(L[k][k], k)
            pos = lkk > 0
            t = jnp.where(pos, -c / jnp.where(pos, lkk, 1.0), 0.0)
            xr, wr = _right_half_rule(t, q)
            xl, wl = _right_half_rule(-t, q)
            xis.append(jnp.concatenate([-xl, xr], axis=-1))
            ws.append(jnp.concatenate([wl, wr], axis=-1))
    zs = []
    for k in range(m - 1 if split_last else m):
        z = sum(g(L[k][j], k + 1) * g(xis[j], k - j) for j in range(k + 1))
        zs.append(g(z, m - k - 1))
    if not split_last:
        return zs, ws
    last = m - 1
    mu = cond_mean(last)
    flat = lambda a: a.reshape(batch + a.shape[-1:])
    return zs, ws[:last], (mu, L[last][last], flat(xis[last]), flat(ws[last]))


def expect_nd(
    f: Callable, K, *, kinked: bool = False, n: int | None = None, orders: dict | None = None, even: bool = False
):
    """⟨f(z_1, ..., z_m)⟩ for z ~ N(0, K), K of shape (..., m, m) with m <= 4, over the batch axes.

    ``f`` takes m arrays that broadcast against each other (z_k varies along grid axes 1..k only,
    so products of one-variable functions are cheap) and may return extra *leading* axes (e.g.
    several moments stacked on axis 0); the result then has those axes in front of the batch axes.
    m = 1 and m = 2 use :func:`expect_1d` / :func:`expect_2d` (``orders`` as there); m = 3, 4 the
    nested tensor rules described above, with ``n`` nodes per axis (smooth) or ``n // 2`` per
    half-line (kinked); defaults in :data:`ND_ORDERS`.  Singular K (repeated inputs) is allowed.
    Differentiable in K; evaluate large batches in chunks (the grid has n^m points per kernel).
    ``even``: f(−z) = f(z) (e.g. a product of an even number of odd σ's); the smooth nested rule is
    point-symmetric, so m = 3, 4 then evaluate half of the outer nodes (ξ_0 < 0) and double the sum.
    """
    K = jnp.asarray(K)
    if K.ndim < 2 or K.shape[-1] != K.shape[-2] or not 1 <= K.shape[-1] <= 4:
        raise ValueError(f"expect_nd: K must have shape (..., m, m) with 1 <= m <= 4, got {K.shape}.")
    m = K.shape[-1]
    if m == 1:
        kw = {"n": n} if n else {"n": _orders(orders)["half" if kinked else "smooth1"]}
        return expect_1d(f, K[..., 0, 0], kinked=kinked, **kw)
    if m == 2:
        return expect_2d(f, K[..., 0, 0], K[..., 1, 1], K[..., 0, 1], kinked=kinked, orders=orders)
    if n is None:
        n = ND_ORDERS[f"kink{m}"] * 2 if kinked else ND_ORDERS[f"smooth{m}"]
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < (4 if kinked else 3) or n > 4096:
        raise ValueError(f"expect_nd: n must be an integer in [{4 if kinked else 3}, 4096], got {n!r}.")
    half = even and not kinked and n % 2 == 0
    zs, ws = _nested_nodes(K, kinked, int(n), half)
    val = f(*zs)
    for k in range(m - 1, -1, -1):
        val = jnp.sum(val * ws[k], axis=-1)
    return 2.0 * val if half else val


__all__ += ["ND_ORDERS", "expect_nd"]


# --------------------------------------------------------------------------------------------
# sin: every Gaussian moment of products of its derivatives in closed form.

#: use :func:`sin_tables` for the registry's sin wherever the theory needs Gaussian moments of its
#: derivatives (off: the quadrature rules, for comparison)
CLOSED_SIN = True


def closed_sin(fns) -> bool:
    """Whether ``fns`` = (σ, σ', ...) are sin and its derivatives (σ = jnp.sin, σ' = jnp.cos: the
    registry's sin, the higher derivatives by autodiff of cos), whose Gaussian moments have a closed
    form (:func:`sin_tables`), and :data:`CLOSED_SIN` is on."""
    return CLOSED_SIN and _is_sin(fns[0], fns[1] if len(fns) > 1 else jnp.cos)


def _check_orders(fn: str, name: str, tuples, empty: bool = False) -> None:
    """Each entry of ``tuples`` a tuple of derivative orders (integers >= 0; () allowed with ``empty``)."""
    for t in tuples:
        ok = isinstance(t, tuple) and (len(t) > 0 or empty)
        if not ok or not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) and p >= 0 for p in t):
            raise ValueError(
                f"{fn}: {name} must hold tuples of derivative orders (integers >= 0{'; () for 1' if empty else ''}), "
                f"got {t!r}."
            )


@functools.cache
def _sin_coefficients(basis) -> np.ndarray:
    """C (F, 2r + 1), complex: Π_{p in basis[f]} sin(z + pπ/2) = Σ_{|ω| <= r} C[f, r + ω] e^{iωz},
    r the largest product's size (sin(z + pπ/2) = Σ_{ε = ±1} ε e^{iε(z + pπ/2)} / 2i per factor)."""
    r = max(len(t) for t in basis)
    C = np.zeros((len(basis), 2 * r + 1), complex)
    for f, t in enumerate(basis):
        for eps in itertools.product((1, -1), repeat=len(t)):
            C[f, r + sum(eps)] += np.prod([e / 2j * np.exp(0.5j * np.pi * e * p) for e, p in zip(eps, t)])
    return C


def sin_tables(K_sub, basis):
    """Gaussian moments of products of sin's derivatives in closed form: (S, F^m) from kernels (S, m, m).

    Entry [s, f_0·F^(m-1) + ... + f_(m-1)] = ⟨Π_k Π_{p in basis[f_k]} sin^(p)(z_k)⟩ for z ~ N(0, K_sub[s]),
    the layout of the nested tables of eft_prob.theory.ntk_stats (``basis``: tuples of derivative orders).

    Each product of derivatives of sin on one variable is a trigonometric polynomial Σ_ω C[f, ω] e^{iωz}
    (:func:`_sin_coefficients`), and ⟨Π_k e^{iω_k z_k}⟩ = exp(−ωᵀKω/2) for z ~ N(0, K), so a subset's
    table is the (2r + 1)^m exponentials of its integer frequency vectors contracted with C on every
    axis.  Exact up to rounding, for any K, singular ones included; differentiable in K.  The terms are
    at most 1 in size, so the error is absolute (~1e-16): relative ~1e-16/|moment| for moments that
    vanish with K (⟨σσσσ⟩ ≈ 1.3e-8 at variances ~1e-3 agreed with a 40-node rule to 4e-10).  The
    imaginary parts cancel between ω and −ω (C[f, −ω] = conj C[f, ω]).
    """
    K_sub = jnp.asarray(K_sub)
    if K_sub.ndim != 3 or K_sub.shape[-1] != K_sub.shape[-2] or not 1 <= K_sub.shape[-1] <= 4:
        raise ValueError(f"sin_tables: K_sub must have shape (S, m, m) with 1 <= m <= 4, got {K_sub.shape}.")
    basis = tuple(basis)
    _check_orders("sin_tables", "basis", basis)
    S, m = K_sub.shape[0], K_sub.shape[-1]
    C = _sin_coefficients(basis)
    r = (C.shape[1] - 1) // 2
    omega = np.stack(np.meshgrid(*[np.arange(-r, r + 1.0)] * m, indexing="ij"), -1).reshape(-1, m)
    quad = jnp.einsum("gk,skl,gl->sg", omega, K_sub, omega)
    acc = jnp.exp(-0.5 * quad).reshape((S,) + (2 * r + 1,) * m).astype(jnp.result_type(K_sub.dtype, 1j))
    Cj = jnp.asarray(C, acc.dtype)
    for _ in range(m):  # frequency axis k -> function axis k, k = 0..m-1 (the function axes collect at the end)
        acc = jnp.tensordot(acc, Cj, axes=([1], [1]))
    return jnp.real(acc).reshape(S, -1)


def sin_pair_moments(K, products):
    """⟨f_a g_b⟩ for every ordered pair (a, b) of an (N, N) kernel, the diagonal included (a = b: one
    variable), in closed form: (len(products), N, N).  ``products`` = ((t_f, t_g), ...), each t a tuple
    of derivative orders of sin whose product is f (or g; () is the constant 1).  The frequency pairs
    ±(ω_a, ω_b) give the same exponential, so each is evaluated once on the (N, N) kernel and added
    with its real coefficients: no (N, N, grid) array is formed."""
    K = jnp.asarray(K)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"sin_pair_moments: K must be a square (N, N) kernel, got shape {K.shape}.")
    products = tuple(products)
    if not all(isinstance(pr, tuple) and len(pr) == 2 for pr in products):
        raise ValueError(f"sin_pair_moments: products must hold pairs (t_f, t_g), got {products!r}.")
    _check_orders("sin_pair_moments", "products", [t for pr in products for t in pr], empty=True)
    basis = tuple(sorted({t for pr in products for t in pr}))
    C = _sin_coefficients(basis)
    r = (C.shape[1] - 1) // 2
    where = {t: i for i, t in enumerate(basis)}
    Cf, Cg = C[[where[f] for f, _ in products]], C[[where[g] for _, g in products]]
    W = np.real(Cf[:, :, None] * Cg[:, None, :])  # (P, 2r+1, 2r+1): the imaginary parts cancel under ω -> -ω
    W = W + W[:, ::-1, ::-1]
    d = jnp.diagonal(K)
    out = jnp.zeros((len(products),) + K.shape, K.dtype)
    for i in range(2 * r + 1):
        for j in range(2 * r + 1):
            if (i, j) > (2 * r - i, 2 * r - j):  # the mirror (−ω_a, −ω_b) was taken with it
                continue
            w = W[:, i, j] / (2.0 if (i, j) == (r, r) else 1.0)
            if not np.any(w):
                continue
            wa, wb = i - r, j - r
            e = jnp.exp(-0.5 * (wa * wa * d[:, None] + wb * wb * d[None, :] + 2.0 * wa * wb * K))
            out = out + jnp.asarray(w, K.dtype)[:, None, None] * e
    return out
