"""Two-dimensional projections of embeddings (PCA, t-SNE, UMAP), cached on disk by content hash.

t-SNE and UMAP take seconds to minutes on a few thousand points; a rebuild of the book would redo them for
every figure. ``project`` keys each result on the embeddings' bytes, the method, the seed and the library
versions, so an unchanged input is read back and a changed one is recomputed. A damaged cache file is
recomputed, never used.
"""

from __future__ import annotations

import hashlib
import io
import warnings
import zipfile
from pathlib import Path

import numpy as np

from .. import results

METHODS = ("PCA", "t-SNE", "UMAP")
MIN_POINTS = 5  # t-SNE and UMAP need a handful of neighbours


def _key(X: np.ndarray, method: str, seed: int) -> str:
    import sklearn
    import umap

    h = hashlib.sha256()
    h.update(f"{method}|{seed}|{X.shape}|{X.dtype}|sklearn{sklearn.__version__}|umap{umap.__version__}".encode())
    h.update(np.ascontiguousarray(X).tobytes())
    return h.hexdigest()[:32]


def compute(X: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """``X`` [n, d] projected to [n, 2]: first to at most 50 principal components, then by ``method``."""
    from sklearn.decomposition import PCA

    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a projection; choose one of {', '.join(METHODS)}")
    X = np.asarray(X, dtype=np.float32)
    n = len(X)
    if n < MIN_POINTS:
        raise ValueError(f"{n} points are too few to project (at least {MIN_POINTS}); raise n_embed_plot")
    reduced = PCA(n_components=min(50, n - 1, X.shape[1]), random_state=seed).fit_transform(X)
    if method == "PCA":
        return reduced[:, :2]
    if method == "t-SNE":
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, perplexity=min(30.0, max(1.0, (n - 1) / 3)), init="pca", random_state=seed,
                    method="exact" if n < 500 else "barnes_hut").fit_transform(reduced)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # umap: "n_jobs overridden by random_state", numba deprecations
        import umap

        return umap.UMAP(n_neighbors=min(15, n - 1), init="pca", random_state=seed).fit_transform(reduced)


def project(X: np.ndarray, method: str, cache_dir: str | Path | None, seed: int = 0) -> np.ndarray:
    """``compute(X, method, seed)``, read from ``cache_dir`` when this exact input was projected before."""
    X = np.asarray(X, dtype=np.float32)
    if cache_dir is None:
        return compute(X, method, seed)
    path = Path(cache_dir) / f"{method.lower().replace('-', '')}-{_key(X, method, seed)}.npy"
    if path.is_file():
        try:
            Y = np.load(path, allow_pickle=False)
            if isinstance(Y, np.ndarray) and Y.shape == (len(X), 2) and np.isfinite(Y).all():
                return Y
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            pass
        path.unlink(missing_ok=True)  # damaged: recompute below
    Y = np.asarray(compute(X, method, seed), dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, Y, allow_pickle=False)
    results.atomic_write_bytes(path, buf.getvalue())
    return Y
