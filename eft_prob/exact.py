"""The exact finite-width output law where it exists: scale-invariant σ (THEORY.md §2, §4.4).

For σ(z) = a_+ z (z >= 0), a_- z (z < 0) and no biases after the first layer (C_b^(ℓ) = 0 for
ℓ >= 2), the preactivations of layer ℓ+1 are, given layer ℓ, iid N(0, Ĝ^(ℓ+1)) over neurons with
Ĝ^(ℓ+1) = (C_W^(ℓ+1)/n_ℓ) Σ_j σ(z^(ℓ)_j)².  For one input z^(ℓ)_j = √Ĝ^(ℓ) ξ_j with ξ_j iid
N(0, 1), and homogeneity gives

    Ĝ^(ℓ+1) = Ĝ^(ℓ) (C_W^(ℓ+1)/n_ℓ) Q_ℓ,   Q_ℓ = Σ_j σ(ξ_j)² = a_+² χ²_{B_ℓ} + a_-² χ²_{n_ℓ-B_ℓ},

with B_ℓ ~ Binomial(n_ℓ, ½) the number of positive ξ_j, all independent across layers.  So

    f(x) | s ~ N(0, s G^(1) I_{n_L}),   s = Π_{ℓ=1}^{L-1} (C_W^(ℓ+1)/n_ℓ) Q_ℓ,

an exact Gaussian scale mixture for any widths, per-layer C_W and output dimension (the outputs
share s).  For a linear network with one output the same holds for N inputs, f(X) | s ~
N(0, s G^(1)) with the N×N first-layer kernel G^(1): f = aᵀz^(1) with z^(1) rows iid N(0, G^(1))
and a = (W^(L)···W^(2))ᵀ independent of them, |a|² having the law of s.

ReLU-like σ (one slope zero) has an atom: if some layer has all its preactivations on the zero
side (probability 2^{-n_ℓ}), s = 0 and f = 0 exactly.  ``log_prob`` is then the density of the
absolutely continuous part, *not renormalized*: it integrates to 1 - ``atom_probability``.  (With
``noise_var`` > 0 the atom becomes the component N(0, σ²I) and the density is a proper one.)

Construction of ``log_prob``.  Write s = e^{log_scale} Π_ℓ r_ℓ with r_ℓ = Q_ℓ/(n_ℓ A_2) (so
E r_ℓ = 1 and log_scale = Σ log(C_W^(ℓ+1) A_2), which carries every traced hyperparameter).  The
density of v_ℓ = log r_ℓ is a closed-form mixture over B of log-χ² densities (ReLU, linear) or, for
0 < a_-² ≠ a_+², of log-densities of a weighted sum of two χ²; given B that density is exact via
Kummer's function (with c = max a², d = min a², k = #{ξ on the c side}):

    p(q | k) = q^{n/2-1} e^{-q/2c} ₁F₁((n-k)/2; n/2; -q(1/d - 1/c)/2) / (2^{n/2} Γ(n/2) c^{k/2} d^{(n-k)/2}).

Each layer's law is sampled on a lattice v = jh (step h a quarter of the narrowest component's
standard deviation, at most 0.2) between tail bounds that leave out < 1e-30 of probability, and the
layers are convolved directly (sums of positive terms, so the far tails keep their relative
accuracy; an FFT would bury them under 1e-16·max round-off).  The lattice masses w_k then give

    log p(f) = logsumexp_k [log w_k + log N(f; 0, e^{log_scale + v_k} G^(1) + σ² I)],

a trapezoid rule on analytic, rapidly decaying integrands: exponentially accurate in 1/h (measured
~1e-13 relative against closed forms, see ``tests/test_exact.py``).  The dropped tails bound the
error by ~1e-30·(sd/|f|)^{N·n_L}, i.e. the density is accurate except within ~1e-14·sd of f = 0,
where the true density of ReLU networks diverges logarithmically and the tabulated one stays finite.
The table depends only on the widths and slopes; it is computed once (NumPy, float64) and cached.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import ndtr
from numpyro.distributions import Distribution, constraints
from numpyro.distributions.util import lazy_property, validate_sample
from scipy.special import gammaln, polygamma

from ._config import is_concrete, precision_scope
from ._moments import SharedInputCovariance, neuron_fourth_cumulant
from ._validate import check_inputs, check_positive
from .spec import MLPSpec
from .theory.kernels import _first_layer

__all__ = ["ExactNetworkPrior"]

_matrix = constraints.independent(constraints.real, 2)
_TAIL = 1e-30  # probability left out at each end of each layer's law (and of the binomial over k)
_STEPS_PER_SD = 4  # lattice points per standard deviation of the narrowest log-χ² component
_MAX_STEP = 0.2  # keeps the aliasing error of the wide (χ²_1-like) components below 1e-20
_LOG_2PI = math.log(2 * math.pi)
_FALLBACK = "Use NetworkPrior(order=0 or 1) (the Gaussian limit or its 1/n corrections) instead."


# --------------------------------------------------------------------------------------------
# The law of v = log r for one layer, r = Q/(n A_2), Q = c χ²_k + d χ²_{n-k}, k ~ Binomial(n, ½).


def _log_chi2_pdf(x, m):
    return (m / 2 - 1) * np.log(x) - x / 2 - (m / 2) * math.log(2) - gammaln(m / 2)


def _chi2_lower(m: int) -> float:
    """x with P(χ²_m < x) <= (x/2)^{m/2}/Γ(m/2+1) = _TAIL (the density is at most x^{m/2-1}/(2^{m/2}Γ(m/2)))."""
    return 2 * math.exp((2 / m) * (math.log(_TAIL) + gammaln(m / 2 + 1)))


def _chi2_upper(m: int) -> float:
    """x with P(χ²_m > x) <= _TAIL (Laurent–Massart: P(χ²_m - m >= 2√(mt) + 2t) <= e^{-t})."""
    t = -math.log(_TAIL)
    return m + 2 * math.sqrt(m * t) + 2 * t


def _binomial_terms(n: int, zero_slope: bool):
    """(k, log P(k)) for k ~ Binomial(n, ½), without the k = 0 atom of a zero slope and without
    the outermost k whose total probability is below _TAIL at each end."""
    k = np.arange(n + 1)
    logw = gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1) - n * math.log(2)
    if zero_slope:
        k, logw = k[1:], logw[1:]
    c = np.cumsum(np.exp(logw))
    keep = (c >= _TAIL) & (c[-1] - c + np.exp(logw) >= _TAIL)
    return k[keep], logw[keep]


@functools.lru_cache(maxsize=256)
def _layer_masses(n: int, c: float, d: float, h: float):
    """(j0, masses): the continuous part of the law of v = log(Q/(n A_2)) as masses on v = (j0 + i)·h.

    c >= d >= 0 are the squared slopes.  The masses sum to P(Q > 0) = 1 - [d = 0]·2^{-n} exactly
    (they are renormalized to it; the unnormalized sum differs by the ~1e-16 quadrature error).
    """
    nA2 = n * (c + d) / 2
    lower = [d * _chi2_lower(n)] if d > 0 else []
    if c == d:
        k, logw = np.array([n]), np.zeros(1)
    else:
        k, logw = _binomial_terms(n, zero_slope=d == 0)
        if k[0] >= 1:  # Q >= c χ²_k on every kept term
            lower.append(c * _chi2_lower(int(k[0])))
    j0 = math.floor(math.log(max(lower) / nA2) / h)
    j1 = math.ceil(math.log(c * _chi2_upper(n) / nA2) / h)
    v = h * np.arange(j0, j1 + 1)
    q = nA2 * np.exp(v)
    if c == d:
        logp = _log_chi2_pdf(q / c, n)[None] - math.log(c)
    elif d == 0:
        logp = _log_chi2_pdf(q[None] / c, k[:, None]) - math.log(c)
    else:
        logp = _log_two_chi2_pdf(q, n, k, c, d)
    logm = math.log(h) + np.log(q) + _logsumexp(logw[:, None] + logp, axis=0)
    m = np.exp(logm - logm.max())
    mass = -math.expm1(-n * math.log(2)) if d == 0 else 1.0
    j0, m = _trim(j0, m * (mass / m.sum()))
    m.setflags(write=False)
    return j0, m


def _log_two_chi2_pdf(q, n, k, c, d):
    """log density of c χ²_k + d χ²_{n-k} (c > d > 0) at q, for each k: (len(k), len(q)).

    p(q | k) = q^{n/2-1} e^{-q/2c} I / (2^{n/2} Γ(a) Γ(β) c^β d^a), a = (n-k)/2, β = k/2, with
    I = ∫_0^1 e^{-λt} t^{a-1} (1-t)^{β-1} dt and λ = q(1/d - 1/c)/2 (the Euler integral of
    Kummer's ₁F₁(a; n/2; -λ)).  ``_log_kummer_integral`` keeps it in log space: ₁F₁ itself
    underflows (to 1e-800 and below) for wide layers with a small slope, where the density is not small.
    """
    lam = q * (1 / d - 1 / c) / 2
    rows = []
    for kk in k:
        a, beta = (n - kk) / 2, kk / 2
        if kk == 0:  # d χ²_n exactly
            rows.append(_log_chi2_pdf(q / d, n) - math.log(d))
            continue
        if kk == n:
            rows.append(_log_chi2_pdf(q / c, n) - math.log(c))
            continue
        log_i = _log_kummer_integral(a, beta, lam)
        norm = (n / 2) * math.log(2) + gammaln(a) + gammaln(beta) + beta * math.log(c) + a * math.log(d)
        rows.append((n / 2 - 1) * np.log(q) - q / (2 * c) + log_i - norm)
    return np.stack(rows)


def _log_kummer_integral(a: float, beta: float, lam):
    """log ∫_0^1 e^{-λt} t^{a-1}(1-t)^{β-1} dt for a, β > 0 and an array of λ >= 0.

    With t = 1/(1+e^{-y}) the integrand becomes exp φ(y), φ = a log t + β log(1-t) - λt, analytic and
    unimodal on the real line (φ' = a - (a+β+λ)t + λt² has one root in (0, 1)), with exponential
    tails e^{ay} and e^{-βy}.  A trapezoid rule at a fifth of the width at the mode, over the mode
    ± (8 widths + 80/slope), is exponentially accurate (checked against mpmath to ~1e-14).
    """
    s = lam + a + beta
    root = np.sqrt(s * s - 4 * lam * a)
    t = 2 * a / (s + root)  # the mode, in the cancellation-free form of the smaller root
    y_mode = np.log(t) - np.log1p(-t)
    width = 1 / np.sqrt(root * t * (1 - t))
    step = min(0.2, float(np.min(width)) / 5)
    left, right = 8 * width + 80 / a, 8 * width + 80 / beta
    m = int(np.ceil(np.max(left + right) / step)) + 1
    y = (y_mode - left)[:, None] + step * np.arange(m)[None]
    log_t, log_1mt = -np.logaddexp(0, -y), -np.logaddexp(0, y)
    phi = a * log_t + beta * log_1mt - lam[:, None] * np.exp(log_t)
    return math.log(step) + _logsumexp(phi, axis=1)


def _logsumexp(a, axis):
    top = np.max(a, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(top, axis) + np.log(np.sum(np.exp(a - top), axis=axis))


def _trim(j0: int, m):
    """Drop the lattice points at either end whose cumulative mass is below _TAIL."""
    c = np.cumsum(m)
    total = c[-1]
    keep = np.nonzero((c >= _TAIL * total) & (total - c + m >= _TAIL * total) & (m > 0))[0]
    lo, hi = keep[0], keep[-1]
    return j0 + int(lo), m[lo : hi + 1]


def _lattice_step(hidden, event_size: int) -> float:
    """h: a quarter of the standard deviation of the narrowest log-χ² in the mixture, √ψ'(m/2)
    with m the largest width or the event size N·n_L (the Gaussian factor of ``log_prob`` is a
    log-χ²_{N·n_L} density in u)."""
    m = max((*hidden, event_size))
    return min(_MAX_STEP, math.sqrt(float(polygamma(1, m / 2))) / _STEPS_PER_SD)


@functools.lru_cache(maxsize=64)
def _log_scale_law(hidden: tuple[int, ...], c: float, d: float, event_size: int):
    """Lattice law of v = Σ_ℓ log r_ℓ: (v, log w) with Σ w = 1 - P(s = 0)."""
    h = _lattice_step(hidden, event_size)
    j0, m = 0, np.ones(1)
    for n in hidden:
        jl, ml = _layer_masses(n, c, d, h)
        j0, m = _trim(j0 + jl, np.convolve(m, ml))
    v = h * np.arange(j0, j0 + m.size)
    m = m * ((1 - _atom_probability(hidden, d)) / m.sum())
    v.setflags(write=False)
    logw = np.log(m)
    logw.setflags(write=False)
    return v, logw


def _atom_probability(hidden, d: float) -> float:
    """P(s = 0) = 1 - Π_ℓ(1 - 2^{-n_ℓ}) when one slope is zero (some layer entirely on the dead side)."""
    return -math.expm1(sum(math.log1p(-(2.0**-n)) for n in hidden)) if d == 0 else 0.0


@functools.lru_cache(maxsize=256)
def _ratio_moment(n: int, c: float, d: float, k: int) -> float:
    """E[r^k], r = Q/(n A_2), in closed form: Q = Σ_j y_j with y = σ(ξ)², E y^m = (2m-1)!!(c^m + d^m)/2,
    so E[Q^k] = k!·[t^k] (Σ_m E[y^m] t^m/m!)^n (a power of a positive series: no cancellation)."""
    nA2 = n * (c + d) / 2  # y is scaled by 1/(n A_2) up front, so nothing overflows at large n or k
    base = [
        math.prod(range(1, 2 * m, 2)) * ((c / nA2) ** m + (d / nA2) ** m) / 2 / math.factorial(m) for m in range(k + 1)
    ]
    out, p, e = np.eye(1, k + 1)[0], np.array(base), n
    while e:  # the n-th power of the truncated series by repeated squaring
        if e & 1:
            out = np.convolve(out, p)[: k + 1]
        p, e = np.convolve(p, p)[: k + 1], e >> 1
    return float(math.factorial(k) * out[k])


# --------------------------------------------------------------------------------------------
# Which configurations have an exact law.


def _squared_slopes(spec: MLPSpec):
    """(c, d) = (max, min) of (a_+², a_-²); raises unless the law is exact for this activation."""
    act = spec.activation
    if spec.depth == 1:
        return 1.0, 1.0  # a linear model: exactly Gaussian whatever σ is
    if act.slopes is None:
        raise ValueError(
            f"ExactNetworkPrior: the exact finite-width law needs a scale-invariant activation "
            f"(relu, leaky_relu, linear, activations.leaky_relu(a)); got {act.name!r} "
            f"({act.universality} class). {_FALLBACK}"
        )
    a_plus, a_minus = (float(a) for a in act.slopes)
    if a_plus == 0 and a_minus == 0:
        raise ValueError(
            f"ExactNetworkPrior: activation {act.name!r} has both slopes zero, so every output is "
            "identically 0; there is no distribution to model. Give it a non-zero slope."
        )
    return max(a_plus**2, a_minus**2), min(a_plus**2, a_minus**2)


def _check_no_hidden_bias(spec: MLPSpec):
    if spec.depth == 1:
        return
    C_b = spec.C_b
    later = C_b[1:] if isinstance(C_b, tuple) else (C_b,)
    zeros = ", ".join(["0.0"] * (spec.depth - 1))
    fix = f"pass C_b=(c_1, {zeros}), a bias in the first layer only."
    for v in later:
        if not is_concrete(v) or np.ndim(v) != 0:
            raise ValueError(
                "ExactNetworkPrior: C_b of layers 2..L must be concrete zeros (a traced or array C_b "
                f"cannot be checked); {fix} {_FALLBACK}"
            )
        if float(v) != 0.0:
            raise ValueError(
                f"ExactNetworkPrior: the exact law needs C_b = 0 in layers 2..L (a bias makes Ĝ^(ℓ+1) "
                f"= C_b + ..., no longer a product of independent factors); got C_b={spec.C_b!r}. "
                f"To keep this class, {fix} {_FALLBACK}"
            )


def _check_inputs_allowed(spec: MLPSpec, N: int):
    if N == 1 or spec.depth == 1:
        return
    a_plus, a_minus = spec.activation.slopes
    if a_plus == a_minus and spec.output_dim == 1:
        return
    what = (
        f"output_dim={spec.output_dim} (the outputs of a linear network share a random matrix, not a scalar scale)"
        if a_plus == a_minus
        else f"a nonlinear activation ({spec.activation.name!r}: its random kernel Ĝ is not a scalar times G^(1))"
    )
    raise ValueError(
        f"ExactNetworkPrior: with N={N} inputs the exact law is a scalar scale mixture only for a "
        f"linear activation with output_dim=1; got {what}. For the exact law pass one input at a time "
        f"(X of shape (1, {spec.input_dim})). {_FALLBACK}"
    )


def _ambient(*arrays):
    dtype = jnp.result_type(float)
    return tuple(jnp.asarray(a).astype(dtype) for a in arrays)


# --------------------------------------------------------------------------------------------
# Sampling and density as pure functions, compiled once per configuration: eager calls would
# otherwise compile every primitive separately (the binomial and gamma samplers take seconds).


@jax.jit
def _kernel_and_log_scale(spec: MLPSpec, X, A2):
    """G^(1) (N, N) and log_scale = Σ_{ℓ>=2} log(C_W^(ℓ) A_2), so that E s = e^{log_scale}."""
    G1 = _first_layer(spec, X)[0]
    return G1, jnp.sum(jnp.log(spec.layer_values("C_W", G1.dtype)[1:] * A2))


def _kernel_factor(kernel, jitter: float):
    """Cholesky factor of G^(1), (…, N, N), with the relative diagonal jitter when N > 1."""
    N = kernel.shape[-1]
    if N == 1:
        return jnp.sqrt(kernel)
    scale = jnp.mean(jnp.diagonal(kernel, axis1=-2, axis2=-1), -1)[..., None, None]
    return jnp.linalg.cholesky(kernel + jitter * scale * jnp.eye(N, dtype=kernel.dtype))


@functools.partial(jax.jit, static_argnames=("hidden", "slopes2", "noisy", "jitter", "shape"))
def _draw(key, kernel, log_scale, noise_var, *, hidden, slopes2, noisy, jitter, shape):
    """f of ``shape`` = sample + batch + (N, n_L): s from its definition (binomial and gamma draws),
    then f = √s L ε (+ σ ε')."""
    dtype = kernel.dtype
    outer = shape[:-2]
    k_pos, k_c, k_d, k_f, k_eps = jax.random.split(key, 5)
    s = jnp.exp(log_scale) * jnp.ones(outer, dtype)
    if hidden:
        c, d = slopes2
        n = jnp.asarray(hidden, dtype).reshape((-1,) + (1,) * len(outer))
        layers = (len(hidden), *outer)
        B = jax.random.binomial(k_pos, n, 0.5, layers, dtype)  # preactivations on the slope-c side
        chi2_c = 2 * jax.random.gamma(k_c, B / 2, layers, dtype)  # χ²_0 = 0: gamma(0) draws 0
        chi2_d = 2 * jax.random.gamma(k_d, (n - B) / 2, layers, dtype)
        s = s * jnp.prod((c * chi2_c + d * chi2_d) / (n * (c + d) / 2), axis=0)
    eps = jax.random.normal(k_f, shape, dtype)
    f = jnp.sqrt(s)[..., None, None] * jnp.matmul(_kernel_factor(kernel, jitter), eps)
    if noisy:
        f = f + jnp.sqrt(noise_var)[..., None, None] * jax.random.normal(k_eps, shape, dtype)
    return f


@functools.partial(jax.jit, static_argnames=("noisy", "atom", "jitter"))
def _log_density(value, kernel, log_scale, noise_var, log_grid, log_weights, *, noisy, atom, jitter):
    """logsumexp_k [log w_k + log N(f; 0, (e^{u_k} G + σ² I) ⊗ I)], u_k = log_scale + v_k (+ the atom
    as N(0, σ² I) when there is noise)."""
    N, nL = value.shape[-2:]
    dim = N * nL
    u = log_scale[..., None] + log_grid  # log s_k, batch + (K,)
    sq = jnp.sum(value * value, axis=(-2, -1))[..., None]
    if N == 1:  # every coordinate has variance e^u G + σ²
        lv = u + jnp.log(kernel[..., 0, 0])[..., None]
        if noisy:
            lv = jnp.logaddexp(lv, jnp.log(noise_var)[..., None])
        comp = -0.5 * dim * (_LOG_2PI + lv) - 0.5 * sq * jnp.exp(-lv)
    elif not noisy:  # covariance e^u G ⊗ I: one Cholesky factor for every lattice point
        L = _kernel_factor(kernel, jitter)
        w = solve_triangular(jnp.broadcast_to(L, value.shape[:-2] + L.shape[-2:]), value, lower=True)
        quad = jnp.sum(w * w, axis=(-2, -1))[..., None]  # fᵀ G⁻¹ f
        logdet = 2 * jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)), -1)[..., None]
        comp = -0.5 * dim * (_LOG_2PI + u) - 0.5 * nL * logdet - 0.5 * quad * jnp.exp(-u)
    else:  # covariance (e^u G + σ² I) ⊗ I: one Cholesky factor per lattice point
        L = _kernel_factor(kernel, jitter)
        G = jnp.matmul(L, jnp.swapaxes(L, -1, -2))
        cov = jnp.exp(u)[..., None, None] * G[..., None, :, :] + noise_var[..., None, None, None] * jnp.eye(N)
        Lk = jnp.linalg.cholesky(cov)
        v = jnp.broadcast_to(value[..., None, :, :], value.shape[:-2] + Lk.shape[-3:-2] + value.shape[-2:])
        w = solve_triangular(jnp.broadcast_to(Lk, v.shape[:-2] + (N, N)), v, lower=True)
        half_logdet = jnp.sum(jnp.log(jnp.diagonal(Lk, axis1=-2, axis2=-1)), -1)
        comp = -0.5 * dim * _LOG_2PI - nL * half_logdet - 0.5 * jnp.sum(w * w, axis=(-2, -1))
    comp = comp + log_weights
    if noisy and atom > 0:  # s = 0: f is the noise alone
        var = noise_var[..., None]
        log_atom = math.log(atom) - 0.5 * dim * jnp.log(2 * jnp.pi * var) - 0.5 * sq / var
        comp = jnp.concatenate([comp, jnp.broadcast_to(log_atom, comp.shape[:-1] + (1,))], -1)
    return jax.nn.logsumexp(comp, axis=-1)


