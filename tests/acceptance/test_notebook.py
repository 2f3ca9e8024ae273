"""The worked example notebook (examples/explorer.ipynb) runs as written, in a real Jupyter kernel
(nbclient + ipykernel), and shows the summary and the explorer inline."""
from __future__ import annotations

import html
import shutil
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "explorer.ipynb"


def test_example_notebook_runs_and_shows_the_explorer_inline(tmp_path):
    shutil.copy(NOTEBOOK, tmp_path / NOTEBOOK.name)
    notebook = nbformat.read(tmp_path / NOTEBOOK.name, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # stored clean
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
                   ).execute()
    shown = [out["data"]["text/html"] for cell in notebook.cells if cell.cell_type == "code"
             for out in cell.outputs if out.get("output_type") == "execute_result"]
    assert len(shown) == 2 and shown[0].startswith("<p><strong>Subnetwork</strong>: retains ")
    page = (tmp_path / "explorer-run" / "report.html").read_text()
    assert "<iframe" in shown[1] and f'srcdoc="{html.escape(page)}"' in shown[1]
