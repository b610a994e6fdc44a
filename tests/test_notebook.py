"""experiments/ablation.ipynb runs end to end (nbclient, a fresh kernel) at its quick size:
one seed of the synthetic world, both settings, DPO and DPO+SPO at two gammas beside RPO at one
lambda (the code path; the grid size sweeps every baseline), with its own in-notebook checks
(finite numbers for every arm) and the plot written."""

import os

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ablation_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("ABLATION_SIZE", "quick")
    monkeypatch.setenv("ABLATION_OUT", str(tmp_path / "ablation"))
    nb = nbformat.read(os.path.join(REPO, "experiments", "ablation.ipynb"), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (tmp_path / "ablation" / "ablation.png").stat().st_size > 0
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "SFT held-out accuracy" in outputs
