"""O(1/n) NTK statistics: oracles, exact results, structure (THEORY.md §6.3–6.5, §7.1, §9.3–9.4, O5–O8, O14).

Monte Carlo checks against real networks are in test_ntk_stats_mc.py.
"""

import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eft_prob as ep
from eft_prob import gauss
from eft_prob.activations import Activation, get_activation, leaky_relu
from eft_prob.theory.ntk_stats import _NODES, _four_point, _moment_tables, ntk_statistics
from eft_prob.theory.vertex import four_point_vertex, nlo_kernel

X2 = 1.2 * np.array([[1.0, 0.5, -0.3], [0.2, -1.0, 0.7]])
X3 = np.array([[0.9, -0.4, 0.5], [0.1, 1.0, -0.6], [-0.7, 0.3, 0.8]])
TANH = dict(C_b=0.2, C_W=1.5, lambda_b=0.3, lambda_W=1.0)
NAMES = ("V", "K1", "H1", "A", "B", "D", "F", "P", "Q", "R", "S", "T", "U")


def _np(a):
    return np.asarray(a, dtype=float)


def _scalar(st, name, layer=None):
    a = _np(getattr(st, name))
    return float((a if layer is None else a[layer]).ravel()[0])


# --------------------------------------------------------------------------------------------
# Oracles.


def test_O7_relu_closed_forms_every_layer():
    """ReLU at criticality, one input (THEORY.md §7.1): Θ = ℓθ, V = 5(ℓ-1)K², B, F, D closed forms, A by
    its scalar recursion; G^{1} = H^{1} = 0.  Layer 4 is oracle O7: Θ = 10, V = 240, B = 175, F = 120,
    D = 300, A = 467.5."""
    L, lW = 7, 1.0
    spec = ep.MLPSpec(3, (16,) * (L - 1), 1, "relu", C_b=0.0, C_W=2.0, lambda_b=0.5, lambda_W=lW)
    st = ntk_statistics(spec, np.array([[1.0, 2.0, -1.0]]), all_layers=True)
    K, th = 4.0, 0.5 + lW * 4.0 / 2
    A = 0.0
    for l in range(1, L + 1):
        i = l - 1
        assert _scalar(st, "Theta", i) == pytest.approx(l * th, rel=1e-12)
        assert _scalar(st, "V", i) == pytest.approx(5 * (l - 1) * K**2, rel=1e-10, abs=1e-10)
        assert _scalar(st, "B", i) == pytest.approx(th**2 * (l - 1) * l * (2 * l - 1) / 3, rel=1e-10, abs=1e-10)
        assert _scalar(st, "F", i) == pytest.approx(K * th * l * (l - 1), rel=1e-10, abs=1e-10)
        D = l * (l - 1) / 2 * (2.5 * lW * K**2 + K * th)
        assert _scalar(st, "D", i) == pytest.approx(D, rel=1e-10, abs=1e-10)
        assert _scalar(st, "A", i) == pytest.approx(A, rel=1e-10, abs=1e-9)
        assert abs(_scalar(st, "H1", i)) < 1e-10 and abs(_scalar(st, "K1", i)) < 1e-10
        T = l * th
        A = 1.25 * lW**2 * K**2 + T**2 + lW * K * T + lW**2 / 4 * 5 * (l - 1) * K**2 + lW * D + A
    assert [_scalar(st, k, 3) for k in ("Theta", "V", "B", "F", "D", "A")] == pytest.approx(
        [10, 240, 175, 120, 300, 467.5], rel=1e-10
    )


def test_O5_tanh_single_input_table():
    spec = ep.MLPSpec(1, (8,) * 9, 1, "tanh", C_b=0.0, C_W=1.0, lambda_b=0.0, lambda_W=1.0)
    st = ntk_statistics(spec, np.array([[1.0]]), all_layers=True, derivatives=False)
    table = {2: (0.85870, 0.0000, 0.00982, 0.4632, -0.0311, 0.2217),
             3: (0.78305, -0.0663, 0.01003, 0.8261, -0.0523, 0.4334),
             5: (0.70311, -0.2910, 0.00964, 1.5062, -0.0911, 0.8747),
             10: (0.62413, -1.1133, 0.01193, 3.1815, -0.1765, 2.0441)}  # fmt: skip
    for l, (th, h1, a, b, d, f) in table.items():
        i = l - 1
        K, T = _scalar(st, "K", i), _scalar(st, "Theta", i)
        assert T == pytest.approx(th, abs=1e-5)
        assert _scalar(st, "H1", i) / T == pytest.approx(h1, abs=1e-4)
        assert _scalar(st, "A", i) / T**2 == pytest.approx(a, abs=1e-5)
        assert _scalar(st, "B", i) / T**2 == pytest.approx(b, abs=1e-4)
        assert _scalar(st, "D", i) / (K * T) == pytest.approx(d, abs=1e-4)
        assert _scalar(st, "F", i) / (K * T) == pytest.approx(f, abs=1e-4)


