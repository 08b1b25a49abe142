"""``eft-prob``: run a model spec end to end — infinite-width theory against ensembles of real networks.

    eft-prob run [SPEC] [--out DIR] [--resume] [--smoke] [--check]
                                                  theory (order 0 and 1) + simulation + comparison
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

from . import __version__, criticality, enable_x64
from ._config import MemoryLimitError
from ._io import publish
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
SMOKE_CAPS = {
    "prior_networks": 256,
    "training_networks": 16,
    "steps": 100,
    "num_chains": 1,
    "num_warmup": 40,
    "num_samples": 40,
    "theory_draws": 400,
}

#: Networks per compiled batch on the CPU backend when the spec does not say (measured on a 2-core
#: CPU, width 256: vmapping many networks at once is memory-bound there, and training one network
#: per batch was 1.6× faster than the library's accelerator-sized default).

_GENERATORS = ("sine", "diabetes", "file")
_COMPARISONS = ("initialization", "training", "bayes")
#: The ten columns of scikit-learn's diabetes data (age, sex, body-mass index, blood pressure, six serum values).
_DIABETES_FEATURES = ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")
_DIABETES_ROWS = 442
_Z_FLAG = 3.0  # |z| above this is flagged in the table and the verdict
_SE_FLOOR = 1e-8  # z-scores use max(s.e., 1e-8 × the prior's scale)


class SpecError(Exception):
    """A problem with the spec or the command line that the user fixes (exit status 2)."""


# ------------------------------------------------------------------------------------------------
# The spec: schema, loading, validation.


@dataclasses.dataclass(frozen=True)
class _Key:
    kind: str  # int | float | str | int_list | str_list | hyper | pair
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


def _known_comparisons(v):
    bad = [c for c in v if c not in _COMPARISONS]
    if bad:
        return f"has unknown comparison {json.dumps(bad[0])}"
    if len(set(v)) != len(v):
        return "lists a comparison twice"
    return None if v else "must name at least one comparison"


def _fraction_open(v):
    return None if 0 < v < 1 else "must lie strictly between 0 and 1"


def _nonempty_str(v):
    return None if v.strip() else "must not be empty"


def _names_ok(v):
    if not v:
        return "must not be an empty list"
    if any(not x.strip() for x in v):
        return "must not contain an empty name"
    return "lists a name twice" if len(set(v)) != len(v) else None


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
        "path": _Key(
            "str",
            _nonempty_str,
            'name a .npz or .csv file, relative to the spec file, e.g. path = "mydata.csv"',
            True,
        ),
        "features": _Key(
            "str_list",
            _names_ok,
            'list input columns, e.g. features = ["bmi", "bp", "s5"] (diabetes: ' + ", ".join(_DIABETES_FEATURES) + ")",
            True,
        ),
        "target": _Key("str", _nonempty_str, 'name the target column of the .csv file, e.g. target = "y"', True),
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
    "nuts": {
        "num_chains": _Key("int", _ge(1, "a count"), "use at least one chain, e.g. num_chains = 2"),
        "num_warmup": _Key("int", _ge(1, "a count"), "use a positive number of warmup iterations, e.g. 500"),
        "num_samples": _Key("int", _ge(2, "a count"), "keep at least 2 draws per chain, e.g. num_samples = 500"),
        "seed": _Key("int", _ge(0, "a seed"), "use a non-negative integer seed"),
        "target_accept": _Key("float", _fraction_open, "use a value in (0, 1), e.g. target_accept = 0.9"),
    },
    "run": {
        "comparisons": _Key(
            "str_list",
            _known_comparisons,
            "list some of "
            + ", ".join(json.dumps(c) for c in _COMPARISONS)
            + ', e.g. comparisons = ["initialization", "training"]',
        ),
        "widths": _Key(
            "int_list",
            _ge(1, "a width"),
            "list hidden widths to sweep (every hidden layer gets each width), e.g. widths = [32, 64, 128], "
            "or leave it out",
            True,
        ),
        "theory_draws": _Key("int", _ge(2, "a count"), "use at least 2 draws, e.g. theory_draws = 4000"),
    },
}

#: Keys of [data] that only one generator reads (a user spec setting them for another is a mistake).
_GENERATOR_KEYS = {
    "x_range": ("sine",),
    "frequency": ("sine",),
    "noise_std": ("sine",),
    "path": ("file",),
    "features": ("diabetes", "file"),
    "target": ("file",),
}

_KIND_WORDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "int_list": "a list of integers",
    "str_list": "a list of strings",
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
    base_dir: str = "."  # relative data paths are relative to this (the spec file's directory)

    def __getitem__(self, section):
        return self.tables[section]

    def where(self, section: str, key: str) -> str:
        """``file: [section] key`` for messages about one value."""
        return f"{self.origins[section, key]}: [{section}] {key}"

    def where_spec(self, section: str, key: str) -> str:
        """``spec: [section] key``, noting when the value came from the packaged default."""
        origin = self.origins.get((section, key), self.source)
        note = f" (not set, so the default's value from {origin})" if origin != self.source else ""
        return f"{self.source}: [{section}] {key}{note}"


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
        if not value:
            fail("must not be an empty list")
        return [scalar(v, True, f"{where}[{j}]") for j, v in enumerate(value)]
    if kind.kind == "str_list":
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            fail(f"must be {_KIND_WORDS['str_list']}")
        if problem := kind.check(value):
            fail(problem)
        return list(value)
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
    for key, generators in _GENERATOR_KEYS.items():
        if key in raw.get("data", {}) and d["generator"] not in generators:
            raise SpecError(
                f"{source}: [data] {key} is read only by generator = "
                + " or ".join(json.dumps(g) for g in generators)
                + f", but generator = {json.dumps(d['generator'])}. Fix: remove {key}, or change the generator."
            )
    if d["generator"] == "sine" and (m["input_dim"] != 1 or m["output_dim"] != 1):
        raise SpecError(
            f'{source}: [data] generator = "sine" is a 1-D regression problem but [model] has '
            f"input_dim = {m['input_dim']}, output_dim = {m['output_dim']}. Fix: set input_dim = 1 and "
            "output_dim = 1."
        )
    if d["generator"] == "file" and d["path"] is None:
        raise SpecError(
            f'{source}: [data] generator = "file" needs [data] path. Fix: add path = "data.npz" (or a .csv '
            "file), relative to the spec file."
        )
    r = tables["run"]
    if r["widths"] is not None and len(set(r["widths"])) != len(r["widths"]):
        raise SpecError(f"{source}: [run] widths = {_show(r['widths'])} lists a width twice. Fix: list each once.")
    hyper = {
        k: tuple(v) if isinstance(v, list) else v for k, v in m.items() if k in ("C_b", "C_W", "lambda_b", "lambda_W")
    }
    try:
        spec = MLPSpec(m["input_dim"], tuple(m["hidden"]), m["output_dim"], m["activation"], **hyper)
    except ValueError as e:  # defensive: everything MLPSpec checks is checked above
        raise SpecError(f"{source}: [model] {e} Fix: correct that value.") from None
    if r["widths"] is not None and not spec.hidden:
        raise SpecError(
            f"{source}: [run] widths sweeps the hidden widths, but [model] hidden = [] has none. Fix: remove "
            "widths, or give the network hidden layers."
        )
    base = os.path.dirname(os.path.abspath(source)) if defaults is not None else os.getcwd()
    cfg = Config(source, tables, spec, origins, base)
    make_data(cfg)  # data files and data sets are read and checked now, before any computation
    return cfg


def load_spec(path: str | None = None) -> Config:
    """Read and validate a spec file (``None``: the packaged default).  Raises :class:`SpecError`.

    Validation is complete: every key, its type and value, the cross-checks between sections, and the
    data ([data] files are read, data-set shapes checked against [model]).
    """
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
    X: np.ndarray  # (n_train, n_0)
    y: np.ndarray  # (n_train, n_L)
    X_test: np.ndarray  # (n_test, n_0)
    f_test: np.ndarray  # (n_test, n_L): the noise-free target on the test inputs (real data: = y_test)
    y_test: np.ndarray | None = None  # (n_test, n_L): held-out noisy targets (None: not available)
    description: str = ""

    @property
    def one_d(self) -> bool:
        return self.X.shape[1] == 1

    def x_label(self, a: int) -> float:
        """What identifies test point a in tables: its x for 1-D inputs, else its index."""
        return float(self.X_test[a, 0]) if self.one_d else float(a)


def make_data(cfg: Config) -> Data:
    """The regression problem of ``[data]``.

    * ``sine``: training inputs evenly spaced on x_range (ends included), test inputs at the centres of
      n_test equal cells of x_range, y = sin(frequency·x) + noise_std·N(0, 1) with numpy's
      ``default_rng(seed)`` (held-out targets y_test: the same law at the test inputs).
    * ``diabetes``: scikit-learn's bundled diabetes data (442 patients; no download): the ``features``
      columns and the target, each standardized to mean 0 and variance 1 over all rows; rows shuffled
      with ``default_rng(seed)``, the first n_train train, the next n_test are held out.
    * ``file``: a ``.npz`` with arrays ``X`` (N, n_0) and ``y`` (N, n_L) (or (N,)), optionally ``X_test``
      and ``y_test``; or a ``.csv`` with a header row, ``target`` (default: the last column) and
      ``features`` (default: all other columns).  Without ``X_test`` the rows are shuffled with
      ``seed`` and split n_train / n_test.  Used as given (not standardized).
    """
    d = cfg["data"]
    gen = d["generator"]
    if gen == "sine":
        lo, hi = d["x_range"]
        x = np.linspace(lo, hi, d["n_train"])
        if d["n_train"] == 1:
            x = np.array([(lo + hi) / 2])
        x_test = lo + (np.arange(d["n_test"]) + 0.5) * (hi - lo) / d["n_test"]
        rng = np.random.default_rng(d["seed"])
        y = np.sin(d["frequency"] * x) + d["noise_std"] * rng.standard_normal(x.shape)
        f_test = np.sin(d["frequency"] * x_test)
        y_test = f_test + d["noise_std"] * rng.standard_normal(x_test.shape)
        desc = (
            f"sine, y = sin({d['frequency']:g}·x) + {d['noise_std']:g}·noise (seed {d['seed']}); "
            f"{d['n_train']} training inputs on [{lo:g}, {hi:g}], {d['n_test']} test inputs"
        )
        return Data(x[:, None], y[:, None], x_test[:, None], f_test[:, None], y_test[:, None], desc)
    if gen == "diabetes":
        X_all, y_all, names, desc = _diabetes(cfg)
        return _split(cfg, X_all, y_all, None, None, desc, names)
    return _read_file(cfg)


def _data_error(cfg: Config, key: str, problem: str, fix: str) -> SpecError:
    return SpecError(f"{cfg.where_spec('data', key)}: {problem}. Fix: {fix}.")


def _diabetes(cfg: Config):
    d = cfg["data"]
    try:
        from sklearn.datasets import load_diabetes
    except ImportError:
        raise _data_error(
            cfg,
            "generator",
            'generator = "diabetes" needs scikit-learn, which is not installed',
            "pip install 'eft_prob[data]'",
        ) from None
    names = d["features"] or ["bmi", "bp", "s5"]
    unknown = [n for n in names if n not in _DIABETES_FEATURES]
    if unknown:
        raise _data_error(
            cfg,
            "features",
            f"{json.dumps(unknown[0])} is not a column of the diabetes data",
            "use some of " + ", ".join(_DIABETES_FEATURES),
        )
    bunch = load_diabetes(scaled=False)
    cols = [list(bunch.feature_names).index(n) for n in names]
    X = np.asarray(bunch.data, np.float64)[:, cols]
    y = np.asarray(bunch.target, np.float64)[:, None]
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean(0)) / y.std(0)
    desc = (
        f"scikit-learn diabetes data, features {', '.join(names)} and the disease-progression target, "
        f"standardized; {d['n_train']} training and {d['n_test']} held-out patients (rows shuffled, seed {d['seed']})"
    )
    return X, y, names, desc


def _read_file(cfg: Config) -> Data:
    d = cfg["data"]
    path = d["path"] if os.path.isabs(d["path"]) else os.path.join(cfg.base_dir, d["path"])
    shown = f"{d['path']} ({path})" if path != d["path"] else path
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".npz", ".csv"):
        raise _data_error(cfg, "path", f"{shown} is neither a .npz nor a .csv file", "convert the data to one of them")
    if not os.path.isfile(path):
        raise _data_error(
            cfg, "path", f"data file {shown} not found", "give the path relative to the spec file's directory"
        )
    X_test = y_test = None
    try:
        if ext == ".npz":
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("X", "y") if k not in z.files]
                if missing:
                    raise _data_error(
                        cfg, "path", f"{shown} has no array {missing[0]!r} (it has {z.files})", "store X and y"
                    )
                if ("X_test" in z.files) != ("y_test" in z.files):
                    raise _data_error(cfg, "path", f"{shown} has only one of X_test, y_test", "store both or neither")
                X, y = np.asarray(z["X"], np.float64), np.asarray(z["y"], np.float64)
                if "X_test" in z.files:
                    X_test, y_test = np.asarray(z["X_test"], np.float64), np.asarray(z["y_test"], np.float64)
            names = [f"x{j}" for j in range(X.shape[1] if X.ndim == 2 else 1)]
        else:
            with open(path, encoding="utf-8") as f:
                header = [h.strip() for h in f.readline().strip().split(",")]
            table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)
            if table.shape[1] != len(header):
                raise _data_error(
                    cfg, "path", f"{shown}: {len(header)} header names but {table.shape[1]} columns", "fix the header"
                )
            target = d["target"] or header[-1]
            if target not in header:
                raise _data_error(cfg, "target", f"{shown} has no column {target!r} (it has {header})", "name one")
            names = d["features"] or [h for h in header if h != target]
            unknown = [n for n in names if n not in header or n == target]
            if unknown:
                raise _data_error(
                    cfg,
                    "features",
                    f"{unknown[0]!r} is not an input column of {shown} (columns: {header})",
                    "use the header's names, other than the target",
                )
            X = table[:, [header.index(n) for n in names]]
            y = table[:, [header.index(target)]]
    except SpecError:
        raise
    except (OSError, ValueError) as e:
        raise _data_error(
            cfg, "path", f"cannot read {shown} ({e})", "pass a .npz with X and y, or a numeric .csv with a header row"
        ) from None
    desc = f"{shown}: {d['n_train']} training and {d['n_test']} test rows"
    return _split(cfg, X, y, X_test, y_test, desc, names)


def _split(cfg: Config, X, y, X_test, y_test, desc, names) -> Data:
    d, m = cfg["data"], cfg["model"]
    y = y[:, None] if y.ndim == 1 else y
    if y_test is not None and y_test.ndim == 1:
        y_test = y_test[:, None]
    for label, a in (("X", X), ("y", y), ("X_test", X_test), ("y_test", y_test)):
        if a is not None and (a.ndim != 2 or not np.all(np.isfinite(a))):
            raise _data_error(cfg, "generator", f"the data's {label} must be a finite 2-D array", "clean the data")
    if X.shape[0] != y.shape[0] or (X_test is not None and X_test.shape[0] != y_test.shape[0]):
        raise _data_error(cfg, "generator", "the data's inputs and targets have different numbers of rows", "fix it")
    if X.shape[1] != m["input_dim"]:
        raise SpecError(
            f"{cfg.where_spec('model', 'input_dim')} = {m['input_dim']} but the data have "
            f"{X.shape[1]} input columns ({', '.join(names)}). Fix: set input_dim = {X.shape[1]}."
        )
    if y.shape[1] != m["output_dim"]:
        raise SpecError(
            f"{cfg.where_spec('model', 'output_dim')} = {m['output_dim']} but the data have {y.shape[1]} target "
            f"column(s). Fix: set output_dim = {y.shape[1]}."
        )
    n_tr, n_te = d["n_train"], d["n_test"]
    if X_test is None:
        if n_tr + n_te > X.shape[0]:
            raise _data_error(
                cfg,
                "n_train",
                f"n_train + n_test = {n_tr + n_te} but the data have {X.shape[0]} rows",
                f"use n_train + n_test <= {X.shape[0]}",
            )
        order = np.random.default_rng(d["seed"]).permutation(X.shape[0])
        tr, te = order[:n_tr], order[n_tr : n_tr + n_te]
        X, y, X_test, y_test = X[tr], y[tr], X[te], y[te]
    else:
        if n_tr > X.shape[0] or n_te > X_test.shape[0]:
            raise _data_error(
                cfg,
                "n_train",
                f"n_train = {n_tr}, n_test = {n_te} but the file has {X.shape[0]} training and "
                f"{X_test.shape[0]} test rows",
                "lower them",
            )
        X, y, X_test, y_test = X[:n_tr], y[:n_tr], X_test[:n_te], y_test[:n_te]
    return Data(X, y, X_test, y_test, y_test, desc)


def _prediction_table(th: dict, data: Data) -> str:
    target = "sin(ωx)" if data.one_d and data.y_test is not data.f_test else "y_test"
    head = ["x" if data.one_d else "test point", target, "prior sd", "GD-trained mean ± sd", "Bayes mean ± sd"]
    body = []
    for a in range(data.X_test.shape[0]):
        for i in range(th["prior_variance"].shape[1]):
            body.append(
                [
                    f"{data.x_label(a):.4g}",
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

    def write(self, files: dict) -> list[str]:
        """Write every file to a temporary name in DIR, then rename them all: a failure leaves none.

        ``files``: name -> text, or name -> a function that writes the file at the path it is given.
        """
        temps = {}
        try:
            for name, content in files.items():
                fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{name}.", suffix=".tmp")
                temps[name] = tmp
                if callable(content):
                    os.close(fd)
                    content(tmp)
                else:
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        f.write(content)
            for name, tmp in temps.items():
                publish(tmp, os.path.join(self.path, name))
        except BaseException as e:
            for tmp in temps.values():
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if isinstance(e, OSError):
                raise SpecError(
                    f"--out {self.path}: writing the results failed ({e.strerror or e}). Fix: choose a "
                    "writable directory with free space."
                ) from None
            raise
        return [os.path.join(self.path, n) for n in files]


def _summary(cfg, data, th, res, verdict, sizes, smoke, log) -> dict:
    f = lambda a: [[_finite(v) for v in row] for row in np.asarray(a)]
    rows = res["rows"]
    zs = [abs(r[f"z_order{k}"]) for r in rows for k in (0, 1) if r[f"z_order{k}"] is not None]
    return {
        "eft_prob_version": __version__,
        "spec_file": cfg.source,
        "smoke": smoke,
        "spec": cfg.tables,
        "sizes": sizes,
        "model": {
            "description": cfg.spec.describe(),
            "widths": list(cfg.spec.widths),
            "depth": cfg.spec.depth,
            "aspect_ratio": cfg.spec.aspect_ratio,
        },
        "data": {
            "description": data.description,
            "X_train": f(data.X),
            "y_train": f(data.y),
            "X_test": f(data.X_test),
            "y_test": f(data.y_test),
        },
        "theory": {
            "stability_bound": th["stability_bound"],
            "learning_rate": th["learning_rate"],
            "steps": th["steps"],
            "ntk_train_eigenvalues": [_finite(v) for v in th["ntk_eigenvalues"]],
            "train_residual_rms": _finite(th["train_residual_rms"]),
            **{
                k: f(th[k])
                for k in ("prior_variance", "trained_mean", "trained_variance", "bayes_mean", "bayes_variance")
            },
            "unavailable": res["unavailable"],
        },
        "ensembles": res["facts"],
        "comparison": [{k: (_finite(v) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "max_abs_z": _finite(max(zs)) if zs else None,
        "verdict": verdict,
        "warnings": list(log.warnings),
        "timings_s": {k: round(v, 3) for k, v in log.timings.items()},
    }


def _markdown(summary: dict, rows: list[dict], predictions: str, runner) -> str:
    s = summary
    sz = s["sizes"]
    comps = s["spec"]["run"]["comparisons"]
    lines = [
        "# eft-prob run summary",
        "",
        f"- spec: `{s['spec_file']}`" + (" (smoke mode)" if s["smoke"] else ""),
        f"- model: {s['model']['description']}",
        f"- data: {s['data']['description']}",
        f"- comparisons: {', '.join(comps)}",
    ]
    if "initialization" in comps:
        lines.append(f"- prior ensemble: {sz['prior_networks']} networks")
    if "training" in comps:
        lines.append(
            f"- trained ensemble: {sz['training_networks']} networks, {sz['steps']} full-batch GD steps "
            f"(learning rate {s['theory']['learning_rate']:g}, stability bound {s['theory']['stability_bound']:.4g})"
        )
    if "bayes" in comps:
        nuts = s["ensembles"].get("nuts", {})
        lines.append(
            f"- NUTS: {sz['num_chains']} chain(s) × ({sz['num_warmup']} warmup + {sz['num_samples']}) draws, "
            f"{nuts.get('divergences', 0)} divergences"
        )
        lpd = s["ensembles"].get("log_predictive_density", {})
        if lpd:
            lines.append(
                "- held-out log predictive density log p(y_test): "
                + ", ".join(f"{k} {v:.4g}" for k, v in lpd.items() if v is not None)
            )
    lines += [
        "",
        "## Infinite-width predictions on the test inputs",
        "",
        "```",
        predictions,
        "```",
        "",
        "## Theory at order 0 and 1 vs samples, per test input",
        "",
        runner.table(rows, markdown=True),
        "",
        runner.LEGEND,
        "",
    ]
    for name, why in s["theory"]["unavailable"].items():
        lines.append(f"- n/a: `{name}`: {why}")
    if s["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in s["warnings"]]
    lines += ["", s["verdict"], ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Commands.


# ------------------------------------------------------------------------------------------------
# Progress and warnings.


class _Log:
    """The report on stdout; progress of the stages (with elapsed time) on stderr.  Library warnings
    are shown as notes, never raised."""

    def __init__(self, stream=None, progress=None):
        self.t0 = time.perf_counter()
        self.stream = stream or sys.stdout
        self.progress = progress or sys.stderr
        self.timings: dict[str, float] = {}
        self.warnings: list[str] = []

    def line(self, msg=""):
        print(msg, file=self.stream, flush=True)

    def detail(self, msg):
        print(" " * 10 + msg, file=self.progress, flush=True)

    def note(self, msg):
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", file=self.progress, flush=True)

    def warn(self, text):
        if text not in self.warnings:
            self.warnings.append(text)
            self.detail(f"warning: {text}")

    @contextlib.contextmanager
    def stage(self, name, msg):
        """Time a step; yields a list that receives the texts of the warnings raised inside."""
        start = time.perf_counter()
        print(f"[{start - self.t0:6.1f}s] {msg} ...", file=self.progress, flush=True)
        texts: list[str] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield texts
        except BaseException:
            print(f"{'':9}{msg}: failed", file=self.progress, flush=True)
            raise
        dt = time.perf_counter() - start
        self.timings[name] = self.timings.get(name, 0.0) + dt
        print(f"{'':9}done in {dt:.1f}s", file=self.progress, flush=True)
        for w in caught:
            text = " ".join(f"{w.category.__name__}: {w.message}".split())
            if text not in texts:
                texts.append(text)
            self.warn(text)

    def total(self):
        return time.perf_counter() - self.t0


def _np(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _finite(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# ------------------------------------------------------------------------------------------------
# The computation.


def _smoke_from_env() -> bool:
    return os.environ.get("EFT_PROB_SMOKE", "").strip().lower() in ("1", "true", "yes", "on")


def _chunk(cfg: Config, section: str):
    return cfg[section]["chunk_size"]  # None: the library's backend-aware default


def _sizes(cfg: Config, smoke: bool) -> dict:
    n = cfg["nuts"]
    s = {
        "prior_networks": cfg["prior"]["n_networks"],
        "training_networks": cfg["training"]["n_networks"],
        "steps": cfg["training"]["steps"],
        "num_chains": n["num_chains"],
        "num_warmup": n["num_warmup"],
        "num_samples": n["num_samples"],
        "theory_draws": cfg["run"]["theory_draws"],
    }
    if smoke:
        s = {k: min(v, SMOKE_CAPS[k]) for k, v in s.items()}
    return s


def _widths(cfg: Config) -> list[int | None]:
    """The sweep of [run] widths, or [None]: the spec's own hidden widths."""
    return list(cfg["run"]["widths"] or [None])


