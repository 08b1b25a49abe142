import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import eft_prob as ep


def test_prior_outputs_shape_and_chunk_invariance():
    spec = ep.MLPSpec(2, (16, 16), 3, "tanh", C_b=0.1)
    X = np.random.default_rng(0).normal(size=(4, 2))
    a = ep.ensemble.prior_outputs(spec, X, 50, jax.random.key(0))
    b = ep.ensemble.prior_outputs(spec, X, 50, jax.random.key(0), chunk_size=7)
    assert a.shape == (50, 4, 3)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = ep.ensemble.prior_outputs(spec, X, 50, jax.random.key(1))
    assert not np.allclose(a, c)


def test_prior_outputs_layers():
    spec = ep.MLPSpec(2, (5, 6), 1)
    zs = ep.ensemble.prior_outputs(spec, np.ones((3, 2)), 4, jax.random.key(0), layers=True)
    assert [z.shape for z in zs] == [(4, 3, 5), (4, 3, 6), (4, 3, 1)]


def test_hundred_thousand_networks_fit_in_memory():
    spec = ep.MLPSpec(2, (64, 64), 1, "relu", C_W=2.0)
    X = np.random.default_rng(1).normal(size=(3, 2))
    chunk = ep.ensemble.auto_chunk(spec, 3, 100_000)
    assert chunk < 100_000  # chunking is active
    f = ep.ensemble.prior_outputs(spec, X, 100_000, jax.random.key(2))
    assert f.shape == (100_000, 3, 1)
    K = np.asarray(ep.theory.nngp(spec, X))
    sq = np.asarray(f[:, :, 0]) ** 2
    # the diagonal of a ReLU kernel has no 1/n correction: agreement within sampling error
    se = sq.std(0, ddof=1) / np.sqrt(sq.shape[0])
    assert np.all(np.abs(sq.mean(0) - np.diag(K)) < 4 * se)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_networks=0), "n_networks"),
        (dict(n_networks=2.5), "n_networks"),
        (dict(n_networks=3, chunk_size=-1), "chunk_size"),
    ],
)
def test_prior_outputs_bad_arguments(kwargs, match):
    spec = ep.MLPSpec(2, (4,), 1)
    with pytest.raises(ValueError, match=match):
        ep.ensemble.prior_outputs(spec, np.ones((2, 2)), key=jax.random.key(0), **kwargs)


def test_prior_kernels_are_the_metrics_of_the_prior_outputs_networks():
    """Ĝ^(ℓ) = C_b + C_W/n_{ℓ-1} Σ_j σ(z^(ℓ-1)_j)σ(z^(ℓ-1)_j) of network m of prior_outputs (same key)."""
    spec = ep.MLPSpec(2, (16, 8), 3, "tanh", C_b=(0.1, 0.2, 0.3), C_W=(1.1, 1.3, 1.7))
    X = np.random.default_rng(0).normal(size=(4, 2))
    key = jax.random.key(3)
    G = np.asarray(ep.ensemble.prior_kernels(spec, X, 20, key))
    assert G.shape == (20, 4, 4) and G.dtype == np.float64
    np.testing.assert_array_equal(G, np.asarray(ep.ensemble.prior_kernels(spec, X, 20, key, chunk_size=7)))
    zs = ep.ensemble.prior_outputs(spec, X, 20, key, layers=True)
    s = np.tanh(np.asarray(zs[-2]))
    np.testing.assert_allclose(G, 0.3 + 1.7 * np.einsum("man,mbn->mab", s, s) / 8, rtol=1e-12)
    Gs = ep.ensemble.prior_kernels(spec, X, 20, key, layers=True)
    assert len(Gs) == 3 and all(g.shape == (20, 4, 4) for g in Gs)
    np.testing.assert_allclose(np.asarray(Gs[0]), np.broadcast_to(0.1 + 1.1 * X @ X.T / 2, (20, 4, 4)), rtol=1e-12)
    s = np.tanh(np.asarray(zs[0]))
    np.testing.assert_allclose(np.asarray(Gs[1]), 0.2 + 1.3 * np.einsum("man,mbn->mab", s, s) / 16, rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(Gs[-1]), G)
    # depth 1: Ĝ^(1) is not random
    lin = ep.MLPSpec(2, (), 2, "relu", C_b=0.5, C_W=2.0)
    np.testing.assert_allclose(
        np.asarray(ep.ensemble.prior_kernels(lin, X, 3, key)), np.broadcast_to(0.5 + X @ X.T, (3, 4, 4)), rtol=1e-12
    )
    with pytest.raises(ValueError, match="n_networks"):
        ep.ensemble.prior_kernels(spec, X, 0, key)


