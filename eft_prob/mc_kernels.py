"""Monte Carlo moments of the empirical NNGP kernel and the empirical NTK over random initializations.

For M networks drawn from the prior of an :class:`~eft_prob.MLPSpec`, :func:`kernel_moments`
returns the elementwise mean and unbiased variance of two (N, N) random kernels of every network:

* the output-layer metric Ĝ^(L)_{αβ} = C_b^(L) + (C_W^(L)/n_{L-1}) Σ_j σ_{j;α} σ_{j;β} (THEORY.md §3.2;
  network m is network m of :func:`eft_prob.ensemble.prior_kernels`).  E Ĝ = K + K^{1}/n_{L-1} and
  Var Ĝ_{αβ} = V_{(αβ)(αβ)}/n_{L-1} at O(1/n); it is the Rao–Blackwellized form of the empirical
  NNGP kernel (1/n_L) Σ_i z_{i;α} z_{i;β} (the same expectation, without the sampling noise of the
  output layer);
* the empirical NTK averaged over output neurons, Θ̂_{αβ} = (1/n_L) Σ_i Ĥ_{ii;αβ} with
  Ĥ = Σ_μν λ_μν ∂z/∂θ_μ ∂z/∂θ_ν (THEORY.md §1.3); E Θ̂ = Θ + O(1/n) (``theory.ntk``).

The NTK is built from per-layer Gram matrices, never from the (N, P) Jacobian.  With
δ^(ℓ)_{k;iα} = ∂z^(L)_{k;α}/∂z^(ℓ)_{i;α} (backpropagated one input at a time) and σ^(0) ≡ x,
∂z_{k;α}/∂W^(ℓ)_{ij} = δ^(ℓ)_{k;iα} σ^(ℓ-1)_{j;α} and ∂z_{k;α}/∂b^(ℓ)_i = δ^(ℓ)_{k;iα}, so

    Θ̂_{αβ} = (1/n_L) Σ_ℓ [λ_b^(ℓ) + (λ_W^(ℓ)/n_{ℓ-1}) Σ_j σ^(ℓ-1)_{j;α} σ^(ℓ-1)_{j;β}]
                         · Σ_{k,i} δ^(ℓ)_{k;iα} δ^(ℓ)_{k;iβ},

a Hadamard product of two Grams per layer (δ^(L)_{k;i} = δ_{ki}, so the last layer's factor is 1
after the average).  A network costs O(N·Σ n_ℓ n_{ℓ+1} + N² Σ n_ℓ) time and O(N² + N·n_L·Σ n_ℓ)
memory; the explicit Jacobian contraction costs O(N² P) time and O(N·P) memory.

Moments are streamed: each device keeps float64 running means and sums of squared deviations
(Welford, merged across batches and devices by Chan's formula), so no more than a batch of kernels
is ever held.  The network axis is sharded over the local devices (``shard_map`` on a 1-D mesh,
like :func:`eft_prob.ensemble.train`).
"""

from __future__ import annotations

import collections
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import nn
from ._validate import check_inputs
from .ensemble import _check_count, _check_devices, _check_dtype, _check_key, part_range
from .spec import MLPSpec

__all__ = ["KernelMoments", "empirical_kernels", "kernel_moments"]

_AXIS = "networks"
# Accelerators: networks vectorized per device within this working-set estimate.
_ACCEL_BATCH_BYTES = 4 * 2**30


class KernelMoments(NamedTuple):
    """Elementwise Monte Carlo moments over M prior networks; NumPy float64 arrays.

    Attributes
    ----------
    nngp_mean, nngp_var : (N, N)
        Mean and unbiased variance (divisor M − 1) of the output-layer metric Ĝ^(L).
    ntk_mean, ntk_var : (N, N)
        The same for the output-averaged empirical NTK Θ̂ = (1/n_L) Σ_i Ĥ_{ii}.
    n_networks : int
        M.
    """

    nngp_mean: np.ndarray
    nngp_var: np.ndarray
    ntk_mean: np.ndarray
    ntk_var: np.ndarray
    n_networks: int

    @property
    def nngp_sem(self) -> np.ndarray:
        """Standard error of ``nngp_mean``, sqrt(var/M)."""
        return np.sqrt(self.nngp_var / self.n_networks)

    @property
    def ntk_sem(self) -> np.ndarray:
        """Standard error of ``ntk_mean``, sqrt(var/M)."""
        return np.sqrt(self.ntk_var / self.n_networks)