def test_O6_two_input_tanh():
    st = ntk_statistics(ep.MLPSpec(3, (8, 8), 1, "tanh", **TANH), X2, derivatives=False)
    np.testing.assert_allclose(_np(st.Theta), [[1.661967, 0.513901], [0.513901, 1.692489]], atol=1e-6)
    np.testing.assert_allclose(_np(st.H1), [[-0.03208, 0.06311], [0.06311, -0.02762]], atol=1e-5)
    A, B, D, F = (_np(getattr(st, k)) for k in "ABDF")
    for T, idx, v in [(A, (0, 0, 0, 0), 0.2364), (A, (0, 1, 0, 1), 0.4275), (A, (0, 0, 0, 1), 0.0372),
                      (A, (1, 1, 1, 1), 0.2781), (B, (0, 0, 0, 0), 1.8517), (B, (0, 1, 0, 1), 1.1802),
                      (B, (0, 0, 1, 1), 0.0418), (B, (1, 1, 1, 1), 1.9827), (D, (0, 0, 0, 0), -0.2110),
                      (D, (0, 1, 0, 1), 0.4027), (D, (1, 1, 1, 1), -0.2289), (F, (0, 0, 0, 0), 0.2500),
                      (F, (0, 1, 0, 1), 0.7001), (F, (0, 0, 1, 1), 0.0033), (F, (1, 1, 1, 1), 0.2574)]:  # fmt: skip
        assert T[idx] == pytest.approx(v, abs=1e-4), idx


def test_O8_dntk_single_input():
    st = ntk_statistics(ep.MLPSpec(3, (8, 8), 1, "tanh", **TANH), np.array([[1.0, -0.7, 0.4]]))
    for k, v in [("K", 0.7305), ("Theta", 1.6278), ("V", 0.2218), ("B", 1.7148), ("F", 0.2416), ("P", -0.5926),
                 ("Q", -0.2524)]:  # fmt: skip
        assert _scalar(st, k) == pytest.approx(v, abs=1e-4), k


# --------------------------------------------------------------------------------------------
# Exact results and consistency with the rest of eft_prob.