def test_prior_kernels_moments_match_the_output_moments():
    """Mean and covariance of Ĝ agree with the moments of the outputs themselves, within s.e.

    Same networks (same key), so each comparison is paired: per network, the output statistic
    minus its conditional mean given Ĝ (z | Ĝ ~ N(0, Ĝ) iid over the n_L neurons):
    * (1/n_L) Σ_i z_iα z_iβ - Ĝ_αβ;
    * the i ≠ k pair average of z_iα1 z_iα2 z_kα3 z_kα4 - Ĝ_α1α2 Ĝ_α3α4, and then the difference of
      the two connected four-point estimates (delta method: influence functions of both);
    * (1/n_L) Σ_i z_iα⁴ - 3 Ĝ_αα² (the single-neuron fourth cumulant is 3 Var Ĝ_αα).
    """
    nL, M = 4, 20_000
    spec = ep.MLPSpec(3, (8, 8), nL, "tanh", C_b=0.1, C_W=1.5)
    X = 1.2 * np.array([[1.0, 0.5, -0.3], [0.2, -1.0, 0.7], [0.6, 0.1, -0.9]])
    key = jax.random.key(7)
    G = np.asarray(ep.ensemble.prior_kernels(spec, X, M, key))
    z = np.asarray(ep.ensemble.prior_outputs(spec, X, M, key))  # (M, N, n_L)

    def check(D, what):
        D = D.reshape(M, -1)
        assert np.all(np.abs(D.mean(0)) <= 4.5 * D.std(0, ddof=1) / np.sqrt(M)), what

    S = np.einsum("mai,mbi->mab", z, z)
    check(S / nL - G, "E zz = E Ĝ")
    pairs = [(0, 0), (0, 1), (1, 2), (2, 2)]
    for p in pairs:
        for q in pairs:
            cross = (S[(slice(None), *p)] * S[(slice(None), *q)]
                     - np.einsum("mi,mi,mi,mi->m", *(z[:, a] for a in p + q))) / (nL * (nL - 1))  # fmt: skip
            gp, gq = G[(slice(None), *p)], G[(slice(None), *q)]
            check(cross - gp * gq, f"E z_i z_i z_k z_k = E ĜĜ {p}{q}")
            # connected: mean(cross) - mean(zz_p)mean(zz_q)  vs  Cov(Ĝ_p, Ĝ_q)
            zp, zq = S[(slice(None), *p)] / nL, S[(slice(None), *q)] / nL
            # influence function of the difference (E zz = E Ĝ, so either mean may multiply)
            infl = (cross - gp * gq) - gq.mean() * (zp - gp) - gp.mean() * (zq - gq)
            diff = (cross.mean() - zp.mean() * zq.mean()) - np.cov(gp, gq)[0, 1]
            assert abs(diff) <= 4.5 * infl.std() / np.sqrt(M), (p, q, diff)
    for a in range(3):
        check(np.mean(z[:, a] ** 4, axis=-1) - 3 * G[:, a, a] ** 2, f"E z⁴ = 3 E Ĝ² ({a})")


def test_prior_kernels_sampled_in_function_space_have_the_same_law():
    """sampler="kernels" (z^(ℓ) ~ N(0, Ĝ^(ℓ)) given the layer below) against sampler="weights":
    every layer's mean and covariance of the six distinct Ĝ entries agree within a two-sample
    4.5 s.e., at width 6 where Ĝ fluctuates by tens of percent; and one network's draws are
    reproducible under chunking.  (tests/theory/test_vertex_scaling.py checks the function-space
    draws of ReLU against its exact finite-width moments at four widths and three depths.)"""
    spec = ep.MLPSpec(3, (6, 7, 6), 1, "tanh", C_b=0.1, C_W=1.6)
    X = np.array([[1.0, 0.5, -0.3], [0.2, -1.0, 0.7], [0.6, 0.1, -0.9]])
    M = 20_000
    iu = np.triu_indices(3)
    w = ep.ensemble.prior_kernels(spec, X, M, jax.random.key(1), layers=True)
    k = ep.ensemble.prior_kernels(spec, X, M, jax.random.key(2), layers=True, sampler="kernels")
    assert len(k) == spec.depth and np.array_equal(np.asarray(k[0][0]), np.asarray(w[0][0]))  # Ĝ^(1) is fixed
    for ell in range(1, spec.depth):
        a, b = (np.asarray(G)[:, iu[0], iu[1]] for G in (w[ell], k[ell]))  # (M, 6)
        z = (a.mean(0) - b.mean(0)) / np.sqrt((a.var(0) + b.var(0)) / M)
        assert np.all(np.abs(z) < 4.5), (ell, "mean", z)
        ca, cb = ((x - x.mean(0))[:, :, None] * (x - x.mean(0))[:, None, :] for x in (a, b))  # (M, 6, 6)
        z = (ca.mean(0) - cb.mean(0)) / np.sqrt((ca.var(0) + cb.var(0)) / M)
        assert np.all(np.abs(z) < 4.5), (ell, "covariance", z)
        assert np.abs(cb.mean(0)).max() > 0.01 * np.abs(b.mean(0)).max() ** 2  # the fluctuations are resolved
    one = ep.ensemble.prior_kernels(spec, X, 5, jax.random.key(2), sampler="kernels", chunk_size=2)
    np.testing.assert_allclose(np.asarray(one), np.asarray(k[-1][:5]), rtol=1e-12)
    with pytest.raises(ValueError, match="sampler must be 'weights' or 'kernels'"):
        ep.ensemble.prior_kernels(spec, X, 5, jax.random.key(0), sampler="function")


