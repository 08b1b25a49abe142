"""Benchmark: ensemble GD training, ``eft_prob.ensemble.train`` vs a per-network Python loop.

For depth-L tanh MLPs of a few widths, M networks, N training points and ``--steps`` full-batch GD
steps, it measures in one run:

1. ``ensemble.train`` (sharded over the local devices, ``lax.map`` over networks on each device,
   divergence mask, host transfer of every output), after a warm-up call that compiles it;
2. the baseline a user would write: ``jax.jit`` of one network's init + ``lax.scan`` of plain GD
   (same per-layer rates ηλ_b, ηλ_W/n_{ℓ-1}, same MSE loss), called in a Python loop over the M
   per-network keys, compiled once beforehand;
3. throughput in network-steps per second, the ratio ensemble/baseline, achieved FLOP/s counting
   2·3·N·Σ_ℓ n_{ℓ-1}n_ℓ matmul flops per network-step (forward + backward ≈ 3× forward, 2 flops
   per multiply-add), the largest difference between the two methods' trained outputs (0 on the CPU:
   the same arithmetic), and memory (the compiled program's XLA temporaries, the process peak RSS
   and, on accelerators, the device's peak bytes in use).

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/bench_train.py                 # CPU, about 2 minutes on 2 cores
    PYTHONPATH=. python benchmarks/bench_train.py --batch-sizes 1 8 --json out.json
    PYTHONPATH=. python benchmarks/bench_train.py --gpu-report     # on a GPU machine: one command

``--gpu-report`` runs on the default accelerator with larger ensembles and adds the fraction of the
device's float64 matmul peak reached (a table of known peaks by device name; ``--peak-tflops``
overrides it) and a memory-bandwidth roofline.  See ``benchmarks/README.md``.
"""

from __future__ import annotations

import os
import sys

GPU_REPORT = "--gpu-report" in sys.argv[1:]
if not GPU_REPORT:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # --cpu-devices K: K host devices (threads) for the sharded path; must reach XLA before jax loads
    for i, a in enumerate(sys.argv[1:-1], 1):
        if a == "--cpu-devices":
            os.environ["XLA_FLAGS"] = (
                os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={int(sys.argv[i + 1])}"
            )

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import eft_prob as ep  # noqa: E402
from eft_prob import ensemble, nn  # noqa: E402

# Dense matmul peaks (TFLOP/s) by device_kind substring: float64 (tensor cores where they exist) and
# HBM bandwidth (TB/s), from the vendors' data sheets.  The first match wins.
DEVICE_PEAKS = [
    ("H200", {"float64": 67.0, "float32": 67.0, "hbm": 4.8}),
    ("H100 PCIe", {"float64": 51.0, "float32": 51.0, "hbm": 2.0}),
    ("H100", {"float64": 67.0, "float32": 67.0, "hbm": 3.35}),
    ("A100", {"float64": 19.5, "float32": 19.5, "hbm": 2.0}),
]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu-report", action="store_true", help="accelerator rows and fraction of float64 peak")
    p.add_argument("--widths", type=int, nargs="+", default=None, help="hidden widths (default 64 256; GPU 256 1024)")
    p.add_argument("--depth", type=int, default=3, help="L, number of weight layers (default 3)")
    p.add_argument("--n-train", type=int, nargs="+", default=None, help="training points (default 8; GPU 8 256)")
    p.add_argument("--n-test", type=int, default=8)
    p.add_argument("--input-dim", type=int, default=4)
    p.add_argument("--networks", type=int, nargs="+", default=None, help="ensemble sizes M (default: per width)")
    p.add_argument("--steps", type=int, default=None, help="GD steps (default 50; GPU 100)")
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[0], help="ensemble batch_size values (0: default)")
    p.add_argument("--baseline-networks", type=int, default=None, help="networks in the loop baseline (default M)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per row after the warm-up (min is reported)")
    p.add_argument("--peak-tflops", type=float, default=None, help="float64 matmul peak of the device, TFLOP/s")
    p.add_argument("--cpu-devices", type=int, default=1, help="CPU only: shard the ensemble over K host devices")
    p.add_argument("--json", default=None, help="also write every number as JSON")
    a = p.parse_args(argv)
    if a.gpu_report:
        a.widths = a.widths or [256, 1024]
        a.n_train = a.n_train or [8, 256]
        a.steps = a.steps or 100
        a.baseline_networks = a.baseline_networks or 32
    else:
        a.widths = a.widths or [64, 256]
        a.n_train = a.n_train or [8]
        a.steps = a.steps or 50
    return a


