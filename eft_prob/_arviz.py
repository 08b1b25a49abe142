"""The one place eft_prob talks to ArviZ: works with arviz 0.23.x (Python 3.11) and 1.x (3.12+).

ArviZ 1.x replaced ``InferenceData`` by ``xarray.DataTree`` and renamed or removed several
functions (``plot_ppc`` → ``plot_ppc_dist``, ``az.InferenceData`` is gone, ...); see
ECOSYSTEM.md §2.  eft_prob builds every group itself as an ``xarray.Dataset`` with ``chain`` and
``draw`` dimensions and only uses this module to wrap, read and diagnose them, so the rest of the
package never branches on the ArviZ version.

Known version difference: the *tail* ESS of ArviZ 1.x is computed differently from 0.23 (same
data can give a different number); bulk ESS, mean ESS, R-hat and MCSE agree.

Drop the 0.23 branch once Python 3.12 is the minimum.
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import xarray as xr


def _import_arviz():
    """``import arviz``, tolerating arviz 0.23.4's once-a-day stamp-file race.

    On the first import of a day arviz 0.23.4 writes ``<cache>/arviz/daily_warning`` through a
    fixed temporary name, so two processes importing it at the same moment (pytest-xdist workers,
    parallel jobs of a sweep) can make one of them fail with ``FileNotFoundError``.  The failed
    import leaves nothing in ``sys.modules``; by the retry the stamp holds today's date and arviz
    skips the write.
    """
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                # arviz 0.23 announces its 1.0 refactor with a FutureWarning on import: not actionable here.
                warnings.filterwarnings("ignore", category=FutureWarning)
                import arviz
            return arviz
        except OSError:
            if attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))


try:
    az = _import_arviz()
except ImportError as err:  # pragma: no cover - depends on the installation
    raise ImportError("eft_prob.inference and eft_prob.compare need ArviZ: pip install 'eft_prob[arviz]'.") from err

__all__ = [
    "ARVIZ_VERSION",
    "AZ1",
    "ess",
    "get_attrs",
    "get_group",
    "group_names",
    "has_group",
    "is_inference_data",
    "make_inference_data",
    "mcse_mean",
    "plot_ppc",
    "rhat",
    "sample_array",
    "set_group",
]

ARVIZ_VERSION: str = az.__version__
AZ1: bool = int(ARVIZ_VERSION.split(".")[0]) >= 1

SAMPLE_DIMS = ("chain", "draw")


# -- containers ----------------------------------------------------------------------------------
def make_inference_data(groups: dict[str, xr.Dataset], attrs: dict | None = None):
    """An ``InferenceData`` (0.23) or ``xarray.DataTree`` (1.x) holding ``groups``."""
    if AZ1:
        data = xr.DataTree.from_dict(dict(groups))
    else:
        data = az.InferenceData(**groups)
    if attrs:
        data.attrs.update(attrs)
    return data


def is_inference_data(obj) -> bool:
    return isinstance(obj, xr.DataTree) if AZ1 else isinstance(obj, az.InferenceData)


def group_names(data) -> list[str]:
    return list(data.children) if AZ1 else list(data.groups())


def has_group(data, name: str) -> bool:
    return name in group_names(data)


def get_group(data, name: str) -> xr.Dataset:
    """The group ``name`` as an ``xarray.Dataset``."""
    if not has_group(data, name):
        raise KeyError(f"the InferenceData has no group {name!r}; it has {group_names(data)}.")
    return data[name].to_dataset() if AZ1 else getattr(data, name)


def set_group(data, name: str, dataset: xr.Dataset):
    """Add or replace group ``name`` in place; returns ``data``."""
    if AZ1:
        data[name] = xr.DataTree(dataset=dataset)
    else:
        if has_group(data, name):
            delattr(data, name)
        data.add_groups({name: dataset})
    return data


def get_attrs(data) -> dict:
    """Top-level attributes (a dict in both versions)."""
    return dict(data.attrs)


# -- diagnostics (Datasets in, Datasets out: sample dims reduced) -----------------------------------
def _as_dataset(result) -> xr.Dataset:
    if isinstance(result, xr.Dataset):
        return result
    if isinstance(result, xr.DataArray):
        return result.to_dataset()
    return result.to_dataset()  # a DataTree node (1.x on DataTree input)


# Chains stuck at one value (a failed run) have zero within-chain variance: the diagnostics are
# then inf/NaN, which is the right answer, so numpy's divide warnings inside ArviZ are silenced.
def rhat(ds: xr.Dataset) -> xr.Dataset:
    """Rank-normalized split R-hat (Vehtari et al. 2021)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return _as_dataset(az.rhat(ds, method="rank"))


def ess(ds: xr.Dataset, method: str = "bulk") -> xr.Dataset:
    """Effective sample size: ``"bulk"``, ``"tail"`` or ``"mean"``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return _as_dataset(az.ess(ds, method=method))


def mcse_mean(ds: xr.Dataset) -> xr.Dataset:
    """ESS-based Monte Carlo standard error of the posterior mean."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return _as_dataset(az.mcse(ds, method="mean"))


# -- plots --------------------------------------------------------------------------------------
def plot_ppc(data, path, *, var_names=("y",), num_samples: int = 50, seed: int = 0) -> str:
    """Posterior predictive check of ``var_names`` against observed_data, written as a PNG."""
    path = os.fspath(path)
    var_names = list(var_names)
    if AZ1:
        import matplotlib.pyplot as plt

        pc = az.plot_ppc_dist(data, var_names=var_names, num_samples=num_samples, backend="matplotlib")
        fig = pc.viz["figure"].item()
        try:
            fig.savefig(path, dpi=100)
        finally:
            plt.close(fig)
        return path
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.5 * len(var_names)))
    axes = fig.subplots(len(var_names), 1, squeeze=False)[:, 0]
    with warnings.catch_warnings():
        # arviz 0.23 calls a matplotlib API deprecated in matplotlib 3.11; nothing a caller can fix.
        warnings.filterwarnings("ignore", message="Passing a dict or None as alias_mapping")
        az.plot_ppc(data, var_names=var_names, ax=axes, num_pp_samples=num_samples, random_seed=seed)
    fig.savefig(path, dpi=100)
    return path


def _check_sample_dims(ds: xr.Dataset, what: str) -> None:
    missing = [d for d in SAMPLE_DIMS if d not in ds.dims]
    if missing:
        raise ValueError(f"{what} must have dimensions {SAMPLE_DIMS}; it lacks {missing}.")


def sample_array(ds: xr.Dataset, var: str) -> np.ndarray:
    """``ds[var]`` as a numpy array with (chain, draw) first."""
    _check_sample_dims(ds, f"variable {var!r}")
    da = ds[var]
    return np.asarray(da.transpose(*SAMPLE_DIMS, *[d for d in da.dims if d not in SAMPLE_DIMS]).values)