@pytest.mark.slow
@pytest.mark.parametrize("act, kw", [("tanh", TANH), ("relu", dict(C_b=0.1, C_W=2.0, lambda_b=0.3))])
def test_kernels_vertex_and_nlo_kernel_match_their_modules(act, kw):
    spec = ep.MLPSpec(3, (8, 8, 8), 1, act, **kw)
    st = ntk_statistics(spec, X3, all_layers=True, derivatives=False)
    k = ep.theory.kernels(spec, X3)
    np.testing.assert_allclose(_np(st.K), _np(k.nngp), rtol=1e-13)
    np.testing.assert_allclose(_np(st.Theta), _np(k.ntk), rtol=1e-13)
    np.testing.assert_allclose(_np(st.K1), _np(nlo_kernel(spec, X3, all_layers=True)), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(_np(st.V), _np(four_point_vertex(spec, X3, all_layers=True)), rtol=1e-6, atol=1e-9)


def test_deep_linear_network_exact_statistics_with_unequal_widths():
    """σ(z) = z: E[Ĥ] = Θ and E[zz] = K exactly (H^{1} = K^{1} = 0), and for i ≠ k the exact
    E[Ĥ_ik Ĥ_ik] = C_W² [E Ĥ_jj²/n_ℓ + (1 - 1/n_ℓ) E Ĥ_jl²] gives B^(L)/n_{L-1} = Σ_ℓ C_W^{2(L-ℓ)} Θ_ℓ²/n_ℓ
    at O(1/n): this fixes where the width ratios r_ℓ = n_ℓ/n_{ℓ-1} enter (one input)."""
    hidden, C_W = (3, 7, 5, 11), 1.3
    spec = ep.MLPSpec(2, hidden, 1, "linear", C_b=0.2, C_W=C_W, lambda_b=0.4, lambda_W=0.7)
    st = ntk_statistics(spec, np.array([[0.6, -1.1]]), all_layers=True)
    L = spec.depth
    T = _np(st.Theta)[:, 0, 0]
    B_exact = spec.widths[L - 1] * sum(C_W ** (2 * (L - l)) * T[l - 1] ** 2 / spec.widths[l] for l in range(1, L))
    assert _scalar(st, "B", L - 1) == pytest.approx(B_exact, rel=1e-12)
    assert np.max(np.abs(_np(st.H1))) < 1e-12 and np.max(np.abs(_np(st.K1))) < 1e-12
    for k in ("P", "R", "U"):  # every source term has a σ'' (= 0) or, for R, a σ'' or σ'''
        assert np.max(np.abs(_np(getattr(st, k)))) < 1e-12, k


def test_symmetries():
    """THEORY.md §6.3, §9.3–9.4, O14 (three inputs, depth 4, all layers)."""
    st = ntk_statistics(ep.MLPSpec(3, (8, 8, 8), 1, "tanh", **TANH), X3, all_layers=True)
    t = lambda a, p: np.transpose(a, (0, *(1 + np.array(p))))
    A, B, D, F, P, R, S, T, U = (_np(getattr(st, k)) for k in "ABDFPRSTU")
    np.testing.assert_allclose(A, t(A, (1, 0, 2, 3)), atol=1e-12)
    np.testing.assert_allclose(A, t(A, (2, 3, 0, 1)), atol=1e-12)
    np.testing.assert_allclose(B, t(B, (1, 0, 3, 2)), atol=1e-12)  # swap the two NTKs: B_1324 = B_3142
    np.testing.assert_allclose(B, t(B, (2, 3, 0, 1)), atol=1e-12)  # transpose both NTKs: B_1324 = B_2413
    np.testing.assert_allclose(D, t(D, (1, 0, 2, 3)), atol=1e-12)
    np.testing.assert_allclose(D, t(D, (0, 1, 3, 2)), atol=1e-12)
    np.testing.assert_allclose(F, t(F, (2, 3, 0, 1)), atol=1e-12)  # F_1324 = F_2413
    np.testing.assert_allclose(P, t(P, (0, 2, 1, 3)), atol=1e-12)  # P_0123 = P_0213
    np.testing.assert_allclose(R, t(R, (0, 1, 3, 2)), atol=1e-12)  # ddĤ_I symmetric in its last three slots
    np.testing.assert_allclose(S, t(S, (1, 0, 3, 2)), atol=1e-12)  # ddĤ_II{b1b2b3b4} = ddĤ_II{b2b1b4b3}
    np.testing.assert_allclose(T, t(T, (3, 2, 1, 0)), atol=1e-12)  # T_{δ1δ3δ4δ2} = T_{δ2δ4δ3δ1}
    np.testing.assert_allclose(U, t(U, (2, 3, 0, 1)), atol=1e-12)  # U_{δ1δ4δ2δ3} = U_{δ2δ3δ1δ4}
    for k in NAMES:  # first layer: all O(1/n) tensors vanish
        assert np.max(np.abs(_np(getattr(st, k))[0])) == 0.0


@pytest.mark.slow
def test_duplicated_and_permuted_inputs():
    """Repeated inputs are handled by the singular-kernel rules: duplicating input 0 as input 3 gives
    tensors whose index 3 behaves exactly like index 0; permuting inputs permutes every tensor."""
    spec = ep.MLPSpec(3, (8, 8), 1, "tanh", **TANH)
    st = ntk_statistics(spec, X3)
    dup = ntk_statistics(spec, np.concatenate([X3, X3[:1]]))
    perm = [2, 0, 1]
    pst = ntk_statistics(spec, X3[perm])
    for k in NAMES:
        a, b, c = _np(getattr(st, k)), _np(getattr(dup, k)), _np(getattr(pst, k))
        idx = np.ix_(*([[0, 1, 2]] * a.ndim))
        np.testing.assert_allclose(b[idx], a, rtol=1e-9, atol=1e-11, err_msg=k)
        swap = np.ix_(*([[3, 1, 2]] * a.ndim))  # index 3 is a copy of index 0
        np.testing.assert_allclose(b[swap], a, rtol=5e-6, atol=1e-8, err_msg=k)
        np.testing.assert_allclose(c, a[np.ix_(*([perm] * a.ndim))], rtol=1e-6, atol=1e-9, err_msg=k)


# --------------------------------------------------------------------------------------------
# The Gaussian moment tables.


@pytest.mark.slow
@pytest.mark.parametrize("act", ["tanh", pytest.param("relu", marks=pytest.mark.heavy)])
def test_four_point_tables_equal_direct_quadrature(act):
    """Every (a, b, c, d) entry, repeated indices included, against expect_nd on the (singular) 4×4
    sub-kernel of the tuple."""
    act = get_activation(act)
    kinked = act.kinked
    P = 1 if kinked else 3
    K = jnp.asarray([[0.9, 0.3, -0.2], [0.3, 0.7, 0.1], [-0.2, 0.1, 1.2]])
    nodes = _NODES[kinked]
    tables = _moment_tables(act, K, P, kinked, nodes, None)
    fns = [act.fn, act.grad]
    for _ in range(P - 1):
        fns.append(lambda z, f=fns[-1]: jax.jvp(f, (z,), (jnp.ones_like(z),))[1])
    combos = [(0, 0, 0, 0), (1, 1, 0, 0)] + ([] if kinked else [(2, 1, 1, 0), (3, 1, 1, 1), (2, 2, 1, 1)])
    tuples = np.array(list(itertools.product(range(3), repeat=4)))
    Ks = K[tuples[:, :, None], tuples[:, None, :]]  # (81, 4, 4), singular for repeated indices
    for combo in combos:
        T = _np(_four_point(tables, 3, P, None, combo)).reshape(-1)
        f = lambda a, b, c, d, cb=combo: fns[cb[0]](a) * fns[cb[1]](b) * fns[cb[2]](c) * fns[cb[3]](d)
        ref = _np(gauss.expect_nd(f, Ks, kinked=kinked, n=24 if kinked else 32))
        np.testing.assert_allclose(T, ref, rtol=2e-5, atol=2e-7, err_msg=str(combo))


@pytest.mark.slow
def test_restricted_tables_give_the_same_entries():
    """The trained-network path computes only entries with few test indices; those are exact."""
    spec = ep.MLPSpec(2, (8, 8), 1, "tanh", **TANH)
    X = np.array([[0.5, -0.3], [1.0, 0.4], [-0.8, 0.9], [0.2, 1.1], [-1.0, -0.5]])
    full = ntk_statistics(spec, X)
    from eft_prob.theory.ntk_stats import _stack, _width_ratios

    nodes = tuple(sorted(_NODES[False].items()))
    kw = dict(derivatives=True, all_layers=False, nodes=nodes, restrict=(3, (3, 3, 2)))
    raw = _stack(spec, jnp.asarray(X), _width_ratios(spec), **kw)
    n_test = sum(np.meshgrid(*[np.arange(5) >= 3] * 4, indexing="ij"))
    for k, max_test in [("A", 2), ("B", 2), ("D", 2), ("F", 2), ("P", 2), ("Q", 2), ("R", 1), ("S", 1), ("T", 1)]:
        ok = n_test <= max_test
        np.testing.assert_allclose(_np(raw[k])[ok], _np(getattr(full, k))[ok], rtol=1e-12, atol=1e-14, err_msg=k)


def _gather_index_loop(N, P, restrict, combo):
    """The gather index as first written: one Python pass over all N⁴ tuples (the reference)."""
    from eft_prob.theory.ntk_stats import _basis, _table_layout

    layout = _table_layout(N, P, restrict)
    where, off = {}, 0
    for m, groups in layout.items():
        for q, subsets in groups:
            F = len(_basis(q, 5 - m))
            for r, u in enumerate(map(tuple, subsets)):
                where[u] = (q, off + r * F**m)
            off += len(subsets) * F**m
    lookup = {(m, q): {t: i for i, t in enumerate(_basis(q, 5 - m))} for m in range(1, 5) for q in range(P + 1)}
    idx = np.full(N**4, off, dtype=np.int64)
    for flat, tup in enumerate(itertools.product(range(N), repeat=4)):
        u = tuple(sorted(set(tup)))
        if u not in where or where[u][0] < max(combo):
            continue
        q, pos = where[u]
        m = len(u)
        F = len(lookup[m, q])
        for j, v in enumerate(u):
            orders = tuple(sorted(p for p, t in zip(combo, tup) if t == v))
            pos += lookup[m, q][orders] * F ** (m - 1 - j)
        idx[flat] = pos
    return idx


@pytest.mark.parametrize("N", [1, 2, 3, 4, 7])
def test_gather_index_matches_the_tuple_loop(N):
    """The vectorized gather index (one numpy scatter per layout group and rank pattern) equals the
    per-tuple loop exactly, for full and restricted layouts and every combination the recursions use."""
    from eft_prob.theory.ntk_stats import _gather_index

    combos = sorted(set(itertools.permutations((0, 0, 0, 0))) | set(itertools.permutations((1, 1, 0, 0))))
    combos += sorted(set(itertools.permutations((2, 1, 1, 0))) | {(1, 1, 1, 1), (3, 1, 1, 1), (2, 2, 1, 1)})
    for P, restrict in [(1, None), (3, None), (3, (min(N, 3), (3, 3, 2))), (3, (1, (3, 2)))]:
        for combo in combos:
            if max(combo) > P:
                continue
            got = _gather_index(N, P, restrict, combo)
            np.testing.assert_array_equal(
                got, _gather_index_loop(N, P, restrict, combo), err_msg=f"{P} {restrict} {combo}"
            )


def test_odd_activations_use_half_of_the_nested_grid(monkeypatch):
    """For odd σ the four-point and pair tables come from half of the outer nodes (point symmetry of
    the smooth rule); they equal the full-grid tables to rounding, repeated inputs included."""
    from eft_prob.theory import ntk_stats as ns

    spec = ep.MLPSpec.at_criticality(3, (64, 64), 1, "tanh")
    Xr = np.random.default_rng(0).normal(size=(6, 3))
    Xr[5] = Xr[2]
    K = ep.theory.nngp(spec, Xr)
    nodes = dict(_NODES[False])
    assert ns._odd_smooth(spec.activation, False) and not ns._odd_smooth(get_activation("gelu"), False)
    assert not ns._odd_smooth(get_activation("relu"), True)
    out = {}
    for half in (True, False):
        monkeypatch.setattr(ns, "_HALF_GRID", half)
        # compiled (a fresh trace per setting of _HALF_GRID): eager evaluation took a minute
        out[half] = (
            _np(jax.jit(lambda K: ns._moment_tables(spec.activation, K, 3, False, nodes, None))(K)),
            _np(jax.jit(lambda K: ns._moment_tables(spec.activation, K, 3, False, nodes, (3, (3, 3, 2))))(K)),
            _np(jax.jit(lambda K: ns._pair_moments(spec.activation, K, 5, False, nodes[2]))(K)),
        )
    for a, b in zip(out[True], out[False]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-14 * np.abs(b).max())
        assert np.mean(np.abs(b) > 1e-8 * np.abs(b).max()) > 0.3  # not only the entries that vanish by parity


def _assert_table_paths_agree(monkeypatch, table, K, dK, w, settings):
    """For each of the two ``settings`` ({ntk_stats attribute: value}): jit the table's value, its JVP
    along dK and the gradient of Σ w·table (the flags are read when tracing, and each jit traces
    afresh); the two settings must agree to 1e-13 of the largest entry."""
    from eft_prob.theory import ntk_stats as ns

    out = []
    for flags in settings:
        for k, v in flags.items():
            monkeypatch.setattr(ns, k, v)
        val, tan = jax.jit(lambda K, dK: jax.jvp(table, (K,), (dK,)))(K, dK)
        grad = jax.jit(jax.grad(lambda K: jnp.sum(w * table(K))))(K)
        out.append((val, tan, grad))
    for a, b in zip(*out):
        a, b = _np(a), _np(b)
        assert np.all(np.isfinite(a)) and np.abs(b).max() > 1e-3
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13 * np.abs(b).max())


