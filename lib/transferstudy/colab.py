"""Colab: the regime notebooks' setup cell, and what it runs where transferstudy is missing or the kernel is Colab's.

Each regime notebook's first code cell (:func:`cell_source`, tagged ``colab-setup`` and ``remove-cell``, so the
book leaves it out) installs this package from the repository that ``_config.yml`` names
(``repository.url`` at ``repository.branch``) when it is not importable, then calls :func:`setup`: which
device will train, CIFAR-10 into the data root (downloaded through torchvision when it is not there), and
how to put FERPlus there. Where the package is installed and the kernel is not Colab's (a clone, ``make
book``, papermill) the cell does nothing: no pip, no download, no output. On Colab it always calls
:func:`setup` (after a restart the package is installed, but the device and the data still need saying).

The notebooks cannot read ``_config.yml`` on Colab, so the cell carries the address: ``python -m
transferstudy.colab`` writes the cell into every regime notebook from ``_config.yml`` (a fork sets its own
repository there, then runs it), and ``tests/test_colab_cell.py`` checks that every notebook holds exactly it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

TAGS = ["colab-setup", "remove-cell"]  # remove-cell: Jupyter Book 1.x leaves the cell out of the page
# Modules a kernel may hold before the install, with their distributions: pip replacing one of them needs a restart.
_PRELOADED = (("numpy", "numpy"), ("torch", "torch"), ("PIL", "pillow"), ("pandas", "pandas"),
              ("sklearn", "scikit-learn"), ("scipy", "scipy"), ("matplotlib", "matplotlib"))

FERPLUS_HELP = """FERPlus: not found in {folder}. It cannot be downloaded automatically; to use it:
  1. the images: fer2013.csv from Kaggle's "Challenges in Representation Learning: Facial Expression
     Recognition Challenge" (https://www.kaggle.com/c/challenges-in-representation-learning-facial-expression-recognition-challenge/data);
  2. the labels and the script: Microsoft's FERPlus repository (https://github.com/microsoft/FERPlus), whose
     data/FER2013Train|FER2013Valid|FER2013Test/ folders hold label.csv, with fer2013new.csv and src/generate_training_data.py;
  3. in a clone of it: python src/generate_training_data.py -d data -fer fer2013.csv -ferplus fer2013new.csv
     writes each image as a PNG beside its label.csv;
  4. put the three folders FER2013Train/, FER2013Valid/ and FER2013Test/ in {folder}/ (on Colab: upload them
     as a zip, or copy them from Google Drive, and unzip there).
  Kaggle's "FER2013Plus" folder copy (train/<class>/ and test/<class>/) works too: put train/ and test/ in {folder}/.
  The README's "Data" section says which layout scores which test set."""


def cell_source(url: str, branch: str) -> str:
    """The setup cell of every regime notebook, installing from ``url`` at ``branch`` (``_config.yml``)."""
    return f"""# Colab setup: where transferstudy is not installed (a fresh Colab runtime), install it from the
# repository; on Colab, say which device trains, fetch CIFAR-10 and say where FERPlus goes. Elsewhere: nothing.
import importlib.util
import os
import sys

transferstudy_missing = importlib.util.find_spec("transferstudy") is None
if transferstudy_missing:
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                    "git+{url}@{branch}"], check=True)
    importlib.invalidate_caches()
if transferstudy_missing or "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ:
    from transferstudy import colab

    colab.setup()"""


def repository(book_root: str | Path) -> tuple[str, str]:
    """``(repository.url, repository.branch)`` of ``<book_root>/_config.yml``: the one place naming the repository."""
    import yaml

    path = Path(book_root) / "_config.yml"
    with open(path) as fh:
        repo = (yaml.safe_load(fh) or {}).get("repository") or {}
    url, branch = repo.get("url"), repo.get("branch", "main")
    if not isinstance(url, str) or not url.startswith("https://"):
        raise ValueError(f"{path}: repository.url is {url!r}; set it to the repository's https address (e.g. "
                         f"https://github.com/OWNER/transferstudy), which the notebooks' Colab cell installs from")
    return url.rstrip("/"), str(branch)