def _kernels(spec: MLPSpec, params, X):
    """(Ĝ^(L), Θ̂) of one network; X and params of one dtype (see the module docstring)."""
    dtype = X.dtype
    L, widths, nL = spec.depth, spec.widths, spec.output_dim
    C_b, C_W = spec.layer_values("C_b", dtype), spec.layer_values("C_W", dtype)
    l_b, l_W = spec.layer_values("lambda_b", dtype), spec.layer_values("lambda_W", dtype)
    sigma = spec.activation.fn
    hs, ds = [X], []  # hs[ℓ-1] = σ^(ℓ-1), the input of layer ℓ; ds[ℓ-1] = σ'(z^(ℓ))
    for p in params[:-1]:
        z = hs[-1] @ p["W"].T + p["b"]
        # σ and σ' in one pass, with JAX's derivative convention (that of nn.empirical_ntk)
        h, d = jax.jvp(sigma, (z,), (jnp.ones_like(z),))
        hs.append(h)
        ds.append(d)
    gram = hs[-1] @ hs[-1].T / widths[L - 1]
    G = C_b[L - 1] + C_W[L - 1] * gram
    ntk = l_b[L - 1] + l_W[L - 1] * gram
    if L > 1:
        # δ^(L-1), (N, n_L, n_{L-1}): ∂z_k/∂z^(L-1)_i = W^(L)_{ki} σ'(z^(L-1)_i)
        delta = params[-1]["W"][None, :, :] * ds[-1][:, None, :]
        for ell in range(L - 1, 0, -1):  # layer ℓ's term, then δ^(ℓ-1)
            D = delta.reshape(delta.shape[0], -1)
            h = hs[ell - 1]
            ntk = ntk + (l_b[ell - 1] + (l_W[ell - 1] / widths[ell - 1]) * (h @ h.T)) * (D @ D.T) / nL
            if ell > 1:
                delta = (delta @ params[ell - 1]["W"]) * ds[ell - 2][:, None, :]
    return G, ntk


def empirical_kernels(spec: MLPSpec, params, X) -> tuple[jax.Array, jax.Array]:
    """The output-layer metric Ĝ^(L) and the output-averaged empirical NTK (1/n_L) Σ_i Ĥ_{ii} of one
    network, each (N, N), from per-layer Grams (see the module docstring).

    ``params`` as from :func:`eft_prob.nn.init`; the kernels have the dtype of ``params``.  The NTK
    equals ``jnp.trace(nn.empirical_ntk(spec, params, X)) / n_L`` (the explicit Jacobian
    contraction) to rounding.
    """
    X = check_inputs(spec, X)
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    return _kernels_jit(spec, params, X.astype(dtype))


_kernels_jit = jax.jit(_kernels)


def _moments_program(spec: MLPSpec, dtype, steps: int, batch: int, mesh):
    """jit(shard_map(per device: lax.scan over ``steps`` batches of ``batch`` networks)):
    keys (n_dev·steps·batch,), weights (same, 1 for a real network, 0 for padding), X ->
    per-device count (n_dev,), means (n_dev, 2, N, N) and M2 (n_dev, 2, N, N), float64."""

    def one(key, X):
        G, H = _kernels(spec, nn.init(spec, key, dtype), X)
        return jnp.stack([G, H]).astype(jnp.float64)

    def per_device(keys, weights, X):
        N = X.shape[0]
        keys = keys.reshape(steps, batch)
        weights = weights.reshape(steps, batch)

        def step(carry, kw):
            n_a, mean, m2 = carry
            k, w = kw
            x = jax.vmap(one, in_axes=(0, None))(k, X)  # (batch, 2, N, N)
            wx = w[:, None, None, None]
            n_b = jnp.sum(w)
            mean_b = jnp.sum(wx * x, axis=0) / jnp.maximum(n_b, 1.0)
            m2_b = jnp.sum(wx * (x - mean_b) ** 2, axis=0)
            # Chan et al.: merge (n_a, mean, m2) with the batch; batch = 1 is Welford's update
            n = n_a + n_b
            d = mean_b - mean
            frac = n_b / jnp.maximum(n, 1.0)
            return (n, mean + d * frac, m2 + m2_b + d * d * n_a * frac), None

        zero = jnp.zeros((2, N, N), jnp.float64)
        (n, mean, m2), _ = jax.lax.scan(step, (jnp.float64(0.0), zero, zero), (keys, weights))
        return n[None], mean[None], m2[None]

    sharded = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(_AXIS), P(_AXIS), P()), out_specs=P(_AXIS), check_vma=False
    )
    return jax.jit(sharded)


_PROGRAMS: collections.OrderedDict = collections.OrderedDict()


def _cached_program(spec: MLPSpec, dtype, steps: int, batch: int, mesh):
    """:func:`_moments_program`, reused across calls with equal arguments (array-valued
    hyperparameters are not cached)."""
    children, aux = spec.tree_flatten()
    key = (children, aux, np.dtype(dtype).str, steps, batch, tuple(mesh.devices.flat))
    try:
        hash(key)
    except TypeError:
        return _moments_program(spec, dtype, steps, batch, mesh)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = _moments_program(spec, dtype, steps, batch, mesh)
        while len(_PROGRAMS) > 8:
            _PROGRAMS.popitem(last=False)
    _PROGRAMS.move_to_end(key)
    return _PROGRAMS[key]


