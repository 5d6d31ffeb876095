"""Every classroom notebook in notebooks/ executes top to bottom (nbclient, a fresh python3 kernel), so that none of
them silently rots when a method file changes. The notebooks make their own checks visible (printed exact identities,
figures); this test asserts that every cell runs, that each notebook shows its figures inline, and that it stays within its
CPU budget (45 s on 2 idle cores; the limit below allows for a loaded CI machine)."""

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
TIME_LIMIT_S = 150  # per notebook, wall clock: 45 s measured on idle cores, x3 for a shared machine


def test_there_are_four_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path):
    book = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in book.cells if c.cell_type == "code"), "commit notebooks with outputs stripped"
    start = time.time()
    client = nbclient.NotebookClient(book, timeout=TIME_LIMIT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    elapsed = time.time() - start
    figures = sum(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
                  for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert figures >= 2, f"{path.name}: only {figures} inline figures"
    assert elapsed < TIME_LIMIT_S, f"{path.name} took {elapsed:.0f} s"
