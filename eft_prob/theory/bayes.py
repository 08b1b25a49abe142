"""Bayesian learning with the network prior: GP regression (THEORY.md §5.1) and its 1/n corrections (§5.2).

Observations y = f(X) + ε, ε ~ N(0, σ² 1) independently for every output neuron; A = training
inputs X, B = test inputs X_test, D = A ∪ B.

**Infinite width** (``order=0``): with the NNGP kernel K,

    E[f_B | y]   = K_BA (K̃ + σ²)⁻¹ y,
    Cov[f_B | y] = K_BB − K_BA (K̃ + σ²)⁻¹ K_AB            (the same for every output neuron),
    log p(y)     = Σ_i log N(y_i; 0, K̃ + σ²).

**Order 1/n** (book §6.4; THEORY.md §5.2): with the NLO metric G = K + K^{1}/n, n = n_{L-1}, and
noise entering as G̃ → G_AA + σ² (Gaussian noise adds nothing to the connected four-point
function), G̃^{αα'} = (G̃⁻¹)_{αα'}, ỹ_i = G̃⁻¹ y_i, Y = Σ_i ỹ_i ỹ_iᵀ and the projector
P = G_BA G̃⁻¹, every test slot of V is "projected", V̂_{(β·)(··)} = Σ_d U_{dβ} V_{(d·)(··)} with
U = [−Pᵀ; 1_B] (the residual of interpolating from the training set):

    E[f_{iβ} | y]  = (P y)_{βi}
                   + (1/2n) Σ V̂_{(βα2)(α3α4)} [ỹ_i^{α2} Y^{α3α4} − n_L G̃^{α3α4} ỹ_i^{α2} − 2 G̃^{α2α3} ỹ_i^{α4}],
    Cov[f_{i1β1}, f_{i2β2} | y] = δ_{i1i2} [G_BB − P G_AB]_{β1β2}
                   + (δ_{i1i2}/2n) Σ V̂̂_{(β1β2)(α3α4)} [Y − n_L G̃]^{α3α4}
                   + (1/n) Σ V̂̂_{(β1α3)(β2α4)} [ỹ_{i1}^{α3} ỹ_{i2}^{α4} − δ_{i1i2} G̃^{α3α4}],
    log p(y)       = Σ_i log N(y_i; 0, G̃) + (1/8n) Σ V_{(12)(34)} [Y¹²Y³⁴ − 2n_L G̃¹²Y³⁴ − 4G̃¹³Y²⁴
                   + n_L² G̃¹²G̃³⁴ + 2n_L G̃¹³G̃²⁴],
    E[ΔĜ_{δ1δ2} | y] = (1/2n) Σ V_{(δ1δ2)(α1α2)} [Y − n_L G̃]^{α1α2}     (the "Hebbian" kernel shift).

The posterior covariance couples different output neurons (the ỹ_{i1}ỹ_{i2} term): observing
one output's labels changes the prediction of the others — the finite-width "wiring".

Every V contraction above is of one of two kinds: a *pair* contraction Σ_{cd} V_{(ab)(cd)} X_{cd}
(``FactoredVertex.matvec``) or a *cross* contraction Σ V_{(d1 a)(d2 a')} X_{aa'}.  With the factored
vertex V = Σ_s w_s Y_s ⊗ Y_s (N > 24 inputs) the cross contractions are accumulated over the Monte
Carlo columns Y_s, restricted to the training columns: O(L·S·N·N_A) memory-light work plus one
O(L·S·N_A·N_B²) product for the test covariance — nothing of size N⁴ is formed.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import cho_solve, solve_triangular

from .._config import float64_theory, is_concrete, warn
from .training import GaussianPrediction

__all__ = [
    "NLOMarginals",
    "NLOMoments",
    "gp_log_evidence",
    "gp_moments",
    "gp_posterior",
    "log_evidence",
    "nlo_log_evidence",
    "nlo_moments",
    "nlo_posterior_marginals",
    "nlo_posterior_moments",
    "posterior_kernel_shift",
]


def gp_moments(K_AA, K_AB, K_BB, y, noise_var) -> GaussianPrediction:
    """Posterior mean (N_B, n_L) and covariance (N_B, N_B) of f_B given noisy y on A."""
    nA = K_AA.shape[0]
    C = jnp.linalg.cholesky(K_AA + noise_var * jnp.eye(nA, dtype=K_AA.dtype))
    mean = K_AB.T @ cho_solve((C, True), y)
    cov = K_BB - K_AB.T @ cho_solve((C, True), K_AB)
    return GaussianPrediction(mean, (cov + cov.T) / 2)


def gp_log_evidence(K_AA, y, noise_var) -> jax.Array:
    """log p(y) = Σ_i log N(y_{:,i}; 0, K̃ + σ²), y of shape (N_A, n_L)."""
    nA, nL = y.shape
    C = jnp.linalg.cholesky(K_AA + noise_var * jnp.eye(nA, dtype=K_AA.dtype))
    w = jax.scipy.linalg.solve_triangular(C, y, lower=True)
    logdet = 2 * jnp.sum(jnp.log(jnp.diagonal(C)))
    return -0.5 * jnp.sum(w * w) - 0.5 * nL * (logdet + nA * jnp.log(2 * jnp.pi))


# --------------------------------------------------------------------------------------------
# Order 1/n, network-free: from (G, V, n) arrays.


class NLOMoments(NamedTuple):
    """Posterior moments of f(X_test) at O(1/n).

    ``mean`` (N_B, n_L); ``covariance`` (N_B·n_L, N_B·n_L) over the flattened event, index
    β·n_L + i (the row-major order of an (N_B, n_L) array), including the O(1/n) coupling of
    different output neurons; ``gp_mean``/``gp_covariance`` the first terms of the formulas (GP
    regression with the NLO metric G, covariance (N_B, N_B) shared by the neurons), so that
    ``mean - gp_mean`` and ``covariance - gp_covariance ⊗ 1`` are the explicit V/n terms;
    ``log_evidence`` log p(y) at O(1/n) (a by-product of the same contractions).

    ``mean_se``, ``covariance_se``, ``log_evidence_se``: Monte Carlo standard errors of the V terms
    when V is a :class:`~eft_prob.theory.FactoredVertex` (from 16 disjoint batches of its columns;
    zeros for the exact dense V).  The V terms are contractions against G̃⁻¹ and ỹ = G̃⁻¹y that cancel
    strongly when the training kernel is ill-conditioned, so their relative error can be far above
    the √(2/S) of a single entry of V: read it here, and raise ``samples`` if it matters.
    """

    mean: jax.Array
    covariance: jax.Array
    gp_mean: jax.Array
    gp_covariance: jax.Array
    log_evidence: jax.Array
    mean_se: jax.Array
    covariance_se: jax.Array
    log_evidence_se: jax.Array


class NLOMarginals(NamedTuple):
    """Posterior means and marginal variances of f(X_test) at O(1/n) (:func:`nlo_posterior_marginals`).

    ``mean``, ``variance`` (N_B, n_L); ``gp_mean`` (N_B, n_L), ``gp_variance`` (N_B,): GP regression
    with the NLO metric G; ``log_evidence``; Monte Carlo standard errors of the V terms as in
    :class:`NLOMoments`.  The joint covariance is not formed here; :func:`nlo_posterior_moments` forms it at
    O(S·N_A·N_B²) per layer (85 s for ReLU at 100 + 900 inputs, depth 10, on 2 CPU cores).
    """

    mean: jax.Array
    variance: jax.Array
    gp_mean: jax.Array
    gp_variance: jax.Array
    log_evidence: jax.Array
    mean_se: jax.Array
    variance_se: jax.Array
    log_evidence_se: jax.Array


class _Training(NamedTuple):
    Gt: jax.Array  # (N_A, N_A) G̃⁻¹ (noise included)
    F: jax.Array  # (N_A, N_A) a factor of G̃⁻¹ = F Fᵀ
    yt: jax.Array  # (N_A, n_L) ỹ = G̃⁻¹ y
    X1: jax.Array  # (N_A, N_A) Y − n_L G̃⁻¹


def _training(G_AA, y, noise_var) -> _Training:
    nA, nL = y.shape
    C = jnp.linalg.cholesky(G_AA + noise_var * jnp.eye(nA, dtype=G_AA.dtype))
    Ci = solve_triangular(C, jnp.eye(nA, dtype=G_AA.dtype), lower=True)
    Gt = Ci.T @ Ci
    Gt = (Gt + Gt.T) / 2
    yt = Gt @ y
    return _Training(Gt, Ci.T, yt, yt @ yt.T - nL * Gt)


def _is_factored(V) -> bool:
    from .vertex import FactoredVertex

    return isinstance(V, FactoredVertex)


def _pair(V, X, marginal: bool = False):
    """Σ_{cd} V_{(ab)(cd)} X_{cd} for X living on the training block (N_A, N_A): the (N, N) matrix,
    or with ``marginal`` its training columns (N, N_A) and its diagonal (N,)."""
    nA = X.shape[0]
    if _is_factored(V):
        return V.matvec(X, parts=marginal)
    M1 = jnp.einsum("abcd,cd->ab", V[:, :, :nA, :nA], X)
    return (M1[:, :nA], jnp.diagonal(M1)) if marginal else M1


_CHUNK = 256  # at most this many Monte Carlo columns per step of the factored accumulation
_CHUNK_ELEMS = 800_000  # numbers in one chunk's (rows, c, N_A) block of columns (see _chunk_size)


def _general_chunk(layer_arrays, ph, w, Gt, F, yt, Proj, rows, marginal=False):
    """Increments of (T3, R, W, e_y, e_g) (see :func:`_factored_cross`) from the columns
    Y_s = P∘(φ_sφ_sᵀ − M) + A∘(u_s1ᵀ) + B∘(1u_sᵀ), u_s = φ_s² − diag M, of one chunk φ (c, N), weights w (c,).

    The chunk's columns Y_s[:, A] are laid out as one (rows, c, N_A) array, so that every product
    over an input index is a single plain GEMM on a 2-D view: XLA's CPU batched matmuls (one small
    product per column, or a matrix broadcast against a stack) are 4–7× slower here.  With
    ``marginal`` only the diagonals of R (N_B, n_L) and W (N_B,) are accumulated."""
    M, P, A, B = (x[:rows] for x in layer_arrays)
    nA, nL = yt.shape
    nB = Proj.shape[0]
    c = ph.shape[0]
    u = ph**2 - jnp.diagonal(layer_arrays[0])[None]  # (c, N)
    phT, uT = ph[:, :rows].T, u[:, :rows].T  # (rows, c)
    outer = phT[:, :, None] * ph[None, :, :nA]  # (rows, c, N_A)
    YA = P[:, None, :nA] * (outer - M[:, None, :nA])
    YA = YA + A[:, None, :nA] * uT[:, :, None] + B[:, None, :nA] * u[None, :, :nA]
    YA = YA * jnp.sqrt(w)[None, :, None]  # √w_s Y_s[d, a] at [d, s, a]
    flat = YA.reshape(rows * c, nA)
    Yy = (flat @ yt).reshape(rows, c, nL)  # Y_s[:, A] ỹ
    qA = (Gt @ Yy[:nA].reshape(nA, c * nL)).reshape(nA, c, nL)  # G̃⁻¹ Y_s[A,A] ỹ at [a, s, i]
    T3 = YA.reshape(rows, c * nA) @ qA.transpose(1, 0, 2).reshape(c * nA, nL)
    e_y = jnp.sum(Yy[:nA] * qA)
    YAF = (flat @ F).reshape(rows, c, nA)  # Y_s[:, A] F
    FYF = F.T @ YAF[:nA].reshape(nA, c * nA)  # Fᵀ Y_s[A,A] F
    e_g = jnp.sum(FYF * FYF)
    if nB == 0:
        return T3, *_empty_RW(nL, T3.dtype, marginal), e_y, e_g
    Ry = Yy[nA:] - (Proj @ Yy[:nA].reshape(nA, c * nL)).reshape(nB, c, nL)  # Uᵀ Y_s[:,A] ỹ
    Rf = Ry.transpose(0, 2, 1).reshape(nB * nL, c)
    Qf = (YAF[nA:] - (Proj @ YAF[:nA].reshape(nA, c * nA)).reshape(nB, c, nA)).reshape(nB, c * nA)  # Uᵀ Y_s[:,A] F
    if marginal:
        return T3, jnp.sum(Rf * Rf, axis=1).reshape(nB, nL), jnp.sum(Qf * Qf, axis=1), e_y, e_g
    return T3, (Rf @ Rf.T).reshape(nB, nL, nB, nL), Qf @ Qf.T, e_y, e_g


def _empty_RW(nL, dtype, marginal):
    if marginal:
        return jnp.zeros((0, nL), dtype), jnp.zeros((0,), dtype)
    return jnp.zeros((0, nL, 0, nL), dtype), jnp.zeros((0, 0), dtype)


def _rank_one_chunk(M, ph, w, Gt, F, yt, Proj, rows, marginal=False):
    """As :func:`_general_chunk` for the last source layer, whose columns are Y_s = φ_sφ_sᵀ − M
    (P = 1, A = B = 0: no later step propagates it): rank one plus a constant, so every product
    is O(c·(N·N_A + N_B²)) instead of O(c·N·N_A²)."""
    nA, nL = yt.shape
    sw = jnp.sqrt(w)
    phA = ph[:, :nA]
    MA = M[:rows, :nA]
    a = phA @ yt  # (c, n_L) φ_Aᵀ ỹ
    Yy = sw[:, None, None] * (ph[:, :rows, None] * a[:, None, :] - (MA @ yt)[None])  # (c, rows, n_L)
    q = Yy[:, :nA].transpose(0, 2, 1) @ Gt  # (c, n_L, N_A)
    # T3 = Σ_s √w_s (φ_s φ_Aᵀ − M[:, A]) q_sᵀ
    T3 = ph[:, :rows].T @ (sw[:, None] * jnp.einsum("sa,sia->si", phA, q)) - MA @ jnp.einsum("s,sia->ai", sw, q)
    e_y = jnp.sum(Yy[:, :nA] * q.transpose(0, 2, 1))
    g = phA @ F  # (c, N_A) Fᵀφ_A
    C = F.T @ M[:nA, :nA] @ F
    gg = jnp.sum(g * g, -1)
    e_g = jnp.sum(w * (gg**2 - 2 * jnp.einsum("sa,ab,sb->s", g, C, g) + jnp.sum(C * C)))
    nB = Proj.shape[0]
    if nB == 0:
        return T3, *_empty_RW(nL, T3.dtype, marginal), e_y, e_g
    Ry = Yy[:, nA:] - Proj @ Yy[:, :nA]
    Rf = Ry.transpose(1, 2, 0).reshape(nB * nL, -1)
    # Uᵀ Y_s[:, A] F = v_s g_sᵀ − C0 with v_s = Uᵀφ_s, C0 = Uᵀ M[:, A] F
    v = ph[:, nA:rows] - phA @ Proj.T  # (c, N_B)
    C0 = (M[nA:rows, :nA] - Proj @ M[:nA, :nA]) @ F  # (N_B, N_A)
    h = g @ C0.T  # (c, N_B)
    vw = v * (w * gg)[:, None]
    if marginal:
        W = jnp.sum(vw * v, 0) - 2 * jnp.sum(v * w[:, None] * h, 0) + jnp.sum(w) * jnp.sum(C0 * C0, 1)
        return T3, jnp.sum(Rf * Rf, axis=1).reshape(nB, nL), W, e_y, e_g
    cross = (v * w[:, None]).T @ h
    W = vw.T @ v - cross - cross.T + jnp.sum(w) * (C0 @ C0.T)
    return T3, (Rf @ Rf.T).reshape(nB, nL, nB, nL), W, e_y, e_g


def _chunk_size(S: int, rows: int, nA: int) -> int:
    """Draws per chunk: the chunk's (rows, c, N_A) columns stay within _CHUNK_ELEMS numbers (a few MiB:
    larger chunks make the products memory-bound, 2.2× slower at N = 1000, N_A = 100), 8 <= c <= _CHUNK."""
    c = _CHUNK
    while c > 8 and c * rows * nA > _CHUNK_ELEMS:
        c //= 2
    return min(c, S)


def _chunked_draws(phi, w, c):
    """Draws (S, N) and their weight w as (chunks, c, N) and (chunks, c): padding columns weigh 0."""
    S, N = phi.shape
    chunks = -(-S // c)
    pad = chunks * c - S
    mask = jnp.pad(jnp.ones((S,), phi.dtype), (0, pad))
    return jnp.pad(phi, ((0, pad), (0, 0))).reshape(chunks, c, N), (mask * w).reshape(chunks, c)


@functools.partial(jax.jit, static_argnames=("last_rank_one", "marginal"))
def _factored_cross(fv, Gt, F, yt, Proj, last_rank_one=True, marginal=False):
    """The cross contractions of a FactoredVertex V = Σ_s w_s Y_s⊗Y_s, accumulated over its columns.

    Returns (with A the first N_A inputs, U = [−Projᵀ; 1_B], N_B = Proj.shape[0] possibly 0, and
    rows = N_A + N_B the inputs kept)
      T3  (rows, n_L)            Σ V_{(d a2)(a3 a4)} G̃⁻¹_{a2a3} ỹ_{a4 i}
      R   (N_B, n_L, N_B, n_L)   Σ V̂̂_{(β1 a)(β2 a')} ỹ_{a i1} ỹ_{a' i2}
      W   (N_B, N_B)             Σ V̂̂_{(β1 a)(β2 a')} G̃⁻¹_{aa'}
      e_y, e_g (scalars)         Σ V_{(12)(34)} G̃⁻¹_{13} Y_{24}, Σ V_{(12)(34)} G̃⁻¹_{13} G̃⁻¹_{24}
    and with ``marginal`` only the diagonals R[β, i, β, i] (N_B, n_L) and W[β, β] (N_B,).
    """
    nA, nL = yt.shape
    nB = Proj.shape[0]
    rows = nA + nB
    args = (Gt, F, yt, Proj, rows, marginal)
    dtype = fv.M.dtype
    acc = (
        jnp.zeros((rows, nL), dtype),
        jnp.zeros((nB, nL) if marginal else (nB, nL, nB, nL), dtype),
        jnp.zeros((nB,) if marginal else (nB, nB), dtype),
        jnp.zeros((), dtype),
        jnp.zeros((), dtype),
    )
    n_sources = fv.M.shape[0]
    if n_sources == 0:
        return acc

    def add(acc, inc):
        return tuple(a + b for a, b in zip(acc, inc))

    def general_layer(acc, xs):
        M, P, A, B, phi_l, w_l = xs
        ph, wt = _chunked_draws(phi_l, w_l, _chunk_size(phi_l.shape[0], rows, nA))
        step = lambda acc, x: (add(acc, _general_chunk((M, P, A, B), x[0], x[1], *args)), None)
        return lax.scan(step, acc, (ph, wt))[0], None

    n_prop = n_sources - 1  # the propagated sources, which share S draws
    if n_prop:
        xs = (fv.M[:n_prop], fv.P[:n_prop], fv.A[:n_prop], fv.B[:n_prop], fv.phi, fv.weight[:n_prop])
        acc = lax.scan(general_layer, acc, xs)[0]
    if last_rank_one:
        ph, wt = _chunked_draws(fv.last, fv.weight[-1], min(_CHUNK, fv.last.shape[0]))
        step = lambda acc, x: (add(acc, _rank_one_chunk(fv.M[-1], x[0], x[1], *args)), None)
        acc = lax.scan(step, acc, (ph, wt))[0]
    else:
        acc = general_layer(acc, (fv.M[-1], fv.P[-1], fv.A[-1], fv.B[-1], fv.last, fv.weight[-1]))[0]
    return acc


def _dense_cross(V, Gt, yt, Proj):
    nA = yt.shape[0]
    N = nA + Proj.shape[0]
    V = V[:N, :N, :N, :N]
    U = jnp.concatenate([-Proj.T, jnp.eye(N - nA, dtype=V.dtype)])  # (N, N_B)
    T3 = jnp.einsum("dbce,bc,ei->di", V[:, :nA, :nA, :nA], Gt, yt)
    Vx = V[:, :nA, :, :nA]  # (d1, a, d2, a')
    Ry = jnp.einsum("daeb,ai,bj->diej", Vx, yt, yt)
    R = jnp.einsum("dp,eq,diej->piqj", U, U, Ry)
    W = jnp.einsum("dp,eq,daeb,ab->pq", U, U, Vx, Gt)
    VAAAA = V[:nA, :nA, :nA, :nA]
    e_y = jnp.einsum("abcd,ac,bi,di->", VAAAA, Gt, yt, yt)
    e_g = jnp.einsum("abcd,ac,bd->", VAAAA, Gt, Gt)
    return T3, R, W, e_y, e_g


def _last_layer_rank_one(fv) -> bool:
    """FactoredVertex builds its last source layer unpropagated (P = 1, A = B = 0): check it when the
    values are visible, trust the construction inside a trace."""
    if not is_concrete(fv):
        return True
    return bool(np.all(np.asarray(fv.P[-1]) == 1) and not np.any(np.asarray(fv.A[-1])) and not np.any(fv.B[-1]))


def _cross(V, tr: _Training, Proj, rank_one: bool = True, marginal: bool = False):
    if _is_factored(V):
        return _factored_cross(V, tr.Gt, tr.F, tr.yt, Proj, last_rank_one=rank_one, marginal=marginal)
    T3, R, W, e_y, e_g = _dense_cross(V, tr.Gt, tr.yt, Proj)
    if marginal:
        nB, nL = R.shape[:2]
        R = jnp.einsum("pipi->pi", R) if nB else R.reshape(0, nL)
        W = jnp.diagonal(W)
    return T3, R, W, e_y, e_g


def _check_arrays(G, V, y, what):
    G = jnp.asarray(G)
    y = jnp.asarray(y, G.dtype)
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"{what}: G must be a square (N, N) kernel, got shape {G.shape}.")
    if y.ndim != 2 or y.shape[0] > G.shape[0]:
        raise ValueError(f"{what}: y must be (N_A, n_L) with N_A <= N = {G.shape[0]}, got shape {y.shape}.")
    N = G.shape[0]
    if _is_factored(V):
        if V.n_inputs != N:
            raise ValueError(f"{what}: the FactoredVertex has {V.n_inputs} inputs but G has {N}.")
    else:
        V = jnp.asarray(V, G.dtype)
        if V.shape != (N,) * 4:
            raise ValueError(f"{what}: V must be (N, N, N, N) = {(N,) * 4} or a FactoredVertex, got {V.shape}.")
    return G, V, y


_MC_BATCHES = 16  # batches of the factored vertex's Monte Carlo columns for the standard errors


def _vertex_terms(V, tr: _Training, Proj, moments: bool, rank_one: bool = True, marginal: bool = False):
    """The parts of §5.2 linear in V: the evidence's quartic bracket (× 8n) and, with ``moments``, the
    mean term (× 2n) and the covariance term over the flattened event (× n); with ``marginal`` the
    variance term (N_B, n_L) instead of the covariance."""
    nA, nL = tr.yt.shape
    nB = Proj.shape[0]
    T3, R, W, e_y, e_g = _cross(V, tr, Proj, rank_one, marginal)
    U = jnp.concatenate([-Proj.T, jnp.eye(nB, dtype=Proj.dtype)])  # (N, N_B)
    if marginal:  # Σ V_{(d1 d2)(a a')} [Y − n_L G̃⁻¹]_{aa'}: training columns and diagonal
        cols, dg = _pair(V, tr.X1, marginal=True)
        quartic = jnp.sum(cols[:nA] * tr.X1) - 4 * e_y + 2 * nL * e_g
        if not moments:
            return (quartic,)
        mean1 = U.T @ (cols @ tr.yt) - 2 * U.T @ T3
        cB = cols[nA : nA + nB]  # M1[B, A]
        uMu = dg[nA : nA + nB] - 2 * jnp.sum(Proj * cB, axis=1) + jnp.sum((Proj @ cols[:nA]) * Proj, axis=1)
        return quartic, mean1, (uMu / 2 - W)[:, None] + R
    M1 = _pair(V, tr.X1)  # Σ V_{(d1 d2)(a a')} [Y − n_L G̃⁻¹]_{aa'}
    quartic = jnp.sum(M1[:nA, :nA] * tr.X1) - 4 * e_y + 2 * nL * e_g
    if not moments:
        return (quartic,)
    mean1 = U.T @ (M1[:, :nA] @ tr.yt) - 2 * U.T @ T3
    same = (U.T @ M1 @ U) / 2 - W  # δ_{i1 i2} part
    cov1 = same[:, None, :, None] * jnp.eye(nL, dtype=same.dtype)[None, :, None, :] + R
    return quartic, mean1, cov1.reshape(nB * nL, nB * nL)


_vertex_terms_jit = jax.jit(_vertex_terms, static_argnames=("moments", "rank_one", "marginal"))


def _batches(fv):
    """The factored vertex as _MC_BATCHES independent estimates (disjoint sets of the draws of every
    source, each set reweighted to be unbiased on its own), for the standard errors when the draws
    do not divide evenly into equal sets."""
    S, S_last = fv.phi.shape[1], fv.last.shape[0]
    b = min(_MC_BATCHES, min(S, S_last) // 2)
    out = []
    for p, q in zip(np.array_split(np.arange(S), b), np.array_split(np.arange(S_last), b)):
        scale = jnp.asarray([S / p.size] * (fv.n_sources - 1) + [S_last / q.size], fv.weight.dtype)
        out.append(fv._replace(phi=fv.phi[:, p], last=fv.last[q], weight=fv.weight * scale))
    return out


def _batched_terms(V, tr: _Training, Proj, moments: bool, rank_one: bool, b: int, marginal: bool = False):
    """_vertex_terms over b equal disjoint batches of the factored vertex's draws (each reweighted to
    be unbiased on its own), in one traced program: (their mean, its standard error) per term."""
    L, S, N = V.phi.shape
    phi = V.phi.reshape(L, b, S // b, N).transpose(1, 0, 2, 3)  # (b, L-2, S/b, N), contiguous blocks
    last = V.last.reshape(b, -1, N)
    Vb = V._replace(weight=V.weight * b)
    runs = lax.map(
        lambda x: _vertex_terms(Vb._replace(phi=x[0], last=x[1]), tr, Proj, moments, rank_one, marginal), (phi, last)
    )
    terms = tuple(jnp.mean(t, axis=0) for t in runs)
    se = tuple(jnp.sqrt(jnp.sum((t - m) ** 2, axis=0) / (b * (b - 1))) for t, m in zip(runs, terms))
    return terms, se


_batched_terms_jit = jax.jit(_batched_terms, static_argnames=("moments", "rank_one", "b", "marginal"))


def _nlo(G, V, width, y, noise_var, moments: bool, marginal: bool = False):
    """(NLOMoments or log evidence, Monte Carlo standard errors of the V terms (zeros for a dense V))."""
    nA, nL = y.shape
    nB = G.shape[0] - nA if moments else 0
    marginal = marginal or not moments  # the evidence needs only the training block
    n = jnp.asarray(width, G.dtype)
    tr = _training(G[:nA, :nA], y, noise_var)
    Proj = G[nA : nA + nB, :nA] @ tr.Gt  # (N_B, N_A)
    if _is_factored(V) and V.n_sources:
        rank_one = _last_layer_rank_one(V)
        S, S_last = V.phi.shape[1], V.last.shape[0]
        b = min(_MC_BATCHES, min(S, S_last) // 2)
        if S % b == 0 and S_last % b == 0:  # one compiled program for all batches
            fn = _batched_terms_jit if is_concrete(V, tr, Proj) else _batched_terms
            terms, se = fn(V, tr, Proj, moments, rank_one, b, marginal)
            terms, se = list(terms), list(se)
        else:
            terms = list(_vertex_terms_jit(V, tr, Proj, moments, rank_one, marginal))  # all draws at once
            runs = [_vertex_terms_jit(Vb, tr, Proj, moments, rank_one, marginal) for Vb in _batches(V)]
            b = len(runs)
            avg = [sum(t[k] for t in runs) / b for k in range(len(terms))]
            se = [jnp.sqrt(sum((t[k] - avg[k]) ** 2 for t in runs) / (b * (b - 1))) for k in range(len(terms))]
    else:
        terms = list(_vertex_terms(V, tr, Proj, moments, True, marginal))
        se = [jnp.zeros_like(t) for t in terms]
    log_ev = gp_log_evidence(G[:nA, :nA], y, noise_var) + terms[0] / (8 * n)
    if not moments:
        return log_ev, se[0] / (8 * n)
    _, mean1, cov1 = terms
    gp_mean = Proj @ y
    if marginal:
        gp_var = jnp.diagonal(G[nA:, nA:]) - jnp.sum(Proj * G[nA:, :nA], axis=1)
        return NLOMarginals(
            gp_mean + mean1 / (2 * n),
            gp_var[:, None] + cov1 / n,
            gp_mean,
            gp_var,
            log_ev,
            se[1] / (2 * n),
            se[2] / n,
            se[0] / (8 * n),
        )
    gp_cov = G[nA:, nA:] - Proj @ G[:nA, nA:]
    gp_cov = (gp_cov + gp_cov.T) / 2
    cov = jnp.kron(gp_cov, jnp.eye(nL, dtype=G.dtype)) + cov1 / n
    cov_se = se[2] / n
    out = NLOMoments(
        gp_mean + mean1 / (2 * n),
        (cov + cov.T) / 2,
        gp_mean,
        gp_cov,
        log_ev,
        se[1] / (2 * n),
        (cov_se + cov_se.T) / 2,
        se[0] / (8 * n),
    )
    return out


def nlo_moments(G, V, width, y, noise_var=0.0) -> NLOMoments:
    """Posterior moments of f_B at O(1/n) from the prior statistics of f on D = A ∪ B (THEORY.md §5.2).

    :param G: (N, N) two-point function E[f f] = K + K^{1}/n over D, training inputs first.
    :param V: the four-point vertex over D, dense (N, N, N, N) or a
        :class:`~eft_prob.theory.FactoredVertex`.
    :param width: n = n_{L-1}: the connected four-point function is (V δδ + 2 perms)/n.
    :param y: (N_A, n_L) observations of the first N_A inputs.
    :param noise_var: σ² >= 0 (0: the book's noise-free conditioning; G_AA must then be invertible).
    :returns: :class:`NLOMoments` for the remaining N_B = N − N_A inputs (and the log evidence).
    """
    G, V, y = _check_arrays(G, V, y, "nlo_moments")
    return _nlo(G, V, width, y, noise_var, True)


def nlo_log_evidence(G, V, width, y, noise_var=0.0) -> jax.Array:
    """log p(y) at O(1/n) (THEORY.md §5.2).  Arguments as :func:`nlo_moments`: G and V over N >= N_A
    inputs, the N_A training inputs first (only their block is used)."""
    G, V, y = _check_arrays(G, V, y, "nlo_log_evidence")
    return _nlo(G, V, width, y, noise_var, False)[0]


def nlo_kernel_shift(G, V, width, y, noise_var=0.0) -> jax.Array:
    """E[Ĝ | y] − E[Ĝ] (N, N) over D at O(1/n) (THEORY.md §5.2, end); arguments as :func:`nlo_moments`."""
    G, V, y = _check_arrays(G, V, y, "nlo_kernel_shift")
    nA = y.shape[0]
    tr = _training(G[:nA, :nA], y, noise_var)
    M1 = _pair(V, tr.X1)
    return (M1 + M1.T) / (4 * jnp.asarray(width, G.dtype))


# --------------------------------------------------------------------------------------------
# Spec-level API.


def _check_noise(noise_var, X=None, X_test=None):
    """noise_var > 0 (the posterior density needs it; zero noise is the limit of small values)."""
    if not is_concrete(noise_var):
        return noise_var
    v = np.asarray(noise_var, dtype=float)
    if v.shape == () and np.isfinite(v) and v > 0:
        return noise_var
    why = ""
    if v.shape == () and v == 0 and X is not None and X_test is not None and is_concrete(X, X_test):
        Xn, Tn = np.asarray(X, float), np.asarray(X_test, float)
        hit = np.nonzero(np.all(Tn[:, None, :] == Xn[None, :, :], axis=-1))
        if hit[0].size:
            why = (
                f" Here X_test row {int(hit[0][0])} equals X row {int(hit[1][0])}: with zero noise the posterior "
                "there is a point mass at the observed y, which has no density."
            )
    raise ValueError(
        f"noise_var must be a finite scalar > 0, got {noise_var!r}.{why} For (nearly) noise-free "
        "conditioning pass a small positive value, e.g. noise_var=1e-8 times the kernel scale."
    )


def _warn_regime(spec, D, st, what):
    """RegimeWarning when the expansion parameter ε = max_α V_(αα)(αα)/(n K_αα²) exceeds the threshold.

    With a dense (exact) V, ε is read off the statistics already computed.  With a factored V (a
    Monte Carlo estimate) the worst input is picked from it and ε recomputed exactly on that input
    alone (one input: cheap), by :func:`eft_prob.criticality.check_regime`.
    """
    from ..criticality import check_regime

    if not is_concrete(spec, D):
        return None
    if not _is_factored(st.V):
        return check_regime(spec, D, what, statistics=st)
    fv = st.V  # V_(αα)(αα) = Σ_s w_s Y_s[α, α]²
    Vd = jnp.zeros((D.shape[0],), fv.M.dtype)
    for layer in range(fv.n_sources):
        u = fv.samples(layer) ** 2 - jnp.diagonal(fv.M[layer])[None]
        Yd = (jnp.diagonal(fv.P[layer]) + jnp.diagonal(fv.A[layer]) + jnp.diagonal(fv.B[layer]))[None] * u
        Vd = Vd + fv.weight[layer] * jnp.sum(Yd**2, axis=0)
    Kd = np.asarray(jnp.diagonal(st.K))
    ratio = np.where(Kd > 0, np.asarray(Vd) / np.where(Kd > 0, Kd, 1.0) ** 2, 0.0)
    worst = int(np.argmax(ratio))
    return check_regime(spec, np.asarray(D)[worst : worst + 1], what)


#: relative Monte Carlo error of a factored-vertex V term above which the spec-level functions warn
MC_WARN = 0.25


def _warn_mc(V, pairs, what):
    """ApproximationWarning when a V term's Monte Carlo standard error exceeds MC_WARN of its size."""
    from .._config import ApproximationWarning

    if not _is_factored(V) or not is_concrete(*(a for p in pairs for a in p)):
        return
    rel = max(float(jnp.max(jnp.abs(se))) / max(float(jnp.max(jnp.abs(t))), 1e-300) for se, t in pairs)
    if rel > MC_WARN:
        warn(
            f"{what}: the Monte Carlo error of the factored vertex ({V.phi.shape[1]} draws per propagated source, "
            f"{V.last.shape[0]} for the last; used above 24 inputs) is {rel:.0%} of the O(1/n) correction it "
            "estimates (contractions against the inverse training kernel cancel strongly). Raise samples= (the "
            "error falls like 1/√samples), or use at most 24 inputs for the exact vertex; the standard errors are "
            "in the returned mean_se/covariance_se.",
            ApproximationWarning,
        )


@float64_theory
def gp_posterior(spec, X, y, X_test, noise_var) -> GaussianPrediction:
    """Infinite-width Bayesian posterior predictive of f(X_test) (see ``BayesianPosterior``)."""
    from .kernels import train_test_blocks

    _check_noise(noise_var, X, X_test)
    b = train_test_blocks(spec, X, y, X_test)
    return gp_moments(b.K_AA, b.K_AB, b.K_BB, b.y, noise_var)


def _statistics(spec, D, samples, key, what, last_samples=None):
    from .vertex import prior_statistics

    if spec.depth < 2:
        raise ValueError(f"{what} needs at least one hidden layer (hidden=[...]); a depth-1 network is Gaussian.")
    st = prior_statistics(spec, D, samples=samples, last_samples=last_samples, key=key)
    _warn_regime(spec, D, st, what)
    return st


def _train_test(spec, X, y, X_test):
    from .._validate import check_inputs, check_targets

    X = check_inputs(spec, X, "X")
    X_test = check_inputs(spec, X_test, "X_test")
    y = check_targets(spec, y, X.shape[0])
    return X, y, X_test


@float64_theory
def nlo_posterior_moments(
    spec, X, y, X_test, noise_var, *, samples: int = 4096, last_samples: int | None = None, key=None
) -> NLOMoments:
    """Posterior mean and covariance of f(X_test) given y = f(X) + ε at O(1/n) (book §6.4; THEORY.md §5.2).

    :param spec: the architecture (at least one hidden layer); n = n_{L-1} = ``spec.hidden[-1]``.
    :param X: training inputs (N_A, input_dim);  ``y``: (N_A, n_L) observations.
    :param X_test: (N_B, input_dim); may overlap X.
    :param noise_var: σ² > 0, the variance of the Gaussian observation noise of every output.
    :param samples, last_samples, key: Monte Carlo draws and key of the factored vertex, used when
        N_A + N_B > 24 (see :func:`eft_prob.theory.prior_statistics`); below that V is exact.
    :returns: :class:`NLOMoments`: ``mean`` (N_B, n_L) and ``covariance`` (N_B·n_L, N_B·n_L),
        index β·n_L + i, including the coupling of different output neurons; above 24 inputs also
        the Monte Carlo standard errors of the V terms (an :class:`~eft_prob.ApproximationWarning`
        when they exceed ``MC_WARN`` = 25% of the terms).

    Differentiable in C_b, C_W; warns (:class:`~eft_prob.RegimeWarning`) outside the 1/n regime.
    Cost: the prior statistics of N = N_A + N_B inputs (:func:`~eft_prob.theory.prior_statistics`)
    plus, for N > 24, O(L·S·N_A·(N·n_L + N_B²)) for the contractions.
    """
    _check_noise(noise_var, X, X_test)
    X, y, X_test = _train_test(spec, X, y, X_test)
    D = jnp.concatenate([X, X_test])
    st = _statistics(spec, D, samples, key, "nlo_posterior_moments", last_samples)
    r = nlo_moments(st.K + st.K1 / st.width, st.V, st.width, y, noise_var)
    _warn_mc(
        st.V,
        [
            (r.mean_se, r.mean - r.gp_mean),
            (r.covariance_se, r.covariance - jnp.kron(r.gp_covariance, jnp.eye(y.shape[1]))),
        ],
        "nlo_posterior_moments",
    )
    return r


@float64_theory
def nlo_posterior_marginals(
    spec, X, y, X_test, noise_var, *, samples: int = 4096, last_samples: int | None = None, key=None
) -> NLOMarginals:
    """Posterior means and marginal variances of f(X_test) at O(1/n), for many test inputs.

    The same §5.2 formulas as :func:`nlo_posterior_moments` without the joint covariance, whose V term
    costs O(S·N_A·N_B²) per layer; here every term is O(S·N·N_A²), so thousands of test inputs are
    practical (e.g. N_A = 100, N_B = 900, depth 10: see benchmarks/bench_vertex.py).  Arguments as
    :func:`nlo_posterior_moments` (``last_samples``: see :func:`~eft_prob.theory.prior_statistics`).
    :returns: :class:`NLOMarginals` (mean and variance (N_B, n_L), Monte Carlo standard errors).
    """
    _check_noise(noise_var, X, X_test)
    X, y, X_test = _train_test(spec, X, y, X_test)
    D = jnp.concatenate([X, X_test])
    st = _statistics(spec, D, samples, key, "nlo_posterior_marginals", last_samples)
    G, V, y = _check_arrays(st.K + st.K1 / st.width, st.V, y, "nlo_posterior_marginals")
    r = _nlo(G, V, st.width, y, noise_var, True, marginal=True)
    _warn_mc(
        st.V,
        [(r.mean_se, r.mean - r.gp_mean), (r.variance_se, r.variance - r.gp_variance[:, None])],
        "nlo_posterior_marginals",
    )
    return r


@float64_theory
def posterior_kernel_shift(spec, X, y, noise_var, X_test=None, *, samples: int = 4096, key=None) -> jax.Array:
    """E[Ĝ^(L) | y] − E[Ĝ^(L)] at O(1/n): how observing y changes the last layer's random kernel (book §6.4).

    Returns (N, N) over D = X followed by X_test (if given).  Zero at infinite width (no
    representation learning); at finite width (1/2n) Σ V_{(δ1δ2)(α1α2)} [Y − n_L G̃⁻¹]^{α1α2}
    ("Hebbian": the kernel grows along directions the labels are correlated in).
    """
    _check_noise(noise_var)
    from .._validate import check_inputs, check_targets

    X = check_inputs(spec, X, "X")
    y = check_targets(spec, y, X.shape[0])
    D = X if X_test is None else jnp.concatenate([X, check_inputs(spec, X_test, "X_test")])
    st = _statistics(spec, D, samples, key, "posterior_kernel_shift")
    return nlo_kernel_shift(st.K + st.K1 / st.width, st.V, st.width, y, noise_var)


@float64_theory
def log_evidence(spec, X, y, noise_var, *, order: int = 0, samples: int = 4096, key=None) -> jax.Array:
    """log p(y | spec, noise_var): the marginal likelihood of the data under the network prior.

    ``order=0``: Σ_i log N(y_i; 0, K̃ + σ²).  ``order=1``: with the 1/n corrections of THEORY.md §5.2
    (the NLO metric in the Gaussian term plus the quartic V term); ``samples``/``key`` as in
    :func:`nlo_posterior_moments` for more than 24 training inputs.  Differentiable in C_b, C_W
    (so it can be maximized or sampled over).  As a NUTS likelihood prefer
    ``NetworkPrior(spec, X, order=1, noise_var=σ²)``: a proper density whose log_prob equals this to O(1/n²).
    """
    from .._validate import check_inputs, check_order, check_targets
    from .kernels import nngp

    order = check_order(order)
    _check_noise(noise_var)
    X = check_inputs(spec, X, "X")
    y = check_targets(spec, y, X.shape[0])
    if order == 0:
        return gp_log_evidence(nngp(spec, X), y, noise_var)
    st = _statistics(spec, X, samples, key, "log_evidence(order=1)")
    G = st.K + st.K1 / st.width
    ev, se = _nlo(G, st.V, st.width, y, noise_var, False)
    _warn_mc(st.V, [(se, ev - gp_log_evidence(G, y, noise_var))], "log_evidence(order=1)")
    return ev
