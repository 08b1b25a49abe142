"""O(1/n) statistics of the prior: the four-point vertex V^(ℓ) and the NLO metric K^{1}(ℓ).

At finite width (THEORY.md §3.3), for neurons i, k of layer ℓ and inputs α,

    E[z_{i;α1} z_{k;α2}]                  = δ_ik [K_{α1α2} + K^{1}_{α1α2}/n_{ℓ-1}] + O(1/n²),
    E[z_{i;α1} z_{i;α2} z_{k;α3} z_{k;α4}] - E[z_i z_i] E[z_k z_k] = V_{(α1α2)(α3α4)}/n_{ℓ-1} + O(1/n²)  (i ≠ k),

with both tensors normalized by the width n_{ℓ-1} of the layer feeding layer ℓ.  (THEORY.md calls
K^{1} "G^{1}".)  They follow from one recursion, run jointly with the kernel (§3.5): with the
hyperparameters of layer ℓ+1, ⟨·⟩ = ⟨·⟩_{K^(ℓ)}, r_ℓ = n_ℓ/n_{ℓ-1} and V^(1) = K^{1}(1) = 0,

    V^(ℓ+1)_{(α1α2)(α3α4)} = C_W² [⟨σ_α1 σ_α2 σ_α3 σ_α4⟩ - ⟨σ_α1 σ_α2⟩⟨σ_α3 σ_α4⟩]
                           + C_W² r_ℓ Σ_β V^(ℓ)_{(β1β2)(β3β4)} ∂⟨σ_α1σ_α2⟩/∂K_{β1β2} ∂⟨σ_α3σ_α4⟩/∂K_{β3β4},
    K^{1}(ℓ+1)_{α1α2}      = r_ℓ C_W [Σ_β K^{1}_{β1β2} ∂⟨σ_α1σ_α2⟩/∂K_{β1β2}
                           + ½ Σ_β V_{(β1β2)(β3β4)} ∂²⟨σ_α1σ_α2⟩/∂K_{β1β2}∂K_{β3β4}]

(ordered sums, K_{β1β2} and K_{β2β1} independent: the "χ-like" forms of §3.5, equivalent to the
Stein forms ¼⟨∂∂(σσ)⟩⟨∂∂(σσ)⟩ and ⅛⟨∂⁴(σσ)⟩).  ⟨σ_α1σ_α2⟩ depends only on the 2×2 sub-kernel of
(α1, α2), so in the coordinates (K_aa, K_bb, K_ab) of a pair (a, b) only three first and six
second derivatives occur:

* smooth σ without a closed form — Stein identities, 2-D quadrature:
  ∂/∂K_ab = ⟨σ'_aσ'_b⟩, ∂/∂K_aa = ½⟨σ''_aσ_b⟩; second derivatives ¼⟨σ''''_aσ_b⟩, ½⟨σ'''_aσ'_b⟩,
  ⟨σ''_aσ''_b⟩ (K_ab, K_ab), ¼⟨σ''_aσ''_b⟩ (K_aa, K_bb);
* kinked σ (σ'' a delta function): ∂/∂K_ab = ⟨σ'_aσ'_b⟩ and, from Stein's identity for z_aσ'_aσ_b,
  ∂/∂K_aa = (⟨z_aσ'_aσ_b⟩ - K_ab⟨σ'_aσ'_b⟩)/(2K_aa) (= (⟨σ_aσ_b⟩ - K_ab⟨σ'σ'⟩)/(2K_aa) for the
  scale-invariant class, by homogeneity) — both regular for identical inputs; second derivatives
  by automatic differentiation of the closed form or of the kink-aware polar rule;
* closed forms (erf, sin): automatic differentiation;
* a = b: the one-variable function ⟨σ²⟩_{K_aa} and its derivatives.

The four-sample expectations need Gaussian integrals over at most four distinct inputs
(:func:`eft_prob.gauss.expect_nd`).  ``nlo_kernel`` needs V only on the 2-input blocks
{V_{(β1β2)(β3β4)} : β ∈ {a, b}}, which the recursion maps into themselves, so it costs O(N²)
two-dimensional integrals per layer; ``four_point_vertex`` needs all C(N+3, 4) distinct
⟨σσσσ⟩ (O(N⁴/24) integrals of dimension up to four per layer, and N⁴ memory).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import gauss
from .._config import float64_theory, is_concrete
from .._validate import check_inputs
from ..spec import MLPSpec
from .kernels import _canonical, _first_layer, _shift_ok, _width_ratios

__all__ = [
    "FactoredVertex",
    "PriorStatistics",
    "default_last_samples",
    "four_point_vertex",
    "nlo_kernel",
    "prior_statistics",
]

_MAX_ELEMS = 4_000_000  # grid points per quadrature chunk
_DENSE_MAX = 24  # prior_statistics keeps V dense (exact) up to this many inputs, factored above


# --------------------------------------------------------------------------------------------
# Orders.


def _split_orders(orders):
    """(orders for expect_1d/expect_2d/sigma_moments, orders for expect_nd) from one dict."""
    orders = dict(orders or {})
    known = set(gauss.DEFAULT_ORDERS) | set(gauss.ND_ORDERS)
    for k, v in orders.items():
        if k not in known:
            raise ValueError(f"orders: unknown key {k!r}; known keys are {sorted(known)}.")
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 4096:
            raise ValueError(f"orders[{k!r}] must be an integer in [1, 4096], got {v!r}.")
    low = {k: int(v) for k, v in orders.items() if k in gauss.DEFAULT_ORDERS}
    nd = {**gauss.ND_ORDERS, **{k: int(v) for k, v in orders.items() if k in gauss.ND_ORDERS}}
    return (tuple(sorted(low.items())) or None), tuple(sorted(nd.items()))


# --------------------------------------------------------------------------------------------
# Two-point functions of a pair and their derivatives in (K_aa, K_bb, K_ab).


def _elementwise_derivative(fn):
    g = jax.grad(lambda z: fn(z))
    return lambda z: jnp.vectorize(g)(z)


@functools.cache
def _derivatives(act):
    """(σ, σ', σ'', σ''', σ'''') as elementwise functions (automatic differentiation)."""
    d = [act.fn, act.grad]
    for _ in range(3):
        d.append(_elementwise_derivative(d[-1]))
    return tuple(d)


def _partials(fn, args, u):
    """Elementwise ∂fn/∂args[u] of an elementwise function fn(*args) (one JVP)."""
    tangents = tuple(jnp.ones_like(a) if i == u else jnp.zeros_like(a) for i, a in enumerate(args))
    return jax.jvp(fn, args, tangents)[1]


def _grad_hess(fn, args):
    """Elementwise gradient (3, ...) and Hessian (3, 3, ...) of fn(k11, k22, k12) by nested JVPs."""
    grads = [functools.partial(lambda u, *a: _partials(fn, a, u), u) for u in range(3)]
    G = jnp.stack([g(*args) for g in grads])
    H = [[None] * 3 for _ in range(3)]
    for u in range(3):
        for v in range(u, 3):
            H[u][v] = H[v][u] = _partials(grads[u], args, v)
    return G, jnp.stack([jnp.stack(r) for r in H])


def _rowwise(fn, K, nodes):
    """fn(k11 (r,1), k22 (1,N), k12 (r,N)) -> array (M, r, N), evaluated in row chunks."""
    N = K.shape[0]
    d = jnp.diagonal(K)
    rows = max(1, min(N, _MAX_ELEMS // max(1, N * nodes)))
    if rows >= N:
        return fn(d[:, None], d[None, :], K)
    out = jax.lax.map(lambda a: fn(a[0][None, None], d[None, :], a[1][None, :])[:, 0], (d, K), batch_size=rows)
    return jnp.moveaxis(out, 0, 1)


_SMOOTH_PAIR_NODES = 48  # nodes per axis of the adapted sinh rule for the pair integrals below
#: the 11 pair moments of :func:`_smooth_pair_integrals` as products of derivative orders on (a, b)
_SIN_PAIR_PRODUCTS = (
    ((2,), (0,)),
    ((4,), (0,)),
    ((3,), (1,)),
    ((2,), (2,)),
    *(((0,) * j, (0,) * (4 - j)) for j in range(5)),
    ((0,), (0,)),
    ((1,), (1,)),
)


def _smooth_pair_integrals(act, K, n=_SMOOTH_PAIR_NODES, shift: bool = False):
    """For smooth σ and all pairs (a, b), one nested 2-D rule (the adapted sinh trapezoid of
    eft_prob.gauss.expect_nd: ≲1e-10 relative for K ≲ 3, ~1e-6 for the fourth-derivative moments at
    K = 10) gives, stacked as (11, N, N):

    * the Stein moments ⟨σ''_a σ_b⟩, ⟨σ''''_a σ_b⟩, ⟨σ'''_a σ'_b⟩, ⟨σ''_a σ''_b⟩ (rows 0-3),
    * the fourth moments ⟨σ_a^j σ_b^(4-j)⟩, j = 0..4 (rows 4-8),
    * ⟨σ_a σ_b⟩ and ⟨σ'_a σ'_b⟩ (rows 9-10; see :data:`_TABLE_KMAX`).

    Each unordered pair is integrated once (both orientations come from the same grid), σ and its
    derivatives are evaluated once per grid point, the inner axis is summed as a loop, and for odd σ
    only half of the (point-symmetric) grid is evaluated (:func:`eft_prob.gauss.inner_sums`).
    The registry's sin: all 11 in closed form (:func:`eft_prob.gauss.sin_pair_moments`).
    ``shift``: the inner axis by σ's addition theorem (:func:`eft_prob.gauss.shift_rule`; see
    eft_prob.theory.kernels._shift_ok).
    """
    if gauss.closed_sin((act.fn, act.grad)):
        return gauss.sin_pair_moments(K, _SIN_PAIR_PRODUCTS)
    s0, s1, s2, s3, s4 = _derivatives(act)
    parity = (-1, 1, -1, 1, -1, 1, -1, 1) if gauss.is_odd(act) else None  # of the functions below
    unroll = gauss.inner_unroll(K.shape[0])
    rule = gauss.pair_rule(act, K.shape[0], shift)

    def from_values(d):
        q = d[0] ** 2
        return (*d, q, q * d[0], q * q)

    inner = from_values if rule is not None else (lambda z: from_values(tuple(s(z) for s in (s0, s1, s2, s3, s4))))

    def pair(k11, k22, k12):
        x, w = gauss._adapted_sinh(jnp.maximum(k11, k22), n)
        l11, l21, l22 = gauss._cholesky_2x2(k11, k22, k12)
        I0, I1, I2, I3, I4, Q2, Q3, Q4 = gauss.inner_sums(inner, l21 * x, l22, x, w, parity, unroll, rule, 4)
        a = l11 * x
        a0, a1, a2, a3, a4 = s0(a), s1(a), s2(a), s3(a), s4(a)
        vals = (a2 * I0, a4 * I0, a3 * I1, a2 * I2, Q4, a0 * Q3, a0**2 * Q2, a0**3 * I0, a0**4 * jnp.sum(w))
        vals += (a0 * I0, a1 * I1, a0 * I2, a0 * I4, a1 * I3)  # F, dd; then P2, P4, P31 for (b, a)
        return jnp.stack([jnp.sum(w * v) for v in vals])

    out, iu, ju = gauss.over_pairs(pair, K, None if parity is None else 2 * gauss._PAIR_BATCH)
    lower = jnp.concatenate([out[11:14], out[3:4], out[8:3:-1], out[9:11]])  # the (b, a) entries
    return jnp.zeros((11,) + K.shape, K.dtype).at[:, ju, iu].set(lower).at[:, iu, ju].set(out[:11])


#: ⟨σσ⟩, ⟨σ'σ'⟩ come from :func:`_smooth_pair_integrals` (48 nodes) while the largest variance is at
#: most this, and from :func:`eft_prob.gauss.sigma_moments` (80 nodes) above: measured for tanh,
#: GELU, SWISH, softplus and erf, the 48-node values are within ~2e-12 (relative) of a 200-node
#: reference up to K = 4, but 5e-8 (tanh) at K = 10.
_TABLE_KMAX = 4.0


def _scale_invariant_fourth_quadrature(act, K, low_orders):
    """⟨σ_a^j σ_b^(4-j)⟩ (5, N, N) for scale-invariant σ by the kink-aware polar rule (the reference
    for :func:`_scale_invariant_fourth`).  The integrand is homogeneous of degree 4, so only the
    angular part is needed: E[r⁴] = 8 in two dimensions, while a one-node radial rule (node
    r0 = E r = √(π/2), weight 1) gives r0⁴.
    """
    orders = dict(low_orders) if low_orders else None
    n_arc = gauss._orders(orders)["arc"]
    s = act.fn

    def f(a, b):
        sa, sb = s(a), s(b)
        return jnp.stack(jnp.broadcast_arrays(*[sa**j * sb ** (4 - j) for j in range(5)]))

    def block(k11, k22, k12):
        k11, k22, k12 = jnp.broadcast_arrays(k11, k22, k12)
        return gauss._polar_2d(f, k11, k22, k12, n_arc, 1) * (8.0 / (np.pi / 2) ** 2)

    return _rowwise(block, K, 4 * n_arc * 5)


def _cos_sin_antiderivatives(t):
    """∫ cos^(4-k)(t) sin^k(t) dt for k = 0..4 (5, ...)."""
    s2, s4 = jnp.sin(2 * t), jnp.sin(4 * t)
    c4, s4t = jnp.cos(t) ** 4, jnp.sin(t) ** 4
    return jnp.stack([3 * t / 8 + s2 / 4 + s4 / 32, -c4 / 4, t / 8 - s4 / 32, s4t / 4, 3 * t / 8 - s2 / 4 + s4 / 32])


def _scale_invariant_fourth(act, K, low_orders=None):
    """⟨σ_a^j σ_b^(4-j)⟩ (5, N, N) for scale-invariant σ (slopes a₊, a₋) in closed form.

    With z_a = √K_aa r cos t, z_b = √K_bb r cos(t − φ), cos φ = ρ_ab (t uniform, E r⁴ = 8),
    σ_a^j σ_b^(4-j) = r⁴ K_aa^(j/2) K_bb^((4-j)/2) α^j β^(4-j) cos^j t cos^(4-j)(t − φ) on each of the
    four arcs between the kinks t = ±π/2, φ ± π/2 (α, β the slopes there), and expanding cos(t − φ)
    leaves integrals of cos^(4-k) t sin^k t, which are elementary.  Agrees with the polar rule
    (:func:`_scale_invariant_fourth_quadrature`) to ~1e-15 at a small fraction of its cost.
    """
    a_p, a_m = act.slopes
    d = jnp.diagonal(K)
    k11, k22 = d[:, None], d[None, :]
    l11, l21, l22 = gauss._cholesky_2x2(*jnp.broadcast_arrays(k11, k22, K))
    phi = jnp.arctan2(l22, l21)  # ∈ [0, π]
    cph, sph = jnp.cos(phi), jnp.sin(phi)
    r22 = gauss._safe_sqrt(k22 + 0 * K)
    half = jnp.pi / 2
    bounds = [jnp.full_like(phi, -half), phi - half, jnp.full_like(phi, half), phi + half, jnp.full_like(phi, 3 * half)]
    J = [_cos_sin_antiderivatives(b) for b in bounds]
    dJ = [J[i + 1] - J[i] for i in range(4)]  # (5, N, N) per arc
    slopes = [(a_p, a_m), (a_p, a_p), (a_m, a_p), (a_m, a_m)]  # signs of (cos t, cos(t − φ)) per arc
    out = []
    for j in range(5):
        m = 4 - j
        coef = [math.comb(m, k) * cph ** (m - k) * sph**k for k in range(m + 1)]
        ang = sum(al**j * be**m * sum(c * dj[k] for k, c in enumerate(coef)) for (al, be), dj in zip(slopes, dJ))
        out.append(8.0 / (2 * jnp.pi) * l11**j * r22**m * ang)
    return jnp.stack(out)


def _pair_stats(act, K, F, dd, low_orders, quadrature, smooth_integrals=None):
    """D (3, N, N), H (3, 3, N, N): derivatives of ⟨σ_aσ_b⟩ in (K_aa, K_bb, K_ab) for all pairs.

    F, dd = ⟨σ_aσ_b⟩, ⟨σ'_aσ'_b⟩ as used by the kernel recursion.
    """
    orders = dict(low_orders) if low_orders else None
    o = gauss._orders(orders)
    d = jnp.diagonal(K)
    closed = act.pair is not None and not quadrature
    nodes2 = 4 * o["arc"] * o["radial"] if act.kinked else o["smooth2"] ** 2

    if closed or act.kinked:
        if closed:
            ss = lambda k11, k22, k12: act.pair(k11, k22, k12)[0]
        else:
            ss = lambda k11, k22, k12: gauss.expect_2d(
                lambda a, b: act.fn(a) * act.fn(b), k11, k22, k12, kinked=True, orders=orders
            )
        if closed and not act.kinked and act.slopes is None:  # smooth closed forms (erf, sin)
            G, H = _grad_hess(ss, (d[:, None] + 0 * K, d[None, :] + 0 * K, K))
            D = G
        else:
            if act.slopes is not None and closed:
                zsd = F  # ⟨z_a σ'_a σ_b⟩ = ⟨σ_a σ_b⟩ for scale-invariant σ
            else:
                fn, gr = act.fn, act.grad
                zsd = _rowwise(
                    lambda k11, k22, k12: gauss.expect_2d(
                        lambda a, b: a * gr(a) * fn(b), k11, k22, k12, kinked=True, orders=orders
                    )[None],
                    K,
                    nodes2,
                )[0]
            base = zsd - K * dd
            pos = d > 0
            inv2 = jnp.where(pos, 0.5 / jnp.where(pos, d, 1.0), 0.0)
            D = jnp.stack([base * inv2[:, None], base.T * inv2[None, :], dd])
            if closed:
                _, H = _grad_hess(ss, (d[:, None] + 0 * K, d[None, :] + 0 * K, K))
            else:  # differentiate the kink-aware polar rule (its arcs move with the kinks), in row chunks

                def hess_block(k11, k22, k12):
                    args = tuple(jnp.broadcast_arrays(k11, k22, k12))
                    return _grad_hess(ss, args)[1].reshape((9,) + args[0].shape)

                H = _rowwise(hess_block, K, nodes2 * 16).reshape((3, 3) + K.shape)
    else:  # smooth, Stein forms
        if smooth_integrals is None:
            smooth_integrals = _smooth_pair_integrals(act, K)
        P2, P4, P31, S22 = smooth_integrals[:4]
        S22 = (S22 + S22.T) / 2
        D = jnp.stack([P2 / 2, P2.T / 2, dd])
        H = jnp.stack(
            [
                jnp.stack([P4 / 4, S22 / 4, P31 / 2]),
                jnp.stack([S22 / 4, P4.T / 4, P31.T / 2]),
                jnp.stack([P31 / 2, P31.T / 2, S22]),
            ]
        )

    # a = b: ⟨σ_a σ_a⟩ depends on K_aa only; put f'(K_aa), f''(K_aa) on the (K_aa) coordinate.
    if closed:
        f1 = lambda k: act.pair(k, k, k)[0]
    else:
        f1 = lambda k: gauss.expect_1d(lambda z: act.fn(z) ** 2, k, kinked=act.kinked)
    df = lambda k: _partials(f1, (k,), 0)
    d1, d2 = df(d), _partials(df, (d,), 0)
    eye = jnp.eye(K.shape[0], dtype=bool)
    D = jnp.where(eye, 0.0, D).at[0].add(jnp.diag(d1))
    H = jnp.where(eye, 0.0, H).at[0, 0].add(jnp.diag(d2))
    return D, H


def _pair_fourth_moments(act, K, low_orders, smooth_integrals=None):
    """M (5, N, N): M[j, a, b] = ⟨σ_a^j σ_b^(4-j)⟩ for all ordered pairs."""
    if act.slopes is not None:
        M = _scale_invariant_fourth(act, K, low_orders)
        return (M + M[::-1].transpose(0, 2, 1)) / 2
    if not act.kinked:
        M = (smooth_integrals if smooth_integrals is not None else _smooth_pair_integrals(act, K))[4:9]
        return (M + M[::-1].transpose(0, 2, 1)) / 2
    orders = dict(low_orders) if low_orders else None
    o = gauss._orders(orders)
    nodes2 = 4 * o["arc"] * o["radial"] if act.kinked else o["smooth2"] ** 2
    s = act.fn

    def moments(k11, k22, k12):
        def f(a, b):
            sa, sb = s(a), s(b)
            return jnp.stack(jnp.broadcast_arrays(*[sa**j * sb ** (4 - j) for j in range(5)]))

        return gauss.expect_2d(f, k11, k22, k12, kinked=act.kinked, orders=orders)

    M = _rowwise(moments, K, nodes2)
    return (M + M[::-1].transpose(0, 2, 1)) / 2  # exact symmetry M[j,a,b] = M[4-j,b,a]


# --------------------------------------------------------------------------------------------
# The fully symmetric tensor E4[a,b,c,d] = ⟨σ_aσ_bσ_cσ_d⟩, stored packed by multiset rank.


def _rank4(a, b, c, d):
    """Rank of the sorted multiset a <= b <= c <= d (combinatorial number system)."""
    return a + b * (b + 1) // 2 + c * (c + 1) * (c + 2) // 6 + d * (d + 1) * (d + 2) * (d + 3) // 24


@functools.cache
def _tuple_groups(N: int):
    """Index tuples by number of distinct inputs, and the packed ranks of their multisets (numpy)."""
    i1 = np.arange(N)
    i2 = np.array(list(itertools.combinations(range(N), 2)), dtype=np.int32).reshape(-1, 2)
    i3 = np.array(list(itertools.combinations(range(N), 3)), dtype=np.int32).reshape(-1, 3)
    i4 = np.array(list(itertools.combinations(range(N), 4)), dtype=np.int32).reshape(-1, 4)
    r1 = _rank4(i1, i1, i1, i1)
    a, b = i2.T.astype(np.int64)
    r2 = np.stack([_rank4(a, a, a, b), _rank4(a, a, b, b), _rank4(a, b, b, b)])
    a, b, c = i3.T.astype(np.int64)
    r3 = np.stack([_rank4(a, a, b, c), _rank4(a, b, b, c), _rank4(a, b, c, c)])
    a, b, c, d = i4.T.astype(np.int64)
    r4 = _rank4(a, b, c, d)
    return (i2, i3, i4), (r1, r2, r3, r4)


#: checkpoint every quadrature chunk (off: the former path, for benchmarks/bench_vertex.py --remat)
_REMAT = True


def _remat(fn):
    """``fn`` as a ``jax.checkpoint`` (while :data:`_REMAT`): reverse mode recomputes its quadrature
    grid instead of storing it for a whole map of chunks (used by :func:`_chunked` and
    ``ntk_stats._chunked_tables``)."""
    return jax.checkpoint(fn) if _REMAT else fn


def _chunked(fn, idx, per_item):
    """fn(idx_chunk (c, m)) -> (M, c) over all rows of idx (T, m), in chunks; returns (M, T).

    Each chunk is a ``jax.checkpoint``: reverse-mode differentiation recomputes a chunk's quadrature
    grid instead of storing it for the whole map (value_and_grad of the dense statistics at N = 8,
    depth 3: 2.3–3.2× faster for tanh, ReLU, GELU; the same values and gradients; no effect without
    differentiation).
    """
    fn = _remat(fn)
    T = idx.shape[0]
    chunk = max(1, min(T, _MAX_ELEMS // max(1, per_item)))
    n_chunks = -(-T // chunk)
    pad = n_chunks * chunk - T
    if pad:
        idx = jnp.concatenate([idx, jnp.broadcast_to(idx[:1], (pad, idx.shape[1]))])
    if n_chunks == 1:
        out = fn(idx)
        return out[:, :T]
    out = jax.lax.map(fn, idx.reshape(n_chunks, chunk, idx.shape[1]))  # (n_chunks, M, chunk)
    return jnp.moveaxis(out, 0, 1).reshape(out.shape[1], -1)[:, :T]


def _sub_kernels(K, idx):
    return K[idx[:, :, None], idx[:, None, :]]


def _four_point_packed(act, K, groups, low_orders, nd_orders):
    """Packed ⟨σ_aσ_bσ_cσ_d⟩ over all C(N+3, 4) multisets."""
    N = K.shape[0]
    (i2, i3, i4), (r1, r2, r3, r4) = groups
    orders = dict(low_orders) if low_orders else None
    o = gauss._orders(orders)
    nd = dict(nd_orders)
    s = act.fn
    packed = jnp.zeros(math.comb(N + 3, 4), K.dtype)
    if gauss.closed_sin((act.fn, act.grad)):  # the registry's sin: every moment in closed form
        one, two, three = (0,), (0, 0), (0, 0, 0)
        packed = packed.at[r1].set(gauss.sin_tables(jnp.diagonal(K)[:, None, None], ((0, 0, 0, 0),))[:, 0])
        if N >= 2:  # basis (σ, σ², σ³) per input: σ³_a σ_b, σ²_a σ²_b, σ_a σ³_b
            packed = packed.at[r2].set(gauss.sin_tables(_sub_kernels(K, i2), (one, two, three))[:, [6, 4, 2]].T)
        if N >= 3:  # basis (σ, σ²): σ²_a σ_b σ_c, σ_a σ²_b σ_c, σ_a σ_b σ²_c
            packed = packed.at[r3].set(gauss.sin_tables(_sub_kernels(K, i3), (one, two))[:, [4, 2, 1]].T)
        if N >= 4:
            packed = packed.at[r4].set(gauss.sin_tables(_sub_kernels(K, i4), (one,))[:, 0])
        return packed
    even = gauss.is_odd(act)  # every integrand below is a product of four σ's: even for odd σ
    d = jnp.diagonal(K)
    packed = packed.at[r1].set(gauss.expect_1d(lambda z: s(z) ** 4, d, kinked=act.kinked))
    if N >= 2:
        nodes2 = 4 * o["arc"] * o["radial"] if act.kinked else o["smooth2"] ** 2

        def f2(a, b):
            sa, sb = s(a), s(b)
            return jnp.stack(jnp.broadcast_arrays(sa**3 * sb, sa**2 * sb**2, sa * sb**3))

        m2 = _chunked(lambda ix: gauss.expect_nd(f2, _sub_kernels(K, ix), kinked=act.kinked, orders=orders), i2, nodes2)
        packed = packed.at[r2].set(m2)
    for m, idx, ranks in ((3, i3, r3), (4, i4, r4)):
        if N < m:
            break
        n = 2 * nd[f"kink{m}"] if act.kinked else nd[f"smooth{m}"]
        if m == 3:

            def f(a, b, c):
                sa, sb, sc = s(a), s(b), s(c)
                p = sa * sb * sc
                return jnp.stack(jnp.broadcast_arrays(p * sa, p * sb, p * sc))

        else:

            def f(a, b, c, e):
                return (s(a) * s(b) * s(c) * s(e))[None]

        vals = _chunked(
            lambda ix, f=f, n=n: gauss.expect_nd(f, _sub_kernels(K, ix), kinked=act.kinked, n=n, even=even), idx, n**m
        )
        packed = packed.at[ranks].set(vals if m == 3 else vals[0])
    return packed


def _expand_sym4(packed, N):
    """Full (N, N, N, N) tensor from the packed multiset values."""
    i = jnp.arange(N)
    a, b, c, d = i[:, None, None, None], i[None, :, None, None], i[None, None, :, None], i[None, None, None, :]
    mn, mx = jnp.minimum, jnp.maximum
    a, b = mn(a, b), mx(a, b)
    c, d = mn(c, d), mx(c, d)
    a, c = mn(a, c), mx(a, c)
    b, d = mn(b, d), mx(b, d)
    b, c = mn(b, c), mx(b, c)
    return packed[_rank4(a, b, c, d)]


# --------------------------------------------------------------------------------------------
# The recursion.


def _T_pair(D, X):
    """(T X)[a, b] = Σ_β ∂⟨σ_aσ_b⟩/∂K_β X_β = D1 X_aa + D2 X_bb + D3 X_ab (X symmetric)."""
    x = jnp.diagonal(X)
    return D[0] * x[:, None] + D[1] * x[None, :] + D[2] * X


def _T_first(D, V):
    Vd = V[jnp.arange(V.shape[0]), jnp.arange(V.shape[0])]  # V[a, a, c, d] -> (a, c, d)
    e = lambda A: A[:, :, None, None]
    return e(D[0]) * Vd[:, None] + e(D[1]) * Vd[None, :] + e(D[2]) * V


def _T_second(D, W):
    i = jnp.arange(W.shape[0])
    Wd = W[:, :, i, i]  # W[a1, a2, c, c] -> (a1, a2, c)
    return D[0] * Wd[:, :, :, None] + D[1] * Wd[:, :, None, :] + D[2] * W


def _pair_blocks(V):
    """Vb (3, 3, N, N): Vb[u, v, a, b] = V[π_u(a, b), π_v(a, b)], π = ((a,a), (b,b), (a,b))."""
    N = V.shape[0]
    A = jnp.broadcast_to(jnp.arange(N)[:, None], (N, N))
    B = A.T
    I, J = (A, B, A), (A, B, B)
    return jnp.stack([jnp.stack([V[I[u], J[u], I[v], J[v]] for v in range(3)]) for u in range(3)])


_NA = (2, 0, 1)  # number of a's in π_u(a, b)


def _stack(
    spec: MLPSpec,
    X,
    groups,
    ratios,
    *,
    full: bool,
    stack: bool,
    quadrature: bool,
    low_orders,
    nd_orders,
    trace: bool = False,
    shift: bool = False,
):
    """Run the joint (K, K^{1}, V) recursion.  With ``trace``, also return the per-step inputs
    (K^(ℓ), ⟨σσ⟩_{K^(ℓ)}, D^(ℓ)) for ℓ = 1..L-1 that the factored vertex is built from.  The hidden
    widths enter only through ``ratios`` (:func:`_width_ratios`), so ``spec`` may be :func:`_canonical`.
    ``shift``: the smooth pair integrals by σ's addition theorem (kernels._shift_ok)."""
    act = spec.activation
    K1, _ = _first_layer(spec, X)
    N = K1.shape[0]
    G1 = jnp.zeros_like(K1)
    if full:
        V1 = jnp.zeros((N, N, N, N), K1.dtype)
    else:
        V1 = jnp.zeros((3, 3, N, N), K1.dtype)
    if spec.depth == 1:
        out = (K1[None], G1[None], V1[None]) if stack else (K1, G1, V1)
        if trace:
            empty = jnp.zeros((0, N, N), K1.dtype)
            return out, (empty, empty, jnp.zeros((0, 3, N, N), K1.dtype))
        return out
    hyper = (spec.layer_values("C_b")[1:], spec.layer_values("C_W")[1:], jnp.asarray(ratios, K1.dtype))
    orders = dict(low_orders) if low_orders else None

    def step(carry, h):
        K, G, V = carry
        C_b, C_W, r = h
        closed = act.pair is not None and not quadrature
        smooth = None
        if not act.kinked and (act.slopes is None) and not (closed and full):
            smooth = _smooth_pair_integrals(act, K, shift=shift)  # Stein and fourth moments, F, dd at once
        if smooth is not None and not closed and "smooth2" not in (orders or {}):
            F, dd = jax.lax.cond(
                jnp.max(jnp.diagonal(K)) <= _TABLE_KMAX,
                lambda: (smooth[9], smooth[10]),
                lambda: gauss.sigma_moments(act, K, quadrature=quadrature, orders=orders, shift=shift),
            )
        else:
            F, dd = gauss.sigma_moments(act, K, quadrature=quadrature, orders=orders, shift=shift)
        D, H = _pair_stats(act, K, F, dd, low_orders, quadrature, smooth)
        Fd = jnp.diagonal(F)
        if full:
            E4 = _expand_sym4(_four_point_packed(act, K, groups, low_orders, nd_orders), N)
            src = E4 - F[:, :, None, None] * F[None, None, :, :]
            Vb = _pair_blocks(V)
            V_new = C_W**2 * (src + r * _T_second(D, _T_first(D, V)))
        else:
            M = _pair_fourth_moments(act, K, low_orders, smooth)
            Fp = jnp.stack(jnp.broadcast_arrays(Fd[:, None], Fd[None, :], F))
            src = jnp.stack([jnp.stack([M[_NA[u] + _NA[v]] - Fp[u] * Fp[v] for v in range(3)]) for u in range(3)])
            Ds = jnp.diagonal(D.sum(0))
            z = jnp.zeros_like(K)
            A = jnp.stack(
                [
                    jnp.stack([z + Ds[:, None], z, z]),
                    jnp.stack([z, z + Ds[None, :], z]),
                    D,
                ]
            )
            Vb = V
            V_new = C_W**2 * (src + r * jnp.einsum("uiab,ijab,vjab->uvab", A, V, A))
        G_new = r * C_W * (_T_pair(D, G) + 0.5 * jnp.einsum("uvab,uvab->ab", H, Vb))
        K_new = C_b + C_W * F
        nxt = (K_new, G_new, V_new)
        out = nxt if stack else None
        return nxt, ((out, (K, F, D)) if trace else out)

    last, ys = jax.lax.scan(step, (K1, G1, V1), hyper)
    if trace:
        ys, tr = ys
    if stack:
        last = tuple(jnp.concatenate([a[None], b]) for a, b in zip((K1, G1, V1), ys))
    return (last, tr) if trace else last


