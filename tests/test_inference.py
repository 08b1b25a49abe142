"""NUTS runner: argument checks, chain-method choice, InferenceData layout, convergence report,
divergence warning and seed reproducibility.  NUTS runs are slow-marked and shared (_nuts_cases)."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import eft_prob as ep
from eft_prob import _arviz, inference
from eft_prob.inference import NUTSDivergenceWarning, choose_chain_method, convergence_summary, to_inference_data

from . import _nuts_cases as cases

SPEC = cases.SMALL["spec"]


# -- fast: arguments ----------------------------------------------------------------------------
def _run(**kw):
    args = dict(noise_var=0.01, num_chains=2, num_warmup=10, num_samples=10, seed=0)
    args.update(kw)
    X, y, X_test = args.pop("X", cases.X), args.pop("y", cases.Y), args.pop("X_test", cases.X_TEST)
    return inference.run_nuts(args.pop("spec", SPEC), X, y, X_test, **args)


def test_arviz_import_survives_the_daily_stamp_race(tmp_path):
    # arviz 0.23.4 writes a daily stamp through a fixed temporary name on the first import of a
    # day; two processes importing at once (xdist workers) made one fail with FileNotFoundError.
    # In a fresh interpreter with an empty cache directory: (1) the first `import arviz` fails with
    # that error, whatever the arviz version (injected), and (2) on 0.23.x the stamp write itself
    # loses the race once.  eft_prob._arviz must import all the same, by retrying.
    script = textwrap.dedent(
        """
        import builtins, pathlib
        injected, raced = [], []
        real_import, real_replace = builtins.__import__, pathlib.Path.replace
        def failing_import(name, *args, **kwargs):
            if name == "arviz" and not injected:
                injected.append(1)
                raise FileNotFoundError(2, "No such file or directory", "daily_warning.tmp")
            return real_import(name, *args, **kwargs)
        def racy(self, target):
            if pathlib.Path(target).name == "daily_warning" and not raced:
                raced.append(1)
                self.unlink()
                raise FileNotFoundError(2, "No such file or directory", str(self))
            return real_replace(self, target)
        builtins.__import__, pathlib.Path.replace = failing_import, racy
        from eft_prob import _arviz
        print(len(injected), len(raced), _arviz.ARVIZ_VERSION)
        """
    )
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    injected, raced, version = out.stdout.split()
    assert version == _arviz.ARVIZ_VERSION and injected == "1"
    if version == "0.23.4":  # the release with the stamp file: its race must have been exercised too
        assert raced == "1"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"X": np.ones((6, 2))}, "X must have shape"),
        ({"X_test": np.ones((3, 2))}, "X_test must have shape"),
        ({"y": np.ones((5, 1))}, "y must have shape"),
        ({"y": np.where(np.arange(6)[:, None] == 2, np.nan, cases.Y)}, "y contains NaN"),
        ({"y": None}, "y is required"),
        ({"noise_var": 0.0}, "noise_var must be a finite scalar > 0"),
        ({"noise_var": -1.0}, "noise_var must be a finite scalar > 0"),
        ({"noise_var": None}, "noise_var is required"),
        ({"num_chains": 0}, "num_chains must be an integer >= 1"),
        ({"num_samples": 2.5}, "num_samples must be an integer"),
        ({"num_warmup": -1}, "num_warmup must be an integer >= 0"),
        ({"target_accept": 1.0}, "target_accept must lie in"),
        ({"max_divergence_fraction": 1.5}, "max_divergence_fraction must lie in"),
        ({"chain_method": "threads"}, "chain_method must be None"),
        ({"seed": "zero"}, "seed must be an int"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        _run(**kw)


def test_spec_must_be_an_mlpspec():
    with pytest.raises(TypeError, match=r"spec must be an eft_prob\.MLPSpec"):
        _run(spec={"hidden": (16,)})


@pytest.mark.skipif(jax.local_device_count() >= 4, reason="needs fewer devices than chains")
def test_parallel_without_enough_devices_is_an_error():
    with pytest.raises(ValueError, match="chain_method='parallel' needs one device per chain"):
        _run(num_chains=4, chain_method="parallel")


def test_choose_chain_method():
    assert choose_chain_method(4, backend="cpu", device_count=1) == "sequential"
    assert choose_chain_method(4, backend="cpu", device_count=4) == "parallel"
    assert choose_chain_method(4, backend="cpu", device_count=8) == "parallel"
    assert choose_chain_method(8, backend="cpu", device_count=2) == "sharded"
    assert choose_chain_method(3, backend="cpu", device_count=2) == "sharded"  # 2 rounds, one padding chain
    assert choose_chain_method(4, backend="gpu", device_count=1) == "vectorized"
    assert choose_chain_method(1, backend="gpu", device_count=1) == "sequential"


# -- fast: InferenceData from given draws --------------------------------------------------------
def _draws(rng, C=2, D=300, learned=False, weights=False):
    N, Nt = cases.X.shape[0], cases.X_TEST.shape[0]
    s = {"f": rng.normal(size=(C, D, N, 1)), "f_test": rng.normal(size=(C, D, Nt, 1))}
    if learned:
        s["noise_var"] = rng.uniform(0.5, 2.0, size=(C, D))
    if weights:
        s["W1"], s["b1"] = rng.normal(size=(C, D, 16, 1)), rng.normal(size=(C, D, 16))
    return s


def _idata(samples, noise_var=0.25, **kw):
    return to_inference_data(
        samples, X=cases.X, y=cases.Y, X_test=cases.X_TEST, noise_var=noise_var, key=jax.random.key(0), **kw
    )


def test_to_inference_data_groups_dims_and_likelihood(rng):
    s = _draws(rng, weights=True)
    idata = _idata(s, attrs={"chain_method": "sequential"})
    groups = set(_arviz.group_names(idata))
    assert {"posterior", "posterior_predictive", "log_likelihood", "observed_data", "constant_data"} <= groups
    post = _arviz.get_group(idata, "posterior")
    assert set(post.data_vars) == {"f", "f_test"}  # weights dropped by default
    assert post["f_test"].dims == ("chain", "draw", "test_point", "output")
    assert post["f"].dims == ("chain", "draw", "obs", "output")
    np.testing.assert_array_equal(post["test_point"].values, np.arange(4))
    np.testing.assert_array_equal(_arviz.get_group(idata, "observed_data")["y"].values, cases.Y)
    const = _arviz.get_group(idata, "constant_data")
    np.testing.assert_array_equal(const["X_test"].values, cases.X_TEST)
    assert float(const["noise_var"]) == 0.25
    ll = _arviz.get_group(idata, "log_likelihood")["y"].values
    expected = -0.5 * np.log(2 * np.pi * 0.25) - 0.5 * (cases.Y - s["f"]) ** 2 / 0.25
    np.testing.assert_allclose(ll, expected, rtol=1e-12)
    assert _arviz.get_attrs(idata)["chain_method"] == "sequential"
    pp = _arviz.get_group(idata, "posterior_predictive")
    noise = (pp["y_test"] - pp["f_test"]).values.ravel()
    # the predictive noise is N(0, 0.25): variance within 5 standard errors (2400 draws)
    assert abs(noise.var() - 0.25) < 5 * 0.25 * np.sqrt(2 / noise.size)
    assert abs(noise.mean()) < 5 * 0.5 / np.sqrt(noise.size)


def test_to_inference_data_keeps_weights_and_learned_noise(rng):
    s = _draws(rng, learned=True, weights=True)
    idata = _idata(s, noise_var=None, keep_weights=True)
    post = _arviz.get_group(idata, "posterior")
    assert {"W1", "b1", "noise_var"} <= set(post.data_vars)
    assert post["W1"].dims == ("chain", "draw", "W1_dim_0", "W1_dim_1")
    assert "noise_var" not in _arviz.get_group(idata, "constant_data")
    ll = _arviz.get_group(idata, "log_likelihood")["y"].values
    nv = s["noise_var"][..., None, None]
    np.testing.assert_allclose(ll, -0.5 * np.log(2 * np.pi * nv) - 0.5 * (cases.Y - s["f"]) ** 2 / nv, rtol=1e-12)
    assert set(convergence_summary(idata)["variable"]) == {"f", "f_test", "noise_var"}


def test_to_inference_data_checks_shapes(rng):
    s = _draws(rng)
    s["f_test"] = s["f_test"][:, :, :3]
    with pytest.raises(ValueError, match=r"samples\['f_test'\] must be"):
        _idata(s)
    with pytest.raises(ValueError, match="samples must contain 'f'"):
        _idata({"f_test": s["f_test"]})


def test_convergence_summary_on_independent_and_stuck_chains(rng):
    idata = _idata(_draws(rng, C=4, D=500), attrs={"sampling_time_s": 2.0})
    table = convergence_summary(idata)
    assert len(table) == 6 + 4  # every f and f_test scalar, no weights
    ft = table[table["variable"] == "f_test"]
    np.testing.assert_array_equal(ft["test_point"], np.arange(4))
    assert np.all(table["obs"][table["variable"] == "f_test"] == -1)
    # independent N(0, 1) draws: R-hat ≈ 1, ESS ≈ 2000, MCSE ≈ 1/√2000
    assert np.all(np.abs(table["r_hat"] - 1) < 0.02)
    assert np.all((table["ess_bulk"] > 1400) & (table["ess_bulk"] < 2800))
    np.testing.assert_allclose(table["mcse_mean"], table["sd"] / np.sqrt(2000), rtol=0.3)
    assert table.attrs["seconds_per_ess"] == pytest.approx(2.0 / table.attrs["min_ess_bulk"])
    # a chain stuck at one value: R-hat flags it (inf/NaN or far above 1), without numpy warnings
    s = _draws(rng, C=2, D=200)
    s["f_test"][1] = 3.0
    stuck = convergence_summary(_idata(s), var_names=["f_test"])
    assert np.all(~(stuck["r_hat"] < 1.5))
    with pytest.raises(ValueError, match="var_names"):
        convergence_summary(idata, var_names=["W1"])


def test_divergence_warning_threshold():
    div = np.zeros((2, 100), bool)
    div[0, :2] = True  # 1% exactly: not above the threshold
    inference._warn_divergences(div, 0.01, 0.9)
    div[1, 0] = True
    with pytest.warns(NUTSDivergenceWarning, match=r"3 of 200 .* Raise target_accept \(now 0.9"):
        inference._warn_divergences(div, 0.01, 0.9)
    assert issubclass(NUTSDivergenceWarning, UserWarning)


# -- slow: real NUTS --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    return cases.small_run()


@pytest.mark.slow
def test_nuts_inference_data_layout(small):
    idata, caught = small
    assert not caught, [str(w.message) for w in caught]  # in particular no NUTSDivergenceWarning
    C, D, N, Nt = 2, 200, 6, 4
    assert set(_arviz.group_names(idata)) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "sample_stats",
        "observed_data",
        "constant_data",
    }
    post = _arviz.get_group(idata, "posterior")
    assert set(post.data_vars) == {"f", "f_test"}
    assert post["f_test"].shape == (C, D, Nt, 1) and post["f"].shape == (C, D, N, 1)
    pp = _arviz.get_group(idata, "posterior_predictive")
    assert {v: pp[v].dims for v in pp.data_vars} == {
        "y": ("chain", "draw", "obs", "output"),
        "y_test": ("chain", "draw", "test_point", "output"),
        "f_test": ("chain", "draw", "test_point", "output"),
    }
    assert _arviz.get_group(idata, "log_likelihood")["y"].shape == (C, D, N, 1)
    stats = _arviz.get_group(idata, "sample_stats")
    assert {"diverging", "energy", "lp", "n_steps", "tree_depth", "step_size", "acceptance_rate"} <= set(stats)
    assert stats["diverging"].dtype == bool and stats["tree_depth"].shape == (C, D)
    assert np.all(stats["tree_depth"].values >= 1) and np.all(stats["tree_depth"].values <= 10)
    attrs = _arviz.get_attrs(idata)
    assert attrs["chain_method"] == choose_chain_method(2)
    assert attrs["num_samples"] == D and attrs["sampling_time_s"] > 0
    # the network fits the data: posterior mean of f within 3 noise sd of y
    assert np.all(np.abs(post["f"].mean(("chain", "draw")).values - cases.Y) < 3 * np.sqrt(cases.NOISE_VAR))


@pytest.mark.slow
def test_nuts_convergence_is_reported_in_function_space(small):
    table = convergence_summary(small[0])
    assert set(table["variable"]) == {"f", "f_test"}
    for col in ("r_hat", "ess_bulk", "ess_tail", "mcse_mean"):
        assert np.all(np.isfinite(table[col])), col
    assert table.attrs["max_r_hat"] < 1.05
    assert table.attrs["min_ess_bulk"] > 100
    assert table.attrs["num_divergent"] == 0
    assert 0 < table.attrs["seconds_per_ess"] < np.inf


@pytest.mark.slow
def test_nuts_same_seed_same_draws(small):
    again = cases.run(cases.SMALL)
    other = cases.run(cases.SMALL, seed=1)
    for group, var in [("posterior", "f_test"), ("posterior_predictive", "y_test"), ("sample_stats", "n_steps")]:
        a = _arviz.get_group(small[0], group)[var].values
        np.testing.assert_array_equal(a, _arviz.get_group(again, group)[var].values)
        assert not np.array_equal(a, _arviz.get_group(other, group)[var].values)


@pytest.mark.slow
def test_divergence_warning_on_a_bad_setup():
    # a huge prior scale (C_W = 100), nearly noiseless data and a tiny acceptance target make the
    # step size far too large for the curvature of the posterior
    bad = dict(cases.SMALL, spec=ep.MLPSpec(1, (16,), 1, "tanh", C_b=0.1, C_W=100.0), num_warmup=100, num_samples=100)
    with pytest.warns(NUTSDivergenceWarning, match=r"of 200 post-warmup NUTS transitions diverged"):
        idata = inference.run_nuts(
            bad.pop("spec"), cases.X, cases.Y, cases.X_TEST, noise_var=1e-4, target_accept=0.05, **bad
        )
    assert convergence_summary(idata).attrs["divergence_fraction"] > 0.5


_DEVICES_SCRIPT = textwrap.dedent(
    """
    import os, sys, warnings
    import jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(
        f"~/.cache/eft_prob_jax/{jax.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", category=FutureWarning, module="arviz")
    import eft_prob as ep
    from eft_prob import _arviz, inference
    assert jax.local_device_count() == 2
    X = np.linspace(-1, 1, 4)[:, None]; y = np.sin(2 * X); Xt = np.array([[0.3]])
    spec = ep.MLPSpec(1, (4,), 1, "tanh", C_b=0.1)
    for chains, method, ask in [(2, "parallel", None), (4, "sharded", None), (2, "vectorized", "vectorized")]:
        # a tiny, short run: divergences are beside the point here
        idata = inference.run_nuts(spec, X, y, Xt, noise_var=0.05, num_chains=chains, num_warmup=30,
                                   num_samples=20, seed=0, max_divergence_fraction=1.0, chain_method=ask)
        assert _arviz.get_attrs(idata)["chain_method"] == method
        f = _arviz.get_group(idata, "posterior")["f_test"].values
        assert f.shape == (chains, 20, 1, 1) and np.all(np.isfinite(f))
        assert len({float(c) for c in f[:, -1, 0, 0]}) == chains  # the chains differ
    print("ok")
    """
)


@pytest.mark.slow
def test_parallel_sharded_and_vectorized_chains_on_two_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
