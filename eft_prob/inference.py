"""NUTS on the Bayesian MLP (:func:`eft_prob.models.bayesian_mlp`), returned as ArviZ InferenceData.

The posterior of a Bayesian MLP is judged in *function space*: weights have permutation and
sign symmetries, so R-hat and ESS of raw weights say little (ECOSYSTEM.md §3.2).  The
InferenceData therefore keeps the network outputs f(X), f(X_test) and any hyperparameters
(``noise_var`` when it has a prior); weights only on request.  :func:`convergence_summary`
reports R-hat, bulk/tail ESS and MCSE of those function values.

Groups of the InferenceData returned by :func:`run_nuts` (dims in brackets; sample dims
``chain, draw`` first where present):

* ``posterior``: ``f`` [obs, output], ``f_test`` [test_point, output], ``noise_var`` [] if learned,
  weights ``W1, b1, ...`` with ``keep_weights=True``.
* ``posterior_predictive``: ``y`` [obs, output] (replicated training data, for PPCs),
  ``y_test`` [test_point, output] (f_test plus observation noise), ``f_test``.
* ``log_likelihood``: ``y`` [obs, output], log N(y_αi; f_αi, noise_var) per point and output.
* ``observed_data``: ``y`` [obs, output].  ``constant_data``: ``X`` [obs, input],
  ``X_test`` [test_point, input], ``noise_var`` [] when fixed.
* ``sample_stats``: ``diverging, energy, lp, n_steps, tree_depth, step_size, acceptance_rate``.

Top-level attrs record the sampler settings, ``chain_method`` actually used, the backend,
``sampling_time_s`` (wall clock of ``MCMC.run``, compilation included) and versions.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
import xarray as xr
from numpyro.infer import MCMC, NUTS, init_to_sample

from . import _arviz
from ._config import warn
from ._validate import check_inputs, check_positive, check_targets
from .models import bayesian_mlp
from .spec import MLPSpec

__all__ = [
    "NUTSDivergenceWarning",
    "chain_layout",
    "choose_chain_method",
    "convergence_summary",
    "function_space_vars",
    "run_nuts",
    "to_inference_data",
]

CHAIN_METHODS = ("parallel", "sequential", "vectorized", "sharded")
_FUNCTION_VARS = ("f_test", "f")
_WEIGHT_PREFIXES = ("W", "b")


class NUTSDivergenceWarning(UserWarning):
    """More post-warmup NUTS transitions diverged than ``max_divergence_fraction`` allows."""


# -- chain method -------------------------------------------------------------------------------
def choose_chain_method(num_chains: int, *, backend: str | None = None, device_count: int | None = None) -> str:
    """How to run ``num_chains`` NUTS chains on this process's devices (ECOSYSTEM.md §3.2, §4.3).

    * ``"parallel"``: one chain per device, when there are at least as many local devices as
      chains (on CPU: ``XLA_FLAGS=--xla_force_host_platform_device_count=k`` before JAX starts).
    * ``"sharded"``: more chains than devices, several devices: ⌈chains/devices⌉ chains per device.
    * ``"vectorized"``: a single accelerator (GPU/TPU) runs all chains in lock-step with vmap.
    * ``"sequential"``: otherwise (one CPU device), one chain after another.

    ``"parallel"`` and ``"sharded"`` are one ``jax.shard_map`` over a 1-D mesh of the local devices
    (numpyro's ``pmap`` is never used); see :func:`run_nuts` for what runs on each device.
    """
    backend = jax.default_backend() if backend is None else backend
    devices = jax.local_device_count() if device_count is None else device_count
    if num_chains == 1:
        return "sequential"
    if devices >= num_chains:
        return "parallel"
    if devices > 1:
        return "sharded"
    if backend != "cpu":
        return "vectorized"
    return "sequential"


def chain_layout(num_chains: int, device_count: int) -> tuple[int, int]:
    """(devices used, chains per device) of the ``"parallel"``/``"sharded"`` methods.

    As few rounds as the devices allow (⌈chains/devices⌉ chains per device), spread over as few
    devices as that needs, so at most ``devices used − 1`` padding chains are run and dropped.
    """
    per_device = -(-num_chains // device_count)
    return -(-num_chains // per_device), per_device


def _sharded_chains(num_chains: int, devices):
    """numpyro ``chain_method`` callable: ``shard_map`` of the chains over a 1-D mesh of ``devices``.

    Each device runs its chains with ``lax.map`` on CPUs (one after another inside the compiled
    program: a chain's arithmetic is then the same whatever the number of devices or processes,
    and NUTS chains of different tree depths do not wait for each other) and with ``vmap`` on
    accelerators (lock-step, to keep the device busy).  Chains are padded to devices × rounds with
    copies of the last one, dropped afterwards.
    """
    from jax.sharding import AxisType, Mesh
    from jax.sharding import PartitionSpec as P

    used, per_device = chain_layout(num_chains, len(devices))
    padded = used * per_device
    # Auto axes: with the default Explicit ones shard_map refuses numpyro's unsharded inputs
    mesh = Mesh(np.asarray(devices[:used]), ("chain",), axis_types=(AxisType.Auto,))
    batched = devices[0].platform != "cpu"

    def method(fn):
        per_dev = jax.vmap(fn) if batched else (lambda chains: jax.lax.map(fn, chains))
        run = jax.jit(jax.shard_map(per_dev, mesh=mesh, in_specs=P("chain"), out_specs=P("chain"), check_vma=False))

        def call(map_args):
            if padded > num_chains:
                map_args = jax.tree_util.tree_map(
                    lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], padded - num_chains, axis=0)]), map_args
                )
            # to the host, then the first device: no program over several devices follows the run.
            # Slicing the padded chains off the sharded result compiles to one small program per
            # leaf with an all-gather between the devices; in a multi-process CPU run (gloo) one
            # device was then found parked in such an all-gather, its partner's launch blocked,
            # in 5 of 30 loopback runs of tests/test_sharding.py on 2 busy cores (0 of 43 since)
            out = jax.device_get(run(map_args))
            return jax.tree_util.tree_map(lambda a: jnp.asarray(a[:num_chains]), out)

        return call

    return method


def _resolve_chain_method(chain_method, num_chains: int):
    if chain_method is None:
        chain_method = choose_chain_method(num_chains)
    if chain_method not in CHAIN_METHODS:
        raise ValueError(f"chain_method must be None (automatic) or one of {CHAIN_METHODS}, got {chain_method!r}.")
    devices = jax.local_devices()
    if chain_method == "parallel" and len(devices) < num_chains:
        raise ValueError(
            f"chain_method='parallel' needs one device per chain: num_chains={num_chains} but "
            f"jax.local_device_count()={len(devices)}. On CPU set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={num_chains} before JAX starts, or use "
            "chain_method='sharded' (several chains per device) or None."
        )
    if num_chains == 1:  # numpyro runs a single chain directly, whatever the method
        return chain_method, "sequential"
    if chain_method in ("parallel", "sharded"):
        return chain_method, _sharded_chains(num_chains, devices)
    return chain_method, chain_method


# -- argument checks ------------------------------------------------------------------------------
def _count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _fraction(name: str, value, *, closed: bool) -> float:
    v = float(value)
    ok = (0.0 <= v <= 1.0) if closed else (0.0 < v < 1.0)
    if not ok:
        interval = "[0, 1]" if closed else "(0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}.")
    return v


def _key(seed):
    """A typed PRNG key from an int seed or an existing key."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return jax.random.key(int(seed))
    if isinstance(seed, jax.Array):
        return seed if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(seed)
    raise ValueError(f"seed must be an int or a jax.random key, got {seed!r}.")


def _check_data(spec, X, y, X_test):
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"spec must be an eft_prob.MLPSpec, got {type(spec).__name__}.")
    X = check_inputs(spec, X, "X")
    X_test = check_inputs(spec, X_test, "X_test")
    if y is None:
        raise ValueError(f"y is required: targets of shape (N, output_dim) = ({X.shape[0]}, {spec.output_dim}).")
    y = check_targets(spec, y, X.shape[0])
    return X, y, X_test