_stack_jit = jax.jit(
    _stack, static_argnames=("full", "stack", "quadrature", "low_orders", "nd_orders", "trace", "shift")
)


def _symmetrize_vertex(V):
    """Make V_{(12)(34)} = V_{(21)(34)} = V_{(12)(43)} = V_{(34)(12)} exact (the recursion keeps them
    up to rounding: fused multiply-adds are not symmetric in their operands)."""
    V = (V + jnp.swapaxes(V, -4, -3)) / 2
    V = (V + jnp.swapaxes(V, -2, -1)) / 2
    return (V + jnp.swapaxes(jnp.swapaxes(V, -4, -2), -3, -1)) / 2


def _compute(spec, X, full, all_layers, quadrature, orders, trace=False, ratios=None, shift=None):
    X = check_inputs(spec, X)
    low, nd = _split_orders(orders)
    N = X.shape[0]
    if full:
        (i2, i3, i4), ranks = _tuple_groups(N)
        groups = ((jnp.asarray(i2), jnp.asarray(i3), jnp.asarray(i4)), tuple(jnp.asarray(r) for r in ranks))
    else:
        groups = None
    if shift is None:
        shift = _shift_ok(spec, X)
    kw = dict(full=full, stack=all_layers, quadrature=quadrature, low_orders=low, nd_orders=nd, trace=trace)
    kw["shift"] = bool(shift)
    if ratios is None:
        ratios = _width_ratios(spec)
    if is_concrete(spec, X, ratios):  # one compilation for every width
        return _stack_jit(_canonical(spec), X, groups, ratios, **kw)
    return _stack(spec, X, groups, ratios, **kw)