@pytest.mark.parametrize("name, m", [("tanh", 4), ("tanh", 3), ("relu", 4), ("gelu", 3)])
def test_fused_innermost_sums_and_their_derivatives(monkeypatch, name, m):
    """The innermost variable's functions are summed in one variadic reduction with its own JVP rule:
    values, forward- and reverse-mode derivatives equal those of the plain stack-and-sum to rounding
    (half grid for tanh, the kink-split rule for ReLU, the full smooth grid for GELU)."""
    from eft_prob.theory import ntk_stats as ns

    act = get_activation(name)
    kinked, odd = act.kinked, ns._odd_smooth(act, act.kinked)
    basis = ns._basis(1 if kinked else 2, 5 - m)
    fns = ns._derivative_fns(act, 1 if kinked else 2)
    parity = [(-1) ** sum(p + 1 for p in t) for t in basis] if odd else None
    n = ns._NODES[kinked][m]
    A = np.random.default_rng(1).normal(size=(3, m, m))
    K = jnp.asarray(A @ A.transpose(0, 2, 1) / m + 0.2 * np.eye(m))
    dK = jnp.asarray(np.random.default_rng(2).normal(size=K.shape))
    dK = dK + dK.transpose(0, 2, 1)
    w = jnp.asarray(np.random.default_rng(3).normal(size=(3, len(basis) ** m)))

    def table(K):
        return ns._nested_table(K, [ns._basis_eval(fns, basis)] * m, kinked, n, parity)

    # _UNROLLED_INNER off: else the smooth four-input rule does not reduce the last axis
    settings = [{"_UNROLLED_INNER": False, "_FUSED_SUMS": fused} for fused in (True, False)]
    _assert_table_paths_agree(monkeypatch, table, K, dK, w, settings)


