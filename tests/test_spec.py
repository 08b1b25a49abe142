import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eft_prob as ep


def test_depth_widths_aspect_ratio():
    s = ep.MLPSpec(3, (64, 32, 16), 2, "tanh")
    assert s.depth == 4
    assert s.widths == (3, 64, 32, 16, 2)
    assert s.aspect_ratio == pytest.approx(4 * np.mean([1 / 64, 1 / 32, 1 / 16]))
    assert ep.MLPSpec(3, (64, 64), 1).aspect_ratio == pytest.approx(3 / 64)
    assert ep.MLPSpec(3, (), 1).aspect_ratio == 0.0
    assert ep.MLPSpec(3, 10, 1).hidden == (10,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_dim=0, hidden=(4,)), "input_dim"),
        (dict(input_dim=2, hidden=(4, 0)), r"hidden\[1\]"),
        (dict(input_dim=2, hidden=(4, 2.5)), r"hidden\[1\]"),
        (dict(input_dim=2, hidden=(4,), output_dim=-1), "output_dim"),
        (dict(input_dim=2, hidden=(4,), C_W=0.0), "C_W must be > 0"),
        (dict(input_dim=2, hidden=(4,), C_b=-1.0), "C_b must be >= 0"),
        (dict(input_dim=2, hidden=(4,), C_W=float("nan")), "C_W must be finite"),
        (dict(input_dim=2, hidden=(4,), lambda_W=-0.1), "lambda_W must be >= 0"),
        (dict(input_dim=2, hidden=(4,), C_W=(1.0, 2.0, 3.0)), "L=2 per-layer"),
        (dict(input_dim=2, hidden=(4,), activation="relux"), "relux"),
        (dict(input_dim=2, hidden="wide"), "hidden"),
        (dict(input_dim=True, hidden=(4,)), "input_dim"),
    ],
)
def test_validation_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ep.MLPSpec(**kwargs)


def test_per_layer_values_and_replace():
    s = ep.MLPSpec(2, (8, 8), 1, "relu", C_W=(1.0, 2.0, 3.0), C_b=0.1)
    np.testing.assert_allclose(s.layer_values("C_W"), [1, 2, 3])
    np.testing.assert_allclose(s.layer_values("C_b"), [0.1, 0.1, 0.1])
    s2 = s.replace(C_W=2.0)
    assert s2.C_W == 2.0 and s.C_W == (1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="C_W must be > 0"):
        s.replace(C_W=-2.0)


def test_spec_is_a_pytree_with_traceable_hyperparameters():
    s = ep.MLPSpec(2, (8,), 1, "tanh", C_W=1.5)
    leaves, treedef = jax.tree_util.tree_flatten(s)
    assert len(leaves) == 4
    s2 = jax.tree_util.tree_unflatten(treedef, leaves)
    assert s2.activation is s.activation and s2.hidden == s.hidden

    @jax.jit
    def f(spec):
        return spec.layer_values("C_W").sum()

    assert float(f(s)) == pytest.approx(3.0)
    # a traced C_W passes through construction without concrete validation
    g = jax.grad(lambda c: s.replace(C_W=c).layer_values("C_W").sum())(1.0)
    assert float(g) == pytest.approx(2.0)


def test_at_criticality():
    assert ep.MLPSpec.at_criticality(2, (8,), activation="relu").C_W == 2.0
    assert ep.MLPSpec.at_criticality(2, (8,), activation="tanh").C_W == 1.0
    assert ep.MLPSpec.at_criticality(2, (8,), activation="erf").C_W == pytest.approx(np.pi / 4)
    assert ep.MLPSpec.at_criticality(2, (8,), activation="linear").C_W == 1.0
    with pytest.raises(ValueError, match="critical point"):
        ep.MLPSpec.at_criticality(2, (8,), activation="sigmoid")


def test_describe_mentions_regime():
    assert "1/n regime" in ep.MLPSpec(1, (100, 100), 1).describe()
    assert "outside" in ep.MLPSpec(1, (2, 2), 1).describe()
    assert jnp.asarray(ep.MLPSpec(1, (2, 2), 1).layer_values("C_b")).shape == (3,)
