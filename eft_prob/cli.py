"""``eft-prob``: run a model spec end to end — infinite-width theory against ensembles of real networks.

    eft-prob run [SPEC] [--out DIR] [--smoke]     theory + simulation + comparison table
    eft-prob theory [SPEC]                        the analytic (infinite-width) part only
    eft-prob criticality ACTIVATION [--depth L --width N]
                                                  universality class, critical points, regime

SPEC is a TOML file (``models/default.toml`` documents every key; the same file is packaged as
``eft_prob/data/default.toml`` and used when SPEC is omitted).  The spec is validated completely
before anything is computed: a mistake exits with status 2 and one line naming the file, the key
and the fix.  The program switches JAX to float64 (the library itself never does), and on the CPU
backend the ensembles use batch sizes that suit a CPU (eft_prob.ensemble.auto_chunk) unless the
spec sets ``chunk_size``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib.resources
import json
import math
import os
import sys
import tempfile
import time
import tomllib
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from . import __version__, criticality, enable_x64, ensemble
from .activations import ACTIVATIONS
from .distributions import BayesianPosterior, NetworkPrior, TrainedNetwork
from .spec import MLPSpec
from .theory import kernels
from .theory.training import gd_moments, stability_bound

__all__ = ["DEFAULT_SPEC", "SpecError", "load_spec", "main"]

#: Where the packaged default spec lives (a copy of ``models/default.toml``).
DEFAULT_SPEC = "eft_prob/data/default.toml"
_DEFAULT_LABEL = f"<packaged default> ({DEFAULT_SPEC})"

#: ``--smoke`` / ``EFT_PROB_SMOKE=1`` caps: a few seconds on a laptop CPU.
SMOKE_CAPS = {"prior_networks": 256, "training_networks": 16, "steps": 100}

#: Networks per compiled batch on the CPU backend when the spec does not say (measured on a 2-core
#: CPU, width 256: vmapping many networks at once is memory-bound there, and training one network
#: per batch was 1.6× faster than the library's accelerator-sized default).

_GENERATORS = ("sine",)
_Z_FLAG = 3.0  # |z| above this is flagged in the table and the verdict
_SE_FLOOR = 1e-8  # z-scores use max(s.e., 1e-8 × the prior's scale)


class SpecError(Exception):
    """A problem with the spec or the command line that the user fixes (exit status 2)."""


# ------------------------------------------------------------------------------------------------
# The spec: schema, loading, validation.


@dataclasses.dataclass(frozen=True)
class _Key:
    kind: str  # int | float | str | int_list | hyper | pair
    check: object = None  # value -> problem string or None
    fix: str = ""
    optional: bool = False  # may be absent from the default (then None)


def _ge(lo, what="a number"):
    return lambda v: None if v >= lo else f"must be {what} >= {lo}"


def _gt(lo, what="a number"):
    return lambda v: None if v > lo else f"must be {what} > {lo}"


def _known_activation(v):
    if v in ACTIVATIONS:
        return None
    close = difflib.get_close_matches(v, ACTIVATIONS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"is not a known activation{hint}"


def _known_generator(v):
    return None if v in _GENERATORS else "is not a known data generator"


def _range_ok(v):
    return None if v[0] < v[1] else "must be [low, high] with low < high"


_SCHEMA: dict[str, dict[str, _Key]] = {
    "model": {
        "input_dim": _Key("int", _ge(1, "an integer"), "set the input dimension n_0, e.g. input_dim = 1"),
        "hidden": _Key("int_list", _ge(1, "a width"), "list the hidden widths, e.g. hidden = [256, 256]"),
        "output_dim": _Key("int", _ge(1, "an integer"), "set the number of outputs, e.g. output_dim = 1"),
        "activation": _Key("str", _known_activation, "use one of: " + ", ".join(sorted(ACTIVATIONS))),
        "C_b": _Key("hyper", _ge(0, "a bias variance"), "use a variance >= 0 (tanh is critical at C_b = 0)"),
        "C_W": _Key("hyper", _gt(0, "a weight variance"), "use a variance > 0 (tanh is critical at C_W = 1)"),
        "lambda_b": _Key("hyper", _ge(0, "a learning-rate scaling"), "use a value >= 0, e.g. lambda_b = 0.5"),
        "lambda_W": _Key("hyper", _ge(0, "a learning-rate scaling"), "use a value >= 0, e.g. lambda_W = 1.0"),
    },
    "data": {
        "generator": _Key("str", _known_generator, "use one of: " + ", ".join(_GENERATORS)),
        "n_train": _Key("int", _ge(1, "a count"), "use a number of training points >= 1, e.g. n_train = 3"),
        "n_test": _Key("int", _ge(1, "a count"), "use a number of test points >= 1, e.g. n_test = 4"),
        "x_range": _Key("pair", _range_ok, "give two numbers low < high, e.g. x_range = [-1.25, 1.5]"),
        "frequency": _Key("float", None, "give a finite number, e.g. frequency = 1.0"),
        "noise_std": _Key("float", _ge(0, "a standard deviation"), "use a noise level >= 0, e.g. 0.05"),
        "seed": _Key("int", _ge(0, "a seed"), "use a non-negative integer seed"),
    },
    "prior": {
        "n_networks": _Key("int", _ge(2, "a count"), "use at least 2 networks (a variance needs two)"),
        "seed": _Key("int", _ge(0, "a seed"), "use a non-negative integer seed"),
        "chunk_size": _Key("int", _ge(1, "a count"), "use a positive integer, or leave it out", True),
    },
    "training": {
        "learning_rate": _Key(
            "float",
            _gt(0, "a learning rate"),
            "use a value in (0, 2/λ_max(Θ̃)); `eft-prob theory` prints the bound",
        ),
        "steps": _Key("int", _ge(1, "a number of steps"), "use a positive number of GD steps, e.g. 300"),
        "n_networks": _Key("int", _ge(2, "a count"), "use at least 2 networks (a variance needs two)"),
        "seed": _Key("int", _ge(0, "a seed"), "use a non-negative integer seed"),
        "chunk_size": _Key("int", _ge(1, "a count"), "use a positive integer, or leave it out", True),
    },
    "bayes": {
        "noise_var": _Key("float", _gt(0, "a variance"), "use an observation-noise variance > 0, e.g. 0.0025"),
    },
}

_KIND_WORDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "int_list": "a list of integers",
    "hyper": "a number or a list of one number per layer",
    "pair": "a list of two numbers",
}


@dataclasses.dataclass(frozen=True)
class Config:
    """A validated spec: the resolved TOML tables and the :class:`MLPSpec` they describe."""

    source: str  # the file, as shown to the user
    tables: dict
    spec: MLPSpec
    origins: dict  # (section, key) -> the file the value came from (the user's or the default)

    def __getitem__(self, section):
        return self.tables[section]

    def where(self, section: str, key: str) -> str:
        """``file: [section] key`` for messages about one value."""
        return f"{self.origins[section, key]}: [{section}] {key}"


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_value(where: str, kind: _Key, value):
    """The value converted to Python numbers, or a SpecError naming ``where`` and the fix."""

    def fail(problem, label=where, v=value):
        raise SpecError(f"{label} = {_show(v)} {problem}. Fix: {kind.fix}.")

    def scalar(v, integer, label=where):
        if integer and not _is_int(v):
            fail(f"must be {_KIND_WORDS['int']}, not {_toml_type(v)}", label, v)
        if not integer and not _is_num(v):
            fail(f"must be {_KIND_WORDS['float']}, not {_toml_type(v)}", label, v)
        if not integer and not math.isfinite(v):
            fail("must be finite", label, v)
        if kind.check is not None and (problem := kind.check(v)):
            fail(problem, label, v)
        return int(v) if integer else float(v)

    if kind.kind == "int":
        return scalar(value, True)
    if kind.kind == "float":
        return scalar(value, False)
    if kind.kind == "str":
        if not isinstance(value, str):
            fail(f"must be {_KIND_WORDS['str']}, not {_toml_type(value)}")
        if problem := kind.check(value):
            fail(problem)
        return value
    if kind.kind == "int_list":
        if not isinstance(value, list):
            fail(f"must be {_KIND_WORDS['int_list']}, not {_toml_type(value)}")
        return [scalar(v, True, f"{where}[{j}]") for j, v in enumerate(value)]
    if kind.kind == "hyper":
        if isinstance(value, list):
            if not value:
                fail("must not be an empty list")
            return [scalar(v, False, f"{where}[{j}]") for j, v in enumerate(value)]
        return scalar(value, False)
    if kind.kind == "pair":
        if not (isinstance(value, list) and len(value) == 2 and all(_is_num(v) for v in value)):
            fail(f"must be {_KIND_WORDS['pair']}")
        if not all(math.isfinite(v) for v in value):
            fail("must be finite")
        if problem := kind.check(value):
            fail(problem)
        return [float(v) for v in value]
    raise AssertionError(kind.kind)  # pragma: no cover


def _show(v) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{...}"
    return repr(v) if not isinstance(v, list) else "[" + ", ".join(_show(x) for x in v) + "]"


def _toml_type(v) -> str:
    return {
        bool: "a boolean",
        str: "a string",
        int: "an integer",
        float: "a float",
        list: "a list",
        dict: "a table",
    }.get(type(v), type(v).__name__)


def _read_default_text() -> str:
    return (importlib.resources.files("eft_prob") / "data" / "default.toml").read_text(encoding="utf-8")


def _parse(text: str, source: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{source}: not valid TOML ({e}). Fix: correct the syntax at that line.") from None


def _validate(raw: dict, source: str, defaults: dict | None) -> Config:
    tables: dict[str, dict] = {}
    origins: dict[tuple[str, str], str] = {}
    for section, value in raw.items():
        if section not in _SCHEMA and not isinstance(value, dict):
            raise SpecError(
                f"{source}: {section} = {_show(value)}: unknown top-level key (keys belong to sections). "
                "Fix: move it under one of " + ", ".join(f"[{s}]" for s in _SCHEMA) + ", or remove it."
            )
        if section not in _SCHEMA:
            close = difflib.get_close_matches(section, _SCHEMA, n=1)
            hint = f"did you mean [{close[0]}]? " if close else ""
            raise SpecError(
                f"{source}: unknown section [{section}]. Fix: {hint}The sections are "
                + ", ".join(f"[{s}]" for s in _SCHEMA)
                + "."
            )
        if not isinstance(value, dict):
            raise SpecError(
                f"{source}: {section} = {_show(value)} must be a table. Fix: write it as [{section}] "
                "followed by its keys."
            )
        for key in value:
            if key not in _SCHEMA[section]:
                close = difflib.get_close_matches(key, _SCHEMA[section], n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise SpecError(
                    f"{source}: [{section}] {key}: unknown key. Fix: {hint}The keys of [{section}] are "
                    + ", ".join(_SCHEMA[section])
                    + "."
                )
    for section, keys in _SCHEMA.items():
        given = raw.get(section, {})
        tables[section] = {}
        for key, kind in keys.items():
            if key in given:
                value, origin = given[key], source
            elif defaults is not None:
                value, origin = defaults.get(section, {}).get(key), _DEFAULT_LABEL
            else:
                value, origin = None, source
            if value is None:
                if kind.optional:
                    tables[section][key] = None
                    continue
                raise SpecError(f"{origin}: [{section}] {key} is missing. Fix: {kind.fix}.")
            tables[section][key] = _check_value(f"{origin}: [{section}] {key}", kind, value)
            origins[section, key] = origin

    m, d = tables["model"], tables["data"]
    depth = len(m["hidden"]) + 1
    for name in ("C_b", "C_W", "lambda_b", "lambda_W"):
        if isinstance(m[name], list) and len(m[name]) != depth:
            raise SpecError(
                f"{source}: [model] {name} has {len(m[name])} values but the network has L = {depth} layers. "
                f"Fix: give one number, or a list of {depth} (one per layer)."
            )
    if d["generator"] == "sine" and (m["input_dim"] != 1 or m["output_dim"] != 1):
        raise SpecError(
            f'{source}: [data] generator = "sine" is a 1-D regression problem but [model] has '
            f"input_dim = {m['input_dim']}, output_dim = {m['output_dim']}. Fix: set input_dim = 1 and "
            "output_dim = 1."
        )
    hyper = {
        k: tuple(v) if isinstance(v, list) else v for k, v in m.items() if k in ("C_b", "C_W", "lambda_b", "lambda_W")
    }
    try:
        spec = MLPSpec(m["input_dim"], tuple(m["hidden"]), m["output_dim"], m["activation"], **hyper)
    except ValueError as e:  # defensive: everything MLPSpec checks is checked above
        raise SpecError(f"{source}: [model] {e} Fix: correct that value.") from None
    return Config(source, tables, spec, origins)


def load_spec(path: str | None = None) -> Config:
    """Read and validate a spec file (``None``: the packaged default).  Raises :class:`SpecError`."""
    default_raw = _parse(_read_default_text(), _DEFAULT_LABEL)
    if path is None:
        return _validate(default_raw, _DEFAULT_LABEL, None)
    if os.path.isdir(path):
        raise SpecError(
            f"{path}: is a directory, not a spec file. Fix: pass a .toml file such as "
            "models/default.toml, or omit SPEC to use the packaged default."
        )
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise SpecError(
            f"{path}: spec file not found. Fix: check the path, or omit SPEC to use the packaged "
            "default (a copy is models/default.toml)."
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read the spec file ({e}). Fix: pass a readable UTF-8 TOML file.") from None
    return _validate(_parse(text, path), path, default_raw)


# ------------------------------------------------------------------------------------------------
# Data.


@dataclasses.dataclass(frozen=True)
class Data:
    X: np.ndarray  # (n_train, 1)
    y: np.ndarray  # (n_train, 1)
    X_test: np.ndarray  # (n_test, 1)
    f_test: np.ndarray  # (n_test, 1): the noise-free target function on the test inputs


def make_data(cfg: Config) -> Data:
    """The built-in synthetic regression problem of ``[data]``.

    ``sine``: training inputs evenly spaced on x_range (ends included), test inputs at the centres of
    n_test equal cells of x_range, y = sin(frequency·x) + noise_std·N(0, 1) with numpy's
    ``default_rng(seed)``.
    """
    d = cfg["data"]
    lo, hi = d["x_range"]
    x = np.linspace(lo, hi, d["n_train"])
    if d["n_train"] == 1:
        x = np.array([(lo + hi) / 2])
    x_test = lo + (np.arange(d["n_test"]) + 0.5) * (hi - lo) / d["n_test"]
    rng = np.random.default_rng(d["seed"])
    y = np.sin(d["frequency"] * x) + d["noise_std"] * rng.standard_normal(x.shape)
    return Data(x[:, None], y[:, None], x_test[:, None], np.sin(d["frequency"] * x_test)[:, None])


# ------------------------------------------------------------------------------------------------
# Progress, warnings, statistics.


class _Log:
    """Progress lines with elapsed time; library warnings are shown as notes, never raised."""

    def __init__(self, stream=None):
        self.t0 = time.perf_counter()
        self.stream = stream or sys.stdout
        self.timings: dict[str, float] = {}
        self.warnings: list[str] = []

    def line(self, msg=""):
        print(msg, file=self.stream, flush=True)

    def detail(self, msg):
        self.line(" " * 10 + msg)

    @contextlib.contextmanager
    def stage(self, name, msg):
        start = time.perf_counter()
        print(f"[{start - self.t0:6.1f}s] {msg} ...", end="", file=self.stream, flush=True)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield
        except BaseException:
            print(" failed", file=self.stream, flush=True)
            raise
        dt = time.perf_counter() - start
        self.timings[name] = dt
        print(f" {dt:.1f}s", file=self.stream, flush=True)
        for w in caught:
            text = f"{w.category.__name__}: {w.message}"
            if text not in self.warnings:
                self.warnings.append(text)
                self.detail(f"warning: {text}")

    def total(self):
        return time.perf_counter() - self.t0


def _np(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _mean_se(s):
    """Sample mean over axis 0 and its standard error."""
    M = s.shape[0]
    return s.mean(0), s.std(0, ddof=1) / math.sqrt(M)


def _var_se(s):
    """Sample variance over axis 0 and its standard error sqrt((m4 − s⁴)/M)."""
    M = s.shape[0]
    c = s - s.mean(0)
    var = (c**2).sum(0) / (M - 1)
    m4 = (c**4).mean(0)
    return var, np.sqrt(np.maximum(m4 - var**2, 0.0) / M)


def _finite(x):
    x = float(x)
    return x if math.isfinite(x) else None


# ------------------------------------------------------------------------------------------------
# The computation.


def _smoke_from_env() -> bool:
    return os.environ.get("EFT_PROB_SMOKE", "").strip().lower() in ("1", "true", "yes", "on")


def _chunk(cfg: Config, section: str):
    return cfg[section]["chunk_size"]  # None: the library's backend-aware default


def _sizes(cfg: Config, smoke: bool) -> dict:
    s = {
        "prior_networks": cfg["prior"]["n_networks"],
        "training_networks": cfg["training"]["n_networks"],
        "steps": cfg["training"]["steps"],
    }
    if smoke:
        s = {k: min(v, SMOKE_CAPS[k]) for k, v in s.items()}
    return s


def _header(log: _Log, cfg: Config, data: Data, sizes: dict, smoke: bool):
    d = cfg["data"]
    log.line(f"spec: {cfg.source}")
    log.line(f"model: {cfg.spec.describe()}")
    log.line(
        f"data: {d['generator']}, y = sin({d['frequency']:g}·x) + {d['noise_std']:g}·noise "
        f"(seed {d['seed']}); "
        f"{d['n_train']} training inputs on [{d['x_range'][0]:g}, {d['x_range'][1]:g}], "
        f"{d['n_test']} test inputs"
    )
    if smoke:
        log.line(
            f"smoke mode (--smoke or EFT_PROB_SMOKE=1): {sizes['prior_networks']} prior networks, "
            f"{sizes['training_networks']} trained networks, {sizes['steps']} GD steps"
        )


def _theory(log: _Log, cfg: Config, data: Data, steps: int) -> dict:
    """Infinite-width predictions on the test inputs (THEORY.md §3, §5.1, §8)."""
    spec, lr = cfg.spec, cfg["training"]["learning_rate"]
    noise_var = cfg["bayes"]["noise_var"]
    X_all = np.concatenate([data.X, data.X_test])
    nA = data.X.shape[0]
    with log.stage("theory_kernels", f"theory: NNGP kernel K and NTK Θ on {X_all.shape[0]} inputs (train + test)"):
        k = kernels(spec, X_all)
        K, T = _np(k.nngp[-1]), _np(k.ntk[-1])
        T_AA = T[:nA, :nA]
        eig = np.linalg.eigvalsh(T_AA)
        bound = float(stability_bound(jnp.asarray(T_AA)))
    if not lr < bound:
        raise SpecError(
            f"{cfg.where('training', 'learning_rate')} = {lr:g} is at or above the gradient-descent "
            "stability "
            f"bound 2/λ_max(Θ̃) = {bound:.4g} of this model and training set, so GD would diverge. "
            f"Fix: use a learning rate below {bound:.4g}, e.g. learning_rate = {_round_down(bound / 2)}."
        )
    log.detail(
        f"NTK on the training inputs: eigenvalues {eig[0]:.4g} ... {eig[-1]:.4g} "
        f"(condition number {eig[-1] / eig[0]:.3g})"
    )
    log.detail(f"GD stability bound 2/λ_max = {bound:.4g}; learning_rate = {lr:g} = {lr / bound:.2f} × bound")
    # Expected training residual after `steps` steps: the trained distribution on the training inputs.
    m_tr, S_tr = gd_moments(K[:nA, :nA], K[:nA, :nA], K[:nA, :nA], T_AA, T_AA, data.y, lr, steps)
    resid = float(np.sqrt(np.mean((_np(m_tr) - data.y) ** 2 + np.diag(_np(S_tr))[:, None])))
    log.detail(f"expected training residual after {steps} steps (infinite width): rms {resid:.2g}")

    with log.stage(
        "theory_distributions",
        f"theory: prior N(0, K), GD-trained p(f) after {steps} steps, Bayesian posterior (noise_var {noise_var:g})",
    ):
        prior = NetworkPrior(spec, data.X_test)
        trained = TrainedNetwork(spec, data.X, data.y, data.X_test, lr, steps)
        bayes = BayesianPosterior(spec, data.X, data.y, data.X_test, noise_var)
        out = {
            "prior_variance": _np(prior.variance),
            "trained_mean": _np(trained.mean),
            "trained_variance": _np(trained.variance),
            "bayes_mean": _np(bayes.mean),
            "bayes_variance": _np(bayes.variance),
        }
    out.update(
        ntk_eigenvalues=eig,
        stability_bound=bound,
        train_residual_rms=resid,
        learning_rate=lr,
        steps=steps,
    )
    return out


def _round_down(x: float) -> str:
    """A short number just below x (for suggestions)."""
    digits = 2 - math.floor(math.log10(abs(x)))
    return f"{math.floor(x * 10**digits) / 10**digits:g}"


def _simulate(log: _Log, cfg: Config, data: Data, sizes: dict) -> dict:
    spec = cfg.spec
    Mp, Mt, steps = sizes["prior_networks"], sizes["training_networks"], sizes["steps"]
    with log.stage("prior_ensemble", f"simulation: {Mp} networks drawn from the prior"):
        prior = _np(
            ensemble.prior_outputs(
                spec, data.X_test, Mp, jax.random.key(cfg["prior"]["seed"]), chunk_size=_chunk(cfg, "prior")
            )
        )
    with log.stage("trained_ensemble", f"simulation: {Mt} networks trained by full-batch GD, {steps} steps each"):
        res = ensemble.train(
            spec,
            data.X,
            data.y,
            data.X_test,
            Mt,
            cfg["training"]["learning_rate"],
            steps,
            jax.random.key(cfg["training"]["seed"]),
            chunk_size=_chunk(cfg, "training"),
        )
        test_final, train_final = _np(res.test_final), _np(res.train_final)
    # diverged networks are stopped at their last finite state, so finite outputs alone do not mean converged
    ok = ~np.asarray(res.diverged) & np.all(np.isfinite(test_final), axis=(1, 2))
    diverged = int((~ok).sum())
    resid = np.max(np.abs(train_final[ok] - data.y), axis=(1, 2)) if ok.any() else np.array([np.nan])
    log.detail(
        f"training residual max|f(x) - y| per network: median {np.median(resid):.2g}, "
        f"worst {np.max(resid):.2g}" + (f"; {diverged} networks diverged (dropped)" if diverged else "")
    )
    if np.max(resid) >= 1e-4:
        log.detail(
            "note: not converged below 1e-4; the theory uses the same finite number of steps, so the "
            "comparison below is still like for like"
        )
    if ok.sum() < 2:
        raise SpecError(
            f"{cfg.where('training', 'learning_rate')} = {cfg['training']['learning_rate']:g}: "
            "fewer than two of "
            f"the {Mt} trained networks stayed finite (finite-width NTKs exceed the infinite-width bound). "
            "Fix: lower the learning rate."
        )
    return {"prior": prior, "trained": test_final[ok], "train_residual_max": resid, "diverged": diverged}


def _compare(th: dict, sim: dict, data: Data) -> list[dict]:
    rows = []
    pv, pv_se = _var_se(sim["prior"])
    tm, tm_se = _mean_se(sim["trained"])
    tv, tv_se = _var_se(sim["trained"])
    prior_sd = np.sqrt(th["prior_variance"])
    N, nL = pv.shape
    # Deviations are measured on the prior's scale (K for variances, √K for means): that is the scale
    # of the O(L/n) corrections, also for the trained variance, which is itself much smaller than K.
    for quantity, theory, est, se, scale in (
        ("prior variance", th["prior_variance"], pv, pv_se, th["prior_variance"]),
        ("trained mean", th["trained_mean"], tm, tm_se, prior_sd),
        ("trained variance", th["trained_variance"], tv, tv_se, th["prior_variance"]),
    ):
        for a in range(N):
            for i in range(nL):
                dev = est[a, i] - theory[a, i]
                # A floor on the s.e. at round-off level: deterministic outputs (a trained network on
                # inputs its training data pins down) have zero spread in theory and in the ensemble.
                se_z = max(se[a, i], _SE_FLOOR * scale[a, i])
                rows.append(
                    {
                        "quantity": quantity,
                        "x": float(data.X_test[a, 0]),
                        "output": i,
                        "theory": float(theory[a, i]),
                        "ensemble": float(est[a, i]),
                        "stderr": float(se[a, i]),
                        "z": float(dev / se_z) if se_z > 0 else float("nan"),
                        "scale": float(scale[a, i]),
                        "dev_prior_scale": float(dev / scale[a, i]) if scale[a, i] > 0 else float("nan"),
                    }
                )
    return rows


def _verdict(rows: list[dict], spec: MLPSpec) -> str:
    z = np.array([abs(r["z"]) for r in rows])
    rel = np.array([abs(r["dev_prior_scale"]) for r in rows])
    bad = int(np.sum(~(z < _Z_FLAG)))
    r = spec.aspect_ratio
    if not spec.hidden:
        expected = "a linear network (L = 1) is Gaussian at any width, so the theory is exact"
    else:
        rel_se = float(np.nanmedian([x["stderr"] / x["scale"] for x in rows]))
        expected = (
            f"at width n = {min(spec.hidden)} the 1/n corrections left out of the infinite-width theory "
            f"shift these moments by O(L/n) = {r:.2g} of the prior scale (median standard error here: "
            f"{rel_se:.2g} of that scale)"
        )
    if bad == 0:
        return (
            f"verdict: all {len(rows)} comparisons agree within {_Z_FLAG:g} standard errors "
            f"(max |z| = {np.nanmax(z):.2f}); {expected}."
        )
    tail = (
        "look for a problem (or rerun with other seeds: about 1 in 370 comparisons exceeds 3 s.e. by chance)"
        if not spec.hidden
        else "deviations of that order are expected and shrink like 1/n as the network is widened"
    )
    return (
        f"verdict: {bad} of {len(rows)} comparisons deviate by more than {_Z_FLAG:g} standard errors "
        f"(max |z| = {np.nanmax(z):.3g}, max deviation {np.nanmax(rel):.2g} of the prior scale); "
        f"{expected} — {tail}."
    )


def _table(rows: list[dict], markdown: bool = False) -> str:
    multi = any(r["output"] for r in rows)
    head = ["quantity", "x"] + (["out"] if multi else []) + ["theory", "ensemble ± s.e.", "z", "dev/scale"]
    body = []
    for r in rows:
        flag = " *" if not abs(r["z"]) < _Z_FLAG else ""
        body.append(
            [r["quantity"], f"{r['x']:.4g}"]
            + ([str(r["output"])] if multi else [])
            + [
                f"{r['theory']:.5g}",
                f"{r['ensemble']:.5g} ± {r['stderr']:.2g}",
                f"{r['z']:+.2f}{flag}",
                f"{r['dev_prior_scale']:+.2%}",
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(c.replace("*", "\\*") for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    left = {0}

    def fmt(row):
        return "  ".join(
            c.ljust(w) if j in left else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(row) for row in body])


_LEGEND = (
    "z = (ensemble − theory)/s.e. (s.e. floored at 1e-8 of the scale), * marks |z| >= 3; "
    "dev/scale = (ensemble − theory) on the prior's scale: "
    "divided by K (the prior variance) for variances and by √K for means. Standard errors: s/√M for a "
    "mean, √((m4 − s⁴)/M) for a variance (m4: fourth central moment)."
)


def _prediction_table(th: dict, data: Data) -> str:
    head = ["x", "sin(ωx)", "prior sd", "GD-trained mean ± sd", "Bayes mean ± sd"]
    body = []
    for a in range(data.X_test.shape[0]):
        for i in range(th["prior_variance"].shape[1]):
            body.append(
                [
                    f"{data.X_test[a, 0]:.4g}",
                    f"{data.f_test[a, i]:.4g}",
                    f"{math.sqrt(th['prior_variance'][a, i]):.4g}",
                    f"{th['trained_mean'][a, i]:.4g} ± {math.sqrt(max(th['trained_variance'][a, i], 0)):.3g}",
                    f"{th['bayes_mean'][a, i]:.4g} ± {math.sqrt(max(th['bayes_variance'][a, i], 0)):.3g}",
                ]
            )
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    fmt = lambda row: "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])


# ------------------------------------------------------------------------------------------------
# Output files.


class _OutDir:
    """``--out DIR``: checked before any computation; files appear atomically or not at all."""

    def __init__(self, path: str):
        self.path = path
        self.created = not os.path.exists(path)
        if os.path.exists(path) and not os.path.isdir(path):
            raise SpecError(f"--out {path}: exists and is not a directory. Fix: pass a directory path.")
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as e:
            self.cleanup()
            raise SpecError(
                f"--out {path}: cannot write there ({e.strerror or e}). Fix: choose a writable directory."
            ) from None

    def cleanup(self):
        """Remove the directory if this run created it and nothing is in it."""
        if self.created:
            with contextlib.suppress(OSError):
                os.rmdir(self.path)

    def write(self, files: dict[str, str]) -> list[str]:
        temps = {}
        try:
            for name, text in files.items():
                fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{name}.", suffix=".tmp")
                temps[name] = tmp
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
            for name, tmp in temps.items():
                os.replace(tmp, os.path.join(self.path, name))
        except OSError as e:
            for tmp in temps.values():
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            self.cleanup()
            raise SpecError(
                f"--out {self.path}: writing the summary failed ({e.strerror or e}). Fix: choose a "
                "writable directory with free space."
            ) from None
        return [os.path.join(self.path, n) for n in files]


def _summary(cfg, data, th, sim, rows, verdict, sizes, smoke, log) -> dict:
    f = lambda a: [[_finite(v) for v in row] for row in np.asarray(a)]
    return {
        "eft_prob_version": __version__,
        "spec_file": cfg.source,
        "smoke": smoke,
        "spec": cfg.tables,
        "model": {
            "description": cfg.spec.describe(),
            "widths": list(cfg.spec.widths),
            "depth": cfg.spec.depth,
            "aspect_ratio": cfg.spec.aspect_ratio,
        },
        "data": {
            "x_train": data.X[:, 0].tolist(),
            "y_train": f(data.y),
            "x_test": data.X_test[:, 0].tolist(),
            "f_test": f(data.f_test),
        },
        "theory": {
            "stability_bound": th["stability_bound"],
            "learning_rate": th["learning_rate"],
            "steps": th["steps"],
            "ntk_train_eigenvalues": [_finite(v) for v in th["ntk_eigenvalues"]],
            "train_residual_rms": _finite(th["train_residual_rms"]),
            **{
                k: f(th[k])
                for k in (
                    "prior_variance",
                    "trained_mean",
                    "trained_variance",
                    "bayes_mean",
                    "bayes_variance",
                )
            },
        },
        "ensemble": {
            "prior_networks": sizes["prior_networks"],
            "training_networks": sizes["training_networks"],
            "steps": sizes["steps"],
            "diverged": sim["diverged"],
            "train_residual_max": _finite(np.max(sim["train_residual_max"])),
            "train_residual_median": _finite(np.median(sim["train_residual_max"])),
        },
        "comparison": [{k: (_finite(v) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "max_abs_z": _finite(np.nanmax([abs(r["z"]) for r in rows])),
        "verdict": verdict,
        "warnings": list(log.warnings),
        "timings_s": {k: round(v, 3) for k, v in log.timings.items()},
    }


def _markdown(summary: dict, rows: list[dict], predictions: str) -> str:
    s = summary
    return "\n".join(
        [
            "# eft-prob run summary",
            "",
            f"- spec: `{s['spec_file']}`" + (" (smoke mode)" if s["smoke"] else ""),
            f"- model: {s['model']['description']}",
            f"- ensembles: {s['ensemble']['prior_networks']} prior networks; "
            f"{s['ensemble']['training_networks']} networks trained for {s['ensemble']['steps']} GD steps "
            f"(learning rate {s['theory']['learning_rate']:g}, "
            f"stability bound {s['theory']['stability_bound']:.4g})",
            f"- training residual max|f − y|: worst network {s['ensemble']['train_residual_max']:.2g}",
            "",
            "## Infinite-width predictions on the test inputs",
            "",
            "```",
            predictions,
            "```",
            "",
            "## Theory (infinite width) vs ensembles, per test input",
            "",
            _table(rows, markdown=True),
            "",
            _LEGEND,
            "",
            s["verdict"],
            "",
        ]
    )


# ------------------------------------------------------------------------------------------------
# Commands.


def _cmd_theory(args, log: _Log) -> int:
    cfg = load_spec(args.spec)
    enable_x64()
    data = make_data(cfg)
    steps = cfg["training"]["steps"]
    _header(log, cfg, data, {}, False)
    th = _theory(log, cfg, data, steps)
    log.line()
    log.line("Infinite-width predictions on the test inputs:")
    log.line(_prediction_table(th, data))
    log.line(f"total {log.total():.1f}s")
    return 0


def _cmd_run(args, log: _Log) -> int:
    cfg = load_spec(args.spec)
    smoke = bool(args.smoke) or _smoke_from_env()
    out = _OutDir(args.out) if args.out else None
    try:
        enable_x64()
        sizes = _sizes(cfg, smoke)
        data = make_data(cfg)
        _header(log, cfg, data, sizes, smoke)
        th = _theory(log, cfg, data, sizes["steps"])
        sim = _simulate(log, cfg, data, sizes)
        rows = _compare(th, sim, data)
        verdict = _verdict(rows, cfg.spec)
        log.line()
        log.line("Infinite-width predictions on the test inputs:")
        log.line(_prediction_table(th, data))
        log.line()
        log.line("Theory (infinite width) vs ensembles of real networks, per test input:")
        log.line(_table(rows))
        log.line(_LEGEND)
        log.line(verdict)
        if out:
            summary = _summary(cfg, data, th, sim, rows, verdict, sizes, smoke, log)
            text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
            md = _markdown(summary, rows, _prediction_table(th, data))
            paths = out.write({"summary.json": text, "summary.md": md})
            log.line("wrote " + " and ".join(paths))
    except BaseException:
        if out:
            out.cleanup()
        raise
    log.line(f"total {log.total():.1f}s")
    return 0


def _cmd_criticality(args, log: _Log) -> int:
    problem = _known_activation(args.activation)
    if problem:
        known = ", ".join(sorted(ACTIVATIONS))
        raise SpecError(f"activation {json.dumps(args.activation)} {problem}. Fix: use one of: {known}.")
    if (args.depth is None) != (args.width is None):
        raise SpecError("--depth and --width go together. Fix: give both (e.g. --depth 10 --width 64), or neither.")
    for flag, value, low in (("--depth", args.depth, 1), ("--width", args.width, 1)):
        if value is not None and value < low:
            raise SpecError(f"{flag} {value} must be >= {low}. Fix: pass a positive integer.")
    for flag, value, strict in (("--C_b", args.C_b, False), ("--C_W", args.C_W, True)):
        if value is not None and not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
            raise SpecError(f"{flag} {value} must be {'> 0' if strict else '>= 0'}. Fix: pass a finite variance.")
    enable_x64()
    act = ACTIVATIONS[args.activation]
    cls = criticality.universality_class(act)
    points = criticality.critical_points(act)
    log.line(f"activation: {act.name}")
    log.line(f"universality class: {cls} ({_CLASS_NOTES[cls]})")
    if points:
        log.line("critical points (K* = C_b + C_W<σ²>_K*, χ_∥ = χ_⊥ = 1):")
        for p in points:
            if p.kind == "scale-invariant":
                where = "any K* > 0 (every kernel is a fixed point)"
            elif p.kind == "K*=0":
                where = "K* -> 0 (reached as K ~ 1/depth)"
            else:
                where = f"K* = {p.K_star:.10g}"
            log.line(
                f"  {where}: C_b = {p.C_b:.10g}, C_W = {p.C_W:.10g}; χ_∥ = {p.chi_parallel:.12g}, "
                f"χ_⊥ = {p.chi_perp:.12g}"
            )
    else:
        log.line("critical points: none (no C_b >= 0, C_W > 0 makes χ_∥ = χ_⊥ = 1 at a fixed point)")
    C_W = args.C_W if args.C_W is not None else (points[0].C_W if points else None)
    C_b = args.C_b if args.C_b is not None else (points[0].C_b if points and args.C_W is None else 0.0)
    if C_W is not None:
        Ks = np.array([0.1, 1.0, 10.0])
        par = np.asarray(criticality.chi_parallel(act, Ks, C_W))
        perp = np.asarray(criticality.chi_perp(act, Ks, C_W))
        log.line(f"susceptibilities at C_W = {C_W:.6g}:")
        for K, a, b in zip(Ks, par, perp):
            log.line(f"  K = {K:<5g}  χ_∥ = {a:.6f}  χ_⊥ = {b:.6f}")
    if args.depth is not None:
        if C_W is None:
            raise SpecError(
                f"activation {act.name!r} has no critical point, so the regime needs a C_W. Fix: pass --C_W "
                "(and optionally --C_b)."
            )
        spec = MLPSpec(1, (args.width,) * (args.depth - 1), 1, act, C_b=C_b, C_W=C_W)
        reg = criticality.regime(spec)
        log.line(f"regime of {spec.describe().split(' (')[0]}, C_b = {C_b:.6g}, C_W = {C_W:.6g}, input |x|²/n_0 = 1:")
        log.line(f"  {reg.message}")
    return 0


_CLASS_NOTES = {
    "scale-invariant": "book §5.2: critical at C_b = 0, C_W = 1/A_2 for every kernel",
    "K*=0": "book §5.3.3: critical as the kernel flows to 0 like 1/depth",
    "half-stable": "book §5.3.4: critical at K* > 0, attractive from one side only",
    "none": "book §5.3.2: no criticality; the kernel flows exponentially with depth",
}


_SPEC_HELP = (
    "a TOML model spec (default: the packaged default, a copy of models/default.toml). Sections: "
    "[model] architecture and initialization (input_dim, hidden, output_dim, activation, C_b, C_W, "
    "lambda_b, lambda_W); [data] the synthetic data set; [prior] and [training] ensemble sizes, "
    "seeds, learning rate and steps; [bayes] noise_var. Keys left out take the default's values."
)

_DESCRIPTION = """\
Compare the effective theory of deep MLPs (Roberts & Yaida) at infinite width with ensembles of
real networks.  For a network described by a TOML spec and a small synthetic regression problem,
eft-prob computes, on every test input, the distribution of the network output

  * at initialization (prior): Gaussian with variance K, the NNGP kernel;
  * after full-batch gradient descent: Gaussian, from the frozen neural tangent kernel Θ;
  * under Bayesian inference with the same prior (Gaussian-process regression with K);