# ------------------------------------------------------------------------------------------------
# train: full-batch GD ensembles

TRAIN_SPEC = ep.MLPSpec(1, (16, 16), 2, "tanh", C_b=0.1, lambda_b=0.5)
XA = np.array([[-0.9], [-0.3], [0.2], [0.8]])
YA = np.stack([np.sin(3 * XA[:, 0]), np.cos(2 * XA[:, 0])], axis=1)
XB = np.array([[0.45], [-0.6]])


def _eta(spec=TRAIN_SPEC, X=XA, fraction=0.9):
    return fraction * float(ep.theory.training.stability_bound(ep.theory.ntk(spec, X)))


def _train(M=7, steps=60, **kwargs):
    return ep.ensemble.train(TRAIN_SPEC, XA, YA, XB, M, _eta(), steps, jax.random.key(3), **kwargs)


def _assert_identical(a, b):
    for name in a._fields:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name


def test_train_reduces_loss_and_returns_every_field():
    spec = ep.MLPSpec(1, (32, 32), 1, "tanh", lambda_b=0.5)
    X = np.array([[-0.8], [0.1], [0.7]])
    y = np.array([[0.3], [-0.2], [0.5]])
    r = ep.ensemble.train(spec, X, y, np.array([[0.4]]), 6, 0.3, 300, jax.random.key(0))
    assert r.train_final.shape == (6, 3, 1) and r.test_final.shape == (6, 1, 1)
    assert r.train_init.shape == (6, 3, 1) and r.test_init.shape == (6, 1, 1)
    assert all(isinstance(a, np.ndarray) for a in r) and r.loss.dtype == np.float64
    init_loss = 0.5 * np.sum((r.train_init - y) ** 2, axis=(1, 2))
    assert np.all(r.loss < 1e-3 * init_loss)
    np.testing.assert_allclose(r.loss, 0.5 * np.sum((r.train_final - y) ** 2, axis=(1, 2)), rtol=1e-12)
    assert not r.diverged.any() and np.all(r.steps_done == 300)
    # the initial outputs are those of the prior networks with the same keys
    f0 = ep.ensemble.prior_outputs(spec, np.concatenate([X, [[0.4]]]), 6, jax.random.key(0))
    np.testing.assert_allclose(np.concatenate([r.train_init, r.test_init], axis=1), f0, rtol=1e-13, atol=1e-15)


def test_train_steps_zero_leaves_the_networks_at_initialization():
    r = _train(M=3, steps=0)
    _assert_identical(r._replace(train_final=r.train_init, test_final=r.test_init), r)
    assert np.all(r.steps_done == 0)


def test_train_is_bit_identical_for_any_chunk_size():
    """Network m's arithmetic is the compiled loop body alone, whatever the chunk holds (padding too)."""
    ref = _train(chunk_size=7)
    for chunk in (1, 3, None):
        _assert_identical(_train(chunk_size=chunk), ref)
    # batch_size vectorizes networks: equal up to rounding (XLA lowers batched matmuls differently)
    b = _train(chunk_size=4, batch_size=2)
    np.testing.assert_allclose(b.test_final, ref.test_final, rtol=1e-9, atol=1e-12)