@pytest.mark.parametrize("name, m", [("tanh", 4), ("sin", 4), ("tanh", 3)])
def test_tables_by_the_addition_theorem(name, m):
    """The three- and four-input rules' innermost variable from σ's addition theorem (gauss.shift_rule):
    values, forward- and reverse-mode derivatives equal direct evaluation to rounding, on the half grid,
    for kernels of variance up to ~12 and a singular one (a repeated input: conditional sd 0)."""
    from eft_prob.theory import ntk_stats as ns

    act = get_activation(name)
    basis = ns._basis(3, 5 - m)
    fns = ns._derivative_fns(act, 3)
    assert ns._odd_smooth(act, False)
    parity = [(-1) ** sum(p + 1 for p in t) for t in basis]
    A = np.random.default_rng(4).normal(size=(3, m, 5))
    A[2, m - 1] = A[2, 1]  # inputs 1 and m - 1 of the third kernel coincide
    A[1] *= 3.0
    K = jnp.asarray(A @ A.transpose(0, 2, 1) / 5 + 0.1)
    dK = jnp.asarray(np.random.default_rng(5).normal(size=K.shape))
    dK = dK + dK.transpose(0, 2, 1)
    w = jnp.asarray(np.random.default_rng(6).normal(size=(3, len(basis) ** m)))
    shift = (gauss.shift_rule(act), 3, ns._basis_products(basis))
    out = []
    for sh in (None, shift):

        def table(K, sh=sh):
            return ns._nested_table(K, [ns._basis_eval(fns, basis)] * m, False, 24, parity, sh)

        val, tan = jax.jit(lambda K, dK, t=table: jax.jvp(t, (K,), (dK,)))(K, dK)
        grad = jax.jit(jax.grad(lambda K, t=table: jnp.sum(w * t(K))))(K)
        out.append((val, tan, grad))
    for a, b in zip(*out):
        a, b = _np(a), _np(b)
        assert np.all(np.isfinite(a)) and np.abs(b).max() > 1e-3
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13 * np.abs(b).max())


def test_three_input_tables_use_the_addition_theorem_in_large_groups_only():
    """_moment_tables with shift: the four-input group always, three-input groups of at least
    _SHIFT3_MIN_SUBSETS subsets (their unrolled loop compiles slowly), checked through the rule each
    group receives."""
    from eft_prob.theory import ntk_stats as ns

    seen = []
    orig = ns._group_tables

    def spy(fns, K, subsets, kinked, n, odd, rule=None):
        seen.append((subsets.shape[1], len(subsets), rule is not None))
        return orig(fns, K, subsets, kinked, n, odd, rule)

    act = get_activation("tanh")
    K = jnp.asarray(
        ep.theory.nngp(
            ep.MLPSpec.at_criticality(3, (8,), 1, "tanh"),
            np.eye(3)[[0, 1, 2, 0, 1, 2, 0, 1, 2]] * 0.3 + np.arange(9)[:, None] * 0.01,
        )
    )
    try:
        ns._group_tables = spy
        jax.eval_shape(lambda K: ns._moment_tables(act, K, 3, False, dict(_NODES[False]), None, None, True), K)
    finally:
        ns._group_tables = orig
    assert (4, 126, True) in seen and (3, 84, False) in seen and (2, 36, False) in seen


