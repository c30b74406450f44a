"""The notebooks in ``notebooks/`` run from top to bottom (``PQNET_SMALL=1`` settings)."""

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
MNIST = Path(os.environ.get("PQNET_MNIST", NOTEBOOKS.parent / "../shared/data/mnist"))


@pytest.mark.parametrize("name", ["quickstart", "quantization_analysis", "method_comparison"])
def test_notebook_runs(name, monkeypatch):
    if name == "quantization_analysis" and not MNIST.is_dir():
        pytest.skip(f"MNIST is not at {MNIST} (set PQNET_MNIST)")
    monkeypatch.setenv("PQNET_SMALL", "1")  # the kernel inherits the environment
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    start = time.perf_counter()
    # a cell that raises fails the test with nbclient's CellExecutionError
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    print(f"{name}: {time.perf_counter() - start:.1f} s")
