"""Infinite-width gradient-descent training: the distribution of trained outputs (THEORY.md §8).

At infinite width the NTK is frozen and training on the MSE loss L = ½ Σ (z − y)² is linear in
function space.  After t full-batch steps with global rate η (per-layer rates ηλ_b, ηλ_W/n_{ℓ-1}),

    z_B(t) = z_B(0) − Θ_BA Φ_t (z_A(0) − y),    Φ_t = Θ̃⁻¹ (1 − (1 − ηΘ̃)^t),

so z_B(t) is Gaussian with mean P_t y and covariance K_BB − P_t K_AB − (P_t K_AB)ᵀ + P_t K_AA P_tᵀ,
P_t = Θ_BA Φ_t (eq. 8.2 of the sheet; book §10.2).  t → ∞ gives Φ = Θ̃⁻¹ (book §10.2, "giant leap").
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._config import CostWarning, MemoryLimitError, StabilityWarning, float64_theory, is_concrete, warn
from .._validate import check_inputs

__all__ = [
    "GaussianPrediction",
    "NLOTrainedCoefficients",
    "NLOTrainedMarginals",
    "TrainedMarginals",
    "TrainedMoments",
    "gd_moments",
    "gd_prediction",
    "nlo_trained_coefficients",
    "nlo_trained_marginals",
    "nlo_trained_moments",
    "stability_bound",
]


class GaussianPrediction(NamedTuple):
    """Mean (N_B, n_L) of the outputs and their covariance (N_B, N_B) across inputs.

    Output neurons are independent and share the covariance (δ_ij Σ).
    """

    mean: jax.Array
    cov: jax.Array


def stability_bound(theta_train) -> jax.Array:
    """2/λ_max(Θ̃): full-batch GD on the MSE loss converges for 0 < η < this (infinite width)."""
    return 2.0 / jnp.linalg.eigvalsh(theta_train)[-1]


def _phi(lam, eta, steps):
    """Eigenvalues of Φ_t = Θ̃⁻¹(1 − (1 − ηΘ̃)^t); pseudo-inverse for null directions."""
    scale = jnp.max(jnp.abs(lam))
    tiny = lam <= 1e-13 * scale
    lam_safe = jnp.where(tiny, 1.0, lam)
    if steps is None:
        return jnp.where(tiny, 0.0, 1.0 / lam_safe)
    x = eta * lam
    x_small = jnp.where(x < 1.0, x, 0.0)
    # 1 − (1 − x)^t, accurate for small x (slow directions) and correct for 1 <= x < 2.
    one_minus = jnp.where(x < 1.0, -jnp.expm1(steps * jnp.log1p(-x_small)), 1.0 - jnp.power(1.0 - x, steps))
    return jnp.where(tiny, eta * steps * jnp.ones_like(lam), one_minus / lam_safe)


def gd_moments(K_AA, K_AB, K_BB, T_AA, T_BA, y, learning_rate=None, steps=None) -> GaussianPrediction:
    """Mean and covariance of infinite-width outputs on B after ``steps`` GD steps on A.

    Parameters are blocks of the NNGP kernel K and NTK Θ over training set A and test set B;
    ``y`` is (N_A, n_L).  ``steps=None`` means trained to convergence (then ``learning_rate`` is
    not needed).
    """
    if steps is not None:
        if learning_rate is None:
            raise ValueError("learning_rate is required when steps is finite.")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer or None (converged), got {steps!r}.")
    lam, U = jnp.linalg.eigh((T_AA + T_AA.T) / 2)
    if learning_rate is not None and is_concrete(lam, learning_rate):
        bound = 2.0 / float(lam[-1])
        if float(learning_rate) >= bound:
            warn(
                f"learning_rate={float(learning_rate):.4g} is at or above the GD stability bound "
                f"2/λ_max(Θ̃) = {bound:.4g}: real gradient descent diverges. Use a learning rate below "
                f"{bound:.4g}.",
                StabilityWarning,
            )
    phi = _phi(lam, learning_rate, steps)
    P = (T_BA @ U) * phi @ U.T  # (N_B, N_A)
    mean = P @ y
    PK = P @ K_AB
    cov = K_BB - PK - PK.T + P @ K_AA @ P.T
    return GaussianPrediction(mean, (cov + cov.T) / 2)


@float64_theory
def gd_prediction(spec, X, y, X_test, learning_rate=None, steps=None) -> GaussianPrediction:
    """Infinite-width distribution of the outputs on ``X_test`` after GD on (X, y).

    See :class:`eft_prob.distributions.TrainedNetwork` for the distribution object.
    """
    from .kernels import train_test_blocks

    b = train_test_blocks(spec, X, y, X_test)
    return gd_moments(b.K_AA, b.K_AB, b.K_BB, b.T_AA, b.T_BA, b.y, learning_rate, steps)


# --------------------------------------------------------------------------------------------
# Order 1/n: mean and covariance of networks trained by full-batch GD (book ch. ∞; THEORY.md §9.5).
#
# Composite indices b = (δ, i) (flattened δ·n_L + i) over D = A ∪ B, a over A.  One GD step, Taylor
# expanded in the parameter change (§1.4, §9.1), with ε = z_A − y:
#
#   z(t+1)  = z − η Ĥ_{·A} ε + (η²/2) dĤ_{·AA} εε − (η³/6) ddĤ_I εεε,
#   Ĥ(t+1)  = Ĥ − η (dĤ_{b1b2a} + dĤ_{b2b1a}) ε_a + (η²/2)(ddĤ_I{b1b2··} + ddĤ_I{b2b1··} + 2 ddĤ_II{b1b2··}) εε,
#   dĤ(t+1) = dĤ − η (ddĤ_I{b0b1b2a} + ddĤ_II{b0b1b2a} + ddĤ_II{b0b2b1a}) ε_a,
#
# exact to O(1/n) because ΔĤ ~ n^{-1/2}, dĤ ~ n^{-1} (with O(1) correlation to z), ddĤ = its mean
# + O(n^{-3/2}), higher derivatives O(n^{-2}).  Expanding z(T) = z⁰ + z^h + x around the
# infinite-width dynamics (NTK Θ, M = 1 − ηΘ̃): z⁰ is the linear-model solution, z^h (linear in ΔĤ,
# O(n^{-1/2})) and x (O(1/n)) are responses of the linear dynamics to sources; a source s(u) at step
# u reaches step T as Σ_u [s(u) − Θ_{·A}Θ̃⁻¹(1 − M^{T−1−u}) s_A(u)].  In the eigenbasis Θ̃ = U Λ Uᵀ
# (ε̂ = Uᵀε, m = 1 − ηλ) every source is a polynomial in ε̂(0) times geometric time sums ("weights"
# below; at T = ∞ the sheet's algorithm projectors).  Moments follow from Wick's rule with at
# most one 1/n cumulant per term: E[ΔĤΔĤ] = 𝒜/n, E[ΔĤ zz] = 𝒟/n, E[dĤ z] = 𝒫/n, E[ddĤ] = (ℐ, 𝒥)/n
# (the composite forms of A, B; D, F; P, Q; R; S, T, U); the connected parts of ⟨ΔĤΔĤzz⟩,
# ⟨dĤzzz⟩ and ⟨ddĤzz⟩ are O(1/n²).  The mean reproduces THEORY.md §9.5 (boxed) term by term; the
# covariance and the finite-step versions are new (derived here, checked against a Monte Carlo of
# the expanded dynamics and against trained ensembles in the tests).


class TrainedMoments(NamedTuple):
    """Mean (N_B, n_L) and covariance (N_B·n_L, N_B·n_L) of the trained outputs on the test inputs.

    The covariance is over the flattened test event f.reshape(-1) (index β·n_L + i): at O(1/n)
    different output neurons are correlated.
    """

    mean: jax.Array
    cov: jax.Array


class NLOTrainedCoefficients(NamedTuple):
    """Trained-output moments as mean0 + mean1/n and cov0 + cov1/n, n = ``width`` = n_{L-1}.

    ``mean0``, ``cov0`` are the infinite-width values of :func:`gd_moments` (cov0 = cov ⊗ 1_{n_L}
    in the flattened index β·n_L + i); ``mean1`` (N_B, n_L) and ``cov1`` (N_B·n_L, N_B·n_L) the
    coefficients of 1/n.
    """

    mean0: jax.Array
    cov0: jax.Array
    mean1: jax.Array
    cov1: jax.Array
    width: int

    def at(self, width: float | None = None) -> TrainedMoments:
        """The moments at width n (default: the spec's n_{L-1}), truncated at O(1/n).

        The truncated covariance is positive semi-definite for large n but need not be at small n
        (where the O(1/n²) terms are not small either).
        """
        n = self.width if width is None else width
        cov = self.cov0 + self.cov1 / n
        return TrainedMoments(self.mean0 + self.mean1 / n, (cov + cov.T) / 2)


_PAIRINGS = {"01|23": "abcd,ij,kl->aibjckdl", "02|13": "abcd,ik,jl->aibjckdl", "03|12": "abcd,il,jk->aibjckdl"}


def _composite(X, pattern, nL):
    """Sample tensor X[δ1..δ4] times the neuron deltas of ``pattern`` -> (N n_L,)*4 (index δ·n_L + i)."""
    eye = jnp.eye(nL, dtype=X.dtype)
    return jnp.einsum(_PAIRINGS[pattern], X, eye, eye).reshape((X.shape[0] * nL,) * 4)


def _composite_statistics(st, nL):
    """𝒜 = nE[ΔĤΔĤ], 𝒟 = nE[ΔĤzz], 𝒫 = nE[dĤ z], ℐ = nE[ddĤ_I], 𝒥 = nE[ddĤ_II] in composite indices."""
    t = jnp.transpose
    c = lambda X, p: _composite(X, p, nL)
    A = c(st.A, "01|23") + c(t(st.B, (0, 2, 1, 3)), "02|13") + c(t(st.B, (0, 2, 3, 1)), "03|12")
    D = c(st.D, "01|23") + c(t(st.F, (0, 2, 1, 3)), "02|13") + c(t(st.F, (0, 2, 3, 1)), "03|12")
    P = c(st.P, "03|12") + c(st.Q, "01|23") + c(t(st.Q, (0, 2, 1, 3)), "02|13")
    I = c(st.R, "01|23") + c(t(st.R, (0, 3, 1, 2)), "02|13") + c(t(st.R, (0, 2, 3, 1)), "03|12")
    J = c(st.S, "01|23") + c(t(st.T, (0, 3, 1, 2)), "02|13") + c(t(st.U, (0, 2, 3, 1)), "03|12")
    return A, D, P, I, J


def _time_weights(lam, eta, steps):
    """Geometric time sums in the eigenbasis of Θ̃ (eigenvalues ``lam``), as (total, residual) pairs.

    With m = 1 − ηλ and e_p(t) = m_p^t, the total of a family is Σ_{t<T} f(t) and its residual
    Σ_{t<T} m_o^{T−1−t} f(t) (extra leading index o), where f(t) is
      h:   η e_p                     s1:  η² Σ_{v<t} m_o^{t−1−v} e_p(v)
      ts:  η² e_p Σ_{s<t} e_q(s)     tt:  η² e_p e_q
      ttt: η³ e_p e_q e_r            tss: η³ e_p Σ_{s<t} e_q e_r(s)
      ttr: η³ e_p e_q Σ_{s<t} e_r(s) tsr: η³ e_p Σ_{s<t} e_q(s) Σ_{r<s} e_r(r).
    ``steps=None``: T = ∞ in closed form (residuals vanish); η = 0 is gradient flow (the limit
    η → 0 at fixed ηT).
    """
    l = lam
    if steps is None:
        m = 1.0 - eta * l
        lp, lq, lr = l[:, None, None], l[None, :, None], l[None, None, :]
        mp, mq = m[:, None, None], m[None, :, None]
        D2 = l[:, None] + l[None, :] - eta * l[:, None] * l[None, :]  # (1 − m_p m_q)/η
        D3 = lp + lq + lr - eta * (lp * lq + lp * lr + lq * lr) + eta**2 * lp * lq * lr
        D2_ = D2[:, :, None]
        w = {
            "h": 1.0 / l,
            "s1": 1.0 / (l[:, None] * l[None, :]),
            "ts": m[:, None] / (l[:, None] * D2),
            "tt": eta / D2,
            "ttt": eta**2 / D3,
            "tss": eta * mp / (lp * D3),
            "ttr": eta * mp * mq / (D2_ * D3),
            "tsr": mp**2 * mq / (lp * D2_ * D3),
        }
        return {k: (v, None) for k, v in w.items()}

    m = 1.0 - eta * l
    P = l.shape[0]
    o2, o3, o4 = (m.reshape((-1,) + (1,) * k) for k in (1, 2, 3))  # m_o broadcast over k more axes
    shapes = {"h": 1, "s1": 2, "ts": 2, "tt": 2, "ttt": 3, "tss": 3, "ttr": 3, "tsr": 3}
    mo = {1: o2, 2: o3, 3: o4}

    def step(carry, _):
        e, c1, css, csr, cs1, tot, res = carry
        ep, eq, er = e[:, None, None], e[None, :, None], e[None, None, :]
        inner = {
            "h": eta * e,
            "s1": eta**2 * cs1,
            "ts": eta**2 * e[:, None] * c1[None, :],
            "tt": eta**2 * e[:, None] * e[None, :],
            "ttt": eta**3 * ep * eq * er,
            "tss": eta**3 * ep * css[None],
            "ttr": eta**3 * ep * eq * c1[None, None, :],
            "tsr": eta**3 * ep * csr[None],
        }
        tot = {k: tot[k] + inner[k] for k in tot}
        res = {k: mo[shapes[k]] * res[k] + inner[k][None] for k in res}
        csr = csr + e[:, None] * c1[None, :]
        c1 = c1 + e
        css = css + e[:, None] * e[None, :]
        cs1 = m[:, None] * cs1 + e[None, :]
        return (m * e, c1, css, csr, cs1, tot, res), None

    z = lambda k: jnp.zeros((P,) * k, l.dtype)
    tot0 = {k: z(v) for k, v in shapes.items()}
    res0 = {k: z(v + 1) for k, v in shapes.items()}
    init = (jnp.ones_like(l), z(1), z(2), z(2), z(2), tot0, res0)
    (_, _, _, _, _, tot, res), _ = jax.lax.scan(step, init, None, length=steps)
    return {k: (tot[k], res[k]) for k in shapes}


def _rot(T, axes, Uf):
    """Contract the given axes of T with Uf (D×A embedding of the eigenvectors of Θ̃), in place."""
    for ax in axes:
        T = jnp.moveaxis(jnp.tensordot(T, Uf, axes=([ax], [0])), -1, ax)
    return T


def _nlo_coefficients(st, nA, y, eta, steps):
    """(mean1 (N n_L,), cov1 (N n_L, N n_L)) over all of D, coefficients of 1/n (see the notes above)."""
    N = st.K.shape[0]
    nL = y.shape[1]
    nAc, nD = nA * nL, N * nL
    eye = jnp.eye(nL, dtype=st.K.dtype)
    Th, Kc = jnp.kron(st.Theta, eye), jnp.kron(st.K, eye)
    # eigenbasis of Θ̃ ⊗ 1: from the nA×nA eigh (each eigenvalue n_L-fold degenerate, and eigh's
    # derivative is undefined at degenerate eigenvalues — it gave gradients 30% off for n_L = 2)
    lam0, U0 = jnp.linalg.eigh(st.Theta[:nA, :nA])
    lam, U = jnp.repeat(lam0, nL), jnp.kron(U0, eye)
    Uf = jnp.zeros((nD, nAc), Th.dtype).at[:nAc].set(U)
    Psi = Th[:, :nAc] @ U / lam  # Θ_{·A} Θ̃⁻¹ in the eigenbasis
    Pi = jnp.eye(nD, dtype=Th.dtype) - Psi @ Uf.T  # δ − Θ_{·A} Θ̃⁻¹ (zero on the B columns)
    if steps is None:
        L0 = Pi
    else:
        L0 = jnp.eye(nD, dtype=Th.dtype) - (Psi * (1.0 - (1.0 - eta * lam) ** steps)) @ Uf.T
    yv = jnp.zeros(nD, Th.dtype).at[:nAc].set(y.reshape(-1))
    yh = Uf.T @ yv  # ŷ;  E[ε̂] = −ŷ
    kh, kc = Uf.T @ Kc @ Uf, Kc @ Uf  # E[ε̂ε̂] − ŷŷ, E[z_c ε̂]
    S2 = kh + jnp.outer(yh, yh)  # E[ε̂ ε̂ᵀ]
    G3 = (
        yh[:, None, None] * yh[None, :, None] * yh[None, None, :]
        + yh[:, None, None] * kh[None]
        + yh[None, :, None] * kh[:, None, :]
        + yh[None, None, :] * kh[:, :, None]
    )  # −E[ε̂ε̂ε̂]
    A, D, P, I, J = _composite_statistics(st, nL)
    W = _time_weights(lam, eta, steps)

    def propagate(src, key):
        """Σ_u [s(u) − Θ_{·A}Θ̃⁻¹(1 − M^{T−1−u}) s_A(u)] for a source src[x, *eig, *extra] weighted by W[key]."""
        w, wr = W[key]
        k = w.ndim
        shp = src.shape
        s = src.reshape(nD, w.size, -1)
        out = Pi @ jnp.einsum("bex,e->bx", s, w.reshape(-1))
        if wr is not None:
            sA = jnp.einsum("bo,bex->oex", Uf, s)
            out = out + Psi @ jnp.einsum("oex,oe->ox", sA, wr.reshape(nAc, -1))
        return out.reshape((nD,) + shp[1 + k :])

    diag = lambda T, spec: jnp.einsum(spec, T)
    # ΔNTK: z^h = −Σ G^h ΔĤ_{xp} ε̂_p (mean 0);  x^{s1} = Σ G^{s1} ΔĤ_{xo} ΔĤ_{op} ε̂_p.
    A3 = diag(_rot(A, (1, 2, 3), Uf), "xoop->xop")
    mean = propagate(-A3 * yh, "s1")
    cov_0s1 = propagate(A3[..., None] * kc.T[None, None], "s1")  # [b', c] = n E[z_c x^{s1}_{b'}]
    D13 = diag(_rot(D, (1, 3), Uf), "xpcp->xpc")
    cov_0h = -propagate(D13, "h")  # [b', c] = n E[z_c z^h_{b'}]
    A13 = _rot(A, (1, 3), Uf)  # [x, p, x', q]
    Y1 = propagate(A13 * S2[None, :, None, :], "h")  # [b, x', q]
    cov_hh = propagate(jnp.transpose(Y1, (1, 2, 0)), "h")  # [b', b] = n E[z^h_b z^h_b']

    # dNTK: (dĤ_{x a1 a} + dĤ_{a1 x a}) E2ts_{a1 a} + ½ dĤ_{x a a'} E2tt_{a a'}.
    P1 = _rot(P, (1, 2, 3), Uf)
    P2 = jnp.transpose(_rot(P, (0, 2, 3), Uf), (1, 0, 2, 3))
    P1c = _rot(P, (1, 2), Uf)  # last slot c in D
    P2c = jnp.transpose(_rot(P, (0, 2), Uf), (1, 0, 2, 3))
    for key, Pr, Prc, f in (("ts", P1 + P2, P1c + P2c, 1.0), ("tt", P1, P1c, 0.5)):
        Pp = diag(Pr, "xpqp->xpq")  # 𝒫̂_{xpq r=p}
        Pq = diag(Pr, "xpqq->xpq")
        mean = mean - f * propagate(Pp * yh[None, None, :] + yh[None, :, None] * Pq, key)
        src = Prc * S2[None, :, :, None] + Pp[..., None] * kc.T[None, None] + Pq[..., None] * kc.T[None, :, None]
        cov_0s1 = cov_0s1 + f * propagate(src, key)

    # ddNTK: −(1/n)[(𝒥'_{x··· } + 𝒥'_{·x··}) E3tsr + ½𝒮 E3tss + ½𝒥' E3ttr + ⅙ℐ E3ttt].
    Jp = I + J + jnp.transpose(J, (0, 2, 1, 3))  # 𝒥'_{b0b1b2c}
    Sm = I + jnp.transpose(I, (1, 0, 2, 3)) + 2 * J  # 𝒮_{b1b2aa'}
    Jp1 = _rot(Jp, (1, 2, 3), Uf)
    Jp2 = jnp.transpose(_rot(Jp, (0, 2, 3), Uf), (1, 0, 2, 3))
    terms = {
        "tsr": Jp1 + Jp2,
        "tss": 0.5 * _rot(Sm, (1, 2, 3), Uf),
        "ttr": 0.5 * Jp1,
        "ttt": _rot(I, (1, 2, 3), Uf) / 6.0,
    }
    Ez3 = (
        kc.T[:, None, None, :] * S2[None, :, :, None]
        + kc.T[None, :, None, :] * S2[:, None, :, None]
        + kc.T[None, None, :, :] * S2[:, :, None, None]
    )  # [p, q, r, c] = E[z_c ε̂_p ε̂_q ε̂_r]
    for key, Tm in terms.items():
        mean = mean + propagate(Tm * G3[None], key)  # −T · E[ε̂ε̂ε̂]
        cov_0s1 = cov_0s1 - propagate(Tm[..., None] * Ez3[None], key)

    cross = L0 @ (cov_0s1 + cov_0h).T  # [b, b'] = n E[(z⁰ − E z⁰)_b x_b']
    cov = cross + cross.T + cov_hh
    return mean, (cov + cov.T) / 2


def _check_nlo_args(learning_rate, steps):
    if steps is not None:
        if learning_rate is None:
            raise ValueError("learning_rate is required when steps is finite.")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer or None (converged), got {steps!r}.")
        steps = int(steps)
    if learning_rate is not None and is_concrete(learning_rate):
        lr = float(learning_rate)
        if not np.isfinite(lr) or lr <= 0:
            raise ValueError(
                f"learning_rate must be a finite number > 0 (or None for gradient flow), got {learning_rate!r}."
            )
    return steps


def _nlo_parts(st, y, learning_rate, *, nA, steps):
    """(mean0, cov0, mean1, cov1) on the test inputs from the statistics ``st`` on A ∪ B."""
    blocks = lambda K, T: (K[:nA, :nA], K[:nA, nA:], K[nA:, nA:], T[:nA, :nA], T[nA:, :nA])
    g = lambda K, T: tuple(gd_moments(*blocks(K, T), y, learning_rate, steps))
    (m0, c0), (mK, cK) = jax.jvp(g, (st.K, st.Theta), (st.K1, st.H1))
    eta = 0.0 if learning_rate is None else learning_rate
    mean1, cov1 = _nlo_coefficients(st, nA, y, eta, steps)
    nL = y.shape[1]
    eye = jnp.eye(nL, dtype=c0.dtype)
    mean1 = mK + mean1[nA * nL :].reshape(-1, nL)
    cov1 = jnp.kron(cK, eye) + cov1[nA * nL :, nA * nL :]
    return m0, jnp.kron(c0, eye), mean1, (cov1 + cov1.T) / 2


_nlo_parts_jit = jax.jit(_nlo_parts, static_argnames=("nA", "steps"))


_DENSE_TRAINED_MAX = 32  # inputs (training + test) above which nlo_trained_coefficients warns about its cost


def _warn_cost(n_train: int, n_test: int) -> None:
    N = n_train + n_test
    if N > _DENSE_TRAINED_MAX:
        warn(
            f"the O(1/n) trained moments for N_A + N_B = {n_train} + {n_test} = {N} inputs use dense tables of "
            "the NTK, dNTK and ddNTK statistics over four inputs at a time, whose time and memory grow like N⁴ "
            "(measured at depth 3 on 2 CPU cores with tanh: 3 s for 8 + 8 inputs, 60 s for 16 + 16; GELU 5x "
            "more); there is no factored form for many inputs yet. For many test inputs use "
            "eft_prob.theory.nlo_trained_marginals (the moments of each test input, cost linear in their number), "
            "or split X_test into small batches (each batch's moments are exactly that block of the joint ones), "
            "or the infinite-width order=0.",
            CostWarning,
        )


#: GiB of arrays the O(1/n) trained moments may need before they refuse to start.  On a machine
#: with more memory pass ``memory_limit_gib=`` to the functions, or set the environment variable
#: ``EFT_PROB_MEMORY_LIMIT_GIB`` (which also reaches the ``eft-prob`` command).
MEMORY_LIMIT_GIB = 8.0

_N4_STATS = 11  # four-index arrays of the recursion state: V, A, B, D, F, P, Q, R, S, T, U


def _table_doubles(n_first: int, n_rest: int, orders) -> int:
    """Doubles of the four-point tables of one layer step on n_first + n_rest inputs, a subset with
    k of the n_rest inputs getting derivative order orders[k] (ntk_stats._table_layout, counted
    without enumerating the subsets)."""
    from .ntk_stats import _basis

    total = 0
    for m in range(1, 5):
        for k in range(m + 1):
            q = orders[k] if k < len(orders) else -1
            if q >= 0:
                total += math.comb(n_first, m - k) * math.comb(n_rest, k) * len(_basis(q, 5 - m)) ** m
    return total


def _check_memory(parts: dict, limit_gib, what: str, fix: str) -> None:
    """MemoryLimitError before any work when the arrays ``parts`` ({description: bytes}), a lower bound
    on the peak memory, exceed ``limit_gib`` (None: $EFT_PROB_MEMORY_LIMIT_GIB, else
    :data:`MEMORY_LIMIT_GIB`)."""
    name, value = "memory_limit_gib", limit_gib
    if limit_gib is None:
        env = os.environ.get("EFT_PROB_MEMORY_LIMIT_GIB", "").strip()
        name, value = ("EFT_PROB_MEMORY_LIMIT_GIB", env) if env else ("MEMORY_LIMIT_GIB", MEMORY_LIMIT_GIB)
    try:
        limit = float(value)
    except (TypeError, ValueError):
        limit = math.nan
    if not limit > 0:
        raise ValueError(f"{name} must be a number > 0 (GiB), got {value!r}.")
    need = sum(parts.values())
    if need > limit * 2**30:
        detail = "; ".join(f"{k}: {v / 2**30:.3g} GiB" for k, v in parts.items())
        raise MemoryLimitError(
            f"{what} would need at least {need / 2**30:.3g} GiB of memory ({detail}), above the limit of "
            f"{limit:g} GiB ({name}). {fix} On a machine with more memory, pass memory_limit_gib= or set the "
            "environment variable EFT_PROB_MEMORY_LIMIT_GIB (also for the eft-prob command)."
        )


def _trained_statistics(spec, X_all, nA, orders=(3, 3, 2), shared=None, shift=None):
    """NTK statistics on A ∪ B, only the entries the trained moments use: a subset of inputs with k
    test inputs gets derivative order ``orders[k]`` (-1: none; see ntk_stats._table_layout).  The
    joint moments need <= 2 test indices (<= 1 for R, S, T, U): (3, 3, 2); the per-test-input
    marginals only entries whose test indices are all one input: (3, 3, -1).  ``shared``: the
    training-only tables of :func:`_training_tables` (the same for every batch of test inputs).
    ``shift``: the four-input tables by σ's addition theorem (default: ``kernels._shift_ok``)."""
    from .kernels import _shift_ok
    from .ntk_stats import _STATS, NTKStatistics, _canonical, _nodes_key, _stack, _stack_jit, _width_ratios

    nodes = _nodes_key(False)
    restrict = (nA, tuple(orders))
    kw = dict(
        derivatives=True,
        all_layers=False,
        nodes=nodes,
        restrict=restrict,
        shared=shared,
        shift=_shift_ok(spec, X_all) if shift is None else bool(shift),
    )
    ratios = _width_ratios(spec, X_all.dtype)
    if is_concrete(spec, X_all, shared):
        raw = _stack_jit(_canonical(spec), X_all, ratios, **kw)
    else:
        raw = _stack(spec, X_all, ratios, **kw)
    return NTKStatistics(**{k: raw[k] for k in _STATS}, width=spec.widths[-2])


def _training_tables(spec, X, level=3):
    """The four-point tables of the training inputs alone at every layer, computed once for all
    batches of test inputs (ntk_stats._shared_tables)."""
    from .ntk_stats import _canonical, _nodes_key, _shared_tables, _shared_tables_jit

    nodes = _nodes_key(False)
    if is_concrete(spec, X):
        return _shared_tables_jit(_canonical(spec), X, level=level, nodes=nodes)
    return _shared_tables(spec, X, level, nodes)


def _check_trained(spec, learning_rate, steps, T_AA):
    """Arguments of the O(1/n) trained moments: steps, a hidden layer, a smooth σ, η below 2/λ_max(Θ̃)."""
    from .ntk_stats import _check_activation

    steps = _check_nlo_args(learning_rate, steps)
    if spec.depth < 2:
        raise ValueError(
            "the O(1/n) trained moments need a hidden layer (spec.hidden is empty): a linear model has none."
        )
    _check_activation(spec.activation, True)
    if learning_rate is not None and is_concrete(T_AA, learning_rate):
        lam_max = float(jnp.linalg.eigvalsh(T_AA)[-1])
        if float(learning_rate) * lam_max >= 2.0:
            raise ValueError(
                f"learning_rate={float(learning_rate):.4g} is at or above the GD stability bound 2/λ_max(Θ̃) = "
                f"{2 / lam_max:.4g}: gradient descent diverges and has no trained distribution."
            )
    return steps


@float64_theory
def nlo_trained_coefficients(
    spec, X, y, X_test, learning_rate=None, steps=None, *, memory_limit_gib=None
) -> NLOTrainedCoefficients:
    """Mean and covariance of trained outputs to O(1/n), as order-0 values plus 1/n coefficients.

    Full-batch GD on L = ½Σ(z − y)² with the λ-scaled learning rates (``eft_prob.nn.learning_rates``)
    and global step ``learning_rate`` = η, for ``steps`` steps or to convergence (``steps=None``).
    At O(1/n) the converged network depends on η ("algorithm dependence" through the dNTK and
    ddNTKs); ``learning_rate=None`` (with ``steps=None``) means gradient flow, η → 0.  The order-0
    parts equal :func:`gd_moments`.  Needs a smooth activation (the dNTK/ddNTK statistics of
    :func:`eft_prob.theory.ntk_stats.ntk_statistics`).  The cost grows like (N_A + N_B)⁴: for many
    test inputs use :func:`nlo_trained_marginals`.

    ``memory_limit_gib`` (default: ``$EFT_PROB_MEMORY_LIMIT_GIB``, else :data:`MEMORY_LIMIT_GIB`, 8):
    :class:`~eft_prob.MemoryLimitError` (a ``ValueError``) is raised before any work when the
    recursion's dense state (11 arrays of (N_A + N_B)⁴) and one layer's tables alone exceed it.

    Returns
    -------
    NLOTrainedCoefficients
        ``mean0 + mean1/n``, ``cov0 + cov1/n`` (use ``.at()``); covariance over the flattened test
        event (index β·n_L + i).
    """
    from .kernels import train_test_blocks

    b = train_test_blocks(spec, X, y, X_test)
    steps = _check_trained(spec, learning_rate, steps, b.T_AA)
    nA = b.y.shape[0]
    X_all = jnp.concatenate([check_inputs(spec, X, "X"), check_inputs(spec, X_test, "X_test")])
    N = X_all.shape[0]
    _check_memory(
        {
            f"the dense state, {_N4_STATS} arrays of N⁴ = {N}⁴": 8 * _N4_STATS * N**4,
            "one layer's Gaussian tables": 8 * _table_doubles(nA, N - nA, (3, 3, 2)),
        },
        memory_limit_gib,
        f"nlo_trained_coefficients on N_A + N_B = {nA} + {N - nA} inputs",
        "For many test inputs use eft_prob.theory.nlo_trained_marginals (cost linear in N_B), or split "
        "X_test into small batches.",
    )
    _warn_cost(nA, N - nA)
    st = _trained_statistics(spec, X_all, nA)
    fn = _nlo_parts_jit if is_concrete(spec, X_all, b.y, learning_rate) else _nlo_parts
    m0, c0, m1, c1 = fn(st, b.y, learning_rate, nA=nA, steps=steps)
    return NLOTrainedCoefficients(m0, c0, m1, c1, spec.widths[-2])


def nlo_trained_moments(spec, X, y, X_test, learning_rate=None, steps=None) -> TrainedMoments:
    """Mean (N_test, n_L) and covariance (N_test·n_L, N_test·n_L) of GD-trained outputs at the
    spec's width, to O(1/n) (see :func:`nlo_trained_coefficients` for the parts and the arguments).
    """
    return nlo_trained_coefficients(spec, X, y, X_test, learning_rate, steps).at()


class TrainedMarginals(NamedTuple):
    """Per-test-input moments of trained outputs: ``mean`` (N_B, n_L) and ``cov`` (N_B, n_L, n_L),
    the covariance of the n_L outputs f(x_β) for each test input β (at O(1/n) different output
    neurons are correlated).  Covariances between different test inputs are not formed."""

    mean: jax.Array
    cov: jax.Array

    @property
    def variance(self) -> jax.Array:
        """(N_B, n_L): the marginal variance of every output."""
        return jnp.diagonal(self.cov, axis1=1, axis2=2)


class NLOTrainedMarginals(NamedTuple):
    """Per-test-input trained-output moments as mean0 + mean1/n and cov0 + cov1/n, n = ``width``.

    ``mean0``, ``mean1`` are (N_B, n_L); ``cov0``, ``cov1`` (N_B, n_L, n_L) are the diagonal blocks
    β = β' of :class:`NLOTrainedCoefficients`' ``cov0``, ``cov1`` (index β·n_L + i), equal to them
    up to rounding.
    """

    mean0: jax.Array
    cov0: jax.Array
    mean1: jax.Array
    cov1: jax.Array
    width: int

    def at(self, width: float | None = None) -> TrainedMarginals:
        """The moments at width n (default: the spec's n_{L-1}), truncated at O(1/n)."""
        n = self.width if width is None else width
        cov = self.cov0 + self.cov1 / n
        return TrainedMarginals(self.mean0 + self.mean1 / n, (cov + jnp.swapaxes(cov, 1, 2)) / 2)


_MARGINAL_FORMAT = "eft_prob.theory.nlo_trained_marginals/1"
_MARGINAL_FIELDS = ("mean0", "cov0", "mean1", "cov1")


def _diagonal_blocks(parts, nL):
    """(mean0, cov0, mean1, cov1) of one batch -> per-test-input (b, n_L) means and (b, n_L, n_L) blocks."""
    m0, c0, m1, c1 = parts
    b = m0.shape[0]
    blocks = lambda C: jnp.einsum("bibj->bij", C.reshape(b, nL, b, nL))
    return m0, blocks(c0), m1, blocks(c1)


class _MarginalCheckpoint:
    """One ``.npz`` file, rewritten atomically after every batch: the fingerprint of the arguments,
    the number of finished batches and their results."""

    def __init__(self, path, fields: dict):
        import hashlib
        import json

        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            raise ValueError(
                f"checkpoint must be a file path (an .npz file is written there), got the directory {self.path!r}."
            )
        self.fields = fields
        self.json = json.dumps(fields, sort_keys=True)
        self.digest = hashlib.sha256(self.json.encode()).hexdigest()

    def load(self, shapes: dict):
        """(finished batches, {field: array}) from the file, or (0, None) when there is none."""
        import json
        import zipfile

        if not os.path.exists(self.path):
            return 0, None
        fix = "delete it to start again"
        try:
            with np.load(self.path, allow_pickle=False) as z:
                digest, done = str(z["fingerprint"]), int(z["done"])
                stored = json.loads(str(z["arguments"]))
                arrays = {k: z[k] for k in _MARGINAL_FIELDS}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"checkpoint {self.path!r} is unreadable ({e}); {fix}.") from None
        if digest != self.digest:
            from ..ensemble import _fields_diff

            raise ValueError(
                f"checkpoint {self.path!r} belongs to a run with different arguments "
                f"({_fields_diff(stored, self.fields)}). Pass the "
                f"original arguments to resume, or a new path; {fix}."
            )
        for k, shape in shapes.items():
            if arrays[k].shape != shape or arrays[k].dtype != np.float64:
                raise ValueError(f"checkpoint {self.path!r}: {k} has the wrong shape or dtype; {fix}.")
        return done, arrays

    def save(self, done: int, arrays: dict) -> None:
        from ..ensemble import _atomic_write

        meta = {"fingerprint": np.array(self.digest), "arguments": np.array(self.json), "done": np.array(done)}
        _atomic_write(self.path, lambda f: np.savez(f, **arrays, **meta))


