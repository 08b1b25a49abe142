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
import numpy as np
from jax import lax
from jax.scipy.linalg import solve_triangular
from numpyro.distributions import Distribution, constraints
from numpyro.distributions.util import lazy_property, validate_sample

from ._config import ApproximationWarning, RegimeWarning, is_concrete, precision_scope, warn
from ._moments import SharedInputCovariance, flat_covariance, neuron_fourth_cumulant
from ._validate import check_inputs, check_order, check_positive
from .spec import MLPSpec
from .theory.bayes import gp_moments
from .theory.kernels import output_kernels as _kernels
from .theory.kernels import train_test_blocks
from .theory.training import gd_moments

__all__ = [
    "BayesianPosterior",
    "CoupledGaussian",
    "FiniteWidthPosterior",
    "FiniteWidthPrior",
    "FiniteWidthTrained",
    "KernelGaussian",
    "KernelMixture",
    "MatrixNormalMixture",
    "MomentMatchedPosterior",
    "NetworkPrior",
    "TrainedNetwork",
]

_matrix = constraints.independent(constraints.real, 2)


class KernelGaussian(SharedInputCovariance, Distribution):
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


def _order_one(cls, base, args, kwargs, position, make):
    """``base(..., order=1)``: the finite-width object ``make(*args[:position], **other kwargs)``;
    None otherwise (order 0, a subclass, or a call without arguments — pytree unflattening)."""
    order = kwargs.get("order", args[position] if len(args) > position else 0)
    if cls is base and (args or kwargs) and check_order(order) == 1:
        return make(*args[:position], **{k: v for k, v in kwargs.items() if k != "order"})
    return None


class NetworkPrior(KernelGaussian):
    """p(f(X)) at initialization for a network drawn from ``spec``'s prior.

    ``order=0``: the Gaussian (infinite-width) limit, f ~ N(0, K^(L) ⊗ I_{n_L}).
    ``order=1``: the O(1/n) law, returned as a :class:`FiniteWidthPrior` (a proper mixture over the
    random kernel with the theory's second and fourth cumulants; keyword arguments ``samples`` and
    ``key`` select the Monte Carlo vertex for more than 24 inputs).
    ``order="exact"``: the exact finite-width law where it exists (scale-invariant σ, zero biases
    after layer 1, one input — or a linear network with one output), an
    :class:`eft_prob.exact.ExactNetworkPrior`.

    :param MLPSpec spec: the architecture and prior (C_b, C_W may be traced, e.g. NUTS over them).
    :param X: inputs (N, input_dim).
    :param order: 0 (Gaussian limit), 1 (with the 1/n corrections) or "exact".
    :param noise_var: optional observation-noise variance σ² >= 0: the law of y = f(X) + ε,
        ε ~ N(0, σ²) per output, i.e. N(0, (K + σ²) ⊗ I).  As a likelihood this is the evidence
        of Bayesian learning, so NUTS can infer (C_b, C_W, σ²) from data.
    :param float jitter: relative diagonal jitter for singular kernels.
    """

    def __new__(cls, *args, **kwargs):
        # NetworkPrior(spec, X, order=1) is a FiniteWidthPrior (a mixture, not a single Gaussian).
        # Called without arguments (pytree unflattening) it is a plain NetworkPrior.
        order = kwargs.get("order", args[2] if len(args) > 2 else 0)
        if cls is NetworkPrior and (args or kwargs):
            rest = {k: v for k, v in kwargs.items() if k != "order"}
            if isinstance(order, str) and order == "exact":
                from .exact import ExactNetworkPrior

                return ExactNetworkPrior(*args[:2], **rest)
            if check_order(order) == 1:
                return FiniteWidthPrior(*args[:2], **rest)
        return super().__new__(cls)

    def __init__(self, spec: MLPSpec, X, order: int = 0, *, noise_var=0.0, jitter: float = 1e-10, validate_args=None):
        check_order(order)
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

    Observations y = f(X) + ε with ε ~ N(0, noise_var) per output neuron (noise_var > 0).
    ``include_noise=True`` gives the predictive of new noisy observations y(X_test) instead of f(X_test).

    ``order=0``: GP regression with the NNGP kernel (THEORY.md §5.1), a :class:`KernelGaussian`.
    ``order=1``: the O(1/n) posterior (book §6.4, THEORY.md §5.2), returned as

    * a :class:`MomentMatchedPosterior` (default, ``form="gaussian"``): the Gaussian with the O(1/n)
      mean and neuron-coupled covariance of :func:`eft_prob.theory.bayes.nlo_posterior_moments`
      (the posterior's own O(1/n) fourth cumulant is dropped);
    * a :class:`FiniteWidthPosterior` (``form="mixture"``, at most 64 distinct inputs in
      X ∪ X_test): the exact Bayes update of the O(1/n) prior mixture (:class:`FiniteWidthPrior`):
      a mixture of GP posteriors, one per kernel point G_m, weighted by their evidences.  Its
      moments equal §5.2 up to O(1/n²) only while the data reweight the kernel points mildly; when
      the likelihood is sharp (small noise, many points, small width) the discrete prior law is
      resolved point by point and the moments can be off at O(1/n) (measured against NUTS), which
      an :class:`~eft_prob.ApproximationWarning` reports (effective number of points < 50%).

    Keyword arguments for ``order=1``: ``form``, ``samples`` and ``key`` (Monte Carlo factored vertex
    above 24 inputs, see :func:`eft_prob.theory.prior_statistics`).
    """

    def __new__(cls, *args, **kwargs):
        # BayesianPosterior(..., order=1) is a MomentMatchedPosterior or a FiniteWidthPosterior.
        return _order_one(cls, BayesianPosterior, args, kwargs, 5, _finite_width_posterior) or super().__new__(cls)

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
        from .theory.bayes import _check_noise

        check_order(order)
        _check_noise(noise_var, X, X_test)
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

    ``order=1`` returns a :class:`FiniteWidthTrained`: the Gaussian with the O(1/n) mean and
    covariance of the trained outputs (:func:`eft_prob.theory.training.nlo_trained_moments`),
    which couple the output neurons; it needs a smooth activation (the dNTK and ddNTK statistics).
    """

    def __new__(cls, *args, **kwargs):
        # TrainedNetwork(..., order=1) is a FiniteWidthTrained (neuron-coupled covariance).
        return _order_one(cls, TrainedNetwork, args, kwargs, 6, FiniteWidthTrained) or super().__new__(cls)

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
        check_order(order)
        if learning_rate is not None:
            check_positive("learning_rate", learning_rate)
        with precision_scope(spec, X, y, X_test, learning_rate):
            b = train_test_blocks(spec, X, y, X_test)
            m, S = gd_moments(b.K_AA, b.K_AB, b.K_BB, b.T_AA, b.T_BA, b.y, learning_rate, steps)
            tril = _cholesky(S, jitter, jnp.mean(jnp.diagonal(b.K_BB)))
        loc, tril = _ambient(m, tril)
        self.order = 0
        super().__init__(loc, tril, validate_args=validate_args)


# --------------------------------------------------------------------------------------------
# Finite width: mixtures over the random kernel.


def _matrix_normal_mixture_log_prob(diff, scale_trils, log_weights):
    """log Σ_k π_k N(diff_k; 0, Σ_k ⊗ I_{n_L}) with diff (…, C or 1, N, n_L), Σ_k = L_k L_kᵀ (…, C, N, N)."""
    batch = lax.broadcast_shapes(diff.shape[:-3], scale_trils.shape[:-3])
    C, (N, nL) = scale_trils.shape[-3], diff.shape[-2:]
    L = jnp.broadcast_to(scale_trils, batch + scale_trils.shape[-3:])
    w = solve_triangular(L, jnp.broadcast_to(diff, batch + (C, N, nL)), lower=True)
    half_logdet = jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)), -1)
    comp = -0.5 * jnp.sum(w * w, axis=(-2, -1)) - nL * half_logdet - 0.5 * N * nL * jnp.log(2 * jnp.pi)
    return jax.nn.logsumexp(comp + log_weights, axis=-1)


