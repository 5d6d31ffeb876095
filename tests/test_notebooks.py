"""Every classroom notebook in notebooks/ executes top to bottom (nbclient, a fresh python3 kernel), so that none of
them silently rots when a method file changes. The notebooks make their own checks visible (printed exact identities,
figures); this test asserts that every cell runs and that each notebook shows its figures inline. It asserts no time:
how long they take is measured by `python bench_speed.py --notebooks` (README), not here."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_four_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path):
    book = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in book.cells if c.cell_type == "code"), "commit notebooks with outputs stripped"
    # no cell time limit (timeout=None). The two waits below return as soon as the kernel answers; they are generous so
    # that a loaded machine neither fails to start the kernel nor drops a figure's output message (nbclient's defaults,
    # 60 s and 4 s, are speed assumptions).
    client = nbclient.NotebookClient(book, timeout=None, startup_timeout=600, iopub_timeout=60, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    figures = sum(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
                  for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert figures >= 2, f"{path.name}: only {figures} inline figures"
