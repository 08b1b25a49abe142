"""Devices and hosts: ensembles and NUTS chains sharded over local devices (shard_map, no pmap) and
split across processes (eft_prob.distributed), with results independent of the layout.

Simulated CPU devices need XLA_FLAGS before JAX starts, and jax.distributed needs fresh processes:
those checks run in subprocesses (8 devices; two processes × 2 devices on 127.0.0.1) and compare
with the single-device results of this process bit for bit.
"""

import functools
import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

import eft_prob as ep
from eft_prob import _arviz, distributed, ensemble, inference, mc_kernels, runner
from eft_prob.theory import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRIOR_SPEC = ep.MLPSpec(2, (8, 8), 2, "tanh", C_b=0.1)
X = np.random.default_rng(0).normal(size=(3, 2))
TRAIN = dict(spec=PRIOR_SPEC, X=X, y=np.sin(X[:, :1]) * np.ones((1, 2)), X_test=X[:2] + 0.5)
TRAIN_ARGS = dict(n_networks=7, learning_rate=0.1, steps=20)
# small chunks everywhere: every call below reuses one compiled program per function (results do
# not depend on the chunk size, and compilation is most of these tests' time)
CHUNK = dict(chunk_size=2)
NUTS = dict(
    spec=ep.MLPSpec(1, (4,), 1, "tanh", C_b=0.1),
    X=np.linspace(-1.0, 1.0, 4)[:, None],
    y=np.sin(2 * np.linspace(-1.0, 1.0, 4))[:, None],
    X_test=np.array([[0.3], [1.2]]),
    noise_var=0.05,
    num_chains=5,
    num_warmup=30,
    num_samples=20,
    seed=0,
    max_divergence_fraction=1.0,  # a tiny, short run: divergences are beside the point
)
# trained O(1/n) marginals: 5 test inputs in 3 batches of 2 (process 0 of 2 gets batch 0, process 1
# batches 1 and 2, the last padded with a copy as in one process)
MARGINALS = dict(
    spec=ep.MLPSpec(2, (6,), 2, "tanh", C_b=0.1),
    X=X,
    y=np.sin(X[:, :1]) * np.ones((1, 2)),
    X_test=np.random.default_rng(1).normal(size=(5, 2)),
    learning_rate=0.1,
    steps=20,
    batch_size=2,
)
NUTS_SETTINGS = dict(num_chains=5, num_warmup=30, num_samples=20, seed=0, target_accept=0.9)  # runner.nuts's n
NUTS_GROUPS = ("posterior", "posterior_predictive", "log_likelihood", "sample_stats", "observed_data", "constant_data")


def sum_of_squares(key, X):
    """A per-network Monte Carlo statistic for map_networks: Σ f(X)² of a prior network."""
    return {"sum_of_squares": jax.numpy.sum(ep.nn.apply(PRIOR_SPEC, ep.nn.init(PRIOR_SPEC, key), X) ** 2)}


def ensembles(key_seed=1):
    """The ensemble quantities the subprocesses recompute, as {name: numpy array}."""
    key = jax.random.key(key_seed)
    out = {
        "prior": ensemble.prior_outputs(PRIOR_SPEC, X, 21, key, **CHUNK),
        "sum_of_squares": ensemble.map_networks(sum_of_squares, 13, key, X, **CHUNK)["sum_of_squares"],
    }
    Gs = ensemble.prior_kernels(PRIOR_SPEC, X, 21, key, layers=True, **CHUNK)
    out.update({f"G{i}": G for i, G in enumerate(Gs)})
    return {k: np.asarray(v) for k, v in out.items()}


def train(fn=ensemble.train, **kw):
    """ensemble.train or distributed.trained_ensemble on the TRAIN problem, one network per chunk."""
    return fn(*TRAIN.values(), *TRAIN_ARGS.values(), jax.random.key(2), chunk_size=1, **kw)


def flatten(idata) -> dict:
    """Every variable of the NUTS groups as {"group.var": values}."""
    return {
        f"{g}.{v}": np.asarray(_arviz.get_group(idata, g)[v].values)
        for g in NUTS_GROUPS
        for v in _arviz.get_group(idata, g).data_vars
    }


