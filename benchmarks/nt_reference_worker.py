"""Neural Tangents side of ``bench_reference.py``; runs under the pinned reference interpreter.

Never imports eft_prob (Neural Tangents 0.6.5 needs jax 0.5.3, see shared/DESIGN.md).  Usage::

    /tmp/ntenv/bin/python benchmarks/nt_reference_worker.py TASK CONFIG.json OUT.npz

TASK is ``analytic`` (stax ``kernel_fn``, float64: the NNGP and NTK of the output layer) or ``mc``
(``nt.monte_carlo_kernel_fn`` mean over ``samples`` initializations, float32: NT's default precision).
The network is Dense(W_std=√C_W, b_std=√C_b, parameterization='ntk') + activation, ``depth - 1``
times, then Dense(1): with λ_W = C_W and λ_b = C_b it is eft_prob's parameterization.  Timings and
the peak resident memory (ru_maxrss) go into OUT.npz next to the kernels.
"""

import functools
import json
import resource
import sys
import time

task, config_path, out_path = sys.argv[1:4]
cfg = json.load(open(config_path))

import jax  # noqa: E402

if task == "analytic":
    jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import neural_tangents as nt  # noqa: E402
import numpy as np  # noqa: E402
from neural_tangents import stax  # noqa: E402


def network(activation, depth, width, C_b, C_W):
    act = {"relu": stax.Relu, "erf": stax.Erf}[activation]
    dense = lambda n: stax.Dense(n, W_std=np.sqrt(C_W), b_std=np.sqrt(C_b), parameterization="ntk")
    return stax.serial(*[stax.serial(dense(width), act()) for _ in range(depth - 1)], dense(1))


X = np.load(cfg["inputs"])
out = {"jax_version": np.array(jax.__version__), "nt_version": np.array(nt.__version__)}

if task == "analytic":
    X = jnp.asarray(X, jnp.float64)
    for act in cfg["activations"]:
        _, _, kernel_fn = network(act, cfg["depth"], cfg["width"], cfg["C_b"][act], cfg["C_W"][act])
        f = jax.jit(functools.partial(lambda kf, x: kf(x, None, ("nngp", "ntk")), kernel_fn))
        t0 = time.perf_counter()
        K, T = jax.block_until_ready(f(X))
        out[f"{act}_cold_s"] = time.perf_counter() - t0
        times = []
        for _ in range(cfg["repeats"]):
            t0 = time.perf_counter()
            jax.block_until_ready(f(X))
            times.append(time.perf_counter() - t0)
        out[f"{act}_times_s"] = np.array(times)
        out[f"{act}_nngp"], out[f"{act}_ntk"] = np.asarray(K), np.asarray(T)
elif task == "mc":
    X = jnp.asarray(X, jnp.float32)
    act, S = cfg["mc_activation"], cfg["ref_samples"]
    init_fn, apply_fn, _ = network(act, cfg["depth"], cfg["width"], cfg["C_b"][act], cfg["C_W"][act])
    # The generator form yields the running mean after every sample, so each sample is timed; the
    # first includes compilation.  vmap_axes=0: the batch axis is independent (NT's documented
    # speed-up for Jacobians); implementation: JACOBIAN_CONTRACTION, NT's default.
    mc = nt.monte_carlo_kernel_fn(
        init_fn, apply_fn, jax.random.PRNGKey(cfg["seed"]), list(range(1, S + 1)), vmap_axes=0,
        implementation=cfg.get("nt_implementation", 1),
    )  # fmt: skip
    times, t_start = [], time.perf_counter()
    t0 = t_start
    for est in mc(X, None, ("nngp", "ntk")):
        jax.block_until_ready(est)
        t1 = time.perf_counter()
        times.append(t1 - t0)
        t0 = t1
    out["mc_sample_times_s"] = np.array(times)
    out["mc_total_s"] = t0 - t_start
    out["mc_nngp_mean"], out["mc_ntk_mean"] = np.asarray(est[0], np.float64), np.asarray(est[1], np.float64)
    out["mc_dtype"] = np.array(str(est[1].dtype))
else:
    raise SystemExit(f"unknown task {task!r}: use 'analytic' or 'mc'")

out["maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
np.savez(out_path, **out)