class _MatrixNormalMixtureBase(Distribution):
    """Shared machinery of the two mixtures of matrix normals below: C components with Cholesky
    factors ``scale_trils`` (…, C, N, N) and ``logits`` (…, C), event (N, n_L)."""

    def _init_mixture(self, name, means, mean_ndim, scale_trils, logits, validate_args):
        """Broadcast ``means`` (batch + mean_ndim dims, the last two (N, n_L)), scale_trils and
        logits to one batch shape, store them (the means as ``name``) and initialize the Distribution."""
        batch_shape = lax.broadcast_shapes(means.shape[:-mean_ndim], scale_trils.shape[:-3], logits.shape[:-1])
        setattr(self, name, jnp.broadcast_to(means, batch_shape + means.shape[-mean_ndim:]))
        self.scale_trils = jnp.broadcast_to(scale_trils, batch_shape + scale_trils.shape[-3:])
        self.logits = jnp.broadcast_to(logits, batch_shape + logits.shape[-1:])
        super().__init__(batch_shape=batch_shape, event_shape=means.shape[-2:], validate_args=validate_args)

    @property
    def log_weights(self):
        return jax.nn.log_softmax(self.logits, axis=-1)

    @property
    def n_components(self) -> int:
        return self.logits.shape[-1]

    def _draw(self, key, sample_shape, dtype, *stacks):
        """Standard normal noise of the event's shape (``dtype``) and, for a component drawn per sample,
        each (…, C, a, b) stack's entry (shape sample_shape + batch_shape + (a, b))."""
        k1, k2 = jax.random.split(key)
        shape = sample_shape + self.batch_shape
        comp = jax.random.categorical(k1, self.logits, shape=shape)
        idx = comp[..., None, None, None]
        picked = tuple(
            jnp.take_along_axis(jnp.broadcast_to(x, shape + x.shape[-3:]), idx, -3)[..., 0, :, :] for x in stacks
        )
        return jax.random.normal(k2, shape + self.event_shape, dtype=dtype), picked


class KernelMixture(SharedInputCovariance, _MatrixNormalMixtureBase):
    """f ~ Σ_k π_k N(loc, G_k ⊗ I_{n_L}): a finite mixture of matrix normals sharing the mean.

    At any width a network's output is exactly Gaussian *given* the random kernel Ĝ of its last
    layer (z_i | Ĝ ~ N(0, Ĝ), i.i.d. over output neurons i); a distribution over Ĝ with the right
    mean and covariance therefore gives the right second and fourth cumulants of f, including
    the dependence between output neurons.  This class is that law for a discrete law of Ĝ.

    :param loc: mean, batch + (N, n_L).
    :param scale_trils: Cholesky factors of the component kernels, batch + (C, N, N).
    :param logits: log mixture weights (normalized internally), batch + (C,).
    """

    arg_constraints = {
        "loc": _matrix,
        "scale_trils": constraints.independent(constraints.lower_cholesky, 1),
        "logits": constraints.real_vector,
    }
    support = _matrix
    pytree_data_fields = ("loc", "scale_trils", "logits")
    pytree_aux_fields = ("order",)
    order = 1

    def __init__(self, loc, scale_trils, logits, *, validate_args=None):
        loc, scale_trils, logits = jnp.asarray(loc), jnp.asarray(scale_trils), jnp.asarray(logits)
        if loc.ndim < 2 or scale_trils.ndim < 3 or logits.ndim < 1:
            raise ValueError(
                "KernelMixture needs loc (..., N, n_L), scale_trils (..., C, N, N) and logits (..., C); got "
                f"{loc.shape}, {scale_trils.shape}, {logits.shape}."
            )
        N = loc.shape[-2]
        if scale_trils.shape[-2:] != (N, N) or scale_trils.shape[-3] != logits.shape[-1]:
            raise ValueError(
                f"scale_trils must be (..., C, {N}, {N}) and logits (..., C) with the same C; got "
                f"{scale_trils.shape} and {logits.shape}."
            )
        self._init_mixture("loc", loc, 2, scale_trils, logits, validate_args)

    def sample(self, key, sample_shape=()):
        eps, (L,) = self._draw(key, sample_shape, self.loc.dtype, self.scale_trils)
        return self.loc + jnp.matmul(L, eps)

    @validate_sample
    def log_prob(self, value):
        diff = (value - self.loc)[..., None, :, :]  # batch' + (1, N, n_L): one mean for every component
        return _matrix_normal_mixture_log_prob(diff, self.scale_trils, self.log_weights)

    # -- moments ----------------------------------------------------------------------------
    @property
    def mean(self):
        return self.loc

    @lazy_property
    def component_kernels(self):
        """G_k (…, C, N, N)."""
        return jnp.matmul(self.scale_trils, jnp.swapaxes(self.scale_trils, -1, -2))

    @lazy_property
    def input_covariance(self):
        """E[G] (…, N, N): the covariance across inputs of every output neuron."""
        p = jnp.exp(self.log_weights)
        return jnp.einsum("...k,...kab->...ab", p, self.component_kernels)

    @lazy_property
    def kernel_covariance(self):
        """Cov(G) (…, N, N, N, N): Cov(G_ab, G_cd); for the 1/n prior this is V/n_{L-1}."""
        p = jnp.exp(self.log_weights)
        dG = self.component_kernels - self.input_covariance[..., None, :, :]
        return jnp.einsum("...k,...kab,...kcd->...abcd", p, dG, dG)

    def fourth_cumulant(self):
        """κ4 of the flattened event (…, M, M, M, M), M = N·n_L, index α·n_L + i:
        κ[(α1 i1)(α2 i2)(α3 i3)(α4 i4)] = δ_{i1i2}δ_{i3i4} C_{α1α2α3α4} + δ_{i1i3}δ_{i2i4} C_{α1α3α2α4}
        + δ_{i1i4}δ_{i2i3} C_{α1α4α2α3}, C = Cov(G) (:attr:`kernel_covariance`).  M⁴ numbers: small events only."""
        return neuron_fourth_cumulant(self.kernel_covariance, self.event_shape, self.batch_shape)