@functools.cache
def reference_ensembles():
    return ensembles()


@functools.cache
def reference_marginals(n_test=5):
    args = dict(MARGINALS, X_test=MARGINALS["X_test"][:n_test])
    return {k: np.asarray(v) for k, v in training.nlo_trained_marginals(**args)._asdict().items() if k != "width"}


def _no_pmap(*args, **kwargs):
    raise AssertionError("pmap was used")


@functools.cache
def reference_nuts():
    """The 5 chains on this process's one device with the shard_map path (lax.map over the chains),
    with numpyro's pmap disabled."""
    import numpyro.infer.mcmc

    assert jax.local_device_count() == 1
    args = dict(NUTS)
    saved = numpyro.infer.mcmc.pmap
    numpyro.infer.mcmc.pmap = _no_pmap
    try:
        return inference.run_nuts(
            args.pop("spec"), args.pop("X"), args.pop("y"), args.pop("X_test"), **args, chain_method="sharded"
        )
    finally:
        numpyro.infer.mcmc.pmap = saved


# -- fast: parts, layouts, arguments ---------------------------------------------------------------
@pytest.mark.parametrize("M", [1, 5, 21])
def test_part_range_blocks_are_contiguous_nearly_equal_and_cover_the_ensemble(M):
    assert ensemble.part_range(M) == range(M)
    for count in range(1, min(M, 5) + 1):
        blocks = [ensemble.part_range(M, (i, count)) for i in range(count)]
        assert [m for b in blocks for m in b] == list(range(M))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


@pytest.mark.parametrize("part", [(2, 2), (0, 0), (-1, 2), (0.5, 2), (True, 2), "0/2", (0, 1, 2), (0, 6)])
def test_bad_part_raises_naming_the_argument(part):
    with pytest.raises(ValueError, match="part"):
        ensemble.part_range(5, part)
    with pytest.raises(ValueError, match="part"):
        ensemble.prior_outputs(PRIOR_SPEC, X, 5, jax.random.key(0), part=part)


def test_parts_concatenate_to_the_whole_ensemble_bit_for_bit():
    """Process i of P computes block i with the keys of the full split: no seed juggling needed."""
    ref, key = reference_ensembles(), jax.random.key(1)
    parts = [np.asarray(ensemble.prior_outputs(PRIOR_SPEC, X, 21, key, part=(i, 3), **CHUNK)) for i in range(3)]
    np.testing.assert_array_equal(np.concatenate(parts), ref["prior"])
    G = [ensemble.prior_kernels(PRIOR_SPEC, X, 21, key, layers=True, part=(i, 2), **CHUNK) for i in range(2)]
    for layer in range(PRIOR_SPEC.depth):
        np.testing.assert_array_equal(np.concatenate([np.asarray(g[layer]) for g in G]), ref[f"G{layer}"])
    ss = [ensemble.map_networks(sum_of_squares, 13, key, X, part=(i, 2), **CHUNK)["sum_of_squares"] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(ss), ref["sum_of_squares"])


def test_trained_parts_concatenate_to_the_whole_ensemble(tmp_path):
    whole = train()
    parts = [train(part=(i, 2)) for i in range(2)]
    for name in whole._fields:
        np.testing.assert_array_equal(np.concatenate([getattr(p, name) for p in parts]), getattr(whole, name))
    # a checkpoint of part 0 is not resumed as part 1
    d = tmp_path / "ck"
    train(part=(0, 2), checkpoint=d)
    with pytest.raises(ValueError, match=r"different arguments \(part: stored '0:3', now '3:7'\)"):
        train(part=(1, 2), checkpoint=d)


def test_chain_method_choice_and_layout():
    choose = inference.choose_chain_method
    assert choose(1, backend="cpu", device_count=8) == "sequential"
    assert choose(4, backend="cpu", device_count=1) == "sequential"
    assert choose(4, backend="gpu", device_count=1) == "vectorized"
    assert choose(4, backend="cpu", device_count=4) == choose(4, backend="gpu", device_count=8) == "parallel"
    assert choose(3, backend="cpu", device_count=2) == choose(8, backend="gpu", device_count=2) == "sharded"
    # (devices used, chains per device): fewest rounds, then fewest devices, so little padding
    layouts = {(5, 8): (5, 1), (8, 8): (8, 1), (9, 8): (5, 2), (3, 2): (2, 2), (16, 8): (8, 2), (7, 1): (1, 7)}
    for (chains, devices), layout in layouts.items():
        assert inference.chain_layout(chains, devices) == layout
        used, per_device = layout
        assert used <= devices and 0 <= used * per_device - chains < used


