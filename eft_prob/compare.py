"""Theory distributions and NUTS posteriors side by side in one InferenceData.

Workflow::

    idata = eft_prob.inference.run_nuts(spec, X, y, X_test, noise_var=s2, ...)
    add_theory(idata, "theory_order0", BayesianPosterior(spec, X, y, X_test, s2, order=0), key, 4000)
    add_theory(idata, "theory_order1", BayesianPosterior(spec, X, y, X_test, s2, order=1), key, 4000)
    compare_moments(idata)          # NUTS mean/variance ± MCSE vs each theory, z-scores
    distances(idata)                # 1-D Wasserstein distance per test point, with a null reference
    interval_coverage(idata, y_heldout); pit_values(idata, y_heldout)
    log_predictive_density(idata, y_heldout); log_predictive_density(dist, y_heldout, noise_var=s2)
    plot_ppc(idata, "ppc.png"); plot_compare_densities(idata, test_point=0, path="dens.png")

A theory group (any name; ``theory_order0`` by convention) holds draws ``f_test`` [chain=1, draw,
test_point, output] from the distribution, its analytic ``mean`` and ``variance`` [test_point,
output], and its marginal density ``density`` on ``density_grid`` [test_point, output, grid]
(exact for Gaussian and Gaussian-mixture laws, a kernel density estimate otherwise).  Its attrs
mark it (``eft_prob_theory=1``) and name the distribution class and order.

Monte Carlo standard errors of the NUTS estimates are ESS based (ArviZ, through
:mod:`eft_prob._arviz`): for the mean, MCSE = sd/√ESS_mean; for the variance, the MCSE of the
mean of the squared deviations (f − f̄)², again from its own ESS (the error of f̄ itself enters
only at second order — the delta method).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import xarray as xr
from jax.scipy.special import logsumexp
from numpyro.distributions import Distribution

from . import _arviz

__all__ = [
    "add_theory",
    "compare_moments",
    "distances",
    "interval_coverage",
    "log_predictive_density",
    "pit_values",
    "plot_compare_densities",
    "plot_ppc",
    "theory_names",
    "wasserstein_1d",
]

_THEORY_MARK = "eft_prob_theory"
_RESERVED = {
    "posterior",
    "posterior_predictive",
    "predictions",
    "log_likelihood",
    "sample_stats",
    "observed_data",
    "constant_data",
    "prior",
    "prior_predictive",
    "warmup_posterior",
}
_GRID = 241


# -- helpers ------------------------------------------------------------------------------------
def _key(key):
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(int(key))
    return key


def _nuts_f_test(idata) -> np.ndarray:
    """Posterior draws of f(X_test), (chain, draw, N_test, n_L)."""
    return _arviz.sample_array(_arviz.get_group(idata, "posterior"), "f_test")


def theory_names(idata) -> list[str]:
    """Names of the theory groups added with :func:`add_theory`."""
    return [g for g in _arviz.group_names(idata) if _arviz.get_group(idata, g).attrs.get(_THEORY_MARK, 0) == 1]


def _theories(idata, theories) -> list[str]:
    names = theory_names(idata)
    if theories is None:
        return names
    theories = [theories] if isinstance(theories, str) else list(theories)
    unknown = [t for t in theories if t not in names]
    if unknown:
        raise ValueError(f"theories {unknown} are not theory groups of this InferenceData; it has {names}.")
    return theories


def _noise_var(idata, noise_var):
    if noise_var is not None:
        return float(noise_var)
    if _arviz.has_group(idata, "constant_data"):
        const = _arviz.get_group(idata, "constant_data")
        if "noise_var" in const:
            return float(const["noise_var"].values)
    raise ValueError(
        "noise_var is needed to turn theory draws of f into draws of y, and the InferenceData has no "
        "fixed noise_var (it was learned); pass noise_var explicitly."
    )


def _check_heldout(idata, y_heldout) -> np.ndarray:
    shape = _nuts_f_test(idata).shape[2:]
    y = np.asarray(y_heldout, dtype=float)
    if y.ndim == 1 and shape[1] == 1:
        y = y[:, None]
    if y.shape != shape:
        raise ValueError(f"y_heldout must have shape (N_test, n_L) = {shape}, the shape of f_test, got {y.shape}.")
    if not np.all(np.isfinite(y)):
        raise ValueError("y_heldout contains NaN or infinite values.")
    return y


def _index_columns(shape) -> dict:
    tp, out = np.indices(shape).reshape(2, -1)
    return {"test_point": tp, "output": out}


def _logmeanexp(a, axis: int):
    return np.asarray(logsumexp(jnp.asarray(a), axis=axis)) - np.log(a.shape[axis])


# -- adding theory ------------------------------------------------------------------------------------
class _MixtureView(NamedTuple):
    """A law over f (N, n_L) that is a finite Gaussian mixture Σ_k w_k N(means_k, cov_k)."""

    log_w: np.ndarray  # (C,)
    means: np.ndarray  # (C, N, n_L)
    cov: np.ndarray  # (C, N, N), shared by the output neurons (Σ_k ⊗ I) if kron, else (C, M, M), M = N·n_L
    kron: bool

    def marginal_var(self) -> np.ndarray:
        """(C, N, n_L): each component's variance of every f_αi."""
        d = np.diagonal(self.cov, axis1=-2, axis2=-1)
        return np.broadcast_to(d[..., None], self.means.shape) if self.kron else d.reshape(self.means.shape)

    def marginal_logpdf(self, x, noise_var: float = 0.0) -> np.ndarray:
        """log density of each f_αi (+ N(0, noise_var)) at x (N, n_L, ...) — same shape as x."""
        extra = (1,) * (x.ndim - 2)
        m = self.means.reshape(self.means.shape + extra)
        v = self.marginal_var().reshape(self.means.shape + extra) + noise_var
        comp = -0.5 * np.log(2 * np.pi * v) - 0.5 * (x[None] - m) ** 2 / v
        return np.asarray(logsumexp(jnp.asarray(comp), axis=0, b=np.exp(self.log_w).reshape((-1, 1, 1) + extra)))

    def joint_logpdf(self, y, noise_var: float) -> float:
        """log density of y (N, n_L) under the mixture with N(0, noise_var I) added."""
        C, N, nL = self.means.shape
        if self.kron:  # independent output neurons given the component: one N×N Gaussian per neuron
            diff = np.moveaxis(y[None] - self.means, -1, 1)[..., None]  # (C, n_L, N, 1)
            S = self.cov[:, None] + noise_var * np.eye(N)
        else:
            diff = (y[None] - self.means).reshape(C, 1, N * nL, 1)
            S = self.cov[:, None] + noise_var * np.eye(N * nL)
        L = np.linalg.cholesky(S)
        w = np.linalg.solve(L, diff)[..., 0]
        logdet = 2 * np.log(np.diagonal(L, axis1=-2, axis2=-1)).sum(-1)
        comp = -0.5 * (np.sum(w * w, -1) + logdet + w.shape[-1] * np.log(2 * np.pi))  # (C, n_L or 1)
        return float(logsumexp(jnp.asarray(self.log_w + comp.sum(-1))))