def test_train_float32():
    """float32 networks are drawn in float32 (other random numbers than float64: other networks)."""
    r = _train(M=3, dtype="float32")
    assert all(a.dtype == np.float32 for a in r[:5])
    X = np.concatenate([XA, XB]).astype(np.float32)
    keys = jax.random.split(jax.random.key(3), 3)
    f0 = np.stack([ep.nn.apply(TRAIN_SPEC, ep.nn.init(TRAIN_SPEC, k, np.float32), X) for k in keys])
    assert f0.dtype == np.float32
    np.testing.assert_allclose(np.concatenate([r.train_init, r.test_init], axis=1), f0, rtol=1e-5, atol=1e-6)
    assert np.all(r.loss < 0.05 * 0.5 * np.sum((r.train_init - YA) ** 2, axis=(1, 2)))


def test_train_diverging_networks_are_stopped_at_their_last_finite_state():
    """Linear width-4 networks at twice the infinite-width bound: most diverge, a few survive."""
    spec = ep.MLPSpec(1, (4,), 1, "linear", C_b=0.1)
    X = np.linspace(-1, 1, 4)[:, None]
    y = np.sin(3 * X)
    eta, steps, key = _eta(spec, X, 2.0), 200, jax.random.key(1)
    with pytest.warns(ep.StabilityWarning) as record:
        r = ep.ensemble.train(spec, X, y, X[:1], 32, eta, steps, key)
    messages = [str(w.message) for w in record]
    assert any("at or above the infinite-width GD stability bound" in m for m in messages)
    n_div = int(r.diverged.sum())
    assert 0 < n_div < 32
    assert any(m.startswith(f"{n_div} of 32 networks diverged") for m in messages)
    assert np.all(np.isfinite(r.loss)) and np.all(np.isfinite(r.test_final))
    assert np.all(r.steps_done[r.diverged] < steps) and np.all(r.steps_done[~r.diverged] == steps)
    # the reported state is the state after steps_done steps: training for that many steps gives it
    s = int(r.steps_done[r.diverged].min())
    with pytest.warns(ep.StabilityWarning):
        short = ep.ensemble.train(spec, X, y, X[:1], 32, eta, s, key)
    same = r.diverged & (r.steps_done == s)
    assert same.any() and not short.diverged[same].any()
    assert np.array_equal(short.train_final[same], r.train_final[same])
    assert np.array_equal(short.loss[same], r.loss[same])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learning_rate=-0.1), "learning_rate"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(learning_rate=[0.1, 0.2]), "learning_rate"),
        (dict(steps=-1), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(n_networks=0), "n_networks"),
        (dict(y=YA[:3]), r"y must have shape \(N_train, output_dim\) = \(4, 2\)"),
        (dict(y=np.where(YA > 0.5, np.nan, YA)), "y contains NaN"),
        (dict(X=XA.reshape(2, 2)), r"X must have shape \(N, input_dim\)"),
        (dict(X_test=np.array([[np.inf]])), "X_test contains 1 NaN or infinite"),
        (dict(key=0), r"jax.random.key\(0\)"),
        (dict(key=jax.random.split(jax.random.key(0), 2)), "single JAX PRNG key"),
        (dict(dtype="float16"), "dtype must be float64"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(batch_size=1.5), "batch_size"),
        (dict(devices=[]), "devices"),
        (dict(checkpoint=3), "checkpoint must be a directory path"),
    ],
)
def test_train_bad_arguments(kwargs, match):
    args = dict(X=XA, y=YA, X_test=XB, n_networks=2, learning_rate=0.1, steps=3, key=jax.random.key(0))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ep.ensemble.train(TRAIN_SPEC, **args)


def test_train_checkpoint_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ValueError, match="is a file"):
        _train(M=2, checkpoint=f)


class _Crash(Exception):
    pass


def _crash_after(k, computed):
    def hook(c, outputs):
        computed.append(c)
        if len(computed) == k:
            raise _Crash

    return hook


def test_checkpoint_resume_is_bit_identical_and_skips_finished_chunks(tmp_path, monkeypatch, capsys):
    ref = _train(M=10, chunk_size=3)  # uninterrupted, no checkpoint
    d = tmp_path / "ck"
    computed = []
    monkeypatch.setattr(ep.ensemble, "_after_chunk_hook", _crash_after(2, computed))
    with pytest.raises(_Crash):
        _train(M=10, chunk_size=3, checkpoint=d)
    assert computed == [0, 1]
    assert sorted(os.listdir(d)) == ["chunk_000000.npz", "chunk_000001.npz", "manifest.json"]
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["layout"]["chunk_size"] == 3 and manifest["arguments"]["n_networks"] == "10"
    # restart: the two stored chunks are loaded, chunks 2 and 3 computed (chunk_size comes from the manifest)
    computed.clear()
    monkeypatch.setattr(ep.ensemble, "_after_chunk_hook", lambda c, out: computed.append(c))
    _assert_identical(_train(M=10, checkpoint=d, progress=True), ref)
    assert computed == [2, 3]
    err = capsys.readouterr().err
    assert "resumed from" in err and "2/4 chunks (6 networks) done" in err and "chunk 4/4, 10/10 networks" in err
    # complete: nothing recomputed; a deleted chunk is recomputed alone
    computed.clear()
    _assert_identical(_train(M=10, chunk_size=3, checkpoint=d), ref)
    assert computed == []
    (d / "chunk_000001.npz").unlink()
    _assert_identical(_train(M=10, chunk_size=3, checkpoint=d), ref)
    assert computed == [1]
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")]