@float64_theory
def four_point_vertex(
    spec: MLPSpec, X, *, all_layers: bool = False, quadrature: bool = False, orders: dict | None = None
) -> jax.Array:
    """The four-point vertex V^(L) of the output layer, or of all layers.

    For neurons i ≠ k of layer ℓ,
    ``E[z_{i;α1} z_{i;α2} z_{k;α3} z_{k;α4}] - E[z_{i;α1} z_{i;α2}] E[z_{k;α3} z_{k;α4}]
    = V^(ℓ)[α1, α2, α3, α4] / n_{ℓ-1} + O(1/n²)`` (THEORY.md §3.3, book eq. 4.43 and §4.3); V^(1) = 0.

    Parameters
    ----------
    spec : MLPSpec
        Any activation; unequal hidden widths enter through r_ℓ = n_ℓ/n_{ℓ-1}.
    X : (N, input_dim) array
    all_layers : bool
        Return the vertices of all L layers, each normalized by its own n_{ℓ-1}.
    quadrature : bool
        Force quadrature for the two-point functions even where closed forms exist (checks).
    orders : dict, optional
        Quadrature orders: keys of ``eft_prob.gauss.DEFAULT_ORDERS`` (one and two inputs) and
        ``eft_prob.gauss.ND_ORDERS`` (three and four distinct inputs).

    Returns
    -------
    (N, N, N, N) array, or (L, N, N, N, N) with ``all_layers``; float64, index order
    V[a1, a2, a3, a4] = V_{(α1α2)(α3α4)}: symmetric under a1↔a2, a3↔a4 and (a1a2)↔(a3a4), not a2↔a3.

    Notes
    -----
    Cost per layer: C(N+3, 4) Gaussian integrals over up to four inputs and N⁴ memory — use it for
    tens of inputs, not hundreds.  Measured on 2 CPU cores, depth 10: N = 10 in ~2 s (tanh) / ~4 s
    (ReLU), N = 20 in ~17 s (tanh); N = 100 needs ~4·10⁶ four-dimensional integrals per layer
    (hours) and 0.8 GB per layer.  ``orders={"smooth4": 16}`` (or ``"kink4": 6``) trades accuracy
    (~1e-5) for speed.  For K^{1} alone use :func:`nlo_kernel`, which is O(N²).
    Jit-able and differentiable in C_b, C_W and X.
    """
    _, _, V = _compute(spec, X, True, all_layers, quadrature, orders)
    return _symmetrize_vertex(V)


