"""The ``eft-prob`` command line, run in-process through ``eft_prob.cli.main``."""

import importlib.resources
import json
import math
import os
import pathlib

import jax

jax.config.update("jax_enable_x64", True)  # as tests/conftest.py does; harmless if it already has

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from eft_prob import cli  # noqa: E402
from eft_prob.theory import kernels  # noqa: E402
from eft_prob.theory.training import gd_moments, stability_bound  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def _write(tmp_path, text, name="spec.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _one_line_error(capsys):
    """The one error line on stderr (progress lines of the stages before it may precede it)."""
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.startswith("eft-prob:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("eft-prob: error: ")
    assert "Traceback" not in err and "Fix:" in lines[0]
    return lines[0]


# -- the default run ------------------------------------------------------------------------------


def _open_results(path):
    from eft_prob import _arviz, runner

    idata = runner.read_idata(str(path))
    return idata, set(_arviz.group_names(idata)), _arviz


@pytest.mark.slow
def test_default_run_smoke_writes_results_and_resumes(tmp_path, capsys):
    """Smoke run of the packaged default: results.nc (groups), summary.json/md, densities.png; a rerun
    with --resume skips every stage and reproduces the numbers; a changed spec is refused."""
    out = tmp_path / "results" / "run1"  # parents are created
    assert cli.main(["run", "--smoke", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "verdict:" in cap.out and "order 0" in cap.out and "z₁" in cap.out
    assert "theory: NNGP kernel" in cap.err and "simulation:" in cap.err  # progress on stderr
    assert sorted(p for p in os.listdir(out) if not p.startswith(".")) == [
        "densities.png",
        "results.nc",
        "summary.json",
        "summary.md",
    ]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]  # no temporary files left
    assert (out / "densities.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    idata, groups, _arviz = _open_results(out / "results.nc")
    expected = {
        "prior_ensemble",
        "trained_ensemble",
        "prior_theory_order0",
        "prior_theory_order1",
        "trained_theory_order0",
        "trained_theory_order1",
    }
    assert groups == expected
    prior = _arviz.get_group(idata, "prior_ensemble")
    assert prior["f_test"].shape == (1, cli.SMOKE_CAPS["prior_networks"], 4, 1)
    t1 = _arviz.get_group(idata, "prior_theory_order1")
    assert t1.attrs["eft_prob_theory"] == 1 and "fourth_cumulant" in t1
    assert np.all(t1["fourth_cumulant"].values > 0)  # tanh: positive excess kurtosis at O(1/n)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] is True and summary["theory"]["unavailable"] == {}
    rows = summary["comparison"]
    n_test = summary["spec"]["data"]["n_test"]
    kinds = {(r["comparison"], r["quantity"]) for r in rows}
    assert kinds == {
        ("initialization", "mean"),
        ("initialization", "variance"),
        ("initialization", "fourth cumulant"),
        ("training", "mean"),
        ("training", "variance"),
    }
    assert len(rows) == 5 * n_test
    for r in rows:
        for k in ("theory_order0", "theory_order1", "estimate", "stderr", "z_order0", "z_order1"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (k, r)
        for k in (0, 1):
            se = max(r["stderr"], 1e-8 * r["scale"])
            assert r[f"z_order{k}"] == pytest.approx((r["estimate"] - r[f"theory_order{k}"]) / se)
    # the theory groups carry the same numbers as the table
    var1 = [r["theory_order1"] for r in rows if r["comparison"] == "initialization" and r["quantity"] == "variance"]
    np.testing.assert_allclose(var1, t1["variance"].values[:, 0], rtol=1e-12)
    md = (out / "summary.md").read_text()
    assert "| comparison |" in md and summary["verdict"] in md

    # --resume: every stage is loaded from its checkpoint, the numbers are identical
    mtime = (out / ".eft_prob_checkpoints" / "prior_ensemble.nc").stat().st_mtime_ns
    assert cli.main(["run", "--smoke", "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    for stage in ("prior_theory", "prior_ensemble", "trained_theory", "trained_ensemble"):
        assert f"resumed from checkpoint {stage} (skipped)" in err
    assert (out / ".eft_prob_checkpoints" / "prior_ensemble.nc").stat().st_mtime_ns == mtime
    again = json.loads((out / "summary.json").read_text())
    assert again["comparison"] == rows

    # a changed spec is refused on --resume, naming the change, and the run is left as it was
    spec = _write(tmp_path, "[training]\nsteps = 50\n")
    assert cli.main(["run", spec, "--smoke", "--out", str(out), "--resume"]) == 2
    line = _one_line_error(capsys)
    assert "--resume" in line and "[training] steps" in line and "different spec" in line
    assert json.loads((out / "summary.json").read_text())["comparison"] == rows


@pytest.mark.slow
def test_bayesian_spec_smoke_runs_nuts_and_writes_ppc(tmp_path, capsys):
    """models/bayesian.toml in smoke mode, the NUTS part only (the prior part is tested above)."""
    text = (REPO / "models" / "bayesian.toml").read_text()
    assert 'comparisons = ["bayes", "initialization"]' in text
    text = text.replace('comparisons = ["bayes", "initialization"]', 'comparisons = ["bayes"]')
    text = text.replace("n_train = 6", "n_train = 4").replace("n_test = 4", "n_test = 2")  # a smaller mixture
    spec = _write(tmp_path, text)
    out = tmp_path / "bayes"
    assert cli.main(["run", spec, "--smoke", "--out", str(out)]) == 0
    capsys.readouterr()
    files = sorted(p for p in os.listdir(out) if not p.startswith("."))
    assert files == ["densities.png", "ppc.png", "results.nc", "summary.json", "summary.md"]
    idata, groups, _arviz = _open_results(out / "results.nc")
    assert {"posterior", "posterior_predictive", "sample_stats", "observed_data"} <= groups
    assert {"bayes_theory_order0", "bayes_theory_order1"} <= groups and "prior_ensemble" not in groups
    summary = json.loads((out / "summary.json").read_text())
    bayes = [r for r in summary["comparison"] if r["comparison"] == "bayes"]
    assert len(bayes) == 2 * summary["spec"]["data"]["n_test"]
    assert all(r["theory_order1"] is not None for r in bayes)
    lpd = summary["ensembles"]["log_predictive_density"]
    assert set(lpd) == {"nuts", "bayes_theory_order0", "bayes_theory_order1"}
    assert all(math.isfinite(v) for v in lpd.values())


def test_theory_subcommand(capsys):
    assert cli.main(["theory"]) == 0
    cap = capsys.readouterr()
    assert "GD stability bound" in cap.err
    assert "GD-trained mean" in cap.out and "Bayes mean" in cap.out
    assert "simulation:" not in cap.out + cap.err


@pytest.mark.parametrize("name", ["default", "relu", "bayesian", "training", "diabetes"])
def test_models_validate(name, capsys):
    """Every spec under models/ loads (data included) and passes `eft-prob run --check`."""
    path = str(REPO / "models" / f"{name}.toml")
    cfg = cli.load_spec(path)
    data = cli.make_data(cfg)
    assert data.X.shape == (cfg["data"]["n_train"], cfg.spec.input_dim)
    assert data.X_test.shape == (cfg["data"]["n_test"], cfg.spec.input_dim)
    assert data.y_test.shape == (cfg["data"]["n_test"], cfg.spec.output_dim)
    assert cli.main(["run", path, "--check"]) == 0
    assert "spec OK" in capsys.readouterr().out


def test_models_training_stable_and_sweeps():
    """The specs that train use a learning rate below the GD stability bound; training.toml sweeps."""
    for name in ("default", "relu", "training", "diabetes"):
        cfg = cli.load_spec(str(REPO / "models" / f"{name}.toml"))
        data = cli.make_data(cfg)
        bound = float(stability_bound(kernels(cfg.spec, data.X).ntk[-1]))
        assert cfg["training"]["learning_rate"] < 0.6 * bound, name
    assert cli.load_spec(str(REPO / "models" / "training.toml"))["run"]["widths"] == [32, 64, 128]
    assert "bayes" in cli.load_spec(str(REPO / "models" / "bayesian.toml"))["run"]["comparisons"]


def test_diabetes_data_is_standardized_subset():
    cfg = cli.load_spec(str(REPO / "models" / "diabetes.toml"))
    data = cli.make_data(cfg)
    from sklearn.datasets import load_diabetes

    raw = load_diabetes(scaled=False)
    cols = [list(raw.feature_names).index(n) for n in cfg["data"]["features"]]
    Z = (raw.data[:, cols] - raw.data[:, cols].mean(0)) / raw.data[:, cols].std(0)
    # every training and test row is a standardized row of the data set, none shared between the two
    rows = [int(np.argmin(np.abs(Z - x).sum(1))) for x in np.concatenate([data.X, data.X_test])]
    np.testing.assert_allclose(Z[rows], np.concatenate([data.X, data.X_test]), atol=1e-12)
    assert len(set(rows)) == len(rows)
    yz = (raw.target - raw.target.mean()) / raw.target.std()
    np.testing.assert_allclose(yz[rows], np.concatenate([data.y, data.y_test])[:, 0], atol=1e-12)


def test_diabetes_without_scikit_learn_names_the_extra(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    path = str(REPO / "models" / "diabetes.toml")
    assert cli.main(["run", path, "--check"]) == 2
    line = _one_line_error(capsys)
    assert "pip install 'eft_prob[data]'" in line and "[data] generator" in line


def test_data_from_npz_and_csv_relative_to_the_spec(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((10, 2)), rng.standard_normal((10, 1))
    (tmp_path / "sub").mkdir()
    np.savez(tmp_path / "sub" / "d.npz", X=X, y=y, X_test=X[:3] + 1, y_test=y[:3])
    model = "[model]\ninput_dim = 2\n"
    spec = _write(tmp_path, model + '[data]\ngenerator = "file"\npath = "sub/d.npz"\nn_train = 6\nn_test = 2\n')
    data = cli.make_data(cli.load_spec(spec))
    np.testing.assert_array_equal(data.X, X[:6])
    np.testing.assert_array_equal(data.X_test, X[:2] + 1)
    np.testing.assert_array_equal(data.y_test, y[:2])

    table = np.concatenate([X, y], axis=1)
    np.savetxt(tmp_path / "d.csv", table, delimiter=",", header="a,b,target", comments="")
    spec = _write(
        tmp_path,
        model + '[data]\ngenerator = "file"\npath = "d.csv"\ntarget = "target"\nn_train = 7\nn_test = 3\nseed = 4\n',
        "csv.toml",
    )
    data = cli.make_data(cli.load_spec(spec))
    both = np.concatenate([data.X, data.X_test])
    order = np.random.default_rng(4).permutation(10)
    np.testing.assert_allclose(both, X[order], rtol=1e-15)
    np.testing.assert_allclose(np.concatenate([data.y, data.y_test]), y[order], rtol=1e-15)


def test_default_learning_rate_is_about_half_the_stability_bound():
    """The packaged default (not smoke) trains stably and converges below 1e-4 at infinite width."""
    cfg = cli.load_spec(None)
    data = cli.make_data(cfg)
    k = kernels(cfg.spec, data.X)
    K, T = k.nngp[-1], k.ntk[-1]
    bound = float(stability_bound(T))
    lr, steps = cfg["training"]["learning_rate"], cfg["training"]["steps"]
    assert 0.4 * bound < lr < 0.6 * bound
    m, S = gd_moments(K, K, K, T, T, data.y, lr, steps)
    resid = np.sqrt((np.asarray(m) - data.y) ** 2 + np.diag(np.asarray(S))[:, None])
    assert resid.max() < 1e-4


def test_packaged_default_is_in_the_wheel_config():
    """The default spec is package data under eft_prob/ (hatch ships the whole package directory)."""
    import tomllib

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert cfg["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == ["eft_prob"]
    assert (REPO / cli.DEFAULT_SPEC).is_file()


def test_packaged_default_is_models_default():
    packaged = (importlib.resources.files("eft_prob") / "data" / "default.toml").read_bytes()
    assert packaged == (REPO / "models" / "default.toml").read_bytes()


# -- help -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["theory", "--help"]])
def test_help_exits_zero(argv, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "usage: eft-prob" in out
    assert "SPEC" in out or "COMMAND" in out


def test_no_command_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    assert "usage:" in capsys.readouterr().err


# -- spec validation: exit 2, one line naming the file, the key and the fix --------------------------


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[model]\nhiden = [8]\n", ["hiden", "did you mean 'hidden'"]),  # unknown key
        ("[modle]\n", ["[modle]", "[model]"]),  # unknown section
        ('[model]\ninput_dim = "1"\n', ["input_dim", "integer"]),  # wrong type
        ("[model]\nhidden = [8.0]\n", ["hidden", "integer"]),  # wrong type in a list
        ("[model]\nhidden = [0, 8]\n", ["hidden", ">= 1"]),  # zero width
        ('[model]\nactivation = "tanhh"\n', ["activation", "tanh"]),  # unknown activation
        ("[model]\nC_W = 0.0\n", ["C_W", "> 0"]),
        ("[model]\nC_b = -0.5\n", ["C_b", ">= 0"]),
        ("[model]\nC_b = [0.0, 0.0]\n", ["C_b", "L = 3"]),  # per-layer list of the wrong length
        ("[data]\nnoise_std = -1.0\n", ["noise_std"]),
        ("[data]\nx_range = [1.0, -1.0]\n", ["x_range", "low < high"]),
        ("[training]\nlearning_rate = 0.0\n", ["learning_rate", "> 0"]),
        ("[training]\nsteps = true\n", ["steps", "boolean"]),
        ("[bayes]\nnoise_var = nan\n", ["noise_var", "finite"]),
        ("[model]\ninput_dim = 2\n", ["generator", "input_dim = 1"]),
        ("[model\n", ["not valid TOML"]),
        ('[run]\ncomparisons = ["initialisation"]\n', ["comparisons", "unknown comparison", "initialization"]),
        ("[run]\ncomparisons = []\n", ["comparisons", "at least one"]),
        ('[run]\ncomparisons = ["bayes", "bayes"]\n', ["comparisons", "twice"]),
        ('[run]\ncomparisons = "bayes"\n', ["comparisons", "list of strings"]),
        ("[run]\nwidths = [32, 0]\n", ["widths[1]", ">= 1"]),
        ("[run]\nwidths = []\n", ["widths", "empty"]),
        ("[run]\nwidths = [32, 32]\n", ["widths", "twice"]),
        ("[run]\ntheory_draws = 1\n", ["theory_draws", ">= 2"]),
        ("[run]\nseed = 1\n", ["[run] seed", "unknown key"]),
        ("[nuts]\nnum_chains = 0\n", ["num_chains", ">= 1"]),
        ("[nuts]\nnum_samples = 1.5\n", ["num_samples", "integer"]),
        ("[nuts]\ntarget_accept = 1.0\n", ["target_accept", "between 0 and 1"]),
        ("[nuts]\nwarmup = 10\n", ["warmup", "did you mean 'num_warmup'"]),
        ('[data]\ngenerator = "mnist"\n', ["generator", "diabetes"]),
        ('[data]\ngenerator = "file"\n', ["path", ".npz"]),
        ('[data]\ngenerator = "file"\npath = "missing.npz"\n', ["[data] path", "not found"]),
        ('[data]\ngenerator = "file"\npath = "data.txt"\n', ["[data] path", ".csv"]),
        ('[data]\npath = "x.npz"\n', ["[data] path", '"file"']),
        ('[data]\ngenerator = "diabetes"\nfrequency = 2.0\n', ["frequency", '"sine"']),
        ('[model]\ninput_dim = 3\n[data]\ngenerator = "diabetes"\nfeatures = ["bmi", "bpp", "s5"]\n', ["bpp", "bp"]),
        ('[data]\ngenerator = "diabetes"\n', ["input_dim", "input_dim = 3"]),
        ('[model]\ninput_dim = 3\n[data]\ngenerator = "diabetes"\nn_train = 440\n', ["n_train", "442"]),
        ('[model]\ninput_dim = 3\n[data]\ngenerator = "diabetes"\nfeatures = []\n', ["features", "empty"]),
    ],
)
def test_invalid_spec_exits_2_naming_the_key(tmp_path, capsys, text, names):
    path = _write(tmp_path, text)
    assert cli.main(["run", path]) == 2
    line = _one_line_error(capsys)
    assert path in line
    for word in names:
        assert word in line, line


def test_missing_spec_file(tmp_path, capsys):
    path = str(tmp_path / "nope.toml")
    assert cli.main(["theory", path]) == 2
    line = _one_line_error(capsys)
    assert path in line and "not found" in line


def test_learning_rate_above_stability_bound_exits_2_and_leaves_no_output(tmp_path, capsys):
    path = _write(tmp_path, "[training]\nlearning_rate = 5.0\n")
    out = tmp_path / "out"
    assert cli.main(["run", path, "--out", str(out)]) == 2
    line = _one_line_error(capsys)
    assert "learning_rate" in line and "stability bound" in line
    assert not out.exists()


@pytest.mark.parametrize("sub", ["file.txt/out", "file.txt"])
def test_unwritable_out_dir_exits_2_without_partial_output(tmp_path, capsys, sub):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file")
    assert cli.main(["run", "--smoke", "--out", str(tmp_path / sub)]) == 2
    line = _one_line_error(capsys)
    assert "--out" in line
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]
    assert blocker.read_text() == "a regular file"


def test_smoke_from_environment(monkeypatch):
    monkeypatch.setenv("EFT_PROB_SMOKE", "1")
    assert cli._smoke_from_env()
    monkeypatch.setenv("EFT_PROB_SMOKE", "0")
    assert not cli._smoke_from_env()
    sizes = cli._sizes(cli.load_spec(None), smoke=True)
    assert sizes == cli.SMOKE_CAPS


def test_resume_needs_out(capsys):
    assert cli.main(["run", "--resume"]) == 2
    assert "--out" in _one_line_error(capsys)


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--coordinator", "127.0.0.1:1234"], "together"),
        (["--num-processes", "2", "--process-id", "0"], "together"),
        (["--coordinator", "127.0.0.1", "--num-processes", "2", "--process-id", "0"], "coordinator_address must be"),
        (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "process_id must be"),
    ],
)
def test_distributed_flags_are_checked_before_connecting(argv, names, capsys):
    """eft-prob run across processes: bad --coordinator / --num-processes / --process-id exit 2 naming
    the flags, before anything connects or computes (the two-process run: tests/test_sharding.py)."""
    assert cli.main(["run", "--smoke", *argv]) == 2
    line = _one_line_error(capsys)
    assert "--distributed: cannot connect the processes" in line and names in line
    assert "--coordinator HOST:PORT --num-processes P --process-id I" in line


def test_outputs_are_all_or_nothing(tmp_path):
    """A failure while writing the outputs (here: the third file) leaves none of them, nor temporaries."""
    out = cli._OutDir(str(tmp_path / "o"))

    def boom(path):
        with open(path, "w") as f:
            f.write("partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(cli.SpecError, match="No space left on device"):
        out.write({"summary.json": "{}", "summary.md": "# x", "results.nc": boom})
    assert os.listdir(tmp_path / "o") == []

    def two(path):
        with open(path, "w") as f:
            f.write("2")

    assert out.write({"a.txt": "1", "b.txt": two}) == [
        str(tmp_path / "o" / "a.txt"),
        str(tmp_path / "o" / "b.txt"),
    ]
    assert (tmp_path / "o" / "b.txt").read_text() == "2"


def test_checkpoints_refuse_another_spec(tmp_path):
    from eft_prob import runner

    a = {"training": {"steps": 300}, "sizes": {"steps": 300}}
    b = {"training": {"steps": 200}, "sizes": {"steps": 200}}
    ck = runner.Checkpoints(str(tmp_path), runner.fingerprint(a), a, resume=False)
    ck.save("stage", {"g": runner.f_group(np.ones((3, 2, 1)))}, {"x": 1})
    again = runner.Checkpoints(str(tmp_path), runner.fingerprint(a), a, resume=True)
    groups, info = again.load("stage")
    np.testing.assert_array_equal(groups["g"]["f_test"].values, np.ones((1, 3, 2, 1)))
    assert info == {"x": 1}
    with pytest.raises(runner.StageError, match=r"\[training\] steps: 300 then, 200 now"):
        runner.Checkpoints(str(tmp_path), runner.fingerprint(b), b, resume=True)
    fresh = runner.Checkpoints(str(tmp_path), runner.fingerprint(b), b, resume=False)  # starts over
    assert fresh.load("stage") is None


# -- the statistics of the comparison table ------------------------------------------------------


def test_variance_standard_error_matches_gaussian_formula():
    from eft_prob import runner

    s = np.random.default_rng(0).standard_normal((200_000, 1, 1)) * 2.0
    var, se = runner.var_se(s)
    assert var[0, 0] == pytest.approx(4.0, rel=0.02)
    assert se[0, 0] == pytest.approx(4.0 * np.sqrt(2 / s.shape[0]), rel=0.02)  # Var(s²) = 2σ⁴ for a Gaussian


def test_fourth_cumulant_and_its_standard_error():
    """κ₄ of the uniform law on (−√3, √3): −6/5; its standard error matches the spread over replicates."""
    from eft_prob import runner

    rng = np.random.default_rng(1)
    reps = rng.uniform(-math.sqrt(3), math.sqrt(3), (300, 2000, 1, 1))
    est = np.array([runner.k4_se(r)[0][0, 0] for r in reps])
    ses = np.array([runner.k4_se(r)[1][0, 0] for r in reps])
    assert est.mean() == pytest.approx(-1.2, abs=4 * est.std() / np.sqrt(len(est)))
    assert np.mean(ses) == pytest.approx(est.std(), rel=0.1)
    k4, _ = runner.k4_se(rng.standard_normal((400_000, 1, 1)))
    assert abs(k4[0, 0]) < 0.05  # Gaussian: zero


def test_deterministic_outputs_give_zero_z_not_nan():
    """Trained outputs pinned by the data have zero spread in theory and ensemble alike."""
    from eft_prob import runner

    data = cli.Data(np.zeros((1, 1)), np.zeros((1, 1)), np.array([[0.5]]), np.zeros((1, 1)))
    rows = runner.rows_for(
        "training",
        8,
        data,
        "variance",
        np.array([[0.0]]),
        np.array([[0.0]]),
        np.array([[1e-12]]),
        None,
        np.array([[1.0]]),
        "n/a here",
    )
    (r,) = rows
    assert math.isfinite(r["z_order0"]) and abs(r["z_order0"]) < 1e-3
    assert r["theory_order1"] is None and r["z_order1"] is None and r["order1_note"] == "n/a here"


# -- eft-prob criticality -------------------------------------------------------------------------


def test_criticality_subcommand_half_stable_with_regime(capsys):
    assert cli.main(["criticality", "gelu", "--depth", "10", "--width", "64"]) == 0
    out = capsys.readouterr().out
    assert "universality class: half-stable" in out
    assert f"K* = {(3 + math.sqrt(17)) / 2:.10g}" in out  # the GELU closed form (tests/test_criticality.py)
    assert "susceptibilities at C_W = 1.98306" in out
    assert "strongly coupled: ε = " in out and "n >= " in out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["criticality", "relu", "--depth", "3", "--width", "64"],
            ["any K* > 0", "C_W = 2;", "ε = V/(n_(L-1)·K²) = 0.156"],
        ),
        (["criticality", "tanh"], ["universality class: K*=0", "K* -> 0", "C_W = 1;"]),
        (["criticality", "sigmoid"], ["universality class: none", "critical points: none"]),
    ],
)
def test_criticality_subcommand_classes(argv, expected, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out


@pytest.mark.parametrize(
    "argv, names",
    [
        (["criticality", "tahn"], ["tahn", "did you mean 'tanh'"]),
        (["criticality", "relu", "--depth", "3"], ["--depth and --width"]),
        (["criticality", "relu", "--depth", "0", "--width", "8"], ["--depth 0"]),
        (["criticality", "relu", "--C_W", "-1"], ["--C_W -1"]),
        (["criticality", "softplus", "--depth", "3", "--width", "8"], ["softplus", "--C_W"]),
    ],
)
def test_criticality_subcommand_errors_exit_2(argv, names, capsys):
    assert cli.main(argv) == 2
    line = _one_line_error(capsys)
    for name in names:
        assert name in line


def test_trained_theory_above_32_inputs_is_built_one_test_input_at_a_time(tmp_path):
    # 3 + 30 inputs: the joint O(1/n) statistics would cost (N_A + N_B)⁴; the main job's order-1
    # group comes from nlo_trained_marginals instead, with the same per-test-input moments.
    import eft_prob as ep
    from eft_prob import runner
    from eft_prob.theory import nlo_trained_coefficients, nlo_trained_marginals

    spec = ep.MLPSpec(1, (16, 16), 1, "tanh", C_b=0.1, C_W=1.2)
    X = np.array([[-1.0], [0.1], [1.0]])
    y = np.sin(2 * X)
    Xt = np.linspace(-1.5, 1.5, 30)[:, None]
    path = tmp_path / "trained.partial.npz"
    groups, reasons = runner.trained_theory(spec, X, y, Xt, 0.2, 20, jax.random.key(0), 64, checkpoint=str(path))
    assert reasons == {} and path.exists()
    g1 = groups["order1"]
    assert g1.attrs["marginal"] == 1
    want = nlo_trained_marginals(spec, X, y, Xt, 0.2, 20).at()
    got = lambda v: np.asarray(g1[v].transpose("test_point", "output").values)
    np.testing.assert_allclose(got("mean"), np.asarray(want.mean), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(got("variance"), np.asarray(want.variance), rtol=1e-10)
    joint = nlo_trained_coefficients(spec, X, y, Xt[:4], 0.2, 20).at()  # the first four test inputs jointly
    np.testing.assert_allclose(got("variance")[:4, 0], np.diag(np.asarray(joint.cov)), rtol=1e-9)
    np.testing.assert_allclose(got("mean")[:4], np.asarray(joint.mean), rtol=1e-9, atol=1e-14)


def test_trained_theory_over_the_memory_limit_keeps_order_0_and_says_why(monkeypatch):
    # The O(1/n) trained moments refuse sizes whose arrays exceed the memory limit before any
    # work (MemoryLimitError, a ValueError); the main job keeps order 0 and records the reason.
    import eft_prob as ep
    from eft_prob import runner

    monkeypatch.setenv("EFT_PROB_MEMORY_LIMIT_GIB", "1e-9")
    spec = ep.MLPSpec(1, (16, 16), 1, "tanh", C_b=0.1, C_W=1.2)
    X = np.array([[-1.0], [0.1], [1.0]])
    groups, reasons = runner.trained_theory(spec, X, np.sin(2 * X), X[:2] + 0.3, 0.2, 20, jax.random.key(0), 16)
    assert set(groups) == {"order0"}
    assert "would need at least" in reasons["order1"] and "EFT_PROB_MEMORY_LIMIT_GIB" in reasons["order1"]
    assert issubclass(ep.MemoryLimitError, ValueError)