def _pair_coordinates(N):
    i, j = np.triu_indices(N)
    return i, j, np.where(i == j, 1.0, np.sqrt(2.0))


def _psd_part(M):
    """The nearest PSD matrix in value, the identity in derivative (the clipped part is rounding
    or quadrature error; keeping eigh out of the gradient avoids NaNs at degenerate eigenvalues)."""
    Ms = lax.stop_gradient(M)
    lam, U = jnp.linalg.eigh(Ms)
    fixed = (U * jnp.clip(lam, 0.0)) @ U.T
    return M + lax.stop_gradient(fixed - Ms)


def _pack(S, i, j, w):
    """Symmetric matrices (..., N, N) -> pair coordinates (..., P) (Frobenius = Euclidean)."""
    return S[..., i, j] * w


def _unpack(v, i, j, w, N):
    cols = v / w
    out = jnp.zeros(v.shape[:-1] + (N, N), v.dtype)
    return out.at[..., i, j].set(cols).at[..., j, i].set(cols)


def _modes(X, i, j, w, N):
    """Unit symmetric matrices F̂_k (P, N, N) and variances λ_k (P,) with Σ λ_k F̂_k⊗F̂_k = X (pair
    coordinates): the columns of the Cholesky factor of X, a smooth function of X (eigenvectors
    would not be differentiable at degenerate eigenvalues).  Coordinates are ordered by decreasing
    variance first, so the leading columns carry the dominant fluctuations."""
    P = X.shape[0]
    Xp = _psd_part((X + X.T) / 2)
    scale = jnp.maximum(jnp.trace(Xp) / P, jnp.finfo(Xp.dtype).tiny)
    Lc = jnp.linalg.cholesky(Xp + 1e-13 * scale * jnp.eye(P, dtype=Xp.dtype))
    F = _unpack(Lc.T, i, j, w, N)
    lam = jnp.sum(F * F, axis=(-2, -1))
    return F / jnp.sqrt(lam)[:, None, None], lam


def _sigma_point_kernels(Kbar, Vpair, N, iterations: int = 40):
    """A discrete law of positive-definite kernels G_k with E[G] = K̄ exactly and Cov(G) = V/n.

    Whitened by K̄ = L Lᵀ, the target is a random matrix A with E[A] = I and covariance Ṽ (V/n
    transformed by L⁻¹).  With Ṽ = Σ_k λ_k F̂_k⊗F̂_k (P = N(N+1)/2 modes), its law is put on the 2M
    equally likely points A_m = expm(H_0 + Σ_k c_mk √λ_k F̂_k), c = ± the columns 2..P+1 of a
    Sylvester–Hadamard matrix of order M > P (orthogonal ±1 columns, so the linear part has mean 0
    and covariance exactly Ṽ, and all its odd moments vanish), and H_0 = -½ Σ λ_k F̂_k² cancels the
    mean of the quadratic term.  Spreading each point over all modes keeps every direction's
    excursion at its own standard deviation.  The matrix exponential makes every point positive
    definite whatever the size of the fluctuations.  The points are then re-whitened by their exact mean (E[G] = K̄ to
    rounding), and the O(Σλ) mismatch of the covariance is removed by a fixed-point iteration on
    the modes (``iterations`` rounds, each shrinking the mismatch by a factor ~2ε, ε the expansion
    parameter; the relative residual is returned in ``info``: <1e-8 in the 1/n regime, larger when
    V/n is not small against K̄, where the 1/n expansion itself fails).
    """
    i, j, w = _pair_coordinates(N)
    w = jnp.asarray(w, Kbar.dtype)
    L = jnp.linalg.cholesky(Kbar)
    eye = jnp.eye(N, dtype=Kbar.dtype)
    Li = solve_triangular(L, eye, lower=True)
    basis = _unpack(jnp.eye(i.size, dtype=Kbar.dtype), i, j, w, N)  # (P, N, N)
    Tw = _pack(Li @ basis @ Li.T, i, j, w).T  # pair-coordinate matrix of S -> L⁻¹ S L⁻ᵀ
    target = Tw @ ((Vpair + Vpair.T) / 2) @ Tw.T
    ident = _pack(eye, i, j, w)

    P = i.size
    M = 1 << int(np.ceil(np.log2(P + 1)))
    had = np.ones((1, 1))
    while had.shape[0] < M:  # Sylvester's construction
        had = np.block([[had, had], [had, -had]])
    design = jnp.asarray(np.concatenate([had[:, 1 : P + 1], -had[:, 1 : P + 1]]), Kbar.dtype)  # (2M, P)

    def points(X):
        Fh, lam = _modes(X, i, j, w, N)
        H0 = -0.5 * jnp.einsum("k,kab,kbc->ac", lam, Fh, Fh)
        H = H0 + jnp.einsum("mk,kab->mab", design * jnp.sqrt(lam), Fh)
        A = jax.vmap(jax.scipy.linalg.expm)(H)
        p = jnp.full((design.shape[0],), 1.0 / design.shape[0], X.dtype)
        Lm = jnp.linalg.cholesky(jnp.einsum("k,kab->ab", p, A))
        Lmi = solve_triangular(Lm, eye, lower=True)
        B = Lmi @ A @ Lmi.T
        b = _pack((B + jnp.swapaxes(B, -1, -2)) / 2, i, j, w) - ident
        return B, p, jnp.einsum("k,kp,kq->pq", p, b, b)

    X = lax.fori_loop(0, iterations, lambda _, X: X + (target - points(X)[2]), target)
    B, p, C = points(X)
    kernels = L @ B @ L.T
    kernels = (kernels + jnp.swapaxes(kernels, -1, -2)) / 2
    residual = jnp.max(jnp.abs(C - target)) / jnp.maximum(jnp.max(jnp.abs(target)), jnp.finfo(X.dtype).tiny)
    return kernels, jnp.log(p), {"residual": residual}


