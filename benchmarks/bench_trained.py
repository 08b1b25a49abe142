"""Benchmark: the O(1/n) moments of gradient-descent-trained outputs (``nlo_trained_coefficients``).

Their NTK, dNTK and ddNTK statistics are dense tables over four inputs at a time (24⁴-node nested
Gaussian rules per four-input subset), so the cost grows like N⁴ in N = N_A + N_B.  For each size
(depth 3, width 64, one output, gradient flow to convergence) this prints, measured in this run:

* the baseline: the full nested grids (``ntk_stats._HALF_GRID = False``), warm;
* the current path: odd σ use half of the outer nodes (point symmetry), cold (compile and the
  gather indices included) and warm;
* the ratio baseline/current and the largest difference of the 1/n mean and covariance
  coefficients between the two, relative to their largest entries (rounding only);
* the process's peak resident memory (it only grows).

GELU (C_b = 0.173, C_W = 1.983, its critical point) is not odd: there both paths are the same code,
and the ratio shows the measurement noise.

Usage: ``PYTHONPATH=. python benchmarks/bench_trained.py [--large] [--activations tanh gelu]``
(``--large`` adds 16 + 16 inputs: about 3 minutes for tanh on 2 CPU cores).

``--marginals [N_TEST]``: the per-test-input moments of ``nlo_trained_marginals`` instead (tanh,
same network).  The baseline is the joint ``nlo_trained_coefficients`` on N_A + 24 inputs (its
practical limit), whose diagonal blocks the marginals must equal; then the marginals alone for
N_A + N_TEST inputs (default 8 + 992 = 1000: about 7 minutes; warm: same batch shape as the
baseline row), with the time per test input.  ``--depth L`` (default 3) sets the number of layers
(hidden width 64), ``--batch-size`` the marginals' ``batch_size`` (default: the library's, 32 − N_A,
on a CPU at most max(N_A, 8)),
and ``--no-baseline`` skips the N_A + 24 rows: the N_TEST row then includes the compilation and is
printed in the cold column (e.g. ``--marginals 992 --depth 10 --no-baseline`` on a GPU).

``--fused [REPS]``: the marginals on N_A + 24 inputs (batch 24, ``--depth``), the current path against
the baseline that stacks every function of the innermost grid variable and then sums it
(``ntk_stats._FUSED_SUMS = False``) in 2M-element chunks (``ntk_stats._MAX_ELEMS``, the former
default), instead of one variadic reduction in 8M-element chunks.  Each path is compiled afresh and
timed cold, then warm REPS times (default 2; alternating baseline and current, minimum reported),
with the largest difference of the moments between the two.

``--inner [REPS]``: the marginals on N_A + 24 inputs (``--depth``, batch ``--batch-size``, default 24), the
current nested tables — the innermost variable's nodes as an unrolled loop over the outer grid
(``ntk_stats._UNROLLED_INNER``) and each outer contraction as a fused multiply-reduce
(``ntk_stats._BROADCAST_CONTRACT``) — against the former variadic reduction over the stored innermost
grid and einsum contractions (both flags off), timed as ``--fused``.

``--nodes N4 [N4 ...]``: the accuracy and cost of the four-input rule (``ntk_stats._NODES``, default 24
nodes per axis; the three-input rule kept at 32): the marginals on N_A + 24 inputs (batch 24,
``--depth``) with a 32-node four-input rule as the reference, then each N4, cold and warm, with the
warm-time ratio to the default and the largest difference of mean1 / cov1 from the reference.

``--shift [REPS]``: the marginals on N_A + 24 inputs (``--depth``, batch ``--batch-size``, default 8,
the CPU default), tanh and sin at criticality: the three- and four-input tables' innermost variable
from σ's addition theorem (``gauss.shift_rule``, where ``kernels._shift_ok`` allows it; current)
against direct evaluation of σ at every node (baseline), timed as ``--fused`` (sin with
``gauss.CLOSED_SIN`` off, so on the nested rules).

``--closed-sin``: sin's Gaussian moments in closed form (``gauss.sin_tables``, ``gauss.sin_pair_moments``;
current) against the nested rules (``gauss.CLOSED_SIN`` off; baseline): ntk_statistics on 5 inputs,
prior_statistics at N = 1000 and the marginals on N_A + 24 inputs at depth 3 and 10, cold and warm.
``--marginals ... --activation sin`` runs the many-test-input marginals for sin.

``--breakdown [REPS]``: where the marginals' time goes (N_A + 24 inputs, ``--depth``, batch
``--batch-size``, default 8, ``--activation``): the full computation (baseline), then the same with
the four-input tables' innermost sums replaced by a cheap stand-in, with the four-input tables, and
with the three- and four-input tables replaced by zeros of their shape (wrong moments: a timing
device only), so the rows split the time into four-input tables (innermost sums / the rest of the
rule), three-input tables and everything else.  Timed as ``--fused``.

``--devices [N_TEST]``: the marginals on N_A + N_TEST inputs (default 8 + 48, batch 24, ``--depth``)
one batch at a time on the first local device (baseline) against one batch per local device at once
(``devices=jax.local_devices()``, shard_map), cold and warm, with the ratio and the largest
difference.  On a CPU host add ``--cpu-devices K`` (simulated devices, sharing the host's cores and
memory: little gain there, 2 devices on 2 cores measured 1.14x at 8 + 48 and 1.24x at 8 + 96, depth 3).
"""