and checks the first two against networks drawn from the prior and networks actually trained."""

_EPILOG = """\
examples:
  eft-prob run                       the default spec (models/default.toml): ~40 s on a 2-core CPU
  eft-prob run --smoke --out out/    ~10 s, mostly compilation; writes out/summary.{json,md}
  eft-prob theory models/my.toml     the analytic predictions of a spec, no simulation

exit status: 0 success, 2 a problem with the spec, the command line or the output directory
(one line on stderr names the file, the key and the fix).
"""

_RUN_DESCRIPTION = """\
Theory, simulation and comparison for one spec:

  1. theory (float64, infinite width): NNGP kernel K and NTK Θ on the training and test inputs;
     the GD stability bound 2/λ_max(Θ̃) (the learning rate must be below it); the prior N(0, K);
     the distribution of GD-trained outputs after the spec's number of steps; the Bayesian
     posterior with observation noise noise_var;
  2. simulation: [prior] n_networks networks drawn at initialization and [training] n_networks
     networks trained by full-batch GD (learning rates η·λ_b and η·λ_W/fan-in) on ½Σ(f − y)²;
  3. comparison on each test input of the prior variance, trained mean and trained variance:
     theory, ensemble estimate ± Monte Carlo standard error, z-score, and the deviation on the
     prior's scale; then a one-line verdict.