def _mixture_view(distribution) -> _MixtureView | None:
    """The Gaussian-mixture form of a law over f (N, n_L), read from the parameters eft_prob's
    output laws are built from: ``(loc | locs, scale_trils, logits)`` — mixtures of matrix
    normals (``KernelMixture``, the order-1 prior and posterior) — or ``(loc, scale_tril)`` with an
    N×N factor (``KernelGaussian``) or an (N·n_L)×(N·n_L) one (Gaussians coupling the output
    neurons).  None for any other law (the callers then fall back to Monte Carlo)."""
    N, nL = distribution.event_shape
    M = N * nL

    def get(name, shape):
        value = getattr(distribution, name, None)
        if value is None:
            return None
        value = np.asarray(value)
        ok = value.ndim == len(shape) and all(s is None or s == v for s, v in zip(shape, value.shape, strict=True))
        return value if ok else None

    logits = get("logits", (None,))
    if logits is not None:
        C = logits.shape[0]
        scale_trils = get("scale_trils", (C, N, N))
        locs = get("locs", (C, N, nL))
        loc = get("loc", (N, nL))
        if scale_trils is None or (locs is None and loc is None):
            return None
        means = locs if locs is not None else np.broadcast_to(loc, (C, N, nL))
        log_w = logits - np.asarray(logsumexp(jnp.asarray(logits)))
        return _MixtureView(log_w, means, scale_trils @ np.swapaxes(scale_trils, -1, -2), True)
    loc = get("loc", (N, nL))
    for size, kron in ((N, True), (M, False)):
        scale_tril = get("scale_tril", (size, size))
        if loc is not None and scale_tril is not None:
            return _MixtureView(np.zeros(1), loc[None], (scale_tril @ scale_tril.T)[None], kron)
    return None