from __future__ import annotations

import argparse
import importlib
import os
import resource
import sys
import time
import types
import warnings

if "--cpu-devices" in sys.argv:  # simulated CPU devices must be requested before JAX starts
    _k = sys.argv[sys.argv.index("--cpu-devices") + 1]
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={_k}".strip()

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

import eft_prob as ep  # noqa: E402
from eft_prob import gauss  # noqa: E402
from eft_prob.theory import ntk_stats  # noqa: E402
from eft_prob.theory.training import nlo_trained_coefficients  # noqa: E402


def rel(a, b) -> float:
    """Largest |a − b| relative to the largest |b|."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run(spec, X, y, Xt, half: bool):
    """(coefficients, cold s, warm s) with the half grid on or off (fresh compilation each)."""
    ntk_stats._HALF_GRID = half
    jax.clear_caches()
    t = time.perf_counter()
    jax.block_until_ready(nlo_trained_coefficients(spec, X, y, Xt))
    cold = time.perf_counter() - t
    t = time.perf_counter()
    c = jax.block_until_ready(nlo_trained_coefficients(spec, X, y, Xt + 1e-3))  # new values, same shapes
    return c, cold, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--large", action="store_true", help="also 16 + 16 inputs")
    p.add_argument("--activations", nargs="+", default=["tanh", "gelu"], choices=["tanh", "gelu"])
    p.add_argument("--marginals", nargs="?", type=int, const=992, default=None, metavar="N_TEST")
    p.add_argument("--n-train", type=int, nargs="+", default=[8], help="N_A for --marginals")
    p.add_argument("--depth", type=int, default=3, help="--marginals: number of layers L (default 3)")
    p.add_argument("--batch-size", type=int, default=None, help="--marginals: batch_size of the N_TEST run")
    p.add_argument("--no-baseline", action="store_true", help="--marginals: skip the joint baseline rows")
    p.add_argument("--fused", nargs="?", type=int, const=2, default=None, metavar="REPS")
    p.add_argument("--devices", nargs="?", type=int, const=48, default=None, metavar="N_TEST")
    p.add_argument("--cpu-devices", type=int, default=None, help="simulated CPU devices (set before JAX starts)")
    p.add_argument("--nodes", type=int, nargs="+", default=None, metavar="N4")
    p.add_argument("--inner", nargs="?", type=int, const=2, default=None, metavar="REPS")
    p.add_argument("--shift", nargs="?", type=int, const=2, default=None, metavar="REPS")
    p.add_argument("--breakdown", nargs="?", type=int, const=2, default=None, metavar="REPS")
    p.add_argument("--closed-sin", action="store_true", help="sin's closed-form tables vs the nested rules")
    p.add_argument("--activation", default="tanh", choices=["tanh", "sin", "gelu"], help="σ of --marginals")
    args = p.parse_args()
    if args.closed_sin:
        return closed_sin(args.n_train, args.batch_size or 8)
    if args.breakdown is not None:
        return breakdown(args.n_train, args.depth, args.breakdown, args.batch_size or 8, args.activation)
    if args.shift is not None:
        return shift(args.n_train, args.depth, args.shift, args.batch_size or 8)
    if args.inner is not None:
        return inner(args.n_train, args.depth, args.inner, args.batch_size or 24)
    if args.nodes is not None:
        return nodes(args.nodes, args.n_train, args.depth)
    if args.devices is not None:
        return devices(args.devices, args.n_train, args.depth)
    if args.fused is not None:
        return fused(args.n_train, args.depth, args.fused)
    if args.marginals is not None:
        return marginals(
            args.marginals, args.n_train, args.depth, args.batch_size, not args.no_baseline, args.activation
        )
    sizes = [(4, 5), (8, 8)] + ([(16, 16)] if args.large else [])
    print(f"# jax {jax.__version__}, backend {jax.default_backend()}, load average {os.getloadavg()}\n")
    print(
        "| activation | N_A + N_B | full grid (baseline) warm | half grid cold | half grid warm | ratio "
        "| max rel. diff. of mean1 / cov1 | peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    warnings.simplefilter("ignore", ep.CostWarning)
    for act in args.activations:
        if act == "gelu":
            spec = ep.MLPSpec(3, (64, 64), 1, "gelu", C_b=0.173, C_W=1.983)
        else:
            spec = ep.MLPSpec.at_criticality(3, (64, 64), 1, act)
        rng = np.random.default_rng(0)
        for nA, nB in sizes:
            X, Xt = rng.normal(size=(nA, 3)), rng.normal(size=(nB, 3))
            y = np.sin(X[:, :1])
            base, _, t_base = run(spec, X, y, Xt, half=False)
            cur, cold, warm = run(spec, X, y, Xt, half=True)
            print(
                f"| {act} | {nA} + {nB} | {t_base:.2f} s | {cold:.2f} s | {warm:.2f} s | {t_base / warm:.2f}x | "
                f"{rel(cur.mean1, base.mean1):.1e} / {rel(cur.cov1, base.cov1):.1e} | {peak_gib():.2f} |",
                flush=True,
            )
    ntk_stats._HALF_GRID = True
    print(f"\nload average at the end {os.getloadavg()}")


def marginals(
    n_test: int, n_trains, depth: int = 3, batch_size=None, baseline: bool = True, activation: str = "tanh"
) -> None:
    """Joint (baseline) vs per-test-input marginals on N_A + 24 inputs, then the marginals on N_A + n_test."""
    from eft_prob.theory.training import nlo_trained_marginals

    print(
        f"# jax {jax.__version__}, backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"depth {depth}, {activation} at criticality, batch_size {batch_size or 'default'}, "
        f"load average {os.getloadavg()}\n"
    )
    print(
        "| N_A + N_B | joint (baseline) warm | marginals cold | marginals warm | per test input | ratio "
        "| max rel. diff. of mean1 / cov1 blocks | peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    warnings.simplefilter("ignore", ep.CostWarning)
    spec = ep.MLPSpec.at_criticality(3, (64,) * (depth - 1), 1, activation)  # input dim 3, L = depth
    for nA in n_trains:
        rng = np.random.default_rng(0)
        X, Xt = rng.normal(size=(nA, 3)), rng.normal(size=(max(24, n_test), 3))
        y = np.sin(X[:, :1])
        if not baseline:
            run_many(spec, X, y, Xt, nA, n_test, batch_size, cold=True)
            continue
        joint = jax.block_until_ready(nlo_trained_coefficients(spec, X, y, Xt[:24] + 1e-3))  # compile
        t = time.perf_counter()
        joint = jax.block_until_ready(nlo_trained_coefficients(spec, X, y, Xt[:24]))
        t_joint = time.perf_counter() - t
        times = []
        for shift in (1e-3, 0.0):  # cold (compilation included), then warm on the inputs of the baseline
            t = time.perf_counter()
            m = jax.block_until_ready(nlo_trained_marginals(spec, X, y, Xt[:24] + shift, batch_size=24))
            times.append(time.perf_counter() - t)
        d1 = rel(m.mean1, joint.mean1)
        d2 = rel(m.cov1[:, 0, 0], np.diag(np.asarray(joint.cov1)))
        print(
            f"| {nA} + 24 | {t_joint:.2f} s | {times[0]:.2f} s | {times[1]:.2f} s | {times[1] / 24:.3f} s "
            f"| {t_joint / times[1]:.2f}x | {d1:.1e} / {d2:.1e} | {peak_gib():.2f} |",
            flush=True,
        )
        if n_test > 24:
            run_many(spec, X, y, Xt, nA, n_test, batch_size, cold=False)
    print(f"\nload average at the end {os.getloadavg()}")


def fused(n_trains, depth: int, reps: int) -> None:
    """The innermost variadic reduction (current) vs stack-and-sum in the former chunks (baseline).

    Both with the nested-table code of that time (_UNROLLED_INNER and _BROADCAST_CONTRACT off)."""
    old = {"_UNROLLED_INNER": False, "_BROADCAST_CONTRACT": False}
    modes = {
        "baseline": {**old, "_FUSED_SUMS": False, "_MAX_ELEMS": 2_000_000},
        "current": {**old, "_FUSED_SUMS": True, "_MAX_ELEMS": ntk_stats._MAX_ELEMS},
    }
    compare_paths(modes, n_trains, depth, reps, batch=24)


def inner(n_trains, depth: int, reps: int, batch: int) -> None:
    """The innermost variable as an unrolled loop and the outer contractions as fused multiply-reduce
    (current) vs the variadic reduction over the innermost grid and einsum contractions (baseline)."""
    modes = {
        "baseline": {"_UNROLLED_INNER": False, "_BROADCAST_CONTRACT": False},
        "current": {"_UNROLLED_INNER": True, "_BROADCAST_CONTRACT": True},
    }
    compare_paths(modes, n_trains, depth, reps, batch)


def _zero_tables(sizes):
    """ntk_stats._group_tables replaced: zeros of the right size for m-input subsets with m in ``sizes``."""
    real = ntk_stats._group_tables

    def group_tables(fns, K, subsets, kinked, n, odd, rule=None):
        m = subsets.shape[1]
        if m not in sizes:
            return real(fns, K, subsets, kinked, n, odd, rule)
        return jnp.zeros(len(subsets) * len(ntk_stats._basis(len(fns) - 1, 5 - m)) ** m, K.dtype)

    return group_tables


def _stand_in_inner_sums():
    """ntk_stats._inner_sums replaced for the four-input tables: one product per function instead of
    the sum over the innermost nodes (wrong values; the outer grid and contractions unchanged)."""
    real = ntk_stats._inner_sums

    def inner_sums(ev, mu, s, x, w, shift=None):
        if mu.ndim < 4:  # (B, n/2, n, n): four-input rule; three-input tables keep the real sums
            return real(ev, mu, s, x, w, shift)
        F = len(ev(mu[..., :1]))  # the number of functions of the innermost variable
        return jnp.stack([mu * (1.0 + f) for f in range(F)])

    return inner_sums


def breakdown(n_trains, depth: int, reps: int, batch: int, activation: str) -> None:
    """The marginals with parts of the work removed, each against the full computation."""
    print(
        f"# jax {jax.__version__}, backend {jax.default_backend()}, depth {depth}, {activation} at criticality, "
        f"width 64, batch {batch}, load average {os.getloadavg()}\n"
    )
    modes = {
        "full (baseline)": {},
        "four-input innermost sums by a stand-in": {"_inner_sums": _stand_in_inner_sums()},
        "four-input tables zero": {"_group_tables": _zero_tables({4})},
        "three- and four-input tables zero": {"_group_tables": _zero_tables({3, 4})},
    }
    warnings.simplefilter("ignore", ep.CostWarning)
    spec = ep.MLPSpec.at_criticality(3, (64,) * (depth - 1), 1, activation)
    for nA in n_trains:
        cold, warm, _ = _time_modes(modes, ntk_stats, spec, nA, reps, batch)
        full = min(warm["full (baseline)"])
        print(f"\n{nA} + 24 inputs | cold | warm | share of the full warm time")
        print("|---|---|---|---|")
        for name in modes:
            print(f"| {name} | {cold[name]:.1f} s | {min(warm[name]):.2f} s | {min(warm[name]) / full:.0%} |")
        print(
            f"\nper 24 test inputs without any four-input table: {min(warm['four-input tables zero']):.2f} s",
            flush=True,
        )
    print(f"load average at the end {os.getloadavg()}")


class _Never:
    """kernels._shift_ok replaced: never the addition theorem (direct evaluation)."""

    def __call__(self, *args) -> bool:
        return False

    def __repr__(self) -> str:
        return "never"


def shift(n_trains, depth: int, reps: int, batch: int) -> None:
    """The three- and four-input tables by σ's addition theorem (current) vs direct evaluation (baseline)."""
    kernels = importlib.import_module("eft_prob.theory.kernels")  # eft_prob.theory.kernels is also a function

    modes = {"baseline": {"_shift_ok": _Never()}, "current": {"_shift_ok": kernels._shift_ok}}
    gauss.CLOSED_SIN = False  # sin on the nested rules too (its closed form: --closed-sin)
    try:
        for act in ("tanh", "sin"):
            compare_paths(modes, n_trains, depth, reps, batch, act, module=kernels)
    finally:
        gauss.CLOSED_SIN = True