def _check_mixture_built(Kbar, residual, who):
    """A clear error where the sigma-point construction broke down (NaN) on a near-singular K̄."""
    if np.isfinite(float(residual)):
        return
    lam = np.linalg.eigvalsh(np.asarray(Kbar, np.float64))
    raise ValueError(
        f"{who}: the O(1/n) kernel mixture cannot be built on these inputs: the kernel K + K1/n is "
        f"numerically near-singular (eigenvalues from {lam[-1]:.3g} down to {lam[0]:.3g}), and whitened by it "
        "the vertex V/n, accurate to ~1e-10 relative, is dominated by its numerical error in the near-null "
        "directions. Use fewer or more widely spaced inputs (smooth kernels on 1-D inputs are numerically "
        "low-rank), C_b > 0 for odd activations, or the moment-level O(1/n) results "
        "(eft_prob.theory.prior_statistics; BayesianPosterior(..., order=1, form='gaussian'))."
    )


class FiniteWidthPrior(KernelMixture):
    """p(f(X)) at initialization to O(1/n): ``NetworkPrior(spec, X, order=1)`` returns this.

    Construction (THEORY.md §3.3–3.6; DESIGN.md): given the last hidden layer, f is exactly
    N(0, Ĝ ⊗ I_{n_L}) with Ĝ the random kernel; to O(1/n), E Ĝ = K̄ = K + K^{1}/n_{L-1} and
    Cov(Ĝ) = V/n_{L-1}.  Ĝ is replaced by a discrete law on 2P positive-definite kernels
    (P = N(N+1)/2; see :func:`_sigma_point_kernels`) with mean K̄ and covariance V/n_{L-1}, so

    * the second cumulant is K̄ ⊗ I and the fourth is (1/n_{L-1})(V δδ + 2 permutations)
      (``fourth_cumulant()``; ``kernel_covariance`` = V/n to the reported ``residual``),
      including the O(1/n) dependence between different output neurons;
    * odd cumulants vanish; the sixth and higher are O(1/n²) (the points sit O(1/√n) from K̄);
    * log_prob is a logsumexp of 2P Gaussians: normalized, positive everywhere, smooth in the
      value and in (C_b, C_W, X), jit/vmap/grad-safe; ``sample`` picks a point and draws a Gaussian.

    Unlike the Edgeworth density p⁰(1 + κh/24) (negative in the tails) or the quartic action e^{-S}
    (not normalizable when V > 0), this is a proper density, usable as a likelihood under NUTS.

    Attributes: ``kernel`` (K), ``nlo_kernel`` (K^{1}/n_{L-1}), ``vertex`` (V/n_{L-1}, (N,)*4; None
    for N > 24), ``regime`` (:class:`eft_prob.criticality.Regime`; None when traced), ``residual``
    (relative mismatch of the represented Cov(Ĝ); ~1e-10 in the 1/n regime).  Constructing one
    outside the 1/n regime (expansion parameter above ``criticality.REGIME_THRESHOLD``) warns.

    V is exact (dense quadrature) for N <= 24 inputs and a Monte Carlo factorization with
    ``samples`` draws per layer (relative error ≈ √(2/samples)) for 24 < N <= 64.
    """

    pytree_data_fields = ("kernel", "nlo_kernel", "vertex", "residual")
    MAX_INPUTS = 64

    def __init__(
        self,
        spec: MLPSpec,
        X,
        *,
        noise_var=0.0,
        jitter: float = 1e-10,
        samples: int = 4096,
        key=None,
        validate_args=None,
    ):
        from .criticality import check_regime
        from .theory.vertex import prior_statistics

        check_positive("noise_var", noise_var, strict=False)
        X = check_inputs(spec, X)
        N = X.shape[0]
        if N > self.MAX_INPUTS:
            raise ValueError(
                f"NetworkPrior(order=1) supports up to {self.MAX_INPUTS} inputs (its mixture has N(N+1) "
                f"Gaussian components); got N = {N}. Use eft_prob.theory.prior_statistics(spec, X) for the "
                "factored O(1/n) statistics of many inputs, or order=0."
            )
        if spec.depth < 2:
            raise ValueError("order=1 needs at least one hidden layer (hidden=[...]); a depth-1 network is Gaussian.")
        if is_concrete(spec, X):
            _check_distinct(X)
        with precision_scope(spec, X, noise_var):
            X = jnp.asarray(X, jnp.result_type(float))
            # compiled programs shared by every width, also under eager jax.grad / vmap
            st = prior_statistics(spec, X, samples=samples, key=key)
            self.regime = check_regime(spec, X, "NetworkPrior(order=1)", statistics=st)  # ε from st's exact V
            K1n, Kbar, Vn, trils, logw, info = _prior_mixture_jit(st.K, st.K1, st.V, st.width, noise_var, jitter)
            loc = jnp.zeros((N, spec.output_dim), Kbar.dtype)
        if is_concrete(spec, X):
            _check_kernel(Kbar, spec.hidden[-1])
            _check_mixture_built(Kbar, info["residual"], "NetworkPrior(order=1)")
        if is_concrete(spec, X) and float(info["residual"]) > 1e-3:
            warn(
                "NetworkPrior(order=1): the O(1/n) kernel fluctuations V/n are so large against K that no "
                "law of positive-definite kernels found here carries them exactly (relative covariance "
                f"residual {float(info['residual']):.3g}). The 1/n expansion is not valid here: use wider "
                "layers, fewer layers, or order='exact' where it exists.",
                RegimeWarning,
            )
        self.kernel, self.nlo_kernel = _ambient(st.K, K1n)
        self.vertex = None if Vn is None else _ambient(Vn)[0]
        self.residual = info["residual"]
        loc, trils, logw = _ambient(loc, trils, logw)
        super().__init__(loc, trils, logw, validate_args=validate_args)


