"""Theory vs NUTS comparison: moments with MCSEs, distances, calibration, log predictive density,
plots.  Fast tests use exact independent draws from a known law in place of NUTS, so every
statistic has a known answer; slow tests use the shared NUTS runs of _nuts_cases."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy import stats

import eft_prob as ep
from eft_prob import _arviz, compare
from eft_prob.distributions import BayesianPosterior, KernelGaussian, KernelMixture, NetworkPrior
from eft_prob.inference import to_inference_data

from . import _nuts_cases as cases

NV = cases.NOISE_VAR
WIDE = cases.WIDE["spec"]
X_MANY = np.linspace(-1.5, 1.5, 40)[:, None]  # enough held-out points for calibration tests


def _posterior(X_test, spec=WIDE):
    return _cached_posterior(tuple(np.ravel(X_test)), spec)


@functools.cache
def _cached_posterior(x_test: tuple, spec):  # kernels compile per input count: build each law once
    return BayesianPosterior(spec, cases.X, cases.Y, np.array(x_test)[:, None], NV)


def _exact_idata(X_test, key=0, C=4, D=500):
    """InferenceData shaped like run_nuts's, with independent draws from the GP posterior itself."""
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    f_test = np.asarray(_posterior(X_test).sample(k1, (C, D)))
    f = np.asarray(_posterior(cases.X).sample(k2, (C, D)))
    return to_inference_data(
        {"f": f, "f_test": f_test}, X=cases.X, y=cases.Y, X_test=X_test, noise_var=NV, key=k3, attrs={}
    )


def _shifted(d, by):
    """The same Gaussian law moved by ``by`` standard deviations."""
    return KernelGaussian(d.loc + by * jnp.sqrt(d.variance), d.scale_tril)


@pytest.fixture(scope="module")
def exact():
    idata = _exact_idata(cases.X_TEST)
    compare.add_theory(idata, "theory_order0", _posterior(cases.X_TEST), jax.random.key(5), 4000)
    compare.add_theory(idata, "theory_wrong", _shifted(_posterior(cases.X_TEST), 1.0), jax.random.key(6), 4000)
    return idata


# -- fast: the statistics on exact draws ---------------------------------------------------------------
def test_theory_groups_hold_draws_moments_and_densities(exact):
    assert compare.theory_names(exact) == ["theory_order0", "theory_wrong"]
    g = _arviz.get_group(exact, "theory_order0")
    d = _posterior(cases.X_TEST)
    assert g["f_test"].dims == ("chain", "draw", "test_point", "output") and g["f_test"].shape == (1, 4000, 4, 1)
    np.testing.assert_allclose(g["mean"].values, d.mean, rtol=1e-12)
    np.testing.assert_allclose(g["variance"].values, d.variance, rtol=1e-12)
    x, p = g["density_grid"].values, g["density"].values
    np.testing.assert_allclose(p, stats.norm.pdf(x, np.asarray(d.mean)[..., None], np.sqrt(d.variance)[..., None]))
    np.testing.assert_allclose(np.trapezoid(p, x, axis=-1), 1.0, atol=1e-4)
    assert g.attrs["distribution"] == "BayesianPosterior" and g.attrs["density_kind"] == "exact"


def test_compare_moments_z_scores_and_mcse(exact):
    table = compare.compare_moments(exact)
    assert list(table["theory"].unique()) == ["theory_order0", "theory_wrong"]
    right = table[table["theory"] == "theory_order0"]
    n = 2000  # independent draws: ESS ≈ n, MCSE(mean) = sd/√n, MCSE(var) = var·√(2/n) for a Gaussian
    np.testing.assert_allclose(right["mcse_mean"], np.sqrt(right["theory_var"] / n), rtol=0.25)
    np.testing.assert_allclose(right["mcse_var"], right["theory_var"] * np.sqrt(2 / n), rtol=0.25)
    assert np.all(np.abs(right[["z_mean", "z_var"]].to_numpy()) < 4.5)
    # a theory one standard deviation off is ~√n = 45 MCSEs away
    wrong = table[table["theory"] == "theory_wrong"]
    assert np.all(np.abs(wrong["z_mean"]) > 20)
    no_theory = compare.compare_moments(_exact_idata(cases.X_TEST, key=1, C=2, D=50))
    assert "theory" not in no_theory and len(no_theory) == 4


