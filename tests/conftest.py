"""Test configuration: float64 everywhere, CPU, fixed seeds.

The test program (not the library) switches x64 on globally, as a user's program would.
"""

import glob
import os
import shutil
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)


def _adopt_unlocked_caches(shared, olds):
    """Start the shared cache from the entries of the unshared caches that earlier versions of this
    file kept (one per worker, no lock), so a machine that ran the suite before stays warm.

    JAX's lock-guarded cache needs an access-time file next to each entry.  Entries are hard links
    (JAX never rewrites an entry in place) and the directory appears at once by a rename."""
    tmp = f"{shared}.tmp{os.getpid()}"
    os.makedirs(tmp)
    stamp = time.time_ns().to_bytes(8, "little")
    for old in olds:
        for entry in glob.glob(os.path.join(old, "*-cache")):
            target = os.path.join(tmp, os.path.basename(entry))
            if os.path.exists(target):
                continue
            try:
                os.link(entry, target)
            except OSError:
                shutil.copyfile(entry, target)
            with open(target[: -len("-cache")] + "-atime", "wb") as f:
                f.write(stamp)
    try:
        os.rename(tmp, shared)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)


def _lock_without_eviction_scans():
    """JAX's lock-guarded cache scans every entry before each write, to evict the least recently
    used ones above the size limit: quadratic in the number of entries (100 ms per write at 3000).
    The test cache stays far below its limit, so the scan is dropped in this process (a private
    JAX method; where it is missing, the scan stays and only compilations above 0.5 s are kept)."""
    try:
        from jax._src import lru_cache
    except ImportError:
        return False
    if not callable(getattr(lru_cache.LRUCache, "_evict_if_needed", None)):
        return False
    lru_cache.LRUCache._evict_if_needed = lambda self, *, additional_size=0: None
    return True


# One persistent compilation cache per jax version and interpreter (entries written by another
# jaxlib, the CI's second, Python 3.12 run, must never be read back), shared by the pytest-xdist
# workers: a program compiled by one is read by the other, and a test that runs on another worker
# than last time still finds its programs.  A size limit switches on JAX's file lock around every
# read and write of the cache; without it, entries are written in place, and a process reading one
# half-written crashed XLA once.  The test processes keep every compilation, down to the many small
# programs of eager operations that each module recompiles after jax.clear_caches() (a quarter of a
# warm run).  The notebook kernels share a cache of their own (NOTEBOOK_CACHE) and keep compilations
# above 0.5 s: each of their writes scans their cache.
_cache = os.path.expanduser(f"~/.cache/eft_prob_jax/{jax.__version__}-py{sys.version_info[0]}{sys.version_info[1]}")
try:
    import filelock  # noqa: F401  (JAX's lock; in the dev extra)
except ImportError:  # no lock: one cache per worker
    _lock = {}
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _cache += "-" + os.environ["PYTEST_XDIST_WORKER"]
else:
    _lock = {"jax_compilation_cache_max_size": 16 << 30}
    if not os.environ.get("PYTEST_XDIST_WORKER") and not os.path.isdir(_cache + "-shared"):
        _adopt_unlocked_caches(_cache + "-shared", sorted(glob.glob(_cache + "-gw*")) + [_cache])
    _cache += "-shared"
_every = bool(_lock) and _lock_without_eviction_scans()
for _name, _value in {
    **_lock,
    "jax_compilation_cache_dir": _cache,
    "jax_persistent_cache_min_compile_time_secs": 0.0 if _every else 0.5,
}.items():
    jax.config.update(_name, _value)
NOTEBOOK_CACHE = {
    **_lock,
    "jax_compilation_cache_dir": _cache + "-notebooks",
    "jax_persistent_cache_min_compile_time_secs": 0.5,
}


def pytest_collection_modifyitems(config, items):
    """The notebooks first: they are the longest tests (1–3 minutes each), and starting them while
    hundreds of short tests remain lets the parallel workers (pytest-xdist) finish together."""
    items.sort(key=lambda item: item.get_closest_marker("notebook") is None)  # stable: order kept otherwise


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def assert_consistent(estimate, se, expected, n_sigma=4.0, what=""):
    """|estimate - expected| <= n_sigma·se, elementwise, with a readable message."""
    estimate, se, expected = (np.asarray(a, float) for a in (estimate, se, expected))
    z = np.abs(estimate - expected) / se
    assert np.all(z <= n_sigma), (
        f"{what}: estimate {estimate} vs expected {expected} (se {se}); z-scores {z} exceed {n_sigma}"
    )


def fit_inverse_width(widths, values, ses):
    """Weighted least squares values ≈ a/n + b; returns (a, b, se_a, se_b, chi2)."""
    (a, b), (se_a, se_b), chi2 = fit_inverse_powers(widths, values, ses, (1, 0))
    return a, b, se_a, se_b, chi2


def fit_inverse_powers(widths, values, ses, powers=(1, 2)):
    """Weighted least squares values ≈ Σ_p c_p/n^p; returns (coef, se, chi2), one c per power."""
    n = np.asarray(widths, float)
    v = np.asarray(values, float)
    w = 1.0 / np.asarray(ses, float) ** 2
    A = np.stack([n ** -float(p) for p in powers], axis=1)
    cov = np.linalg.inv(A.T @ (A * w[:, None]))
    coef = cov @ (A.T @ (w * v))
    chi2 = float(np.sum(w * (v - A @ coef) ** 2))
    return coef, np.sqrt(np.diag(cov)), chi2


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled executables after each test module.

    Two full-suite runs in one process segfaulted inside XLA compilation late in the run (cause not
    established; per-process resources of thousands of compiled programs are a suspect).  Modules
    do not share programs worth keeping, so clearing costs only a few recompilations.
    """
    yield
    jax.clear_caches()
