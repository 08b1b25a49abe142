"""Ensembles of real networks: prior draws (outputs or output-layer metrics) and full-batch GD
training, vmapped and chunked.

Every network gets its own key from ``jax.random.split(key, n_networks)``, so results do not
depend on the chunk size.  Chunks are padded to a fixed size so each function compiles once.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import nn
from ._validate import check_inputs, check_targets
from .spec import MLPSpec

__all__ = ["TrainResult", "auto_chunk", "prior_kernels", "prior_outputs", "train"]

_CHUNK_BYTES = 256 * 2**20


# On the CPU backend XLA runs large batched matmuls slower than a loop over networks: measured on
# 2 cores at width 256, batches of ~8 MiB of parameters (16 networks) were 1.5x faster than
# memory-sized batches for prior draws, and one network at a time 1.6-1.9x faster for GD training.
# Accelerators want the largest batch that fits.
_CPU_BATCH_BYTES = {"prior": 8 * 2**20, "train": 0}


def auto_chunk(spec: MLPSpec, n_inputs: int, n_networks: int, copies: int = 1, kind: str = "prior") -> int:
    """Networks per compiled batch: ~``copies`` copies of parameters and activations within 256 MiB,
    capped on the CPU backend (see ``_CPU_BATCH_BYTES``)."""
    per_net = 8 * copies * (nn.param_count(spec) + n_inputs * sum(spec.widths))
    chunk = max(1, min(n_networks, _CHUNK_BYTES // max(per_net, 1)))
    if jax.default_backend() == "cpu":
        chunk = min(chunk, max(1, _CPU_BATCH_BYTES[kind] // max(per_net, 1)))
    return int(chunk)


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _chunked(fn, keys, chunk, *args):
    """Apply jit(vmap(fn)) over keys in padded chunks; returns a pytree stacked over all keys."""
    M = keys.shape[0]
    n_chunks = math.ceil(M / chunk)
    pad = n_chunks * chunk - M
    if pad:
        keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], pad, axis=0)])
    vf = jax.jit(jax.vmap(fn, in_axes=(0,) + (None,) * len(args)))
    outs = [vf(keys[c * chunk : (c + 1) * chunk], *args) for c in range(n_chunks)]
    out = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs)[:M], *outs)
    return out


def prior_outputs(spec: MLPSpec, X, n_networks: int, key, *, chunk_size: int | None = None, layers: bool = False):
    """Outputs f(X) of ``n_networks`` independent networks drawn from the prior.

    Returns (M, N, n_L); with ``layers=True`` a list of all preactivations [(M, N, n_ℓ)].
    """
    X = check_inputs(spec, X)
    M = _check_count("n_networks", n_networks)
    chunk = chunk_size or auto_chunk(spec, X.shape[0], M)
    keys = jax.random.split(key, M)

    def one(k, X):
        zs = nn.preactivations(spec, nn.init(spec, k, X.dtype), X)
        return zs if layers else zs[-1]

    return _chunked(one, keys, _check_count("chunk_size", chunk), X)


def prior_kernels(
    spec: MLPSpec, X, n_networks: int, key, *, chunk_size: int | None = None, layers: bool = False
) -> jax.Array | list[jax.Array]:
    """The output-layer metric Ĝ^(L) of ``n_networks`` independent prior networks, (M, N, N).

    Ĝ^(ℓ)_{αβ} = C_b^(ℓ) + (C_W^(ℓ)/n_{ℓ-1}) Σ_j σ(z^(ℓ-1)_{j;α}) σ(z^(ℓ-1)_{j;β})  (THEORY.md §3.2),
    with σ(z^(0)) ≡ x, so Ĝ^(1) is not random.  Given layers 1..ℓ-1 the preactivations z^(ℓ)_{i;·}
    are exactly iid N(0, Ĝ^(ℓ)) over i, so Ĝ is the Rao–Blackwellized estimator of their moments
    (THEORY.md §12, item 9), free of the sampling noise of layer ℓ itself:

    * E[z_{i;α} z_{i;β}] = E[Ĝ_{αβ}];
    * for i ≠ k, E[z_{i;α1} z_{i;α2} z_{k;α3} z_{k;α4}] - E[z z] E[z z] = Cov(Ĝ_{α1α2}, Ĝ_{α3α4})
      (the connected four-point function, V_{(α1α2)(α3α4)}/n_{ℓ-1} + O(1/n²));
    * E[z_{i;α}⁴] - 3 E[z_{i;α}²]² = 3 Var(Ĝ_{αα}).

    Network m is network m of ``prior_outputs(spec, X, n_networks, key)`` (the same per-network
    key), so results do not depend on ``chunk_size``.  With ``layers=True`` returns the list
    [Ĝ^(1), ..., Ĝ^(L)] of every layer's metric, each (M, N, N).  Float64 when x64 is enabled.
    """
    X = check_inputs(spec, X)
    M = _check_count("n_networks", n_networks)
    chunk = chunk_size or auto_chunk(spec, X.shape[0], M)
    keys = jax.random.split(key, M)
    C_b, C_W = spec.layer_values("C_b", X.dtype), spec.layer_values("C_W", X.dtype)
    sigma = spec.activation.fn

    def one(k, X):
        params = nn.init(spec, k, X.dtype)
        zs = nn.preactivations(spec, params[:-1], X) if spec.depth > 1 else []
        hs = [X] + [sigma(z) for z in zs]  # the inputs of layers 1..L
        Gs = [C_b[ell] + C_W[ell] * (h @ h.T) / h.shape[-1] for ell, h in enumerate(hs)]
        return Gs if layers else Gs[-1]

    return _chunked(one, keys, _check_count("chunk_size", chunk), X)


class TrainResult(NamedTuple):
    """Outputs of an ensemble before and after training, each (M, N, n_L).

    ``train_*`` are on the training inputs X, ``test_*`` on X_test; ``loss`` is the final MSE
    loss ½Σ(f − y)² of each network (M,).
    """

    train_init: jax.Array
    test_init: jax.Array
    train_final: jax.Array
    test_final: jax.Array
    loss: jax.Array


def _gd_step(spec, lr, eta, X, y):
    def loss_fn(p):
        r = nn.apply(spec, p, X) - y
        return 0.5 * jnp.sum(r * r)

    def step(p, _):
        g = jax.grad(loss_fn)(p)
        p = jax.tree_util.tree_map(lambda a, ga, la: a - eta * la * ga, p, g, lr)
        return p, None

    return loss_fn, step


def train(
    spec: MLPSpec,
    X,
    y,
    X_test,
    n_networks: int,
    learning_rate: float,
    steps: int,
    key,
    *,
    chunk_size: int | None = None,
) -> TrainResult:
    """Train ``n_networks`` independent networks by full-batch GD on L = ½ Σ (f(X) − y)².

    Parameter updates use the theory's learning-rate tensor: W^(ℓ) ← W − η λ_W/n_{ℓ-1} ∂L/∂W,
    b^(ℓ) ← b − η λ_b ∂L/∂b (THEORY.md §1.3).  The steps run in a ``lax.scan``.
    """
    X = check_inputs(spec, X, "X")
    X_test = check_inputs(spec, X_test, "X_test")
    y = check_targets(spec, y, X.shape[0])
    M = _check_count("n_networks", n_networks)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}.")
    eta = float(learning_rate)
    if not np.isfinite(eta) or eta <= 0:
        raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate!r}.")
    chunk = chunk_size or auto_chunk(spec, X.shape[0] + X_test.shape[0], M, copies=4, kind="train")
    lr = nn.learning_rates(spec, X.dtype)
    loss_fn, step = _gd_step(spec, lr, eta, X, y)
    steps = int(steps)

    def one(k, X, X_test):
        p0 = nn.init(spec, k, X.dtype)
        p, _ = jax.lax.scan(step, p0, None, length=steps)
        return (
            nn.apply(spec, p0, X),
            nn.apply(spec, p0, X_test),
            nn.apply(spec, p, X),
            nn.apply(spec, p, X_test),
            loss_fn(p),
        )

    out = _chunked(one, jax.random.split(key, M), _check_count("chunk_size", chunk), X, X_test)
    return TrainResult(*out)