def _time_modes(modes: dict, module, spec, nA: int, reps: int, batch: int):
    """nlo_trained_marginals on nA + 24 random inputs under each mode ({name: {attribute of ``module``:
    value}}; attributes a mode does not name keep their original values), each compiled afresh, then
    warm ``reps`` times, alternating modes.  Returns {name: cold time}, {name: [warm times]},
    {name: the last result}; the module's attributes are restored."""
    from eft_prob.theory.training import nlo_trained_marginals

    rng = np.random.default_rng(0)
    X, Xt = rng.normal(size=(nA, 3)), rng.normal(size=(24, 3))
    y = np.sin(X[:, :1])
    saved = {k: getattr(module, k) for flags in modes.values() for k in flags}
    cold, warm, out = {}, {k: [] for k in modes}, {}
    try:
        for _ in range(reps):
            for name, flags in modes.items():
                for k, v in {**saved, **flags}.items():
                    setattr(module, k, v)
                jax.clear_caches()  # the flags are read when tracing: compile this path afresh
                t = time.perf_counter()
                jax.block_until_ready(nlo_trained_marginals(spec, X, y, Xt + 1e-3, batch_size=batch))
                cold.setdefault(name, time.perf_counter() - t)
                t = time.perf_counter()
                out[name] = jax.block_until_ready(nlo_trained_marginals(spec, X, y, Xt, batch_size=batch))
                warm[name].append(time.perf_counter() - t)
    finally:
        for k, v in saved.items():
            setattr(module, k, v)
    return cold, warm, out


