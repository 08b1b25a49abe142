"""Infinite-width gradient-descent training: the distribution of trained outputs (THEORY.md §8).

At infinite width the NTK is frozen and training on the MSE loss L = ½ Σ (z − y)² is linear in
function space.  After t full-batch steps with global rate η (per-layer rates ηλ_b, ηλ_W/n_{ℓ-1}),

    z_B(t) = z_B(0) − Θ_BA Φ_t (z_A(0) − y),    Φ_t = Θ̃⁻¹ (1 − (1 − ηΘ̃)^t),

so z_B(t) is Gaussian with mean P_t y and covariance K_BB − P_t K_AB − (P_t K_AB)ᵀ + P_t K_AA P_tᵀ,
P_t = Θ_BA Φ_t (eq. 8.2 of the sheet; book §10.2).  t → ∞ gives Φ = Θ̃⁻¹ (book §10.2, "giant leap").
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._config import StabilityWarning, float64_theory, is_concrete

__all__ = ["GaussianPrediction", "gd_moments", "gd_prediction", "stability_bound"]


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
            warnings.warn(
                f"learning_rate={float(learning_rate):.4g} is at or above the GD stability bound "
                f"2/λ_max(Θ̃) = {bound:.4g}: real gradient descent diverges. Use a learning rate below "
                f"{bound:.4g}.",
                StabilityWarning,
                stacklevel=3,
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