def _prior_mixture(K, K1, V, n, noise_var, jitter):
    """The numbers of :class:`FiniteWidthPrior` from the prior statistics K, K^{1}, V and n = n_{L-1}:
    K^{1}/n, K̄, V/n (None above 24 inputs: V factored), and the mixture's Cholesky factors, log
    weights and sigma-point ``info``."""
    N = K.shape[0]
    Kbar = K + K1 / n
    if isinstance(V, jnp.ndarray):
        i, j, w = _pair_coordinates(N)
        Vn = V / n
        Vpair = Vn[i, j][:, i, j] * (w[:, None] * w[None, :])
    else:
        Vpair = V.pair_matrix() / n
        Vn = None
    kernels, logw, info = _sigma_point_kernels(Kbar, Vpair, N)
    eye = jnp.eye(N, dtype=Kbar.dtype)
    trils = jnp.linalg.cholesky(kernels + (noise_var + jitter * jnp.mean(jnp.diagonal(K))) * eye)
    return K1 / n, Kbar, Vn, trils, logw, info


_prior_mixture_jit = jax.jit(_prior_mixture)


def _check_distinct(X):
    Xn = np.asarray(X)
    d = np.sum((Xn[:, None, :] - Xn[None, :, :]) ** 2, axis=-1)
    a, b = np.nonzero(np.triu(d <= 1e-24 * (1.0 + np.max(d)), 1))
    if a.size:
        raise ValueError(
            f"X rows {int(a[0])} and {int(b[0])} are identical: the kernel is singular and the O(1/n) "
            "distribution has no density there. Remove duplicated inputs (their outputs are identical)."
        )


def _check_kernel(Kbar, n):
    lam = np.linalg.eigvalsh(np.asarray(Kbar))
    if lam[0] <= 0:
        raise ValueError(
            f"K + K^{{1}}/n_{{L-1}} (n_{{L-1}} = {n}) is not positive definite (smallest eigenvalue {lam[0]:.3g}): "
            "the 1/n correction exceeds the kernel itself, far outside the 1/n regime. Use wider layers or order=0."
        )


# --------------------------------------------------------------------------------------------
# Bayesian posterior at finite width.


class MatrixNormalMixture(_MatrixNormalMixtureBase):
    """f ~ Σ_k π_k N(loc_k, Σ_k ⊗ I_{n_L}): a finite mixture of matrix normals with their own means.

    The law of f given data when the prior is a :class:`KernelMixture`: conditioning each Gaussian
    component on y moves its mean (differently for each kernel) and reweights it by its evidence.

    :param locs: component means, batch + (C, N, n_L).
    :param scale_trils: Cholesky factors of the component input covariances Σ_k, batch + (C, N, N).
    :param logits: log mixture weights (normalized internally), batch + (C,).

    ``covariance_matrix`` (flattened event, index α·n_L + i) follows the law of total covariance:
    Σ_k π_k (Σ_k ⊗ I) + Σ_k π_k (m_k − m)(m_k − m)ᵀ; the second term couples output neurons.
    """

    arg_constraints = {
        "locs": constraints.independent(constraints.real, 3),
        "scale_trils": constraints.independent(constraints.lower_cholesky, 1),
        "logits": constraints.real_vector,
    }
    support = _matrix
    pytree_data_fields = ("locs", "scale_trils", "logits")
    pytree_aux_fields = ("order",)
    order = 1

    def __init__(self, locs, scale_trils, logits, *, validate_args=None):
        locs, scale_trils, logits = jnp.asarray(locs), jnp.asarray(scale_trils), jnp.asarray(logits)
        if locs.ndim < 3 or scale_trils.ndim < 3 or logits.ndim < 1:
            raise ValueError(
                "MatrixNormalMixture needs locs (..., C, N, n_L), scale_trils (..., C, N, N) and logits (..., C); "
                f"got {locs.shape}, {scale_trils.shape}, {logits.shape}."
            )
        C, N = locs.shape[-3], locs.shape[-2]
        if scale_trils.shape[-3:] != (C, N, N) or logits.shape[-1] != C:
            raise ValueError(
                f"scale_trils must be (..., {C}, {N}, {N}) and logits (..., {C}) for locs of shape {locs.shape}; "
                f"got {scale_trils.shape} and {logits.shape}."
            )
        self._init_mixture("locs", locs, 3, scale_trils, logits, validate_args)

    def sample(self, key, sample_shape=()):
        eps, (L, m) = self._draw(key, sample_shape, self.locs.dtype, self.scale_trils, self.locs)
        return m + jnp.matmul(L, eps)

    @validate_sample
    def log_prob(self, value):
        diff = value[..., None, :, :] - self.locs  # batch' + (C, N, n_L)
        return _matrix_normal_mixture_log_prob(diff, self.scale_trils, self.log_weights)

    # -- moments ----------------------------------------------------------------------------
    @lazy_property
    def mean(self):
        p = jnp.exp(self.log_weights)
        return jnp.einsum("...k,...kai->...ai", p, self.locs)

    @lazy_property
    def component_covariances(self):
        """Σ_k (…, C, N, N): the input covariance of each component (shared by its output neurons)."""
        return jnp.matmul(self.scale_trils, jnp.swapaxes(self.scale_trils, -1, -2))

    @lazy_property
    def covariance_matrix(self):
        """Covariance of the flattened event (…, N·n_L, N·n_L), index α·n_L + i."""
        N, nL = self.event_shape
        p = jnp.exp(self.log_weights)
        S = jnp.einsum("...k,...kab->...ab", p, self.component_covariances)
        within = flat_covariance(S, nL)
        m = (self.locs - self.mean[..., None, :, :]).reshape(self.locs.shape[:-2] + (N * nL,))
        between = jnp.einsum("...k,...ka,...kb->...ab", p, m, m)
        return within + between

    @property
    def variance(self):
        d = jnp.diagonal(self.covariance_matrix, axis1=-2, axis2=-1)
        return d.reshape(self.batch_shape + self.event_shape)

    def fourth_cumulant(self):
        """κ4 of the flattened event (M, M, M, M), M = N·n_L, index α·n_L + i (no batch shape; small
        events only): E over components of the central fourth moment of N(m_k, S_k), m_k = loc_k − mean,
        minus the three pairings of the total covariance."""
        N, nL = self.event_shape
        M = N * nL
        if self.batch_shape:
            raise ValueError("fourth_cumulant() needs batch_shape == (); index the batch first.")
        if M**4 * self.n_components > 2**30:
            raise ValueError(
                f"fourth_cumulant would need C·(N·n_L)^4 = {M**4 * self.n_components} operations; it is meant "
                "for small events."
            )
        p = jnp.exp(self.log_weights)
        S = flat_covariance(self.component_covariances, nL)
        m = (self.locs - self.mean[None]).reshape(-1, M)
        C = self.covariance_matrix

        def pairings(T):  # T_{ab,cd} summed over the 3 ways to pair (abcd)
            return T + jnp.einsum("acbd->abcd", T) + jnp.einsum("adbc->abcd", T)

        mm = jnp.einsum("k,ka,kb,kc,kd->abcd", p, m, m, m, m)
        mmS = jnp.einsum("k,ka,kb,kcd->abcd", p, m, m, S)
        mS = mmS + jnp.einsum("abcd->cdab", mmS)  # m_a m_b S_cd + S_ab m_c m_d
        SS = jnp.einsum("k,kab,kcd->abcd", p, S, S)
        CC = jnp.einsum("ab,cd->abcd", C, C)
        return mm + pairings(mS) + pairings(SS) - pairings(CC)