def compare_paths(
    modes: dict, n_trains, depth: int, reps: int, batch: int, activation: str = "tanh", module=ntk_stats
) -> None:
    """nlo_trained_marginals on N_A + 24 inputs (batch ``batch``) with the ntk_stats flags of each mode
    ({name: {attribute: value}}, "baseline" and "current"), each compiled afresh, then warm REPS times
    alternating; minimum warm time reported."""
    print(
        f"# jax {jax.__version__}, backend {jax.default_backend()}, depth {depth}, {activation} at criticality, "
        f"width 64, batch {batch}, load average {os.getloadavg()}\n"
    )
    print("# " + "; ".join(f"{name}: {flags}" for name, flags in modes.items()) + "\n")
    print(
        "| N_A + N_B | baseline cold / warm | current cold / warm | ratio (warm) "
        "| max rel. diff. of mean1 / cov1 | peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|")
    warnings.simplefilter("ignore", ep.CostWarning)
    spec = ep.MLPSpec.at_criticality(3, (64,) * (depth - 1), 1, activation)
    for nA in n_trains:
        cold, warm, out = _time_modes(modes, module, spec, nA, reps, batch)
        b, c = out["baseline"], out["current"]
        tb, tc = min(warm["baseline"]), min(warm["current"])
        print(
            f"| {nA} + 24 | {cold['baseline']:.1f} / {tb:.1f} s | {cold['current']:.1f} / {tc:.1f} s | {tb / tc:.2f}x "
            f"| {rel(c.mean1, b.mean1):.1e} / {rel(c.cov1, b.cov1):.1e} | {peak_gib():.2f} |",
            flush=True,
        )
    print(f"\nall warm times: baseline {warm['baseline']}, current {warm['current']}")
    print(f"load average at the end {os.getloadavg()}")