# --------------------------------------------------------------------------------------------


class ExactNetworkPrior(SharedInputCovariance, Distribution):
    """p(f(X)) at initialization, exactly at finite width (THEORY.md §4.4; §2 for linear nets).

    Supported: scale-invariant σ (``relu``, ``leaky_relu``, ``linear``, any slopes), C_b = 0 in
    layers 2..L (layer 1 may have a bias), any widths and per-layer C_W, and either one input
    (any output_dim) or a linear network with output_dim = 1 (any number of inputs).  A depth-1
    model (no hidden layer) is exactly Gaussian for any σ, inputs and outputs.  Anything else raises
    ValueError.  Then f | s ~ N(0, s G^(1) ⊗ I_{n_L}) with the random scale s of the module
    docstring; ``log_prob`` is exact to quadrature accuracy (~1e-13 relative), and for ReLU-like σ
    it is the density of the continuous part (the atom f = 0 has mass ``atom_probability``).

    :param MLPSpec spec: architecture and prior; C_W and the first-layer C_b may be traced.
    :param X: inputs (N, input_dim).
    :param noise_var: observation-noise variance σ² >= 0: the law of f(X) + ε, ε ~ N(0, σ²I).
    :param float jitter: relative diagonal jitter for a singular G^(1) (several inputs only).

    Moments are closed forms (:meth:`scale_moment`, :meth:`moment`), not quadrature.
    """

    arg_constraints = {
        "loc": _matrix,
        "kernel": _matrix,
        "log_scale": constraints.real,
        "noise_var": constraints.nonnegative,
    }
    support = _matrix
    pytree_data_fields = ("loc", "kernel", "log_scale", "noise_var")
    pytree_aux_fields = ("_hidden", "_slopes2", "_atom", "_noisy", "_jitter")
    order = "exact"

    def __init__(self, spec: MLPSpec, X, *, noise_var=0.0, jitter: float = 1e-10, validate_args=None):
        if not isinstance(spec, MLPSpec):
            raise ValueError(f"spec must be an eft_prob.MLPSpec, got {type(spec).__name__}.")
        c, d = _squared_slopes(spec)
        _check_no_hidden_bias(spec)
        check_positive("noise_var", noise_var, strict=False)
        with precision_scope(spec, X, noise_var):
            X = check_inputs(spec, X)
            N = X.shape[0]
            _check_inputs_allowed(spec, N)
            G1, log_scale = _kernel_and_log_scale(spec, X, (c + d) / 2)
            if is_concrete(G1) and not bool(jnp.all(jnp.diagonal(G1) > 0)):
                raise ValueError(
                    "ExactNetworkPrior: an input has first-layer kernel G^(1) = 0 (x = 0 with C_b^(1) = 0), "
                    "so its outputs are identically 0 and have no density; drop that input or give layer 1 a bias."
                )
            loc = jnp.zeros((N, spec.output_dim), G1.dtype)
            noise = jnp.asarray(noise_var, G1.dtype)
        self.loc, self.kernel, self.log_scale, self.noise_var = _ambient(loc, G1, log_scale, noise)
        self._hidden, self._slopes2, self._jitter = spec.hidden, (c, d), float(jitter)
        self._atom = _atom_probability(spec.hidden, d)
        self._noisy = not (is_concrete(noise_var) and float(noise_var) == 0.0)
        super().__init__(batch_shape=(), event_shape=loc.shape, validate_args=validate_args)

    # -- the law of s ------------------------------------------------------------------------
    @lazy_property
    def _lattice(self):
        # static: depends on the widths, the slopes and the event size only (cached across instances)
        v, logw = _log_scale_law(self._hidden, *self._slopes2, math.prod(self.event_shape))
        return _ambient(v, logw)

    @property
    def log_grid(self):
        """v_k (K,): the lattice of log(s/e^{log_scale}) = Σ_ℓ log r_ℓ."""
        return self._lattice[0]

    @property
    def log_weights(self):
        """log w_k (K,): lattice masses of the continuous part, Σ_k w_k = 1 - ``atom_probability``."""
        return self._lattice[1]

    @property
    def atom_probability(self) -> float:
        """P(s = 0) = P(f = 0 without noise) = 1 - Π_ℓ(1 - 2^{-n_ℓ}) for ReLU-like σ, else 0."""
        return self._atom

    def scale_mixture(self):
        """(log s_k, log w_k), each (…, K): the tabulated law of the continuous part of s,
        Σ_k w_k = 1 - ``atom_probability``."""
        log_s = self.log_scale[..., None] + self.log_grid
        return log_s, jnp.broadcast_to(self.log_weights, log_s.shape)

    def scale_moment(self, k: int):
        """E[s^k] in closed form: e^{k·log_scale} Π_ℓ E[r_ℓ^k] (E r = 1, E r² = 1 + (3A_4/A_2² - 1)/n_ℓ)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k!r}.")
        c, d = self._slopes2
        static = math.prod(_ratio_moment(n, c, d, int(k)) for n in self._hidden)
        return static * jnp.exp(k * self.log_scale)

    def _scale_variance(self):
        """Var(s) = (E s)² (Π E[r²] - 1), without the cancellation of E s² - (E s)²."""
        c, d = self._slopes2
        rel = math.expm1(sum(math.log(_ratio_moment(n, c, d, 2)) for n in self._hidden))
        return rel * jnp.exp(2 * self.log_scale)

    # -- sampling and density ----------------------------------------------------------------
    def sample(self, key, sample_shape=()):
        return _draw(
            key,
            self.kernel,
            self.log_scale,
            self.noise_var,
            hidden=self._hidden,
            slopes2=self._slopes2,
            noisy=self._noisy,
            jitter=self._jitter,
            shape=tuple(sample_shape) + self.batch_shape + self.event_shape,
        )

    @validate_sample
    def log_prob(self, value):
        return _log_density(
            value,
            self.kernel,
            self.log_scale,
            self.noise_var,
            self.log_grid,
            self.log_weights,
            noisy=self._noisy,
            atom=self._atom,
            jitter=self._jitter,
        )

    def marginal_cdf(self, value):
        """P(f_{αi} <= value_{αi}) for every coordinate separately (not the joint CDF), batch + (N, n_L)."""
        g = jnp.diagonal(self.kernel, axis1=-2, axis2=-1)[..., :, None, None]  # batch + (N, 1, 1)
        u = (self.log_scale[..., None] + self.log_grid)[..., None, None, :]
        var = jnp.exp(u) * g + self.noise_var[..., None, None, None]
        cdf = jnp.sum(jnp.exp(self.log_weights)[..., None, None, :] * ndtr(value[..., None] / jnp.sqrt(var)), -1)
        if self._atom > 0:
            atom = ndtr(value / jnp.sqrt(self.noise_var[..., None, None])) if self._noisy else (value >= 0)
            cdf = cdf + self._atom * atom
        return cdf

    # -- moments (closed forms) ----------------------------------------------------------------
    @property
    def mean(self):
        return self.loc

    @lazy_property
    def input_covariance(self):
        """E[s] G^(1) + σ² I (…, N, N): the covariance across inputs shared by every output neuron."""
        N = self.event_shape[0]
        return self.scale_moment(1)[..., None, None] * self.kernel + self.noise_var[..., None, None] * jnp.eye(N)

    def moment(self, k: int):
        """E[f_{αi}^k] for every coordinate, batch + (N, n_L), in closed form: zero for odd k, and
        (k-1)!! Σ_j C(k/2, j) G_αα^j E[s^j] σ^{k-2j} for even k (f_{αi} | s ~ N(0, s G_αα + σ²))."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k!r}.")
        shape = self.batch_shape + self.event_shape
        if k % 2:
            return jnp.zeros(shape, self.loc.dtype)
        m = k // 2
        g = jnp.diagonal(self.kernel, axis1=-2, axis2=-1)[..., None]
        sig2 = self.noise_var[..., None, None]
        total = sum(
            math.comb(m, j) * g**j * self.scale_moment(j)[..., None, None] * sig2 ** (m - j) for j in range(m + 1)
        )
        return jnp.broadcast_to(math.prod(range(1, k, 2)) * total, shape)

    @lazy_property
    def kernel_covariance(self):
        """Cov(Ĝ_ab, Ĝ_cd) = Var(s) G_ab G_cd (…, N, N, N, N): the exact V/n_{L-1} of the 1/n theory."""
        G = self.kernel
        return self._scale_variance()[..., None, None, None, None] * G[..., :, :, None, None] * G[..., None, None, :, :]

    def fourth_cumulant(self):
        """κ4 of the flattened event (…, M, M, M, M), M = N·n_L, index α·n_L + i:
        κ[(α1i1)(α2i2)(α3i3)(α4i4)] = δ_{i1i2}δ_{i3i4} C_{α1α2α3α4} + 2 permutations, C = ``kernel_covariance``.
        For one input and one output κ4 = E f⁴ - 3(E f²)² = 3 Var(s) G²."""
        return neuron_fourth_cumulant(self.kernel_covariance, self.event_shape, self.batch_shape)

    def excess_kurtosis(self):
        """E f⁴/(E f²)² - 3 of every coordinate, batch + (N, n_L): 3 Var(s) G_αα²/(E s G_αα + σ²)²."""
        g = jnp.diagonal(self.kernel, axis1=-2, axis2=-1)[..., None]
        v = jnp.diagonal(self.input_covariance, axis1=-2, axis2=-1)[..., None]
        out = 3 * self._scale_variance()[..., None, None] * g**2 / v**2
        return jnp.broadcast_to(out, self.batch_shape + self.event_shape)

    @staticmethod
    def infer_shapes(loc, kernel, log_scale, noise_var):
        batch_shape = lax.broadcast_shapes(tuple(loc[:-2]), tuple(kernel[:-2]), tuple(log_scale), tuple(noise_var))
        return batch_shape, tuple(loc[-2:])
