"""O(1/n) statistics of the NTK, the dNTK and the ddNTKs at initialization (THEORY.md §6, §9).

Definitions (ΔĤ = Ĥ - E Ĥ; all at layer ℓ, normalized by n = n_{ℓ-1}; sample indices after the
semicolon, every sum over ordered index values, book chapters 8, 11 and ∞):

* mean NTK          E[Ĥ_{i1i2;α1α2}] = δ_{i1i2} [Θ_{α1α2} + H1_{α1α2}/n]                          (§6.2, §6.5)
* NTK variance      E[ΔĤ_{i1i2;α1α2} ΔĤ_{i3i4;α3α4}]
                    = [δ_{i1i2}δ_{i3i4} A_{(α1α2)(α3α4)} + δ_{i1i3}δ_{i2i4} B_{α1α3α2α4}
                       + δ_{i1i4}δ_{i2i3} B_{α1α4α2α3}]/n                                          (§6.3)
* NTK-preactivation E[ΔĤ_{i1i2;α1α2} z_{i3;α3} z_{i4;α4}]
                    = [δ_{i1i2}δ_{i3i4} D_{α1α2α3α4} + δ_{i1i3}δ_{i2i4} F_{α1α3α2α4}
                       + δ_{i1i4}δ_{i2i3} F_{α1α4α2α3}]/n                                          (§6.3)
* dNTK              E[dĤ_{i0i1i2;δ0δ1δ2} z_{i3;δ3}]
                    = [δ_{i0i3}δ_{i1i2} P_{δ0δ1δ2δ3} + δ_{i0i1}δ_{i2i3} Q_{δ0δ1δ2δ3}
                       + δ_{i0i2}δ_{i1i3} Q_{δ0δ2δ1δ3}]/n                                          (§9.3)
* ddNTKs            E[ddĤ_I{i0i1i2i3;δ0δ1δ2δ3}] = [δ_{i0i1}δ_{i2i3} R_{δ0δ1δ2δ3} + 2 cyclic]/n,
                    E[ddĤ_II{i1i2i3i4;δ1δ2δ3δ4}] = [δ_{i1i2}δ_{i3i4} S_{δ1δ2δ3δ4}
                       + δ_{i1i3}δ_{i4i2} T_{δ1δ3δ4δ2} + δ_{i1i4}δ_{i2i3} U_{δ1δ4δ2δ3}]/n          (§9.4)

with dĤ and ddĤ the λ-weighted contractions of second and third parameter derivatives of §9.1.
Arrays store the tensors in exactly the written index order: ``B[p, q, r, s]`` = B_{pqrs} (the two
NTKs are (p, r) and (q, s)), ``F[p, q, r, s]`` = F_{pqrs} (NTK, z, NTK, z: (p, q) on one neuron,
(r, s) on the other), ``T[p, q, r, s]`` = T_{pqrs} (so E[ddĤ_II{ikik;δ1δ2δ3δ4}] = T[δ1, δ3, δ4, δ2]/n
for i ≠ k), ``U[p, q, r, s]`` = U_{pqrs}.  All vanish at ℓ = 1.

Every statistic obeys a layer-to-layer recursion with the hyperparameters of layer ℓ+1, Gaussian
expectations ⟨·⟩ = ⟨·⟩_{K^(ℓ)} and the width ratio r_ℓ = n_ℓ/n_{ℓ-1} in front of every term that
propagates an O(1/n) tensor (THEORY.md §0.3).  The recursions are those of THEORY.md §6.4–6.5 and
§9.3–9.4, with the corrected T of §9.4.  They need

* four-point expectations ⟨σ^(p)_a σ^(q)_b σ^(r)_c σ^(s)_d⟩ for every index tuple: each set of m <= 4
  distinct inputs gets one nested tensor rule of eft_prob.gauss (sinh trapezoid for smooth σ, the
  kink-split rule otherwise) that returns the moments of all products of derivatives at once, and
  the (N, N, N, N) tensors are gathered from these tables;
* Stein forms ⟨∂_β(f_a h_b)⟩ = δ_{βa}⟨f'_a h_b⟩ + δ_{βb}⟨f_a h'_b⟩ and the "χ-like" derivatives of
  pair functions, Σ_β X_{β1β2} ∂⟨f_a h_b⟩/∂K_{β1β2} (ordered sums, K_{β1β2} and K_{β2β1} independent),
  which for kinked σ come from automatic differentiation of the closed forms.

For kinked (scale-invariant) σ, σ'' and σ''' are distributions and a real network's second
parameter derivatives miss them, so the dNTK and ddNTK statistics (P, Q, R, S, T, U) are computed
for smooth activations only; K, K^{1}, V, Θ, H^{1}, A, B, D, F for any activation.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import gauss
from .._config import float64_theory, is_concrete
from .._validate import check_inputs
from ..spec import MLPSpec
from .kernels import _canonical, _first_layer, _kernel_stack, _shift_ok, _width_ratios
from .vertex import _grad_hess, _partials, _remat

__all__ = ["NTKStatistics", "ntk_statistics"]

# Nodes per axis of the nested rules for m distinct inputs (smooth: the adapted sinh trapezoid; kinked:
# 2q, q Gauss nodes per half-line).  Measured against 40 nodes per axis (tanh, depth 3, nine inputs
# with K up to ~2): K1, H1 to 1e-10, V, B, R, S, U to ~1e-6, A, D, F, P, Q, T to ~5e-6 relative; the
# four-input rule dominates both the error and the cost (24 -> 20 nodes: 2x faster, 10x larger error).
_NODES = {False: {1: 96, 2: 56, 3: 32, 4: 24}, True: {1: 64, 2: 32, 3: 20, 4: 16}}
_MAX_ELEMS = 8_000_000  # grid points times functions per quadrature chunk (the innermost grid is not stored)
#: three-input tables use the addition theorem (and the unrolled innermost loop) only in groups of at
#: least this many subsets: the loop compiles slowly (joint moments on 4 + 5 inputs, 84 subsets: 7.5 s
#: more compilation for 0.06 s less per call), and the marginals' groups (224 subsets at 8 + 8) gain 2.2x
_SHIFT3_MIN_SUBSETS = 128
_PAIR_ORDER = 5  # pair moments ⟨σ^(p)_a σ^(q)_b⟩ with p, q <= 5 (Hessian of ⟨σ'σ'⟩ needs σ^(5))


def _nodes_key(kinked: bool) -> tuple:
    """_NODES[kinked] as a hashable (static) argument of the compiled recursions."""
    return tuple(sorted(_NODES[kinked].items()))


# --------------------------------------------------------------------------------------------
# Derivatives of σ and product moments over distinct inputs.


def _d(fn):
    """Elementwise derivative of an elementwise function (one JVP with unit tangents)."""
    return lambda z: jax.jvp(fn, (z,), (jnp.ones_like(z),))[1]


@functools.cache
def _derivative_fns(act, order: int):
    """(σ, σ', ..., σ^(order)) as elementwise functions."""
    fs = [act.fn, act.grad]
    while len(fs) <= order:
        fs.append(_d(fs[-1]))
    return tuple(fs[: order + 1])


@functools.cache
def _basis(P: int, max_size: int):
    """Products of derivative orders on one variable: all multisets of {0..P} of size 1..max_size."""
    out = []
    for s in range(1, max_size + 1):
        out.extend(itertools.combinations_with_replacement(range(P + 1), s))
    return tuple(out)


def _basis_products(basis):
    """(σ, ..., σ^(P)) values -> tuple over the basis of Π_{p in t} σ^(p)."""
    return lambda vals: tuple(math.prod((vals[p] for p in t[1:]), start=vals[t[0]]) for t in basis)


def _basis_eval(fns, basis):
    """z -> tuple over the basis of Π_{p in t} σ^(p)(z), each of z's shape."""
    products = _basis_products(basis)
    return lambda z: products([g(z) for g in fns])


@jax.custom_jvp
def _sums_last(xs):
    """tuple of equal-shape arrays -> tuple of their sums over the last axis, in one variadic reduction.

    XLA's CPU backend then evaluates every function of the innermost grid variable in one loop, instead of
    materializing their stack (F, ...) or recomputing shared subexpressions in F separate reductions.
    The sum is linear, so its derivative is the plain sum of the tangents (transposable for reverse mode).
    """
    zero = tuple(jnp.zeros((), x.dtype) for x in xs)
    return jax.lax.reduce(tuple(xs), zero, lambda a, b: tuple(u + v for u, v in zip(a, b)), (xs[0].ndim - 1,))


@_sums_last.defjvp
def _sums_last_jvp(primals, tangents):
    (xs,), (ts,) = primals, tangents
    return _sums_last(xs), tuple(jnp.sum(t, axis=-1) for t in ts)


def _nested_table(K, evals, kinked: bool, n: int, parity=None, shift=None):
    """T[b, f_0, ..., f_{m-1}] = ⟨Π_k evals[k](z_k)[f_k]⟩ for kernels K (B, m, m), flattened to (B, F^m).

    One nested rule (:func:`eft_prob.gauss._nested_nodes`); the sum over ξ_k is taken innermost
    first, each step contracting the functions of z_k with the table of the inner variables.

    ``parity`` (smooth rules, even n): a ±1 array (F,) with evals[k](−z)[f] = parity[f]·evals[k](z)[f]
    for every k (odd σ: σ^(p) has parity (−1)^(p+1)).  The table is then (1 + Π_k parity[f_k]) times
    the sum over the outer half ξ_0 < 0 of the point-symmetric grid (``_nested_nodes(half=True)``):
    half the function evaluations, which dominate the cost.

    ``shift`` (three- and four-input smooth rules): (rule, order, products) to evaluate the innermost
    variable with the addition theorem ``rule`` (:func:`eft_prob.gauss.shift_rule`) instead of
    ``evals[-1]``: σ, ..., σ^(order) at each node, combined by ``products`` into the same functions.
    """
    m = K.shape[-1]
    acc = None
    # the innermost variable as an unrolled loop: always for four inputs; for three (smaller grids, more
    # functions: the loop compiles slowly) only with the addition theorem (8 + 8 inputs, tanh: 2.2x faster
    # three-input tables, 4.9 s instead of 1.5 s to compile)
    if not kinked and _UNROLLED_INNER and (m == 4 or (shift is not None and m == 3)):
        zs, ws, (mu, s, x, w) = gauss._nested_nodes(K, kinked, n, half=parity is not None, split_last=True)
        acc = _inner_sums(evals[m - 1], mu, s, x, w, shift)
    else:
        zs, ws = gauss._nested_nodes(K, kinked, n, half=parity is not None)
    for k in reversed(range(m if acc is None else m - 1)):
        z = zs[k].reshape(zs[k].shape[: 1 + k + 1])  # drop the singleton axes of inner variables
        if acc is None and _FUSED_SUMS:  # the innermost variable: one loop over the grid, F_k sums (F_k, B, n^k)
            w = jnp.broadcast_to(ws[k], z.shape)
            acc = jnp.stack(_sums_last(tuple(v * w for v in evals[k](z))))
        elif acc is None:
            acc = jnp.sum(jnp.stack(evals[k](z)) * ws[k], axis=-1)
        else:
            phi = jnp.stack(evals[k](z)) * ws[k]  # (F_k, B, n^(k+1))
            acc = _contract(phi, acc) if _BROADCAST_CONTRACT else _einsum_contract(phi, acc)
            acc = acc.reshape((-1, *acc.shape[2:]))
    if parity is not None:
        sign = functools.reduce(np.kron, [np.asarray(parity, np.float64)] * m)
        acc = acc * jnp.asarray(1.0 + sign, acc.dtype)[:, None]
    return acc.T  # (B, F^m)


def _einsum_contract(phi, acc):
    """out[f, g, ...] = Σ_i phi[f, ..., i] acc[g, ..., i] as a batched dot."""
    return jnp.einsum("f...i,g...i->fg...", phi, acc)


@jax.custom_jvp
def _contract(phi, acc):
    """:func:`_einsum_contract` as one fused multiply-reduce (XLA's CPU dot is slower for these tiny
    batched products, 4 × 24 × 4 for the four-input rule).  Its tangent uses the batched dot, whose
    transpose (reverse mode) is a dot too; the transpose of the multiply-reduce was 2.6x slower."""
    return jnp.sum(phi[:, None] * acc[None], axis=-1)


@_contract.defjvp
def _contract_jvp(primals, tangents):
    (phi, acc), (dphi, dacc) = primals, tangents
    return _contract(phi, acc), _einsum_contract(dphi, acc) + _einsum_contract(phi, dacc)


def _inner_sums(ev, mu, s, x, w, shift=None):
    """(F, B, n^(m-1)) sums Σ_j w_j ev(mu + s·x_j)[f] over the innermost variable of a smooth nested rule.

    The nodes run as an unrolled loop over arrays of the outer grid's shape, so the innermost grid
    is never built and no reduction runs over its short last axis (2.2x faster sums on the
    four-input tables).  XLA still stores each node's function values as outer-grid arrays and sums
    the F functions in separate loops over them, so these sums are bound by memory traffic
    (benchmarks/README.md, ``--inner``).  With ``shift`` = (rule, order, products) σ^(p)(mu + s·x_j)
    come from the addition theorem ``rule``: its transcendental functions once on mu and once on the
    n shifts s·x_j, a few products per grid point (``bench_trained.py --shift``).
    """
    pad = lambda a: a[(...,) + (None,) * (mu.ndim - a.ndim)]
    if shift is not None:
        rule, order, products = shift
        state_mu, state_h = rule.split(mu), rule.split(s[..., None] * x)
        ev = lambda j: products(rule.values(state_mu, tuple(pad(v[..., j]) for v in state_h), order))
    else:
        ev_z = ev
        ev = lambda j: ev_z(mu + pad(s * x[..., j]))
    acc = None
    for j in range(x.shape[-1]):
        vals = ev(j)
        wj = pad(w[..., j])
        acc = [wj * v for v in vals] if acc is None else [a + wj * v for a, v in zip(acc, vals)]
    return jnp.stack(acc)


def _chunked_tables(K_sub, evals, kinked, n, per_item, parity=None, shift=None):
    """_nested_table over the leading axis of K_sub in chunks of bounded size, each a
    ``jax.checkpoint`` (as vertex._chunked: value_and_grad of the trained O(1/n) moments, 4 + 2
    inputs, 4.4× faster)."""
    table = _remat(lambda k: _nested_table(k, evals, kinked, n, parity, shift))
    S = K_sub.shape[0]
    chunk = max(1, min(S, _MAX_ELEMS // max(1, per_item)))
    n_chunks = -(-S // chunk)
    pad = n_chunks * chunk - S
    if pad:
        K_sub = jnp.concatenate([K_sub, jnp.broadcast_to(K_sub[:1], (pad, *K_sub.shape[1:]))])
    if n_chunks == 1:
        return table(K_sub)[:S]
    out = jax.lax.map(table, K_sub.reshape(n_chunks, chunk, *K_sub.shape[1:]))
    return out.reshape(n_chunks * chunk, -1)[:S]


def _subset_rank(u, N):
    """Index of the sorted tuple u in itertools.combinations(range(N), len(u)) order."""
    m = len(u)
    r, prev = 0, -1
    for j, v in enumerate(u):
        for w in range(prev + 1, v):
            r += math.comb(N - 1 - w, m - 1 - j)
        prev = v
    return r


@functools.cache
def _table_layout(N: int, P: int, restrict):
    """Which subsets get a table and up to which derivative order.

    Returns {m: [(P_level, subsets (S, m) int array)]} with the groups in table order.  Without
    ``restrict`` every subset gets order P.  With ``restrict = (n_first, orders)``, a subset with
    k inputs of index >= n_first (test inputs) gets order ``orders[k]`` (-1: no table), so that a
    caller needing only entries with few test indices skips the rest (the recursions are closed on
    index subsets: an entry depends only on entries whose inputs are among its own).  The groups
    then run by k first: for each m the first group (if ``orders[0] >= 0`` and n_first >= m) holds
    the subsets of inputs < n_first alone, in the order and at the level of
    ``_table_layout(n_first, orders[0], None)[m]``, so their tables can be computed once and shared
    (:func:`_shared_tables`) by passes that differ only in the inputs >= n_first.
    """
    layout = {}
    for m in range(1, min(4, N) + 1):
        subsets = np.array(list(itertools.combinations(range(N), m)), dtype=np.int32).reshape(-1, m)
        if restrict is None:
            layout[m] = [(P, subsets)]
            continue
        n_first, orders = restrict
        k = np.sum(subsets >= n_first, axis=1)
        levels = np.array([orders[i] if i < len(orders) else -1 for i in k])
        layout[m] = [
            (int(q), subsets[(k == i) & (levels == q)])
            for i in sorted(set(k.tolist()))
            for q in sorted(set(levels[k == i].tolist()))
            if q >= 0
        ]
    return layout


@functools.cache
def _patterns(m: int):
    """Label patterns of 4-tuples with m distinct values: labels[k] = rank of entry k among them."""
    return tuple(t for t in itertools.product(range(m), repeat=4) if set(t) == set(range(m)))


@functools.cache
def _gather_index(N: int, P: int, restrict, combo: tuple[int, ...]):
    """Flat indices into the concatenated tables (one trailing zero) of ⟨σ^(p0)_a σ^(p1)_b σ^(p2)_c σ^(p3)_d⟩.

    Built group by group of the layout: a 4-tuple with values u_0 < ... < u_{m-1} (a subset of the
    layout) and rank pattern ``labels`` reads the subset's table at the multisets of derivative
    orders that ``combo`` puts on each u_j.  Entries of subsets without a table, or whose table
    stops below max(combo), point at the trailing zero.
    """
    layout = _table_layout(N, P, restrict)
    total = sum(len(sub) * len(_basis(q, 5 - m)) ** m for m, groups in layout.items() for q, sub in groups)
    idx = np.full(N**4, total, dtype=np.int64)
    place = N ** np.arange(3, -1, -1, dtype=np.int64)  # flat index of (a, b, c, d) in N⁴
    off = 0
    for m, groups in layout.items():
        for q, subsets in groups:
            basis = _basis(q, 5 - m)
            F = len(basis)
            if q >= max(combo):
                lookup = {t: i for i, t in enumerate(basis)}
                base = off + np.arange(len(subsets), dtype=np.int64) * F**m
                for labels in _patterns(m):
                    orders = [tuple(sorted(p for p, l in zip(combo, labels) if l == j)) for j in range(m)]
                    pos = sum(lookup[o] * F ** (m - 1 - j) for j, o in enumerate(orders))
                    idx[subsets[:, list(labels)].astype(np.int64) @ place] = base + pos
            off += len(subsets) * F**m
    return idx


def _odd_smooth(act, kinked: bool) -> bool:
    """Odd σ on a smooth (point-symmetric) rule: the tables need only half of the outer nodes."""
    return not kinked and _HALF_GRID and gauss.is_odd(act)


#: use the point symmetry of odd σ in the nested rules (off: the full grid, for comparison)
_HALF_GRID = True
#: sum the functions of the innermost variable in one variadic reduction (off: stack, then sum, for comparison)
_FUSED_SUMS = True
#: smooth four-input rules: the innermost variable's nodes as an unrolled loop over the outer grid
#: (off: the innermost grid and a reduction over its last axis, as _FUSED_SUMS says)
_UNROLLED_INNER = True
#: contract each outer variable's functions with the inner table by a broadcast product and a sum
#: over its nodes (off: einsum, i.e. XLA's batched dot)
_BROADCAST_CONTRACT = True


def _moment_tables(act, K, P, kinked, nodes, restrict, shared=None, shift=False):
    """All subset tables of products of σ, ..., σ^(P), concatenated, plus a trailing zero.

    ``shared`` (with ``restrict``): {m: the tables of the first group of m-subsets, those of inputs
    < n_first alone}, computed once by :func:`_shared_tables` and used instead of recomputing them.
    ``shift``: the three- and four-input tables' innermost variable by σ's addition theorem
    (:func:`_shift_ok`).
    """
    fns = _derivative_fns(act, P)
    odd = _odd_smooth(act, kinked)
    parts = []
    for m, groups in _table_layout(K.shape[0], P, restrict).items():
        for i, (q, subsets) in enumerate(groups):
            if i == 0 and shared is not None and m in shared and subsets.max() < restrict[0]:
                size = len(subsets) * len(_basis(q, 5 - m)) ** m
                if shared[m].shape != (size,):
                    raise ValueError(f"shared tables of {m}-subsets have shape {shared[m].shape}, expected ({size},)")
                parts.append(shared[m])
            else:
                big = m == 4 or (m == 3 and len(subsets) >= _SHIFT3_MIN_SUBSETS)
                rule = gauss.shift_rule(act) if shift and big else None
                parts.append(_group_tables(fns[: q + 1], K, subsets, kinked, nodes[m], odd, rule))
    return jnp.concatenate([*parts, jnp.zeros(1, K.dtype)])


def _group_tables(fns, K, subsets, kinked: bool, n: int, odd: bool, rule=None):
    """Flat tables of one layout group: products of ``fns`` (σ, ..., σ^(q)) on each subset's inputs;
    ``rule``: the addition theorem of σ for the innermost variable (three- and four-input rules).
    The registry's sin: in closed form (:func:`eft_prob.gauss.sin_tables`)."""
    m = subsets.shape[1]
    basis = _basis(len(fns) - 1, 5 - m)
    K_sub = K[subsets[:, :, None], subsets[:, None, :]]
    if gauss.closed_sin(fns):
        return gauss.sin_tables(K_sub, basis).reshape(-1)
    evals = [_basis_eval(fns, basis)] * m
    parity = [(-1) ** sum(p + 1 for p in t) for t in basis] if odd else None
    shift = None if rule is None else (rule, len(fns) - 1, _basis_products(basis))
    return _chunked_tables(K_sub, evals, kinked, n, len(basis) * n**m, parity, shift).reshape(-1)


def _shared_tables(spec: MLPSpec, X_first, level: int, nodes):
    """Per-layer tables of the subsets of ``X_first`` alone, for ``_stack(..., shared=...)``.

    {m: (L-1, size)}: at every layer step ℓ -> ℓ+1 the tables of the m-subsets of the inputs
    ``X_first`` at derivative order ``level``, from the layer-ℓ kernel of those inputs (the kernel
    recursion is closed on them).  A pass over X_first followed by other inputs, restricted with
    n_first = len(X_first) and orders[0] = level, then skips these tables; computing them once
    serves every batch of the other inputs.
    """
    act, kinked = spec.activation, spec.activation.kinked
    nodes = dict(nodes)
    fns, odd = _derivative_fns(act, level), _odd_smooth(act, kinked)
    layout = _table_layout(X_first.shape[0], level, None)
    Ks = _kernel_stack(spec, X_first).nngp[:-1]  # K^(ℓ), ℓ = 1..L-1: the inputs of the L-1 layer steps
    return jax.lax.map(
        lambda K: {m: _group_tables(fns, K, groups[0][1], kinked, nodes[m], odd) for m, groups in layout.items()}, Ks
    )


def _four_point(tables, N, P, restrict, combo):
    """(N, N, N, N) tensor ⟨σ^(combo[0])_a σ^(combo[1])_b σ^(combo[2])_c σ^(combo[3])_d⟩."""
    return tables[_gather_index(N, P, restrict, combo)].reshape(N, N, N, N)


def _pair_moments(act, K, P, kinked, n):
    """M[p, q, a, b] = ⟨σ^(p)_a σ^(q)_b⟩ for all ordered pairs, the diagonal included (singular 2×2 rule)."""
    N = K.shape[0]
    fns = _derivative_fns(act, P)
    a, b = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    pairs = np.stack([a.ravel(), b.ravel()], 1)
    K_sub = K[pairs[:, :, None], pairs[:, None, :]]
    ev = lambda z: tuple(g(z) for g in fns)
    parity = [(-1) ** (p + 1) for p in range(P + 1)] if _odd_smooth(act, kinked) else None
    if gauss.closed_sin(fns):
        table = gauss.sin_tables(K_sub, tuple((p,) for p in range(P + 1)))
    else:
        table = _chunked_tables(K_sub, [ev, ev], kinked, n, (P + 1) * n * n, parity)
    return table.reshape(N, N, P + 1, P + 1).transpose(2, 3, 0, 1)


# --------------------------------------------------------------------------------------------
# Pair functions and their derivatives in the coordinates (K_aa, K_bb, K_ab) of each pair.
#
# g[u, a, b] with u = 0, 1, 2 for K_aa, K_bb, K_ab (symmetric parameter), h[u, v, a, b] the
# Hessian; on the diagonal a = b the function depends on K_aa only and everything sits on u = 0.


class _Pair(NamedTuple):
    val: jax.Array  # (N, N)
    g: jax.Array  # (3, N, N)
    h: jax.Array  # (3, 3, N, N)


def _on_diagonal(g, h, g1, h1):
    N = g.shape[-1]
    eye = jnp.eye(N, dtype=bool)
    g = jnp.where(eye, 0.0, g).at[0].add(jnp.diag(g1))
    h = jnp.where(eye, 0.0, h).at[0, 0].add(jnp.diag(h1))
    return g, h


def _smooth_pair(M, val, p):
    """Derivatives of ⟨σ^(p)_a σ^(p)_b⟩ from the Stein moments M[p, q] = ⟨σ^(p)_a σ^(q)_b⟩."""
    m = lambda i, j: M[p + i, p + j]
    g = jnp.stack([m(2, 0) / 2, m(0, 2) / 2, m(1, 1)])
    h = jnp.stack(
        [
            jnp.stack([m(4, 0) / 4, m(2, 2) / 4, m(3, 1) / 2]),
            jnp.stack([m(2, 2) / 4, m(0, 4) / 4, m(1, 3) / 2]),
            jnp.stack([m(3, 1) / 2, m(1, 3) / 2, m(2, 2)]),
        ]
    )
    # a = b: G(K) = ⟨f(z)²⟩, G' = ½⟨(f²)''⟩ = ⟨f''f⟩ + ⟨f'²⟩, G'' = ¼⟨(f²)''''⟩ = ½⟨f''''f⟩ + 2⟨f'''f'⟩ + (3/2)⟨f''²⟩
    dg = lambda X: jnp.diagonal(X)
    g1 = dg(m(2, 0)) + dg(m(1, 1))
    h1 = dg(m(4, 0)) / 2 + 2 * dg(m(3, 1)) + 1.5 * dg(m(2, 2))
    g, h = _on_diagonal(g, h, g1, h1)
    return _Pair(val, g, h)


def _closed_pair(pair_fn, diag_fn, K):
    """Derivatives of a closed-form pair function by automatic differentiation (kinked σ).

    ``diag_fn(K_aa)`` is the same expectation for a = b (the arc-cosine forms are not
    differentiable at ρ = 1, where ⟨σ'_aσ'_b⟩ has an infinite slope in K_ab).
    """
    d = jnp.diagonal(K)
    args = (d[:, None] + 0 * K, d[None, :] + 0 * K, K)
    val = pair_fn(*args)
    g, h = _grad_hess(pair_fn, args)
    df = lambda k: _partials(diag_fn, (k,), 0)
    g, h = _on_diagonal(g, h, df(d), _partials(df, (d,), 0))
    return _Pair(val, g, h)


# --------------------------------------------------------------------------------------------
# Contractions with derivatives of pair functions (ordered sums over β).


def _diag2(W):
    """W[a, b, c, c] -> (a, b, c)."""
    return jnp.einsum("abcc->abc", W)


def _d_last(g, W):
    """out[a,b,c,d] = Σ_β W[a, b, β1, β2] ∂g_{cd}/∂K_{β1β2}."""
    Wd = _diag2(W)
    Ws = (W + jnp.swapaxes(W, -1, -2)) / 2
    return g[0] * Wd[:, :, :, None] + g[1] * Wd[:, :, None, :] + g[2] * Ws


def _d_first(g, W):
    """out[a,b,c,d] = Σ_β ∂g_{ab}/∂K_{β1β2} W[β1, β2, c, d]."""
    return jnp.transpose(_d_last(g, jnp.transpose(W, (2, 3, 0, 1))), (2, 3, 0, 1))


def _d_same(g, W):
    """out[a,b] = Σ_β W[a, b, β1, β2] ∂g_{ab}/∂K_{β1β2}."""
    return jnp.einsum("abab->ab", _d_last(g, W))


def _d_mat(g, X):
    """out[a,b] = Σ_β X[β1, β2] ∂g_{ab}/∂K_{β1β2}."""
    x = jnp.diagonal(X)
    return g[0] * x[:, None] + g[1] * x[None, :] + g[2] * (X + X.T) / 2


def _dd_same(h, W):
    """out[a,b] = Σ_β W[β1, β2, β3, β4] ∂²g_{ab}/∂K_{β1β2}∂K_{β3β4} (W symmetric within each pair)."""
    N = W.shape[0]
    A = jnp.broadcast_to(jnp.arange(N)[:, None], (N, N))
    B = A.T
    I, J = (A, B, A), (A, B, B)
    Wb = jnp.stack([jnp.stack([W[I[u], J[u], I[v], J[v]] for v in range(3)]) for u in range(3)])
    return jnp.sum(h * Wb, axis=(0, 1))


def _vv(g1, g2, V):
    """Σ_β V[β1β2β3β4] ∂g1_{ab}/∂K_{β1β2} ∂g2_{cd}/∂K_{β3β4} -> (a, b, c, d)."""
    return _d_last(g2, _d_first(g1, V))


def _f_stein(F, f_lo, f_hi, g_lo, g_hi):
    """out[a,b,c,d] = Σ_{β1β2} F[a, β1, c, β2] ⟨∂_β1 f_ab⟩ ⟨∂_β2 g_cd⟩ (F in (NTK, z, NTK, z) order).

    First-order Stein forms of pair functions, ⟨∂_β(u_a v_b)⟩ = δ_βa ⟨u'_a v_b⟩ + δ_βb ⟨u_a v'_b⟩, given as
    the pair-moment matrices f_lo = ⟨u'_a v_b⟩, f_hi = ⟨u_a v'_b⟩ (and g_lo, g_hi for g).  This is how
    F enters the recursions of F, Q and T: E[ΔĤ_{j1j2} f(z_j1) g(z_j2)] = Σ F K⁻¹⟨z f⟩ K⁻¹⟨z g⟩/n.
    """
    x, y = lambda M: M[:, :, None, None], lambda M: M[None, None]
    return (
        x(f_lo) * y(g_lo) * jnp.einsum("aacc->ac", F)[:, None, :, None]
        + x(f_lo) * y(g_hi) * jnp.einsum("aacd->acd", F)[:, None, :, :]
        + x(f_hi) * y(g_lo) * jnp.einsum("abcc->abc", F)[:, :, :, None]
        + x(f_hi) * y(g_hi) * F
    )


# --------------------------------------------------------------------------------------------
# The recursion.


_STATS = ("K", "Theta", "K1", "V", "H1", "A", "B", "D", "F", "P", "Q", "R", "S", "T", "U")


def _zeros_state(K1, T1, derivatives):
    N = K1.shape[0]
    z2 = jnp.zeros_like(K1)
    z4 = jnp.zeros((N,) * 4, K1.dtype)
    st = {"K": K1, "Theta": T1, "K1": z2, "V": z4, "H1": z2, "A": z4, "B": z4, "D": z4, "F": z4}
    if derivatives:
        st.update({k: z4 for k in ("P", "Q", "R", "S", "T", "U")})
    return st


def _layer_step(act, st, hyper, derivatives: bool, nodes, restrict=None, shared=None, shift=False):
    """One step ℓ -> ℓ+1 of every recursion (THEORY.md §3.5, §6.2–6.5, §9.3–9.4)."""
    C_b, C_W, l_b, l_W, r = hyper
    K, Th = st["K"], st["Theta"]
    N = K.shape[0]
    kinked = act.kinked
    P = 3 if derivatives else 1
    ss, dd = gauss.sigma_moments(act, K, shift=shift)

    # Pair functions ⟨σσ⟩, ⟨σ'σ'⟩ with derivatives, and first-order Stein moments.
    if kinked:
        A2 = act.A2  # scale-invariant: ⟨σ²⟩_K = A2 K, ⟨σ'²⟩_K = A2 (THEORY.md §4.3)
        S2 = _closed_pair(lambda a, b, c: act.pair(a, b, c)[0], lambda k: A2 * k, K)
        D2 = _closed_pair(lambda a, b, c: act.pair(a, b, c)[1], lambda k: A2 + 0 * k, K)
        # ⟨σ''_a σ_b⟩ = (⟨z_a σ'_a σ_b⟩ - K_ab⟨σ'_a σ'_b⟩)/K_aa (Stein), and zσ'(z) = σ(z) here.
        dK = jnp.diagonal(K)
        pos = dK > 0
        e20 = jnp.where(pos[:, None], (ss - K * dd) / jnp.where(pos, dK, 1.0)[:, None], 0.0)
        e31 = e22 = None
    else:
        M = _pair_moments(act, K, _PAIR_ORDER, False, nodes[2])
        S2 = _smooth_pair(M, ss, 0)
        D2 = _smooth_pair(M, dd, 1)
        e20, e31, e22 = M[2, 0], M[3, 1], M[2, 2]

    tables = _moment_tables(act, K, P, kinked, nodes, restrict, shared, shift)
    E = functools.partial(_four_point, tables, N, P, restrict)
    E0000, E1100, E1111 = E((0, 0, 0, 0)), E((1, 1, 0, 0)), E((1, 1, 1, 1))

    # Ω̄_{ab} = λ_W σ_aσ_b + C_W Θ_ab σ'_aσ'_b (THEORY.md §6.2): mean and derivatives.
    Om = l_W * ss + C_W * Th * dd
    gOm = l_W * S2.g + C_W * Th * D2.g
    E0011 = jnp.transpose(E1100, (2, 3, 0, 1))  # ⟨σ_aσ_bσ'_cσ'_d⟩
    OmOm = l_W**2 * E0000 + l_W * C_W * (Th[None, None] * E0011 + Th[:, :, None, None] * E1100)
    OmOm = OmOm + C_W**2 * Th[:, :, None, None] * Th[None, None] * E1111
    Om_ss = l_W * E0000 + C_W * Th[:, :, None, None] * E1100  # ⟨Ω̄_ab σ_c σ_d⟩

    V, G1, D, A, B, F, H1 = (st[k] for k in ("V", "K1", "D", "A", "B", "F", "H1"))
    out = {}
    out["K"] = C_b + C_W * ss
    out["Theta"] = l_b + l_W * ss + C_W * dd * Th
    out["V"] = C_W**2 * (E0000 - ss[:, :, None, None] * ss[None, None] + r * _vv(S2.g, S2.g, V))
    corr = lambda pair: _d_mat(pair.g, G1) + 0.5 * _dd_same(pair.h, V)  # 𝒞[f]: 1/n part of E[f]
    out["K1"] = r * C_W * corr(S2)
    W_H = D + 2 * jnp.transpose(F, (0, 2, 1, 3))  # D_{abβ1β2} + 2 F_{aβ1bβ2}
    out["H1"] = r * (l_W * corr(S2) + C_W * Th * corr(D2) + C_W * dd * H1 + C_W * _d_same(D2.g, W_H))

    # B'_{pqrs}: NTKs (p, r), (q, s).
    out["B"] = C_W**2 * (
        E1111 * Th[:, None, :, None] * Th[None, :, None, :] + r * dd[:, :, None, None] * dd[None, None] * B
    )
    # F'_{pqrs} (NTK p, z q, NTK r, z s).
    E1100_F = jnp.einsum("prqs->pqrs", E1100) * Th[:, None, :, None]  # ⟨σ'_pσ'_rσ_qσ_s⟩ Θ_pr
    out["F"] = C_W**2 * (E1100_F + r * _f_stein(F, e20, dd, e20, dd))  # f = σ'_pσ_q, g = σ'_rσ_s
    # D'_{abcd} (NTK ab, z cd).
    out["D"] = C_W * (
        Om_ss
        - Om[:, :, None, None] * ss[None, None]
        + r * (_vv(gOm, S2.g, V) + C_W * dd[:, :, None, None] * _d_last(S2.g, D))
    )
    # A'_{(ab)(cd)}.
    DOm = dd[:, :, None, None] * _d_last(gOm, D)  # ⟨σ'_aσ'_b⟩ Σ_β D_{abβ} ∂⟨Ω̄_cd⟩/∂K_β
    out["A"] = (
        OmOm
        - Om[:, :, None, None] * Om[None, None]
        + r
        * (
            _vv(gOm, gOm, V)
            + C_W * (DOm + jnp.transpose(DOm, (2, 3, 0, 1)))
            + C_W**2 * dd[:, :, None, None] * dd[None, None] * A
        )
    )
    if derivatives:
        out.update(_derivative_step(E, st, out, Th, dd, e20, e31, e22, C_W, l_W, r))
    return out


def _derivative_step(E, st, new, Th, dd, e20, e31, e22, C_W, l_W, r):
    """P, Q, R, S, T, U at layer ℓ+1 (THEORY.md §9.3–9.4, T as corrected there)."""
    P, Q, R, S, T, U, B, F = (st[k] for k in ("P", "Q", "R", "S", "T", "U", "B", "F"))
    E1111, E2110, E3111, E2211 = E((1, 1, 1, 1)), E((2, 1, 1, 0)), E((3, 1, 1, 1)), E((2, 2, 1, 1))
    E1100 = E((1, 1, 0, 0))
    x = lambda M: M[:, :, None, None]  # M[a, b] on axes (0, 1)
    y = lambda M: M[None, None]  # M[c, d] on axes (2, 3)
    out = {}

    # P'_{abcd} (δ0 δ1 δ2 δ3) and Q'.
    src_PQ = C_W**2 * E2110 * Th[:, :, None, None] * Th[:, None, :, None]  # Θ_ab Θ_ac
    Baa = jnp.einsum("aabc->abc", B)  # B[a, a, b, c]
    Paa = jnp.einsum("abca->abc", P)  # P[a, b, c, a]
    out["P"] = src_PQ + r * C_W**2 * dd[None, :, :, None] * (
        e20[:, None, None, :] * (Baa[:, :, :, None] + Paa[:, :, :, None]) + P * dd[:, None, None, :]
    )
    Fq = _f_stein(F, e31, e22, e20, dd)  # Σ F_{aβ1cβ2}⟨∂β1(σ''_aσ'_b)⟩⟨∂β2(σ'_cσ_d)⟩
    Qcc = jnp.einsum("abcc->abc", Q)  # Q[a, b, c, c]
    out["Q"] = (
        src_PQ + (l_W / C_W) * new["F"] + r * C_W**2 * (x(Th) * Fq + x(dd) * (Qcc[:, :, :, None] * y(e20) + Q * y(dd)))
    )

    # U'_{pqrs} = U_{δ1δ4δ2δ3}: p = δ1, q = δ4, r = δ2, s = δ3.
    src_U = jnp.einsum("prsq->pqrs", E2211 * Th[:, :, None, None] * Th[:, None, :, None] * Th[None, :, None, :])
    out["U"] = C_W**2 * (src_U + r * x(dd) * y(dd) * U)

    # S'_{abcd}: B_{abcd} has NTKs (a, c), (b, d).
    out["S"] = (
        C_W * l_W * E1111 * Th[:, None, :, None] * Th[None, :, None, :]
        + C_W**2 * E2211 * Th[:, :, None, None] * Th[:, None, :, None] * Th[None, :, None, :]
        + r * C_W * y(dd) * (l_W * x(dd) + C_W * x(Th) * x(e22)) * B
        + r * C_W**2 * x(dd) * y(dd) * S
    )

    # R'_{abcd} (δ0 δ1 δ2 δ3).
    Pa = jnp.einsum("acda->acd", P)  # P[a, c, d, a]
    BP = Baa + Pa  # B[a, a, c, d] + P[a, c, d, a]  (a, c, d)
    Pb = jnp.transpose(P, (0, 3, 1, 2))  # P[a, c, d, b] -> [a, b, c, d]
    E2011 = jnp.transpose(E2110, (0, 3, 1, 2))  # ⟨σ''_a σ_b σ'_c σ'_d⟩
    out["R"] = (
        l_W * C_W * E2011 * Th[:, None, :, None] * Th[:, None, None, :]
        + C_W**2 * E3111 * Th[:, :, None, None] * Th[:, None, :, None] * Th[:, None, None, :]
        + r
        * y(dd)
        * (
            l_W * C_W * (x(e20) * BP[:, None] + x(dd) * Pb)
            + C_W**2 * x(Th) * (x(e31) * BP[:, None] + x(e22) * Pb)
            + C_W**2 * x(dd) * R
        )
    )

    # T'_{acdb} with a = δ1, b = δ2, c = δ3, d = δ4: build X[a, b, c, d], then T'[a, c, d, b] = X.
    def FF(f_lo, f_hi, g_lo, g_hi):
        """𝓕_{ac|bd}(f, g) = Σ F_{aβ1bβ2}⟨∂β1 f_ac⟩⟨∂β2 g_bd⟩ -> [a, b, c, d]."""
        return jnp.transpose(_f_stein(F, f_lo, f_hi, g_lo, g_hi), (0, 2, 1, 3))

    ac = lambda M: M[:, None, :, None]  # M[a, c]
    bd = lambda M: M[None, :, None, :]  # M[b, d]
    ab = lambda M: M[:, :, None, None]
    Q4 = jnp.transpose(Q, (0, 2, 1, 3))  # Q[a, c, b, d] -> [a, b, c, d]
    Q_acbb = jnp.einsum("acbb->abc", Q)[:, :, :, None]  # Q[a, c, b, b]
    Q_bdaa = jnp.einsum("bdaa->abd", Q)[:, :, None, :]  # Q[b, d, a, a]
    Q_bdac = jnp.transpose(Q, (2, 0, 3, 1))  # Q[b, d, a, c] -> [a, b, c, d]
    E1201 = jnp.transpose(E2110, (1, 0, 3, 2))  # ⟨σ'_a σ''_b σ_c σ'_d⟩ = E2110[b, a, d, c]
    E1100_T = jnp.transpose(E1100, (0, 1, 2, 3))  # ⟨σ'_aσ'_bσ_cσ_d⟩
    T_old = jnp.transpose(T, (0, 3, 1, 2))  # T[a, c, d, b] -> [a, b, c, d]
    X = (
        l_W**2 * E1100_T * ab(Th)
        + r * l_W**2 * FF(e20, dd, e20, dd)
        + C_W * l_W * E1201 * ab(Th) * bd(Th)
        + r * C_W * l_W * bd(Th) * FF(e20, dd, e31, e22)
        + r * C_W * l_W * bd(dd) * (ac(e20) * Q_bdaa + ac(dd) * Q_bdac)
        + C_W * l_W * E2110 * ab(Th) * ac(Th)
        + r * C_W * l_W * ac(Th) * jnp.transpose(FF(e20, dd, e31, e22), (1, 0, 3, 2))
        + r * C_W * l_W * ac(dd) * (bd(e20) * Q_acbb + bd(dd) * Q4)
        + r * C_W**2 * ac(dd) * bd(dd) * T_old
        + C_W**2 * E2211 * ab(Th) * ac(Th) * bd(Th)
        + r * C_W**2 * ac(Th) * bd(Th) * FF(e31, e22, e31, e22)
        + r * C_W**2 * bd(Th) * ac(dd) * (bd(e31) * Q_acbb + bd(e22) * Q4)
        + r * C_W**2 * ac(Th) * bd(dd) * (ac(e31) * Q_bdaa + ac(e22) * Q_bdac)
    )
    out["T"] = jnp.transpose(X, (0, 2, 3, 1))  # T'[a, c, d, b] = X[a, b, c, d]
    return out


# --------------------------------------------------------------------------------------------
# Driver and public API.


def _check_activation(act, derivatives: bool):
    if act.kinked and act.slopes is None:
        raise ValueError(
            f"NTK statistics for the kinked activation {act.name!r} need closed forms: they are implemented "
            "for smooth activations and for the scale-invariant class (ReLU, leaky ReLU)."
        )
    if derivatives and act.kinked:
        raise ValueError(
            f"dNTK/ddNTK statistics (P, Q, R, S, T, U) are not available for the kinked activation {act.name!r}: "
            "they contain σ'' and σ''' (δ-functions and their derivatives for ReLU-like σ), which are not defined "
            "pointwise. Use a smooth activation (tanh, erf, gelu, swish, ...), or derivatives=False for "
            "K, K1, V, Θ, H1, A, B, D, F."
        )


def _stack(
    spec: MLPSpec, X, ratios, *, derivatives: bool, all_layers: bool, nodes, restrict=None, shared=None, shift=False
):
    """Run every recursion; ``ratios`` = _width_ratios of the actual spec (``spec`` may be canonical).

    ``shared``: :func:`_shared_tables` of the first ``restrict[0]`` inputs at level ``restrict[1][0]``
    (the same nodes), used at every layer instead of recomputing those tables.  ``shift``: the
    four-input tables by σ's addition theorem (only where :func:`_shift_ok` says it is exact).
    """
    act = spec.activation
    K1, T1 = _first_layer(spec, X)
    st = _zeros_state(K1, T1, derivatives)
    if spec.depth == 1:
        return jax.tree_util.tree_map(lambda a: a[None], st) if all_layers else st
    names = ("C_b", "C_W", "lambda_b", "lambda_W")
    hyper = (*(spec.layer_values(k, K1.dtype)[1:] for k in names), jnp.asarray(ratios, K1.dtype))

    def step(carry, xs):
        h, sh = xs
        nxt = _layer_step(act, carry, h, derivatives, dict(nodes), restrict, sh, shift)
        return nxt, (nxt if all_layers else None)

    last, ys = jax.lax.scan(step, st, (hyper, shared))
    if all_layers:
        return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), st, ys)
    return last


_stack_jit = jax.jit(_stack, static_argnames=("derivatives", "all_layers", "nodes", "restrict", "shift"))


_shared_tables_jit = jax.jit(_shared_tables, static_argnames=("level", "nodes"))


class NTKStatistics(NamedTuple):
    """The O(1/n) statistics of the output layer (or of every layer); see the module docstring.

    Each field is (N, N) or (N, N, N, N) — with a leading layer axis of length L when computed
    with ``all_layers=True`` — in the index order of the module docstring; ``P`` ... ``U`` are None
    when the dNTK/ddNTK statistics were not computed.  ``width`` is n_{L-1}, the width that
    normalizes the output-layer tensors (layer ℓ's tensors are normalized by n_{ℓ-1}).
    ``K1`` is THEORY.md's G^{1}.
    """

    K: jax.Array
    Theta: jax.Array
    K1: jax.Array
    V: jax.Array
    H1: jax.Array
    A: jax.Array
    B: jax.Array
    D: jax.Array
    F: jax.Array
    P: jax.Array | None
    Q: jax.Array | None
    R: jax.Array | None
    S: jax.Array | None
    T: jax.Array | None
    U: jax.Array | None
    width: int


@float64_theory
def ntk_statistics(spec: MLPSpec, X, *, all_layers: bool = False, derivatives: bool | None = None) -> NTKStatistics:
    """Mean, fluctuations and derivatives of the NTK at O(1/n) (THEORY.md §6.2–6.5, §9.3–9.4).

    Parameters
    ----------
    spec : MLPSpec
        Any smooth activation, or a scale-invariant one (ReLU, leaky ReLU) without the dNTK/ddNTK
        statistics; unequal hidden widths enter through r_ℓ = n_ℓ/n_{ℓ-1}.
    X : (N, input_dim) array
        The tensors are (N, N, N, N): use at most a few tens of inputs.
    all_layers : bool
        Return every layer (leading axis L) instead of the output layer.
    derivatives : bool, optional
        Also compute P, Q (dNTK) and R, S, T, U (ddNTK means).  Default: True for smooth
        activations; for kinked ones it must be False.

    Returns
    -------
    NTKStatistics
        float64 arrays in the index conventions of the module docstring.

    Notes
    -----
    Cost per layer: one nested Gaussian rule per set of up to four distinct inputs (C(N, 4) rules
    of 24⁴ nodes for smooth σ) and a few dozen (N, N, N, N) contractions.  Jit-able.
    """
    X = check_inputs(spec, X)
    act = spec.activation
    if derivatives is None:
        derivatives = not act.kinked
    _check_activation(act, bool(derivatives))
    nodes = _nodes_key(act.kinked)
    kw = dict(derivatives=bool(derivatives), all_layers=bool(all_layers), nodes=nodes, shift=_shift_ok(spec, X))
    ratios = _width_ratios(spec, X.dtype)
    if is_concrete(spec, X):
        st = _stack_jit(_canonical(spec), X, ratios, **kw)
    else:
        st = _stack(spec, X, ratios, **kw)
    width = spec.widths[-2] if spec.depth > 1 else spec.widths[0]
    return NTKStatistics(**{k: st.get(k) for k in _STATS}, width=width)