def closed_sin(n_trains, batch: int) -> None:
    """sin's tables in closed form (gauss.sin_tables, the landed path) against the nested rules
    (gauss.CLOSED_SIN off, the baseline) on the same inputs: trained marginals on N_A + 24 inputs
    at depth 3 and 10, and the NTK statistics on 5 inputs at depth 3."""
    from eft_prob.theory.training import nlo_trained_marginals

    print(f"# jax {jax.__version__}, backend {jax.default_backend()}, sin at criticality, width 64, batch {batch}\n")
    print("| what | nested rules cold / warm | closed form cold / warm | ratio (warm) | max rel. diff. |")
    print("|---|---|---|---|---|")
    warnings.simplefilter("ignore", ep.CostWarning)
    rng = np.random.default_rng(0)

    def timed(fn, *args):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args, True))
        cold = time.perf_counter() - t
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*args, False))
        return out, cold, time.perf_counter() - t

    def run(fn, *args):
        res = {}
        for closed in (False, True):
            gauss.CLOSED_SIN = closed
            jax.clear_caches()  # the flag is read when tracing
            try:
                res[closed] = timed(fn, *args)
            finally:
                gauss.CLOSED_SIN = True
        return res

    def row(what, res, fields):
        (b, bc, bw), (c, cc, cw) = res[False], res[True]
        diff = max(rel(getattr(c, f), getattr(b, f)) for f in fields)
        print(f"| {what} | {bc:.1f} / {bw:.3g} s | {cc:.1f} / {cw:.3g} s | {bw / cw:.1f}x | {diff:.1e} |", flush=True)

    X5 = rng.normal(size=(5, 3))
    spec = ep.MLPSpec.at_criticality(3, (64, 64), 1, "sin")
    stats = lambda X, first: ep.theory.ntk_statistics(spec, X + (1e-3 if first else 0.0))
    row("ntk_statistics, 5 inputs, depth 3", run(stats, X5), ("A", "B", "D", "F", "P", "Q", "R", "S", "T", "U"))
    spec = ep.MLPSpec.at_criticality(3, (64,) * 9, 1, "sin")
    X1000 = rng.normal(size=(1000, 3))
    prior = lambda X, first: ep.theory.prior_statistics(spec, X + (1e-3 if first else 0.0), factored=True)
    res = run(prior, X1000)
    for closed in (False, True):  # the pair integrals enter K^{1} and the factored V's exact parts
        p, c, w = res[closed]
        res[closed] = (types.SimpleNamespace(K1=p.K1, P=p.V.P, A=p.V.A, M=p.V.M), c, w)
    row("prior_statistics (factored), N = 1000, depth 10", res, ("K1", "P", "A", "M"))
    for nA in n_trains:
        X, Xt = rng.normal(size=(nA, 3)), rng.normal(size=(24, 3))
        y = np.sin(X[:, :1])
        for depth in (3, 10):
            spec = ep.MLPSpec.at_criticality(3, (64,) * (depth - 1), 1, "sin")
            fn = lambda X, first, spec=spec, y=y, Xt=Xt: nlo_trained_marginals(
                spec, X, y, Xt + (1e-3 if first else 0.0), batch_size=batch
            )
            row(f"trained marginals {nA} + 24, depth {depth}", run(fn, X), ("mean1", "cov1"))
    print(f"\nload average at the end {os.getloadavg()}")


