"""Bayesian learning at infinite width: GP regression with the NNGP kernel (THEORY.md §5.1).

With observations y = f(X) + ε, ε ~ N(0, σ_ε² 1) independently for every output neuron,

    E[f_B | y]   = K_BA (K̃ + σ_ε²)⁻¹ y,
    Cov[f_B | y] = K_BB − K_BA (K̃ + σ_ε²)⁻¹ K_AB            (the same for every output neuron),
    log p(y)     = Σ_i log N(y_i; 0, K̃ + σ_ε²).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve

from .._config import float64_theory
from .training import GaussianPrediction

__all__ = ["gp_log_evidence", "gp_moments", "gp_posterior", "log_evidence"]


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


@float64_theory
def gp_posterior(spec, X, y, X_test, noise_var) -> GaussianPrediction:
    """Infinite-width Bayesian posterior predictive of f(X_test) (see ``BayesianPosterior``)."""
    from .._validate import check_positive
    from .kernels import train_test_blocks

    check_positive("noise_var", noise_var)
    b = train_test_blocks(spec, X, y, X_test)
    return gp_moments(b.K_AA, b.K_AB, b.K_BB, b.y, noise_var)


@float64_theory
def log_evidence(spec, X, y, noise_var, *, order: int = 0) -> jax.Array:
    """log p(y | spec, noise_var): the marginal likelihood of the data under the network prior.

    Differentiable in the spec's C_b, C_W (so it can be maximized or sampled over).  ``order=1``
    (1/n corrections, book §6.2.2) arrives with the finite-width issues.
    """
    from .._validate import check_order, check_positive

    if check_order(order) == 1:
        raise NotImplementedError(
            "log_evidence(order=1) needs the four-point vertex (finite-width issue); use order=0."
        )
    from .._validate import check_inputs, check_targets
    from .kernels import nngp

    check_positive("noise_var", noise_var)
    X = check_inputs(spec, X, "X")
    y = check_targets(spec, y, X.shape[0])
    return gp_log_evidence(nngp(spec, X), y, noise_var)
