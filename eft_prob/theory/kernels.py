"""Infinite-width kernels: the NNGP kernel K^(ℓ) and the frozen NTK Θ^(ℓ) (THEORY.md §3.5, §6.2).

    K^(1)_{αβ}   = C_b^(1) + C_W^(1) x_α·x_β / n_0,
    K^(ℓ+1)_{αβ} = C_b + C_W ⟨σ_α σ_β⟩_{K^(ℓ)},
    Θ^(1)_{αβ}   = λ_b^(1) + λ_W^(1) x_α·x_β / n_0,
    Θ^(ℓ+1)_{αβ} = λ_b + λ_W ⟨σ_α σ_β⟩_{K^(ℓ)} + C_W ⟨σ'_α σ'_β⟩_{K^(ℓ)} Θ^(ℓ)_{αβ},

with the hyperparameters of layer ℓ+1 in each step.  At finite width, E[z z] = K + O(1/n) and
E[Ĥ] = Θ + O(1/n).  The recursion is a ``lax.scan`` over layers, so it compiles once whatever the
depth; it is float64, jit-able and differentiable in C_b, C_W, λ_b, λ_W and X.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import gauss
from .._config import float64_theory, is_concrete
from .._validate import check_inputs, check_psd
from ..spec import MLPSpec

__all__ = ["Blocks", "Kernels", "kernels", "nngp", "ntk", "output_kernels", "train_test_blocks"]


class Kernels(NamedTuple):
    """Kernels of every layer; index 0 is layer 1, index L-1 the output layer.

    Attributes
    ----------
    nngp : (L, N, N) array
        K^(ℓ), the infinite-width covariance of the preactivations z^(ℓ).
    ntk : (L, N, N) array
        Θ^(ℓ), the infinite-width (frozen) neural tangent kernel of z^(ℓ).
    """

    nngp: jax.Array
    ntk: jax.Array


def _first_layer(spec: MLPSpec, X):
    G0 = X @ X.T / spec.input_dim
    G0 = (G0 + G0.T) / 2  # the only symmetrization: every later step preserves exact symmetry
    C_b, C_W = spec.layer_values("C_b")[0], spec.layer_values("C_W")[0]
    l_b, l_W = spec.layer_values("lambda_b")[0], spec.layer_values("lambda_W")[0]
    return C_b + C_W * G0, l_b + l_W * G0


#: largest preactivation variance at which the Gaussian rules use σ's addition theorem when its
#: accuracy is bounded (tanh: arguments |z| <= 300; the four-input rule's nodes reach |z| <= 17.4·√K)
_SHIFT_KMAX = 256.0


def _shift_ok(spec: MLPSpec, X) -> bool:
    """Whether the Gaussian rules for ``spec`` on inputs ``X`` (the pair integrals of the kernel and
    vertex recursions, the three- and four-input tables of the NTK statistics) may use σ's addition
    theorem (:func:`eft_prob.gauss.shift_rule`): σ has one, and its arguments stay where it is exact.  For
    tanh that needs every layer's variance <= :data:`_SHIFT_KMAX`, checked on concrete values:
    K^(1)_αα = C_b + C_W·|x_α|²/n_0 and, since tanh² < 1, K^(ℓ+1)_αα < C_b + C_W.  Traced
    hyperparameters or inputs (inside jit or grad) keep direct evaluation."""
    rule = gauss.shift_rule(spec.activation)
    if rule is None:
        return False
    if rule.max_abs is None:
        return True
    if not is_concrete(spec, X):
        return False
    C_b, C_W = (np.broadcast_to(np.asarray(getattr(spec, k), np.float64), (spec.depth,)) for k in ("C_b", "C_W"))
    X = np.asarray(X, np.float64)
    k1 = C_b[0] + C_W[0] * np.max(np.sum(X * X, axis=1)) / spec.input_dim
    kmax = max(k1, float(np.max(C_b[1:] + C_W[1:]))) if len(C_b) > 1 else k1
    return bool(np.isfinite(kmax) and kmax <= _SHIFT_KMAX)


def _kernel_stack(spec: MLPSpec, X, quadrature: bool = False, orders=None, stack: bool = True, shift: bool = False):
    """The recursion; ``stack=False`` returns only the output layer (no (L, N, N) buffers); ``shift``:
    the pair integrals by σ's addition theorem (:func:`_shift_ok`)."""
    act = spec.activation
    orders = dict(orders) if orders else None
    K1, T1 = _first_layer(spec, X)
    if spec.depth == 1:
        return Kernels(K1[None], T1[None]) if stack else Kernels(K1, T1)
    hyper = tuple(spec.layer_values(k)[1:] for k in ("C_b", "C_W", "lambda_b", "lambda_W"))

    def step(carry, h):
        K, T = carry
        C_b, C_W, l_b, l_W = h
        # Closed forms are symmetric in (α, β) exactly and sigma_moments symmetrizes quadrature,
        # so K and Θ stay exactly symmetric without a transpose per layer (a large cost on CPU).
        ss, dd = gauss.sigma_moments(act, K, quadrature=quadrature, orders=orders, shift=shift)
        nxt = (C_b + C_W * ss, l_b + l_W * ss + C_W * dd * T)
        return nxt, (nxt if stack else None)

    (K_L, T_L), ys = jax.lax.scan(step, (K1, T1), hyper)
    if not stack:
        return Kernels(K_L, T_L)
    return Kernels(jnp.concatenate([K1[None], ys[0]]), jnp.concatenate([T1[None], ys[1]]))


# One compiled recursion per (architecture, shapes, options): eager calls reuse it instead of
# re-tracing the scan every time.  The spec is a pytree argument, so C_b, C_W, λ stay traceable.
_kernel_stack_jit = jax.jit(_kernel_stack, static_argnames=("quadrature", "orders", "stack", "shift"))


