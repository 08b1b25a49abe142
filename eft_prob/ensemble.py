"""Ensembles of real networks: prior draws (outputs or output-layer metrics) and full-batch GD
training, sharded over the local devices.

Every network gets its own key from ``jax.random.split(key, n_networks)``, so the draws do not
depend on the chunk size or on the number of devices (bit for bit under the conditions stated by
:func:`prior_outputs` and :func:`train`).  Prior draws (:func:`prior_outputs`,
:func:`prior_kernels`, and any per-network Monte Carlo through :func:`map_networks`) run
``shard_map`` over a 1-D mesh of the local devices, each device vmapping its networks in padded
chunks (each function compiles once).  Training (:func:`train`) shards the network axis the same
way, runs ``lax.map`` over each device's networks and a ``lax.scan`` over GD steps, stops
networks whose loss turns NaN/inf, and can checkpoint finished chunks to resume a killed run.

Several processes (hosts): ``part=(i, P)`` computes only the i-th of P contiguous blocks of the
M networks with their keys from the full split, so the blocks of processes 0..P-1, concatenated,
are the single-process ensemble; :mod:`eft_prob.distributed` does that under ``jax.distributed``
and gathers the blocks.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import sys
import time
import zipfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import nn
from ._config import StabilityWarning, precision_scope, warn
from ._io import atomic_write
from ._validate import check_inputs, check_targets
from .spec import MLPSpec
from .theory.kernels import ntk
from .theory.training import stability_bound
from .theory.vertex import _kernel_sqrt

__all__ = ["TrainResult", "auto_chunk", "map_networks", "part_range", "prior_kernels", "prior_outputs", "train"]

_CHUNK_BYTES = 256 * 2**20
_AXIS = "networks"  # the mesh axis the network axis is sharded over


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


def part_range(n_networks: int, part=None) -> range:
    """The networks of ``part=(i, P)``: the i-th of P contiguous blocks of ``range(n_networks)``,
    sizes differing by at most one (``range(n_networks)`` for ``part=None``).

    Block i is ``range(i·M // P, (i+1)·M // P)``; process i of P computes it with network m still
    drawn from key m of ``jax.random.split(key, M)``, so the blocks concatenate to the whole ensemble.
    """
    M = _check_count("n_networks", n_networks)
    if part is None:
        return range(M)
    ok = isinstance(part, (tuple, list)) and len(part) == 2
    ok = ok and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in part)
    if not ok or not (part[1] >= 1 and 0 <= part[0] < part[1]):
        raise ValueError(
            f"part must be None or (index, count) with 0 <= index < count, e.g. (jax.process_index(), "
            f"jax.process_count()), got {part!r}."
        )
    i, P_ = int(part[0]), int(part[1])
    if P_ > M:
        raise ValueError(f"part={part!r} splits {M} networks into {P_} parts: use at least one network per part.")
    return range(i * M // P_, (i + 1) * M // P_)


_MAP_PROGRAMS: collections.OrderedDict = collections.OrderedDict()


def _map_program(fn, mesh, n_args: int, cache_key):
    """jit(shard_map(vmap(fn))) over the mesh's axis, reused for an equal ``cache_key`` (default:
    the function itself) and the same devices, so repeated calls compile once."""
    key = (fn if cache_key is None else cache_key, tuple(mesh.devices.flat), n_args)
    try:
        hash(key)
    except TypeError:  # array-valued hyperparameters in the key: no caching
        key = None
    if key is not None and key in _MAP_PROGRAMS:
        _MAP_PROGRAMS.move_to_end(key)
        return _MAP_PROGRAMS[key]
    per_device = jax.vmap(fn, in_axes=(0,) + (None,) * n_args)
    # check_vma=False: no collectives, each device maps its own networks
    program = jax.jit(
        jax.shard_map(per_device, mesh=mesh, in_specs=(P(_AXIS),) + (P(),) * n_args, out_specs=P(_AXIS),
                      check_vma=False)
    )  # fmt: skip
    if key is not None:
        _MAP_PROGRAMS[key] = program
        while len(_MAP_PROGRAMS) > 16:
            _MAP_PROGRAMS.popitem(last=False)
    return program


def _sharded_map(fn, keys, chunk, devices, *args, cache_key=None):
    """``fn(key, *args)`` for every key; returns a pytree stacked over the keys, on ``devices[0]``.

    One compiled call takes ``c × len(devices)`` keys (c = min(chunk, ⌈M / len(devices)⌉), padded
    with copies of the last key): ``shard_map`` over a 1-D mesh of the devices, each device vmapping
    its c networks, ``args`` replicated.  Network m's arithmetic is the vmap body for c networks:
    bit-identical for any number of devices and any ``part`` at the same c (XLA may block a
    batched matmul differently for another batch size: measured on CPU, a last-bit difference at
    width 64 between c = 100 and c = 200, none at width 16).
    """
    M, n_dev = keys.shape[0], len(devices)
    c = min(chunk, -(-M // n_dev))
    per_call = c * n_dev
    n_calls = -(-M // per_call)
    pad = n_calls * per_call - M
    if pad:
        keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], pad, axis=0)])
    mesh = Mesh(np.asarray(devices), (_AXIS,))
    program = _map_program(fn, mesh, len(args), cache_key)
    rep = NamedSharding(mesh, P())
    args = tuple(jax.device_put(a, rep) for a in args)
    home = devices[0]
    outs = []
    for i in range(n_calls):
        k = jax.device_put(keys[i * per_call : (i + 1) * per_call], NamedSharding(mesh, P(_AXIS)))
        outs.append(jax.device_put(program(k, *args), home))
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs)[:M], *outs)


def map_networks(
    fn, n_networks: int, key, *args, chunk_size: int | None = None, devices=None, part=None, _cache_key=None
):
    """``fn(key_m, *args)`` for the M networks' keys ``jax.random.split(key, M)``, sharded over devices.

    The Monte Carlo primitive behind :func:`prior_outputs` and :func:`prior_kernels`, for any
    per-network statistic (an empirical NTK, a trained network, ...): ``fn`` maps one PRNG key
    and the replicated ``args`` to a pytree of arrays.  Returns that pytree stacked over networks
    (leading axis M, or ``len(part_range(M, part))``), on the first device.

    ``chunk_size``: networks vmapped per device and compiled call (default: all of a device's
    networks at once).  ``devices``: default ``jax.local_devices()``.  ``part``: see
    :func:`part_range`.  Network m always gets key m; its result is bit-identical for any number of
    devices and parts when every device vmaps the same number of networks (see
    :func:`prior_outputs`).  The compiled program is reused when ``fn`` is the same function object.
    """
    M = _check_count("n_networks", n_networks)
    rng = part_range(M, part)
    devices = _check_devices(devices)
    keys = jax.random.split(_check_key(key), M)[rng.start : rng.stop]
    chunk = len(rng) if chunk_size is None else _check_count("chunk_size", chunk_size)
    return _sharded_map(fn, keys, chunk, devices, *args, cache_key=_cache_key)


def prior_outputs(
    spec: MLPSpec,
    X,
    n_networks: int,
    key,
    *,
    chunk_size: int | None = None,
    layers: bool = False,
    devices=None,
    part=None,
):
    """Outputs f(X) of ``n_networks`` independent networks drawn from the prior.

    Returns (M, N, n_L); with ``layers=True`` a list of all preactivations [(M, N, n_ℓ)].
    Network m is drawn from key m of ``jax.random.split(key, M)``.  The networks are sharded over
    ``devices`` (default ``jax.local_devices()``), ``chunk_size`` of them vmapped per device and
    compiled call (default :func:`auto_chunk`, fewer when a device holds fewer networks).
    ``part=(i, P)`` returns only the networks ``part_range(M, part)`` (one process's block, see
    :func:`part_range`).  The draws are the same for any chunk size and number of devices; bit for
    bit whenever every device vmaps the same number of networks (a given ``chunk_size`` with at
    least that many networks per device), otherwise up to the last bit of wide networks.
    """
    X = check_inputs(spec, X)
    M = _check_count("n_networks", n_networks)
    chunk = _check_count("chunk_size", chunk_size or auto_chunk(spec, X.shape[0], M))

    def one(k, X):
        zs = nn.preactivations(spec, nn.init(spec, k, X.dtype), X)
        return zs if layers else zs[-1]

    cache = ("prior_outputs", *spec.tree_flatten(), X.dtype.str, layers)
    return map_networks(one, M, key, X, chunk_size=chunk, devices=devices, part=part, _cache_key=cache)


def prior_kernels(
    spec: MLPSpec,
    X,
    n_networks: int,
    key,
    *,
    chunk_size: int | None = None,
    layers: bool = False,
    devices=None,
    part=None,
    sampler: str = "weights",
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

    ``sampler``:

    * ``"weights"`` (default): draw θ ~ p(θ) and run the network.  Network m is network m of
      ``prior_outputs(spec, X, n_networks, key)`` (the same per-network key).  Cost O(n² N) per layer.
    * ``"kernels"``: draw each hidden layer's preactivations directly, z^(ℓ)_{i;·} ~ iid N(0, Ĝ^(ℓ))
      over its n_ℓ neurons given the metric of the layer below, which is their exact conditional law
      (the weights are Gaussian), so the sequence Ĝ^(1), ..., Ĝ^(L) has exactly the same distribution
      as with ``"weights"``, with other draws.  Cost O(n N² + N³) per layer: for N ≪ n (a few
      inputs, wide layers) it is many times cheaper.  (The square root of Ĝ is taken by eigh with
      eigenvalues clipped at 0, so singular metrics, e.g. of repeated inputs, are fine.)

    ``chunk_size``, ``devices`` and ``part`` as in :func:`prior_outputs`; network m gets key m for
    either sampler.  With ``layers=True`` returns the list [Ĝ^(1), ..., Ĝ^(L)] of every layer's
    metric, each (M, N, N).  Float64 when x64 is enabled.
    """
    X = check_inputs(spec, X)
    M = _check_count("n_networks", n_networks)
    if sampler not in ("weights", "kernels"):
        raise ValueError(f"sampler must be 'weights' or 'kernels', got {sampler!r}.")
    chunk = _check_count("chunk_size", chunk_size or auto_chunk(spec, X.shape[0], M))
    C_b, C_W = spec.layer_values("C_b", X.dtype), spec.layer_values("C_W", X.dtype)
    sigma = spec.activation.fn

    def metric(ell, h):  # Ĝ^(ℓ+1) from the layer-ℓ activations h (N, n_ℓ) (h = X at ℓ = 0)
        return C_b[ell] + C_W[ell] * (h @ h.T) / h.shape[-1]

    def one(k, X):
        params = nn.init(spec, k, X.dtype)
        zs = nn.preactivations(spec, params[:-1], X) if spec.depth > 1 else []
        hs = [X] + [sigma(z) for z in zs]  # the inputs of layers 1..L
        Gs = [metric(ell, h) for ell, h in enumerate(hs)]
        return Gs if layers else Gs[-1]

    def one_kernels(k, X):
        Gs = [metric(0, X)]
        keys = jax.random.split(k, max(1, spec.depth - 1))
        for ell in range(1, spec.depth):
            R = _kernel_sqrt(Gs[-1])  # R Rᵀ = Ĝ^(ℓ)
            z = jax.random.normal(keys[ell - 1], (spec.hidden[ell - 1], X.shape[0]), X.dtype) @ R.T  # (n_ℓ, N)
            Gs.append(metric(ell, sigma(z).T))
        return Gs if layers else Gs[-1]

    if sampler == "kernels":
        one = one_kernels
    cache = ("prior_kernels", *spec.tree_flatten(), X.dtype.str, layers, sampler)
    return map_networks(one, M, key, X, chunk_size=chunk, devices=devices, part=part, _cache_key=cache)


