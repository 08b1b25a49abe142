"""Monte Carlo estimators of the O(1/n) NTK statistics from real random networks (test helper).

Per network we compute, from the parameters of a real MLP drawn from the prior:

* the hidden-layer NTK Ĥ^(L-1)_{j1j2;αβ} by the exact forward recursion of THEORY.md §6.1 (checked
  against ``nn.empirical_ntk`` in the tests), and σ(z^(L-1)), σ'(z^(L-1));
* for the dNTK/ddNTK statistics, the output's dĤ, ddĤ_I, ddĤ_II by automatic differentiation of the
  network: with v_b = λ∇_θ z_b, dĤ_{b0b1b2} = D²z_{b0}[v_{b1}, v_{b2}], ddĤ_I_{b0b1b2b3} =
  D³z_{b0}[v_{b1}, v_{b2}, v_{b3}], ddĤ_II_{b1b2b3b4} = (Hz_{b1} v_{b3})ᵀ λ (Hz_{b2} v_{b4}) (H = Hessian).

The NTK moments are Rao–Blackwellized over the last layer (W^(L), b^(L) Gaussian given the layers
below), which removes the last layer's sampling noise (THEORY.md §12 item 9):

    E[Ĥ_ii | <L]            = λ_b + (λ_W/n) Σ_j σ_jα σ_jβ + (C_W/n) Σ_j σ'_jα σ'_jβ Ĥ_{jj;αβ}  =: g_αβ,
    E[z_i z_i | <L]          = C_b + (C_W/n) Σ_j σ_jα σ_jβ                                       =: G_αβ,
    E[Ĥ_{ik;pr} Ĥ_{ik;qs}|<L] = (C_W/n)² Σ_{j,k} σ'_jp σ'_jq σ'_kr σ'_ks Ĥ_{jk;pr} Ĥ_{jk;qs}       (i ≠ k),
    E[Ĥ_{ik;pr} z_iq z_ks|<L] = (C_W/n)² Σ_{j,k} σ'_jp σ_jq σ'_kr σ_ks Ĥ_{jk;pr}                  (i ≠ k),

so that H1 = n(E g − Θ), A = n Cov(g, g), D = n Cov(g, G), B, F = n E[...], K1 = n(E G − K),
V = n Cov(G, G).  P..U are plain averages over all ordered output-neuron pairs i ≠ k of
n dĤ_{ikk}z_i, n dĤ_{iik}z_k, n ddĤ_I{iikk}, n ddĤ_II{iikk}, n ddĤ_II{ikik} (-> T_{δ1δ3δ4δ2}) and
n ddĤ_II{ikki} (-> U_{δ1δ4δ2δ3}).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from eft_prob import nn


def forward_ntks(spec, params, X):
    """[Ĥ^(1), ..., Ĥ^(m)] for the first m = len(params) layers, Ĥ^(ℓ) of shape (n_ℓ, n_ℓ, N, N)
    (the exact forward recursion of THEORY.md §6.1)."""
    l_b, l_W = spec.layer_values("lambda_b", X.dtype), spec.layer_values("lambda_W", X.dtype)
    zs = nn.preactivations(spec, params, X)  # stops after the layers given
    n0 = X.shape[1]
    G0 = X @ X.T / n0
    H = jnp.eye(spec.widths[1])[:, :, None, None] * (l_b[0] + l_W[0] * G0)
    out = [H]
    for ell in range(1, len(params)):
        z = zs[ell - 1].T  # (n_ℓ, N)
        s, ds = spec.activation.fn(z), spec.activation.grad(z)
        W = params[ell]["W"]
        diag = l_b[ell] + l_W[ell] * (s.T @ s) / s.shape[0]
        Y = ds[:, None, :, None] * ds[None, :, None, :] * H
        H = jnp.einsum("ik,klab,jl->ijab", W, Y, W) + jnp.eye(W.shape[0])[:, :, None, None] * diag
        out.append(H)
    return out


def _tree_vdot(a, b, lr):
    leaves = jax.tree_util.tree_map(lambda x, y, l: l * jnp.einsum("b...,c...->bc", x, y), a, b, lr)
    return sum(jax.tree_util.tree_leaves(leaves))


def _per_network(spec, X, derivatives):
    """key -> dict of per-network arrays (see the module docstring)."""
    N, nL = X.shape[0], spec.output_dim
    lr = nn.learning_rates(spec, X.dtype)
    f = lambda p: nn.apply(spec, p, X).T.reshape(-1)  # composite b = i*N + α
    pairs = [(i, k) for i in range(nL) for k in range(nL) if i != k]
    triples = np.array(
        [(i * N + a, k * N + b, k * N + c) for i, k in pairs for a in range(N) for b in range(N) for c in range(N)]
    )

    def one(key):
        p = nn.init(spec, key, X.dtype)
        zh = nn.preactivations(spec, p, X)[-2].T  # (n, N)
        out = {"zh": zh, "Hh": forward_ntks(spec, p[:-1], X)[-1]}
        if derivatives:
            v = jax.tree_util.tree_map(lambda j, l: j * l, jax.jacrev(f)(p), lr)
            vb = lambda b: jax.tree_util.tree_map(lambda t: t[b], v)
            d1 = lambda q, u: jax.jvp(f, (q,), (u,))[1]
            d2 = lambda q, u, w: jax.jvp(lambda s: d1(s, u), (q,), (w,))[1]
            d3 = lambda q, u, w, x: jax.jvp(lambda s: d2(s, u, w), (q,), (x,))[1]
            bs = jnp.arange(N * nL)
            dH = jax.vmap(lambda b1: jax.vmap(lambda b2: d2(p, vb(b1), vb(b2)))(bs))(bs)  # [b1, b2, b0]
            ddI = jax.vmap(lambda t: d3(p, vb(t[0]), vb(t[1]), vb(t[2])))(jnp.asarray(triples))  # [triple, b0]
            hv = jax.vmap(lambda c: jax.jacrev(lambda q: d1(q, vb(c)))(p))(bs)  # leaves [c, b, *shape]
            ddII = sum(
                jax.tree_util.tree_leaves(
                    jax.tree_util.tree_map(lambda h, l: l * jnp.einsum("ca...,db...->abcd", h, h), hv, lr)
                )
            )
            out.update(z=f(p), dH=jnp.transpose(dH, (2, 0, 1)), ddI=ddI, ddII=ddII)
        return out

    return one, pairs


def _conditional(spec, o, X, pairs, derivatives):
    """Per-network Rao–Blackwellized samples of the statistics (normalized by n later)."""
    N, nL = X.shape[0], spec.output_dim
    C_b, C_W = (spec.layer_values(k, X.dtype)[-1] for k in ("C_b", "C_W"))
    l_b, l_W = (spec.layer_values(k, X.dtype)[-1] for k in ("lambda_b", "lambda_W"))
    zh, Hh = o["zh"], o["Hh"]
    n = zh.shape[1]
    s, ds = spec.activation.fn(zh), spec.activation.grad(zh)  # (m, n, N)
    Hjj = jnp.einsum("mjjab->mjab", Hh)
    ss = jnp.einsum("mja,mjb->mab", s, s) / n
    smp = {
        "G": C_b + C_W * ss,
        "g": l_b + l_W * ss + C_W * jnp.einsum("mja,mjb,mjab->mab", ds, ds, Hjj) / n,
        "B": (C_W / n) ** 2 * jnp.einsum("mjp,mjq,mkr,mks,mjkpr,mjkqs->mpqrs", ds, ds, ds, ds, Hh, Hh),
        "F": (C_W / n) ** 2 * jnp.einsum("mjp,mjq,mkr,mks,mjkpr->mpqrs", ds, s, ds, s, Hh),
    }
    if derivatives:
        z = o["z"].reshape(-1, nL, N)
        dH = o["dH"].reshape(-1, nL, N, nL, N, nL, N)
        ddI = o["ddI"].reshape(-1, len(pairs), N, N, N, nL, N)  # [pair, δ1, δ2, δ3, i0, δ0]
        ddII = o["ddII"].reshape(-1, nL, N, nL, N, nL, N, nL, N)
        avg = lambda fn: jnp.stack([fn(q, i, k) for q, (i, k) in enumerate(pairs)], 1).mean(1)
        smp["P"] = avg(lambda q, i, k: jnp.einsum("mabc,md->mabcd", dH[:, i, :, k, :, k, :], z[:, i]))
        smp["Q"] = avg(lambda q, i, k: jnp.einsum("mabc,md->mabcd", dH[:, i, :, i, :, k, :], z[:, k]))
        smp["R"] = avg(lambda q, i, k: jnp.transpose(ddI[:, q, :, :, :, i, :], (0, 4, 1, 2, 3)))
        smp["S"] = avg(lambda q, i, k: ddII[:, i, :, i, :, k, :, k, :])
        smp["T"] = avg(lambda q, i, k: jnp.transpose(ddII[:, i, :, k, :, i, :, k, :], (0, 1, 3, 4, 2)))
        smp["U"] = avg(lambda q, i, k: jnp.transpose(ddII[:, i, :, k, :, k, :, i, :], (0, 1, 4, 2, 3)))
    return smp


def ntk_statistics_mc(spec, X, n_networks, key, *, derivatives=False, chunk=500):
    """{name: (n·estimate, n·standard error)} for K1, V, H1, A, B, D, F (and P..U), raw (no order-0 subtraction).

    ``K1`` and ``H1`` are returned as n·E[G] and n·E[g]: subtract n·K and n·Θ.
    """
    X = jnp.asarray(X, jnp.float64)
    n = spec.widths[-2]
    one, pairs = _per_network(spec, X, derivatives)
    fo = jax.jit(jax.vmap(one))
    fc = jax.jit(lambda o: _conditional(spec, o, X, pairs, derivatives))
    keys = jax.random.split(key, n_networks)
    acc = {}
    for c in range(0, n_networks, chunk):
        for k, v in fc(fo(keys[c : c + chunk])).items():
            acc.setdefault(k, []).append(np.asarray(v))
    S = {k: np.concatenate(v) for k, v in acc.items()}
    M = n_networks
    mean = lambda a: a.mean(0)
    se = lambda a: a.std(0, ddof=1) / np.sqrt(M)

    def cov(a, b):
        prod = (a - a.mean(0))[:, :, :, None, None] * (b - b.mean(0))[:, None, None]
        return n * mean(prod) * M / (M - 1), n * se(prod)

    res = {"H1": (n * mean(S["g"]), n * se(S["g"])), "K1": (n * mean(S["G"]), n * se(S["G"]))}
    res["A"], res["D"], res["V"] = cov(S["g"], S["g"]), cov(S["g"], S["G"]), cov(S["G"], S["G"])
    for k in ("B", "F", "P", "Q", "R", "S", "T", "U"):
        if k in S:
            res[k] = (n * mean(S[k]), n * se(S[k]))
    return res


# --------------------------------------------------------------------------------------------
# Ensembles of networks trained by full-batch gradient descent.


def trained_ensemble(spec, XA, YA, XB, learning_rate, steps, n_networks, key, *, chunk=256):
    """Train ``n_networks`` prior draws by full-batch GD on ½Σ(f(XA) − YA)² (λ-scaled rates, THEORY.md §1.3).

    Returns a dict of numpy arrays over networks: ``f0`` (M, N, n_L) outputs at init on X = XA ∪ XB,
    ``fT`` (M, N_B, n_L) trained test outputs, ``H0`` (M, n_L, n_L, N, N) empirical NTK at init,
    ``G0`` (M, N, N) output-layer metric at init (E[z_i z_i | layers < L]), ``loss`` (M,) final loss.
    """
    X = jnp.concatenate([jnp.asarray(XA, jnp.float64), jnp.asarray(XB, jnp.float64)])
    XA, YA = jnp.asarray(XA, jnp.float64), jnp.asarray(YA, jnp.float64)
    nA = XA.shape[0]
    lr = nn.learning_rates(spec, jnp.float64)
    C_b, C_W = (spec.layer_values(k, jnp.float64)[-1] for k in ("C_b", "C_W"))

    def loss_fn(p):
        r = nn.apply(spec, p, XA) - YA
        return 0.5 * jnp.sum(r * r)

    def step(p, _):
        g = jax.grad(loss_fn)(p)
        return jax.tree_util.tree_map(lambda a, ga, la: a - learning_rate * la * ga, p, g, lr), None

    def one(k):
        p0 = nn.init(spec, k, jnp.float64)
        zs = nn.preactivations(spec, p0, X)
        s = spec.activation.fn(zs[-2])
        p, _ = jax.lax.scan(step, p0, None, length=steps)
        return {
            "f0": zs[-1],
            "fT": nn.apply(spec, p, X[nA:]),
            "H0": nn.empirical_ntk(spec, p0, X),
            "G0": C_b + C_W * (s @ s.T) / s.shape[-1],
            "loss": loss_fn(p),
        }

    f = jax.jit(jax.vmap(one))
    keys = jax.random.split(key, n_networks)
    parts = [f(keys[c : c + chunk]) for c in range(0, n_networks, chunk)]
    return {k: np.concatenate([np.asarray(o[k]) for o in parts]) for k in parts[0]}


def trained_moment_estimates(ens, K, Theta, nA, YA):
    """Control-variate estimates of the mean and covariance of trained outputs (flattened β·n_L + i).

    With L = [−Θ_BA Θ̃⁻¹, 1] (per neuron), g1 = L z(0) is each network's infinite-width linearized
    prediction from its own init (E g1 = 0 exactly), and h = −(ΔĤ_BA − Θ_BA Θ̃⁻¹ ΔĤ_AA) Θ̃⁻¹ (z_A(0) − y)
    its first-order response to its own NTK fluctuation ΔĤ = Ĥ(0) − Θ.  ΔĤ is centred on the exact
    infinite-width Θ, not on the ensemble mean: centred on the sample mean, the y-term of h would sum
    to zero and leave the sample-mean fluctuation of Ĥ in the estimate while hiding it from the standard
    error.  Hence E[h] = (Π H^{1} Θ̃⁻¹ y)/n + O(1/n²) (E[Ĥ z] = 0 by the W^(L) → −W^(L) symmetry) and

        mean = average of f − g1 − h   estimates   E[f_T] − (Π H^{1} Θ̃⁻¹ y)/n,

    i.e. the trained mean without its H^{1} part (see :func:`h1_mean_part`), with an honest standard
    error (independent networks).  For the covariance, Cov(f) = L E[z zᵀ] Lᵀ + [Cov(f) − Cov(g1)], the
    first term with E[z zᵀ] from the Rao–Blackwellized metric G0, the second from the samples.
    Returns (mean, se_mean, cov, se_cov) with mean (N_B, n_L), cov (N_B n_L, N_B n_L).
    """
    f0, fT, H0, G0 = ens["f0"], ens["fT"], ens["H0"], ens["G0"]
    M, N, nL = f0.shape
    nB = N - nA
    Tinv = np.linalg.inv(Theta[:nA, :nA])
    L = np.concatenate([-Theta[nA:, :nA] @ Tinv, np.eye(nB)], axis=1)  # (nB, N)
    eye = np.eye(nL)
    Lc, Tic = np.kron(L, eye), np.kron(Tinv, eye)
    g1 = np.einsum("bd,mdi->mbi", L, f0)
    Hc = np.transpose(H0, (0, 3, 1, 4, 2)).reshape(M, N * nL, N * nL)  # Hc[m, (δ, i), (δ', j)]
    dH = Hc - np.kron(Theta, eye)[None]
    a = nA * nL
    eps = (f0[:, :nA] - np.asarray(YA)[None]).reshape(M, a)
    h = -np.einsum("bx,mxa,ac,mc->mb", Lc, dH[:, :, :a], Tic, eps).reshape(M, nB, nL)
    r = fT - g1 - h
    mean, se_mean = r.mean(0), r.std(0, ddof=1) / np.sqrt(M)
    gf, ff = g1.reshape(M, -1), fT.reshape(M, -1)
    gf, ff = gf - gf.mean(0), ff - ff.mean(0)
    LG = np.einsum("bd,mde,ce->mbc", L, G0, L)  # per network L G0 Lᵀ (Rao–Blackwellized E[g1 g1ᵀ])
    samples = ff[:, :, None] * ff[:, None, :] - gf[:, :, None] * gf[:, None, :]
    samples = samples + np.einsum("mbc,ij->mbicj", LG, eye).reshape(M, nB * nL, nB * nL)
    return mean, se_mean, samples.mean(0), samples.std(0, ddof=1) / np.sqrt(M)


def h1_mean_part(H1, Theta, nA, YA):
    """(Π H^{1} Θ̃⁻¹ y) on the test inputs, (N_B, n_L): the H^{1} part of the trained mean's 1/n coefficient,
    which :func:`trained_moment_estimates` removes with its control variate."""
    Tinv = np.linalg.inv(Theta[:nA, :nA])
    return (H1[nA:, :nA] - Theta[nA:, :nA] @ Tinv @ H1[:nA, :nA]) @ Tinv @ np.asarray(YA)
