"""transferstudy: the thin shared library behind the AlexNet vs DeiT-Base transfer-learning book."""

import warnings

__version__ = "0.1.0"

# timm imports huggingface_hub, which imports tqdm.auto; in a Jupyter kernel without ipywidgets (the notebooks run
# under papermill, whose output the book shows and where widgets could not render anyway) tqdm.auto warns
# "IProgress not found" on the first cell of every page. The library's own bars are plain tqdm. Only that
# message is hidden.
warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")