def test_checkpoint_refuses_to_mix_runs(tmp_path):
    d = tmp_path / "ck"
    _train(M=4, chunk_size=2, checkpoint=d)
    with pytest.raises(ValueError, match=r"different arguments \(steps: stored '60', now '61'\)"):
        _train(M=4, steps=61, checkpoint=d)
    with pytest.raises(ValueError, match=r"different arguments.*n_networks.*"):
        _train(M=5, checkpoint=d)
    with pytest.raises(ValueError, match=r"different arguments.*key"):
        ep.ensemble.train(TRAIN_SPEC, XA, YA, XB, 4, _eta(), 60, jax.random.key(4), checkpoint=d)
    with pytest.raises(ValueError, match=r"different arguments.*X_test"):
        ep.ensemble.train(TRAIN_SPEC, XA, YA, XB + 1e-9, 4, _eta(), 60, jax.random.key(3), checkpoint=d)
    with pytest.raises(ValueError, match=r"different arguments.*dtype"):
        _train(M=4, checkpoint=d, dtype="float32")
    with pytest.raises(ValueError, match=r"chunk_size=2.*this run has chunk_size=3"):
        _train(M=4, chunk_size=3, checkpoint=d)
    with pytest.raises(ValueError, match=r"batch_size=1.*this run has batch_size=2"):
        _train(M=4, batch_size=2, checkpoint=d)
    # a chunk file of another run, and a damaged chunk file
    other = tmp_path / "other"
    _train(M=4, steps=5, chunk_size=2, checkpoint=other)
    os.replace(other / "chunk_000001.npz", d / "chunk_000001.npz")
    with pytest.raises(ValueError, match="does not belong to this run"):
        _train(M=4, checkpoint=d)
    (d / "chunk_000001.npz").write_bytes(b"not an npz file")
    with pytest.raises(ValueError, match=r"chunk_000001.npz' is unreadable.*delete this file"):
        _train(M=4, checkpoint=d)


_SHARDED = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    import eft_prob as ep
    from tests.test_ensemble import TRAIN_SPEC, XA, YA, XB

    assert jax.device_count() == 8 and not jax.config.jax_enable_x64
    shards = []
    ep.ensemble._after_chunk_hook = lambda c, out: shards.append(
        [[len(a.sharding.device_set)] + [s.data.shape[0] for s in a.addressable_shards] for a in out]
    )
    args = (TRAIN_SPEC, XA, YA, XB, 21, float(sys.argv[2]), 60, jax.random.key(3))
    r8 = ep.ensemble.train(*args, chunk_size=16)
    one = ep.ensemble.train(*args, chunk_size=5, devices=jax.devices()[:1])
    np.savez(sys.argv[1], shards=np.array(shards[:2]), **{f"r8_{k}": v for k, v in r8._asdict().items()},
             **{f"one_{k}": v for k, v in one._asdict().items()})
    """
)


@pytest.mark.slow
def test_sharded_over_8_devices_is_bit_identical_to_one_device(tmp_path):
    """8 fake CPU devices (the flag must reach XLA before jax is imported, hence a subprocess).

    Bit-for-bit, not to a tolerance: each device runs the same compiled per-network loop body
    (lax.map over its networks), so no reduction is reordered by the sharding.  The subprocess
    also runs with x64 off, so its float64 comes from train's local x64 scope.
    """
    out = tmp_path / "r.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env.pop("JAX_ENABLE_X64", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", _SHARDED, str(out), repr(_eta())], env=env, cwd=root, check=True, timeout=300)
    z = np.load(out)
    # chunks of 16 networks: every output sharded over the 8 devices, 2 networks each
    assert np.all(z["shards"][..., 0] == 8) and np.all(z["shards"][..., 1:] == 2)
    ref = _train(M=21)  # this process: one device, x64 on globally
    for k in ref._fields:
        assert np.array_equal(z[f"r8_{k}"], getattr(ref, k)) and z[f"r8_{k}"].dtype == getattr(ref, k).dtype, k
        assert np.array_equal(z[f"one_{k}"], getattr(ref, k)), k