def _kde(samples, grid):
    """Gaussian KDE with Silverman's bandwidth, per (test point, output); samples (S, N, n_L)."""
    S = samples.shape[0]
    sd = samples.std(0, ddof=1)
    iqr = np.subtract(*np.percentile(samples, [75, 25], axis=0))
    h = 0.9 * np.minimum(sd, iqr / 1.34) * S ** (-0.2)
    h = np.where(h > 0, h, np.maximum(sd, 1e-12) * S ** (-0.2))
    out = np.empty(grid.shape)
    for a in range(grid.shape[0]):  # one test point at a time: S × n_L × grid floats
        u = (grid[a][None] - samples[:, a, :, None]) / h[a][None, :, None]
        out[a] = np.exp(-0.5 * u**2).sum(0) / (S * h[a][:, None] * np.sqrt(2 * np.pi))
    return out


def add_theory(idata, name: str, distribution: Distribution, key, num_samples: int = 4000):
    """Add a theory distribution over f(X_test) as group ``name``; returns ``idata`` (modified).

    :param name: group name, e.g. ``"theory_order0"``; replaces an existing theory group of
        that name, may not be one of ArviZ's standard groups.
    :param distribution: a NumPyro distribution with event_shape (N_test, n_L) equal to the
        shape of ``f_test`` (e.g. ``BayesianPosterior(spec, X, y, X_test, noise_var, order)``).
    :param key: ``jax.random`` key or int seed for the draws.
    :param num_samples: number of draws stored (they feed distances, PIT and coverage).
    """
    if not isinstance(name, str) or not name.isidentifier() or name in _RESERVED:
        raise ValueError(
            f"name must be a Python identifier other than ArviZ's groups {sorted(_RESERVED)}, got {name!r}."
        )
    if _arviz.has_group(idata, name) and name not in theory_names(idata):
        raise ValueError(f"name {name!r} is an existing non-theory group of this InferenceData.")
    if not isinstance(distribution, Distribution):
        raise TypeError(f"distribution must be a numpyro Distribution, got {type(distribution).__name__}.")
    shape = _nuts_f_test(idata).shape[2:]
    if tuple(distribution.batch_shape) != () or tuple(distribution.event_shape) != shape:
        raise ValueError(
            f"distribution must have batch_shape () and event_shape (N_test, n_L) = {shape} like f_test; got "
            f"batch_shape {tuple(distribution.batch_shape)}, event_shape {tuple(distribution.event_shape)}."
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}.")

    draws = np.asarray(distribution.sample(_key(key), (int(num_samples),)))
    view = _mixture_view(distribution)
    try:
        mean, variance, moments = np.asarray(distribution.mean), np.asarray(distribution.variance), "analytic"
    except (NotImplementedError, AttributeError):
        if view is not None:
            w = np.exp(view.log_w)[:, None, None]
            mean = np.sum(w * view.means, 0)
            variance = np.sum(w * (view.marginal_var() + view.means**2), 0) - mean**2
            moments = "analytic"
        else:
            mean, variance, moments = draws.mean(0), draws.var(0, ddof=1), "monte carlo"
    mean, variance = np.broadcast_to(mean, shape), np.broadcast_to(variance, shape)
    sd = np.sqrt(variance)
    grid = mean[..., None] + 6.0 * sd[..., None] * np.linspace(-1.0, 1.0, _GRID)
    if view is not None:
        density, density_kind = np.exp(view.marginal_logpdf(grid)), "exact"
    else:
        density, density_kind = _kde(draws, grid), "kde"

    d2, d3 = ("test_point", "output"), ("test_point", "output", "grid")
    ds = xr.Dataset(
        {
            "f_test": (("chain", "draw", *d2), draws[None]),
            "mean": (d2, mean),
            "variance": (d2, variance),
            "density_grid": (d3, grid),
            "density": (d3, density),
        },
        coords={
            "chain": [0],
            "draw": np.arange(num_samples),
            "test_point": np.arange(shape[0]),
            "output": np.arange(shape[1]),
        },
        attrs={
            _THEORY_MARK: 1,
            "distribution": type(distribution).__name__,
            "order": str(getattr(distribution, "order", "")),
            "num_samples": int(num_samples),
            "moments": moments,
            "density_kind": density_kind,
        },
    )
    return _arviz.set_group(idata, name, ds)