def _spec_at(cfg: Config, width: int | None) -> MLPSpec:
    return cfg.spec if width is None else cfg.spec.replace(hidden=(width,) * len(cfg.spec.hidden))


def _width_label(spec: MLPSpec) -> int:
    return min(spec.hidden) if spec.hidden else 0


def _header(log: _Log, cfg: Config, data: Data, sizes: dict, smoke: bool):
    r = cfg["run"]
    log.line(f"spec: {cfg.source}")
    log.line(f"model: {cfg.spec.describe()}")
    log.line(f"data: {data.description}")
    if sizes:
        log.line(
            "comparisons: "
            + ", ".join(r["comparisons"])
            + (f"; hidden widths swept over {r['widths']}" if r["widths"] else "")
        )
    if smoke:
        comps, parts = r["comparisons"], []
        if "initialization" in comps:
            parts.append(f"{sizes['prior_networks']} prior networks")
        if "training" in comps:
            parts.append(f"{sizes['training_networks']} trained networks, {sizes['steps']} GD steps")
        if "bayes" in comps:
            parts.append(f"NUTS {sizes['num_chains']}×({sizes['num_warmup']} + {sizes['num_samples']})")
        parts.append(f"{sizes['theory_draws']} theory draws")
        log.line("smoke mode (--smoke or EFT_PROB_SMOKE=1): " + ", ".join(parts))