# ------------------------------------------------------------------------------------------------
# Trained ensembles: full-batch GD on many networks, sharded over devices, chunked, resumable.
#
# Bit-for-bit reproducibility.  Network m always gets key m of ``jax.random.split(key, M)``.  Each
# device runs ``lax.map`` over its networks, ``batch_size`` of them vectorized per map step, so the
# arithmetic of one network is the compiled loop body alone: it does not depend on how many
# networks a chunk or a device holds.  It does depend on ``batch_size`` (XLA lowers a batched matmul
# differently from a single one, and chaotic GD trajectories amplify the last-bit difference), so
# ``batch_size`` is recorded with a checkpoint.

_FORMAT = "eft_prob.ensemble.train/1"
_FIELDS = ("train_init", "test_init", "train_final", "test_final", "loss", "diverged", "steps_done")
_MANIFEST = "manifest.json"
# Accelerators: networks vectorized per device within this working-set estimate (larger batches
# keep a GPU busy; small networks are launch-bound otherwise).
_ACCEL_BATCH_BYTES = 4 * 2**30
_CHUNK_OUTPUT_BYTES = 64 * 2**20
_TARGET_CHUNKS = 16  # default chunking: progress and checkpoint granularity of ~1/16 of the work
_MIN_CHUNK_FLOP = 2 * 10**9