def nodes(n4s, n_trains, depth: int) -> None:
    """The four-input rule's node count: time and error against a 32-node reference (same run)."""
    from eft_prob.theory.training import nlo_trained_marginals

    print(
        f"# jax {jax.__version__}, backend {jax.default_backend()}, depth {depth}, tanh at criticality, "
        f"width 64, batch 24, load average {os.getloadavg()}\n"
    )
    print("| N_A + N_B | four-input nodes | cold / warm | warm time / default's | max rel. diff. of mean1 / cov1 |")
    print("|---|---|---|---|---|")
    warnings.simplefilter("ignore", ep.CostWarning)
    spec = ep.MLPSpec.at_criticality(3, (64,) * (depth - 1), 1, "tanh")
    saved = dict(ntk_stats._NODES[False])
    default = saved[4]
    for nA in n_trains:
        rng = np.random.default_rng(0)
        X, Xt = rng.normal(size=(nA, 3)), rng.normal(size=(24, 3))
        y = np.sin(X[:, :1])
        rows = {}
        try:
            for n4 in [32, default] + [n for n in n4s if n not in (32, default)]:
                ntk_stats._NODES[False] = {**saved, 4: n4}  # read when tracing (a static argument)
                t = time.perf_counter()
                jax.block_until_ready(nlo_trained_marginals(spec, X, y, Xt + 1e-3, batch_size=24))
                cold = time.perf_counter() - t
                t = time.perf_counter()
                m = jax.block_until_ready(nlo_trained_marginals(spec, X, y, Xt, batch_size=24))
                rows[n4] = (cold, time.perf_counter() - t, m)
        finally:
            ntk_stats._NODES[False] = saved
        ref = rows[32][2]
        for n4, (cold, warm, m) in rows.items():
            print(
                f"| {nA} + 24 | {n4}{' (default)' if n4 == default else ''} | {cold:.1f} / {warm:.1f} s "
                f"| {warm / rows[default][1]:.2f} | {rel(m.mean1, ref.mean1):.1e} / {rel(m.cov1, ref.cov1):.1e} |",
                flush=True,
            )
    print(f"\nload average at the end {os.getloadavg()}")


