"""Distributions over network outputs as NumPyro ``Distribution`` classes.

Every class has event_shape (N, n_L) — the shape of the network's own output f(X) — and can be
used as a prior, as a likelihood (``numpyro.sample(..., obs=...)``), under ``jit``/``vmap``/``grad``,
inside NUTS and in ``Predictive``.

At infinite width (``order=0``) every output distribution of the theory is *matrix normal*:
output neurons are independent and identically distributed, with one N×N covariance Σ across
inputs, f ~ N(m, Σ ⊗ I_{n_L}).  :class:`KernelGaussian` is that law; :class:`NetworkPrior`,
:class:`BayesianPosterior` and :class:`TrainedNetwork` build (m, Σ) from an :class:`MLPSpec`.

Precision: (m, Σ) are computed in float64 (see :mod:`eft_prob._config`) and stored in the
ambient default float type.  Singular covariances (duplicated inputs, test points equal to
training points after training) get a relative jitter ``jitter × mean(diag K)`` on the diagonal
before the Cholesky factorization (default 1e-10), so ``log_prob`` stays finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.linalg import solve_triangular
from numpyro.distributions import Distribution, constraints
from numpyro.distributions.util import lazy_property, validate_sample

from ._config import precision_scope
from ._validate import check_inputs, check_order, check_positive
from .spec import MLPSpec
from .theory.bayes import gp_moments
from .theory.kernels import output_kernels as _kernels
from .theory.kernels import train_test_blocks
from .theory.training import gd_moments

__all__ = ["BayesianPosterior", "KernelGaussian", "NetworkPrior", "TrainedNetwork"]

_matrix = constraints.independent(constraints.real, 2)


def _not_yet(cls_name: str):
    return NotImplementedError(
        f"{cls_name}(order=1) is not implemented yet: the 1/n-corrected distribution needs the "
        "four-point vertex V and the NLO kernel K^{1} (the finite-width issues). Use order=0 for "
        "the infinite-width (Gaussian) distribution."
    )


class KernelGaussian(Distribution):
    """Matrix-normal outputs f ~ N(loc, Σ ⊗ I_{n_L}), Σ = scale_tril scale_trilᵀ.

    :param loc: mean, shape batch + (N, n_L).
    :param scale_tril: lower Cholesky factor of the N×N input covariance Σ, batch + (N, N).

    The flattened ``covariance_matrix`` uses the row-major order of the event: index α·n_L + i for
    input α and output neuron i.
    """

    arg_constraints = {"loc": _matrix, "scale_tril": constraints.lower_cholesky}
    support = _matrix
    reparametrized_params = ["loc", "scale_tril"]
    pytree_data_fields = ("loc", "scale_tril")
    pytree_aux_fields = ("order",)
    order = 0

    def __init__(self, loc, scale_tril, *, validate_args=None):
        loc, scale_tril = jnp.asarray(loc), jnp.asarray(scale_tril)
        if loc.ndim < 2 or scale_tril.ndim < 2:
            raise ValueError(
                f"loc must be (..., N, n_L) and scale_tril (..., N, N); got {loc.shape} and {scale_tril.shape}."
            )
        if scale_tril.shape[-2:] != (loc.shape[-2], loc.shape[-2]):
            raise ValueError(
                f"scale_tril must be (..., N, N) with N = loc.shape[-2] = {loc.shape[-2]}, got {scale_tril.shape}."
            )
        batch_shape = lax.broadcast_shapes(loc.shape[:-2], scale_tril.shape[:-2])
        event_shape = loc.shape[-2:]
        self.loc = jnp.broadcast_to(loc, batch_shape + event_shape)
        self.scale_tril = jnp.broadcast_to(scale_tril, batch_shape + scale_tril.shape[-2:])
        super().__init__(batch_shape=batch_shape, event_shape=event_shape, validate_args=validate_args)

    @classmethod
    def from_moments(cls, mean, cov, *, jitter: float = 1e-10, scale=None, validate_args=None):
        """Build from a mean (…, N, n_L) and an input covariance Σ (…, N, N)."""
        return KernelGaussian(mean, _cholesky(cov, jitter, scale), validate_args=validate_args)

    # -- sampling and density -------------------------------------------------------------
    def sample(self, key, sample_shape=()):
        shape = sample_shape + self.batch_shape + self.event_shape
        eps = jax.random.normal(key, shape, dtype=self.loc.dtype)
        return self.loc + jnp.matmul(self.scale_tril, eps)

    @validate_sample
    def log_prob(self, value):
        diff = value - self.loc
        batch = diff.shape[:-2]
        L = jnp.broadcast_to(self.scale_tril, batch + self.scale_tril.shape[-2:])
        w = solve_triangular(L, diff, lower=True)
        N, nL = self.event_shape
        half_logdet = jnp.sum(jnp.log(jnp.diagonal(self.scale_tril, axis1=-2, axis2=-1)), -1)
        return -0.5 * jnp.sum(w * w, axis=(-2, -1)) - nL * half_logdet - 0.5 * N * nL * jnp.log(2 * jnp.pi)

    def entropy(self):
        N, nL = self.event_shape
        half_logdet = jnp.sum(jnp.log(jnp.diagonal(self.scale_tril, axis1=-2, axis2=-1)), -1)
        return 0.5 * N * nL * (1.0 + jnp.log(2 * jnp.pi)) + nL * half_logdet

    # -- moments ----------------------------------------------------------------------------
    @property
    def mean(self):
        return self.loc

    @lazy_property
    def input_covariance(self):
        """Σ (…, N, N): the covariance across inputs shared by every output neuron."""
        return jnp.matmul(self.scale_tril, jnp.swapaxes(self.scale_tril, -1, -2))

    @property
    def variance(self):
        d = jnp.diagonal(self.input_covariance, axis1=-2, axis2=-1)[..., None]
        return jnp.broadcast_to(d, self.batch_shape + self.event_shape)

    @lazy_property
    def covariance_matrix(self):
        """Covariance of the flattened event (…, N·n_L, N·n_L), index α·n_L + i."""
        N, nL = self.event_shape
        S = self.input_covariance
        eye = jnp.eye(nL, dtype=S.dtype)
        full = S[..., :, None, :, None] * eye[:, None, :]
        return full.reshape(self.batch_shape + (N * nL, N * nL))

    @staticmethod
    def infer_shapes(loc, scale_tril):
        batch_shape = lax.broadcast_shapes(tuple(loc[:-2]), tuple(scale_tril[:-2]))
        return batch_shape, tuple(loc[-2:])


def _cholesky(cov, jitter, scale=None):
    cov = (cov + jnp.swapaxes(cov, -1, -2)) / 2
    N = cov.shape[-1]
    if scale is None:
        scale = jnp.mean(jnp.diagonal(cov, axis1=-2, axis2=-1), -1)[..., None, None]
    return jnp.linalg.cholesky(cov + jitter * scale * jnp.eye(N, dtype=cov.dtype))


def _ambient(*arrays):
    dtype = jnp.result_type(float)
    return tuple(jnp.asarray(a).astype(dtype) for a in arrays)


class NetworkPrior(KernelGaussian):
    """p(f(X)) at initialization for a network drawn from ``spec``'s prior.

    ``order=0``: the Gaussian (infinite-width) limit, f ~ N(0, K^(L) ⊗ I_{n_L}).

    :param MLPSpec spec: the architecture and prior (C_b, C_W may be traced, e.g. NUTS over them).
    :param X: inputs (N, input_dim).
    :param int order: 0 (Gaussian limit); 1 (1/n corrections) with the finite-width issue.
    :param noise_var: optional observation-noise variance σ² >= 0: the law of y = f(X) + ε,
        ε ~ N(0, σ²) per output, i.e. N(0, (K + σ²) ⊗ I).  As a likelihood this is the evidence
        of Bayesian learning, so NUTS can infer (C_b, C_W, σ²) from data.
    :param float jitter: relative diagonal jitter for singular kernels.
    """

    def __init__(self, spec: MLPSpec, X, order: int = 0, *, noise_var=0.0, jitter: float = 1e-10, validate_args=None):
        if check_order(order) == 1:
            raise _not_yet(type(self).__name__)
        check_positive("noise_var", noise_var, strict=False)
        with precision_scope(spec, X, noise_var):
            X = check_inputs(spec, X)
            K = _kernels(spec, X).nngp
            loc = jnp.zeros((X.shape[0], spec.output_dim), K.dtype)
            cov = K + noise_var * jnp.eye(K.shape[0], dtype=K.dtype)
            tril = _cholesky(cov, jitter, jnp.mean(jnp.diagonal(K)))
        loc, tril = _ambient(loc, tril)
        self.order = 0
        super().__init__(loc, tril, validate_args=validate_args)


class BayesianPosterior(KernelGaussian):
    """Posterior predictive p(f(X_test) | y) of Bayesian learning with the network prior.

    Observations y = f(X) + ε with ε ~ N(0, noise_var) per output neuron.  ``order=0`` is GP
    regression with the NNGP kernel (THEORY.md §5.1).  ``include_noise=True`` gives the predictive
    of new noisy observations y(X_test) instead of f(X_test).
    """

    def __init__(
        self,
        spec: MLPSpec,
        X,
        y,
        X_test,
        noise_var,
        order: int = 0,
        *,
        include_noise: bool = False,
        jitter: float = 1e-10,
        validate_args=None,
    ):
        if check_order(order) == 1:
            raise _not_yet(type(self).__name__)
        check_positive("noise_var", noise_var)
        with precision_scope(spec, X, y, X_test, noise_var):
            b = train_test_blocks(spec, X, y, X_test)
            m, S = gp_moments(b.K_AA, b.K_AB, b.K_BB, b.y, noise_var)
            if include_noise:
                S = S + noise_var * jnp.eye(S.shape[0], dtype=S.dtype)
            tril = _cholesky(S, jitter, jnp.mean(jnp.diagonal(b.K_BB)))
        loc, tril = _ambient(m, tril)
        self.order = 0
        super().__init__(loc, tril, validate_args=validate_args)


class TrainedNetwork(KernelGaussian):
    """p(f*(X_test)): outputs of networks drawn from the prior and trained by full-batch GD.

    Training minimizes ½ Σ_α (f(x_α) − y_α)² on (X, y) with global learning rate η and the NTK
    per-layer rates (η λ_b, η λ_W/n_{ℓ-1}); ``steps`` is the number of discrete GD steps, ``None``
    meaning trained to convergence.  ``order=0`` is the infinite-width (frozen-NTK, linear-model)
    distribution of THEORY.md §8.2–8.3.  A learning rate above the stability bound 2/λ_max(Θ̃)
    triggers a :class:`~eft_prob.StabilityWarning`.
    """

    def __init__(
        self,
        spec: MLPSpec,
        X,
        y,
        X_test,
        learning_rate=None,
        steps: int | None = None,
        order: int = 0,
        *,
        jitter: float = 1e-10,
        validate_args=None,
    ):
        if check_order(order) == 1:
            raise _not_yet(type(self).__name__)
        if learning_rate is not None:
            check_positive("learning_rate", learning_rate)
        with precision_scope(spec, X, y, X_test, learning_rate):
            b = train_test_blocks(spec, X, y, X_test)
            m, S = gd_moments(b.K_AA, b.K_AB, b.K_BB, b.T_AA, b.T_BA, b.y, learning_rate, steps)
            tril = _cholesky(S, jitter, jnp.mean(jnp.diagonal(b.K_BB)))
        loc, tril = _ambient(m, tril)
        self.order = 0
        super().__init__(loc, tril, validate_args=validate_args)
