"""The four-point vertex V and the NLO metric K^{1} (THEORY.md §3.3–3.5, §4.4, oracles O2, O5–O7, O14).

Deterministic part: oracle values, exact results (deep linear, scale-invariant), structural
properties (symmetries, identical inputs, second layer = eq. 4.43), the quadrature over up to four
inputs, jit / grad.  Monte Carlo part (``slow``): V and K^{1} of real finite networks, from
cross-neuron moments, converge to the theory like 1/n.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eft_prob as ep
from eft_prob import gauss
from eft_prob.activations import get_activation, leaky_relu
from eft_prob.theory.vertex import _compute, four_point_vertex, nlo_kernel
from tests.conftest import fit_inverse_width

X2 = 1.2 * np.array([[1.0, 0.5, -0.3], [0.2, -1.0, 0.7]])
X3 = 1.2 * np.array([[1.0, 0.5, -0.3], [0.2, -1.0, 0.7], [0.6, 0.1, -0.9]])
X4 = np.array([[1.0, 0.5, -0.3], [0.2, -1.0, 0.7], [0.6, 0.1, -0.9], [-0.4, 0.8, 0.5]])


def _np(a):
    return np.asarray(a, dtype=float)


# --------------------------------------------------------------------------------------------
# Oracles.


def _o5_layers(depth):
    """K, V, K^{1} of every layer for oracle O5: tanh at criticality, one input x = 1, equal widths."""
    spec = ep.MLPSpec(1, (8,) * (depth - 1), 1, "tanh", C_b=0.0, C_W=1.0)
    X = np.array([[1.0]])
    K = _np(ep.theory.nngp(spec, X, all_layers=True))[:, 0, 0]
    V = _np(four_point_vertex(spec, X, all_layers=True))[:, 0, 0, 0, 0]
    G = _np(nlo_kernel(spec, X, all_layers=True))[:, 0, 0]
    return K, V, G


def test_O5_tanh_single_input_at_criticality():
    K, V, G = _o5_layers(10)
    table = {2: (0.394294, 0.6273, 0.0000), 3: (0.236450, 1.2128, -0.1308), 5: (0.127905, 2.4083, -0.5334),
             10: (0.058012, 5.5235, -1.8468)}  # fmt: skip
    for l, (k, v, g) in table.items():
        assert K[l - 1] == pytest.approx(k, abs=1e-6)
        assert V[l - 1] / K[l - 1] ** 2 == pytest.approx(v, abs=1e-4)
        assert G[l - 1] / K[l - 1] == pytest.approx(g, abs=1e-4)
    assert V[0] == 0.0 and G[0] == 0.0  # first layer: Gaussian


def test_O5_tanh_large_depth():
    K, V, G = _o5_layers(60)
    for l, v, g in [(20, 11.9649, -4.8625), (40, 25.0796, -11.2638), (60, 38.2892, -17.7994)]:
        assert V[l - 1] / K[l - 1] ** 2 == pytest.approx(v, abs=2e-4)
        assert G[l - 1] / K[l - 1] == pytest.approx(g, abs=2e-4)


def test_O6_two_input_tanh():
    spec = ep.MLPSpec(3, (8, 8), 1, "tanh", C_b=0.2, C_W=1.5)
    K = _np(ep.theory.nngp(spec, X2))
    G = _np(nlo_kernel(spec, X2))
    V = _np(four_point_vertex(spec, X2))
    np.testing.assert_allclose(K, [[0.742015, 0.272200], [0.272200, 0.751672]], atol=1e-6)
    np.testing.assert_allclose(G, [[-0.04001, 0.02787], [0.02787, -0.03931]], atol=1e-5)
    for idx, v in [((0, 0, 0, 0), 0.2256), ((0, 0, 1, 1), 0.0031), ((0, 1, 0, 1), 0.4528),
                   ((0, 0, 0, 1), 0.0235), ((1, 1, 1, 1), 0.2286)]:  # fmt: skip
        assert V[idx] == pytest.approx(v, abs=1e-4), idx


@pytest.mark.parametrize("L", [2, 3, 4, 6])
def test_O2_relu_single_input_five_L_over_n(L):
    x = np.array([[1.0, -0.5, 2.0, 0.3]])
    spec = ep.MLPSpec(4, (32,) * (L - 1), 1, "relu", C_b=0.0, C_W=2.0)
    K = 2 * float((x @ x.T)[0, 0]) / 4
    V = float(four_point_vertex(spec, x)[0, 0, 0, 0])
    assert V / K**2 == pytest.approx(5 * (L - 1), rel=1e-10)
    if L == 3:
        assert V / (32 * K**2) == pytest.approx(0.3125, rel=1e-10)  # O2 leading order


def test_O7_relu_vertex_240():
    spec = ep.MLPSpec(3, (8, 8, 8), 1, "relu", C_b=0.0, C_W=2.0)
    x = np.array([[1.0, 2.0, -1.0]])
    assert float(four_point_vertex(spec, x)[0, 0, 0, 0]) == pytest.approx(240.0, rel=1e-10)
    assert abs(float(nlo_kernel(spec, x)[0, 0])) < 1e-12


def test_O14_deep_linear_single_input():
    x = np.array([[1.0, -2.0, 0.5]])
    for L in (2, 3, 5):
        spec = ep.MLPSpec(3, (10,) * (L - 1), 1, "linear", C_b=0.0, C_W=1.3)
        K = 1.3**L * float((x @ x.T)[0, 0]) / 3
        assert float(four_point_vertex(spec, x)[0, 0, 0, 0]) / K**2 == pytest.approx(2 * (L - 1), rel=1e-9)
        assert abs(float(nlo_kernel(spec, x)[0, 0])) < 1e-12 * K


def test_deep_linear_four_inputs_unequal_widths():
    """σ(z) = z: V^(L)/n_{L-1} = (K13 K24 + K14 K23) Σ_{ℓ<L} 1/n_ℓ for every index pattern."""
    hidden = (6, 11, 7)
    spec = ep.MLPSpec(3, hidden, 2, "linear", C_b=0.0, C_W=1.3)
    K = _np(ep.theory.nngp(spec, X4))
    V = _np(four_point_vertex(spec, X4))
    expected = (
        (np.einsum("ac,bd->abcd", K, K) + np.einsum("ad,bc->abcd", K, K)) * hidden[-1] * sum(1 / n for n in hidden)
    )
    np.testing.assert_allclose(V, expected, rtol=1e-7, atol=1e-9 * np.abs(expected).max())
    assert np.abs(_np(nlo_kernel(spec, X4))).max() < 1e-10


@pytest.mark.parametrize("act", ["relu", "leaky_relu_0.2", "linear"])
def test_scale_invariant_unequal_widths_single_input(act):
    """§4.4: V^(ℓ)/(n_{ℓ-1} K²) = (3A4/A2² - 1) Σ_{ℓ'<ℓ} 1/n_{ℓ'} at criticality, any widths."""
    a = leaky_relu(0.2) if act == "leaky_relu_0.2" else get_activation(act)
    hidden = (6, 10, 7, 13)
    spec = ep.MLPSpec(3, hidden, 5, a, C_b=0.0, C_W=1 / a.A2)
    x = np.array([[0.9, -0.4, 1.3]])
    K = _np(ep.theory.nngp(spec, x, all_layers=True))[:, 0, 0]
    V = _np(four_point_vertex(spec, x, all_layers=True))[:, 0, 0, 0, 0]
    widths = spec.widths
    c = 3 * a.A4 / a.A2**2 - 1
    for l in range(2, spec.depth + 1):
        n_prev = widths[l - 1]
        assert V[l - 1] / (n_prev * K[l - 1] ** 2) == pytest.approx(c * sum(1 / n for n in widths[1:l]), rel=1e-9)
    assert np.abs(_np(nlo_kernel(spec, x, all_layers=True))).max() < 1e-12


def test_O4_exact_scale_invariant_moments_with_biases_limit():
    """Exact finite-width moments (§4.4, O4): n_{L-1}·κ_4(s·widths) → V as the widths scale up."""
    a = leaky_relu(0.2)
    A2, A4, C_b, C_W = a.A2, a.A4, 0.3, 1.7
    x = np.array([[0.9, -0.4, 1.3]])
    hidden = (6, 10, 7)

    def exact(widths):
        g1 = C_b + C_W * float((x @ x.T)[0, 0]) / 3
        g2 = g1**2
        for n in widths:
            g1, g2 = (
                C_b + C_W * A2 * g1,
                C_b**2 + 2 * C_b * C_W * A2 * g1 + C_W**2 * (A2**2 + (3 * A4 - A2**2) / n) * g2,
            )
        return g1, g2

    g1, g2 = exact(hidden)
    assert g1 == pytest.approx(2.04816, abs=1e-5) and 3 * g2 == pytest.approx(32.04829, abs=1e-5)  # O4
    spec = ep.MLPSpec(3, hidden, 5, a, C_b=C_b, C_W=C_W)
    V = float(four_point_vertex(spec, x)[0, 0, 0, 0])
    assert float(nlo_kernel(spec, x)[0, 0]) == 0.0 or abs(float(nlo_kernel(spec, x)[0, 0])) < 1e-12
    s = 1e6
    g1, g2 = exact([s * n for n in hidden])
    assert s * hidden[-1] * (g2 - g1**2) == pytest.approx(V, rel=1e-5)


# --------------------------------------------------------------------------------------------
# Structure.


@pytest.mark.parametrize("name, C_b, C_W", [("tanh", 0.2, 1.5), ("relu", 0.1, 2.0), ("erf", 0.0, np.pi / 4)])
def test_vertex_symmetries_four_inputs(name, C_b, C_W):
    spec = ep.MLPSpec(3, (8, 8), 1, name, C_b=C_b, C_W=C_W)
    V = _np(four_point_vertex(spec, X4))
    np.testing.assert_array_equal(V, V.transpose(1, 0, 2, 3))
    np.testing.assert_array_equal(V, V.transpose(0, 1, 3, 2))
    np.testing.assert_array_equal(V, V.transpose(2, 3, 0, 1))
    # not symmetric under α2 ↔ α3
    assert np.abs(V - V.transpose(0, 2, 1, 3)).max() > 1e-3 * np.abs(V).max()


@pytest.mark.parametrize("name, C_b, C_W", [("tanh", 0.2, 1.5), ("relu", 0.1, 2.0), ("gelu", 0.0, 1.7)])
def test_second_layer_is_eq_4_43(name, C_b, C_W):
    """V^(2) = C_W²[⟨σσσσ⟩ - ⟨σσ⟩⟨σσ⟩]_{G^(1)}, against an independent numpy computation."""
    act = get_activation(name)
    spec = ep.MLPSpec(3, (8,), 1, name, C_b=C_b, C_W=C_W)
    V = _np(four_point_vertex(spec, X4))
    G1 = C_b + C_W * X4 @ X4.T / 3
    Lc = np.linalg.cholesky(G1)
    tuples = [(0, 1, 2, 3), (0, 2, 1, 3), (0, 1, 0, 2), (0, 1, 1, 2), (1, 1, 3, 3), (2, 3, 2, 2), (1, 1, 1, 1)]
    if not act.kinked:
        # uniform trapezoid rule in whitened coordinates (numpy; exponentially accurate for
        # Gaussian-weighted analytic integrands, independent of eft_prob.gauss)
        x = np.arange(-7.5, 7.5 + 1e-9, 0.3)
        w = 0.3 * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
        xi = np.stack([g.ravel() for g in np.meshgrid(x, x, x, x, indexing="ij")])
        W = np.einsum("i,j,k,l->ijkl", w, w, w, w).ravel()
        s = np.asarray(act.fn(jnp.asarray(Lc @ xi)))
        E2 = np.einsum("an,bn,n->ab", s, s, W)
        for idx in tuples:
            E4 = np.sum(s[idx[0]] * s[idx[1]] * s[idx[2]] * s[idx[3]] * W)
            expected = C_W**2 * (E4 - E2[idx[0], idx[1]] * E2[idx[2], idx[3]])
            assert V[idx] == pytest.approx(expected, rel=1e-7, abs=1e-9), idx
    else:
        # two-input entries from the arc-cosine closed forms (THEORY.md §4.5)
        for a_, b_ in [(0, 1), (1, 3), (0, 2)]:
            K11, K22, K12 = G1[a_, a_], G1[b_, b_], G1[a_, b_]
            psi = np.arccos(K12 / np.sqrt(K11 * K22))
            J2 = 3 * np.sin(psi) * np.cos(psi) + (np.pi - psi) * (1 + 2 * np.cos(psi) ** 2)
            assert V[a_, a_, b_, b_] == pytest.approx(C_W**2 * (K11 * K22 * J2 / (2 * np.pi) - K11 * K22 / 4), rel=1e-9)
            assert V[a_, a_, a_, a_] == pytest.approx(C_W**2 * (1.5 - 0.25) * K11**2, rel=1e-9)
        # three and four distinct inputs: Monte Carlo
        z = np.random.default_rng(0).normal(size=(2_000_000, 4)) @ Lc.T
        s = np.maximum(z, 0.0)
        E2 = s.T @ s / len(s)
        for idx in tuples:
            prod = s[:, idx[0]] * s[:, idx[1]] * s[:, idx[2]] * s[:, idx[3]]
            est = C_W**2 * (prod.mean() - E2[idx[0], idx[1]] * E2[idx[2], idx[3]])
            se = C_W**2 * prod.std() / np.sqrt(len(s))
            assert abs(V[idx] - est) < 4.5 * se, (idx, V[idx], est, se)


@pytest.mark.parametrize("name, C_b, C_W", [("tanh", 0.2, 1.5), ("relu", 0.1, 2.0), ("sin", 0.1, 1.0)])
def test_identical_inputs_give_identical_entries(name, C_b, C_W):
    """z_a ≡ z_b for identical inputs, so every V / K^{1} entry may swap a for b (index bookkeeping)."""
    X = np.stack([X3[0], X3[1], X3[0]])
    spec = ep.MLPSpec(3, (8, 12, 8), 1, name, C_b=C_b, C_W=C_W)
    V = _np(four_point_vertex(spec, X))
    G = _np(nlo_kernel(spec, X))
    scale = np.abs(V).max()
    perm = [2, 1, 0]  # relabel input 0 <-> 2
    np.testing.assert_allclose(V[np.ix_(perm, perm, perm, perm)], V, atol=1e-9 * scale)
    np.testing.assert_allclose(V[0, 2, 0, 2], V[0, 0, 0, 0], atol=1e-8 * scale)
    np.testing.assert_allclose(V[0, 2, 1, 1], V[0, 0, 1, 1], atol=1e-8 * scale)
    np.testing.assert_allclose(V[0, 1, 2, 1], V[0, 1, 0, 1], atol=1e-8 * scale)
    np.testing.assert_allclose(G[0, 2], G[0, 0], atol=1e-8 * np.abs(G).max())
    np.testing.assert_allclose(G[2, 1], G[0, 1], atol=1e-8 * np.abs(G).max())


@pytest.mark.parametrize("name, C_b, C_W", [("tanh", 0.2, 1.5), ("relu", 0.1, 2.0), ("erf", 0.1, 1.2)])
def test_nlo_kernel_pair_blocks_match_full_vertex(name, C_b, C_W):
    spec = ep.MLPSpec(3, (8, 16, 12), 1, name, C_b=C_b, C_W=C_W)
    K_f, G_f, V = _compute(spec, X3, True, True, False, None)
    K_b, G_b, Vb = _compute(spec, X3, False, True, False, None)
    np.testing.assert_allclose(_np(G_f), _np(G_b), rtol=1e-10, atol=1e-13)
    # smooth σ: the recursion takes ⟨σσ⟩ from its 48-node pair table (K <= 4), nngp from the 80-node rule
    np.testing.assert_allclose(_np(K_f), _np(ep.theory.nngp(spec, X3, all_layers=True)), rtol=1e-12)
    V, Vb = _np(V), _np(Vb)
    for a in range(3):
        for b in range(3):
            P = [(a, a), (b, b), (a, b)]
            for u in range(3):
                for v in range(3):
                    np.testing.assert_allclose(
                        V[:, P[u][0], P[u][1], P[v][0], P[v][1]], Vb[:, u, v, a, b], rtol=1e-10, atol=1e-13
                    )


@pytest.mark.parametrize("name", ["tanh", "relu", "swish"])
def test_closed_forms_and_quadrature_agree(name):
    act = get_activation(name)
    C_b, C_W = (0.1, 2.0) if act.kinked else (0.1, 1.4)
    spec = ep.MLPSpec(3, (8, 8, 8), 1, name, C_b=C_b, C_W=C_W)
    V = _np(four_point_vertex(spec, X3))
    G = _np(nlo_kernel(spec, X3))
    Vq = _np(four_point_vertex(spec, X3, quadrature=True))
    Gq = _np(nlo_kernel(spec, X3, quadrature=True))
    np.testing.assert_allclose(Vq, V, rtol=1e-7, atol=1e-9 * np.abs(V).max())
    np.testing.assert_allclose(Gq, G, rtol=1e-7, atol=1e-9 * np.abs(G).max())


def test_first_layer_and_depth_one():
    spec = ep.MLPSpec(3, (), 2, "tanh")
    assert np.all(_np(four_point_vertex(spec, X3)) == 0.0)
    assert np.all(_np(nlo_kernel(spec, X3)) == 0.0)
    spec = ep.MLPSpec(3, (5, 7), 2, "tanh", C_b=0.1, C_W=1.2)
    V = _np(four_point_vertex(spec, X3, all_layers=True))
    G = _np(nlo_kernel(spec, X3, all_layers=True))
    assert V.shape == (3, 3, 3, 3, 3) and G.shape == (3, 3, 3)
    assert np.all(V[0] == 0) and np.all(G[0] == 0) and np.all(G[1] == 0)
    assert np.abs(V[1]).min() > 0


def test_jit_and_grad_in_hyperparameters():
    spec = ep.MLPSpec(3, (8, 8), 1, "tanh", C_b=0.2, C_W=1.5)

    def f(c_b, c_w):
        s = spec.replace(C_b=c_b, C_W=c_w)
        return jnp.sum(four_point_vertex(s, X2)) + jnp.sum(nlo_kernel(s, X2))

    v = f(0.2, 1.5)
    assert float(jax.jit(f)(0.2, 1.5)) == pytest.approx(float(v), rel=1e-12)
    g_b, g_w = jax.grad(f, argnums=(0, 1))(0.2, 1.5)
    h = 1e-5
    fd_b = (f(0.2 + h, 1.5) - f(0.2 - h, 1.5)) / (2 * h)
    fd_w = (f(0.2, 1.5 + h) - f(0.2, 1.5 - h)) / (2 * h)
    assert float(g_b) == pytest.approx(float(fd_b), rel=1e-6)
    assert float(g_w) == pytest.approx(float(fd_w), rel=1e-6)


def test_float64_without_global_x64():
    code = (
        "import numpy as np, eft_prob as ep; from eft_prob.theory.vertex import four_point_vertex, nlo_kernel;"
        "s = ep.MLPSpec(1, (8,), 1, 'tanh', C_W=1.0); x = np.array([[1.0]]);"
        "v = four_point_vertex(s, x); g = nlo_kernel(s, x); print(v.dtype, g.dtype)"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={
        **__import__("os").environ, "JAX_ENABLE_X64": "0", "JAX_PLATFORMS": "cpu"}, check=True)  # fmt: skip
    assert out.stdout.split() == ["float64", "float64"]


def test_bad_orders_rejected():
    spec = ep.MLPSpec(3, (8, 8), 1, "tanh")
    with pytest.raises(ValueError, match="unknown key"):
        four_point_vertex(spec, X3, orders={"smooth5": 10})


# --------------------------------------------------------------------------------------------
# Gaussian integrals over up to four inputs (eft_prob.gauss.expect_nd).


def _relu4(*z):
    out = 1.0
    for x in z:
        out = out * jnp.maximum(x, 0.0)
    return out


def test_expect_nd_relu_against_closed_form_O13():
    K = jnp.array([[1.3, 0.5], [0.5, 0.7]])
    relu = lambda z: jnp.maximum(z, 0.0)
    assert float(gauss.expect_nd(lambda a, b: relu(a) ** 2 * relu(b) ** 2, K, kinked=True)) == pytest.approx(
        0.67026, abs=5e-6
    )
    # the nested split rule itself (used for three and four inputs), forced onto two inputs
    zs, ws = gauss._nested_nodes(K, True, 16)
    val = relu(zs[0]) ** 2 * relu(zs[1]) ** 2
    for k in (1, 0):
        val = jnp.sum(val * ws[k], axis=-1)
    psi = math.acos(0.5 / math.sqrt(1.3 * 0.7))
    J2 = 3 * math.sin(psi) * math.cos(psi) + (math.pi - psi) * (1 + 2 * math.cos(psi) ** 2)
    assert float(val) == pytest.approx(1.3 * 0.7 * J2 / (2 * math.pi), rel=1e-9)


@pytest.mark.heavy
def test_expect_nd_converges_three_and_four_inputs():
    rng = np.random.default_rng(1)
    A = rng.normal(size=(4, 4))
    K4 = jnp.asarray(A @ A.T / 4 + 0.2 * np.eye(4))
    for m in (3, 4):
        K = K4[:m, :m]
        lo = float(gauss.expect_nd(_relu4, K, kinked=True))
        hi = float(gauss.expect_nd(_relu4, K, kinked=True, n=24))
        assert lo == pytest.approx(hi, rel=1e-7)
        th = lambda *z: jnp.prod(jnp.stack(jnp.broadcast_arrays(*[jnp.tanh(x) for x in z])), 0)
        lo = float(gauss.expect_nd(th, 3 * K))
        hi = float(gauss.expect_nd(th, 3 * K, n=36))
        assert lo == pytest.approx(hi, rel=1e-6)
    # polynomials (Wick): ⟨z1 z2 z3 z4⟩ = K12K34 + K13K24 + K14K23
    wick = K4[0, 1] * K4[2, 3] + K4[0, 2] * K4[1, 3] + K4[0, 3] * K4[1, 2]
    assert float(gauss.expect_nd(lambda a, b, c, d: a * b * c * d, K4)) == pytest.approx(float(wick), rel=1e-8)
    assert float(gauss.expect_nd(lambda a, b, c, d: a * b * c * d, K4, kinked=True)) == pytest.approx(
        float(wick), rel=1e-9
    )


@pytest.mark.parametrize("m", [3, 4])
def test_expect_nd_half_grid_for_even_integrands(m):
    """``even=True`` (f(−z) = f(z)) sums half of the outer nodes of the point-symmetric smooth rule and
    doubles it: equal to the full grid to rounding, for batches, extra leading axes and singular K; the
    four-point vertex uses it for odd σ."""
    rng = np.random.default_rng(2)
    A = rng.normal(size=(3, m, m))
    K = jnp.asarray(A @ np.swapaxes(A, 1, 2) / m)
    K = K.at[0].set(jnp.ones((m, m)))  # singular: four copies of one input
    f = lambda *z: jnp.stack(
        jnp.broadcast_arrays(
            math.prod(jnp.tanh(x) for x in z) * (jnp.tanh(z[0]) if m == 3 else 1.0),  # four odd factors
            z[0] * z[-1] * jnp.cosh(z[1]),
        )
    )
    half, full = gauss.expect_nd(f, K, n=24, even=True), gauss.expect_nd(f, K, n=24)
    assert half.shape == full.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(half), np.asarray(full), rtol=1e-13, atol=1e-15)


def test_expect_nd_singular_kernel_and_batches():
    x = jnp.array([[1.0, 0.3], [0.2, -1.0], [1.0, 0.3]])  # third input = first
    K = x @ x.T + 0.1
    relu = lambda z: jnp.maximum(z, 0.0)
    v3 = gauss.expect_nd(lambda a, b, c: relu(a) * relu(b) * relu(c), K, kinked=True)
    v2 = gauss.expect_nd(lambda a, b: relu(a) ** 2 * relu(b), K[:2, :2], kinked=True)
    assert float(v3) == pytest.approx(float(v2), rel=1e-8)
    batch = jnp.stack([K, 2 * K])
    out = gauss.expect_nd(lambda a, b, c: jnp.stack(jnp.broadcast_arrays(a * b * c * c, a * a * b * c)), batch)
    assert out.shape == (2, 2)


# --------------------------------------------------------------------------------------------
# Monte Carlo: real finite networks.
#
# Ĝ^(ℓ+1) = C_b + C_W mean_j σ(z^(ℓ)_j)σ(z^(ℓ)_j) is the covariance of z^(ℓ+1) given layer ℓ
# (Rao–Blackwellization of the last layer: E[z_{i;α1} z_{i;α2} z_{k;α3} z_{k;α4} | layer L-1] =
# Ĝ_{α1α2} Ĝ_{α3α4} for i ≠ k), so n_{L-1}·Cov(Ĝ^(L)) estimates V^(L) and n_{L-1}·(E Ĝ^(L) - K)
# estimates K^{1}(L), each up to O(1/n) corrections: we fit estimate(n) = a/n + b over widths and
# require b = theory within 4 standard errors.

PAIRS = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
PAIR_PAIRS = [(p, q) for i, p in enumerate(PAIRS) for q in PAIRS[i:]]  # the 21 distinct V entries
IU = tuple(np.array(PAIRS).T)


def _metrics(spec, X, n_networks, key):
    """Per network: [Ĝ^(2), ..., Ĝ^(L)] (each (M, N, N)) and the outputs z^(L) (M, N, n_L)."""
    zs = ep.ensemble.prior_outputs(spec, X, n_networks, key, layers=True)
    C_b, C_W = _np(spec.layer_values("C_b")), _np(spec.layer_values("C_W"))
    Gs = []
    for ell in range(spec.depth - 1):
        s = _np(spec.activation.fn(zs[ell]))
        Gs.append(C_b[ell + 1] + C_W[ell + 1] * np.einsum("man,mbn->mab", s, s) / s.shape[-1])
    return Gs, _np(zs[-1])


def _fit_and_check(widths, est, ses, theory, what, floor):
    est, ses = np.array(est), np.maximum(np.array(ses), floor)  # exactly conserved entries: se ~ 0
    bs = []
    for e in range(est.shape[1]):
        a, b, se_a, se_b, chi2 = fit_inverse_width(widths, est[:, e], ses[:, e])
        assert abs(b - theory[e]) <= 4 * se_b + floor, (what, e, b, se_b, theory[e], est[:, e], ses[:, e])
        assert chi2 < 16, (what, e, chi2)  # one degree of freedom: the a/n + b form fits
        bs.append((b, se_b))
    return np.array(bs)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, C_b, C_W, ratio",
    [("tanh", 0.0, 1.0, 1), ("relu", 0.0, 2.0, 1), ("tanh", 0.0, 1.0, 2)],
)
def test_vertex_of_finite_networks(name, C_b, C_W, ratio):
    """V^(3) (three inputs) from Cov(Ĝ^(3)); ratio = n_1/n_2 tests the width ratio r_ℓ."""
    widths = (16, 32, 64)
    hidden = lambda n: (ratio * n, n)
    V = _np(four_point_vertex(ep.MLPSpec(3, hidden(8), 4, name, C_b=C_b, C_W=C_W), X3))
    theory = np.array([V[p + q] for p, q in PAIR_PAIRS])
    est, ses = [], []
    for i, n in enumerate(widths):
        spec = ep.MLPSpec(3, hidden(n), 4, name, C_b=C_b, C_W=C_W)
        M = 20000
        Gs, z = _metrics(spec, X3, M, jax.random.key(300 + 10 * ratio + i))
        G = Gs[-1]
        dG = G - G.mean(0)
        Y = np.stack([dG[(slice(None),) + p] * dG[(slice(None),) + q] for p, q in PAIR_PAIRS], axis=1)
        est.append(n * Y.mean(0) * M / (M - 1))
        ses.append(n * Y.std(0, ddof=1) / np.sqrt(M))
        if i == 0:
            # the operational definition on the actual outputs (no Rao–Blackwellization):
            # n·(mean over neurons i ≠ k of z_iα1 z_iα2 z_kα3 z_kα4 - E[z_α1 z_α2] E[z_α3 z_α4])
            nL = z.shape[-1]
            S = np.einsum("mai,mbi->mab", z, z)
            zz = S.mean(0) / nL
            for p, q in PAIR_PAIRS:
                cross = (S[(slice(None),) + p] * S[(slice(None),) + q]
                         - np.einsum("mi,mi,mi,mi->m", *(z[:, a] for a in p + q))) / (nL * (nL - 1))  # fmt: skip
                nrb = n * (cross.mean() - zz[p] * zz[q])
                e = PAIR_PAIRS.index((p, q))
                assert abs(nrb - est[0][e]) < 4.5 * n * cross.std() / np.sqrt(M), (p, q, nrb, est[0][e])
    bs = _fit_and_check(widths, est, ses, theory, f"V {name}", 1e-12 * np.abs(theory).max())
    assert np.max(bs[:, 1]) < 0.05 * np.abs(theory).max()  # the test has teeth


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, C_b, C_W, hidden",
    [("tanh", 0.0, 1.0, (1, 1, 1)), ("relu", 0.0, 2.0, (1, 1, 1)), ("tanh", 0.1, 1.2, (2, 1, 2))],
)
def test_nlo_kernel_of_finite_networks(name, C_b, C_W, hidden):
    """K^{1}(4) (three inputs, depth 4: both the propagated K^{1} and the V-term are exercised).

    Estimator of E[Ĝ^(4)]: E[Ĝ^(ℓ+1) | layer ℓ-1] = m(Ĝ^(ℓ)) ≡ C_b + C_W⟨σσ⟩_{Ĝ^(ℓ)} exactly (z^(ℓ)
    is Gaussian given layer ℓ-1), so Y = m(Ĝ^(3)) has mean E Ĝ^(4); the martingale differences
    Ĝ^(2) - K^(2) and Ĝ^(ℓ+1) - m(Ĝ^(ℓ)) have mean zero exactly and serve as control variates
    (they remove the O(1/√n) fluctuations, leaving the O(1/n) signal with a small error).
    """
    widths = (16, 32, 64) if max(hidden) == 1 else (8, 16, 32)
    act = get_activation(name)
    spec0 = ep.MLPSpec(3, tuple(8 * h for h in hidden), 1, name, C_b=C_b, C_W=C_W)
    Ks = _np(ep.theory.nngp(spec0, X3, all_layers=True))
    theory = _np(nlo_kernel(spec0, X3))[IU]
    n_last0 = spec0.hidden[-1]

    @jax.jit
    def m(G):  # (M, N, N) -> the IU entries (M, 6) of C_b + C_W⟨σσ⟩_G (48-node rule: error < 1e-10)
        a, b = IU
        ss = gauss.pair_moments(act, G[:, a, a], G[:, b, b], G[:, a, b], orders={"smooth2": 48})[0]
        return C_b + C_W * ss

    est, ses = [], []
    M = 20000
    for i, n in enumerate(widths):
        spec = ep.MLPSpec(3, tuple(n * h for h in hidden), 1, name, C_b=C_b, C_W=C_W)
        Gs, _ = _metrics(spec, X3, M, jax.random.key(400 + 10 * hidden[0] + i))
        ms = [np.concatenate([_np(m(jnp.asarray(G[c : c + 5000]))) for c in range(0, M, 5000)]) for G in Gs[:-1]]
        Y = ms[-1]
        controls = [(Gs[0] - Ks[1])[(slice(None),) + IU]]
        controls += [Gs[k + 1][(slice(None),) + IU] - ms[k] for k in range(len(Gs) - 2)]
        C = np.concatenate(controls, axis=1)
        beta = np.linalg.lstsq(C - C.mean(0), Y - Y.mean(0), rcond=None)[0]
        R = Y - C @ beta
        n_last = spec.hidden[-1]
        est.append(n_last * (R.mean(0) - Ks[-1][IU]))
        ses.append(n_last * R.std(0, ddof=1) / np.sqrt(M))
    bs = _fit_and_check([n * hidden[-1] for n in widths], est, ses, theory, f"K1 {name}", 1e-9)
    assert np.max(bs[:, 1]) < 0.05 * np.abs(theory).max()
    assert n_last0 == 8 * hidden[-1]


# --------------------------------------------------------------------------------------------
# The factored vertex (prior_statistics(..., factored=True)).


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_factored_vertex_agrees_with_dense_within_its_monte_carlo_error(act):
    """Five distinct inputs, depth 4, unequal widths: the factored V (Monte Carlo source, 4096 draws
    per layer) equals the exact dense V within its own standard error, entry by entry."""
    from eft_prob.theory import prior_statistics

    spec = ep.MLPSpec(3, (40, 24, 32), 1, act, C_b=0.05, C_W=2.0 if act == "relu" else 1.2)
    x = np.random.default_rng(11).normal(size=(5, 3))
    Vd = np.asarray(ep.theory.four_point_vertex(spec, x))
    st = prior_statistics(spec, x, factored=True, samples=4096)
    Vf, se = (np.asarray(a) for a in st.V.dense(with_error=True))
    z = np.abs(Vf - Vd) / np.maximum(se, 1e-300)
    assert z.max() < 5.0, z.max()  # entries share the draws, so they are correlated: no mean-z test
    assert np.abs(Vf - Vd).max() / np.abs(Vd).max() < 0.05
    # exact parts of the same pass: K and K^{1}
    np.testing.assert_allclose(st.K, ep.theory.nngp(spec, x), rtol=1e-10)
    np.testing.assert_allclose(st.K1, ep.theory.nlo_kernel(spec, x), rtol=1e-9, atol=1e-12)
    # one source per step ℓ -> ℓ+1, ℓ = 1..L-1: two propagated ones with S draws, the last with 8·S
    assert st.width == 32 and st.V.rank == 2 * 4096 + 8 * 4096 and st.V.last.shape == (8 * 4096, 5)


def test_factored_vertex_contractions_are_the_dense_algebra():
    """contract, matvec, project and pair_matrix are exact algebra on the same factor."""
    from eft_prob.distributions import _pair_coordinates
    from eft_prob.theory import prior_statistics

    spec = ep.MLPSpec.at_criticality(2, (16, 16, 16), 1, "tanh")
    x = np.random.default_rng(2).normal(size=(4, 2))
    V = prior_statistics(spec, x, factored=True, samples=256).V
    D = np.asarray(V.dense())
    rng = np.random.default_rng(3)
    A = rng.normal(size=(3, 4, 4))
    A = A + np.swapaxes(A, 1, 2)
    np.testing.assert_allclose(V.contract(A), np.einsum("abcd,iab,jcd->ij", D, A, A), rtol=1e-10)
    np.testing.assert_allclose(V.matvec(A[0]), np.einsum("abcd,cd->ab", D, A[0]), rtol=1e-10, atol=1e-12)
    i, j, w = _pair_coordinates(4)
    np.testing.assert_allclose(V.pair_matrix(), D[i, j][:, i, j] * np.outer(w, w), rtol=1e-10, atol=1e-14)
    assert np.linalg.eigvalsh(np.asarray(V.pair_matrix())).min() > -1e-12  # PSD by construction


def test_prior_statistics_switches_to_the_factored_vertex_above_24_inputs():
    from eft_prob.theory import FactoredVertex, prior_statistics

    spec = ep.MLPSpec.at_criticality(1, (32,), 1, "relu")
    st = prior_statistics(spec, np.linspace(-1, 1, 25)[:, None], samples=64)
    assert isinstance(st.V, FactoredVertex) and st.V.n_inputs == 25
    st = prior_statistics(spec, np.linspace(-1, 1, 5)[:, None])
    assert st.V.shape == (5,) * 4
    with pytest.raises(ValueError, match="samples"):
        prior_statistics(spec, np.linspace(-1, 1, 5)[:, None], factored=True, samples=0)
    with pytest.raises(ValueError, match="last_samples"):
        prior_statistics(spec, np.linspace(-1, 1, 5)[:, None], factored=True, last_samples=1)


def test_new_sample_counts_recompile_only_the_factored_build():
    """The recursion behind the factored V is compiled once per spec shape; a new ``samples`` (as the
    Monte Carlo warnings advise) compiles only the factored build, and K, K^{1} do not change."""
    from eft_prob.theory.vertex import _factored_jit, _trace_jit, prior_statistics

    spec = ep.MLPSpec.at_criticality(2, (16, 24), 1, "tanh")
    X = np.random.default_rng(3).normal(size=(26, 2))
    a = prior_statistics(spec, X, samples=96)
    traces, builds = _trace_jit._cache_size(), _factored_jit._cache_size()
    b = prior_statistics(spec, X, samples=192)
    assert (_trace_jit._cache_size(), _factored_jit._cache_size()) == (traces, builds + 1)
    assert b.V.rank > a.V.rank
    np.testing.assert_array_equal(np.asarray(a.K), np.asarray(b.K))
    np.testing.assert_array_equal(np.asarray(a.K1), np.asarray(b.K1))


@pytest.mark.parametrize("slopes", [(1.0, 0.0), (1.0, 0.2), (0.7, -1.3)])
def test_scale_invariant_pair_fourth_moments_closed_form_equals_the_polar_rule(slopes):
    """⟨σ_a^j σ_b^(4-j)⟩ in closed form (four arcs, elementary angular integrals) against the
    kink-aware polar rule, including identical, opposite, scaled and zero inputs; and its gradient."""
    from eft_prob.activations import _scale_invariant
    from eft_prob.theory.vertex import _scale_invariant_fourth, _scale_invariant_fourth_quadrature

    act = _scale_invariant("test", *slopes)
    x = np.random.default_rng(5).normal(size=(12, 3))
    x[3], x[5], x[6], x[7] = 0.0, x[4], -x[4], 2 * x[4]
    K = jnp.asarray(x @ x.T / 3)
    a, b = _scale_invariant_fourth(act, K), _scale_invariant_fourth_quadrature(act, K, None)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14 * float(jnp.abs(b).max()))
    ga = jax.grad(lambda c: jnp.sum(_scale_invariant_fourth(act, c * K)[1]))(1.3)
    gb = jax.grad(lambda c: jnp.sum(_scale_invariant_fourth_quadrature(act, c * K, None)[1]))(1.3)
    np.testing.assert_allclose(ga, gb, rtol=1e-10)
    assert bool(jnp.all(jnp.isfinite(jax.grad(lambda k: jnp.sum(_scale_invariant_fourth(act, k)))(K))))


@pytest.mark.parametrize("name", ["tanh", "gelu"])
def test_smooth_pair_integrals_equal_the_elementwise_rule(name, monkeypatch):
    """Every row of the pair table (each unordered pair integrated once, both orientations from one
    grid, inner axis as a loop) against the elementwise 2-D rule on every ordered pair: the Stein
    moments <σ''_a σ_b>, <σ''''_a σ_b>, <σ'''_a σ'_b>, <σ''_a σ''_b>, the fourth moments
    <σ_a^j σ_b^(4-j)> and <σσ>, <σ'σ'>; unchanged by the block size of the pairs."""
    from eft_prob.theory.vertex import _derivatives, _smooth_pair_integrals

    act = get_activation(name)
    x = np.random.default_rng(8).normal(size=(7, 3))
    x[2] = x[1] * 1.001
    K = jnp.asarray(x @ x.T / 3 + 0.05)
    assert float(jnp.diagonal(K).max()) < 4.0
    s = _derivatives(act)
    prods = [(2, 0), (4, 0), (3, 1), (2, 2)]
    fns = [lambda a, b, p=p, q=q: s[p](a) * s[q](b) for p, q in prods]
    fns += [lambda a, b, j=j: s[0](a) ** j * s[0](b) ** (4 - j) for j in range(5)]
    fns += [lambda a, b, p=p: s[p](a) * s[p](b) for p in (0, 1)]
    d = jnp.diagonal(K)
    table = _smooth_pair_integrals(act, K)
    assert table.shape == (11, 7, 7)
    for row, f in zip(table, fns):
        ref = gauss.expect_2d(f, d[:, None], d[None, :], K, orders={"smooth2": 120})
        np.testing.assert_allclose(row, ref, rtol=1e-9, atol=1e-11 * float(jnp.abs(ref).max()))
    monkeypatch.setattr(gauss, "_PAIR_BATCH", 5)
    np.testing.assert_allclose(_smooth_pair_integrals(act, K), table, rtol=1e-13, atol=1e-15)


@pytest.mark.slow
def test_factored_vertex_error_is_controlled_at_20_inputs():
    """N = 20 (issue 7: the factored path against the dense one): every entry of the factored V, its
    contractions with matrices, and the O(1/n) posterior terms computed from it lie within the
    Monte Carlo errors the library reports.  (σ² = 0.5: at small noise G̃⁻¹ amplifies the dense
    ReLU vertex's own quadrature error, ~4e-4 relative with the default nodes, beyond the Monte
    Carlo error; see benchmarks/bench_vertex.py.)"""
    from eft_prob.theory import prior_statistics
    from eft_prob.theory.bayes import _batches, nlo_moments

    spec = ep.MLPSpec.at_criticality(3, (64, 64), 1, "relu")
    x = np.random.default_rng(20).normal(size=(20, 3))
    Vd = np.asarray(four_point_vertex(spec, x))
    st = prior_statistics(spec, x, factored=True, samples=1024, last_samples=4096)  # (CI time)
    Vf, se = (np.asarray(a) for a in st.V.dense(with_error=True))
    z = np.abs(Vf - Vd) / np.maximum(se, 1e-12 * np.abs(Vd).max())
    assert z.max() < 6.0 and np.sqrt(np.mean(z**2)) < 1.5, (z.max(), np.sqrt(np.mean(z**2)))
    assert np.abs(Vf - Vd).max() / np.abs(Vd).max() < 0.3  # the largest of 160 000 errors of ≈ √(2/S)
    A = np.random.default_rng(1).normal(size=(6, 20, 20))
    A = A + np.swapaxes(A, 1, 2)
    runs = np.stack([np.asarray(Vb.contract(A)) for Vb in _batches(st.V)])
    zc = np.abs(np.asarray(st.V.contract(A)) - np.einsum("abcd,iab,jcd->ij", Vd, A, A))
    zc = zc / (runs.std(0, ddof=1) / np.sqrt(len(runs)))
    assert zc.max() < 5.0, zc.max()
    G = st.K + st.K1 / st.width
    y = np.sin(2 * x[:8, :1])
    a, b = nlo_moments(G, Vd, st.width, y, 0.5), nlo_moments(G, st.V, st.width, y, 0.5)
    zm = np.abs(np.asarray(b.mean - a.mean)) / np.asarray(b.mean_se)
    zv = np.abs(np.asarray(b.covariance - a.covariance)) / np.maximum(np.asarray(b.covariance_se), 1e-300)
    assert zm.max() < 4.5 and zv.max() < 5.0, (zm.max(), zv.max())
    # the 1/n terms are resolved: their Monte Carlo error is a small fraction of them
    assert np.abs(np.asarray(b.mean_se)).max() < 0.4 * np.abs(np.asarray(a.mean - a.gp_mean)).max()