@jax.jit
def _cholesky_ok(K):
    return jnp.all(jnp.isfinite(jnp.linalg.cholesky(K)))


def _regularized(out: Kernels) -> Kernels:
    """Eager PSD check of the output-layer kernels (see eft_prob._validate.check_psd)."""
    K_L, T_L = (out.nngp[-1], out.ntk[-1]) if out.nngp.ndim == 3 else (out.nngp, out.ntk)
    if bool(_cholesky_ok(K_L)) and bool(_cholesky_ok(T_L)):
        return out  # exactly symmetric and positive definite: nothing to change
    K_L = check_psd(K_L, "The NNGP kernel K^(L)")
    T_L = check_psd(T_L, "The NTK Θ^(L)")
    if out.nngp.ndim == 2:
        return Kernels(K_L, T_L)
    return Kernels(out.nngp.at[-1].set(K_L), out.ntk.at[-1].set(T_L))


def _width_ratios(spec: MLPSpec, dtype=jnp.float64):
    """(r_1, ..., r_{L-1}), r_ℓ = n_ℓ/n_{ℓ-1}: the only way hidden widths enter the recursions."""
    w = spec.widths
    return jnp.asarray([w[l] / w[l - 1] for l in range(1, spec.depth)], dtype)


def _canonical(spec: MLPSpec) -> MLPSpec:
    """The spec with unit hidden widths and one output: same statistics given the width ratios, so one
    compilation serves every width and output dimension."""
    return spec.replace(hidden=(1,) * len(spec.hidden), output_dim=1)


def _compute(spec, X, quadrature, orders, regularize, stack):
    X = check_inputs(spec, X)
    key = tuple(sorted(orders.items())) if orders else None
    if key is not None:
        gauss._orders(orders)  # validate eagerly, with a clear message
    if is_concrete(spec, X):
        # the kernels do not depend on the widths: one compilation serves every width
        shift = _shift_ok(spec, X)
        out = _kernel_stack_jit(_canonical(spec), X, quadrature=quadrature, orders=key, stack=stack, shift=shift)
        return _regularized(out) if regularize else out
    return _kernel_stack(spec, X, quadrature, key, stack)  # inside a caller's trace


@float64_theory
def kernels(
    spec: MLPSpec, X, *, quadrature: bool = False, orders: dict | None = None, regularize: bool = True
) -> Kernels:
    """NNGP kernels and NTKs of all L layers for inputs X of shape (N, n_0).

    Parameters
    ----------
    spec : MLPSpec
    X : (N, input_dim) array
    quadrature : bool
        Force quadrature even where a closed form exists (for checks).
    orders : dict, optional
        Quadrature orders (see ``eft_prob.gauss.DEFAULT_ORDERS``).
    regularize : bool
        When called eagerly, check that the output-layer kernels are PSD and clip (with a
        :class:`~eft_prob.RegularizationWarning`) eigenvalues that rounding pushed below zero.

    Returns
    -------
    Kernels
        ``nngp`` and ``ntk``, each (L, N, N) float64.
    """
    return _compute(spec, X, quadrature, orders, regularize, stack=True)


@float64_theory
def output_kernels(
    spec: MLPSpec, X, *, quadrature: bool = False, orders: dict | None = None, regularize: bool = True
) -> Kernels:
    """Like :func:`kernels`, for the output layer only: ``nngp`` and ``ntk`` are (N, N)."""
    return _compute(spec, X, quadrature, orders, regularize, stack=False)


def nngp(spec: MLPSpec, X, *, all_layers: bool = False, **kwargs) -> jax.Array:
    """The NNGP kernel K^(L) (N, N) of the output layer, or all layers (L, N, N).

    ``E[z_{i;α} z_{j;β}] = δ_ij K_{αβ} + O(1/n)`` for a network drawn from ``spec``'s prior.
    See :func:`kernels` for the keyword arguments.
    """
    if all_layers:
        return kernels(spec, X, **kwargs).nngp
    return output_kernels(spec, X, **kwargs).nngp


def ntk(spec: MLPSpec, X, *, all_layers: bool = False, **kwargs) -> jax.Array:
    """The frozen NTK Θ^(L) (N, N) of the output layer, or all layers (L, N, N).

    ``E[Ĥ_{ij;αβ}] = δ_ij Θ_{αβ} + O(1/n)`` with Ĥ = Σ_μν λ_μν ∂z/∂θ_μ ∂z/∂θ_ν.
    See :func:`kernels` for the keyword arguments.
    """
    if all_layers:
        return kernels(spec, X, **kwargs).ntk
    return output_kernels(spec, X, **kwargs).ntk


class Blocks(NamedTuple):
    """Output-layer kernels split into training (A) and test (B) blocks, with checked targets y."""

    y: jax.Array
    K_AA: jax.Array
    K_AB: jax.Array
    K_BB: jax.Array
    T_AA: jax.Array
    T_BA: jax.Array


def train_test_blocks(spec: MLPSpec, X, y, X_test) -> Blocks:
    """Validate (X, y, X_test) and compute K and Θ on A ∪ B in one pass (called inside a float64 scope)."""
    from .._validate import check_targets

    X = check_inputs(spec, X, "X")
    X_test = check_inputs(spec, X_test, "X_test")
    y = check_targets(spec, y, X.shape[0])
    nA = X.shape[0]
    K, T = output_kernels(spec, jnp.concatenate([X, X_test]))
    return Blocks(y, K[:nA, :nA], K[:nA, nA:], K[nA:, nA:], T[:nA, :nA], T[nA:, :nA])