def test_sharded_chains_on_one_device_without_pmap():
    """5 chains one after another on one device inside one shard_map program (numpyro's pmap off)."""
    idata = reference_nuts()
    assert _arviz.get_attrs(idata)["chain_method"] == "sharded"
    f = _arviz.get_group(idata, "posterior")["f_test"].values
    assert f.shape == (5, 20, 2, 1) and np.all(np.isfinite(f))
    assert len({float(c) for c in f[:, -1, 0, 0]}) == 5  # the chains differ
    with pytest.raises(ValueError, match="chain_method='parallel' needs one device per chain"):
        inference._resolve_chain_method("parallel", 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(coordinator_address="127.0.0.1:1234"), "together"),
        (dict(num_processes=2, process_id=0), "together"),
        (dict(coordinator_address="127.0.0.1", num_processes=2, process_id=0), "coordinator_address must be"),
        (dict(coordinator_address="host:70000", num_processes=2, process_id=0), "coordinator_address must be"),
        (dict(coordinator_address=1234, num_processes=2, process_id=0), "coordinator_address must be"),
        (dict(coordinator_address="h:1", num_processes=0, process_id=0), "num_processes must be"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), r"process_id must be .* \[0, 2\)"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=True), "process_id must be"),
        (dict(timeout_s=0), "timeout_s must be"),
    ],
)
def test_initialize_bad_arguments_raise_before_connecting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distributed.initialize(**kwargs)


def test_one_process_distributed_results_are_the_local_ones():
    """Without jax.distributed there is one process: the InferenceData holds the local ensembles."""
    key = jax.random.key(1)
    prior = _arviz.get_group(distributed.prior_ensemble(PRIOR_SPEC, X, 21, key, chunk_size=2), "prior_ensemble")
    assert prior["f_test"].dims == ("chain", "draw", "test_point", "output") and prior.attrs["process_count"] == 1
    np.testing.assert_array_equal(prior["f_test"].values[0], reference_ensembles()["prior"])
    idata = train(distributed.trained_ensemble)
    g = _arviz.get_group(idata, "trained_ensemble")
    whole = train()
    for var, field in [("f_test", "test_final"), ("f", "train_final"), ("f_init", "train_init"),
                       ("f_test_init", "test_init"), ("loss", "loss"), ("diverged", "diverged")]:  # fmt: skip
        np.testing.assert_array_equal(g[var].values[0], getattr(whole, field))
    assert g["f"].dims == ("chain", "draw", "obs", "output")
    with pytest.raises(ValueError, match=r"gather: process 0 of 1 must pass arrays of leading length 4"):
        distributed.gather({"a": np.zeros((3, 2))}, 4)
    with pytest.raises(ValueError, match="checkpoint must be a directory path"):
        train(distributed.trained_ensemble, checkpoint=3)


# -- subprocesses: 8 simulated devices; two processes on loopback -----------------------------------
_PRELUDE = """
import os, sys, time, warnings
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_compilation_cache_dir", os.path.expanduser(
    f"~/.cache/eft_prob_jax/{jax.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-" + sys.argv[-1]))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
warnings.simplefilter("error")
warnings.filterwarnings("ignore", category=FutureWarning, module="arviz")
_T0 = time.monotonic()
def phase(name):  # where the process is, in its stderr (shown when a run fails or times out)
    print(f"[phase {time.monotonic() - _T0:7.1f} s] {name}", file=sys.stderr, flush=True)
"""