def _dedupe(D):
    """Distinct rows of D (numpy) and the index of each row's representative.

    Rows closer than rounding (squared distance <= 1e-24 of the largest) are the same input: a
    test point equal to a training point has the same output, so the kernels over D are built on
    the distinct inputs and expanded (a repeated row makes the kernel singular otherwise)."""
    Dn = np.asarray(D, dtype=np.float64)
    d = np.sum((Dn[:, None, :] - Dn[None, :, :]) ** 2, axis=-1)
    same = d <= 1e-24 * (1.0 + np.max(d))
    rep = np.argmax(same, axis=1)  # first equal row
    keep = np.unique(rep)
    index = np.searchsorted(keep, rep)
    return keep, index


class FiniteWidthPosterior(MatrixNormalMixture):
    """p(f(X_test) | y) at O(1/n) as the exact posterior of the O(1/n) prior mixture (``order=1``).

    Construction: the prior on f(X ∪ X_test) is the :class:`FiniteWidthPrior` law, f | G ~ N(0, G ⊗ I)
    with G one of 2M positive-definite kernels G_m (E G = K + K^{1}/n, Cov G = V/n).  Bayes' rule on a
    Gaussian mixture is exact: with G̃_m = G_m,AA + σ²,

        p(f_B | y) = Σ_m w_m N(f_B; G_m,BA G̃_m⁻¹ y, (G_m,BB − G_m,BA G̃_m⁻¹ G_m,AB) ⊗ I),
        w_m ∝ π_m Π_i N(y_i; 0, G̃_m),      p(y) = Σ_m π_m Π_i N(y_i; 0, G̃_m).

    Since the prior matches the theory's second and fourth cumulants and its higher cumulants are
    O(1/n²), the posterior mean and covariance and the log evidence agree with the §5.2 formulas
    (:func:`eft_prob.theory.bayes.nlo_posterior_moments`) to O(1/n²) — including the coupling of
    different output neurons, which here comes from the spread of the component means.

    Attributes: ``log_evidence`` (log p(y), the mixture's), ``kernel_shift`` (E[Ĝ | y] − E[Ĝ] over
    X followed by X_test, the O(1/n) "Hebbian" representation change), ``residual`` (of the prior's
    sigma points), ``regime`` (:class:`eft_prob.criticality.Regime`; None when traced).

    At most 64 distinct inputs in X ∪ X_test (the mixture has ~N² components); use
    ``form="gaussian"`` beyond.  Above 24 distinct inputs V is the Monte Carlo factored vertex
    (``samples`` draws per layer), as for :class:`FiniteWidthPrior`.
    """

    pytree_data_fields = ("log_evidence", "kernel_shift", "residual")
    MAX_INPUTS = FiniteWidthPrior.MAX_INPUTS

    def __init__(
        self,
        spec: MLPSpec,
        X,
        y,
        X_test,
        noise_var,
        *,
        include_noise: bool = False,
        jitter: float = 1e-10,
        samples: int = 4096,
        key=None,
        validate_args=None,
    ):
        from .criticality import check_regime
        from .theory.bayes import _check_noise, _train_test
        from .theory.vertex import prior_statistics

        _check_noise(noise_var, X, X_test)
        if spec.depth < 2:
            raise ValueError("order=1 needs at least one hidden layer (hidden=[...]); a depth-1 network is Gaussian.")
        raw = (X, X_test)
        with precision_scope(spec, X, y, X_test, noise_var):
            X, y, X_test = _train_test(spec, X, y, X_test)
            nA, nB = X.shape[0], X_test.shape[0]
            D = jnp.concatenate([X, X_test])
            if is_concrete(*raw):  # decided on the caller's values (inside jit, D itself is traced)
                Dn = np.concatenate([np.asarray(a, np.float64).reshape(-1, spec.input_dim) for a in raw])
                keep, index = _dedupe(Dn)
                Du = D[keep]
            else:
                index, Du = np.arange(nA + nB), D
            N = Du.shape[0]
            if N > self.MAX_INPUTS:
                raise ValueError(
                    f"BayesianPosterior(order=1, form='mixture') supports up to {self.MAX_INPUTS} distinct inputs in "
                    f"X ∪ X_test (its mixture has ~N² components); got {N}. Use form='gaussian' (the O(1/n) mean "
                    "and covariance) or order=0."
                )
            st = prior_statistics(spec, Du, samples=samples, key=key)
            self.regime = check_regime(spec, Du, "BayesianPosterior(order=1)", statistics=st)
            parts = _posterior_mixture(
                st.K + st.K1 / st.width, st.V, st.width, index, y, noise_var, include_noise, jitter
            )
        self._finish(*parts, validate_args=validate_args)

    @classmethod
    def from_statistics(cls, G, V, width, y, noise_var, *, include_noise=False, jitter=1e-10, validate_args=None):
        """The posterior mixture from prior statistics (network-free, as :func:`~eft_prob.theory.bayes.nlo_moments`):
        G (N, N) = K + K^{1}/n and V (dense or factored) over distinct inputs, the N_A = len(y) training
        inputs first; ``width`` = n.  ``regime`` is None."""
        from .theory.bayes import _check_arrays

        G, V, y = _check_arrays(G, V, y, "FiniteWidthPosterior.from_statistics")
        self = cls.__new__(cls)
        self.regime = None
        parts = _posterior_mixture(G, V, width, np.arange(G.shape[0]), y, noise_var, include_noise, jitter)
        self._finish(*parts, validate_args=validate_args)
        return self

    def _finish(self, locs, trils, logits, log_evidence, shift, residual, *, validate_args):
        self.log_evidence, self.kernel_shift = _ambient(log_evidence, shift)
        self.residual = residual
        locs, trils, logits = _ambient(locs, trils, logits)
        MatrixNormalMixture.__init__(self, locs, trils, logits, validate_args=validate_args)