def test_wasserstein_1d_matches_scipy(rng):
    a, b = rng.normal(size=300), rng.normal(0.3, 2.0, size=517)
    assert compare.wasserstein_1d(a, b) == pytest.approx(stats.wasserstein_distance(a, b), rel=1e-12)
    assert compare.wasserstein_1d(a, a + 0.7) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="non-empty"):
        compare.wasserstein_1d([], b)


def test_distances_against_null_reference(exact):
    table = compare.distances(exact, num_null=100)
    right = table[table["theory"] == "theory_order0"]
    wrong = table[table["theory"] == "theory_wrong"]
    assert np.all(right["wasserstein"] < 2 * right["null_q95"])
    assert np.all(wrong["wasserstein"] > 5 * wrong["null_q95"]) and np.all(wrong["p_value"] == 0)
    assert np.all(right["null_mean"] > 0) and np.all(right["ess_bulk"] > 1000)


@pytest.fixture(scope="module")
def calibration_case():
    """Exact draws at 40 test points, held-out values drawn independently from each marginal."""
    idata = _exact_idata(X_MANY, key=2, C=2, D=1000)
    d = _posterior(X_MANY)
    compare.add_theory(idata, "theory_order0", d, 7, 2000)
    compare.add_theory(idata, "too_confident", KernelGaussian.from_moments(d.loc, 0.01 * d.input_covariance), 8, 2000)
    z = np.random.default_rng(3).normal(size=(40, 1))
    y = np.asarray(d.mean) + np.sqrt(np.asarray(d.variance) + NV) * z
    return idata, y


def test_pit_and_coverage_of_held_out_data(calibration_case):
    idata, y = calibration_case
    pit = compare.pit_values(idata, y)
    assert set(pit["source"]) == {"nuts", "theory_order0", "too_confident"}
    for source in ("nuts", "theory_order0"):
        assert stats.kstest(pit[pit["source"] == source]["pit"], "uniform").pvalue > 1e-3
    cov = compare.interval_coverage(idata, y, levels=(0.5, 0.9))
    good = cov[cov["source"] != "too_confident"]
    assert np.all(np.abs(good["coverage"] - good["level"]) <= 4 * good["se"] + 1e-12)
    # with noise included the over-confident law still covers, but less than the calibrated one
    bad = cov[cov["source"] == "too_confident"].set_index("level")["coverage"]
    ref = cov[cov["source"] == "theory_order0"].set_index("level")["coverage"]
    assert np.all(bad <= ref)
    with pytest.raises(ValueError, match=r"y_heldout must have shape \(N_test, n_L\) = \(40, 1\)"):
        compare.pit_values(idata, y[:5])
    with pytest.raises(ValueError, match="levels must lie in"):
        compare.interval_coverage(idata, y, levels=(1.0,))


def test_log_predictive_density_gaussian_exact(exact):
    d = _posterior(cases.X_TEST)
    y = cases.heldout_targets()
    joint = compare.log_predictive_density(d, y, noise_var=NV)
    ref = BayesianPosterior(WIDE, cases.X, cases.Y, cases.X_TEST, NV, include_noise=True).log_prob(y)
    assert joint == pytest.approx(float(ref), rel=1e-8)
    point = compare.log_predictive_density(d, y, noise_var=NV, pointwise=True)
    assert point.shape == (4, 1)
    np.testing.assert_allclose(point, stats.norm.logpdf(y, np.asarray(d.mean), np.sqrt(np.asarray(d.variance) + NV)))
    # the NUTS-style estimate (log-mean-exp of the noise likelihood over exact draws) agrees, for
    # held-out values typical of the predictive (far in its tail the estimator is biased low)
    y = np.asarray(d.mean) + np.sqrt(np.asarray(d.variance) + NV) * np.array([[0.3], [-1.2], [0.8], [1.5]])
    nuts_point = compare.log_predictive_density(exact, y, pointwise=True)
    exact_point = compare.log_predictive_density(d, y, noise_var=NV, pointwise=True)
    # standard error of the log of a mean of likelihood weights: sd(w) / (mean(w) √S)
    f = _arviz.get_group(exact, "posterior")["f_test"].values.reshape(-1, 4, 1)
    w = stats.norm.pdf(y, f, np.sqrt(NV))
    se = w.std(0) / w.mean(0) / np.sqrt(w.shape[0])
    assert np.all(np.abs(nuts_point - exact_point) <= 4 * se)
    w_joint = np.prod(w, axis=(1, 2))
    se_joint = w_joint.std() / w_joint.mean() / np.sqrt(w_joint.size)
    nuts_joint = compare.log_predictive_density(exact, y)
    assert abs(nuts_joint - compare.log_predictive_density(d, y, noise_var=NV)) <= 4 * se_joint
    with pytest.raises(ValueError, match="noise_var must be a finite float > 0"):
        compare.log_predictive_density(d, y, noise_var=0.0)
    with pytest.raises(TypeError, match="source must be"):
        compare.log_predictive_density({"f_test": 1}, y)