# Test hook: called as ``_after_chunk_hook(chunk_index, device_outputs)`` after each computed
# chunk has been stored (the tests simulate a crash and inspect the sharding through it).
_after_chunk_hook = None


class TrainResult(NamedTuple):
    """An ensemble of M networks before and after full-batch GD; every field is a NumPy array.

    Attributes
    ----------
    train_init, test_init : (M, N, n_L), (M, N_test, n_L)
        Outputs at initialization on X and X_test.  They are the control variates of THEORY.md
        §8.2: at infinite width f_B(t) − [z_B(0) − P_t z_A(0)] = P_t y for every network.
    train_final, test_final : (M, N, n_L), (M, N_test, n_L)
        Outputs after training.
    loss : (M,)
        Final training loss ½Σ(f(X) − y)².
    diverged : (M,) bool
        The loss became NaN or infinite.  Such a network was stopped at its last state with a finite
        loss, which the other fields report; drop it from statistics.
    steps_done : (M,) int32
        GD steps applied to the reported parameters: ``steps``, or fewer for a diverged network.
    """

    train_init: np.ndarray
    test_init: np.ndarray
    train_final: np.ndarray
    test_final: np.ndarray
    loss: np.ndarray
    diverged: np.ndarray
    steps_done: np.ndarray


def _gd_program(spec: MLPSpec, dtype, eta: float, steps: int, batch_size: int, mesh):
    """jit(shard_map(per-device ``lax.map`` over networks)): keys, X, y, X_test -> the fields."""
    lr = nn.learning_rates(spec, dtype)

    def loss_fn(p, X, y):
        r = nn.apply(spec, p, X) - y
        return 0.5 * jnp.sum(r * r)

    def one(key, X, y, X_test):
        p0 = nn.init(spec, key, dtype)

        def step(carry, _):
            # ``prev`` is the last state whose loss was finite; a network whose loss at ``cur`` is
            # NaN/inf goes back to it and stays there (``cur`` then holds the frozen state).
            cur, prev, alive, done = carry
            loss, g = jax.value_and_grad(loss_fn)(cur, X, y)
            ok = alive & jnp.isfinite(loss)
            new = jax.tree_util.tree_map(
                lambda c, gc, la, pv: jnp.where(ok, c - eta * la * gc, jnp.where(alive, pv, c)), cur, g, lr, prev
            )
            done = jnp.where(ok, done + 1, jnp.where(alive, jnp.maximum(done - 1, 0), done))
            return (new, cur, ok, done), None

        carry = (p0, p0, jnp.bool_(True), jnp.int32(0))
        # unroll=2: the (cur, prev) swap then needs no copy of the parameters (measured: a copy per
        # step costs +35% at width 256; with the unroll the mask costs ~1%).
        (cur, prev, alive, done), _ = jax.lax.scan(step, carry, None, length=steps, unroll=2)
        died = alive & ~jnp.isfinite(loss_fn(cur, X, y))  # the last state was never checked
        p = jax.tree_util.tree_map(lambda c, pv: jnp.where(died, pv, c), cur, prev)
        train_final = nn.apply(spec, p, X)
        r = train_final - y
        return (
            nn.apply(spec, p0, X),
            nn.apply(spec, p0, X_test),
            train_final,
            nn.apply(spec, p, X_test),
            0.5 * jnp.sum(r * r),
            died | ~alive,
            jnp.where(died, jnp.maximum(done - 1, 0), done),
        )

    def per_device(keys, X, y, X_test):
        f = lambda k: one(k, X, y, X_test)
        return jax.lax.map(f, keys, batch_size=batch_size if batch_size > 1 else None)

    # check_vma=False: the per-network scan carries constants (alive, done) next to varying
    # parameters; nothing is communicated between devices, so there is nothing to check.
    rep = P()
    sharded = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(_AXIS), rep, rep, rep), out_specs=P(_AXIS), check_vma=False
    )
    return jax.jit(sharded)