def _check_posterior_mixture(Kbar, residual, n):
    if is_concrete(Kbar):
        _check_kernel(Kbar, n)
        _check_mixture_built(Kbar, residual, "BayesianPosterior(order=1)")


def _posterior_mixture(Kbar, V, n, index, y, noise_var, include_noise, jitter):
    """Condition the O(1/n) prior mixture over the distinct inputs (kernel Kbar, vertex V, width n) on
    y at the first N_A entries of ``index`` (the map from X ∪ X_test to the distinct inputs)."""
    parts = _posterior_numbers_jit(Kbar, V, n, jnp.asarray(index), y, noise_var, jitter, include_noise=include_noise)
    _check_posterior_mixture(Kbar, parts[-1], n)
    return parts


def _posterior_numbers(Kbar, V, n, index, y, noise_var, jitter, include_noise):
    """:func:`_posterior_mixture` without the checks on concrete values (jit-able)."""
    N = Kbar.shape[0]
    nA, nL = y.shape
    nB = len(index) - nA
    if isinstance(V, jnp.ndarray):
        i, j, w = _pair_coordinates(N)
        Vpair = (V / n)[i, j][:, i, j] * (w[:, None] * w[None, :])
    else:
        Vpair = V.pair_matrix() / n
    kernels, logw, info = _sigma_point_kernels(Kbar, Vpair, N, 40)
    G = kernels[:, index][:, :, index]  # (C, N_A + N_B, N_A + N_B)
    Ch = jnp.linalg.cholesky(G[:, :nA, :nA] + noise_var * jnp.eye(nA, dtype=G.dtype))
    wy = solve_triangular(Ch, jnp.broadcast_to(y, (G.shape[0],) + y.shape), lower=True)
    alpha = solve_triangular(jnp.swapaxes(Ch, -1, -2), wy, lower=False)  # G̃_m⁻¹ y
    locs = G[:, nA:, :nA] @ alpha
    kb = solve_triangular(Ch, G[:, :nA, nA:], lower=True)
    covs = G[:, nA:, nA:] - jnp.swapaxes(kb, -1, -2) @ kb
    if include_noise:
        covs = covs + noise_var * jnp.eye(nB, dtype=G.dtype)
    half_logdet = jnp.sum(jnp.log(jnp.diagonal(Ch, axis1=-2, axis2=-1)), -1)
    log_ev = -0.5 * jnp.sum(wy * wy, (-2, -1)) - nL * half_logdet - 0.5 * nA * nL * jnp.log(2 * jnp.pi)
    logits = logw + log_ev
    log_evidence = jax.nn.logsumexp(logits)
    shift = jnp.einsum("k,kab->ab", jax.nn.softmax(logits) - jnp.exp(logw), G)
    trils = _cholesky(covs, jitter, jnp.mean(jnp.diagonal(Kbar)))
    return locs, trils, logits - log_evidence, log_evidence, (shift + shift.T) / 2, info["residual"]


_posterior_numbers_jit = jax.jit(_posterior_numbers, static_argnames=("include_noise",))