def devices(n_test: int, n_trains, depth: int) -> None:
    """One batch at a time on the first device (baseline) vs one batch per local device at once."""
    from eft_prob.theory.training import nlo_trained_marginals

    local = jax.local_devices()
    print(
        f"# jax {jax.__version__}, {len(local)} x {local[0].device_kind}, depth {depth}, tanh at criticality, "
        f"width 64, batch 24, load average {os.getloadavg()}\n"
    )
    print(
        "| N_A + N_B | 1 device cold / warm | all devices cold / warm | ratio (warm) | max rel. diff. | peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|")
    warnings.simplefilter("ignore", ep.CostWarning)
    spec = ep.MLPSpec.at_criticality(3, (64,) * (depth - 1), 1, "tanh")
    for nA in n_trains:
        rng = np.random.default_rng(0)
        X, Xt = rng.normal(size=(nA, 3)), rng.normal(size=(n_test, 3))
        y = np.sin(X[:, :1])
        t, out = {}, {}
        for name, devs in (("one", local[:1]), ("all", local)):
            times = []
            for shift in (1e-3, 0.0):  # cold (compilation included), then warm
                t0 = time.perf_counter()
                out[name] = jax.block_until_ready(
                    nlo_trained_marginals(spec, X, y, Xt + shift, batch_size=24, devices=devs)
                )
                times.append(time.perf_counter() - t0)
            t[name] = times
        diff = max(rel(getattr(out["all"], k), getattr(out["one"], k)) for k in ("mean1", "cov1"))
        print(
            f"| {nA} + {n_test} | {t['one'][0]:.1f} / {t['one'][1]:.1f} s | {t['all'][0]:.1f} / {t['all'][1]:.1f} s "
            f"| {t['one'][1] / t['all'][1]:.2f}x | {diff:.1e} | {peak_gib():.2f} |",
            flush=True,
        )
    print(f"\nload average at the end {os.getloadavg()}")


def run_many(spec, X, y, Xt, nA: int, n_test: int, batch_size, cold: bool) -> None:
    """The marginals alone on N_A + n_test inputs, one row (``cold``: nothing compiled before)."""
    from eft_prob.theory.training import nlo_trained_marginals

    t = time.perf_counter()
    m = jax.block_until_ready(nlo_trained_marginals(spec, X, y, Xt[:n_test], batch_size=batch_size, progress=True))
    dt = time.perf_counter() - t
    finite = bool(np.all(np.isfinite(np.asarray(m.cov1))))
    print(
        f"| {nA} + {n_test} | (N⁴: not run) | {f'{dt:.1f} s | |' if cold else f'| {dt:.1f} s |'} "
        f"{dt / n_test:.3f} s | | finite: {finite} "
        f"| {peak_gib():.2f} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