@float64_theory
def nlo_kernel(
    spec: MLPSpec, X, *, all_layers: bool = False, quadrature: bool = False, orders: dict | None = None
) -> jax.Array:
    """The next-to-leading-order metric K^{1}(L) (THEORY.md's G^{1}), or all layers.

    ``E[z_{i;α1} z_{j;α2}] = δ_ij [K_{α1α2} + K^{1}_{α1α2}/n_{L-1}] + O(1/n²)`` with K = ``nngp(spec, X)``
    and n_{L-1} the last hidden width (``spec.hidden[-1]``).  K^{1}(1) = 0; for a scale-invariant σ
    and a single input K^{1} = 0 exactly.

    Computed jointly with K and the 2-input blocks of the vertex (O(N²) two-dimensional Gaussian
    integrals per layer).  Arguments as :func:`four_point_vertex`; returns (N, N) or (L, N, N).
    """
    _, G, _ = _compute(spec, X, False, all_layers, quadrature, orders)
    return (G + jnp.swapaxes(G, -1, -2)) / 2


# --------------------------------------------------------------------------------------------
# The factored vertex: V as the covariance of the random kernel, never stored as N⁴ numbers.
#
# Unrolling the recursion, V^(L) = Σ_ℓ c_ℓ T_{L←ℓ} Σ_ℓ T_{L←ℓ}ᵀ with Σ_ℓ = Cov_{z~N(0,K^(ℓ))}[σ(z)σ(z)ᵀ]
# (the "source" of step ℓ → ℓ+1), c_ℓ = C_W^(ℓ+1)² Π_{m>ℓ} C_W^(m+1)² r_m, and T_{L←ℓ} the composed
# linear maps X ↦ D0∘(x1ᵀ) + D1∘(1xᵀ) + D2∘X (x = diag X) of the later steps.  Such compositions
# keep the form X ↦ P∘X + A∘(x1ᵀ) + B∘(1xᵀ), so each step is three N×N matrices.  Each source is
# estimated by S Gaussian samples φ_s = σ(z_s), z_s ~ N(0, K^(ℓ)), centred with the exact mean
# M_ℓ = ⟨σσᵀ⟩: Σ_ℓ ≈ (1/S) Σ_s (φ_sφ_sᵀ - M_ℓ)^{⊗2}, unbiased and positive semi-definite.  Memory
# is O(L·(S·N + N²)); any contraction of V with matrices costs O(L·S·N²).