def test_addition_theorem_only_where_it_is_exact():
    """kernels._shift_ok: tanh's rule (exact for arguments up to 300) only when every layer's variance is at
    most _SHIFT_KMAX, checked on concrete values; sin's always; other σ never; traced values (inside
    jit) keep direct evaluation."""
    kernels = importlib.import_module("eft_prob.theory.kernels")  # eft_prob.theory.kernels is also a function

    X = np.random.default_rng(0).normal(size=(5, 3))
    tanh = ep.MLPSpec.at_criticality(3, (64, 64), 1, "tanh")
    assert kernels._shift_ok(tanh, X)
    assert not kernels._shift_ok(tanh, 100.0 * X)  # K^(1) ~ 1e4: raw-pixel-like inputs
    assert not kernels._shift_ok(tanh.replace(C_b=300.0), X)  # deeper layers' K up to C_b + C_W
    assert not kernels._shift_ok(ep.MLPSpec(3, (64, 64), 1, "gelu", C_b=0.17, C_W=1.98), X)
    sin = ep.MLPSpec.at_criticality(3, (64, 64), 1, "sin")
    assert kernels._shift_ok(sin, 100.0 * X)
    seen = []
    jax.jit(lambda X: seen.append(kernels._shift_ok(tanh, X)) or X)(X)
    jax.jit(lambda c: seen.append(kernels._shift_ok(tanh.replace(C_W=c), X)) or c)(1.0)
    assert seen == [False, False]


@pytest.mark.parametrize("half", [True, False])
def test_unrolled_innermost_and_broadcast_contractions(monkeypatch, half):
    """The smooth four-input rule sums its innermost variable as an unrolled loop over the outer grid
    and contracts the outer variables by fused multiply-reduce (with a batched-dot tangent): values,
    forward- and reverse-mode derivatives equal those of the reduction over the stored innermost grid
    with einsum contractions to rounding, on the half grid (odd tanh) and the full one, also for a
    singular kernel (a repeated input: conditional standard deviation 0)."""
    from eft_prob.theory import ntk_stats as ns

    act = get_activation("tanh")
    basis = ns._basis(3, 1)
    fns = ns._derivative_fns(act, 3)
    parity = [(-1) ** sum(p + 1 for p in t) for t in basis] if half else None
    A = np.random.default_rng(4).normal(size=(3, 4, 5))
    A[2, 3] = A[2, 1]  # inputs 1 and 3 of the third kernel coincide
    K = jnp.asarray(A @ A.transpose(0, 2, 1) / 5 + 0.1)
    dK = jnp.asarray(np.random.default_rng(5).normal(size=K.shape))
    dK = dK + dK.transpose(0, 2, 1)
    w = jnp.asarray(np.random.default_rng(6).normal(size=(3, len(basis) ** 4)))

    def table(K):
        return ns._nested_table(K, [ns._basis_eval(fns, basis)] * 4, False, 16, parity)

    settings = [{"_UNROLLED_INNER": new, "_BROADCAST_CONTRACT": new} for new in (True, False)]
    _assert_table_paths_agree(monkeypatch, table, K, dK, w, settings)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("half", [False, True])
def test_nested_nodes_split_last(m, half):
    """_nested_nodes(split_last=True) returns the outer axes unchanged and the innermost variable as
    mu + s·x_j on the outer grid: the same z_{m-1} and weights as the full rule."""
    A = np.random.default_rng(m).normal(size=(2, m, m + 1))
    K = jnp.asarray(A @ A.transpose(0, 2, 1) / (m + 1) + 0.05)
    zs, ws = gauss._nested_nodes(K, False, 8, half=half)
    zo, wo, (mu, s, x, w) = gauss._nested_nodes(K, False, 8, half=half, split_last=True)
    assert len(zo) == len(wo) == m - 1
    for k in range(m - 1):
        np.testing.assert_array_equal(_np(zo[k]), _np(zs[k]))
        np.testing.assert_array_equal(_np(wo[k]), _np(ws[k]))
    pad = (None,) * (m - 1)
    z_last = mu[..., None] + (s[:, None] * x)[(slice(None), *pad, slice(None))]
    np.testing.assert_allclose(_np(z_last), _np(zs[m - 1]).reshape(z_last.shape), rtol=0, atol=1e-14)
    np.testing.assert_array_equal(_np(w), _np(ws[m - 1]).reshape(w.shape))
    with pytest.raises(ValueError, match="split_last"):
        gauss._nested_nodes(K, True, 8, split_last=True)


# --------------------------------------------------------------------------------------------
# API.


def test_kinked_activations_and_errors():
    spec = ep.MLPSpec(3, (8, 8), 1, "relu", C_W=2.0)
    st = ntk_statistics(spec, X3)
    assert st.P is None and st.U is None and st.width == 8
    with pytest.raises(ValueError, match="not available for the kinked"):
        ntk_statistics(spec, X3, derivatives=True)
    leaky = ntk_statistics(ep.MLPSpec(3, (8, 8), 1, leaky_relu(0.2), C_W=1.9), X3)
    assert np.all(np.isfinite(_np(leaky.A)))
    custom = Activation("kinky", lambda z: jnp.where(z > 0, z, jnp.tanh(z)), kinked=True)
    with pytest.raises(ValueError, match="need closed forms"):
        ntk_statistics(ep.MLPSpec(3, (8, 8), 1, custom), X3)
    one = ntk_statistics(ep.MLPSpec(3, (), 2, "tanh"), X3)  # depth 1: Gaussian, frozen NTK
    assert all(np.max(np.abs(_np(getattr(one, k)))) == 0 for k in NAMES) and one.width == 3