# -- moments -----------------------------------------------------------------------------------------
def _nuts_moments(idata) -> pd.DataFrame:
    f = _nuts_f_test(idata)
    C, D = f.shape[:2]
    mean = f.mean((0, 1))
    dev2 = (f - mean) ** 2
    ds = xr.Dataset({"f": (("chain", "draw", "tp", "out"), f), "dev2": (("chain", "draw", "tp", "out"), dev2)})
    mcse = _arviz.mcse_mean(ds)
    ess = _arviz.ess(ds[["f"]], "bulk")
    rhat = _arviz.rhat(ds[["f"]])
    n = C * D
    cols = {
        **_index_columns(mean.shape),
        "nuts_mean": mean.ravel(),
        "mcse_mean": np.asarray(mcse["f"].values).ravel(),
        "nuts_var": (dev2.sum((0, 1)) / (n - 1)).ravel(),
        # MCSE of mean((f - f̄)²), rescaled by n/(n-1) like the unbiased variance.
        "mcse_var": np.asarray(mcse["dev2"].values).ravel() * n / (n - 1),
        "ess_bulk": np.asarray(ess["f"].values).ravel(),
        "r_hat": np.asarray(rhat["f"].values).ravel(),
    }
    return pd.DataFrame(cols)


def compare_moments(idata, theories=None) -> pd.DataFrame:
    """NUTS posterior mean and variance of f(X_test) with MCSEs, against each theory.

    One row per (theory, test_point, output): ``nuts_mean, mcse_mean, nuts_var, mcse_var,
    ess_bulk, r_hat, theory_mean, theory_var, z_mean, z_var`` with
    z = (NUTS − theory) / MCSE.  Without theory groups, the NUTS columns only (no ``theory``).
    |z| of a few is Monte Carlo noise; a persistent |z| ≫ 1 that shrinks with width is the 1/n
    difference between the finite network and the infinite-width theory.
    """
    nuts = _nuts_moments(idata)
    names = _theories(idata, theories)
    if not names:
        return nuts
    frames = []
    for name in names:
        g = _arviz.get_group(idata, name)
        t = nuts.copy()
        t.insert(0, "theory", name)
        t["theory_mean"] = np.asarray(g["mean"].transpose("test_point", "output").values).ravel()
        t["theory_var"] = np.asarray(g["variance"].transpose("test_point", "output").values).ravel()
        t["z_mean"] = (t["nuts_mean"] - t["theory_mean"]) / t["mcse_mean"]
        t["z_var"] = (t["nuts_var"] - t["theory_var"]) / t["mcse_var"]
        frames.append(t)
    return pd.concat(frames, ignore_index=True)