def _stale_modules() -> list[str]:
    """Modules this kernel imported before pip replaced their distribution (they need a restart)."""
    from importlib import metadata

    stale = []
    for module, dist in _PRELOADED:
        loaded = sys.modules.get(module)
        if loaded is None:
            continue
        try:
            installed = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        version = str(getattr(loaded, "__version__", installed))
        if version.split("+")[0] != installed.split("+")[0]:  # the release; torch's __version__ carries +cu130
            stale.append(f"{module} {version} (installed now: {installed})")
    return stale


def setup(log: Callable[[str], Any] = print) -> None:
    """Colab: which device trains, CIFAR-10 in the data root (downloaded if missing), where FERPlus goes.

    The data root is the notebooks' own: ``$TRANSFERSTUDY_DATA_ROOT``, else ``data/`` under the working
    directory (``session.default_data_dir``), so a notebook left at ``data_dir = None`` finds what this put there.
    """
    stale = _stale_modules()
    if stale:
        raise RuntimeError(f"pip replaced packages this kernel had already imported: {', '.join(stale)}. Restart the "
                           f"session (Colab: Runtime > Restart session) and run the notebook again from the top; the "
                           f"setup cell will not install again")
    import torch

    from . import data, models, session

    device = models.select_device()
    if device.type == "cuda":
        log(f"device: cuda ({torch.cuda.get_device_name(device)}); the notebook trains on this GPU")
    else:
        log("device: cpu (no GPU in this runtime): the frozen SVM and the linear probe are fine on a CPU, the "
            "fine-tunes are slow (Colab: Runtime > Change runtime type > a GPU, then run the notebook again)")
    cifar = session.default_data_dir("cifar10").resolve()
    try:
        data.load_dataset("cifar10", cifar, decode=False)
        log(f"CIFAR-10: found in {cifar}")
    except data.DataError:
        log(f"CIFAR-10: downloading through torchvision into {cifar} (about 170 MB)")
        data.load_dataset("cifar10", cifar, download=True, decode=False)
        log(f"CIFAR-10: ready in {cifar}")
    fer = session.default_data_dir("ferplus").resolve()
    try:
        data.load_dataset("ferplus", fer, decode=False)
        log(f"FERPlus: found in {fer}")
    except data.DataError:
        log(FERPLUS_HELP.format(folder=fer))


def write_cells(book_root: str | Path | None = None) -> list[Path]:
    """Put the setup cell (from ``_config.yml``) first among the code cells of every regime notebook; the ones changed.

    A notebook's existing ``colab-setup`` cell is rewritten in place; without one, the cell goes right before
    the first code cell (after the title, before the ``parameters`` cell). Each file is read right before it is
    written, and written only when it changes.
    """
    import nbformat

    from .runner import NOTEBOOK_DIR, NOTEBOOKS

    book_root = Path(book_root) if book_root is not None else NOTEBOOK_DIR.parent
    source = cell_source(*repository(book_root))
    changed = []
    for name in NOTEBOOKS.values():
        path = book_root / "notebooks" / name
        nb = nbformat.read(path, as_version=4)
        cells = [c for c in nb.cells if "colab-setup" in c.metadata.get("tags", [])]
        if len(cells) > 1:
            raise ValueError(f"{path}: {len(cells)} cells are tagged colab-setup; keep one")
        if cells:
            cell = cells[0]
            if cell.source == source and cell.metadata.get("tags") == TAGS:
                continue
            cell.source, cell.metadata["tags"] = source, list(TAGS)
        else:
            at = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
            nb.cells.insert(at, nbformat.v4.new_code_cell(source, metadata={"tags": list(TAGS)}))
        nbformat.validate(nb)
        nbformat.write(nb, path)
        changed.append(path)
    return changed


def main() -> int:
    for path in write_cells():
        print(f"wrote the colab-setup cell of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
