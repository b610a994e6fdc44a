"""Execute ``experiments/ablation.ipynb`` in a fresh kernel and store its outputs in the notebook: the
command that wrote the outputs the repository holds (``tests/test_notebook.py`` executes the notebook
the same way and checks its tables against the stored ones).

    python experiments/run_notebook.py                 # the quick size, a fresh output directory

The kernel starts in ``experiments/`` (as when the notebook is opened there) with this checkout on its
``PYTHONPATH``; ``ABLATION_OUT`` points it at a new temporary directory, so nothing is read back from an
earlier run, and ``ABLATION_SIZE`` is left to the notebook's default (quick). The kernel runs on JAX's CPU
backend with XLA's default flags (one CPU device) whatever ``XLA_FLAGS`` the caller has (the stored tables
are made so).
"""

from __future__ import annotations

import os
import sys
import tempfile

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "experiments", "ablation.ipynb")


def execute(out_dir: str, path: str = NOTEBOOK, timeout: int = 1200) -> nbformat.NotebookNode:
    """The notebook at ``path`` executed in a fresh kernel (cwd: its folder) writing to ``out_dir``."""
    nb = nbformat.read(path, as_version=4)
    saved = {k: os.environ.get(k)
             for k in ("ABLATION_OUT", "ABLATION_SIZE", "PYTHONPATH", "XLA_FLAGS", "JAX_PLATFORMS")}
    os.environ["ABLATION_OUT"] = out_dir
    os.environ.pop("ABLATION_SIZE", None)
    # XLA's defaults and one CPU device, as when the notebook is opened: the arms' numbers depend (in the
    # last digits of a win rate) on how many devices the batch is split over and on how XLA compiles the
    # programs, and the stored tables are from one device with XLA's default flags
    os.environ.pop("XLA_FLAGS", None)
    os.environ["JAX_PLATFORMS"] = "cpu"  # (an installed libtpu would otherwise print its probing into the outputs)
    os.environ["PYTHONPATH"] = os.pathsep.join([REPO] + ([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else []))
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        nb = execute(os.path.join(d, "ablation"))
    nbformat.write(nb, NOTEBOOK)
    print(f"executed and stored: {os.path.relpath(NOTEBOOK)}", file=sys.stderr)


if __name__ == "__main__":
    main()