#: test hook, called as ``_after_batch_hook(batch_index)`` after each computed batch is stored
_after_batch_hook = None


def _marginal_fields(spec, X, y, X_test, learning_rate, steps, batch_size) -> dict:
    from ..ensemble import _array_digest

    return {
        "format": _MARGINAL_FORMAT,
        "spec": repr(spec),
        "X": _array_digest(X),
        "y": _array_digest(y),
        "X_test": _array_digest(X_test),
        "learning_rate": "gradient flow" if learning_rate is None else float(learning_rate).hex(),
        "steps": str(steps),
        "batch_size": str(batch_size),
    }


def _marginal_batch_size(batch_size, nA: int, nB: int) -> int:
    """nlo_trained_marginals' test inputs per pass: ``batch_size`` (default 32 − N_A, at least 1, and on
    a CPU backend at most max(N_A, 8)), validated and at most N_B (also how eft_prob.distributed cuts
    the batches across processes)."""
    from ..ensemble import _check_count

    if batch_size is None:
        batch_size = max(1, _DENSE_TRAINED_MAX - nA)
        if jax.default_backend() == "cpu":
            # the dense pass costs ~(N_A + batch)⁴ per batch, i.e. per test input least near batch ≈ N_A/3;
            # measured (N_A = 8, depth 10, 2 cores): 0.81 s per test input at 24, 0.67 s at 12, 0.65 s at 8
            batch_size = min(batch_size, max(nA, _CPU_MARGINAL_BATCH))
    return min(_check_count("batch_size", batch_size), nB)


