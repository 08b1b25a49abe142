"""The notebooks in notebooks/ (jupytext py:percent) execute top to bottom in smoke mode."""

import pathlib

import pytest

from .conftest import NOTEBOOK_CACHE

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.py"))


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    jupytext = pytest.importorskip("jupytext", reason="pip install -e '.[notebooks]'")
    from nbclient import NotebookClient

    monkeypatch.setenv("EFT_PROB_SMOKE", "1")
    monkeypatch.setenv("EFT_PROB_FIGURES", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    for name, value in NOTEBOOK_CACHE.items():  # the kernels share a persistent compilation cache
        monkeypatch.setenv(name.upper(), str(value))
    nb = jupytext.read(path)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    pngs = list(tmp_path.glob("*.png"))
    assert pngs and all(p.stat().st_size > 10_000 for p in pngs), "each notebook renders its figures"


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ must hold the jupytext notebooks"
