"""The MLP of an :class:`~eft_prob.MLPSpec` in plain JAX, with exactly the theory's parameterization.

Parameters are a tuple of L dicts ``{"W": (n_ℓ, n_{ℓ-1}), "b": (n_ℓ,)}`` (book index order W_ij,
i = output neuron, j = input neuron), drawn as b ~ N(0, C_b), W ~ N(0, C_W/n_{ℓ-1})
(THEORY.md §1.2).  Gradient descent uses per-layer rates ηλ_b and ηλ_W/n_{ℓ-1}
(:func:`learning_rates`), which makes the output NTK equal to Ĥ of THEORY.md §1.3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .spec import MLPSpec

__all__ = ["apply", "empirical_ntk", "init", "learning_rates", "param_count", "preactivations"]


def init(spec: MLPSpec, key, dtype=None) -> tuple[dict, ...]:
    """Draw θ ~ p(θ): b^(ℓ) ~ N(0, C_b^(ℓ)), W^(ℓ) ~ N(0, C_W^(ℓ)/n_{ℓ-1})."""
    dtype = dtype or jnp.result_type(float)
    widths = spec.widths
    C_b, C_W = spec.layer_values("C_b", dtype), spec.layer_values("C_W", dtype)
    keys = jax.random.split(key, spec.depth)
    params = []
    for ell in range(spec.depth):
        n_in, n_out = widths[ell], widths[ell + 1]
        kW, kb = jax.random.split(keys[ell])
        W = jnp.sqrt(C_W[ell] / n_in) * jax.random.normal(kW, (n_out, n_in), dtype)
        b = jnp.sqrt(C_b[ell]) * jax.random.normal(kb, (n_out,), dtype)
        params.append({"W": W, "b": b})
    return tuple(params)


def preactivations(spec: MLPSpec, params, X) -> list[jax.Array]:
    """[z^(1), ..., z^(L)], each (N, n_ℓ), for inputs X of shape (N, n_0)."""
    sigma = spec.activation.fn
    zs = []
    h = X
    for ell, p in enumerate(params):
        z = h @ p["W"].T + p["b"]
        zs.append(z)
        if ell + 1 < len(params):
            h = sigma(z)
    return zs


def apply(spec: MLPSpec, params, X) -> jax.Array:
    """The network output f(X) = z^(L), shape (N, n_L)."""
    return preactivations(spec, params, X)[-1]


def learning_rates(spec: MLPSpec, dtype=None) -> tuple[dict, ...]:
    """Per-parameter-group learning-rate factors {"W": λ_W/n_{ℓ-1}, "b": λ_b}, shaped like params."""
    dtype = dtype or jnp.result_type(float)
    l_b, l_W = spec.layer_values("lambda_b", dtype), spec.layer_values("lambda_W", dtype)
    return tuple({"W": l_W[ell] / spec.widths[ell], "b": l_b[ell]} for ell in range(spec.depth))


def param_count(spec: MLPSpec) -> int:
    w = spec.widths
    return sum(w[ell] * w[ell + 1] + w[ell + 1] for ell in range(spec.depth))


def empirical_ntk(spec: MLPSpec, params, X) -> jax.Array:
    """Ĥ_{i1 i2; α1 α2} = Σ_μν λ_μν ∂z_{i1;α1}/∂θ_μ ∂z_{i2;α2}/∂θ_ν, shape (n_L, n_L, N, N)."""
    lr = learning_rates(spec, X.dtype)
    jac = jax.jacrev(lambda p: apply(spec, p, X))(params)  # leaves (N, n_L, *param_shape)

    def contract(J, lam):
        J = J.reshape(J.shape[0], J.shape[1], -1)
        return lam * jnp.einsum("aip,bjp->ijab", J, J)

    terms = jax.tree_util.tree_map(contract, jac, lr)
    return sum(jax.tree_util.tree_leaves(terms))