At finite width n the theory is exact only up to corrections of order L/n (depth over width) on
the prior's scale, so small but significant deviations are expected for narrow networks.  The
trained moments are more sensitive: NTK fluctuations reach them through the inverse training NTK,
amplified by its condition number (printed in step 1)."""

_RUN_EPILOG = """\
performance: on the CPU backend the trained ensemble is compiled one network at a time and the
prior ensemble 16 at a time (faster there than large batches); set chunk_size in [prior] or
[training] to override.  The program computes in float64 (it calls eft_prob.enable_x64()).
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eft-prob",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"eft-prob {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="theory + simulated ensembles + comparison table",
        description=_RUN_DESCRIPTION,
        epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("spec", nargs="?", metavar="SPEC", help=_SPEC_HELP)
    run.add_argument(
        "--out",
        metavar="DIR",
        help="also write DIR/summary.json and DIR/summary.md (the same table); DIR is created if needed",
    )
    run.add_argument(
        "--smoke",
        action="store_true",
        help=f"tiny ensembles and at most {SMOKE_CAPS['steps']} GD steps, for a check in a few seconds "
        "(also EFT_PROB_SMOKE=1)",
    )
    th = sub.add_parser(
        "theory",
        help="the analytic (infinite-width) predictions only",
        description="The analytic part of `eft-prob run`: NNGP kernel, NTK, GD stability bound, "
        "and on each test input the prior standard deviation, the GD-trained mean ± sd "
        "and the Bayesian posterior mean ± sd at infinite width. No networks are "
        "simulated; takes seconds.",
    )
    th.add_argument("spec", nargs="?", metavar="SPEC", help=_SPEC_HELP)
    cr = sub.add_parser(
        "criticality",
        help="universality class, critical initialization and 1/n regime of an activation",
        description="For one activation: its universality class (book Ch. 5), all critical points "
        "(C_b, C_W, K*) with χ_∥ = χ_⊥ = 1, the susceptibilities at the critical C_W, and with "
        "--depth/--width the regime of the 1/n expansion (ε = V/(nK²) of the output; THEORY.md §4.4).",
    )
    cr.add_argument("activation", metavar="ACTIVATION", help="one of: " + ", ".join(sorted(ACTIVATIONS)))
    cr.add_argument("--depth", type=int, metavar="L", help="number of layers L (with --width: show the regime)")
    cr.add_argument("--width", type=int, metavar="N", help="width of every hidden layer")
    cr.add_argument("--C_b", type=float, help="bias variance for the regime (default: the critical one)")
    cr.add_argument("--C_W", type=float, help="weight variance (default: the critical one)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``eft-prob`` command; returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (argparse already printed)
        return int(e.code or 0)
    log = _Log()
    try:
        return {"run": _cmd_run, "theory": _cmd_theory, "criticality": _cmd_criticality}[args.command](args, log)
    except SpecError as e:
        print(f"eft-prob: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("eft-prob: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