def _theory(log: _Log, cfg: Config, data: Data, steps: int, strict: bool = True) -> dict:
    """Infinite-width predictions on the test inputs (THEORY.md §3, §5.1, §8).

    ``strict``: a learning rate at or above the GD stability bound is an error (training runs).
    """
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
    if strict and not lr < bound:
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
    stable = lr < bound
    with log.stage(
        "theory_distributions",
        f"theory: prior N(0, K), GD-trained p(f) after {steps} steps, Bayesian posterior (noise_var {noise_var:g})",
    ):
        prior = NetworkPrior(spec, data.X_test)
        bayes = BayesianPosterior(spec, data.X, data.y, data.X_test, noise_var)
        nan = np.full(data.X_test.shape[:1] + (spec.output_dim,), np.nan)
        out = {
            "prior_variance": _np(prior.variance),
            "trained_mean": nan,
            "trained_variance": nan,
            "bayes_mean": _np(bayes.mean),
            "bayes_variance": _np(bayes.variance),
        }
        resid = float("nan")
        if stable:  # the trained law of a diverging GD is meaningless
            trained = TrainedNetwork(spec, data.X, data.y, data.X_test, lr, steps)
            out.update(trained_mean=_np(trained.mean), trained_variance=_np(trained.variance))
            # Expected training residual after `steps` steps: the trained distribution on the training inputs.
            m_tr, S_tr = gd_moments(K[:nA, :nA], K[:nA, :nA], K[:nA, :nA], T_AA, T_AA, data.y, lr, steps)
            resid = float(np.sqrt(np.mean((_np(m_tr) - data.y) ** 2 + np.diag(_np(S_tr))[:, None])))
    if stable:
        log.detail(f"expected training residual after {steps} steps (infinite width): rms {resid:.2g}")
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