def test_log_predictive_density_mixture_and_monte_carlo(rng):
    N = 3
    A = rng.normal(size=(N, N))
    G = np.stack([A @ A.T / N + 0.5 * np.eye(N), 2.0 * np.eye(N)])
    loc = rng.normal(size=(N, 1))
    mix = KernelMixture(loc, np.linalg.cholesky(G), np.log(np.array([0.3, 0.7])))
    y = rng.normal(size=(N, 1))
    w = np.array([0.3, 0.7])
    ref_joint = np.log(
        sum(w[k] * stats.multivariate_normal(loc[:, 0], G[k] + NV * np.eye(N)).pdf(y[:, 0]) for k in range(2))
    )
    assert compare.log_predictive_density(mix, y, noise_var=NV) == pytest.approx(ref_joint, rel=1e-10)
    var = np.diagonal(G, axis1=1, axis2=2)
    ref_point = np.log(sum(w[k] * stats.norm.pdf(y, loc, np.sqrt(var[k][:, None] + NV)) for k in range(2)))
    np.testing.assert_allclose(compare.log_predictive_density(mix, y, noise_var=NV, pointwise=True), ref_point)
    # a law without closed-form marginals: Monte Carlo over its draws, within its error
    other = dist.Normal(jnp.asarray(loc), 0.4).to_event(2)
    est = compare.log_predictive_density(other, y, noise_var=NV, pointwise=True, key=3, num_samples=20000)
    w = stats.norm.pdf(y, np.asarray(other.sample(jax.random.key(3), (20000,))), np.sqrt(NV))
    se = w.std(0) / w.mean(0) / np.sqrt(20000)  # the estimator's own standard error (same draws)
    assert np.all(np.abs(est - stats.norm.logpdf(y, loc, np.sqrt(0.16 + NV))) <= 4 * se)
    assert compare.log_predictive_density(other, y) == pytest.approx(float(other.log_prob(y)))
    with pytest.raises(NotImplementedError, match="pass noise_var"):
        compare.log_predictive_density(other, y, pointwise=True)
    with pytest.raises(ValueError, match="event shape"):
        compare.log_predictive_density(mix, y[:2], noise_var=NV)


class _CoupledGaussian(dist.Distribution):
    """A Gaussian over f (N, n_L) whose covariance couples output neurons: (loc, scale_tril (M, M))."""

    support = dist.constraints.independent(dist.constraints.real, 2)

    def __init__(self, loc, scale_tril):
        self.loc, self.scale_tril = jnp.asarray(loc), jnp.asarray(scale_tril)
        super().__init__(batch_shape=(), event_shape=self.loc.shape)

    def sample(self, key, sample_shape=()):
        eps = jax.random.normal(key, (*sample_shape, self.scale_tril.shape[0]))
        return self.loc + (eps @ self.scale_tril.T).reshape((*sample_shape, *self.loc.shape))

    def log_prob(self, value):
        flat = dist.MultivariateNormal(self.loc.ravel(), scale_tril=self.scale_tril)
        return flat.log_prob(value.reshape((*value.shape[:-2], -1)))


