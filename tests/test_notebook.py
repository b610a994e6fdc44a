"""experiments/ablation.ipynb runs where it is opened and its stored outputs are reproducible: executed
in a fresh kernel at its default (quick) size the way ``experiments/run_notebook.py`` stores them (the
kernel in experiments/, a new output directory), it writes its plot, its tables equal the stored ones
(and so does the frontier reading), and no output holds a machine's absolute path, a traceback or
tqdm's "IProgress not found" warning."""

import os
import sys

import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
try:
    import run_notebook
finally:
    sys.path.pop(0)


def _outputs(nb):
    """Per code cell: its markdown displays and its stdout text."""
    cells = [c for c in nb.cells if c.cell_type == "code"]
    return ([[o["data"]["text/markdown"] for o in c.outputs if "text/markdown" in o.get("data", {})] for c in cells],
            ["".join(o.get("text", "") for o in c.outputs if o.get("name") == "stdout") for c in cells])


def test_ablation_notebook_reproduces_its_stored_tables(tmp_path):
    stored = nbformat.read(run_notebook.NOTEBOOK, as_version=4)
    nb = run_notebook.execute(str(tmp_path / "ablation"))
    assert (tmp_path / "ablation" / "ablation.png").stat().st_size > 0
    (tables, text), (stored_tables, stored_text) = _outputs(nb), _outputs(stored)
    assert sum(len(t) for t in stored_tables) == 2 and tables == stored_tables  # both settings' tables
    assert text[-1] == stored_text[-1] and "DPO+SPO γ=10" in text[-1]  # the frontier reading
    assert text[0].startswith("quick: 1 SFT model and 8 arms") and "Estimated" in text[0]  # the cost, first
    for book in (nb, stored):
        every = str([c.outputs for c in book.cells if c.cell_type == "code"])
        assert "IProgress" not in every and "Traceback" not in every and "Error" not in every
        assert REPO not in every and str(tmp_path) not in every and "/work/" not in every
