"""Several processes (hosts), one run: ensembles and NUTS chains split across processes and
gathered into one ArviZ InferenceData; Monte Carlo kernel moments and the trained O(1/n) marginals
split the same way and gathered into one result.

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
gathered to every process (an all-gather over every device, as
``jax.experimental.multihost_utils.process_allgather``, that returns only once every local device
has finished it) in process order.  Network m and chain c keep the keys of a single-process run, so:

* ensembles are bit-identical to :func:`eft_prob.ensemble.prior_outputs` / ``train`` in one process
  (for ``prior_ensemble`` when every device vmaps the same number of networks: pass a
  ``chunk_size`` of at most M / (processes × local devices); for ``trained_ensemble`` on CPUs, or
  with an explicit ``batch_size`` on accelerators);
* NUTS chain c starts from the same key as in :func:`eft_prob.inference.run_nuts`; on CPUs with
  the ``"parallel"``/``"sharded"`` chain methods its draws are bit-identical too.

* :func:`kernel_moments` merges the processes' running moments (equal to
  :func:`eft_prob.mc_kernels.kernel_moments` in one process up to the rounding of the merge order);
* :func:`trained_marginals` gives each process a contiguous block of the batches of test inputs of
  :func:`eft_prob.theory.nlo_trained_marginals` (bit-identical to one process on CPUs).

Every process returns the same InferenceData or result (write it from process 0).  When the local
part of ``prior_ensemble``, ``trained_ensemble``, ``kernel_moments`` or ``trained_marginals`` fails on
some process (a checkpoint of another run, a memory limit, ...), that process raises its error and
every other process a ``RuntimeError`` quoting it, instead of waiting for it in the gather.  Every process must make
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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import _arviz, ensemble, inference
from .runner import f_group

__all__ = [
    "gather",
    "initialize",
    "kernel_moments",
    "prior_ensemble",
    "run_nuts",
    "trained_ensemble",
    "trained_marginals",
]

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


def _identity(x):
    return x


def _allgather(tree):
    """``multihost_utils.process_allgather(tree, tiled=False)`` (NumPy leaves stacked over processes,
    equal shapes everywhere) that returns only after every local device has finished the all-gather.

    process_allgather reads local device 0's copy of the result and returns while the other local
    devices may still be inside the collective, so the next program over several devices can be
    launched while this one is in flight.  Programs with collectives launched back to back over the
    same CPU devices of a multi-process (gloo) run are what deadlocked in the loopback test (see
    ``inference._sharded_chains``); waiting for every shard keeps at most one in flight.
    """
    count = jax.process_count()
    devices = np.array(jax.devices()).reshape(count, jax.local_device_count())
    mesh = jax.sharding.Mesh(devices, ("processes", "local_devices"))
    stacked = NamedSharding(mesh, P("processes"))
    replicate = jax.jit(_identity, out_shardings=NamedSharding(mesh, P()))

    def one(leaf):
        local = np.asarray(leaf)[None]
        blocks = [jax.device_put(local, d) for d in jax.local_devices()]
        whole = jax.make_array_from_single_device_arrays((count, *local.shape[1:]), stacked, blocks)
        out = replicate(whole)
        out.block_until_ready()  # every local shard, not only the one read below
        return np.asarray(out.addressable_data(0))

    return jax.tree_util.tree_map(one, tree)


def gather(tree, n_total: int):
    """Concatenate the processes' blocks of a pytree, in process order, on every process.

    Process i passes arrays whose leading axis is its block ``ensemble.part_range(n_total, (i, P))``
    of ``n_total`` items (networks, chains); returns NumPy arrays with leading axis ``n_total``.
    A collective: every process must call it with the same tree structure.  In one process it
    returns ``tree`` as NumPy arrays.
    """
    count = jax.process_count()
    sizes = [len(ensemble.part_range(n_total, (p, count))) for p in range(count)]
    return _gather_blocks(tree, sizes, f"its block of n_total={n_total}")


def _gather_blocks(tree, sizes, what: str):
    """:func:`gather` for blocks of any sizes (process p passes ``sizes[p]`` items, possibly 0)."""
    count, index = jax.process_count(), jax.process_index()
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    leaves = [np.asarray(a) for a in leaves]
    bad = [a.shape for a in leaves if a.shape[:1] != (sizes[index],)]
    if bad:
        raise ValueError(
            f"gather: process {index} of {count} must pass arrays of leading length {sizes[index]} ({what}), "
            f"got shapes {bad}."
        )
    if count == 1:
        return jax.tree_util.tree_unflatten(treedef, leaves)
    # process_allgather wants equal shapes everywhere: pad every block to the longest one
    width = max(max(sizes), 1)
    padded = [np.concatenate([a, np.zeros((width - a.shape[0], *a.shape[1:]), a.dtype)]) for a in leaves]
    with jax.enable_x64(True):  # float64/int64 blocks travel unchanged when x64 is off
        stacked = _allgather(padded)
    out = [np.concatenate([s[p, : sizes[p]] for p in range(count)]) for s in stacked]
    return jax.tree_util.tree_unflatten(treedef, out)


_MESSAGE_BYTES = 2048


def _run_everywhere(fn):
    """``fn()`` on this process, then agree on the outcome: when it raised on some process, every
    process raises (the failing one its own exception, the others a RuntimeError quoting it), so
    that no process waits forever in a later collective.  A collective."""
    error = None
    try:
        result = fn()
    except Exception as e:  # re-raised below, on every process
        error, result = e, None
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return result
    text = b"" if error is None else f"{type(error).__name__}: {error}".encode()[: _MESSAGE_BYTES - 1]
    mine = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
    mine[0] = error is not None
    mine[1 : 1 + len(text)] = np.frombuffer(text, np.uint8)
    everyone = _allgather(mine)
    failed = [p for p in range(everyone.shape[0]) if everyone[p, 0]]
    if error is not None:
        raise error
    if failed:
        p = failed[0]
        message = bytes(everyone[p, 1:]).rstrip(b"\0").decode(errors="replace")
        raise RuntimeError(f"process {p} of {everyone.shape[0]} failed, so this one stops too: {message}")
    return result


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
    everyone = _allgather(mine)
    differ = [k for j, k in enumerate(names) if np.any(everyone[:, j] != everyone[0, j])]
    if differ:
        raise ValueError(
            f"{', '.join(differ)} differ between processes: every process must pass the same arguments "
            "(the same seed or key too; the split across processes is done here)."
        )


def _part() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


def _prior_outputs(spec, X_test, n_networks, key, chunk_size):
    """(M, the gathered prior_outputs (M, N, n_L) as NumPy): the computation of :func:`prior_ensemble`
    (also eft-prob run's, without the InferenceData)."""
    M = ensemble._check_count("n_networks", n_networks)
    key = ensemble._check_key(key)
    _check_same_arguments(spec=spec, X_test=np.asarray(X_test), n_networks=M, key=key, chunk_size=chunk_size)
    f = _run_everywhere(lambda: ensemble.prior_outputs(spec, X_test, M, key, chunk_size=chunk_size, part=_part()))
    return M, gather(f, M)


def prior_ensemble(spec, X_test, n_networks: int, key, *, chunk_size: int | None = None):
    """:func:`eft_prob.ensemble.prior_outputs` of ``n_networks`` networks split across processes.

    Returns an InferenceData with group ``prior_ensemble``: ``f_test`` [chain=1, draw=M,
    test_point, output] (the layout of ``eft-prob run``'s results.nc), equal to
    ``prior_outputs(spec, X_test, n_networks, key)`` in one process (bit for bit under the
    condition in the module docstring); attrs ``n_networks``, ``process_count``.
    """
    M, f = _prior_outputs(spec, X_test, n_networks, key, chunk_size)
    attrs = {"n_networks": M, "process_count": jax.process_count()}
    return _arviz.make_inference_data({"prior_ensemble": f_group(f, attrs)}, attrs)


def _train(
    spec, X, y, X_test, n_networks, learning_rate, steps, key, *, dtype, chunk_size, batch_size, checkpoint, progress
) -> ensemble.TrainResult:
    """The gathered ``ensemble.train`` result (NumPy fields over all M networks): the computation of
    :func:`trained_ensemble` (also eft-prob run's, without the InferenceData)."""
    M = ensemble._check_count("n_networks", n_networks)
    key = ensemble._check_key(key)
    _check_same_arguments(
        spec=spec, X=np.asarray(X), y=np.asarray(y), X_test=np.asarray(X_test), n_networks=M,
        learning_rate=learning_rate, steps=steps, key=key, dtype=str(dtype), chunk_size=chunk_size,
        batch_size=batch_size,
    )  # fmt: skip
    index, count = _part()

    def local():  # a checkpoint may be wrong on one process only: every process hears of it
        path = checkpoint
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"checkpoint must be a directory path or None, got {path!r}.")
        if path is not None and count > 1:
            path = os.path.join(os.fspath(path), f"process_{index}")
        return ensemble.train(
            spec, X, y, X_test, M, learning_rate, steps, key, dtype=dtype, chunk_size=chunk_size,
            batch_size=batch_size, checkpoint=path, progress=progress, part=(index, count),
        )  # fmt: skip

    return ensemble.TrainResult(**gather(_run_everywhere(local)._asdict(), M))


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
    res = _train(
        spec, X, y, X_test, n_networks, learning_rate, steps, key, dtype=dtype, chunk_size=chunk_size,
        batch_size=batch_size, checkpoint=checkpoint, progress=progress,
    )  # fmt: skip
    M, r = len(res.loss), res._asdict()
    S, F = ("chain", "draw"), ("chain", "draw", "obs", "output")
    attrs = {
        "n_networks": M,
        "process_count": jax.process_count(),
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


def kernel_moments(spec, X, n_networks: int, key, *, dtype="float64", batch_size: int | None = None):
    """:func:`eft_prob.mc_kernels.kernel_moments` over ``n_networks`` prior networks split across
    processes.

    Process i draws networks ``ensemble.part_range(n_networks, (i, P))`` (network m from key m of
    ``jax.random.split(key, M)``, as in one process) on its local devices and keeps float64 running
    moments; the processes' (count, mean, M2) are gathered and merged in process order (Chan's
    formula), so every process returns the same :class:`~eft_prob.mc_kernels.KernelMoments`, equal
    to the single-process one up to the rounding of the merge order (≈ 1e-15 relative).  Needs
    ``n_networks >= 2`` and at least one network per process.
    """
    from . import mc_kernels

    M = ensemble._check_count("n_networks", n_networks)
    key = ensemble._check_key(key)
    _check_same_arguments(
        spec=spec, X=np.asarray(X), n_networks=M, key=key, dtype=str(dtype), batch_size=batch_size
    )  # fmt: skip
    index, count = _part()
    if count > M:
        raise ValueError(f"n_networks={M} is fewer than the {count} processes: pass at least one network per process.")
    _, (n, mean, m2) = _run_everywhere(
        lambda: mc_kernels._partial_moments(spec, X, M, key, dtype, batch_size, None, (index, count))
    )
    parts = _gather_blocks(
        {"n": np.array([n]), "mean": mean[None], "m2": m2[None]}, [1] * count, "one (count, mean, M2) per process"
    )
    _, mu, s = mc_kernels._merge(parts["n"], parts["mean"], parts["m2"])
    var = s / (M - 1)
    return mc_kernels.KernelMoments(mu[0], var[0], mu[1], var[1], M)


def trained_marginals(
    spec,
    X,
    y,
    X_test,
    learning_rate=None,
    steps=None,
    *,
    batch_size: int | None = None,
    progress: bool = False,
    checkpoint=None,
    memory_limit_gib=None,
):
    """:func:`eft_prob.theory.nlo_trained_marginals` with its batches of test inputs split across
    processes.

    The test inputs are cut into the batches of a single-process run (``batch_size``, the same
    default); process i computes the contiguous block ``i·B // P .. (i+1)·B // P`` of the B batches
    on its local devices (the last batch padded with copies as in one process), and the
    per-test-input moments are gathered in process order, so every process returns the same
    :class:`~eft_prob.theory.NLOTrainedMarginals`, equal to the single-process result (bit for bit
    on CPUs, where each batch runs the same compiled program on the same inputs).  With fewer
    batches than processes the last processes have nothing to do.  ``checkpoint``: a directory
    shared by the processes (or one per host); process i of P resumes from
    ``process_<i>_of_<P>.npz`` inside it.  ``progress``: each process prints its own batches (pass
    ``progress=jax.process_index() == 0`` for one log).  ``memory_limit_gib`` applies per process
    and may differ between them.  When the computation fails on some process (a
    ``MemoryLimitError``, a bad argument), that process raises its error and every other one a
    ``RuntimeError`` quoting it, instead of waiting for it.
    """
    from ._config import float64_theory
    from ._validate import check_inputs
    from .theory import training

    @float64_theory
    def run(X, y, X_test):
        Xt = check_inputs(spec, X_test, "X_test")
        nA, nB = np.shape(X)[0], Xt.shape[0]
        bs = training._marginal_batch_size(batch_size, nA, nB)
        n_batches = -(-nB // bs)
        index, count = _part()
        rows = [
            (min(p * n_batches // count * bs, nB), min((p + 1) * n_batches // count * bs, nB)) for p in range(count)
        ]
        lo, hi = rows[index]
        width = spec.widths[-2]

        def local():
            if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
                raise ValueError(f"checkpoint must be a directory path or None, got {checkpoint!r}.")
            if hi == lo:
                return None
            mine = Xt[lo:hi]
            if hi - lo < bs:  # one short batch: pad it here (as one process does) to keep batch_size
                mine = jnp.concatenate([mine, jnp.broadcast_to(Xt[-1:], (bs - (hi - lo), Xt.shape[1]))])
            path = None
            if checkpoint is not None:
                os.makedirs(checkpoint, exist_ok=True)
                path = os.path.join(os.fspath(checkpoint), f"process_{index}_of_{count}.npz")
            return training.nlo_trained_marginals(
                spec, X, y, mine, learning_rate, steps, batch_size=bs, progress=progress, checkpoint=path,
                memory_limit_gib=memory_limit_gib,
            )  # fmt: skip

        r = _run_everywhere(local)
        nL = spec.output_dim
        if r is None:
            mine = {"mean0": np.zeros((0, nL)), "cov0": np.zeros((0, nL, nL))}
            mine.update(mean1=mine["mean0"], cov1=mine["cov0"])
        else:
            mine = {k: np.asarray(getattr(r, k))[: hi - lo] for k in training._MARGINAL_FIELDS}
        out = _gather_blocks(mine, [b - a for a, b in rows], "its test inputs")
        return training.NLOTrainedMarginals(*(jnp.asarray(out[k]) for k in training._MARGINAL_FIELDS), width)

    _check_same_arguments(
        spec=spec, X=np.asarray(X), y=np.asarray(y), X_test=np.asarray(X_test), learning_rate=learning_rate,
        steps=steps, batch_size=batch_size,
    )  # fmt: skip
    return run(X, y, X_test)