def test_float64_and_jit():
    spec = ep.MLPSpec(3, (8, 8), 1, "tanh", **TANH)
    st = ntk_statistics(spec, X2)
    assert all(getattr(st, k).dtype == jnp.float64 for k in NAMES)
    f = jax.jit(lambda cw: ntk_statistics(spec.replace(C_W=cw), X2).B)
    np.testing.assert_allclose(_np(f(1.5)), _np(st.B), rtol=1e-12)


# --------------------------------------------------------------------------------------------
# sin: every Gaussian table in closed form.


def test_sin_tables_in_closed_form():
    """gauss.sin_tables: ⟨Π_k Π_{p in t_k} sin^(p)(z_k)⟩ = Σ_ω C exp(−ωᵀKω/2), exact.  Checked
    against hand formulas (⟨cos z⟩ = e^{−K/2}, ⟨sin_a sin_b⟩ = e^{−(K_aa+K_bb)/2} sinh K_ab, ⟨cos² z⟩ =
    (1 + e^{−2K})/2), and against the nested rules at many nodes for m = 2, 3, 4 on kernels of
    variance <= 1.5 (where those converge to 1e-10), a singular one included; values and gradients."""
    ns = importlib.import_module("eft_prob.theory.ntk_stats")
    act = get_activation("sin")
    fns = ns._derivative_fns(act, 3)
    assert gauss.closed_sin(fns) and not gauss.closed_sin(ns._derivative_fns(get_activation("tanh"), 3))
    assert not gauss.closed_sin(ns._derivative_fns(Activation("s", jnp.sin, grad=lambda z: jnp.cos(z)), 3))
    k = jnp.asarray([[[0.7]], [[2.5]]])
    basis1 = ns._basis(3, 4)
    one = np.asarray(gauss.sin_tables(k, basis1))
    kk = np.array([0.7, 2.5])
    np.testing.assert_allclose(one[:, basis1.index((1,))], np.exp(-kk / 2), rtol=1e-14)
    np.testing.assert_allclose(one[:, basis1.index((1, 1))], (1 + np.exp(-2 * kk)) / 2, rtol=1e-14)
    np.testing.assert_allclose(one[:, basis1.index((0,))], 0.0, atol=1e-16)
    np.testing.assert_allclose(one[:, basis1.index((2, 3))], 0.0, atol=1e-16)  # −sin·(−cos): odd
    K2 = np.array([[0.9, 0.4], [0.4, 1.3]])
    two = np.asarray(gauss.sin_tables(jnp.asarray(K2[None]), ns._basis(3, 3)))[0].reshape(34, 34)
    np.testing.assert_allclose(two[0, 0], np.exp(-(0.9 + 1.3) / 2) * np.sinh(0.4), rtol=1e-14)
    rng = np.random.default_rng(3)
    for m, n in ((2, 64), (3, 48), (4, 40)):
        basis = ns._basis(3, 5 - m)
        A = rng.normal(size=(4, m, m + 2)) * 0.4  # full rank (but the last)
        K = A @ A.transpose(0, 2, 1)
        K[-1] = K[-1][[0] * m][:, [0] * m]  # every input the same: rank one
        K = jnp.asarray(K)
        evals = [ns._basis_eval(fns, basis)] * m
        closed, quad = gauss.sin_tables(K, basis), ns._nested_table(K, evals, False, n)
        np.testing.assert_allclose(closed, quad, rtol=0, atol=1e-10 * float(jnp.max(jnp.abs(quad))))
        w = jnp.asarray(rng.normal(size=closed.shape[1]))
        g_closed = jax.grad(lambda K, b=basis, w=w: jnp.sum(gauss.sin_tables(K, b) @ w))(K[:-1])
        g_quad = jax.grad(lambda K, e=evals, n=n, w=w: jnp.sum(ns._nested_table(K, e, False, n) @ w))(K[:-1])
        # the nested rules read K's lower triangle (Cholesky), the closed form both: compare K_ab + K_ba
        eye = jnp.eye(m)
        g_closed, g_quad = (g + jnp.swapaxes(g, -1, -2) - g * eye for g in (g_closed, g_quad))
        np.testing.assert_allclose(g_closed, g_quad, rtol=0, atol=1e-9 * float(jnp.max(jnp.abs(g_quad))))