def _load_runner():
    try:
        from . import runner
    except ImportError as e:
        raise SpecError(
            f"eft-prob run needs ArviZ, xarray and matplotlib ({e}). Fix: pip install 'eft_prob[arviz]'."
        ) from None
    return runner


def _run_stage(log: _Log, ck, name: str, msg: str, compute):
    """One checkpointed stage: ``compute()`` -> (groups, info); loaded instead when --resume finds it."""
    hit = ck.load(name) if ck is not None else None
    if jax.process_count() > 1:  # eft-prob run --distributed: every process follows process 0's checkpoints
        hit = _from_lead(hit)
    if hit is not None:
        groups, info = hit
        log.note(f"{msg}: resumed from checkpoint {name} (skipped)")
        for text in info.get("warnings", []):
            log.warn(text)
        return groups, info
    with log.stage(name, msg) as texts:
        groups, info = compute()
    info = {**info, "warnings": texts}
    if ck is not None:
        ck.save(name, groups, info)
    return groups, info


def _stages(log: _Log, cfg: Config, data: Data, sizes: dict, th: dict, ck, runner) -> dict:
    """Run (or resume) every stage the spec asks for; returns groups, rows, notes and facts."""
    comps = cfg["run"]["comparisons"]
    lr, steps, draws = cfg["training"]["learning_rate"], sizes["steps"], sizes["theory_draws"]
    sweep = cfg["run"]["widths"] is not None
    progress = runner.stderr_is_tty() and jax.process_index() == 0
    groups: dict = {}
    reasons: dict = {}
    rows: list = []
    facts: dict = {"trained": {}}
    for width in _widths(cfg) if ("initialization" in comps or "training" in comps) else []:
        spec = _spec_at(cfg, width)
        n = _width_label(spec)
        sfx = f"_n{width}" if sweep else ""
        at = f" (hidden width {width})" if sweep else ""
        mine: dict = {}
        if "initialization" in comps:

            def prior_theory(spec=spec):
                key = jax.random.key(cfg["prior"]["seed"] + 1000)
                g = runner.prior_theory(spec, data.X_test, key, draws)
                return {"prior_theory_order0": g["order0"], "prior_theory_order1": g["order1"]}, {}

            g, _ = _run_stage(
                log, ck, "prior_theory" + sfx, f"theory: prior at order 0 and 1 on each test input{at}", prior_theory
            )
            mine.update(g)
            Mp = sizes["prior_networks"]
            g, _ = _run_stage(
                log,
                ck,
                "prior_ensemble" + sfx,
                f"simulation: {Mp} networks drawn from the prior{at}",
                lambda spec=spec, Mp=Mp: (
                    {
                        "prior_ensemble": runner.prior_ensemble(
                            spec, data.X_test, Mp, cfg["prior"]["seed"], _chunk(cfg, "prior")
                        )
                    },
                    {},
                ),
            )
            mine.update(g)
        if "training" in comps:
            part = ck.partial_file("trained_theory" + sfx) if ck is not None else None

            def trained_theory(spec=spec, part=part):
                key = jax.random.key(cfg["training"]["seed"] + 1000)
                g, why = runner.trained_theory(
                    spec, data.X, data.y, data.X_test, lr, steps, key, draws, checkpoint=part, progress=progress
                )
                return {f"trained_theory_{k}": v for k, v in g.items()}, {
                    "unavailable": {f"trained_theory_{k}": v for k, v in why.items()}
                }

            g, info = _run_stage(
                log,
                ck,
                "trained_theory" + sfx,
                f"theory: GD-trained outputs after {steps} steps at order 0 and 1{at}",
                trained_theory,
            )
            mine.update(g)
            reasons.update({k + sfx: v for k, v in info["unavailable"].items()})
            for k, v in info["unavailable"].items():
                log.detail(f"note: {k} not available: {v}")
            Mt = sizes["training_networks"]
            stage = "trained_ensemble" + sfx
            train_ck = ck.train_dir(stage) if ck is not None else None

            def trained_ensemble(spec=spec, Mt=Mt, train_ck=train_ck):
                g = runner.trained_ensemble(
                    spec,
                    data,
                    Mt,
                    lr,
                    steps,
                    cfg["training"]["seed"],
                    _chunk(cfg, "training"),
                    train_ck,
                    progress,
                )
                return {"trained_ensemble": g}, {}

            g, _ = _run_stage(
                log,
                ck,
                stage,
                f"simulation: {Mt} networks trained by full-batch GD, {steps} steps each{at}",
                trained_ensemble,
            )
            mine.update(g)
            ens = g["trained_ensemble"]
            resid = _np(ens["train_residual"].values)
            diverged = int(ens.attrs["diverged"])
            facts["trained"][n] = {
                "diverged": diverged,
                "train_residual_max": _finite(resid.max()) if resid.size else None,
                "train_residual_median": _finite(np.median(resid)) if resid.size else None,
            }
            if resid.size:
                log.detail(
                    f"training residual max|f(x) - y| per network: median {np.median(resid):.2g}, "
                    f"worst {np.max(resid):.2g}" + (f"; {diverged} networks diverged (dropped)" if diverged else "")
                )
            if resid.size < 2:
                raise SpecError(
                    f"{cfg.where('training', 'learning_rate')} = {lr:g}: fewer than two of the {Mt} trained "
                    "networks stayed finite (finite-width NTKs exceed the infinite-width bound). Fix: lower the "
                    "learning rate."
                )
        local_reasons = {k: v for k, v in reasons.items() if k.endswith(sfx)}
        rows += runner.compare_ensembles(
            data,
            n,
            th["prior_variance"],
            mine,
            {k[: len(k) - len(sfx)] if sfx else k: v for k, v in local_reasons.items()},
        )
        groups.update({k + sfx: v for k, v in mine.items()})

    if "bayes" in comps:
        from .compare import log_predictive_density

        noise_var = cfg["bayes"]["noise_var"]

        def bayes_theory():
            key = jax.random.key(cfg["nuts"]["seed"] + 1000)
            g, why, lpd = runner.bayes_theory(cfg.spec, data.X, data.y, data.X_test, noise_var, key, draws, data.y_test)
            return {f"bayes_theory_{k}": v for k, v in g.items()}, {
                "unavailable": {f"bayes_theory_{k}": v for k, v in why.items()},
                "lpd": {f"bayes_theory_{k}": v for k, v in lpd.items()},
            }

        g, info = _run_stage(
            log,
            ck,
            "bayes_theory",
            f"theory: Bayesian posterior at order 0 and 1 (noise_var {noise_var:g})",
            bayes_theory,
        )
        groups.update(g)
        reasons.update(info["unavailable"])
        lpd_theory = info["lpd"]
        for k, v in info["unavailable"].items():
            log.detail(f"note: {k} not available: {v}")
        nuts_cfg = {
            **{k: sizes[k] for k in ("num_chains", "num_warmup", "num_samples")},
            "seed": cfg["nuts"]["seed"],
            "target_accept": cfg["nuts"]["target_accept"],
        }
        g, _ = _run_stage(
            log,
            ck,
            "nuts",
            f"simulation: NUTS posterior of the network, {nuts_cfg['num_chains']} chain(s) × "
            f"({nuts_cfg['num_warmup']} warmup + {nuts_cfg['num_samples']}) draws",
            lambda: (runner.nuts(cfg.spec, data, noise_var, nuts_cfg, progress), {}),
        )
        groups.update(g)
        names = ["bayes_theory_order0", "bayes_theory_order1" if "bayes_theory_order1" in groups else None]
        idata = runner.as_idata({k: v for k, v in groups.items() if k in g or k in names})
        rows += runner.compare_nuts(data, _width_label(cfg.spec), th["prior_variance"], idata, names, reasons)
        post = g["posterior"]
        facts["nuts"] = {
            "divergences": int(np.asarray(g["sample_stats"]["diverging"].values).sum()),
            "sampling_time_s": _finite(post.attrs.get("sampling_time_s", float("nan"))),
            "chain_method": str(post.attrs.get("chain_method", "")),
        }
        facts["log_predictive_density"] = {
            "nuts": _finite(log_predictive_density(idata, data.y_test, noise_var=noise_var)),
            **{k: _finite(v) for k, v in lpd_theory.items()},
        }
    return {"groups": groups, "rows": rows, "unavailable": reasons, "facts": facts}