_PROGRAMS: collections.OrderedDict = collections.OrderedDict()


def _cached_program(spec: MLPSpec, dtype, eta: float, steps: int, batch_size: int, mesh):
    """:func:`_gd_program`, reused across calls with the same spec (by value; the activation by
    identity), dtype, rate, steps, batch and devices, so repeated ``train`` calls compile once."""
    children, aux = spec.tree_flatten()
    key = (children, aux, dtype.str, eta, steps, batch_size, tuple(mesh.devices.flat))
    try:
        hash(key)
    except TypeError:  # array-valued hyperparameters: no caching
        return _gd_program(spec, dtype, eta, steps, batch_size, mesh)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = _gd_program(spec, dtype, eta, steps, batch_size, mesh)
        while len(_PROGRAMS) > 8:
            _PROGRAMS.popitem(last=False)
    _PROGRAMS.move_to_end(key)
    return _PROGRAMS[key]


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def _default_batch(spec: MLPSpec, n_all: int, n_networks: int, devices, itemsize: int) -> int:
    """Networks vectorized per device: 1 on CPUs, a working-set budget on accelerators."""
    if devices[0].platform == "cpu":
        # XLA:CPU runs batched matmuls of small networks slower than one network at a time:
        # measured on 2 cores, width 256, batches of 8 / 64 networks were 1.4x / 3x slower than 1.
        return 1
    per_net = itemsize * (5 * nn.param_count(spec) + 4 * n_all * sum(spec.widths))
    per_device = -(-n_networks // len(devices))
    batches = -(-per_device // max(1, _ACCEL_BATCH_BYTES // per_net))
    return -(-per_device // batches)  # balanced, so that little padding is needed


def _default_chunk(spec: MLPSpec, n_networks: int, unit: int, n_train: int, n_out: int, steps: int, itemsize: int):
    """About 1/16 of the ensemble (progress and checkpoint granularity), but at least ~2 GFLOP of
    training per chunk (a chunk costs ~1-2 ms of dispatch and transfers) and at most 64 MiB of
    outputs, in whole units of ``batch_size × devices``."""
    w = spec.widths
    flop = 6 * n_train * sum(w[i] * w[i + 1] for i in range(spec.depth)) * max(steps, 1)
    chunk = max(-(-n_networks // _TARGET_CHUNKS), -(-_MIN_CHUNK_FLOP // flop))
    cap = max(unit, (_CHUNK_OUTPUT_BYTES // max(1, 2 * n_out * itemsize)) // unit * unit)
    chunk = min(_round_up(chunk, unit), cap)
    n_chunks = -(-n_networks // chunk)
    # equal chunks: every chunk is padded to the same compiled size, so a short last one is waste
    return min(_round_up(-(-n_networks // n_chunks), unit), n_networks)


def _check_optional_count(name, value):
    return None if value is None else _check_count(name, value)


def _check_dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise ValueError(f"dtype must be float64 (the default) or float32, got {dtype!r}.")
    return dt


def _check_devices(devices):
    if devices is None:
        return list(jax.local_devices())
    devices = list(devices)
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise ValueError(f"devices must be a non-empty sequence of jax devices (e.g. jax.devices()), got {devices!r}.")
    if len(set(devices)) != len(devices):
        raise ValueError("devices must not repeat a device.")
    if len({d.platform for d in devices}) != 1:
        raise ValueError(f"devices must all be of one platform, got {sorted({d.platform for d in devices})}.")
    if any(d.process_index != jax.process_index() for d in devices):
        raise ValueError(
            "devices must be local to this process (jax.local_devices()); for several hosts use "
            "eft_prob.distributed (each process computes its part=(jax.process_index(), jax.process_count()) "
            "of the ensemble on its local devices, and the parts are gathered)."
        )
    return devices


def _check_key(key):
    msg = "key must be a single JAX PRNG key, e.g. jax.random.key(0) (or a legacy jax.random.PRNGKey(0))"
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"{msg}, got an array of {key.shape} keys.")
        return key
    raw = np.asarray(key) if isinstance(key, (jax.Array, np.ndarray, list, tuple)) else None
    if raw is None or raw.dtype.kind not in "ui" or raw.ndim != 1:
        raise ValueError(f"{msg}, got {key!r}.")
    try:
        return jax.random.wrap_key_data(jnp.asarray(raw, dtype=jnp.uint32))
    except (TypeError, ValueError):
        raise ValueError(f"{msg}, got {key!r}.") from None


def _array_digest(a) -> str:
    a = np.ascontiguousarray(np.asarray(a))
    return f"{a.dtype.name}{list(a.shape)} sha256:{hashlib.sha256(a.tobytes()).hexdigest()[:32]}"


def _fingerprint_fields(spec, X, y, X_test, M, eta, steps, key, dtype) -> dict:
    """Everything that determines the results, as strings (a mismatch is reported field by field)."""
    return {
        "format": _FORMAT,
        "spec": repr(spec),
        "X": _array_digest(X),
        "y": _array_digest(y),
        "X_test": _array_digest(X_test),
        "n_networks": str(M),
        "learning_rate": float(eta).hex(),
        "steps": str(steps),
        "key": f"{jax.random.key_impl(key)} {np.asarray(jax.random.key_data(key)).tobytes().hex()}",
        "dtype": dtype.name,
    }


def _fields_diff(stored: dict, now: dict) -> str:
    """The arguments whose fingerprint fields differ, as "name: stored X, now Y; ..."."""
    diff = [k for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k)]
    return "; ".join(f"{k}: stored {stored.get(k)!r}, now {now.get(k)!r}" for k in diff)


def _atomic_write(path: str, write) -> None:
    """Write through a temporary file in the same directory and ``os.replace`` it into place, so a
    crash leaves either the old file or the complete new one, never a partial file."""

    def to(tmp):
        with open(tmp, "wb") as f:
            write(f)

    atomic_write(path, to, fsync=True)


class _Checkpoint:
    """A directory holding ``manifest.json`` (fingerprint and layout) and one ``chunk_NNNNNN.npz``
    per finished chunk.  One run per directory at a time."""

    def __init__(self, path, fields: dict, chunk_size, batch_size, platform):
        self.dir = os.fspath(path)
        if os.path.exists(self.dir) and not os.path.isdir(self.dir):
            raise ValueError(f"checkpoint must be a directory, but {self.dir!r} is a file.")
        os.makedirs(self.dir, exist_ok=True)
        self.fields = fields
        self.digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        self.stored = self._read_manifest(chunk_size, batch_size, platform)

    def _read_manifest(self, chunk_size, batch_size, platform):
        path = os.path.join(self.dir, _MANIFEST)
        if not os.path.exists(path):
            if any(n.startswith("chunk_") and n.endswith(".npz") for n in os.listdir(self.dir)):
                raise ValueError(
                    f"checkpoint directory {self.dir!r} holds chunk files but no {_MANIFEST}; "
                    "use an empty directory or delete those files."
                )
            return None
        try:
            with open(path) as f:
                man = json.load(f)
            stored_fields, layout = man["arguments"], man["layout"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint manifest {path!r} is unreadable ({e}); delete the directory.") from None
        if man.get("fingerprint") != self.digest:
            detail = _fields_diff(stored_fields, self.fields)
            raise ValueError(
                f"checkpoint directory {self.dir!r} belongs to a run with different arguments ({detail}). "
                "Results of different runs are never mixed: pass the original arguments to resume, "
                "or use a new (or emptied) directory."
            )
        if layout.get("platform") != platform:
            raise ValueError(
                f"checkpoint directory {self.dir!r} was written on {layout.get('platform')!r} devices, this run "
                f"uses {platform!r}: results differ in the last bits across platforms, so they are not mixed. "
                "Resume on the original platform or use a new directory."
            )
        for name, now in (("chunk_size", chunk_size), ("batch_size", batch_size)):
            if now is not None and layout.get(name) != now:
                raise ValueError(
                    f"checkpoint directory {self.dir!r} was written with {name}={layout.get(name)!r}, this run "
                    f"has {name}={now!r}; resuming would mix results that are not bit-identical. "
                    f"Pass {name}={layout.get(name)!r} (or None) to resume, or use a new directory."
                )
        return layout

    def write_manifest(self, layout: dict) -> None:
        if self.stored is not None:
            return
        man = {"format": _FORMAT, "fingerprint": self.digest, "arguments": self.fields, "layout": layout,
               "written_by": {"jax": jax.__version__}}  # fmt: skip
        _atomic_write(os.path.join(self.dir, _MANIFEST), lambda f: f.write(json.dumps(man, indent=1).encode()))

    def chunk_path(self, c: int) -> str:
        return os.path.join(self.dir, f"chunk_{c:06d}.npz")

    def load(self, c: int, start: int, stop: int, expected: dict):
        """The stored outputs of chunk ``c`` (validated), or None when it is not stored."""
        path = self.chunk_path(c)
        if not os.path.exists(path):
            return None
        fix = "delete this file to recompute the chunk"
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = (str(z["fingerprint"]), int(z["start"]), int(z["stop"]))
                arrays = {k: z[k] for k in _FIELDS}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"checkpoint chunk {path!r} is unreadable ({e}); {fix}.") from None
        if meta != (self.digest, start, stop):
            raise ValueError(
                f"checkpoint chunk {path!r} does not belong to this run (fingerprint or network range "
                f"[{start}, {stop}) differs); {fix}."
            )
        for k, (shape, dt) in expected.items():
            if arrays[k].shape != (stop - start, *shape) or arrays[k].dtype != dt:
                raise ValueError(f"checkpoint chunk {path!r}: {k} has the wrong shape or dtype; {fix}.")
        return arrays

    def save(self, c: int, start: int, stop: int, arrays: dict) -> None:
        meta = {"fingerprint": np.array(self.digest), "start": np.array(start), "stop": np.array(stop)}
        _atomic_write(self.chunk_path(c), lambda f: np.savez(f, **arrays, **meta))


class _Progress:
    """One line per chunk on stderr (rewritten in place on a terminal)."""

    def __init__(self, enabled: bool, n_chunks: int, n_networks: int, steps: int):
        self.enabled, self.n_chunks, self.M, self.steps = enabled, n_chunks, n_networks, steps
        self.stream = sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.computed = 0
        self.first = None

    def _emit(self, text: str, final: bool = False):
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + text.ljust(100) + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def resumed(self, chunks: int, networks: int, where: str):
        if chunks:
            self._emit(
                f"ensemble.train: resumed from {where}: {chunks}/{self.n_chunks} chunks ({networks} networks) done"
            )
            if self.tty:
                self.stream.write("\n")

    def chunk(self, done_chunks: int, done_networks: int, computed: int):
        now = time.perf_counter()
        if self.first is None:  # the first chunk includes compilation: rates start after it
            self.first = (now, computed)
        self.computed += computed
        t1, n1 = self.first
        n, dt = (self.computed - n1, now - t1) if self.computed > n1 else (self.computed, now - self.t0)
        rate = n / dt if dt > 0 else float("inf")
        eta = (self.M - done_networks) / rate if rate > 0 else float("inf")
        self._emit(
            f"ensemble.train: chunk {done_chunks}/{self.n_chunks}, {done_networks}/{self.M} networks, "
            f"{rate * self.steps:.3g} network-steps/s, {now - self.t0:.1f} s elapsed, ETA {eta:.0f} s",
            final=done_chunks == self.n_chunks,
        )


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
    dtype="float64",
    chunk_size: int | None = None,
    batch_size: int | None = None,
    checkpoint=None,
    progress: bool = False,
    devices=None,
    part=None,
) -> TrainResult:
    """Train ``n_networks`` independent networks by full-batch GD on L = ½ Σ (f(X) − y)².

    Parameter updates use the theory's learning-rate tensor: W^(ℓ) ← W − η λ_W/n_{ℓ-1} ∂L/∂W,
    b^(ℓ) ← b − η λ_b ∂L/∂b (THEORY.md §1.3); at infinite width this is the linear dynamics of
    §8.1–8.2, stable for η < 2/λ_max(Θ̃).

    Parameters
    ----------
    spec : MLPSpec
    X, y, X_test : (N, n_0), (N, n_L), (N_test, n_0) arrays
        Training inputs and targets, test inputs.  Finite.
    n_networks : int
        M; network m is initialized from key m of ``jax.random.split(key, M)``.
    learning_rate : float
        The global step η.  A :class:`~eft_prob.StabilityWarning` is raised before training if it is
        at or above the infinite-width bound 2/λ_max(Θ̃) (``theory.training.stability_bound``).
    steps : int
        Number of GD steps (a ``lax.scan``).
    key : PRNG key
    dtype : "float64" (default) or "float32"
        float64 runs inside a local x64 scope when JAX's x64 mode is off (the global flag is left alone).
    chunk_size : int, optional
        Networks per compiled call, progress line and checkpoint file.  Default: about 1/16 of
        the ensemble, in whole multiples of ``batch_size × len(devices)`` (other sizes are padded).
    batch_size : int, optional
        Networks vectorized together on one device (``lax.map(..., batch_size)``).  Default 1 on
        CPUs (fastest there); on accelerators as many as fit a working-set budget, at most
        M/len(devices).
    checkpoint : str or os.PathLike, optional
        A directory.  Every finished chunk is written there atomically, tagged with a fingerprint of
        the arguments; a run restarted with the same arguments skips the stored chunks and returns
        bit-identical results.  Different arguments raise ``ValueError``.
    progress : bool
        Print one line per chunk (throughput, ETA) to stderr.
    devices : sequence of jax devices, optional
        Default ``jax.local_devices()``.  The network axis is sharded over a 1-D mesh of them
        (``shard_map``: each device trains its own networks, no communication).
    part : (index, count), optional
        Train only the block ``part_range(M, part)`` of the M networks (network m still gets key
        m), e.g. ``(jax.process_index(), jax.process_count())`` on each of several hosts; the
        blocks concatenate to the full ensemble bit for bit.  The results then have that block's
        length; with ``checkpoint`` give each part its own directory
        (:func:`eft_prob.distributed.trained_ensemble` gathers the blocks).

    Returns
    -------
    TrainResult
        NumPy arrays; networks whose loss became NaN/inf are stopped at their last finite state,
        flagged in ``diverged`` and counted in a :class:`~eft_prob.StabilityWarning`.

    Notes
    -----
    For a fixed ``batch_size`` and platform the results are bit-identical whatever ``chunk_size``,
    the number of devices, or interruptions and restarts from a checkpoint (each device runs the same
    compiled per-batch loop body).  With the default ``batch_size`` that holds on CPUs; on
    accelerators the default depends on M and the device count, so pass ``batch_size`` explicitly
    for bit-identical results across device counts.
    """
    M = _check_count("n_networks", n_networks)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}.")
    steps = int(steps)
    try:
        eta = float(learning_rate)
    except (TypeError, ValueError):
        eta = float("nan")
    if not np.isfinite(eta) or eta <= 0:
        raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate!r}.")
    dt = _check_dtype(dtype)
    chunk_size = _check_optional_count("chunk_size", chunk_size)
    batch_size = _check_optional_count("batch_size", batch_size)
    devices = _check_devices(devices)
    key = _check_key(key)
    networks = part_range(M, part)
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise ValueError(f"checkpoint must be a directory path or None, got {checkpoint!r}.")
    scope = jax.enable_x64(True) if dt == np.float64 and not jax.config.jax_enable_x64 else contextlib.nullcontext()
    with scope:
        X = check_inputs(spec, X, "X")
        X_test = check_inputs(spec, X_test, "X_test")
        y = check_targets(spec, y, X.shape[0])
        _warn_if_unstable(spec, X, eta)
        X, y, X_test = (a.astype(dt) for a in (X, y, X_test))
        result = _train(
            spec, X, y, X_test, M, eta, steps, key, dt, chunk_size, batch_size, checkpoint, progress, devices,
            networks, part,
        )  # fmt: skip
    n_div = int(result.diverged.sum())
    if n_div:
        warn(
            f"{n_div} of {len(networks)} networks diverged (their training loss became NaN or infinite, first after "
            f"GD step {int(result.steps_done[result.diverged].min()) + 1}); they were stopped at their last finite "
            "state and are flagged in TrainResult.diverged. Lower learning_rate to keep them.",
            StabilityWarning,
        )
    return result


def _warn_if_unstable(spec: MLPSpec, X, eta: float) -> None:
    with precision_scope(X):  # float64 theory, also for a float32 run with x64 off
        bound = float(stability_bound(ntk(spec, X, regularize=False)))
    if eta >= bound:
        warn(
            f"learning_rate={eta:.4g} is at or above the infinite-width GD stability bound "
            f"2/λ_max(Θ̃) = {bound:.4g} of these training inputs: expect most networks to diverge. "
            f"Use a learning rate below {bound:.4g}.",
            StabilityWarning,
        )


def _train(
    spec, X, y, X_test, M_all, eta, steps, key, dt, chunk_size, batch_size, checkpoint, progress, devices, networks,
    part,
):  # fmt: skip
    # M_all networks in the run, of which this call trains the block ``networks`` (M of them)
    M = len(networks)
    n_dev, N, Nt, nL = len(devices), X.shape[0], X_test.shape[0], spec.output_dim
    platform = devices[0].platform
    ck = None
    if checkpoint is not None:
        fields = _fingerprint_fields(spec, X, y, X_test, M_all, eta, steps, key, dt)
        if part is not None:
            fields["part"] = f"{networks.start}:{networks.stop}"
        ck = _Checkpoint(checkpoint, fields, chunk_size and min(chunk_size, M), batch_size, platform)
        if ck.stored is not None:
            chunk_size, batch_size = ck.stored["chunk_size"], ck.stored["batch_size"]
    B = batch_size or _default_batch(spec, N + Nt, M, devices, dt.itemsize)
    unit = B * n_dev
    C = min(chunk_size or _default_chunk(spec, M, unit, N, (N + Nt) * nL, steps, dt.itemsize), M)
    padded = _round_up(C, unit)
    n_chunks = -(-M // C)
    if ck is not None:
        ck.write_manifest({"chunk_size": C, "batch_size": B, "n_chunks": n_chunks, "platform": platform})

    expected = {"train_init": ((N, nL), dt), "test_init": ((Nt, nL), dt), "train_final": ((N, nL), dt),
                "test_final": ((Nt, nL), dt), "loss": ((), dt), "diverged": ((), np.dtype(bool)),
                "steps_done": ((), np.dtype(np.int32))}  # fmt: skip
    out = {k: np.empty((M, *shape), d) for k, (shape, d) in expected.items()}
    ranges = [(c, c * C, min((c + 1) * C, M)) for c in range(n_chunks)]
    todo = []
    for c, start, stop in ranges:
        stored = ck.load(c, start, stop, expected) if ck is not None else None
        if stored is None:
            todo.append((c, start, stop))
        else:
            for k in _FIELDS:
                out[k][start:stop] = stored[k]
    done, done_networks = n_chunks - len(todo), M - sum(b - a for _, a, b in todo)
    bar = _Progress(progress, n_chunks, M, steps)
    bar.resumed(done, done_networks, str(checkpoint))
    if todo:
        mesh = Mesh(np.asarray(devices), (_AXIS,))
        program = _cached_program(spec, dt, eta, steps, B, mesh)
        X, y, X_test = jax.device_put((X, y, X_test), NamedSharding(mesh, P()))
        keys = jax.random.split(key, M_all)[networks.start : networks.stop]
        for c, start, stop in todo:
            k = keys[start:stop]
            if stop - start < padded:  # padding networks (copies of the last key) are dropped below
                k = jnp.concatenate([k, jnp.repeat(k[-1:], padded - (stop - start), axis=0)])
            res = program(jax.device_put(k, NamedSharding(mesh, P(_AXIS))), X, y, X_test)
            arrays = {
                name: np.asarray(a)[: stop - start].astype(expected[name][1], copy=False)
                for name, a in zip(_FIELDS, res)
            }
            for name in _FIELDS:
                out[name][start:stop] = arrays[name]
            if ck is not None:
                ck.save(c, start, stop, arrays)
            done += 1
            done_networks += stop - start
            bar.chunk(done, done_networks, stop - start)
            if _after_chunk_hook is not None:
                _after_chunk_hook(c, res)
    return TrainResult(**out)