def default_networks(width: int, gpu: bool) -> list[int]:
    if gpu:
        return [1024, 8192] if width <= 256 else [1024]
    return [256, 1024] if width <= 64 else [256]


def flops_per_step(spec, n_train: int) -> int:
    w = spec.widths
    return 2 * 3 * n_train * sum(w[i] * w[i + 1] for i in range(spec.depth))


def data(input_dim: int, n_train: int, n_test: int):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n_train, input_dim)) / math.sqrt(input_dim)
    return X, np.sin(2 * X.sum(1, keepdims=True)), rng.normal(size=(n_test, input_dim)) / math.sqrt(input_dim)


def baseline_program(spec, X, y, X_test, eta, steps, dtype):
    """One network: init, plain GD in a lax.scan, outputs on X_test: jit once, call per network."""
    X, y, X_test = (jnp.asarray(a, dtype) for a in (X, y, X_test))
    lr = nn.learning_rates(spec, dtype)

    def loss(p):
        r = nn.apply(spec, p, X) - y
        return 0.5 * jnp.sum(r * r)

    def step(p, _):
        g = jax.grad(loss)(p)
        return jax.tree_util.tree_map(lambda a, ga, la: a - eta * la * ga, p, g, lr), None

    @jax.jit
    def one(key):
        p, _ = jax.lax.scan(step, nn.init(spec, key, dtype), None, length=steps)
        return nn.apply(spec, p, X_test)

    return one


def timed(fn, repeats):
    """Best wall time and best process CPU time over ``repeats`` calls, and the last result.

    On a shared machine the CPU time (all threads of this process) is the steadier figure: other
    processes stretch the wall time of a call but hardly its CPU time.
    """
    wall = cpu = float("inf")
    out = None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return wall, cpu, out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def xla_temp_mib(spec, X, y, X_test, M, eta, steps, dtype, batch_size) -> float:
    """Temporaries of the compiled per-chunk ensemble program (XLA's memory analysis)."""
    devices = jax.local_devices()
    B = batch_size or ensemble._default_batch(spec, len(X) + len(X_test), M, devices, np.dtype(dtype).itemsize)
    unit = B * len(devices)
    n_out = (len(X) + len(X_test)) * spec.output_dim
    C = _round_up(ensemble._default_chunk(spec, M, unit, len(X), n_out, steps, 8), unit)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("networks",))
    prog = ensemble._cached_program(spec, np.dtype(dtype), eta, steps, B, mesh)
    keys = jax.random.split(jax.random.key(0), C)
    args = (keys, *(jnp.asarray(a, dtype) for a in (X, y, X_test)))
    try:
        stats = prog.lower(*args).compile().memory_analysis()
        return stats.temp_size_in_bytes / 2**20
    except Exception:  # not every backend reports it
        return float("nan")