def _cmd_theory(args, log: _Log) -> int:
    cfg = load_spec(args.spec)
    enable_x64()
    data = make_data(cfg)
    steps = cfg["training"]["steps"]
    _header(log, cfg, data, {}, False)
    th = _theory(log, cfg, data, steps, strict=False)
    log.line()
    log.line("Infinite-width predictions on the test inputs:")
    log.line(_prediction_table(th, data))
    if not cfg["training"]["learning_rate"] < th["stability_bound"]:
        log.line(
            f"note: learning_rate = {cfg['training']['learning_rate']:g} is at or above the GD stability bound "
            f"{th['stability_bound']:.4g}: `eft-prob run` would refuse it."
        )
    log.line(f"total {log.total():.1f}s")
    return 0


def _fingerprint_payload(cfg: Config, data: Data, sizes: dict) -> dict:
    import hashlib

    h = hashlib.sha256()
    for a in (data.X, data.y, data.X_test, data.y_test):
        h.update(np.ascontiguousarray(a, np.float64).tobytes())
    return {
        **{s: cfg.tables[s] for s in cfg.tables},
        "sizes": sizes,
        "data_sha256": h.hexdigest()[:16],
        "eft_prob_version": __version__,
    }


def _connect(args) -> tuple[int, int]:
    """jax.distributed for --distributed / --coordinator: (process index, count).  Without them, JAX's
    own (0, 1 unless the calling program already connected the processes)."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(v is None for v in explicit):
        return jax.process_index(), jax.process_count()
    from . import distributed

    flags = "--coordinator HOST:PORT --num-processes P --process-id I"
    try:
        if any(v is not None for v in explicit):
            if not all(v is not None for v in explicit):
                raise ValueError(f"pass {flags} together")
            return distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        return distributed.initialize()
    except (ValueError, RuntimeError) as e:
        raise SpecError(
            f"--distributed: cannot connect the processes ({' '.join(str(e).split())}). Fix: pass {flags} "
            "(the same coordinator and count on every process), or run under SLURM / Open MPI."
        ) from None


def _from_lead(obj):
    """Process 0's ``obj`` on every process (pickled; a collective)."""
    import pickle

    from .distributed import _allgather

    data = pickle.dumps(obj) if jax.process_index() == 0 else b""
    with jax.enable_x64(True):
        sizes = _allgather(np.array([len(data)], np.int64))
    buf = np.zeros(int(sizes[0, 0]), np.uint8)
    if data:
        buf[:] = np.frombuffer(data, np.uint8)
    everyone = _allgather(buf)
    return pickle.loads(everyone[0].tobytes())


