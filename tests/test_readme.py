"""The README's example runs as written and does what it says."""

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_exactly_two_quick_start_commands():
    text = README.read_text()
    quick = text.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [ln for ln in quick.strip().splitlines() if ln.strip()]
    assert len(lines) == 2
    assert "eft-prob run" in lines[0] and "pytest" in lines[1]


@pytest.mark.slow
def test_readme_numpyro_example_recovers_its_parameters():
    code = _python_blocks()[0]
    code = code.replace("mcmc.print_summary()", "")
    ns = {}
    exec(compile(code, str(README), "exec"), ns)
    s = ns["mcmc"].get_samples()
    for name, truth in (("C_W", 1.6), ("noise_var", 0.04)):
        v = np.asarray(s[name])
        assert abs(v.mean() - truth) < 4 * v.std(), (name, v.mean(), v.std())


def test_readme_finite_width_example_does_what_it_says():
    code = _python_blocks()[1]
    ns = {}
    exec(compile(code, str(README), "exec"), ns)
    p1, exact, spec = ns["p1"], ns["exact"], ns["spec"]
    assert p1.event_shape == (3, 2) and p1.fourth_cumulant().shape == (6,) * 4
    assert float(p1.residual) < 1e-10
    assert ns["ep"].criticality.regime(spec, ns["X"]).status == "perturbative"
    assert np.ravel(exact.excess_kurtosis())[0] == pytest.approx(3 * ((13 / 8) ** 3 - 1), rel=1e-10)