def _round_up(a, b):
    return -(-a // b) * b


def device_peaks(kind: str):
    for name, peaks in DEVICE_PEAKS:
        if name.lower() in kind.lower():
            return peaks
    return None


def run_row(args, width, n_train, M, dtype, batch_size):
    spec = ep.MLPSpec(args.input_dim, (width,) * (args.depth - 1), 1, "tanh")
    X, y, X_test = data(args.input_dim, n_train, args.n_test)
    eta = 0.5 * float(ep.theory.training.stability_bound(ep.theory.ntk(spec, X)))
    key = jax.random.key(1)
    steps = args.steps
    kw = dict(dtype=dtype, batch_size=batch_size or None)

    call = lambda: ensemble.train(spec, X, y, X_test, M, eta, steps, key, **kw)
    t0 = time.perf_counter()
    call()
    compile_s = time.perf_counter() - t0
    t_ens, c_ens, res = timed(call, args.repeats)

    Mb = min(M, args.baseline_networks or M)
    one = baseline_program(spec, X, y, X_test, eta, steps, dtype)
    keys = list(jax.random.split(key, M)[:Mb])  # per-network keys sliced before timing
    loop = lambda: [np.asarray(o) for o in jax.block_until_ready([one(k) for k in keys])]
    loop()  # compiles; warms the per-call paths
    t_base, c_base, base = timed(loop, args.repeats)
    diff = float(np.max(np.abs(np.stack(base) - res.test_final[:Mb])))

    ens_rate = M * steps / t_ens
    base_rate = Mb * steps / t_base
    f = flops_per_step(spec, n_train)
    row = {
        "width": width,
        "depth": args.depth,
        "n_train": n_train,
        "networks": M,
        "dtype": dtype,
        "batch_size": batch_size or "default",
        "steps": steps,
        "ensemble_s": t_ens,
        "ensemble_first_call_s": compile_s,
        "baseline_s": t_base,
        "baseline_networks": Mb,
        "ensemble_cpu_s": c_ens,
        "baseline_cpu_s": c_base,
        "ensemble_net_steps_per_s": ens_rate,
        "baseline_net_steps_per_s": base_rate,
        "speedup": ens_rate / base_rate,
        "speedup_cpu_time": (M / c_ens) / (Mb / c_base),
        "ensemble_gflops": ens_rate * f / 1e9,
        "baseline_gflops": base_rate * f / 1e9,
        "max_abs_diff": diff,
        "diverged": int(res.diverged.sum()),
        "xla_temp_mib": xla_temp_mib(spec, X, y, X_test, M, eta, steps, dtype, batch_size),
        "peak_rss_mib": peak_rss_mib(),
    }
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        row["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
    params = nn.param_count(spec)
    # bytes per network-step if every parameter-sized array streams from memory ~6 times
    # (W in forward, both backward matmuls, gradient write, update read/write)
    row["roofline_intensity"] = f / (6 * params * np.dtype(dtype).itemsize)
    return row


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    dev = jax.local_devices()
    kind = dev[0].device_kind
    warnings.simplefilter("ignore", ep.StabilityWarning)
    print(
        f"# eft_prob ensemble training benchmark: jax {jax.__version__}, {len(dev)} x {dev[0].platform} "
        f"({kind}), python {platform.python_version()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    )
    print(
        f"# tanh MLP, depth {args.depth}, input dim {args.input_dim}, {args.n_test} test points, "
        f"{args.steps} GD steps, learning rate = half the infinite-width bound; times are the best of "
        f"{args.repeats} calls"
    )
    head = (
        f"{'width':>5} {'N':>4} {'M':>6} {'dtype':>7} {'batch':>7} | {'ens net-step/s':>14} {'GFLOP/s':>8} "
        f"| {'loop net-step/s':>15} {'GFLOP/s':>8} | {'ens/loop':>8} {'(CPU t)':>8} | {'max|diff|':>9} "
        f"{'XLA tmp MiB':>11} {'RSS MiB':>8}"
    )
    print(head)
    print("-" * len(head))
    rows = []
    for width in args.widths:
        for n_train in args.n_train:
            for M in args.networks or default_networks(width, args.gpu_report):
                for dtype in args.dtypes:
                    for B in args.batch_sizes:
                        r = run_row(args, width, n_train, M, dtype, B)
                        rows.append(r)
                        print(
                            f"{width:>5} {n_train:>4} {M:>6} {dtype:>7} {r['batch_size']!s:>7} | "
                            f"{r['ensemble_net_steps_per_s']:>14.4g} {r['ensemble_gflops']:>8.3g} | "
                            f"{r['baseline_net_steps_per_s']:>15.4g} {r['baseline_gflops']:>8.3g} | "
                            f"{r['speedup']:>8.2f} {r['speedup_cpu_time']:>8.2f} | {r['max_abs_diff']:>9.2g} "
                            f"{r['xla_temp_mib']:>11.2f} {r['peak_rss_mib']:>8.0f}",
                            flush=True,
                        )
    if args.gpu_report:
        peaks = device_peaks(kind) or {}
        peak64 = args.peak_tflops or peaks.get("float64")
        print(f"\n# {kind}: float64 matmul peak {peak64} TFLOP/s, HBM {peaks.get('hbm')} TB/s (DEVICE_PEAKS)")
        print(f"{'width':>5} {'N':>4} {'M':>6} {'dtype':>7} | {'TFLOP/s':>8} {'% f64 peak':>10} {'% roofline':>10}")
        for r in rows:
            tf = r["ensemble_gflops"] / 1e3
            frac = 100 * tf / peak64 if peak64 else float("nan")
            roof = min(peak64 or np.inf, r["roofline_intensity"] * peaks["hbm"]) if peaks else float("nan")
            print(
                f"{r['width']:>5} {r['n_train']:>4} {r['networks']:>6} {r['dtype']:>7} | {tf:>8.3g} "
                f"{frac:>10.2f} {100 * tf / roof:>10.1f}"
            )
            r["fraction_of_f64_peak"] = frac / 100
    print(f"# peak RSS {peak_rss_mib():.0f} MiB; load at end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": kind, "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