def _on_lead(fn):
    """``fn()`` on process 0 (None on the others); with several processes a failure there stops every
    process (SpecError quoting it) instead of leaving them waiting in the next collective."""
    if jax.process_count() == 1:
        return fn()
    from .distributed import _run_everywhere

    try:
        return _run_everywhere(lambda: fn() if jax.process_index() == 0 else None)
    except RuntimeError as e:
        if jax.process_index() == 0:
            raise
        raise SpecError(str(e)) from None


def _cmd_run(args, log: _Log) -> int:
    index, count = _connect(args)  # before any JAX computation
    if index:  # process 0 reports and writes; the others compute their parts quietly
        quiet = open(os.devnull, "w")  # for the life of the process
        log = _Log(stream=quiet, progress=quiet)
    cfg = load_spec(args.spec)
    smoke = bool(args.smoke) or _smoke_from_env()
    sizes = _sizes(cfg, smoke)
    comps = cfg["run"]["comparisons"]
    for section, key, size, used in (
        ("prior", "n_networks", "prior_networks", "initialization" in comps),
        ("training", "n_networks", "training_networks", "training" in comps),
        ("nuts", "num_chains", "num_chains", "bayes" in comps),
    ):
        if used and sizes[size] < count:  # every process needs a network or chain of its own
            raise SpecError(
                f"{cfg.where_spec(section, key)} = {sizes[size]}{' (--smoke)' if smoke else ''} is fewer than the "
                f"{count} processes. Fix: raise it to at least {count}, or run fewer processes."
            )
    if args.check:
        data = make_data(cfg)
        _header(log, cfg, data, sizes, smoke)
        log.line(f"spec OK: {cfg.source} is valid; nothing was computed (drop --check to run it).")
        return 0
    if args.resume and not args.out:
        raise SpecError("--resume needs --out DIR (the directory of the interrupted run). Fix: add --out DIR.")
    runner = _load_runner()
    out = _on_lead(lambda: _OutDir(args.out) if args.out else None)
    ck = None
    try:
        enable_x64()
        data = make_data(cfg)
        _header(log, cfg, data, sizes, smoke)
        th = _theory(log, cfg, data, sizes["steps"], strict="training" in cfg["run"]["comparisons"])

        def checkpoints():
            if not out:
                return None
            payload = _fingerprint_payload(cfg, data, sizes)
            try:
                return runner.Checkpoints(out.path, runner.fingerprint(payload), payload, bool(args.resume))
            except runner.StageError as e:
                raise SpecError(str(e)) from None
            except OSError as e:
                raise SpecError(
                    f"--out {out.path}: cannot write checkpoints ({e.strerror or e}). Fix: choose a writable directory."
                ) from None

        ck = _on_lead(checkpoints)
        res = _stages(log, cfg, data, sizes, th, ck, runner)
        rows = res["rows"]
        verdict = runner.verdict(rows, cfg.spec.aspect_ratio)
        log.line()
        log.line("Infinite-width predictions on the test inputs:")
        log.line(_prediction_table(th, data))
        log.line()
        log.line("Theory (order 0: infinite width; order 1: with the 1/n corrections) vs samples, per test input:")
        log.line(runner.table(rows))
        log.line(runner.LEGEND)
        for name, why in res["unavailable"].items():
            log.line(f"n/a: {name}: {why}")
        if "log_predictive_density" in res["facts"]:
            lpd = res["facts"]["log_predictive_density"]
            log.line(
                "held-out log predictive density log p(y_test): "
                + ", ".join(f"{k} {v:.4g}" for k, v in lpd.items() if v is not None)
            )
        log.line(verdict)
        if out:
            summary = _summary(cfg, data, th, res, verdict, sizes, smoke, log)
            with log.stage("outputs", f"writing results.nc, summary.json, summary.md and plots to {out.path}"):
                paths = _write_outputs(out, runner, cfg, data, res, summary, _prediction_table(th, data))
            log.line("wrote " + ", ".join(paths))
    except SpecError:
        if ck is not None and ck.created:
            ck.remove()
        if out:
            out.cleanup()
        raise
    except BaseException:
        if ck is not None and os.path.isdir(ck.path) and len(os.listdir(ck.path)) > 1:
            print(
                f"eft-prob: the finished stages are saved in {ck.path}; rerun with --resume --out {out.path} "
                "to continue",
                file=sys.stderr,
                flush=True,
            )
        else:
            if ck is not None:
                ck.remove()
            if out:
                out.cleanup()
        raise
    log.line(f"total {log.total():.1f}s")
    return 0


