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
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("eft-prob: error: ")
    assert "Traceback" not in err and "Fix:" in lines[0]
    return lines[0]


# -- the default run ------------------------------------------------------------------------------


def test_default_run_smoke_writes_summary(tmp_path, capsys):
    out = tmp_path / "results" / "run1"  # parents are created
    assert cli.main(["run", "--smoke", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "theory: NNGP kernel" in stdout and "simulation:" in stdout
    assert "verdict:" in stdout and "L/n" in stdout
    assert sorted(os.listdir(out)) == ["summary.json", "summary.md"]  # no temporary files left

    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "spec",
        "model",
        "data",
        "theory",
        "ensemble",
        "comparison",
        "verdict",
        "max_abs_z",
        "timings_s",
        "warnings",
    ):
        assert key in summary
    assert summary["smoke"] is True
    assert summary["warnings"] == []  # the default spec is numerically clean
    assert summary["ensemble"]["training_networks"] == cli.SMOKE_CAPS["training_networks"]
    assert summary["theory"]["learning_rate"] < summary["theory"]["stability_bound"]

    rows = summary["comparison"]
    n_test = summary["spec"]["data"]["n_test"]
    assert len(rows) == 3 * n_test
    assert {r["quantity"] for r in rows} == {"prior variance", "trained mean", "trained variance"}
    for r in rows:
        for k in ("theory", "ensemble", "stderr", "z", "dev_prior_scale"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (k, r)
        assert r["stderr"] > 0
        assert r["z"] == pytest.approx((r["ensemble"] - r["theory"]) / max(r["stderr"], 1e-8 * r["scale"]))

    md = (out / "summary.md").read_text()
    assert "| quantity |" in md and summary["verdict"] in md
    assert md.count("| prior variance |") == n_test


def test_theory_subcommand(capsys):
    assert cli.main(["theory"]) == 0
    out = capsys.readouterr().out
    assert "GD stability bound" in out
    assert "GD-trained mean" in out and "Bayes mean" in out
    assert "simulation:" not in out


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


# -- the statistics of the comparison table ------------------------------------------------------


def test_variance_standard_error_matches_gaussian_formula():
    s = np.random.default_rng(0).standard_normal((200_000, 1, 1)) * 2.0
    var, se = cli._var_se(s)
    assert var[0, 0] == pytest.approx(4.0, rel=0.02)
    assert se[0, 0] == pytest.approx(4.0 * np.sqrt(2 / s.shape[0]), rel=0.02)  # Var(s²) = 2σ⁴ for a Gaussian


def test_deterministic_outputs_give_zero_z_not_nan():
    """Trained outputs pinned by the data have zero spread in theory and ensemble alike."""
    data = cli.Data(np.zeros((1, 1)), np.zeros((1, 1)), np.array([[0.5]]), np.zeros((1, 1)))
    th = {
        "prior_variance": np.array([[1.0]]),
        "trained_mean": np.array([[0.3]]),
        "trained_variance": np.array([[1e-12]]),
    }
    sim = {
        "prior": np.random.default_rng(1).standard_normal((500, 1, 1)),
        "trained": np.full((50, 1, 1), 0.3),
    }
    rows = cli._compare(th, sim, data)
    assert [r["quantity"] for r in rows] == ["prior variance", "trained mean", "trained variance"]
    for r in rows:
        assert math.isfinite(r["z"])
    assert abs(rows[1]["z"]) < 1e-6 and abs(rows[2]["z"]) < 1e-3


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
