"""The notebooks in ``notebooks/`` run from top to bottom (``PQNET_SMALL=1`` settings).

They share one kernel, its namespace cleared between notebooks (``%reset -f``): each
notebook still runs from an empty namespace, but torch, Pyro and ArviZ are imported once
(about 4.5 s a kernel on two cores)."""

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.manager import start_new_kernel  # noqa: E402  (nbclient's own dependency)

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
MNIST = Path(os.environ.get("PQNET_MNIST", NOTEBOOKS.parent / "../shared/data/mnist"))


@pytest.fixture(scope="module")
def kernel():
    # the kernel inherits this environment, and runs in the notebooks' folder
    env = {**os.environ, "PQNET_SMALL": "1"}
    km, kc = start_new_kernel(kernel_name="python3", env=env, cwd=str(NOTEBOOKS))
    try:
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.mark.parametrize("name", ["quickstart", "quantization_analysis", "method_comparison"])
def test_notebook_runs(name, kernel):
    if name == "quantization_analysis" and not MNIST.is_dir():
        pytest.skip(f"MNIST is not at {MNIST} (set PQNET_MNIST)")
    km, kc = kernel
    kc.execute_interactive("%reset -f", timeout=60)  # no names left by an earlier notebook
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    start = time.perf_counter()
    # a cell that raises fails the test with nbclient's CellExecutionError
    client = nbclient.NotebookClient(notebook, timeout=300, km=km)
    client.kc = kc
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            client.execute_cell(cell, index)
    print(f"{name}: {time.perf_counter() - start:.1f} s")