def test_gaussians_coupling_output_neurons_are_exact(rng):
    N, nL = 3, 2
    A = rng.normal(size=(N * nL, N * nL))
    S = A @ A.T / 6 + 0.2 * np.eye(N * nL)
    loc = rng.normal(size=(N, nL))
    law = _CoupledGaussian(loc, np.linalg.cholesky(S))
    y = rng.normal(size=(N, nL))
    ref = stats.multivariate_normal(loc.ravel(), S + NV * np.eye(N * nL)).logpdf(y.ravel())
    assert compare.log_predictive_density(law, y, noise_var=NV) == pytest.approx(ref, rel=1e-10)
    sd = np.sqrt(np.diag(S).reshape(N, nL) + NV)
    np.testing.assert_allclose(
        compare.log_predictive_density(law, y, noise_var=NV, pointwise=True), stats.norm.logpdf(y, loc, sd)
    )
    X_test = np.array([[0.1], [0.2], [0.3]])
    f_test = rng.normal(size=(2, 10, N, nL))
    idata = to_inference_data(
        {"f": rng.normal(size=(2, 10, 6, nL)), "f_test": f_test},
        X=cases.X,
        y=np.zeros((6, nL)),
        X_test=X_test,
        noise_var=NV,
        key=jax.random.key(0),
    )
    compare.add_theory(idata, "coupled", law, 0, 100)
    g = _arviz.get_group(idata, "coupled")
    assert g.attrs["density_kind"] == "exact" and g.attrs["moments"] == "analytic"
    np.testing.assert_allclose(g["mean"].values, loc)
    x = g["density_grid"].values
    np.testing.assert_allclose(
        g["density"].values, stats.norm.pdf(x, loc[..., None], np.sqrt(np.diag(S)).reshape(N, nL, 1))
    )


def test_add_theory_mixture_and_kde_densities(rng):
    idata = _exact_idata(cases.X_TEST, key=4, C=2, D=50)
    # a two-kernel mixture, the form of the order-1 (finite-width) laws
    A = rng.normal(size=(4, 4))
    G = np.stack([A @ A.T / 4 + 0.1 * np.eye(4), 0.5 * np.eye(4)])
    w = np.array([0.6, 0.4])
    loc = rng.normal(size=(4, 1))
    compare.add_theory(idata, "theory_mix", KernelMixture(loc, np.linalg.cholesky(G), np.log(w)), 0, 500)
    g = _arviz.get_group(idata, "theory_mix")
    assert g.attrs["density_kind"] == "exact" and g.attrs["order"] == "1"
    x, p = g["density_grid"].values, g["density"].values
    sd = np.sqrt(np.diagonal(G, axis1=1, axis2=2))  # (2, 4)
    ref = sum(w[k] * stats.norm.pdf(x, loc[..., None], sd[k][:, None, None]) for k in range(2))
    np.testing.assert_allclose(p, ref, rtol=1e-10)
    np.testing.assert_allclose(np.trapezoid(p, x, axis=-1), 1.0, atol=1e-3)
    kde_law = dist.Normal(jnp.zeros((4, 1)), 1.0).to_event(2)
    compare.add_theory(idata, "theory_kde", kde_law, 1, 2000)
    g = _arviz.get_group(idata, "theory_kde")
    assert g.attrs["density_kind"] == "kde"
    x, p = g["density_grid"].values, g["density"].values
    assert np.max(np.abs(p - stats.norm.pdf(x))) < 0.05
    # replacing a theory group keeps one copy
    compare.add_theory(idata, "theory_kde", kde_law, 2, 100)
    assert compare.theory_names(idata).count("theory_kde") == 1
    assert _arviz.get_group(idata, "theory_kde")["f_test"].shape == (1, 100, 4, 1)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (("posterior", None, 10), ValueError, "name must be a Python identifier"),
        (("theory x", None, 10), ValueError, "name must be a Python identifier"),
        (("t", "prior_at_X", 10), ValueError, r"event_shape \(N_test, n_L\) = \(4, 1\)"),
        (("t", None, 1), ValueError, "num_samples must be an integer >= 2"),
        (("t", "not_a_dist", 10), TypeError, "distribution must be a numpyro Distribution"),
    ],
)
def test_add_theory_errors(exact, args, error, match):
    name, which, n = args
    d = {None: _posterior(cases.X_TEST), "prior_at_X": NetworkPrior(WIDE, cases.X), "not_a_dist": np.zeros((4, 1))}
    with pytest.raises(error, match=match):
        compare.add_theory(exact, name, d[which], 0, n)