_EIGHT_DEVICES = _PRELUDE + textwrap.dedent(
    """
    import numpyro.infer.mcmc
    from tests.test_sharding import _no_pmap
    jax.pmap = numpyro.infer.mcmc.pmap = _no_pmap
    meshes, shard_map = [], jax.shard_map
    def recording_shard_map(f, *, mesh, **kw):
        meshes.append(mesh.devices.size)
        return shard_map(f, mesh=mesh, **kw)
    jax.shard_map = recording_shard_map
    from eft_prob import _arviz, inference
    from tests.test_sharding import NUTS, ensembles, flatten
    assert jax.local_device_count() == 8
    out = ensembles()
    args = dict(NUTS)
    idata = inference.run_nuts(args.pop("spec"), args.pop("X"), args.pop("y"), args.pop("X_test"), **args)
    assert _arviz.get_attrs(idata)["chain_method"] == "parallel"
    np.savez(sys.argv[1], meshes=np.array(meshes), **out, **flatten(idata))
    """
)


def _env(devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env.pop("JAX_ENABLE_X64", None)
    return env


def _assert_nuts_equal(got: dict, idata, what: str):
    ref = flatten(idata)
    assert set(got) >= set(ref), what
    for k, v in ref.items():
        assert np.array_equal(got[k], v) and got[k].dtype == v.dtype, f"{what}: {k}"


@pytest.mark.slow
def test_eight_devices_give_the_single_device_results_bit_for_bit(tmp_path):
    """prior_outputs/prior_kernels/map_networks shard over all 8 devices, NUTS puts its 5 chains on
    5 of them ("parallel", numpyro's pmap disabled); every number equals this process's 1-device run."""
    out = tmp_path / "eight.npz"
    r = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, str(out), "eight"], env=_env(8), cwd=ROOT,
                       capture_output=True, text=True, timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    z = dict(np.load(out))
    assert set(z.pop("meshes")) == {8, 5}  # ensembles over all 8 devices, the chains over 5
    for name, ref in reference_ensembles().items():
        assert np.array_equal(z[name], ref) and z[name].dtype == ref.dtype, name
    _assert_nuts_equal(z, reference_nuts(), "8 devices")