def _default_batch(spec: MLPSpec, N: int, per_device: int, platform: str, itemsize: int) -> int:
    """1 on CPUs (XLA:CPU runs batched matmuls slower than a loop, see ensemble.auto_chunk); on
    accelerators as many networks as fit a working-set budget."""
    if platform == "cpu":
        return 1
    w = spec.widths
    per_net = itemsize * (nn.param_count(spec) + N * (3 + spec.output_dim) * sum(w)) + 8 * 8 * N * N
    batches = -(-per_device // max(1, _ACCEL_BATCH_BYTES // per_net))
    return -(-per_device // batches)


def _setup(spec, X, n_networks, key, dtype, batch_size, devices, part=None):
    """Validated arguments and the compiled program's inputs (shared with benchmarks/bench_reference.py).
    ``part=(i, P)``: only block i of the networks (``ensemble.part_range``), with their keys from the
    split of all M."""
    M = _check_count("n_networks", n_networks)
    if M < 2:
        raise ValueError(f"n_networks must be at least 2 (the variance has divisor M - 1), got {n_networks!r}.")
    dt = _check_dtype(dtype)
    batch_size = None if batch_size is None else _check_count("batch_size", batch_size)
    devices = _check_devices(devices)
    key = _check_key(key)
    X = check_inputs(spec, X).astype(dt)
    block = part_range(M, part)
    M_here = len(block)
    n_dev = len(devices)
    per_device = -(-M_here // n_dev)
    B = min(batch_size or _default_batch(spec, X.shape[0], per_device, devices[0].platform, dt.itemsize), per_device)
    steps = -(-per_device // B)
    padded = n_dev * steps * B
    keys = jax.random.split(key, M)[block.start : block.stop]
    weights = np.zeros(padded, np.float64)
    weights[:M_here] = 1.0
    if padded > M_here:  # padding networks (copies of the last key) get weight 0
        keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], padded - M_here, axis=0)])
    mesh = Mesh(np.asarray(devices), (_AXIS,))
    program = _cached_program(spec, dt, steps, B, mesh)
    args = (
        jax.device_put(keys, NamedSharding(mesh, P(_AXIS))),
        jax.device_put(jnp.asarray(weights), NamedSharding(mesh, P(_AXIS))),
        jax.device_put(X, NamedSharding(mesh, P())),
    )
    return M, program, args


def _merge(n, mean, m2):
    """Chan's merge of per-device (n_d, mean_d, m2_d) in float64 NumPy."""
    n, mean, m2 = (np.asarray(a, np.float64) for a in (n, mean, m2))
    tot, mu, s = 0.0, np.zeros_like(mean[0]), np.zeros_like(m2[0])
    for n_d, mean_d, m2_d in zip(n, mean, m2):
        if n_d == 0:
            continue
        new = tot + n_d
        d = mean_d - mu
        mu = mu + d * (n_d / new)
        s = s + m2_d + d * d * (tot * n_d / new)
        tot = new
    return tot, mu, s


def _partial_moments(spec, X, n_networks, key, dtype, batch_size, devices, part=None):
    """(M, (count, mean, sum of squared deviations)) over the networks of ``part`` (all for None),
    float64 NumPy; mean and M2 are (2, N, N) (NNGP metric, NTK).  eft_prob.distributed merges the
    processes' parts with :func:`_merge`."""
    with jax.enable_x64(True):
        M, program, args = _setup(spec, X, n_networks, key, dtype, batch_size, devices, part)
        n, mean, m2 = program(*args)
    return M, _merge(n, mean, m2)


def kernel_moments(
    spec: MLPSpec,
    X,
    n_networks: int,
    key,
    *,
    dtype="float64",
    batch_size: int | None = None,
    devices=None,
) -> KernelMoments:
    """Elementwise mean and unbiased variance of Ĝ^(L) and of the empirical NTK over ``n_networks``
    prior networks (see the module docstring for the statistics and the algorithm).

    Parameters
    ----------
    spec : MLPSpec
    X : (N, input_dim) array
    n_networks : int
        M ≥ 2; network m is initialized from key m of ``jax.random.split(key, M)``, as in
        :func:`eft_prob.ensemble.prior_kernels`.
    key : PRNG key
    dtype : "float64" (default) or "float32"
        Precision of the networks; the moments are always accumulated in float64 (inside a local
        x64 scope when JAX's x64 mode is off; the global flag is left alone).
    batch_size : int, optional
        Networks vectorized together on one device.  Default 1 on CPUs, a working-set budget on
        accelerators.  Memory per device is about ``batch_size`` networks' activations, Grams and
        (2, N, N) kernels, plus four (N, N) float64 accumulators.
    devices : sequence of jax devices, optional
        Default ``jax.local_devices()``; the networks are split evenly over a 1-D mesh of them.

    Returns
    -------
    KernelMoments
        ``nngp_mean``, ``nngp_var``, ``ntk_mean``, ``ntk_var`` (N, N) and their standard errors
        ``nngp_sem``, ``ntk_sem``.
    """
    M, (_, mu, s) = _partial_moments(spec, X, n_networks, key, dtype, batch_size, devices)
    var = s / (M - 1)
    return KernelMoments(mu[0], var[0], mu[1], var[1], M)