def test_theory_draws_of_y_need_a_noise_variance(rng):
    s = {"f": rng.normal(size=(2, 20, 6, 1)), "f_test": rng.normal(size=(2, 20, 4, 1)), "noise_var": np.ones((2, 20))}
    idata = to_inference_data(s, X=cases.X, y=cases.Y, X_test=cases.X_TEST, noise_var=None, key=jax.random.key(0))
    compare.add_theory(idata, "theory_order0", _posterior(cases.X_TEST), 0, 10)
    y = cases.heldout_targets()
    with pytest.raises(ValueError, match="pass noise_var explicitly"):
        compare.pit_values(idata, y)
    assert len(compare.pit_values(idata, y, noise_var=NV)) == 8
    # the NUTS density uses the posterior draws of the learned noise variance
    assert np.isfinite(compare.log_predictive_density(idata, y))


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_plots_are_written(exact, tmp_path):
    assert compare.plot_ppc(exact, tmp_path / "ppc.png") == str(tmp_path / "ppc.png")
    _assert_png(tmp_path / "ppc.png")
    out = compare.plot_compare_densities(exact, 3, path=tmp_path / "dens.png")
    assert out == str(tmp_path / "dens.png")
    _assert_png(tmp_path / "dens.png")
    fig = compare.plot_compare_densities(exact, 0, theories="theory_order0")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["NUTS", "theory_order0 (exact)"]
    with pytest.raises(ValueError, match="test_point must be in"):
        compare.plot_compare_densities(exact, 4)
    with pytest.raises(ValueError, match="not theory groups"):
        compare.plot_compare_densities(exact, 0, theories="theory_order1")
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # nothing left open in pyplot


# -- slow: real NUTS ------------------------------------------------------------------------------
@pytest.mark.slow
def test_small_nuts_run_compared_with_theory(tmp_path):
    idata = cases.small_run()[0].copy()  # add_theory adds groups in place; the run is shared
    spec = cases.SMALL["spec"]
    compare.add_theory(idata, "theory_order0", BayesianPosterior(spec, cases.X, cases.Y, cases.X_TEST, NV), 0, 2000)
    table = compare.compare_moments(idata)
    assert len(table) == 4
    for col in ("mcse_mean", "mcse_var", "z_mean", "z_var", "ess_bulk"):
        assert np.all(np.isfinite(table[col])) and np.all(table["mcse_mean"] > 0), col
    y = cases.heldout_targets()
    point = compare.log_predictive_density(idata, y, pointwise=True)
    assert point.shape == (4, 1) and np.all(np.isfinite(point))
    assert np.isfinite(compare.log_predictive_density(idata, y))
    assert np.all(np.isfinite(compare.distances(idata, num_null=50)["wasserstein"]))
    assert set(compare.interval_coverage(idata, y)["source"]) == {"nuts", "theory_order0"}
    _assert_png(Path(compare.plot_ppc(idata, tmp_path / "ppc.png")))
    _assert_png(Path(compare.plot_compare_densities(idata, 1, path=tmp_path / "d.png")))


@pytest.mark.slow
def test_wide_nuts_posterior_matches_the_gp_posterior():
    idata = cases.wide_run()
    spec = cases.WIDE["spec"]
    compare.add_theory(idata, "theory_order0", _posterior(cases.X_TEST, spec), 0, 4000)
    # a different prior (C_W = 2) as a control: the comparison must be able to tell them apart
    other = ep.MLPSpec(1, (64,), 1, "tanh", C_b=0.1, C_W=2.0)
    compare.add_theory(idata, "theory_other_prior", _posterior(cases.X_TEST, other), 1, 4000)
    table = compare.compare_moments(idata).set_index("theory")
    right, control = table.loc["theory_order0"], table.loc["theory_other_prior"]
    # within 4 MCSE plus an O(1/n) allowance (L/n of the posterior scale) for finite width
    allowance = spec.depth / spec.hidden[0]
    assert np.all(right["r_hat"] < 1.05) and np.all(right["ess_bulk"] > 200)
    assert np.all(
        np.abs(right["nuts_mean"] - right["theory_mean"])
        <= 4 * right["mcse_mean"] + allowance * np.sqrt(right["theory_var"])
    )
    assert np.all(
        np.abs(right["nuts_var"] - right["theory_var"]) <= 4 * right["mcse_var"] + allowance * right["theory_var"]
    )
    assert np.max(np.abs(control[["z_mean", "z_var"]].to_numpy())) > 10