def test_sin_closed_forms_reject_bad_arguments():
    """gauss.sin_tables / sin_pair_moments name the argument that is wrong."""
    K = jnp.eye(2)
    with pytest.raises(ValueError, match=r"sin_tables: K_sub must have shape \(S, m, m\)"):
        gauss.sin_tables(K, ((0,),))
    with pytest.raises(ValueError, match="sin_tables: K_sub"):
        gauss.sin_tables(jnp.ones((3, 5, 5)), ((0,),))
    for bad in (((-1,),), ((),), (0,), ((0.5,),), ((True,),)):
        with pytest.raises(ValueError, match="sin_tables: basis must hold tuples of derivative orders"):
            gauss.sin_tables(K[None], bad)
    with pytest.raises(ValueError, match="sin_pair_moments: K must be a square"):
        gauss.sin_pair_moments(K[None], (((0,), (0,)),))
    with pytest.raises(ValueError, match="sin_pair_moments: products must hold pairs"):
        gauss.sin_pair_moments(K, ((0,), (0,)))
    with pytest.raises(ValueError, match="sin_pair_moments: products must hold tuples"):
        gauss.sin_pair_moments(K, (((0,), (-2,)),))
    np.testing.assert_allclose(gauss.sin_pair_moments(K, (((), (1, 1)),))[0], (1 + np.exp(-2.0)) / 2 * np.ones((2, 2)))


def test_sin_statistics_in_closed_form_equal_the_nested_rules():
    """ntk_statistics for sin with the closed-form tables (and pair moments) against the same recursion
    on the nested rules (gauss.CLOSED_SIN off): equal to the rules' own error (inputs scaled so
    every variance is <= 1, where the rules are accurate to ~1e-7)."""
    ns = importlib.import_module("eft_prob.theory.ntk_stats")
    spec = ep.MLPSpec.at_criticality(3, (64, 64), 1, "sin")
    X = 0.5 * np.concatenate([X3, X2])
    kw = dict(derivatives=True, all_layers=False, nodes=ns._nodes_key(False), shift=True)
    ratios = ns._width_ratios(spec, jnp.float64)
    statics = ("derivatives", "all_layers", "nodes", "restrict", "shift")
    closed = jax.jit(ns._stack, static_argnames=statics)(ns._canonical(spec), jnp.asarray(X), ratios, **kw)
    gauss.CLOSED_SIN = False
    try:  # a fresh jit: the flag is read when tracing
        quad = jax.jit(ns._stack, static_argnames=statics)(ns._canonical(spec), jnp.asarray(X), ratios, **kw)
    finally:
        gauss.CLOSED_SIN = True
    for name in NAMES:
        a, b = _np(closed[name]), _np(quad[name])
        assert np.all(np.isfinite(a)) and np.max(np.abs(a)) > 0, name
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.max(np.abs(a)), err_msg=name)
    np.testing.assert_array_equal(_np(closed["K1"]), _np(ntk_statistics(spec, X).K1))


def test_sin_vertex_in_closed_form_equals_the_rules():
    """The vertex recursions for sin with closed-form moments (gauss.sin_pair_moments for the 11 pair
    integrals, gauss.sin_tables for the dense four-point function) against the quadrature rules:
    the pair moments against hand formulas and the 2-D rule at 96 nodes, the dense V and K^{1} of
    four_point_vertex / nlo_kernel and the factored prior statistics' exact parts to the rules' error."""
    vertex = importlib.import_module("eft_prob.theory.vertex")
    act = get_activation("sin")
    K = jnp.asarray(0.6 * X3 @ X3.T + 0.1)
    closed = vertex._smooth_pair_integrals(act, K)
    gauss.CLOSED_SIN = False
    try:
        quad = vertex._smooth_pair_integrals(act, K, n=96)
    finally:
        gauss.CLOSED_SIN = True
    np.testing.assert_allclose(closed, quad, rtol=0, atol=1e-11 * float(jnp.max(jnp.abs(quad))))
    d = np.diagonal(np.asarray(K))
    e = np.exp(-(d[:, None] + d[None, :]) / 2)
    np.testing.assert_allclose(closed[9], e * np.sinh(K), rtol=1e-13)  # ⟨σσ⟩, ⟨σ'σ'⟩: THEORY's closed forms
    np.testing.assert_allclose(closed[10], e * np.cosh(K), rtol=1e-13)
    np.testing.assert_allclose(closed[8][np.diag_indices(3)], (3 - 4 * np.exp(-2 * d) + np.exp(-8 * d)) / 8, rtol=1e-13)
    spec = ep.MLPSpec.at_criticality(3, (64, 64), 1, "sin")
    X = 0.7 * np.concatenate([X3, X2])
    V_c, K1_c = four_point_vertex(spec, X), nlo_kernel(spec, X)
    ps_c = ep.theory.prior_statistics(spec, X, factored=True)
    gauss.CLOSED_SIN = False
    try:
        jax.clear_caches()  # the flag is read when tracing
        V_q, K1_q = four_point_vertex(spec, X), nlo_kernel(spec, X)
        ps_q = ep.theory.prior_statistics(spec, X, factored=True)
    finally:
        gauss.CLOSED_SIN = True
        jax.clear_caches()
    np.testing.assert_allclose(V_c, V_q, rtol=0, atol=1e-7 * float(np.max(np.abs(V_c))))
    np.testing.assert_allclose(K1_c, K1_q, rtol=0, atol=1e-9 * float(np.max(np.abs(K1_c))))
    np.testing.assert_allclose(ps_c.K1, ps_q.K1, rtol=0, atol=1e-9 * float(np.max(np.abs(ps_c.K1))))
    for name in ("M", "P", "A", "B"):
        a, b = _np(getattr(ps_c.V, name)), _np(getattr(ps_q.V, name))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9 * np.max(np.abs(a)), err_msg=name)