class CoupledGaussian(Distribution):
    """f ~ N(loc, Σ) with a full covariance Σ over the flattened event (index α·n_L + i).

    Unlike :class:`KernelGaussian` the output neurons need not be independent and identical: this
    is the Gaussian that carries the O(1/n) coupling between them.

    :param loc: mean, batch + (N, n_L).
    :param scale_tril: lower Cholesky factor of Σ, batch + (N·n_L, N·n_L).
    """

    arg_constraints = {"loc": _matrix, "scale_tril": constraints.lower_cholesky}
    support = _matrix
    reparametrized_params = ["loc", "scale_tril"]
    pytree_data_fields = ("loc", "scale_tril")
    pytree_aux_fields = ("order",)
    order = 1

    def __init__(self, loc, scale_tril, *, validate_args=None):
        loc, scale_tril = jnp.asarray(loc), jnp.asarray(scale_tril)
        if loc.ndim < 2 or scale_tril.ndim < 2:
            raise ValueError(
                f"loc must be (..., N, n_L) and scale_tril (..., N·n_L, N·n_L); got {loc.shape} and {scale_tril.shape}."
            )
        M = loc.shape[-2] * loc.shape[-1]
        if scale_tril.shape[-2:] != (M, M):
            raise ValueError(
                f"scale_tril must be (..., {M}, {M}) for loc of shape {loc.shape}, got {scale_tril.shape}."
            )
        batch_shape = lax.broadcast_shapes(loc.shape[:-2], scale_tril.shape[:-2])
        event_shape = loc.shape[-2:]
        self.loc = jnp.broadcast_to(loc, batch_shape + event_shape)
        self.scale_tril = jnp.broadcast_to(scale_tril, batch_shape + (M, M))
        super().__init__(batch_shape=batch_shape, event_shape=event_shape, validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        shape = sample_shape + self.batch_shape
        M = self.scale_tril.shape[-1]
        eps = jax.random.normal(key, shape + (M, 1), dtype=self.loc.dtype)
        return self.loc + jnp.matmul(self.scale_tril, eps).reshape(shape + self.event_shape)

    @validate_sample
    def log_prob(self, value):
        M = self.scale_tril.shape[-1]
        diff = (value - self.loc).reshape(jnp.shape(value - self.loc)[:-2] + (M, 1))
        L = jnp.broadcast_to(self.scale_tril, diff.shape[:-2] + (M, M))
        w = solve_triangular(L, diff, lower=True)[..., 0]
        half_logdet = jnp.sum(jnp.log(jnp.diagonal(self.scale_tril, axis1=-2, axis2=-1)), -1)
        return -0.5 * jnp.sum(w * w, -1) - half_logdet - 0.5 * M * jnp.log(2 * jnp.pi)

    def entropy(self):
        M = self.scale_tril.shape[-1]
        half_logdet = jnp.sum(jnp.log(jnp.diagonal(self.scale_tril, axis1=-2, axis2=-1)), -1)
        return 0.5 * M * (1.0 + jnp.log(2 * jnp.pi)) + half_logdet

    @property
    def mean(self):
        return self.loc

    @lazy_property
    def covariance_matrix(self):
        return jnp.matmul(self.scale_tril, jnp.swapaxes(self.scale_tril, -1, -2))

    @property
    def variance(self):
        d = jnp.diagonal(self.covariance_matrix, axis1=-2, axis2=-1)
        return d.reshape(self.batch_shape + self.event_shape)


class MomentMatchedPosterior(CoupledGaussian):
    """The Gaussian with the O(1/n) posterior mean and covariance (``BayesianPosterior(order=1, form="gaussian")``).

    Mean and covariance are the §5.2 formulas (:func:`eft_prob.theory.bayes.nlo_posterior_moments`),
    exact to O(1/n²), including the coupling of output neurons.  The posterior's fourth cumulant,
    itself O(1/n), is dropped: as a density this is a moment-matched approximation, not the O(1/n)
    law (:class:`FiniteWidthPosterior` is, where it fits).  It scales to hundreds of inputs: the
    vertex contractions use the factored V above 24 inputs and nothing of size N⁴ is formed.

    Attributes: ``log_evidence`` (the O(1/n) formula).  Above 24 inputs the V terms carry the Monte
    Carlo error of the factored vertex (an :class:`~eft_prob.ApproximationWarning` when it exceeds
    25% of them; the standard errors are in :func:`~eft_prob.theory.bayes.nlo_posterior_moments`).
    A covariance that the O(1/n) term pushed below zero (far outside the 1/n regime, or test points
    at training points with tiny noise) is clipped to the nearest PSD matrix with a
    :class:`~eft_prob.RegularizationWarning`.
    """

    pytree_data_fields = ("log_evidence",)

    def __init__(
        self,
        spec: MLPSpec,
        X,
        y,
        X_test,
        noise_var,
        *,
        include_noise: bool = False,
        jitter: float = 1e-10,
        samples: int = 4096,
        key=None,
        validate_args=None,
    ):
        from ._validate import check_psd
        from .theory.bayes import nlo_posterior_moments

        with precision_scope(spec, X, y, X_test, noise_var):
            r = nlo_posterior_moments(spec, X, y, X_test, noise_var, samples=samples, key=key)
            cov = r.covariance
            if include_noise:
                cov = cov + noise_var * jnp.eye(cov.shape[0], dtype=cov.dtype)
            cov = check_psd(cov, "BayesianPosterior(order=1, form='gaussian') covariance")
            tril = _cholesky(cov, jitter, jnp.mean(jnp.diagonal(r.gp_covariance)) + noise_var)
        self.log_evidence = _ambient(r.log_evidence)[0]
        loc, tril = _ambient(r.mean, tril)
        super().__init__(loc, tril, validate_args=validate_args)


class FiniteWidthTrained(CoupledGaussian):
    """The O(1/n) distribution of GD-trained outputs (``TrainedNetwork(..., order=1)``).

    A Gaussian over the flattened test event (index β·n_L + i) with the mean and covariance of
    :func:`eft_prob.theory.training.nlo_trained_moments`: the infinite-width NTK prediction plus
    the 1/n corrections from the NTK fluctuations (H^{1}, A, B, D, F) and, through the
    learning-algorithm-dependent terms, the dNTK (P, Q) and ddNTK (R, S, T, U); the covariance
    couples different output neurons.  ``learning_rate=None`` with ``steps=None`` is gradient flow
    to convergence; otherwise ``steps`` discrete steps (``None``: converged) at rate η.

    What is dropped: the trained outputs' own O(1/n) fourth cumulant (inherited from the prior's
    vertex V and from the NTK fluctuations), so as a density this is moment-matched, exact in mean
    and covariance to O(1/n²).  At small widths the truncated covariance can lose positive
    definiteness; it is then clipped with a :class:`~eft_prob.RegularizationWarning`.

    Attributes: ``coefficients`` — the :class:`~eft_prob.theory.training.NLOTrainedCoefficients`
    (mean0, cov0, mean1, cov1, width), from which ``.at(n)`` gives the moments at any other width.
    """

    pytree_data_fields = ("coefficients",)

    def __init__(
        self,
        spec: MLPSpec,
        X,
        y,
        X_test,
        learning_rate=None,
        steps: int | None = None,
        *,
        jitter: float = 1e-10,
        validate_args=None,
    ):
        from ._validate import check_psd
        from .theory.training import nlo_trained_coefficients

        # nlo_trained_coefficients validates learning_rate and steps (a rate > 0, or None for gradient flow)
        with precision_scope(spec, X, y, X_test, learning_rate):
            c = nlo_trained_coefficients(spec, X, y, X_test, learning_rate, steps)
            m = c.at()
            # zero-variance directions (test inputs at training inputs, converged) come out at the
            # accuracy of the quadratures of the NTK statistics: about 1e-5 of the largest entry of
            # the O(1/n) term here (measured; it falls ~100x with 1.5x the nodes), hence rtol
            cov = check_psd(m.cov, "TrainedNetwork(order=1) covariance", rtol=1e-5)
            tril = _cholesky(cov, jitter, jnp.mean(jnp.diagonal(c.cov0)))
        self.coefficients = c
        loc, tril = _ambient(m.mean, tril)
        super().__init__(loc, tril, validate_args=validate_args)


def _finite_width_posterior(spec, X, y, X_test, noise_var, *, form=None, **kwargs):
    """BayesianPosterior(order=1): the §5.2 moments as a Gaussian (default) or the mixture on request."""
    if form not in (None, "mixture", "gaussian"):
        raise ValueError(f"form must be None, 'mixture' or 'gaussian', got {form!r}.")
    if form == "mixture":
        d = FiniteWidthPosterior(spec, X, y, X_test, noise_var, **kwargs)
        if is_concrete(d.logits) and d.batch_shape == ():
            w = np.exp(np.asarray(d.logits, np.float64))
            frac = float(1.0 / np.sum(w * w) / w.size)
            if frac < 0.5:
                warn(
                    f"BayesianPosterior(order=1, form='mixture'): the data reweight the prior's {w.size} kernel "
                    f"points strongly (effective number {frac:.0%} of them): the likelihood is informative about "
                    "the kernel beyond what the discrete O(1/n) prior law resolves, and the mixture's posterior "
                    "moments can be off at O(1/n) (e.g. small noise_var, many points, small width). Use the "
                    "default form (the §5.2 O(1/n) moments).",
                    ApproximationWarning,
                )
        return d
    return MomentMatchedPosterior(spec, X, y, X_test, noise_var, **kwargs)