# -- distances ----------------------------------------------------------------------------------------
def wasserstein_1d(a, b) -> float:
    """Wasserstein-1 distance ∫|F_a − F_b| between the empirical distributions of samples a, b."""
    a, b = np.sort(np.ravel(a)), np.sort(np.ravel(b))
    if a.size == 0 or b.size == 0:
        raise ValueError("wasserstein_1d needs non-empty samples.")
    x = np.sort(np.concatenate([a, b]))
    Fa = np.searchsorted(a, x[:-1], side="right") / a.size
    Fb = np.searchsorted(b, x[:-1], side="right") / b.size
    return float(np.sum(np.abs(Fa - Fb) * np.diff(x)))


def distances(idata, theories=None, *, num_null: int = 200, seed: int = 0) -> pd.DataFrame:
    """1-D Wasserstein distance between NUTS draws and theory draws of each f(x_test)_i.

    The null reference is what the distance would be if NUTS sampled the theory exactly:
    the distance between ``m`` theory draws and the remaining ones, m = the NUTS bulk ESS of that
    point (autocorrelated NUTS draws carry about ESS independent draws' worth of information),
    over ``num_null`` random splits.  Columns: ``theory, test_point, output, wasserstein,
    null_mean, null_q95, p_value`` (fraction of null distances ≥ the observed one) and
    ``ess_bulk``.  Needs theory groups with at least 2·ESS draws for a faithful null.
    """
    f = _nuts_f_test(idata)
    flat = f.reshape((-1,) + f.shape[2:])
    ess = _nuts_moments(idata)["ess_bulk"].to_numpy().reshape(f.shape[2:])
    rng = np.random.default_rng(seed)
    frames = []
    for name in _theories(idata, theories):
        draws = _arviz.sample_array(_arviz.get_group(idata, name), "f_test")
        draws = draws.reshape((-1,) + draws.shape[2:])
        S = draws.shape[0]
        rows = []
        for tp, out in np.ndindex(f.shape[2:]):
            t = draws[:, tp, out]
            obs = wasserstein_1d(flat[:, tp, out], t)
            m = int(np.clip(round(ess[tp, out]), 2, S // 2))
            null = np.empty(num_null)
            for r in range(num_null):
                perm = rng.permutation(S)
                null[r] = wasserstein_1d(t[perm[:m]], t[perm[m:]])
            rows.append((tp, out, obs, null.mean(), np.quantile(null, 0.95), float(np.mean(null >= obs)), ess[tp, out]))
        frame = pd.DataFrame(
            rows, columns=["test_point", "output", "wasserstein", "null_mean", "null_q95", "p_value", "ess_bulk"]
        )
        frame.insert(0, "theory", name)
        frames.append(frame)
    if not frames:
        raise ValueError("the InferenceData has no theory groups: call add_theory first.")
    return pd.concat(frames, ignore_index=True)


# -- calibration on held-out data ------------------------------------------------------------------
def _predictive_draws(idata, theories, noise_var, seed) -> dict[str, np.ndarray]:
    """Draws of y(X_test) = f(X_test) + noise, (S, N_test, n_L), for NUTS and each theory."""
    pp = _arviz.sample_array(_arviz.get_group(idata, "posterior_predictive"), "y_test")
    out = {"nuts": pp.reshape((-1,) + pp.shape[2:])}
    names = _theories(idata, theories)
    if names:
        sd = np.sqrt(_noise_var(idata, noise_var))
        rng = np.random.default_rng(seed)
        for name in names:
            f = _arviz.sample_array(_arviz.get_group(idata, name), "f_test")
            f = f.reshape((-1,) + f.shape[2:])
            out[name] = f + sd * rng.standard_normal(f.shape)
    return out


def pit_values(idata, y_heldout, theories=None, *, noise_var=None, seed: int = 0) -> pd.DataFrame:
    """Probability integral transform P(y_pred ≤ y_heldout) per test point and output.

    For a calibrated predictive the PIT values of held-out data are uniform on [0, 1].  Sources:
    ``"nuts"`` (posterior predictive ``y_test``) and every theory (its draws plus N(0, noise_var)).
    """
    y = _check_heldout(idata, y_heldout)
    frames = []
    for source, draws in _predictive_draws(idata, theories, noise_var, seed).items():
        pit = np.mean(draws <= y, axis=0)
        frames.append(pd.DataFrame({"source": source, **_index_columns(y.shape), "pit": pit.ravel()}))
    return pd.concat(frames, ignore_index=True)


def interval_coverage(
    idata, y_heldout, levels=(0.5, 0.8, 0.95), theories=None, *, noise_var=None, seed: int = 0
) -> pd.DataFrame:
    """Fraction of held-out values inside the central predictive intervals of each level.

    Columns: ``source, level, coverage, se, n`` with se = √(level(1 − level)/n), the binomial
    standard error of a calibrated predictive over n independent held-out values.
    """
    y = _check_heldout(idata, y_heldout)
    levels = np.atleast_1d(np.asarray(levels, float))
    if np.any((levels <= 0) | (levels >= 1)):
        raise ValueError(f"levels must lie in (0, 1), got {levels}.")
    rows = []
    for source, draws in _predictive_draws(idata, theories, noise_var, seed).items():
        for lev in levels:
            lo, hi = np.quantile(draws, [(1 - lev) / 2, (1 + lev) / 2], axis=0)
            inside = (y >= lo) & (y <= hi)
            rows.append((source, float(lev), float(inside.mean()), float(np.sqrt(lev * (1 - lev) / y.size)), y.size))
    return pd.DataFrame(rows, columns=["source", "level", "coverage", "se", "n"])


# -- log predictive density ---------------------------------------------------------------------------
def _gaussian_loglik(y, f, noise_var):
    return -0.5 * np.log(2 * np.pi * noise_var) - 0.5 * (y - f) ** 2 / noise_var


def log_predictive_density(
    source, y_heldout, *, noise_var=None, pointwise: bool = False, key=0, num_samples: int = 4000
):
    """log p(y_heldout) under a theory distribution or the NUTS posterior predictive.

    :param source: a distribution over f(X_test) (event (N_test, n_L)), or the InferenceData of
        :func:`eft_prob.inference.run_nuts`.
    :param y_heldout: held-out targets at X_test, (N_test, n_L).
    :param noise_var: for a distribution: the observation noise added to f (None: ``source`` is
        already the law of y).  For InferenceData: overrides the stored noise (default: the fixed
        ``noise_var`` of constant_data, or the posterior draws of a learned one).
    :param pointwise: False → the joint log density (a float); True → the marginal log density of
        every held-out value, (N_test, n_L) (sum it for the "elpd" of independent points).

    NUTS: log (1/S) Σ_s Π N(y; f_s, σ_s²), a log-mean-exp over draws of the Gaussian likelihood.
    Distributions: exact for eft_prob's Gaussian and Gaussian-mixture laws (``KernelGaussian``,
    ``KernelMixture`` and the order-1 posteriors built like them); otherwise the same Monte Carlo
    estimate from ``num_samples`` draws (``key``), which needs ``noise_var``.
    """
    if isinstance(source, Distribution):
        return _lpd_distribution(source, y_heldout, noise_var, pointwise, key, num_samples)
    if not _arviz.is_inference_data(source):
        raise TypeError(f"source must be a numpyro Distribution or InferenceData, got {type(source).__name__}.")
    y = _check_heldout(source, y_heldout)
    f = _nuts_f_test(source)
    f = f.reshape((-1,) + f.shape[2:])
    post = _arviz.get_group(source, "posterior")
    if noise_var is None and "noise_var" in post:
        nv = _arviz.sample_array(post, "noise_var").reshape(-1)[:, None, None]
    else:
        nv = _noise_var(source, noise_var)
    ll = _gaussian_loglik(y, f, nv)
    return _logmeanexp(ll, 0) if pointwise else float(_logmeanexp(ll.sum((1, 2)), 0))


def _lpd_distribution(distribution, y_heldout, noise_var, pointwise, key, num_samples):
    shape = tuple(distribution.event_shape)
    if tuple(distribution.batch_shape) != () or len(shape) != 2:
        raise ValueError(
            f"distribution must have batch_shape () and event_shape (N_test, n_L), got "
            f"{tuple(distribution.batch_shape)} and {shape}."
        )
    y = np.asarray(y_heldout, dtype=float)
    if y.ndim == 1 and shape[1] == 1:
        y = y[:, None]
    if y.shape != shape:
        raise ValueError(f"y_heldout must have the distribution's event shape {shape}, got {y.shape}.")
    if not np.all(np.isfinite(y)):
        raise ValueError("y_heldout contains NaN or infinite values.")
    if noise_var is not None and not (np.isfinite(noise_var) and noise_var > 0):
        raise ValueError(f"noise_var must be a finite float > 0 (or None), got {noise_var!r}.")
    if noise_var is None and not pointwise:
        return float(distribution.log_prob(jnp.asarray(y, dtype=jnp.result_type(float))))
    view = _mixture_view(distribution)
    if view is not None:
        nv = 0.0 if noise_var is None else float(noise_var)
        return view.marginal_logpdf(y, nv) if pointwise else view.joint_logpdf(y, nv)
    if noise_var is None:
        raise NotImplementedError(
            f"the pointwise density of {type(distribution).__name__} is not available in closed form; pass "
            "noise_var so it can be estimated by Monte Carlo over its draws."
        )
    f = np.asarray(distribution.sample(_key(key), (int(num_samples),)))
    ll = _gaussian_loglik(y, f, float(noise_var))
    return _logmeanexp(ll, 0) if pointwise else float(_logmeanexp(ll.sum((1, 2)), 0))


# -- plots --------------------------------------------------------------------------------------------
def plot_ppc(idata, path, *, var_names=("y",), num_samples: int = 50, seed: int = 0) -> str:
    """Posterior predictive check (replicated vs observed training targets) as a PNG at ``path``."""
    return _arviz.plot_ppc(idata, path, var_names=var_names, num_samples=num_samples, seed=seed)


def plot_compare_densities(idata, test_point: int, *, output: int = 0, path=None, theories=None, bins: int = 40):
    """Histogram of the NUTS draws of f(x_test)_output against each theory's marginal density.

    Returns the matplotlib ``Figure`` (Agg canvas, no pyplot state), or ``path`` after writing
    a PNG there when ``path`` is given.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    f = _nuts_f_test(idata)
    N, nL = f.shape[2:]
    if not (0 <= int(test_point) < N) or not (0 <= int(output) < nL):
        raise ValueError(f"test_point must be in [0, {N}) and output in [0, {nL}); got {test_point}, {output}.")
    fig = Figure(figsize=(6.0, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.hist(f[:, :, test_point, output].ravel(), bins=bins, density=True, alpha=0.4, color="C0", label="NUTS")
    for i, name in enumerate(_theories(idata, theories)):
        g = _arviz.get_group(idata, name)
        x = g["density_grid"].sel(test_point=test_point, output=output).values
        p = g["density"].sel(test_point=test_point, output=output).values
        ax.plot(x, p, color=f"C{i + 1}", lw=2, label=f"{name} ({g.attrs.get('density_kind', '')})")
    ax.set_xlabel(f"f(x_test[{test_point}])_{output}")
    ax.set_ylabel("density")
    ax.legend(frameon=False)
    fig.tight_layout()
    if path is None:
        return fig
    path = os.fspath(path)
    fig.savefig(path, dpi=100)
    return path