def _compose(P, A, B, D):
    """(P, A, B) of X ↦ G(T(X)) for G = (P, A, B) and T(X) = D0∘(x1ᵀ) + D1∘(1xᵀ) + D2∘X."""
    c = jnp.diagonal(D[0] + D[1] + D[2])  # diag T(X) = c∘x
    return P * D[2], P * D[0] + A * c[:, None], P * D[1] + B * c[None, :]


def _kernel_sqrt(K):
    """R with R Rᵀ = K for a PSD K (eigenvalues clipped at 0: singular kernels are fine)."""
    lam, U = jnp.linalg.eigh((K + K.T) / 2)
    return U * jnp.sqrt(jnp.clip(lam, 0.0))[None, :]


class FactoredVertex(NamedTuple):
    """V^(L) kept as the covariance of the random kernel: V[a,b,c,d] = Σ_ℓ w_ℓ Σ_s Y_ℓs[a,b] Y_ℓs[c,d],
    Y_ℓs = P_ℓ∘(φ_ℓsφ_ℓsᵀ - M_ℓ) + A_ℓ∘(u_ℓs 1ᵀ) + B_ℓ∘(1 u_ℓsᵀ), u_ℓs = φ_ℓs² - diag M_ℓ.

    A JAX pytree.  The sources ℓ = 1..L-2, propagated by the later steps, share S draws (``phi``); the
    last source (step L-1 → L: P = 1, A = B = 0, so its columns are rank one plus a constant and
    several times cheaper to contract) has its own S_last draws (``last``; by default 8·S, because
    it carries most of the Monte Carlo error of the posterior contractions: at 50 + 200 inputs that
    halves the variance per second of the §5.2 terms, see benchmarks/bench_bayes.py).  ``rank`` = (L-2)·S + S_last;
    nothing of size N⁴ is formed unless :meth:`dense` is called.  The Monte Carlo error is unbiased,
    with relative size ≈ √(2/S) per entry of each source (:meth:`dense` returns it).
    """

    phi: jax.Array  # (L-2, S, N) draws σ(z_s) of the propagated sources
    last: jax.Array  # (S_last, N) draws of the last source ((0, N) for a depth-1 network)
    M: jax.Array  # (L-1, N, N) exact ⟨σσᵀ⟩ of each step
    P: jax.Array  # (L-1, N, N)
    A: jax.Array  # (L-1, N, N)
    B: jax.Array  # (L-1, N, N)
    weight: jax.Array  # (L-1,) c_ℓ / S_ℓ

    @property
    def n_inputs(self) -> int:
        return self.M.shape[-1]

    @property
    def n_sources(self) -> int:
        return self.M.shape[0]

    @property
    def rank(self) -> int:
        return self.phi.shape[0] * self.phi.shape[1] + (self.last.shape[0] if self.n_sources else 0)

    def samples(self, layer: int) -> jax.Array:
        """The draws σ(z_s) (S_ℓ, N) of source ``layer`` (0-based)."""
        return self.last if layer == self.n_sources - 1 else self.phi[layer]

    def columns(self, layer: int, s: slice = slice(None)) -> jax.Array:
        """Y_ℓs for the samples ``s`` of source ``layer`` (0-based), shape (S', N, N), unweighted."""
        phi = self.samples(layer)[s]
        M = self.M[layer]
        u = phi**2 - jnp.diagonal(M)[None]
        outer = phi[:, :, None] * phi[:, None, :] - M[None]
        return self.P[layer] * outer + self.A[layer] * u[:, :, None] + self.B[layer] * u[:, None, :]

    def _project_layer(self, layer: int, mats) -> jax.Array:
        """⟨Y_ℓs, X_k⟩_F for one source: (k, S_ℓ)."""
        phi, M = self.samples(layer), self.M[layer]
        PX = self.P[layer][None] * mats  # (k, N, N)
        quad = jnp.einsum("sa,kab,sb->ks", phi, PX, phi)
        const = jnp.einsum("kab,ab->k", PX, M)
        rows = jnp.sum(self.A[layer][None] * mats, axis=-1) + jnp.sum(self.B[layer][None] * mats, axis=-2)
        u = phi**2 - jnp.diagonal(M)[None]
        return quad - const[:, None] + jnp.einsum("sa,ka->ks", u, rows)

    def project(self, mats) -> list[jax.Array]:
        """⟨Y_ℓs, X_k⟩_F for matrices X (k, N, N): one (k, S_ℓ) array per source ℓ."""
        mats = jnp.asarray(mats)
        return [self._project_layer(layer, mats) for layer in range(self.n_sources)]

    def contract(self, X1, X2=None) -> jax.Array:
        """Σ_{abcd} V[a,b,c,d] X1[i,a,b] X2[j,c,d] for stacks X1 (k1, N, N), X2 (k2, N, N) -> (k1, k2)."""
        p1 = self.project(X1)
        p2 = p1 if X2 is None else self.project(X2)
        out = jnp.zeros((len(X1), len(X1 if X2 is None else X2)), self.M.dtype)
        for layer, (a, b) in enumerate(zip(p1, p2)):
            out = out + self.weight[layer] * (a @ b.T)
        return out

    def matvec(self, X, *, parts: bool = False):
        """(V·X)[a, b] = Σ_cd V[a,b,c,d] X[c,d] for one symmetric X on the leading n×n block of the
        inputs ((n, n), n <= N; zero elsewhere): the (N, N) matrix, or with ``parts`` only its first n
        columns (N, n) and its diagonal (N,).  The projections ⟨Y_s, X⟩ need only the block's entries
        of the draws (O(S·n²) per source); the weighted sum of the columns costs O(S·N²), or O(S·N·n)
        with ``parts``."""
        X = jnp.asarray(X)
        n, N = X.shape[0], self.n_inputs
        cols, diag, full = jnp.zeros((N, n), X.dtype), jnp.zeros((N,), X.dtype), jnp.zeros((N, N), X.dtype)
        for layer in range(self.n_sources):
            phi, M, P, A, B = self.samples(layer), self.M[layer], self.P[layer], self.A[layer], self.B[layer]
            u = phi**2 - jnp.diagonal(M)[None]
            PX, phB = P[:n, :n] * X, phi[:, :n]
            rows = jnp.sum(A[:n, :n] * X, axis=1) + jnp.sum(B[:n, :n] * X, axis=0)
            coef = jnp.sum((phB @ PX) * phB, axis=1) - jnp.sum(PX * M[:n, :n]) + u[:, :n] @ rows
            coef = coef * self.weight[layer]  # (S_ℓ,) weighted ⟨Y_s, X⟩
            csum, cu = jnp.sum(coef), coef @ u  # Σ_s coef_s, Σ_s coef_s u_s
            if parts:
                outer = (phi * coef[:, None]).T @ phB - csum * M[:, :n]
                cols = cols + P[:, :n] * outer + A[:, :n] * cu[:, None] + B[:, :n] * cu[None, :n]
                dg = coef @ phi**2 - csum * jnp.diagonal(M)
                diag = diag + jnp.diagonal(P) * dg + (jnp.diagonal(A) + jnp.diagonal(B)) * cu
            else:
                outer = (phi * coef[:, None]).T @ phi - csum * M
                full = full + P * outer + A * cu[:, None] + B * cu[None, :]
        return (cols, diag) if parts else full

    def pair_matrix(self, *, chunk: int = 512) -> jax.Array:
        """V on symmetric-matrix coordinates: (P, P), P = N(N+1)/2, entry (p, q) = w_p w_q V[a_p,b_p,a_q,b_q]
        for pairs a <= b in ``np.triu_indices`` order, w = 1 on the diagonal and √2 off it (so that the
        Frobenius product of symmetric matrices is the Euclidean one).  Positive semi-definite."""
        N = self.n_inputs
        i, j = np.triu_indices(N)
        wgt = jnp.where(jnp.asarray(i == j), 1.0, np.sqrt(2.0)).astype(self.M.dtype)
        out = jnp.zeros((i.size, i.size), self.M.dtype)
        for layer in range(self.n_sources):
            for start in range(0, self.samples(layer).shape[0], chunk):
                y = self.columns(layer, slice(start, start + chunk))[:, i, j] * wgt
                out = out + self.weight[layer] * (y.T @ y)
        return (out + out.T) / 2

    def dense(self, *, with_error: bool = False, chunk: int = 512):
        """The (N, N, N, N) tensor (and, with ``with_error``, its Monte Carlo standard error)."""
        N = self.n_inputs
        V = jnp.zeros((N,) * 4, self.M.dtype)
        V2 = jnp.zeros_like(V) if with_error else None
        for layer in range(self.n_sources):
            S = self.samples(layer).shape[0]
            acc = jnp.zeros_like(V)
            acc2 = jnp.zeros_like(V) if with_error else None
            for start in range(0, S, chunk):
                Y = self.columns(layer, slice(start, start + chunk))
                acc = acc + jnp.einsum("sab,scd->abcd", Y, Y)
                if with_error:  # Σ_s (Y_s ⊗ Y_s)² = Σ_s Y_s² ⊗ Y_s²: a matrix product, no (S, N⁴) array
                    acc2 = acc2 + jnp.einsum("sab,scd->abcd", Y**2, Y**2)
            w = self.weight[layer]
            V = V + w * acc
            if with_error:  # Var of w·Σ_s y_s with i.i.d. y_s: w² (Σ y² - (Σ y)²/S)
                V2 = V2 + w**2 * (acc2 - acc**2 / S)
        V = _symmetrize_vertex(V)
        return (V, jnp.sqrt(jnp.clip(V2, 0.0))) if with_error else V