_CPU_MARGINAL_BATCH = 8  # on a CPU backend the default batch is capped at max(N_A, this)


def _warn_marginal_cost(n_train: int, batch: int) -> None:
    if n_train + batch > _DENSE_TRAINED_MAX:
        warn(
            f"nlo_trained_marginals with {n_train} training inputs and batch_size={batch} makes dense passes over "
            f"{n_train + batch} inputs, whose time and memory grow like (N_A + batch_size)⁴, and each test input "
            f"costs about C(N_A, 3) = {math.comb(n_train, 3)} four-input Gaussian tables per layer (measured on 2 CPU "
            "cores with tanh: 0.38 s per test input for N_A = 8 at depth 10, growing like N_A³); there is no "
            "factored form for many training inputs yet. Use fewer training inputs, or the infinite-width order=0.",
            CostWarning,
        )


@float64_theory
def nlo_trained_marginals(
    spec,
    X,
    y,
    X_test,
    learning_rate=None,
    steps=None,
    *,
    batch_size: int | None = None,
    progress: bool = False,
    checkpoint=None,
    memory_limit_gib=None,
    devices=None,
) -> NLOTrainedMarginals:
    """Per-test-input means and covariances of trained outputs to O(1/n), for many test inputs.

    The formulas of :func:`nlo_trained_coefficients` (same arguments and conventions), restricted to
    what the moments of one test input need: statistics whose test indices are all that input.
    Test inputs are processed ``batch_size`` at a time, each batch in one dense pass over
    N_A + batch_size inputs with the entries that mix two test inputs skipped; the Gaussian tables
    of the training inputs alone (C(N_A, 4) four-input tables per layer) are computed once and
    shared by all batches.  The cost is linear in N_B (instead of the joint path's
    (N_A + N_B)⁴) and grows like N_A³ per test input, so this suits a few to ~20 training inputs
    and thousands of test inputs (benchmarks/bench_trained.py --marginals).

    Parameters
    ----------
    batch_size : int, optional
        Test inputs per dense pass (each pass is one compiled call, the last one padded).  Default:
        32 − N_A (at least 1), on a CPU backend at most max(N_A, 8): a pass's arrays and its
        compiled-in gather indices grow like (N_A + batch_size)⁴, so larger batches cost more per
        test input, not less (N_A = 8, depth 10, 2 CPU cores: 0.81 s per test input at batch_size
        24, 0.65 s at 8, and half the compilation time; one H200: 8 + 992 inputs at depth 3 in 15.5 s
        with batch_size 24, while with ``batch_size=124`` the compilation captured 17 GB of
        constants and did not finish in 140 s).
    progress : bool
        One line per batch (test inputs done, elapsed time, ETA) on stderr.
    checkpoint : str or os.PathLike, optional
        An ``.npz`` file, rewritten atomically after every batch.  A run restarted with the same
        arguments continues after the stored batches and returns the same results; a file written
        with other arguments raises ``ValueError`` (naming the arguments that differ).
    memory_limit_gib : float, optional
        Default ``$EFT_PROB_MEMORY_LIMIT_GIB``, else :data:`MEMORY_LIMIT_GIB` (8).
        :class:`~eft_prob.MemoryLimitError` (a ``ValueError``) is raised before any work when the
        training-only tables of all layers (≈ (L−1)·[256·C(N_A, 4) + 2744·C(N_A, 3)] doubles: 8 GiB
        near N_A = 50 at depth 10) plus one pass's state and tables exceed it (times the number of
        devices on a CPU host, whose simulated devices share its memory).  There is no factored form
        for many training inputs yet.
    devices : sequence of jax.Device, optional
        With several, the batches run one per device at a time (``shard_map`` over a 1-D mesh;
        each device computes whole batches, no communication; the last group padded with copies of
        its last batch), and progress and checkpoints follow each group.  The moments equal the
        one-device results up to rounding (≈ 1e-13 relative).  Default: ``jax.local_devices()`` on
        accelerators, the first device alone on a CPU host, whose simulated devices share its cores
        and memory (XLA already spreads one batch over the cores; 2 simulated devices on 2 cores
        were 1.14–1.24× faster than one at 8 + 48 and 8 + 96 inputs, depth 3, at twice the
        memory: pass them explicitly).  Only for concrete arguments: under ``jit`` the batches
        run in sequence.

    Returns
    -------
    NLOTrainedMarginals
        ``mean0 + mean1/n`` (N_B, n_L) and ``cov0 + cov1/n`` (N_B, n_L, n_L): use ``.at()``.
    """
    from .._validate import check_targets
    from .kernels import output_kernels

    X = check_inputs(spec, X, "X")
    X_test = check_inputs(spec, X_test, "X_test")
    y = check_targets(spec, y, X.shape[0])
    nA, nB, nL = X.shape[0], X_test.shape[0], y.shape[1]
    steps = _check_trained(spec, learning_rate, steps, output_kernels(spec, X)[1])
    batch_size = _marginal_batch_size(batch_size, nA, nB)
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise ValueError(f"checkpoint must be a file path or None, got {checkpoint!r}.")
    concrete = is_concrete(spec, X, y, X_test, learning_rate)
    if not concrete and (checkpoint is not None or progress):
        raise ValueError("checkpoint and progress need concrete arguments: call nlo_trained_marginals outside jit.")
    from ..ensemble import _check_devices

    if devices is None and concrete:  # simulated CPU devices share the host's cores and memory: one batch at a time
        local = jax.local_devices()
        devices = local[:1] if local[0].platform == "cpu" else local
    devices = _check_devices(devices) if concrete else None
    n_dev = len(devices) if devices is not None else 1
    host = n_dev if devices is not None and devices[0].platform == "cpu" else 1  # passes sharing one memory
    N, shared_tables = nA + batch_size, _table_doubles(nA, 0, (3,))
    passes = "one pass's" if host == 1 else f"{host} concurrent passes'"
    _check_memory(
        {
            f"the training-only tables of {spec.depth - 1} layers": 8 * (spec.depth - 1) * shared_tables,
            f"{passes} dense state, {_N4_STATS} arrays of (N_A + batch_size)⁴ = {N}⁴": host * 8 * _N4_STATS * N**4,
            f"{passes} other tables": host * 8 * (_table_doubles(nA, batch_size, (3, 3, -1)) - shared_tables),
        },
        memory_limit_gib,
        f"nlo_trained_marginals with N_A = {nA} training inputs, batch_size = {batch_size}, depth {spec.depth}",
        "The tables grow like N_A⁴ (and each test input costs about C(N_A, 3) four-input tables per layer): use "
        "fewer training inputs or a smaller batch_size; there is no factored form for many training inputs yet.",
    )
    _warn_marginal_cost(nA, batch_size)

    n_batches = -(-nB // batch_size)
    pad = n_batches * batch_size - nB
    Xp = jnp.concatenate([X_test, jnp.broadcast_to(X_test[-1:], (pad, X_test.shape[1]))]) if pad else X_test
    shapes = {"mean0": (n_batches * batch_size, nL), "cov0": (n_batches * batch_size, nL, nL)}
    shapes.update(mean1=shapes["mean0"], cov1=shapes["cov0"])
    ck, done, out = None, 0, None
    if checkpoint is not None:
        ck = _MarginalCheckpoint(checkpoint, _marginal_fields(spec, X, y, X_test, learning_rate, steps, batch_size))
        done, out = ck.load(shapes)
    if out is None and concrete:
        out = {k: np.zeros(s) for k, s in shapes.items()}
    pieces = []
    fn = _nlo_parts_jit if concrete else _nlo_parts
    bar = _BatchProgress(progress, n_batches, nB, batch_size, done, checkpoint)
    shared = _training_tables(spec, X) if done < n_batches else None  # once, not per batch
    from .kernels import _shift_ok

    shift = _shift_ok(spec, jnp.concatenate([X, X_test])) if concrete else None  # one program for every batch
    if concrete and n_dev > 1 and done < n_batches:
        program = _marginal_program(nA, nL, steps, learning_rate is None, tuple(devices), shift)
        lr = jnp.zeros((), X.dtype) if learning_rate is None else jnp.asarray(learning_rate, X.dtype)
        Xb = Xp.reshape(n_batches, batch_size, -1)
        for i in range(done, n_batches, n_dev):
            idx = np.minimum(np.arange(i, i + n_dev), n_batches - 1)  # the last group padded with copies
            res = program(Xb[idx], spec, X, y, shared, lr)  # (n_dev, batch_size, ...)
            k = min(n_dev, n_batches - i)
            for key, v in zip(_MARGINAL_FIELDS, res):
                out[key][i * batch_size : (i + k) * batch_size] = np.asarray(v)[:k].reshape(-1, *v.shape[2:])
            if ck is not None:
                ck.save(i + k, out)
            if _after_batch_hook is not None:
                _after_batch_hook(i + k - 1)
            bar.batch(i + k)
        done = n_batches
    for i in range(done, n_batches):
        sl = slice(i * batch_size, (i + 1) * batch_size)
        st = _trained_statistics(spec, jnp.concatenate([X, Xp[sl]]), nA, orders=(3, 3, -1), shared=shared, shift=shift)
        res = _diagonal_blocks(fn(st, y, learning_rate, nA=nA, steps=steps), nL)
        if not concrete:
            pieces.append(res)
            continue
        for k, v in zip(_MARGINAL_FIELDS, res):
            out[k][sl] = np.asarray(v)
        if ck is not None:
            ck.save(i + 1, out)
        if _after_batch_hook is not None:
            _after_batch_hook(i)
        bar.batch(i + 1)
    if concrete:
        res = [jnp.asarray(out[k][:nB]) for k in _MARGINAL_FIELDS]
    else:
        res = [jnp.concatenate(p)[:nB] for p in zip(*pieces)]
    return NLOTrainedMarginals(*res, spec.widths[-2])


def _marginal_program(nA: int, nL: int, steps, flow: bool, devices: tuple, shift: bool = False):
    """ensemble._map_program (jit(shard_map(vmap)) over a 1-D mesh of ``devices``, cached): (batches
    (D, batch, d), spec, X, y, shared tables, η) -> the per-test-input (mean0, cov0, mean1, cov1) of
    the D batches, (D, batch, ...), one batch per device.  The spec is an argument (a pytree: its
    widths and activation retrace, its values do not); ``shift``: kernels._shift_ok of all inputs."""
    from jax.sharding import Mesh

    from ..ensemble import _AXIS, _map_program

    def one_batch(xb, spec, X, y, shared, lr):
        st = _trained_statistics(spec, jnp.concatenate([X, xb]), nA, orders=(3, 3, -1), shared=shared, shift=shift)
        return _diagonal_blocks(_nlo_parts(st, y, None if flow else lr, nA=nA, steps=steps), nL)

    mesh = Mesh(np.asarray(devices), (_AXIS,))
    return _map_program(one_batch, mesh, 5, ("nlo_trained_marginals", nA, nL, steps, flow, shift))


class _BatchProgress:
    """One line per batch on stderr."""

    def __init__(self, enabled: bool, n_batches: int, n_test: int, batch: int, done: int, where):
        self.enabled, self.n, self.N, self.b, self.start = enabled, n_batches, n_test, batch, done
        self.t0 = time.perf_counter()
        self.first = None
        if enabled and done:
            self._emit(f"resumed from {os.fspath(where)!r}: {done}/{n_batches} batches done")

    def _emit(self, text):
        print(f"nlo_trained_marginals: {text}", file=sys.stderr, flush=True)

    def batch(self, done: int):
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.first is None:  # the first batch includes compilation: the rate starts after it
            self.first = (now, done)
        t1, d1 = self.first
        n, dt = (done - d1, now - t1) if done > d1 else (done - self.start, now - self.t0)
        eta = (self.n - done) * dt / n if n > 0 else float("inf")
        self._emit(
            f"batch {done}/{self.n}, {min(done * self.b, self.N)}/{self.N} test inputs, {now - self.t0:.1f} s elapsed, "
            f"ETA {eta:.0f} s"
        )
