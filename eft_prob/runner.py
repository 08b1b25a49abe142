"""The stages of ``eft-prob run`` beyond the spec: theory at order 0 and 1, ensembles, NUTS, the
comparison rows, checkpoints for ``--resume`` and the output files (netCDF, plots).

Every stage returns ``xarray.Dataset`` groups; the same groups go into one InferenceData file
(``results.nc``) at the end.  Group names (``_nN`` appended per width when ``[run] widths`` sweeps):

* ``prior_ensemble``, ``trained_ensemble``: ``f_test`` [chain=1, draw, test_point, output] of real
  networks at initialization and after gradient descent;
* ``prior_theory_order0|1``, ``trained_theory_order0|1``, ``bayes_theory_order0|1``: theory groups of
  :func:`eft_prob.compare.add_theory` (draws, mean, variance, marginal densities); prior groups also
  hold ``fourth_cumulant`` [test_point, output];
* ``posterior``, ``posterior_predictive``, ``log_likelihood``, ``sample_stats``, ``observed_data``,
  ``constant_data``: NUTS (:func:`eft_prob.inference.run_nuts`).

This module imports ArviZ, xarray and matplotlib; :mod:`eft_prob.cli` loads it only when needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import warnings

import jax
import numpy as np
import xarray as xr

from . import _arviz, compare, ensemble
from ._io import atomic_write, publish
from .distributions import BayesianPosterior, CoupledGaussian, NetworkPrior, TrainedNetwork
from .inference import run_nuts

CHECKPOINT_DIR = ".eft_prob_checkpoints"
_ENGINE = "h5netcdf"
_Z_FLAG = 3.0
_SE_FLOOR = 1e-8  # z-scores use max(s.e., 1e-8 × the quantity's scale)
_F_DIMS = ("chain", "draw", "test_point", "output")


class StageError(Exception):
    """A stage cannot run as the spec asks (turned into the CLI's SpecError)."""


# ------------------------------------------------------------------------------------------------
# Checkpoints.


def fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _atomic(path: str, write) -> None:
    """Run ``write(tmp)`` on a temporary file in path's directory, then rename it to ``path``."""
    atomic_write(path, write)


def write_groups(path: str, groups: dict[str, xr.Dataset], attrs: dict) -> None:
    """Groups as one netCDF file (h5netcdf), written atomically."""
    root = xr.Dataset(attrs={k: (json.dumps(v) if isinstance(v, (dict, list, bool)) else v) for k, v in attrs.items()})
    tree = xr.DataTree.from_dict({"/": root, **groups})
    _atomic(path, lambda tmp: tree.to_netcdf(tmp, engine=_ENGINE))


def read_groups(path: str) -> tuple[dict[str, xr.Dataset], dict]:
    with xr.open_datatree(path, engine=_ENGINE) as tree:
        groups = {name: node.to_dataset().load() for name, node in tree.children.items()}
        attrs = dict(tree.attrs)
    return groups, attrs


class Checkpoints:
    """Finished stages under ``DIR/.eft_prob_checkpoints``, each tagged with the run's fingerprint.

    ``resume=False`` starts afresh (stale checkpoints of an earlier run are removed); ``resume=True``
    loads the stages whose fingerprint matches and refuses a directory holding another spec's run.
    """

    def __init__(self, out_dir: str, fp: str, described: dict, resume: bool):
        self.path = os.path.join(out_dir, CHECKPOINT_DIR)
        self.fp, self.resume = fp, resume
        manifest = os.path.join(self.path, "manifest.json")
        if resume and os.path.exists(manifest):
            try:
                with open(manifest, encoding="utf-8") as f:
                    old = json.load(f)
            except (OSError, ValueError):
                old = {}
            if old.get("fingerprint") != fp:
                raise StageError(
                    f"--resume: {out_dir} holds an unfinished or finished run of a different spec "
                    f"({_describe_change(old.get('run', {}), described)}). Fix: run without --resume to start "
                    "over there, or choose another --out."
                )
        elif os.path.exists(self.path) and not resume:
            shutil.rmtree(self.path)
        self.created = not os.path.exists(self.path)
        os.makedirs(self.path, exist_ok=True)
        text = json.dumps({"fingerprint": fp, "run": described}, indent=1, sort_keys=True, default=str)

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)

        _atomic(manifest, write)

    def file(self, stage: str) -> str:
        return os.path.join(self.path, stage + ".nc")

    def load(self, stage: str):
        path = self.file(stage)
        if not (self.resume and os.path.exists(path)):
            return None
        try:
            groups, attrs = read_groups(path)
        except (OSError, ValueError):
            return None  # unreadable (e.g. a disk error): recompute the stage
        if attrs.get("fingerprint") != self.fp:
            return None
        return groups, json.loads(attrs.get("info", "{}"))

    def save(self, stage: str, groups: dict, info: dict) -> None:
        write_groups(self.file(stage), groups, {"fingerprint": self.fp, "info": json.dumps(info)})

    def train_dir(self, stage: str) -> str:
        return os.path.join(self.path, stage + ".chunks")

    def partial_file(self, stage: str) -> str:
        """Where a stage that checkpoints its own progress (one .npz file) keeps it."""
        return os.path.join(self.path, stage + ".partial.npz")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _describe_change(old: dict, new: dict) -> str:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    diffs.append(f"[{key}] {k}: {json.dumps(a.get(k))} then, {json.dumps(b.get(k))} now")
        elif a != b:
            diffs.append(f"{key}: {json.dumps(a, default=str)[:60]} then, {json.dumps(b, default=str)[:60]} now")
    if not diffs:
        return "its checkpoints are of another eft_prob version"
    return "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")


