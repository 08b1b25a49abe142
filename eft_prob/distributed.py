"""Several processes (hosts), one run: ensembles and NUTS chains split across processes and
gathered into one ArviZ InferenceData.

Start one Python process per host (or per accelerator), each calling :func:`initialize` before
any other JAX work, then the same functions with the same arguments on every process::

    import eft_prob as ep
    from eft_prob import distributed

    distributed.initialize()          # SLURM / Open MPI: detected; otherwise
    # distributed.initialize("host0:1234", num_processes=4, process_id=i)
    idata = distributed.prior_ensemble(spec, X_test, 100_000, jax.random.key(0))
    if jax.process_index() == 0:
        idata.to_netcdf("prior.nc")

Process i computes block i of ``ensemble.part_range`` on its own local devices (sharded over them
as in a single-process run; nothing is communicated during the computation), then the blocks are
gathered to every process (``jax.experimental.multihost_utils.process_allgather``) in process
order.  Network m and chain c keep the keys of a single-process run, so:

* ensembles are bit-identical to :func:`eft_prob.ensemble.prior_outputs` / ``train`` in one process
  (for ``prior_ensemble`` when every device vmaps the same number of networks: pass a
  ``chunk_size`` of at most M / (processes × local devices); for ``trained_ensemble`` on CPUs, or
  with an explicit ``batch_size`` on accelerators);
* NUTS chain c starts from the same key as in :func:`eft_prob.inference.run_nuts`; on CPUs with
  the ``"parallel"``/``"sharded"`` chain methods its draws are bit-identical too.

Every process returns the same InferenceData (write it from process 0).  Every process must make
the same calls in the same order with the same arguments; the functions check that the arguments
agree and raise ``ValueError`` on every process otherwise.
"""

from __future__ import annotations

import hashlib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions
from jax.experimental import multihost_utils

from . import _arviz, ensemble, inference
from .runner import f_group

__all__ = ["gather", "initialize", "prior_ensemble", "run_nuts", "trained_ensemble"]

