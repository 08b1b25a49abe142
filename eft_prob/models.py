"""The network and its prior p(θ) as NumPyro programs.

Both programs use the theory's scaling (W ~ N(0, C_W/n_{ℓ-1}), b ~ N(0, C_b)); site names are
``W1, b1, ..., WL, bL`` and the network output is the deterministic site ``"f"`` of shape
(N, n_L).  A layer with C_b = 0 has no bias site (its bias is exactly zero).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from . import nn
from ._config import is_concrete
from ._validate import check_inputs, check_positive, check_targets
from .spec import MLPSpec

__all__ = ["bayesian_mlp", "network_prior", "sample_params"]


def sample_params(spec: MLPSpec) -> tuple[dict, ...]:
    """Sample θ ~ p(θ) as NumPyro sites (inside a model)."""
    widths = spec.widths
    C_b, C_W = spec.layer_values("C_b"), spec.layer_values("C_W")
    params = []
    for ell in range(spec.depth):
        n_in, n_out = widths[ell], widths[ell + 1]
        W = numpyro.sample(
            f"W{ell + 1}",
            dist.Normal(0.0, jnp.sqrt(C_W[ell] / n_in)).expand([n_out, n_in]).to_event(2),
        )
        if is_concrete(spec.C_b) and float(np.broadcast_to(np.asarray(spec.C_b), (spec.depth,))[ell]) == 0.0:
            b = jnp.zeros((n_out,), W.dtype)
        else:
            b = numpyro.sample(f"b{ell + 1}", dist.Normal(0.0, jnp.sqrt(C_b[ell])).expand([n_out]).to_event(1))
        params.append({"W": W, "b": b})
    return tuple(params)


def network_prior(spec: MLPSpec, X):
    """Sample θ from the prior and record f(X) (N, n_L) as the deterministic site ``"f"``."""
    X = check_inputs(spec, X)
    params = sample_params(spec)
    return numpyro.deterministic("f", nn.apply(spec, params, X))


def bayesian_mlp(spec: MLPSpec, X, y=None, noise_var=0.01, X_test=None):
    """Bayesian MLP regression: θ ~ p(θ), y_α ~ N(f(x_α), noise_var) for every output neuron.

    ``noise_var`` is a positive float, or a NumPyro distribution used as its prior (site
    ``"noise_var"``).  Observations sit in a ``"data"`` plate of size N, so
    ``numpyro.infer.log_likelihood`` is pointwise per input.  With ``X_test`` (N_test, input_dim)
    the same network's outputs there are recorded as the deterministic site ``"f_test"``
    (N_test, n_L): the posterior predictive of f(X_test) without noise.
    """
    X = check_inputs(spec, X)
    if y is not None:
        y = check_targets(spec, y, X.shape[0])
    if X_test is not None:
        X_test = check_inputs(spec, X_test, "X_test")
    if isinstance(noise_var, dist.Distribution):
        noise_var = numpyro.sample("noise_var", noise_var)
    else:
        check_positive("noise_var", noise_var)
    params = sample_params(spec)
    f = numpyro.deterministic("f", nn.apply(spec, params, X))
    if X_test is not None:
        numpyro.deterministic("f_test", nn.apply(spec, params, X_test))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(f, jnp.sqrt(noise_var)).to_event(1), obs=y)
    return f