_WORKER = _PRELUDE + textwrap.dedent(
    """
    from eft_prob import distributed
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    assert distributed.initialize(f"127.0.0.1:{port}", 2, pid, timeout_s=60) == (pid, 2)
    assert jax.local_device_count() == 2 and jax.device_count() == 4
    from tests.test_sharding import NUTS, PRIOR_SPEC, X, flatten, train
    from eft_prob import _arviz
    phase("prior ensemble")
    prior = distributed.prior_ensemble(PRIOR_SPEC, X, 21, jax.random.key(1), chunk_size=2)
    phase("trained ensemble")
    trained = train(distributed.trained_ensemble, checkpoint=os.path.join(out, "ck"))
    phase("one-sided mistake")
    try:  # a mistake on process 1 only: both processes raise instead of process 0 waiting in the gather
        train(distributed.trained_ensemble, checkpoint=3 if pid == 1 else None)
        one_sided = ""
    except Exception as e:
        one_sided = f"{type(e).__name__}: {e}"
    phase("NUTS")
    args = dict(NUTS)
    idata = distributed.run_nuts(args.pop("spec"), args.pop("X"), args.pop("y"), args.pop("X_test"), **args)
    phase("process-dependent key")
    try:  # a process-dependent key is the classic mistake
        distributed.prior_ensemble(PRIOR_SPEC, X, 21, jax.random.key(pid))
        error = ""
    except ValueError as e:
        error = str(e)
    g = _arviz.get_group(trained, "trained_ensemble")
    attrs = _arviz.get_attrs(idata)
    phase("runner: prior, trained, NUTS")
    # the same three through the main job's runner (eft-prob run --distributed)
    from types import SimpleNamespace
    from eft_prob import runner
    from tests.test_sharding import NUTS_SETTINGS, TRAIN
    r_prior = runner.prior_ensemble(PRIOR_SPEC, X, 21, 1, 2)
    data = SimpleNamespace(**{k: TRAIN[k] for k in ("X", "y", "X_test")})
    r_train = runner.trained_ensemble(TRAIN["spec"], data, 7, 0.1, 20, 2, 1, os.path.join(out, "rck"), False)
    data = SimpleNamespace(**{k: NUTS[k] for k in ("X", "y", "X_test")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny run's divergences
        r_nuts = runner.nuts(NUTS["spec"], data, NUTS["noise_var"], NUTS_SETTINGS, False)
    phase("save")
    np.savez(os.path.join(out, f"p{pid}.npz"), prior=_arviz.get_group(prior, "prior_ensemble")["f_test"].values,
             error=error, one_sided=one_sided, chain_method=attrs["chain_method"], process_count=attrs["process_count"],
             **{f"trained.{v}": g[v].values for v in g.data_vars}, **flatten(idata),
             **{"runner.prior": r_prior["f_test"].values, "runner.trained": r_train["f_test"].values,
                "runner.residual": r_train["train_residual"].values,
                "runner.nuts": r_nuts["posterior"]["f_test"].values})
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(script: str, tmp_path, timeout: int, *extra: str) -> list[tuple[str, str]]:
    """``script`` as processes 0 and 1 of a jax.distributed run on loopback (2 CPU devices each);
    returns their (stdout, stderr).  A run past ``timeout`` is killed and reported with both logs."""
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(i), port, str(tmp_path), f"dist{i}", *extra],
            **dict(env=_env(2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        )
        for i in range(2)
    ]
    deadline, outs, timed_out = time.monotonic() + timeout, [], False
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1)))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:  # kill what still runs and read every pipe to its end, so that none is left open
        for p in procs:
            if p.poll() is None:
                p.kill()
        outs += [p.communicate() for p in procs[len(outs) :]]
    report = "\n\n".join(
        f"process {i} (exit {p.returncode}):\n{err[-3000:]}" for i, (p, (_, err)) in enumerate(zip(procs, outs))
    )
    assert not timed_out, f"not done in {timeout} s:\n{report}"
    assert all(p.returncode == 0 for p in procs), report
    return outs


def test_a_hung_pair_of_processes_is_killed_and_reported(tmp_path):
    """_run_two_processes past its timeout: both processes killed, both logs in the failure, and
    every pipe read to its end (an open one fails the next test on the worker with
    PytestUnraisableExceptionWarning)."""
    script = "import sys, time; print('started', sys.argv[1], file=sys.stderr, flush=True); time.sleep(60)"
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="not done in 3 s") as failure:
        _run_two_processes(script, tmp_path, 3)
    assert time.monotonic() - t0 < 30
    report = str(failure.value)
    assert all(re.search(rf"process {i} \(exit -9\):\s+started {i}", report) for i in (0, 1)), report


@pytest.mark.slow
def test_two_processes_on_loopback_gather_the_single_process_run(tmp_path):
    """2 processes × 2 CPU devices through jax.distributed: the gathered prior and trained
    ensembles equal the single-process ones exactly; the 5 NUTS chains (2 on process 0, one per
    device; 3 on process 1, two rounds on 2 devices with one padding chain) gathered into one
    InferenceData equal the single-device run, every group, bit for bit."""
    _run_two_processes(_WORKER, tmp_path, timeout=180)

    ref = reference_ensembles()
    whole = train()
    fields = {"f_test": "test_final", "f": "train_final", "f_init": "train_init", "f_test_init": "test_init",
              "loss": "loss", "diverged": "diverged", "steps_done": "steps_done"}  # fmt: skip
    for pid in range(2):
        z = dict(np.load(tmp_path / f"p{pid}.npz"))
        assert np.array_equal(z["prior"], ref["prior"][None]), pid
        for var, field in fields.items():
            assert np.array_equal(z[f"trained.{var}"][0], getattr(whole, field)), (pid, var)
        assert "key differ between processes" in str(z["error"]), pid
        one_sided = str(z["one_sided"])
        assert "checkpoint must be a directory path or None, got 3" in one_sided, pid
        assert one_sided.startswith(("RuntimeError: process 1 of 2 failed", "ValueError: checkpoint")[pid]), pid
        assert int(z["process_count"]) == 2 and str(z["chain_method"]) == ("parallel", "sharded")[pid]
        _assert_nuts_equal(z, reference_nuts(), f"process {pid}")
        assert z["posterior.f_test"].shape == (5, 20, 2, 1)
    assert sorted(os.listdir(tmp_path / "ck")) == ["process_0", "process_1"]
    # eft-prob run's runner: part + gather on every process = the single-process groups
    from types import SimpleNamespace

    r_prior = runner.prior_ensemble(PRIOR_SPEC, X, 21, 1, 2)["f_test"].values
    data = SimpleNamespace(**{k: TRAIN[k] for k in ("X", "y", "X_test")})
    r_train = runner.trained_ensemble(TRAIN["spec"], data, 7, 0.1, 20, 2, 1, None, False)
    for pid in range(2):
        z = dict(np.load(tmp_path / f"p{pid}.npz"))
        assert np.array_equal(z["runner.prior"], r_prior), pid
        assert np.array_equal(z["runner.trained"], r_train["f_test"].values), pid
        assert np.array_equal(z["runner.residual"], r_train["train_residual"].values), pid
        assert np.array_equal(z["runner.nuts"], flatten(reference_nuts())["posterior.f_test"]), pid
    assert sorted(os.listdir(tmp_path / "rck")) == ["process_0", "process_1"]


_MARGINALS_WORKER = _PRELUDE + textwrap.dedent(
    """
    from eft_prob import distributed
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    assert distributed.initialize(f"127.0.0.1:{port}", 2, pid, timeout_s=60) == (pid, 2)
    from tests.test_sharding import MARGINALS, PRIOR_SPEC, X
    phase("kernel moments")
    km = distributed.kernel_moments(PRIOR_SPEC, X, 9, jax.random.key(3))
    phase("trained marginals")
    ck = os.path.join(out, "ck")
    m = distributed.trained_marginals(**MARGINALS, checkpoint=ck, progress=True)
    again = distributed.trained_marginals(**MARGINALS, checkpoint=ck, progress=True)  # every batch stored
    assert all(np.array_equal(a, b) for a, b in zip(m[:4], again[:4]))
    one = distributed.trained_marginals(**dict(MARGINALS, X_test=MARGINALS["X_test"][:2]))  # process 0 idle
    short = distributed.trained_marginals(**dict(MARGINALS, X_test=MARGINALS["X_test"][:3]))  # 1 + 1 padded
    phase("runner and cli stages")
    # the main job's pieces: runner's order-1 trained group (3 + 5 inputs above a lowered dense limit:
    # one test input at a time, batches of 2) and cli's stages, which follow process 0's checkpoints
    from eft_prob import cli, runner
    from eft_prob.theory import training
    training._DENSE_TRAINED_MAX = 5
    args = [MARGINALS[k] for k in ("spec", "X", "y", "X_test", "learning_rate", "steps")]
    group = runner._trained_marginal_group(*args, os.path.join(out, "tm.partial.npz"), False)

    class Stored:
        saved = []
        def load(self, name):
            return ({"g": "stored"}, {"warnings": []}) if name == "stored" else None
        def save(self, name, groups, info):
            self.saved.append(name)

    ck = Stored() if pid == 0 else None
    log = cli._Log(stream=open(os.devnull, "w"), progress=open(os.devnull, "w"))
    calls = []
    stored = cli._run_stage(log, ck, "stored", "m", lambda: calls.append("stored") or ({"g": "computed"}, {}))
    fresh = cli._run_stage(log, ck, "fresh", "m", lambda: calls.append("fresh") or ({"g": f"computed {pid}"}, {}))
    assert stored[0] == {"g": "stored"} and fresh[0] == {"g": f"computed {pid}"} and calls == ["fresh"]
    assert Stored.saved == (["fresh"] if pid == 0 else [])
    def cannot_write():
        raise cli.SpecError("--out x: cannot write there")
    try:
        cli._on_lead(cannot_write)
        lead_error = ""
    except cli.SpecError as e:
        lead_error = str(e)
    errors = [lead_error]
    # in a program that connected the processes, the main job splits its work too: a single NUTS chain
    # (--smoke) cannot be split across 2 processes, which the command says before computing anything
    assert cli.main(["run", "models/bayesian.toml", "--smoke"]) == 2
    phase("one-sided failures")
    for call in (
        lambda: distributed.trained_marginals(**MARGINALS, memory_limit_gib=1e-6 if pid == 1 else None),
        lambda: distributed.kernel_moments(PRIOR_SPEC, X, 9, jax.random.key(pid)),
    ):
        try:
            call()
            errors.append("")
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
    phase("save")
    np.savez(os.path.join(out, f"p{pid}.npz"), errors=np.array(errors), width=m.width,
             **{f"km.{k}": v for k, v in km._asdict().items()},
             **{f"m.{k}": np.asarray(v) for k, v in m._asdict().items() if k != "width"},
             **{f"one.{k}": np.asarray(v) for k, v in one._asdict().items() if k != "width"},
             **{f"short.{k}": np.asarray(v) for k, v in short._asdict().items() if k != "width"},
             group_mean=np.asarray(group.loc), group_tril=np.asarray(group.scale_tril))
    """
)


@pytest.mark.slow
def test_two_processes_split_the_kernel_moments_and_the_trained_marginals(tmp_path, monkeypatch):
    """Monte Carlo kernel moments and trained O(1/n) marginals across 2 processes × 2 CPU devices:
    the merged moments equal the single-process ones to rounding, the gathered marginals equal the
    single-process run bit for bit (also with process 0 idle, and with process 1's one short batch
    padded as in one process), each process resumes from its own
    checkpoint, and a failure on one process makes every process raise instead of hanging."""
    logs = [err for _, err in _run_two_processes(_MARGINALS_WORKER, tmp_path, timeout=400)]
    monkeypatch.setattr(training, "_DENSE_TRAINED_MAX", 5)
    args = [MARGINALS[k] for k in ("spec", "X", "y", "X_test", "learning_rate", "steps")]
    group = runner._trained_marginal_group(*args, None, False)
    assert sorted(os.listdir(tmp_path / "tm.partial.processes")) == ["process_0_of_2.npz", "process_1_of_2.npz"]
    km = mc_kernels.kernel_moments(PRIOR_SPEC, X, 9, jax.random.key(3))
    ref, ref_one, ref_short = reference_marginals(), reference_marginals(2), reference_marginals(3)
    for pid in range(2):
        z = dict(np.load(tmp_path / f"p{pid}.npz"))
        for k, v in km._asdict().items():
            np.testing.assert_allclose(z[f"km.{k}"], v, rtol=1e-13, atol=0, err_msg=f"{pid} {k}")
        for k, v in ref.items():
            assert np.array_equal(z[f"m.{k}"], v), (pid, k)
            assert np.array_equal(z[f"one.{k}"], ref_one[k]), (pid, k)
            assert np.array_equal(z[f"short.{k}"], ref_short[k]), (pid, k)
        assert int(z["width"]) == 6
        lead, memory, key = (str(e) for e in z["errors"])
        if pid == 0:
            assert lead == "--out x: cannot write there", lead
        else:
            assert lead == "process 0 of 2 failed, so this one stops too: SpecError: --out x: cannot write there"
        np.testing.assert_array_equal(z["group_mean"], group.loc)
        np.testing.assert_array_equal(z["group_tril"], group.scale_tril)
        if pid == 1:
            assert memory.startswith("MemoryLimitError: nlo_trained_marginals"), memory
        else:
            assert memory.startswith("RuntimeError: process 1 of 2 failed") and "MemoryLimitError" in memory, memory
        assert "key differ between processes" in key, (pid, key)
    assert sorted(os.listdir(tmp_path / "ck")) == ["process_0_of_2.npz", "process_1_of_2.npz"]
    assert "batch 1/1, 2/2 test inputs" in logs[0] and "batch 2/2, 3/3 test inputs" in logs[1]
    fewer = "[nuts] num_chains = 1 (--smoke) is fewer than the 2 processes. Fix: raise it to at least 2"
    assert all(fewer in log for log in logs)
    assert all("resumed from" in log for log in logs)


def test_one_process_kernel_moments_and_trained_marginals_are_the_local_ones(tmp_path):
    """Without jax.distributed: distributed.kernel_moments / trained_marginals equal the local
    functions exactly; the checkpoint is a directory holding process_0_of_1.npz."""
    km = distributed.kernel_moments(PRIOR_SPEC, X, 9, jax.random.key(3))
    local = mc_kernels.kernel_moments(PRIOR_SPEC, X, 9, jax.random.key(3))
    for k, v in local._asdict().items():
        assert np.array_equal(getattr(km, k), v), k
    m = distributed.trained_marginals(**MARGINALS, checkpoint=tmp_path / "ck")
    for k, v in reference_marginals().items():
        assert np.array_equal(np.asarray(getattr(m, k)), v) and getattr(m, k).dtype == np.float64, k
    assert os.listdir(tmp_path / "ck") == ["process_0_of_1.npz"]
    with pytest.raises(ValueError, match="checkpoint must be a directory path"):
        distributed.trained_marginals(**MARGINALS, checkpoint=3)
    with pytest.raises(ValueError, match="batch_size"):
        distributed.trained_marginals(**dict(MARGINALS, batch_size=0))
    with pytest.raises(ValueError, match="n_networks must be at least 2"):
        distributed.kernel_moments(PRIOR_SPEC, X, 1, jax.random.key(3))


_CLI_SPEC = """
[model]
input_dim = 1
hidden = [8]
output_dim = 1
activation = "tanh"
C_b = 0.1

[run]
comparisons = ["initialization", "training", "bayes"]
theory_draws = 50

[data]
generator = "sine"
n_train = 3
n_test = 4

[prior]
n_networks = 64
chunk_size = 8

[training]
learning_rate = 0.2
steps = 20
n_networks = 8

[bayes]
noise_var = 0.01

[nuts]
num_chains = 2
num_warmup = 20
num_samples = 20
"""

_CLI_WORKER = textwrap.dedent(
    """
    import os, sys
    from eft_prob.theory import training
    training._DENSE_TRAINED_MAX = 4  # 3 + 4 inputs: the order-1 trained group one test input at a time
    from eft_prob import cli
    pid, port, out = sys.argv[1], sys.argv[2], sys.argv[3]
    argv = ["run", os.path.join(out, "spec.toml"), "--out", os.path.join(out, "single" if pid == "single" else "out")]
    if pid != "single":
        argv += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", pid]
    sys.exit(cli.main(argv + sys.argv[5:]))
    """
)


def _two_main_jobs(tmp_path, *extra) -> list[tuple[str, str]]:
    """_CLI_WORKER as processes 0 and 1 on loopback; their (stdout, stderr)."""
    return _run_two_processes(_CLI_WORKER, tmp_path, 900, *extra)


@pytest.mark.heavy
def test_main_job_across_two_processes_equals_one_process(tmp_path):
    """eft-prob run with --coordinator/--num-processes/--process-id on loopback (2 processes × 2 CPU
    devices, the same --out): process 0 writes the one results.nc, equal group by group to a
    single-process run (prior and trained ensembles, NUTS chains, the order-1 trained marginals split
    by batches); process 1 reports nothing; --resume loads every stage from process 0's checkpoints
    on both processes.  Several minutes on 2 cores."""
    from eft_prob import _arviz

    (tmp_path / "spec.toml").write_text(_CLI_SPEC)
    r = subprocess.run([sys.executable, "-c", _CLI_WORKER, "single", "0", str(tmp_path), "single"], env=_env(2),
                       cwd=ROOT, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    outs = _two_main_jobs(tmp_path)
    quiet = lambda text: [x for x in text.splitlines() if not x.startswith("[Gloo]")] == []
    assert "verdict:" in outs[0][0] and quiet(outs[1][0]) and "done in" not in outs[1][1]
    one, two = (runner.read_idata(str(tmp_path / d / "results.nc")) for d in ("single", "out"))
    groups = set(_arviz.group_names(one))
    assert groups == set(_arviz.group_names(two)) and {"prior_ensemble", "trained_ensemble", "posterior"} <= groups
    for g in groups:
        a, b = _arviz.get_group(one, g), _arviz.get_group(two, g)
        assert set(a.data_vars) == set(b.data_vars), g
        for v in a.data_vars:
            assert np.array_equal(a[v].values, b[v].values, equal_nan=True), (g, v)
    assert _arviz.get_group(two, "trained_theory_order1").attrs["marginal"] == 1
    outs = _two_main_jobs(tmp_path, "--resume")  # every stage from process 0's checkpoints, on both processes
    assert outs[0][1].count("resumed from checkpoint") == 6 and quiet(outs[1][0]) and "resumed" not in outs[1][1]