#: numbers σ(z) the last source's draws may take by default (S_last·N <= this; 512 MiB in float64)
_LAST_BUDGET = 2**26
#: the last source's default draws: this many times ``samples`` (see FactoredVertex)
_LAST_FACTOR = 8


def default_last_samples(samples: int, n_inputs: int) -> int:
    """S_last for ``samples`` draws per propagated source and N inputs: 8·samples, capped so that
    S_last·N <= 2²⁶ (and never below ``samples``)."""
    return int(max(samples, min(_LAST_FACTOR * samples, _LAST_BUDGET // max(1, n_inputs))))


def _factored(spec, ratios, K_tr, F_tr, D_tr, samples: int, last_samples: int, key) -> FactoredVertex:
    """Build the factored V^(L) from the traced per-step (K^(ℓ), ⟨σσ⟩, D^(ℓ)), ℓ = 1..L-1 (widths
    through ``ratios``, as in :func:`_stack`)."""
    steps, N = K_tr.shape[0], K_tr.shape[-1]
    dtype = K_tr.dtype
    if steps == 0:
        z = jnp.zeros((0, N, N), dtype)
        return FactoredVertex(
            jnp.zeros((0, samples, N), dtype), jnp.zeros((0, N), dtype), z, z, z, z, jnp.zeros((0,), dtype)
        )
    ratios = jnp.asarray(ratios, dtype)
    C_W = spec.layer_values("C_W", dtype)[1:]
    P, A, B = jnp.ones((N, N), dtype), jnp.zeros((N, N), dtype), jnp.zeros((N, N), dtype)
    cum = jnp.ones((), dtype)
    Ps, As, Bs, ws = [None] * steps, [None] * steps, [None] * steps, [None] * steps
    for i in reversed(range(steps)):  # step i+1 -> i+2 (0-based i), propagated by the later steps
        Ps[i], As[i], Bs[i] = P, A, B
        ws[i] = C_W[i] ** 2 * cum / (last_samples if i == steps - 1 else samples)
        cum = cum * C_W[i] ** 2 * ratios[i]
        P, A, B = _compose(P, A, B, D_tr[i])
    k_prop, k_last = jax.random.split(key)
    R = jax.vmap(_kernel_sqrt)(K_tr)
    xi = jax.random.normal(k_prop, (steps - 1, samples, N), dtype)
    phi = spec.activation.fn(jnp.einsum("lsk,lak->lsa", xi, R[:-1]))
    last = spec.activation.fn(jax.random.normal(k_last, (last_samples, N), dtype) @ R[-1].T)
    return FactoredVertex(phi, last, F_tr, jnp.stack(Ps), jnp.stack(As), jnp.stack(Bs), jnp.stack(ws))


class PriorStatistics(NamedTuple):
    """Everything the O(1/n) prior needs, from one pass of the recursion (output layer L).

    ``E[z_i z_j] = δ_ij (K + K1/width)``; connected four-point = (V δδ + 2 perms)/width, with
    width = n_{L-1}.  ``V`` is an (N, N, N, N) array or a :class:`FactoredVertex`.
    """

    K: jax.Array
    K1: jax.Array
    V: jax.Array | FactoredVertex
    width: int

    def vertex_dense(self) -> jax.Array:
        return self.V.dense() if isinstance(self.V, FactoredVertex) else self.V


@float64_theory
def prior_statistics(
    spec: MLPSpec,
    X,
    *,
    factored: bool | None = None,
    samples: int = 4096,
    last_samples: int | None = None,
    key=None,
    quadrature: bool = False,
    orders: dict | None = None,
) -> PriorStatistics:
    """K^(L), K^{1}(L) and the vertex V^(L) in one pass.

    Parameters
    ----------
    factored : bool, optional
        Keep V as a :class:`FactoredVertex` (Monte Carlo source with ``samples`` draws per layer,
        O(L·S·N) memory, exact K and K^{1}) instead of the exact dense (N, N, N, N) tensor.  Default:
        dense for N <= 24 inputs, factored above (the dense path costs O(N⁴) four-dimensional
        Gaussian integrals per layer).
    samples, last_samples, key :
        Draws per propagated source (steps 1..L-2) and for the last source (step L-1 → L) of the
        factored vertex (relative error ≈ √(2/S) per entry), and the PRNG key (default
        ``jax.random.PRNGKey(0)``, so results are reproducible).  ``last_samples`` defaults to
        :func:`default_last_samples` (8·samples, capped at 2²⁶/N): the last source costs several times
        less per draw in the posterior contractions and carries most of their Monte Carlo error.
    """
    X = check_inputs(spec, X)
    N = X.shape[0]
    if factored is None:
        factored = N > _DENSE_MAX
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 2:
        raise ValueError(f"samples must be an integer >= 2 (Monte Carlo draws per layer), got {samples!r}.")
    if last_samples is None:
        last_samples = default_last_samples(int(samples), N)
    elif isinstance(last_samples, bool) or not isinstance(last_samples, (int, np.integer)) or last_samples < 2:
        raise ValueError(
            f"last_samples must be an integer >= 2 (Monte Carlo draws of the last source), got {last_samples!r}; "
            "leave it out for the default."
        )
    samples, last_samples = int(samples), int(last_samples)
    canonical, ratios = _canonical(spec), _width_ratios(spec)
    kw = dict(quadrature=bool(quadrature), orders=tuple(sorted(orders.items())) if orders else None)
    kw["shift"] = _shift_ok(spec, X)  # False for traced tanh hyperparameters (NUTS): direct evaluation
    if not factored:
        K, G, V = _statistics_jit(canonical, X, ratios, **kw)
    else:  # the recursion compiled once for every sample count; only the cheap factored build is keyed on it
        K, G, tr = _trace_jit(canonical, X, ratios, **kw)
        key = jax.random.PRNGKey(0) if key is None else key
        V = _factored_jit(canonical, ratios, *tr, samples, last_samples, key)
    return PriorStatistics(K, G, V, spec.widths[-2])


def _statistics(spec, X, ratios, *, quadrature=False, orders=None, shift=False):
    """Dense K, K^{1}, V of :func:`prior_statistics` from validated arguments (``spec`` may be
    canonical; ``orders`` as a tuple of items), in one pass: the dense recursion carries K and K^{1}
    along with V.  Called through :data:`_statistics_jit`: one compiled program per depth,
    activation and input count, for every width, also under eager ``jax.grad``/``vmap``."""
    K, G, V = _compute(spec, X, True, False, quadrature, orders, ratios=ratios, shift=shift)
    return K, (G + G.T) / 2, _symmetrize_vertex(V)


def _trace(spec, X, ratios, *, quadrature=False, orders=None, shift=False):
    """K, K^{1} and the per-step (K^(ℓ), ⟨σσ⟩, D^(ℓ)) the factored V is built from (as :func:`_statistics`)."""
    (K, G, _), tr = _compute(spec, X, False, False, quadrature, orders, trace=True, ratios=ratios, shift=shift)
    return K, (G + G.T) / 2, tr


_statistics_jit = jax.jit(_statistics, static_argnames=("quadrature", "orders", "shift"))
_trace_jit = jax.jit(_trace, static_argnames=("quadrature", "orders", "shift"))
_factored_jit = jax.jit(_factored, static_argnames=("samples", "last_samples"))