def _check_noise(noise_var):
    if isinstance(noise_var, dist.Distribution):
        return noise_var
    if noise_var is None:
        raise ValueError("noise_var is required: a float > 0 or a NumPyro distribution (its prior).")
    check_positive("noise_var", noise_var)
    return float(noise_var)


# -- the runner -----------------------------------------------------------------------------------
def run_nuts(
    spec: MLPSpec,
    X,
    y,
    X_test,
    *,
    noise_var,
    num_chains: int = 4,
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
    """Sample the Bayesian MLP posterior p(θ | X, y) with NUTS; return ArviZ InferenceData.

    :param spec: the architecture and prior (W ~ N(0, C_W/fan_in), b ~ N(0, C_b)).
    :param X: training inputs (N, input_dim).  :param y: targets (N, output_dim), finite.
    :param X_test: inputs (N_test, input_dim) at which f is predicted.
    :param noise_var: observation-noise variance σ² > 0, or a NumPyro distribution (its prior;
        then ``noise_var`` is a posterior variable).
    :param num_chains, num_warmup, num_samples: chains and per-chain warmup/kept iterations.
    :param seed: int or ``jax.random`` key; the same seed gives identical draws.
    :param chain_method: ``None`` chooses with :func:`choose_chain_method`, or one of
        ``"parallel" | "sequential" | "vectorized" | "sharded"``.  ``"parallel"`` (one chain per
        local device) and ``"sharded"`` (several per device, any number of chains; on one device
        all of them) run one ``jax.shard_map`` over the local devices, not numpyro's ``pmap``: a
        CPU device runs its chains one after another (``lax.map``), so with these two methods the
        draws of a seed on CPUs are bit-identical whatever the number of devices or processes
        (:func:`eft_prob.distributed.run_nuts`); an accelerator vmaps its chains.  numpyro shows
        no progress bar for them.
    :param target_accept: NUTS step-size adaptation target (raise it if divergences appear).
    :param max_divergence_fraction: above this fraction of divergent post-warmup transitions a
        :class:`NUTSDivergenceWarning` is issued.
    :param keep_weights: also store the weights (large) in the posterior group.
    :returns: InferenceData (arviz 0.23) / DataTree (arviz 1.x); see the module docstring.
    """
    return _run_nuts(
        spec, X, y, X_test, noise_var=noise_var, num_chains=num_chains, num_warmup=num_warmup,
        num_samples=num_samples, seed=seed, chain_method=chain_method, target_accept=target_accept,
        max_tree_depth=max_tree_depth, max_divergence_fraction=max_divergence_fraction,
        keep_weights=keep_weights, progress=progress,
    )  # fmt: skip


def _run_nuts(
    spec, X, y, X_test, *, noise_var, num_chains, num_warmup, num_samples, seed, chain_method, target_accept,
    max_tree_depth, max_divergence_fraction, keep_weights, progress, part=None, gather=None,
):  # fmt: skip
    """:func:`run_nuts`; with ``part=(i, P)`` this process samples only the chains
    ``part_range(num_chains, part)`` and ``gather(tree, num_chains)`` assembles every part's
    arrays in chain order (:mod:`eft_prob.distributed`), so the result is the whole run's."""
    from .ensemble import part_range

    X, y, X_test = _check_data(spec, X, y, X_test)
    noise_var = _check_noise(noise_var)
    num_chains = _count("num_chains", num_chains)
    num_warmup = _count("num_warmup", num_warmup, minimum=0)
    num_samples = _count("num_samples", num_samples)
    max_tree_depth = _count("max_tree_depth", max_tree_depth)
    target_accept = _fraction("target_accept", target_accept, closed=False)
    max_divergence_fraction = _fraction("max_divergence_fraction", max_divergence_fraction, closed=True)
    if part is not None and part[1] > num_chains:
        raise ValueError(
            f"num_chains={num_chains} is fewer than the {part[1]} processes: give every process at least one chain."
        )
    chains = part_range(num_chains, part)
    key_mcmc, key_pred = jax.random.split(_key(seed))
    # chain c runs from key c of the split numpyro itself makes for num_chains > 1, whichever process runs it
    chain_keys = jax.random.split(key_mcmc, num_chains)[chains.start : chains.stop] if num_chains > 1 else key_mcmc
    local = len(chains)
    if num_chains > 1 and local == 1:
        # numpyro runs a lone chain outside any chain method (other arithmetic, other draws); on
        # several devices a second copy keeps it bit-identical to its single-process run for free
        many = jax.local_device_count() >= 2 and chain_method in (None, "parallel")
        if chain_method == "sharded" or many:
            chain_keys, local = jnp.concatenate([chain_keys, chain_keys]), 2
        else:
            chain_keys = chain_keys[0]
    method_name, method = _resolve_chain_method(chain_method, local)

    kernel = NUTS(
        bayesian_mlp, target_accept_prob=target_accept, max_tree_depth=max_tree_depth, init_strategy=init_to_sample
    )
    mcmc = MCMC(
        kernel,
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=local,
        chain_method=method,
        # numpyro shows no progress bar for a compiled (callable) chain method
        progress_bar=progress and isinstance(method, str),
    )
    extra = ("diverging", "energy", "num_steps", "accept_prob", "adapt_state.step_size", "potential_energy")
    # numpy, not jax arrays: eft_prob._validate checks finiteness of *concrete jax* arrays with jnp,
    # which fails when the model is re-traced inside NUTS's jit (numpy inputs become tracers there
    # and skip the already-done check).
    X, y, X_test = np.asarray(X), np.asarray(y), np.asarray(X_test)
    start = time.perf_counter()
    mcmc.run(chain_keys, spec, X, y, noise_var=noise_var, X_test=X_test, extra_fields=extra)
    samples = jax.block_until_ready(mcmc.get_samples(group_by_chain=True))
    elapsed = time.perf_counter() - start
    fields = mcmc.get_extra_fields(group_by_chain=True)

    n_steps = np.asarray(fields["num_steps"])
    stats = {
        "diverging": np.asarray(fields["diverging"], bool),
        "energy": np.asarray(fields["energy"]),
        "lp": -np.asarray(fields["potential_energy"]),
        "n_steps": n_steps,
        "tree_depth": np.floor(np.log2(np.maximum(n_steps, 1))).astype(np.int64) + 1,
        "step_size": np.asarray(fields["adapt_state.step_size"]),
        "acceptance_rate": np.asarray(fields["accept_prob"]),
    }
    samples = {k: np.asarray(v)[: len(chains)] for k, v in samples.items()}
    stats = {k: v[: len(chains)] for k, v in stats.items()}
    attrs = {
        "inference_library": "numpyro",
        "inference_library_version": numpyro.__version__,
        "arviz_version": _arviz.ARVIZ_VERSION,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "local_device_count": jax.local_device_count(),
        "chain_method": method_name,
        "num_chains": num_chains,
        "num_warmup": num_warmup,
        "num_samples": num_samples,
        "target_accept": target_accept,
        "max_tree_depth": max_tree_depth,
        "seed": int(seed) if isinstance(seed, (int, np.integer)) else "jax key",
        "sampling_time_s": elapsed,
        "spec": repr(spec),
    }
    if gather is not None:
        samples, stats, times = gather((samples, stats, np.full(len(chains), elapsed)), num_chains)
        attrs["sampling_time_s"] = float(times.max())  # the slowest process
        attrs["process_count"] = part[1]
    idata = to_inference_data(
        samples,
        X=X,
        y=y,
        X_test=X_test,
        noise_var=noise_var,
        key=key_pred,
        sample_stats=stats,
        attrs=attrs,
        keep_weights=keep_weights,
    )
    _warn_divergences(stats["diverging"], max_divergence_fraction, target_accept)
    return idata


def _warn_divergences(diverging: np.ndarray, max_fraction: float, target_accept: float) -> None:
    n_div, total = int(diverging.sum()), int(diverging.size)
    if total and n_div / total > max_fraction:
        warn(
            f"{n_div} of {total} post-warmup NUTS transitions diverged ({n_div / total:.1%} > "
            f"max_divergence_fraction={max_fraction:g}): the posterior estimates may be biased. Raise "
            f"target_accept (now {target_accept:g}, e.g. to 0.95-0.99), or reparameterize: keep the "
            "prior scaled by fan-in (C_W of order 1), put a tighter prior on noise_var, or standardize X and y.",
            NUTSDivergenceWarning,
        )


# -- assembling InferenceData ------------------------------------------------------------------------
def _is_weight(name: str) -> bool:
    return name[:1] in _WEIGHT_PREFIXES and name[1:].isdigit()


def _sample_coords(chains: int, draws: int) -> dict:
    return {"chain": np.arange(chains), "draw": np.arange(draws)}


def to_inference_data(
    samples: dict,
    *,
    X,
    y,
    X_test,
    noise_var,
    key,
    sample_stats: dict | None = None,
    attrs: dict | None = None,
    keep_weights: bool = False,
):
    """Build the InferenceData of :func:`run_nuts` from posterior draws grouped by chain.

    ``samples`` maps site names to arrays (chain, draw, ...) and must contain ``"f"`` (…, N, n_L)
    and ``"f_test"`` (…, N_test, n_L) — e.g. ``mcmc.get_samples(group_by_chain=True)``, or chains
    from several processes concatenated along axis 0.  ``noise_var`` is the fixed σ² (a float) or
    anything else when ``samples["noise_var"]`` holds its draws.  ``key`` draws the observation
    noise of the posterior predictive.
    """
    samples = {k: np.asarray(v) for k, v in samples.items()}
    for name in _FUNCTION_VARS:
        if name not in samples:
            raise ValueError(f"samples must contain {name!r} (chain, draw, N, n_L); got {sorted(samples)}.")
    f, f_test = samples["f"], samples["f_test"]
    X, y, X_test = np.asarray(X), np.asarray(y), np.asarray(X_test)
    if f.ndim != 4 or f.shape[2:] != y.shape:
        raise ValueError(f"samples['f'] must be (chain, draw) + y.shape = (C, D) + {y.shape}, got {f.shape}.")
    if f_test.shape != f.shape[:2] + (X_test.shape[0], y.shape[1]):
        raise ValueError(
            f"samples['f_test'] must be {f.shape[:2] + (X_test.shape[0], y.shape[1])} (chain, draw, N_test, n_L), "
            f"got {f_test.shape}."
        )
    chains, draws = f.shape[:2]
    learned = "noise_var" in samples
    nv = samples["noise_var"][..., None, None] if learned else float(noise_var)

    k_y, k_test = jax.random.split(key)
    eps_y = np.asarray(jax.random.normal(k_y, f.shape, dtype=f.dtype))
    eps_test = np.asarray(jax.random.normal(k_test, f_test.shape, dtype=f.dtype))
    sd = np.sqrt(nv)
    loglik = -0.5 * np.log(2 * np.pi * nv) - 0.5 * (y - f) ** 2 / nv

    coords = {
        **_sample_coords(chains, draws),
        "obs": np.arange(X.shape[0]),
        "test_point": np.arange(X_test.shape[0]),
        "output": np.arange(y.shape[1]),
        "input": np.arange(X.shape[1]),
    }
    S = ("chain", "draw")
    F, FT = (*S, "obs", "output"), (*S, "test_point", "output")

    def ds(variables, group_attrs=None):
        used = {d for dims, _ in variables.values() for d in dims}
        return xr.Dataset(variables, coords={k: v for k, v in coords.items() if k in used}, attrs=group_attrs or {})

    post_vars = {"f": (F, f), "f_test": (FT, f_test)}
    for name, value in samples.items():
        if name in post_vars or (_is_weight(name) and not keep_weights):
            continue
        post_vars[name] = ((*S, *[f"{name}_dim_{i}" for i in range(value.ndim - 2)]), value)
    groups = {
        "posterior": ds(post_vars, attrs),
        "posterior_predictive": ds(
            {"y": (F, f + sd * eps_y), "y_test": (FT, f_test + sd * eps_test), "f_test": (FT, f_test)}
        ),
        "log_likelihood": ds({"y": (F, loglik)}),
        "observed_data": ds({"y": (("obs", "output"), y)}),
    }
    const = {"X": (("obs", "input"), X), "X_test": (("test_point", "input"), X_test)}
    if not learned:
        const["noise_var"] = ((), np.asarray(nv))
    groups["constant_data"] = ds(const)
    if sample_stats is not None:
        groups["sample_stats"] = ds({k: (S, np.asarray(v)) for k, v in sample_stats.items()}, attrs)
    return _arviz.make_inference_data(groups, attrs)


# -- convergence --------------------------------------------------------------------------------------
def function_space_vars(idata) -> list[str]:
    """Posterior variables that are meaningful for convergence: f, f_test and hyperparameters."""
    post = _arviz.get_group(idata, "posterior")
    return [v for v in post.data_vars if not _is_weight(v)]


def convergence_summary(idata, var_names=None) -> pd.DataFrame:
    """R-hat, bulk/tail ESS and MCSE of function values (not weights), one row per scalar.

    Default ``var_names``: ``f_test``, ``f`` and hyperparameters (e.g. ``noise_var``).  Columns:
    ``variable`` and its coordinates (``test_point``/``obs``, ``output``; -1 where a variable lacks
    that dim), ``mean, sd, mcse_mean, ess_bulk, ess_tail, r_hat``.  ``df.attrs`` holds sampler
    health: ``num_divergent``, ``divergence_fraction``, ``tree_depth_saturation`` (fraction of
    iterations at ``max_tree_depth``), ``max_r_hat``, ``min_ess_bulk`` and ``min_ess_tail`` of
    ``f_test``, ``sampling_time_s`` and ``seconds_per_ess`` (sampling time / min bulk ESS of
    ``f_test``, compilation included).
    """
    post = _arviz.get_group(idata, "posterior")
    var_names = list(var_names) if var_names is not None else function_space_vars(idata)
    missing = [v for v in var_names if v not in post.data_vars]
    if missing:
        raise ValueError(f"var_names {missing} are not in the posterior; it has {list(post.data_vars)}.")
    ds = post[var_names]
    diag = {
        "mean": ds.mean(("chain", "draw")),
        "sd": ds.std(("chain", "draw"), ddof=1),
        "mcse_mean": _arviz.mcse_mean(ds),
        "ess_bulk": _arviz.ess(ds, "bulk"),
        "ess_tail": _arviz.ess(ds, "tail"),
        "r_hat": _arviz.rhat(ds),
    }
    frames = []
    for v in var_names:
        da = diag["mean"][v]
        cols = {stat: np.asarray(d[v].transpose(*da.dims).values, float).ravel() for stat, d in diag.items()}
        index = dict(zip(da.dims, np.indices(da.shape).reshape(da.ndim, -1), strict=True)) if da.ndim else {}
        frames.append(pd.DataFrame({"variable": v, **index, **cols}))
    table = pd.concat(frames, ignore_index=True)
    coord_cols = [c for c in table.columns if c != "variable" and c not in diag]
    table[coord_cols] = table[coord_cols].fillna(-1).astype(int)
    table = table[["variable", *coord_cols, *diag]]

    attrs = _arviz.get_attrs(idata)
    health = {"sampling_time_s": float(attrs.get("sampling_time_s", np.nan))}
    if _arviz.has_group(idata, "sample_stats"):
        stats = _arviz.get_group(idata, "sample_stats")
        div = np.asarray(stats["diverging"].values, bool)
        health["num_divergent"] = int(div.sum())
        health["divergence_fraction"] = float(div.mean())
        depth = np.asarray(stats["tree_depth"].values)
        health["tree_depth_saturation"] = float(np.mean(depth >= int(attrs.get("max_tree_depth", 10))))
    health["max_r_hat"] = float(table["r_hat"].max())
    ft = table[table["variable"] == "f_test"] if "f_test" in var_names else table
    health["min_ess_bulk"] = float(ft["ess_bulk"].min())
    health["min_ess_tail"] = float(ft["ess_tail"].min())
    health["seconds_per_ess"] = health["sampling_time_s"] / health["min_ess_bulk"]
    table.attrs.update(health)
    return table