def _write_outputs(out, runner, cfg, data, res, summary, predictions) -> list[str]:
    groups, rows = res["groups"], res["rows"]
    files = {}
    attrs = {
        "eft_prob_version": __version__,
        "spec_file": cfg.source,
        "spec": json.dumps(cfg.tables),
        "smoke": int(summary["smoke"]),
        "created_by": "eft-prob run",
    }
    files["results.nc"] = lambda tmp: runner.write_idata(tmp, groups, attrs)
    files["summary.json"] = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    files["summary.md"] = _markdown(summary, rows, predictions, runner)
    panels = _density_panels(cfg, groups)
    if panels:
        files["densities.png"] = lambda tmp: runner.plot_densities(tmp, data, panels)
    if "posterior" in groups:
        idata = runner.as_idata({k: groups[k] for k in groups if k in runner.NUTS_GROUPS})
        files["ppc.png"] = lambda tmp: runner.plot_ppc(tmp, idata)
    if cfg["run"]["widths"] is not None and len(cfg["run"]["widths"]) > 1:
        files["scaling.png"] = lambda tmp: runner.plot_scaling(tmp, rows)
    return out.write(files)


def _density_panels(cfg: Config, groups: dict) -> list:
    """(title, sample label, sample group, {label: theory group}) per comparison, at the first width."""
    w = _widths(cfg)[0]
    sfx = f"_n{w}" if cfg["run"]["widths"] is not None else ""
    n = _width_label(_spec_at(cfg, w))
    panels = []
    for title, samples, label, theory in (
        (f"prior, n={n}", "prior_ensemble", "networks at init", "prior_theory"),
        (f"trained, n={n}", "trained_ensemble", "trained networks", "trained_theory"),
    ):
        if samples + sfx in groups:
            th = {
                f"order {k}": groups[f"{theory}_order{k}{sfx}"] for k in (0, 1) if f"{theory}_order{k}{sfx}" in groups
            }
            panels.append((title, label, groups[samples + sfx], th))
    if "posterior" in groups:
        n = _width_label(cfg.spec)
        th = {f"order {k}": groups[f"bayes_theory_order{k}"] for k in (0, 1) if f"bayes_theory_order{k}" in groups}
        panels.append((f"posterior, n={n}", "NUTS", groups["posterior"], th))
    return panels


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
    "lambda_b, lambda_W); [run] comparisons, an optional widths sweep, theory_draws; [data] the data "
    "(generator sine, diabetes or file); [prior] and [training] ensemble sizes, seeds, learning rate "
    "and steps; [bayes] noise_var; [nuts] chains, warmup, draws, seed. Keys left out take the "
    "default's values. More examples: models/*.toml."
)