_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(\d{1,5})$")
_ADDRESS_IN_REPR = re.compile(r" at 0x[0-9a-fA-F]+")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids=None,
    timeout_s: int = 300,
) -> tuple[int, int]:
    """Connect this process to the others (``jax.distributed.initialize``); returns
    ``(jax.process_index(), jax.process_count())``.

    Call it first, before any JAX computation.  With no arguments JAX detects the cluster (SLURM,
    Open MPI, Kubernetes/TPU environments).  Otherwise pass all three: ``coordinator_address``
    ``"host:port"`` (process 0's host, a free port reachable from every process),
    ``num_processes`` and this process's ``process_id`` in ``[0, num_processes)``.
    ``local_device_ids`` restricts this process to some of its host's accelerators (one process per
    GPU); ``timeout_s`` bounds the wait for the other processes.  CPU processes use gloo collectives.
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(
            "pass coordinator_address, num_processes and process_id together, or none of them (then "
            "JAX detects them from SLURM, Open MPI, ...)."
        )
    if all(given):
        m = _ADDRESS.match(coordinator_address) if isinstance(coordinator_address, str) else None
        if m is None or not 0 < int(m.group(2)) < 65536:
            raise ValueError(
                f"coordinator_address must be 'host:port' with a port in 1..65535 (process 0's host and a "
                f"free port), e.g. '10.0.0.1:1234' or '127.0.0.1:1234', got {coordinator_address!r}."
            )
        if isinstance(num_processes, bool) or not isinstance(num_processes, (int, np.integer)) or num_processes < 1:
            raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}.")
        if (
            isinstance(process_id, bool)
            or not isinstance(process_id, (int, np.integer))
            or not 0 <= process_id < num_processes
        ):
            raise ValueError(
                f"process_id must be an integer in [0, num_processes) = [0, {num_processes}), got {process_id!r}."
            )
        num_processes, process_id = int(num_processes), int(process_id)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, np.integer)) or timeout_s < 1:
        raise ValueError(f"timeout_s must be a positive integer (seconds), got {timeout_s!r}.")
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=int(timeout_s),
    )
    return jax.process_index(), jax.process_count()


def gather(tree, n_total: int):
    """Concatenate the processes' blocks of a pytree, in process order, on every process.

    Process i passes arrays whose leading axis is its block ``ensemble.part_range(n_total, (i, P))``
    of ``n_total`` items (networks, chains); returns NumPy arrays with leading axis ``n_total``.
    A collective: every process must call it with the same tree structure.  In one process it
    returns ``tree`` as NumPy arrays.
    """
    count, index = jax.process_count(), jax.process_index()
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    leaves = [np.asarray(a) for a in leaves]
    sizes = [len(ensemble.part_range(n_total, (p, count))) for p in range(count)]
    bad = [a.shape for a in leaves if a.shape[:1] != (sizes[index],)]
    if bad:
        raise ValueError(
            f"gather: process {index} of {count} must pass arrays of leading length {sizes[index]} (its block of "
            f"n_total={n_total}), got shapes {bad}."
        )
    if count == 1:
        return jax.tree_util.tree_unflatten(treedef, leaves)
    # process_allgather wants equal shapes everywhere: pad every block to the longest one
    width = max(sizes)
    padded = [np.concatenate([a, np.zeros((width - a.shape[0], *a.shape[1:]), a.dtype)]) for a in leaves]
    with jax.enable_x64(True):  # float64/int64 blocks travel unchanged when x64 is off
        stacked = multihost_utils.process_allgather(padded, tiled=False)
    out = [np.concatenate([s[p, : sizes[p]] for p in range(count)]) for s in stacked]
    return jax.tree_util.tree_unflatten(treedef, out)


def _digest(value) -> bytes:
    """A hash of an argument that is the same in every process for equal values."""
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        value = jax.random.key_data(value)
    if isinstance(value, (jax.Array, np.ndarray)):
        a = np.ascontiguousarray(np.asarray(value))
        return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).digest()
    if isinstance(value, numpyro.distributions.Distribution):  # a prior on noise_var: its type and parameters
        leaves = jax.tree_util.tree_leaves(value)
        return hashlib.sha256(
            type(value).__name__.encode() + b"".join(_digest(jnp.asarray(v)) for v in leaves)
        ).digest()
    # reprs of functions and other objects carry memory addresses, which differ between processes
    return hashlib.sha256(_ADDRESS_IN_REPR.sub("", repr(value)).encode()).digest()


def _check_same_arguments(**arguments) -> None:
    """Raise ValueError on every process when some argument differs between processes."""
    if jax.process_count() == 1:
        return
    names = sorted(arguments)
    mine = np.frombuffer(b"".join(_digest(arguments[k]) for k in names), np.uint8).reshape(len(names), 32)
    everyone = multihost_utils.process_allgather(mine, tiled=False)
    differ = [k for j, k in enumerate(names) if np.any(everyone[:, j] != everyone[0, j])]
    if differ:
        raise ValueError(
            f"{', '.join(differ)} differ between processes: every process must pass the same arguments "
            "(the same seed or key too; the split across processes is done here)."
        )


def _part() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


def prior_ensemble(spec, X_test, n_networks: int, key, *, chunk_size: int | None = None):
    """:func:`eft_prob.ensemble.prior_outputs` of ``n_networks`` networks split across processes.

    Returns an InferenceData with group ``prior_ensemble``: ``f_test`` [chain=1, draw=M,
    test_point, output] (the layout of ``eft-prob run``'s results.nc), equal to
    ``prior_outputs(spec, X_test, n_networks, key)`` in one process (bit for bit under the
    condition in the module docstring); attrs ``n_networks``, ``process_count``.
    """
    M = ensemble._check_count("n_networks", n_networks)
    key = ensemble._check_key(key)
    _check_same_arguments(spec=spec, X_test=np.asarray(X_test), n_networks=M, key=key, chunk_size=chunk_size)
    f = ensemble.prior_outputs(spec, X_test, M, key, chunk_size=chunk_size, part=_part())
    f = gather(f, M)
    attrs = {"n_networks": M, "process_count": jax.process_count()}
    return _arviz.make_inference_data({"prior_ensemble": f_group(f, attrs)}, attrs)


def trained_ensemble(
    spec,
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
):
    """:func:`eft_prob.ensemble.train` of ``n_networks`` networks split across processes.

    Returns an InferenceData with group ``trained_ensemble`` holding every field of the
    ``TrainResult`` over [chain=1, draw=M]: ``f_test`` [test_point, output] (trained test outputs,
    as in ``eft-prob run``'s results.nc), ``f_test_init``, ``f`` and ``f_init`` [obs, output]
    (training inputs), ``loss``, ``diverged``, ``steps_done``.  Unlike ``eft-prob run``, diverged
    networks are kept (flagged in ``diverged``; drop them from statistics).  Equal bit for bit to
    ``train(...)`` in one process for the same ``batch_size`` and platform.  ``checkpoint``: one
    directory shared by the processes (each writes ``process_<i>`` inside it) or None.
    """
    M = ensemble._check_count("n_networks", n_networks)
    key = ensemble._check_key(key)
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise ValueError(f"checkpoint must be a directory path or None, got {checkpoint!r}.")
    _check_same_arguments(
        spec=spec, X=np.asarray(X), y=np.asarray(y), X_test=np.asarray(X_test), n_networks=M,
        learning_rate=learning_rate, steps=steps, key=key, dtype=str(dtype), chunk_size=chunk_size,
        batch_size=batch_size,
    )  # fmt: skip
    index, count = _part()
    if checkpoint is not None and count > 1:
        checkpoint = os.path.join(os.fspath(checkpoint), f"process_{index}")
    res = ensemble.train(
        spec, X, y, X_test, M, learning_rate, steps, key, dtype=dtype, chunk_size=chunk_size,
        batch_size=batch_size, checkpoint=checkpoint, progress=progress, part=(index, count),
    )  # fmt: skip
    r = gather(res._asdict(), M)
    S, F = ("chain", "draw"), ("chain", "draw", "obs", "output")
    attrs = {
        "n_networks": M,
        "process_count": count,
        "steps": int(steps),
        "learning_rate": float(learning_rate),
        "diverged": int(r["diverged"].sum()),
    }
    group = f_group(
        r["test_final"],
        attrs,
        f_test_init=(("chain", "draw", "test_point", "output"), r["test_init"][None]),
        f_init=(F, r["train_init"][None]),
        loss=(S, r["loss"][None]),
        diverged=(S, r["diverged"][None]),
        steps_done=(S, r["steps_done"][None]),
    )
    group["f"] = (F, r["train_final"][None])  # the name f_group gives its first argument
    group = group.assign_coords(obs=np.arange(r["train_final"].shape[1]))
    return _arviz.make_inference_data({"trained_ensemble": group}, attrs)


def run_nuts(
    spec,
    X,
    y,
    X_test,
    *,
    noise_var,
    num_chains: int,
    num_warmup: int,
    num_samples: int,
    seed,
    chain_method: str | None = None,
    target_accept: float = 0.9,
    max_tree_depth: int = 10,
    max_divergence_fraction: float = 0.01,
    keep_weights: bool = False,
    progress: bool = False,
):
    """:func:`eft_prob.inference.run_nuts` with its ``num_chains`` chains split across processes.

    Process i runs chains ``ensemble.part_range(num_chains, (i, P))`` on its local devices
    (``chain_method`` is chosen per process, by :func:`~eft_prob.inference.choose_chain_method`
    for its own chains), each chain from the key it has in a single-process run; the draws and
    sampler statistics are gathered and every process returns the same InferenceData, with the
    groups of ``run_nuts`` (posterior, posterior_predictive, log_likelihood, sample_stats,
    observed_data, constant_data) over all ``num_chains`` chains; attrs add ``process_count``,
    and ``sampling_time_s`` is the slowest process's.  Needs ``num_chains >= process count``.
    A process left with one chain runs a discarded copy of it on a second local device, which keeps
    the chain bit-identical to the single-process run on CPUs (see ``run_nuts``'s ``chain_method``).
    """
    _check_same_arguments(
        spec=spec, X=np.asarray(X), y=np.asarray(y), X_test=np.asarray(X_test), noise_var=noise_var,
        num_chains=num_chains, num_warmup=num_warmup, num_samples=num_samples,
        seed=seed if isinstance(seed, jax.Array) else repr(seed), target_accept=target_accept,
        max_tree_depth=max_tree_depth, keep_weights=keep_weights,
    )  # fmt: skip
    count = jax.process_count()
    return inference._run_nuts(
        spec, X, y, X_test, noise_var=noise_var, num_chains=num_chains, num_warmup=num_warmup,
        num_samples=num_samples, seed=seed, chain_method=chain_method, target_accept=target_accept,
        max_tree_depth=max_tree_depth, max_divergence_fraction=max_divergence_fraction,
        keep_weights=keep_weights, progress=progress,
        part=_part() if count > 1 else None, gather=gather if count > 1 else None,
    )  # fmt: skip