# ------------------------------------------------------------------------------------------------
# Stage helpers.


def _np(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def f_group(f: np.ndarray, attrs: dict | None = None, **extra) -> xr.Dataset:
    """(M, N, n_L) draws as a sample group [chain=1, draw=M, test_point, output]."""
    M, N, nL = f.shape
    data = {"f_test": (_F_DIMS, f[None])}
    for name, (dims, value) in extra.items():
        data[name] = (dims, value)
    return xr.Dataset(
        data,
        coords={"chain": [0], "draw": np.arange(M), "test_point": np.arange(N), "output": np.arange(nL)},
        attrs=attrs or {},
    )


def _theory_group(distribution, shape, key, num_samples: int) -> xr.Dataset:
    """compare.add_theory's group for ``distribution`` (draws, moments, marginal densities)."""
    holder = _arviz.make_inference_data({"posterior": f_group(np.zeros((2, *shape)))})
    compare.add_theory(holder, "theory", distribution, key, num_samples)
    return _arviz.get_group(holder, "theory")


def prior_theory(spec, X_test, key, num_samples: int) -> dict[str, xr.Dataset]:
    """The prior of f(x) at every test input: order 0 (N(0, K)) and order 1 (the O(1/n) law).

    Order 1 is built one test input at a time: the comparison is per input (variance, fourth
    cumulant, marginal density), and the one-input law carries the O(1/n) moments exactly even where
    many nearly collinear inputs leave the joint mixture short of them.  Draws of the order-1 group
    are therefore independent across test points (its attrs say ``marginal = 1``).
    """
    N, nL = X_test.shape[0], spec.output_dim
    p0 = NetworkPrior(spec, X_test, order=0)
    g0 = _theory_group(p0, (N, nL), jax.random.fold_in(key, 0), num_samples)
    g0["fourth_cumulant"] = (("test_point", "output"), np.zeros((N, nL)))
    parts, k4 = [], np.zeros((N, nL))
    for a in range(N):
        p1 = NetworkPrior(spec, X_test[a : a + 1], order=1)
        g = _theory_group(p1, (1, nL), jax.random.fold_in(key, a + 1), num_samples)
        parts.append(g.assign_coords(test_point=[a]))
        c4 = _np(p1.fourth_cumulant())
        k4[a] = [c4[i, i, i, i] for i in range(nL)]
    g1 = xr.concat(parts, dim="test_point", combine_attrs="override")
    g1["fourth_cumulant"] = (("test_point", "output"), k4)
    g1.attrs.update(marginal=1, distribution="FiniteWidthPrior (one test input at a time)")
    return {"order0": g0, "order1": g1}


def trained_theory(spec, X, y, X_test, lr, steps, key, num_samples: int, *, checkpoint=None, progress=False):
    """GD-trained outputs after ``steps`` steps: order 0 (frozen NTK) and order 1 (O(1/n)).

    Order 1 is the joint O(1/n) Gaussian over all test inputs up to 32 inputs in all; above that,
    whose joint statistics cost (N_A + N_B)⁴, it is built one test input at a time from
    :func:`eft_prob.theory.nlo_trained_marginals` (cost linear in N_B; ``checkpoint``, an ``.npz``
    path, makes it resumable, ``progress`` prints a line per batch): draws are then independent
    across test inputs and the group's attrs say ``marginal = 1``, as for the prior's order 1.
    The comparisons use only each test input's moments, which both forms give exactly.

    Returns (groups, reasons): a reason string replaces a group that cannot be computed (order 1
    needs a smooth activation).
    """
    from .theory import nlo_trained_moments
    from .theory.training import _DENSE_TRAINED_MAX

    shape = (X_test.shape[0], spec.output_dim)
    groups, reasons = {}, {}
    groups["order0"] = _theory_group(
        TrainedNetwork(spec, X, y, X_test, lr, steps), shape, jax.random.fold_in(key, 0), num_samples
    )
    try:
        if X.shape[0] + X_test.shape[0] > _DENSE_TRAINED_MAX:
            g = _trained_marginal_group(spec, X, y, X_test, lr, steps, checkpoint, progress)
            groups["order1"] = _theory_group(g, shape, jax.random.fold_in(key, 1), num_samples)
            groups["order1"].attrs.update(
                marginal=1, distribution="O(1/n) trained Gaussian, one test input at a time (nlo_trained_marginals)"
            )
            return groups, reasons
        try:
            d1 = TrainedNetwork(spec, X, y, X_test, lr, steps, order=1)
        except NotImplementedError:  # TrainedNetwork(order=1) not in this version: the same moments
            m = nlo_trained_moments(spec, X, y, X_test, lr, steps)
            d1 = CoupledGaussian(_np(m.mean), _psd_cholesky(_np(m.cov)))
        groups["order1"] = _theory_group(d1, shape, jax.random.fold_in(key, 1), num_samples)
    except (ValueError, NotImplementedError) as e:
        reasons["order1"] = _one_line(e)
    return groups, reasons


def _psd_cholesky(cov: np.ndarray) -> np.ndarray:
    """Cholesky factor of the truncated O(1/n) covariance, its eigenvalues clipped at 1e-12·max."""
    cov = (cov + cov.T) / 2
    w, U = np.linalg.eigh(cov)
    scale = max(float(np.max(np.abs(w))), 1e-300)
    return np.linalg.cholesky((U * np.maximum(w, 1e-12 * scale)) @ U.T)


def _trained_marginal_group(spec, X, y, X_test, lr, steps, checkpoint, progress) -> CoupledGaussian:
    """The O(1/n) trained Gaussian of every test input, independent across them (block-diagonal)."""
    from .theory import nlo_trained_marginals

    if jax.process_count() > 1:  # eft-prob run across processes: each takes a block of the batches
        from .distributed import trained_marginals

        folder = None if checkpoint is None else os.path.splitext(os.fspath(checkpoint))[0] + ".processes"
        m = trained_marginals(spec, X, y, X_test, lr, steps, progress=progress, checkpoint=folder).at()
    else:
        m = nlo_trained_marginals(spec, X, y, X_test, lr, steps, progress=progress, checkpoint=checkpoint).at()
    blocks = [_psd_cholesky(c) for c in _np(m.cov)]
    nB, nL = len(blocks), spec.output_dim
    L = np.zeros((nB * nL, nB * nL))
    for b, c in enumerate(blocks):
        L[b * nL : (b + 1) * nL, b * nL : (b + 1) * nL] = c
    return CoupledGaussian(_np(m.mean), L)


def bayes_theory(spec, X, y, X_test, noise_var, key, num_samples: int, y_test=None):
    """The Bayesian posterior of f(X_test): order 0 (GP with K) and order 1 (O(1/n)).

    Returns (groups, reasons, lpd): lpd[order] is the held-out log predictive density log p(y_test)
    of compare.log_predictive_density (exact for these Gaussian and mixture laws).
    """
    shape = (X_test.shape[0], spec.output_dim)
    groups, reasons, lpd = {}, {}, {}
    for order in (0, 1):
        try:
            d = BayesianPosterior(spec, X, y, X_test, noise_var, order=order)
            groups[f"order{order}"] = _theory_group(d, shape, jax.random.fold_in(key, order), num_samples)
        except (ValueError, NotImplementedError) as e:
            if order == 0:
                raise
            reasons[f"order{order}"] = _one_line(e)
            continue
        if y_test is not None:
            lpd[f"order{order}"] = float(compare.log_predictive_density(d, y_test, noise_var=noise_var))
    return groups, reasons, lpd


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + " ".join(str(e).split())


def prior_ensemble(spec, X_test, M, seed, chunk_size) -> xr.Dataset:
    if jax.process_count() > 1:  # eft-prob run across processes: each draws its block, then gathered
        from .distributed import _prior_outputs

        f = _np(_prior_outputs(spec, X_test, M, jax.random.key(seed), chunk_size)[1])
    else:
        f = _np(ensemble.prior_outputs(spec, X_test, M, jax.random.key(seed), chunk_size=chunk_size))
    return f_group(f, {"n_networks": M, "seed": seed})


def trained_ensemble(spec, data, M, lr, steps, seed, chunk_size, checkpoint, progress):
    if jax.process_count() > 1:  # each process trains its block (checkpoint: process_<i> inside), then gathered
        from .distributed import _train as train
    else:
        train = ensemble.train
    res = train(
        spec,
        data.X,
        data.y,
        data.X_test,
        M,
        lr,
        steps,
        jax.random.key(seed),
        dtype="float64",
        chunk_size=chunk_size,
        batch_size=None,
        checkpoint=checkpoint,
        progress=progress,
    )
    test_final, train_final = _np(res.test_final), _np(res.train_final)
    # diverged networks are stopped at their last finite state, so finite outputs alone do not mean converged
    ok = ~np.asarray(res.diverged) & np.all(np.isfinite(test_final), axis=(1, 2))
    resid = np.max(np.abs(train_final[ok] - data.y), axis=(1, 2)) if ok.any() else np.zeros(0)
    return f_group(
        test_final[ok],
        {"n_networks": M, "seed": seed, "steps": steps, "learning_rate": lr, "diverged": int((~ok).sum())},
        train_residual=(("draw",), resid),
    )


def nuts(spec, data, noise_var, n, progress) -> dict[str, xr.Dataset]:
    sampler = run_nuts
    if jax.process_count() > 1:  # the chains split across processes and gathered
        from .distributed import run_nuts as sampler
    idata = sampler(
        spec,
        data.X,
        data.y,
        data.X_test,
        noise_var=noise_var,
        num_chains=n["num_chains"],
        num_warmup=n["num_warmup"],
        num_samples=n["num_samples"],
        seed=n["seed"],
        target_accept=n["target_accept"],
        progress=progress,
    )
    groups = {g: _arviz.get_group(idata, g) for g in _arviz.group_names(idata)}
    attrs = {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in _arviz.get_attrs(idata).items()}
    groups["posterior"].attrs.update(attrs)
    return groups


NUTS_GROUPS = (
    "posterior",
    "posterior_predictive",
    "log_likelihood",
    "sample_stats",
    "observed_data",
    "constant_data",
)


def as_idata(groups: dict[str, xr.Dataset], attrs: dict | None = None):
    return _arviz.make_inference_data(groups, attrs)


def write_idata(path: str, groups: dict[str, xr.Dataset], attrs: dict) -> None:
    """All groups as one InferenceData netCDF file (h5netcdf engine) at ``path`` (not atomic itself)."""
    as_idata(groups, attrs).to_netcdf(path, engine=_ENGINE)


def read_idata(path: str):
    """results.nc back as InferenceData (arviz 0.23) or DataTree (arviz 1.x)."""
    if _arviz.AZ1:
        with xr.open_datatree(path, engine=_ENGINE) as tree:
            return tree.load()
    return _arviz.az.from_netcdf(path, engine=_ENGINE)


# ------------------------------------------------------------------------------------------------
# Statistics.


def mean_se(s):
    """Sample mean over axis 0 and its standard error."""
    return s.mean(0), s.std(0, ddof=1) / math.sqrt(s.shape[0])


def var_se(s):
    """Sample variance over axis 0 and its standard error sqrt((m4 − s⁴)/M)."""
    M = s.shape[0]
    c = s - s.mean(0)
    var = (c**2).sum(0) / (M - 1)
    m4 = (c**4).mean(0)
    return var, np.sqrt(np.maximum(m4 - var**2, 0.0) / M)


def k4_se(s):
    """Fourth cumulant κ₄ = m₄ − 3m₂² over axis 0 and its delta-method standard error.

    The influence function of κ₄ is (x−μ)⁴ − m₄ − 6m₂((x−μ)² − m₂) − 4m₃(x−μ); its standard deviation
    over √M is the standard error (exact to O(1/M)).
    """
    M = s.shape[0]
    c = s - s.mean(0)
    m2, m3, m4 = (c**2).mean(0), (c**3).mean(0), (c**4).mean(0)
    k4 = m4 - 3 * m2**2
    infl = c**4 - m4 - 6 * m2 * (c**2 - m2) - 4 * m3 * c
    return k4, infl.std(0, ddof=1) / math.sqrt(M)


def _finite(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def rows_for(comparison, width, data, quantity, est, se, th0, th1, scale, note1=None) -> list[dict]:
    """One row per (test point, output): estimate ± s.e. against the theory at order 0 and 1."""
    rows = []
    N, nL = est.shape
    for a in range(N):
        for i in range(nL):
            sc = float(scale[a, i])
            se_z = max(float(se[a, i]), _SE_FLOOR * sc)
            row = {
                "comparison": comparison,
                "width": width,
                "quantity": quantity,
                "test_point": a,
                "x": data.x_label(a),
                "output": i,
                "estimate": float(est[a, i]),
                "stderr": float(se[a, i]),
                "scale": sc,
            }
            for k, th in ((0, th0), (1, th1)):
                if th is None:
                    row[f"theory_order{k}"] = row[f"z_order{k}"] = row[f"dev_order{k}"] = None
                    continue
                dev = float(est[a, i] - th[a, i])
                row[f"theory_order{k}"] = float(th[a, i])
                row[f"z_order{k}"] = dev / se_z if se_z > 0 else float("nan")
                row[f"dev_order{k}"] = dev / sc if sc > 0 else float("nan")
            row["order1_note"] = note1
            rows.append(row)
    return rows


def compare_ensembles(data, width, prior_var, groups, reasons) -> list[dict]:
    """Rows for the initialization and training comparisons of one width (theory groups by name)."""
    rows = []
    K = prior_var
    if "prior_ensemble" in groups:
        f = _arviz.sample_array(groups["prior_ensemble"], "f_test")[0]
        t0, t1 = groups["prior_theory_order0"], groups.get("prior_theory_order1")
        get = lambda g, v: None if g is None else _np(g[v].transpose("test_point", "output").values)
        note = reasons.get("prior_theory_order1")
        for quantity, (est, se), var, scale in (
            ("mean", mean_se(f), "mean", np.sqrt(K)),
            ("variance", var_se(f), "variance", K),
            ("fourth cumulant", k4_se(f), "fourth_cumulant", K**2),
        ):
            rows += rows_for("initialization", width, data, quantity, est, se, get(t0, var), get(t1, var), scale, note)
    if "trained_ensemble" in groups:
        f = _arviz.sample_array(groups["trained_ensemble"], "f_test")[0]
        t0, t1 = groups["trained_theory_order0"], groups.get("trained_theory_order1")
        get = lambda g, v: None if g is None else _np(g[v].transpose("test_point", "output").values)
        note = reasons.get("trained_theory_order1")
        if f.shape[0] >= 2:
            for quantity, (est, se), var, scale in (
                ("mean", mean_se(f), "mean", np.sqrt(K)),
                ("variance", var_se(f), "variance", K),
            ):
                rows += rows_for("training", width, data, quantity, est, se, get(t0, var), get(t1, var), scale, note)
    return rows


def compare_nuts(data, width, prior_var, idata, names, reasons) -> list[dict]:
    """Rows for the Bayesian comparison: NUTS mean and variance (ESS-based MCSE) vs each order."""
    table = compare.compare_moments(idata, [n for n in names if n is not None])
    first = table[table["theory"] == names[0]]
    shape = prior_var.shape
    col = lambda df, c: df[c].to_numpy().reshape(shape)
    second = table[table["theory"] == names[1]] if names[1] is not None else None
    note = reasons.get("bayes_theory_order1")
    rows = []
    for quantity, est, se, th, scale in (
        ("mean", "nuts_mean", "mcse_mean", "theory_mean", np.sqrt(prior_var)),
        ("variance", "nuts_var", "mcse_var", "theory_var", prior_var),
    ):
        rows += rows_for(
            "bayes",
            width,
            data,
            quantity,
            col(first, est),
            col(first, se),
            col(first, th),
            None if second is None else col(second, th),
            scale,
            note,
        )
    return rows


def verdict(rows: list[dict], aspect_ratio: float) -> str:
    parts = []
    for k in (0, 1):
        z = np.array([abs(r[f"z_order{k}"]) for r in rows if r[f"z_order{k}"] is not None], dtype=float)
        if z.size == 0:
            continue
        bad = int(np.sum(~(z < _Z_FLAG)))
        parts.append(
            f"order {k}: {bad} of {z.size} comparisons deviate by more than {_Z_FLAG:g} s.e. "
            f"(max |z| = {np.nanmax(z):.3g})"
        )
    both = [r for r in rows if r["dev_order0"] is not None and r["dev_order1"] is not None]
    if both:
        d0 = float(np.sqrt(np.nanmean([r["dev_order0"] ** 2 for r in both])))
        d1 = float(np.sqrt(np.nanmean([r["dev_order1"] ** 2 for r in both])))
        parts.append(
            f"rms deviation on the prior's scale {d0:.2g} at order 0 and {d1:.2g} at order 1 "
            f"(the 1/n corrections are O(L/n) = {aspect_ratio:.2g}; Monte Carlo noise sets the floor)"
        )
    return "verdict: " + "; ".join(parts) + "." if parts else "verdict: nothing to compare."


def table(rows: list[dict], markdown: bool = False) -> str:
    multi_out = any(r["output"] for r in rows)
    multi_w = len({r["width"] for r in rows}) > 1
    head = (
        ["comparison"]
        + (["n"] if multi_w else [])
        + ["quantity", "x"]
        + (["out"] if multi_out else [])
        + ["order 0", "order 1", "estimate ± s.e.", "z₀", "z₁"]
    )
    body = []
    for r in rows:

        def z(k, r=r):
            v = r[f"z_order{k}"]
            return "n/a" if v is None else f"{v:+.2f}" + (" *" if not abs(v) < _Z_FLAG else "")

        body.append(
            [r["comparison"]]
            + ([str(r["width"])] if multi_w else [])
            + [r["quantity"], f"{r['x']:.4g}"]
            + ([str(r["output"])] if multi_out else [])
            + [
                f"{r['theory_order0']:.5g}",
                "n/a" if r["theory_order1"] is None else f"{r['theory_order1']:.5g}",
                f"{r['estimate']:.5g} ± {r['stderr']:.2g}",
                z(0),
                z(1),
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(c.replace("*", "\\*") for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    left = {0, 2} if multi_w else {0, 1}
    fmt = lambda row: "  ".join(
        c.ljust(w) if j in left else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True))
    )
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(row) for row in body])


LEGEND = (
    "order 0: the infinite-width theory; order 1: with the O(1/n) corrections (n/a: not available, see "
    "notes). z_k = (estimate − order k)/s.e. (s.e. floored at 1e-8 of the scale), * marks |z| >= 3. "
    "Standard errors: s/√M for a mean, √((m4 − s⁴)/M) for a variance, the delta method for the fourth "
    "cumulant κ₄ = m4 − 3m2² (ensembles of M independent networks); ESS-based MCSEs for NUTS."
)


# ------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API on an Agg canvas: no global pyplot state).


def _figure(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _test_points(N: int, most: int = 4) -> list[int]:
    return sorted({round(j) for j in np.linspace(0, N - 1, min(N, most))})


def plot_densities(path, data, panels) -> None:
    """One row per comparison: histogram of the samples at a few test points against the theory's
    marginal densities at order 0 and 1.  ``panels``: (title, samples group, {label: theory group})."""
    N = data.X_test.shape[0]
    pts = _test_points(N)
    fig = _figure(3.2 * len(pts), 2.7 * len(panels) + 0.4)
    axes = fig.subplots(len(panels), len(pts), squeeze=False)
    for r, (title, sample_label, samples, theories) in enumerate(panels):
        f = _arviz.sample_array(samples, "f_test")
        f = f.reshape((-1,) + f.shape[2:])
        for c, a in enumerate(pts):
            ax = axes[r, c]
            ax.hist(f[:, a, 0], bins=30, density=True, alpha=0.35, color="C0", label=sample_label)
            for j, (label, g) in enumerate(theories.items()):
                x = g["density_grid"].sel(test_point=a, output=0).values
                p = g["density"].sel(test_point=a, output=0).values
                ax.plot(x, p, color=f"C{j + 1}", lw=1.8, ls="-" if j == 0 else "--", label=label)
            where = f"x = {data.X_test[a, 0]:.3g}" if data.one_d else f"test point {a}"
            ax.set_title(f"{title}: {where}", fontsize=9)
            ax.set_xlabel("f(x)" + (" (output 0)" if f.shape[-1] > 1 else ""), fontsize=8)
            ax.tick_params(labelsize=7)
            if c == 0:
                ax.set_ylabel("density", fontsize=8)
                ax.legend(fontsize=7, frameon=False)
    fig.suptitle("Distribution of the network output: real networks (histogram) vs theory (curves)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")


def plot_scaling(path, rows) -> None:
    """|estimate − theory| on the prior's scale against 1/n, order 0 and order 1, per quantity."""
    keys = []
    for r in rows:
        k = (r["comparison"], r["quantity"])
        # the prior mean is 0 at every order: nothing to scale
        if k not in keys and r["comparison"] != "bayes" and k != ("initialization", "mean"):
            keys.append(k)
    cols = min(3, len(keys))
    nrows = -(-len(keys) // cols)
    fig = _figure(4.0 * cols, 3.4 * nrows + 0.3)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    for ax, (comp, q) in zip(axes, keys, strict=False):
        sel = [r for r in rows if (r["comparison"], r["quantity"]) == (comp, q)]
        widths = sorted({r["width"] for r in sel})
        inv = np.array([1.0 / w for w in widths])
        for k, marker in ((0, "o"), (1, "s")):
            ys, es = [], []
            for w in widths:
                rs = [r for r in sel if r["width"] == w and r[f"dev_order{k}"] is not None]
                if not rs:
                    ys.append(np.nan)
                    es.append(np.nan)
                    continue
                ys.append(float(np.sqrt(np.mean([r[f"dev_order{k}"] ** 2 for r in rs]))))
                es.append(float(np.sqrt(np.mean([(r["stderr"] / r["scale"]) ** 2 for r in rs]))))
            if np.all(np.isnan(ys)):
                continue
            ax.errorbar(
                inv,
                ys,
                yerr=es,
                marker=marker,
                capsize=3,
                label=f"order {k}" + (" (infinite width)" if k == 0 else " (1/n)"),
            )
        noise = [
            float(np.sqrt(np.mean([(r["stderr"] / r["scale"]) ** 2 for r in sel if r["width"] == w]))) for w in widths
        ]
        ax.plot(inv, noise, color="0.6", ls=":", label="Monte Carlo s.e.")
        ref = [r for r in sel if r["width"] == widths[0] and r["dev_order0"] is not None]
        if ref:
            top = float(np.sqrt(np.mean([r["dev_order0"] ** 2 for r in ref])))
            ax.plot(inv, top * inv / inv[0], color="0.3", lw=0.8, label="∝ 1/n")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("1/n (n = hidden width)", fontsize=8)
        ax.set_ylabel("rms |estimate − theory| / prior scale", fontsize=8)
        ax.set_title(f"{comp}: {q}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, frameon=False)
    fig.suptitle(
        "Finite-width error of the theory against 1/n: order 0 should fall like 1/n down to the Monte Carlo "
        "s.e.\n(below the dotted line the differences are noise; small ensembles, e.g. --smoke, show only noise)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")


def plot_ppc(path, idata) -> None:
    """compare.plot_ppc (replicated vs observed training targets) as a PNG at ``path``."""
    png = path + ".png"  # matplotlib picks the format from the extension
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # arviz on a handful of observations
            compare.plot_ppc(idata, png, var_names=("y",), num_samples=min(50, _num_draws(idata)))
        publish(png, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(png)


def _num_draws(idata) -> int:
    post = _arviz.get_group(idata, "posterior")
    return int(post.sizes["chain"] * post.sizes["draw"])


def stderr_is_tty() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