_DESCRIPTION = """\
Compare the effective theory of deep MLPs (Roberts & Yaida, "The Principles of Deep Learning
Theory") with real networks.  For a network and a regression data set described by a TOML spec,
eft-prob computes the distribution of the network output f(x) on every test input

  * at initialization (the prior),
  * after full-batch gradient descent (trained networks),
  * under Bayesian inference (the posterior),

both at infinite width (order 0: Gaussian, from the NNGP kernel K and the neural tangent kernel Θ)
and with the 1/n corrections of a finite width n (order 1), and checks them against networks drawn
from the prior, networks actually trained, and a NUTS posterior of the finite network."""

_EPILOG = """\
examples:
  eft-prob run                          the default spec (models/default.toml): ~1-2 min on 2 CPU cores
  eft-prob run --smoke --out out/       small sizes, ~30 s (mostly compilation); writes out/results.nc,
                                        out/summary.{json,md} and out/*.png
  eft-prob run models/bayesian.toml --out bayes/     NUTS posterior vs the posterior theory
  eft-prob run models/training.toml --out sweep/     a width sweep with the 1/n scaling plot
  eft-prob run my.toml --check          validate a spec, compute nothing
  eft-prob theory models/my.toml        the infinite-width predictions of a spec, no simulation
  eft-prob criticality tanh             universality class and critical initialization

exit status: 0 success, 2 a problem with the spec, the command line or the output directory
(one line on stderr names the file, the key and the fix), 130 interrupted.
"""

_RUN_DESCRIPTION = """\
Theory, simulation and comparison for one spec ([run] comparisons picks the parts):

  1. theory (float64): NNGP kernel K and NTK Θ on the training and test inputs, the GD stability
     bound 2/λ_max(Θ̃) (the learning rate must be below it); then, at order 0 (infinite width)
     and order 1 (O(1/n), at the spec's width):
       initialization  NetworkPrior(spec, X, order): variance and fourth cumulant of f(x);
       training        TrainedNetwork(..., learning_rate, steps, order): mean and variance of the
                       trained f(x) (order 1 needs a smooth activation; otherwise reported n/a);
       bayes           BayesianPosterior(..., noise_var, order): posterior mean and variance;
  2. simulation: [prior] n_networks networks drawn at initialization; [training] n_networks
     networks trained by full-batch GD (learning rates η·λ_b and η·λ_W/fan-in) on ½Σ(f − y)²;
     a NUTS posterior over the weights ([nuts]);
  3. comparison on each test input: theory at order 0 and 1, the sample estimate ± standard error,
     and the z-score against each order, then a verdict.  At finite width the order-0 theory is
     off by O(L/n) (depth over width); order 1 should remove most of that.

With --out DIR the run writes (each file atomically; nothing partial is left on failure):
  results.nc     one ArviZ InferenceData (netCDF): groups prior_ensemble, trained_ensemble,
                 posterior, ... (samples) and prior_theory_order0/1, trained_theory_order0/1,
                 bayes_theory_order0/1 (draws, moments, marginal densities); open it with
                 arviz.from_netcdf (arviz 0.23) or xarray.open_datatree (arviz 1.x)
  summary.json   every number of the comparison table, the theory, warnings, timings
  summary.md     the same as a readable report
  densities.png  histograms of the samples vs the theory's densities at a few test inputs
  ppc.png        posterior predictive check of the NUTS posterior (when "bayes" runs)
  scaling.png    the error of order 0 and 1 against 1/n (when [run] widths sweeps >= 2 widths)
Finished stages are checkpointed in DIR/.eft_prob_checkpoints; after an interruption, --resume
continues from them (a changed spec is refused).  The directory can be deleted afterwards."""

_RUN_EPILOG = """\
examples:
  eft-prob run --smoke --out /tmp/eft       quick check of the installation
  eft-prob run models/relu.toml --out relu  ReLU: 1/n corrections to the prior's kurtosis
  eft-prob run models/training.toml --out sweep --resume    continue an interrupted run
  srun -N 4 eft-prob run models/bayesian.toml --out bayes --distributed    one run on 4 hosts

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
        help="theory at order 0 and 1 + simulated networks (prior, trained, NUTS) + comparison",
        description=_RUN_DESCRIPTION,
        epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("spec", nargs="?", metavar="SPEC", help=_SPEC_HELP)
    run.add_argument(
        "--out",
        metavar="DIR",
        help="write results.nc, summary.json, summary.md and PNG plots to DIR (created if needed)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out DIR: finished stages are loaded, not recomputed",
    )
    run.add_argument(
        "--smoke",
        action="store_true",
        help=f"small sizes ({SMOKE_CAPS['prior_networks']} prior and {SMOKE_CAPS['training_networks']} "
        f"trained networks, at most {SMOKE_CAPS['steps']} GD steps, {SMOKE_CAPS['num_chains']} short NUTS "
        "chain) for a check in well under a minute (also EFT_PROB_SMOKE=1)",
    )
    run.add_argument("--check", action="store_true", help="validate SPEC (and its data) and exit; computes nothing")
    dist = run.add_argument_group(
        "several processes (hosts)",
        "run one copy of the same command per host (or per GPU): the ensembles, the NUTS chains and the "
        "trained O(1/n) marginals are split across the processes (eft_prob.distributed) and gathered; "
        "process 0 prints the report and writes --out (with --resume, process 0's checkpoints decide "
        "which stages are loaded, and every process receives them)",
    )
    dist.add_argument(
        "--distributed",
        action="store_true",
        help="connect through jax.distributed with the cluster detected (SLURM, Open MPI)",
    )
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's host and a free port (with the next two)")
    dist.add_argument("--num-processes", type=int, metavar="P", help="number of processes")
    dist.add_argument("--process-id", type=int, metavar="I", help="this process's index in [0, P)")
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
    except (SpecError, MemoryLimitError) as e:  # MemoryLimitError: raised before any work, sizes in the message
        print(f"eft-prob: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("eft-prob: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
