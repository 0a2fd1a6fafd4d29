"""Feature reuse layer by layer (issue #12), after Matsoukas et al. 2022, "What makes transfer learning work
for medical images: feature reuse & other factors" (CVPR): what each layer of a fine-tuned network keeps from
ImageNet. Pure measuring functions on numpy arrays and torch modules; no I/O, plotting or notebooks.

* :func:`collect`: features at every probe point (:func:`probe_points`) in one forward pass per batch;
* :func:`knn_accuracy`: weighted k-NN accuracy of those features (Wu et al. 2018's cosine / exp(s / 0.07) vote);
* :class:`MinibatchCKA`, :func:`cka`, :func:`cka_matrix`, :func:`cka_bootstrap`: linear CKA (Kornblith et al.
  2019) from unbiased HSIC (Song et al. 2012) summed over minibatches (Nguyen et al. 2021);
* :func:`weight_distance`: relative weight change per unit (:func:`units`); :func:`resilience`: accuracy with one
  unit restored to its starting weights or re-drawn (Zhang et al. 2019, "Are all layers created equal?");
* :func:`stats_init`: the statistics-transfer initialisation; :func:`nested_subsets`: data-scarcity subsets.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .models import backbone

MODES = ("restore", "redraw")
Array = np.ndarray | torch.Tensor


# ----------------------------------------------------------------------------- probe points, units, features
def _depth(model_name: str, depth: int | None) -> int | None:
    """``depth`` checked against the backbone record: None for a network without blocks, else a positive int
    (default: the record's)."""
    record = backbone(model_name)
    if record.blocks is None:
        if depth is not None:
            raise ValueError(f"depth={depth!r} was given for model_name={model_name!r}, which has no blocks; "
                             "pass depth=None.")
        return None
    depth = record.depth if depth is None else depth
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth={depth!r} must be a positive int ({record.label} has {record.depth} blocks).")
    return depth


def probe_points(model_name: str, depth: int | None = None) -> dict[str, str]:
    """Ordered {layer name: module path} whose outputs :func:`collect` records (Matsoukas et al. 2022).

    AlexNet: pool1, pool2, relu3, relu4, pool5 (global-average-pooled to [N, C]), fc6, fc7 (after their ReLU).
    DeiT: ``embed`` = the tokens entering block 1 (patch embedding + cls token + position embedding, after
    pos_drop / norm_pre: the output of ``norm_pre``), then ``blockN`` = the residual stream after block N (the
    block's output), each as ``.cls`` (the CLS token) and ``.mean`` (mean of the patch tokens). ``depth``: the
    number of DeiT blocks (12 for DeiT-Base; smaller for test networks).
    """
    return backbone(model_name).probe_points(_depth(model_name, depth))


def units(model_name: str, depth: int | None = None) -> dict[str, str]:
    """Ordered {unit name: module or parameter path}: the units of :func:`weight_distance` and :func:`resilience`.

    AlexNet: conv1..conv5, fc6, fc7, head. DeiT: patch_embed, cls_token and pos_embed (each its own unit),
    block1..blockN (``blocks.0``..), norm, head. A unit holds exactly the state keys equal to its path or under
    ``path + "."`` (:func:`unit_keys`).
    """
    return backbone(model_name).unit_paths(_depth(model_name, depth))


def unit_keys(keys: Iterable[str], path: str) -> list[str]:
    """The keys of module path ``path``, matched exactly: ``path`` itself or ``path + '.' + rest``.

    So ``classifier.1`` never takes ``classifier.1x.*`` or ``classifier.10.*``, ``blocks.1`` never ``blocks.10.*``
    and ``fc`` never ``blocks.0.mlp.fc1.*`` (the substring match of the reference code did).
    """
    return [k for k in keys if k == path or k.startswith(path + ".")]


def _model_depth(model: nn.Module, model_name: str) -> int | None:
    return backbone(model_name).depth_of(model)


def _keys_depth(model_name: str, keys: Iterable[str]) -> int | None:
    return backbone(model_name).keys_depth(keys)


def _reduce(layer: str, out: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    """A probe's [N, d] features: CLS token, mean patch token, global average of a CNN map, or a vector."""
    if layer.endswith(".cls"):
        return out[:, 0]
    if layer.endswith(".mean"):
        return out[:, prefix_tokens:].mean(1)
    if out.dim() == 4:
        return out.mean((2, 3))
    if out.dim() == 2:
        return out
    raise ValueError(f"probe {layer!r} gave a {out.dim()}-d output {tuple(out.shape)}; "
                     "expected [N, C, H, W] or [N, d].")


def collect(model: nn.Module, model_name: str, batches: Iterable[Any]) -> dict[str, np.ndarray]:
    """{layer: float32 [N, d]} at every :func:`probe_points` layer, from ONE forward pass per batch.

    Forward hooks on all probe modules record their outputs while ``model(images)`` runs once per batch
    (eval mode, no gradients; the model's mode is restored). ``batches``: image tensors or (images, ...) tuples,
    moved to the model's device.
    """
    points = probe_points(model_name, _model_depth(model, model_name))
    prefix_tokens = getattr(model, "num_prefix_tokens", 0)
    by_path: dict[str, list[str]] = {}
    for layer, path in points.items():
        by_path.setdefault(path, []).append(layer)
    seen: dict[str, int] = {}
    out: dict[str, list[torch.Tensor]] = {layer: [] for layer in points}

    def hook(path: str):
        def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            seen[path] += 1
            for layer in by_path[path]:  # reduce now: AlexNet's in-place ReLUs may change `output` later
                out[layer].append(_reduce(layer, output.detach(), prefix_tokens).float().cpu().clone())
        return record

    handles = []
    for path in by_path:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"model has no module {path!r}, a probe point of model_name={model_name!r}; "
                             "pass the model_name the network was built as.") from None
        handles.append(module.register_forward_hook(hook(path)))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                images = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
                if not isinstance(images, torch.Tensor):
                    raise ValueError(f"each batch must be an image tensor or an (images, ...) tuple, "
                                     f"got {type(batch).__name__}.")
                seen.update(dict.fromkeys(by_path, 0))
                model(images.to(device))
                if bad := {p: c for p, c in seen.items() if c != 1}:
                    raise RuntimeError(f"probe modules ran {bad} times in one forward pass; each must run once.")
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if not out[next(iter(points))]:
        raise ValueError("batches is empty; pass at least one batch of images.")
    return {layer: torch.cat(parts).numpy() for layer, parts in out.items()}


# ----------------------------------------------------------------------------- k-NN
def _matrix(x: Array, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x).float()
    if t.dim() != 2 or len(t) == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, d] array, got shape {tuple(t.shape)}.")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or inf values; check the features that produced it.")
    return t


def _labels(y: Array, n: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(y)) if not isinstance(y, torch.Tensor) else y
    if t.dim() != 1 or len(t) != n or t.is_floating_point() or (n and t.min() < 0):
        raise ValueError(f"{name} must be {n} non-negative integer class indices, got {t.dtype} {tuple(t.shape)}.")
    return t.long().cpu()


def knn_predict(bank: Array, bank_labels: Array, queries: Array, ks: Sequence[int] = (20, 200), *,
                temperature: float = 0.07, batch_size: int = 256, num_classes: int | None = None
                ) -> dict[int, np.ndarray]:
    """{k: predicted class per query} of the weighted k-NN classifier (Wu et al. 2018; Caron et al. 2021).

    Features are L2-normalised; a query's neighbours are the k bank rows of highest cosine similarity s (k is
    capped at the bank size), each voting for its class with weight exp(s / temperature). Ties are broken
    deterministically: among bank rows of equal similarity at the k-th place the smallest bank indices enter,
    and among classes with equal votes the smallest class index wins. Queries run ``batch_size`` at a time,
    so memory is O(batch_size x bank size).
    """
    bank, queries = _matrix(bank, "bank"), _matrix(queries, "queries")
    labels = _labels(bank_labels, len(bank), "bank_labels")
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank has {bank.shape[1]} features per row but queries {queries.shape[1]}; "
                         "pass features of the same layer.")
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks={ks!r} must be positive ints, e.g. (20, 200).")
    if not temperature > 0 or not batch_size >= 1:
        raise ValueError(f"temperature={temperature!r} and batch_size={batch_size!r} must be positive.")
    classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if classes <= int(labels.max()):
        raise ValueError(f"num_classes={num_classes!r} but bank_labels go up to {int(labels.max())}; "
                         "pass num_classes=None or the number of classes.")
    labels = labels.to(bank.device)
    onehot = F.one_hot(labels, classes).float()
    bank, queries = F.normalize(bank, dim=1), queries.to(bank.device)
    preds: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(queries), batch_size):
        sim = F.normalize(queries[start:start + batch_size], dim=1) @ bank.T
        vals, idx = torch.topk(sim, min(max(ks), len(bank)), dim=1)  # sorted, descending
        for k in ks:
            k_ = min(k, len(bank))
            weights = torch.exp((vals[:, :k_] - vals[:, :1]) / temperature)  # exp(s / t) up to a per-query factor
            votes = torch.zeros(len(sim), classes, device=sim.device).scatter_add_(1, labels[idx[:, :k_]], weights)
            kth = vals[:, k_ - 1:k_]
            straddle = ((sim == kth).sum(1) != (vals[:, :k_] == kth).sum(1)).nonzero().flatten()
            if len(straddle):  # the k-th similarity ties with rows left out: the smallest bank indices enter
                s, t = sim[straddle], kth[straddle]
                above, tied = s > t, s == t
                chosen = above | (tied & (tied.cumsum(1) <= k_ - above.sum(1, keepdim=True)))
                weights = torch.exp((s - vals[straddle, :1]) / temperature)
                votes[straddle] = torch.where(chosen, weights, 0.0) @ onehot
            preds[k].append(votes.argmax(1).cpu())  # torch.argmax returns the first maximum: the smallest class wins
    return {k: torch.cat(p).numpy() for k, p in preds.items()}


def knn_accuracy(bank: Array, bank_labels: Array, queries: Array, query_labels: Array,
                 ks: Sequence[int] = (20, 200), *, temperature: float = 0.07, batch_size: int = 256
                 ) -> dict[int, float]:
    """{k: accuracy} of :func:`knn_predict` (bank = train features, queries = test features)."""
    truth = _labels(query_labels, len(_matrix(queries, "queries")), "query_labels")
    bank_y = _labels(bank_labels, len(_matrix(bank, "bank")), "bank_labels")
    classes = int(max(truth.max(), bank_y.max())) + 1
    preds = knn_predict(bank, bank_y, queries, ks, temperature=temperature, batch_size=batch_size,
                        num_classes=classes)
    return {k: float((p == truth.numpy()).mean()) for k, p in preds.items()}


# ----------------------------------------------------------------------------- CKA
def _hsic_terms(features: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Flattened linear Gram matrices with zero diagonal [L, n*n], their row sums [L, n] and totals [L].

    In float64, from features centred over the batch: HSIC_1 does not change when a constant is added to the
    features, and centring keeps its large cancelling terms small (e.g. the residual stream's huge dimensions)."""
    n = len(features[0])
    centred = [np.asarray(f, dtype=np.float64) - np.asarray(f, dtype=np.float64).mean(0) for f in features]
    grams = np.stack([(f @ f.T).ravel() for f in centred])
    grams[:, :: n + 1] = 0.0
    rows = grams.reshape(len(features), n, n).sum(2)
    return grams, rows, rows.sum(1), n


def _hsic1(a: tuple, b: tuple) -> np.ndarray:
    """Unbiased HSIC_1 (Song et al. 2012, JMLR) for every pair of layers, [La, Lb]:
    (tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1) / (n(n-3)), K~ = K with zero diagonal."""
    (ga, ra, sa, n), (gb, rb, sb, _) = a, b
    return (ga @ gb.T + np.outer(sa, sb) / ((n - 1) * (n - 2)) - 2.0 * (ra @ rb.T) / (n - 2)) / (n * (n - 3))


def _self_hsic(a: tuple) -> np.ndarray:
    """HSIC_1(K, K) per layer, [L]: the diagonal of ``_hsic1(a, a)``, without computing the other pairs."""
    g, r, s, n = a
    return (np.einsum("ij,ij->i", g, g) + s * s / ((n - 1) * (n - 2)) - 2.0 * np.einsum("ij,ij->i", r, r) / (n - 2)
            ) / (n * (n - 3))


def _layers(xs: Array | Sequence[Array], name: str) -> list[np.ndarray]:
    one = isinstance(xs, (np.ndarray, torch.Tensor))
    layers = [np.asarray(x).reshape(len(x), -1) for x in ([xs] if one else list(xs))]  # float64 per batch only
    if not layers:
        raise ValueError(f"{name} is empty; pass one [n, d] array or a list of them (one per layer).")
    if len({len(x) for x in layers}) != 1 or len(layers[0]) < 4:
        raise ValueError(f"{name} must hold the same n >= 4 images in every layer (unbiased HSIC needs 4), "
                         f"got {[len(x) for x in layers]} rows.")
    return layers


class MinibatchCKA:
    """Linear CKA accumulated over minibatches (Nguyen et al. 2021, "Do wide and deep networks learn the same
    things?", ICLR): CKA = sum_b HSIC_1(K_b, L_b) / sqrt(sum_b HSIC_1(K_b, K_b) * sum_b HSIC_1(L_b, L_b)),
    the HSIC terms summed over batches BEFORE normalising (not an average of per-batch CKA values).

    ``update(xs, ys)`` takes one batch: xs / ys one [b, d] array each, or lists of them (one per layer of network
    A / B, the same b images); ys=None compares xs with itself. :meth:`matrix` gives [layers A, layers B],
    :meth:`value` the single number of a one-layer pair. Linear kernels; the unbiased HSIC needs no centring.
    """

    def __init__(self) -> None:
        self.kl: np.ndarray | None = None
        self.kk: np.ndarray | None = None
        self.ll: np.ndarray | None = None
        self.vx: np.ndarray | None = None  # per layer: varies across the images of some batch
        self.vy: np.ndarray | None = None
        self.batches = 0

    def update(self, xs: Array | Sequence[Array], ys: Array | Sequence[Array] | None = None) -> None:
        layers_x = _layers(xs, "xs")
        layers_y = layers_x if ys is None else _layers(ys, "ys")
        a = _hsic_terms(layers_x)
        b = a if ys is None else _hsic_terms(layers_y)
        for name, layers in (("vx", layers_x), ("vy", layers_y)):  # which layers vary across the images at all
            varies = np.array([bool(np.ptp(x, axis=0).max() > 0) for x in layers])
            setattr(self, name, varies if getattr(self, name) is None else getattr(self, name) | varies)
        if a[3] != b[3]:
            raise ValueError(f"xs has {a[3]} images but ys {b[3]}; pass features of the same images.")
        kl, kk = _hsic1(a, b), _self_hsic(a)
        ll = kk if ys is None else _self_hsic(b)
        if self.kl is not None and self.kl.shape != kl.shape:
            raise ValueError(f"this batch has {kl.shape} layers, earlier ones {self.kl.shape}; keep the layers fixed.")
        self.kl = kl if self.kl is None else self.kl + kl
        self.kk = kk if self.kk is None else self.kk + kk
        self.ll = ll if self.ll is None else self.ll + ll
        self.batches += 1

    def matrix(self, undefined: str = "raise") -> np.ndarray:
        """[layers A, layers B] CKA from the summed HSIC terms.

        A layer whose summed HSIC with itself is <= 0 (no variance across the images, as DeiT's CLS token before
        the first block, which no image changes) has no CKA: ``undefined="raise"`` refuses it, ``"nan"`` gives NaN
        in its rows or columns."""
        if self.kl is None:
            raise ValueError("MinibatchCKA has no batches; call update(xs, ys) first.")
        if undefined not in ("raise", "nan"):
            raise ValueError(f"undefined={undefined!r}; choose 'raise' or 'nan'.")
        bad_x, bad_y = (self.kk <= 0) | ~self.vx, (self.ll <= 0) | ~self.vy
        for name, bad in (("xs", bad_x), ("ys", bad_y)):
            if bad.any() and undefined == "raise":
                raise ValueError(f"{name} layer(s) {np.flatnonzero(bad).tolist()} have summed HSIC <= 0 "
                                 "(no variance across images); CKA is undefined for them: leave them out.")
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self.kl / np.sqrt(np.outer(np.clip(self.kk, 0, None), np.clip(self.ll, 0, None)))
        out[bad_x[:, None] | bad_y[None, :]] = np.nan
        return out

    def value(self) -> float:
        """The CKA of a one-layer pair."""
        m = self.matrix()
        if m.shape != (1, 1):
            raise ValueError(f"value() is for one layer pair, this holds {m.shape}; use matrix().")
        return float(m[0, 0])


def _splits(n: int, batch_size: int, seed: int | None) -> list[np.ndarray]:
    """Image indices in ceil(n / batch_size) near-equal batches (at least 4 images each), shuffled by ``seed``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 4:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 4 (unbiased HSIC needs 4 images), e.g. 256.")
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    return np.array_split(order, max(1, min(math.ceil(n / batch_size), n // 4)))


def cka_matrix(features_a: Sequence[Array] | Mapping[str, Array], features_b: Sequence[Array] | Mapping[str, Array]
               | None = None, *, batch_size: int = 256, seed: int | None = 42, undefined: str = "raise") -> np.ndarray:
    """[layers A, layers B] minibatch linear CKA (:class:`MinibatchCKA`) between the layers of two networks on
    the same images (features_b=None: network A against itself). Images are shuffled with ``seed`` (so a batch
    is not one class of a class-sorted split; None keeps their order) and cut into ~``batch_size`` batches.
    ``undefined``: what a layer without variance across the images gets (:meth:`MinibatchCKA.matrix`)."""
    xs = _layers(list(features_a.values()) if isinstance(features_a, Mapping) else features_a, "features_a")
    ys = None if features_b is None else _layers(
        list(features_b.values()) if isinstance(features_b, Mapping) else features_b, "features_b")
    if ys is not None and len(ys[0]) != len(xs[0]):
        raise ValueError(f"features_a has {len(xs[0])} images, features_b {len(ys[0])}; pass the same images.")
    acc = MinibatchCKA()
    for idx in _splits(len(xs[0]), batch_size, seed):
        acc.update([x[idx] for x in xs], None if ys is None else [y[idx] for y in ys])
    return acc.matrix(undefined)


def cka(x: Array, y: Array, *, batch_size: int = 256, seed: int | None = 42, undefined: str = "raise") -> float:
    """Minibatch linear CKA of one pair of [n, d] feature arrays (see :func:`cka_matrix`)."""
    return float(cka_matrix([x], [y], batch_size=batch_size, seed=seed, undefined=undefined)[0, 0])


def cka_bootstrap(x: Array, y: Array, *, batch_size: int = 256, n_boot: int = 1000, level: float = 0.95,
                  seed: int = 42) -> tuple[float, float, float]:
    """(CKA, ci_low, ci_high): :func:`cka` and its percentile bootstrap interval over images (``n_boot``
    resamples of the n images with replacement, seed ``seed``, the minibatch CKA recomputed on each: n_boot + 1
    CKA computations, so lower n_boot for wide layers).

    All NaN where CKA is undefined (a representation without variance across the images, such as DeiT's CLS
    token before the first block). A resample that leaves a representation without variance (possible only with
    a handful of images) has no CKA and is left out of the interval; all NaN interval if none is left."""
    xs, ys = _layers([x], "x"), _layers([y], "y")
    if len(xs[0]) != len(ys[0]):
        raise ValueError(f"x has {len(xs[0])} images, y {len(ys[0])}; pass features of the same images.")
    if not 0 < level < 1 or isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"level={level!r} must lie in (0, 1) and n_boot={n_boot!r} be a positive int.")
    value = cka(xs[0], ys[0], batch_size=batch_size, seed=seed, undefined="nan")
    if np.isnan(value):
        return value, math.nan, math.nan
    rng, n = np.random.default_rng(seed), len(xs[0])
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)  # already a random order: batches are taken as drawn
        boots.append(cka(xs[0][idx], ys[0][idx], batch_size=batch_size, seed=None, undefined="nan"))
    boots = [b for b in boots if not np.isnan(b)]
    if not boots:
        return value, math.nan, math.nan
    low, high = np.percentile(boots, [50 * (1 - level), 50 * (1 + level)])
    return value, float(low), float(high)


# ----------------------------------------------------------------------------- weights
def _state(state: Mapping[str, torch.Tensor] | nn.Module, name: str) -> dict[str, torch.Tensor]:
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{name} must be a non-empty state dict or module, got {type(state).__name__}.")
    return {k: v.detach() for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _unit_map(model_name: str, keys: Sequence[str]) -> dict[str, list[str]]:
    """{unit: its keys}; every unit must own keys and every key belong to a unit."""
    owned = {unit: unit_keys(keys, path) for unit, path in units(model_name, _keys_depth(model_name, keys)).items()}
    if empty := [u for u, k in owned.items() if not k]:
        raise ValueError(f"units {empty} of model_name={model_name!r} have no tensors in this state; check model_name.")
    if stray := sorted(set(keys) - {k for ks in owned.values() for k in ks}):
        raise ValueError(f"tensors {stray[:8]} belong to no unit of model_name={model_name!r}; check model_name.")
    return owned


def weight_distance(initial_state: Mapping[str, torch.Tensor] | nn.Module,
                    finetuned_state: Mapping[str, torch.Tensor] | nn.Module, model_name: str, *,
                    skip_zero_norm: bool = False) -> dict[str, float]:
    """{unit: sum over the unit's tensors of ||w_ft - w_0|| / ||w_0||} (Matsoukas et al. 2022; Neyshabur et al.
    2020): each tensor's relative change on its own (Frobenius norms), then summed per :func:`units` unit.

    A tensor with ||w_0|| = 0 (zero-initialised biases of a random-init DeiT) has no relative change: unchanged it
    adds 0; changed, it raises ValueError unless ``skip_zero_norm=True``, which leaves it out.
    """
    a, b = _state(initial_state, "initial_state"), _state(finetuned_state, "finetuned_state")
    if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
        diff = sorted(set(a) ^ set(b)) or [k for k in a if a[k].shape != b[k].shape]
        raise ValueError(f"initial_state and finetuned_state differ in keys or shapes ({diff[:8]}); "
                         "pass two states of the same architecture.")
    out, zero = {}, []
    for unit, keys in _unit_map(model_name, list(a)).items():
        total = 0.0
        for k in keys:
            w0 = a[k].double().cpu()
            norm, change = float(w0.norm()), float((b[k].double().cpu() - w0).norm())
            if norm > 0:
                total += change / norm
            elif change > 0:
                zero.append(k)
        out[unit] = total
    if zero and not skip_zero_norm:
        raise ValueError(f"tensors {zero[:8]} start at zero (||w_0|| = 0) and changed, so their relative distance "
                         "is undefined; pass skip_zero_norm=True to leave them out.")
    return out


def _draw(like: torch.Tensor, source: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A tensor shaped like ``like``, i.i.d. normal with ``source``'s mean and (population) std."""
    src = source.detach().double().cpu()
    mean, std = float(src.mean()), float(src.std(unbiased=False))
    draw = torch.randn(like.shape, generator=generator, dtype=torch.float64) * std + mean
    return draw.to(like.device, like.dtype)


def _generator(seed: int, unit: str) -> torch.Generator:
    """A generator per (seed, unit), so a unit's re-draw does not depend on which other units are drawn."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an int.")
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, zlib.crc32(unit.encode())]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def _unit_tensors(model: nn.Module, model_name: str, unit: str, mode: str,
                  initial_state: Mapping[str, torch.Tensor] | None, seed: int) -> dict[str, torch.Tensor]:
    """{state key: new tensor} of ``unit`` in ``mode``: "restore" = its starting weights from ``initial_state``,
    "redraw" = each tensor drawn i.i.d. from a normal with that tensor's own mean and std (in ``model``)."""
    paths = units(model_name, _model_depth(model, model_name))
    if unit not in paths:
        raise ValueError(f"unit={unit!r} is not a unit of model_name={model_name!r}; choose one of {list(paths)}.")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}.")
    current = _state(model, "model")
    keys = unit_keys(current, paths[unit])
    if mode == "redraw":
        generator = _generator(seed, unit)
        return {k: _draw(current[k], current[k], generator) for k in keys}
    if initial_state is None:
        raise ValueError("mode='restore' needs initial_state, the state dict the fine-tune started from.")
    start = _state(initial_state, "initial_state")
    if bad := [k for k in keys if k not in start or start[k].shape != current[k].shape]:
        raise ValueError(f"initial_state lacks {bad[:8]} or has other shapes there; pass the state the fine-tune "
                         "started from.")
    return {k: start[k].to(current[k].device, current[k].dtype) for k in keys}


def perturbed(model: nn.Module, model_name: str, unit: str, mode: str, *,
              initial_state: Mapping[str, torch.Tensor] | None = None, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with ``unit`` restored / re-drawn as :func:`resilience` scores it; ``model`` is untouched."""
    tensors = _unit_tensors(model, model_name, unit, mode, initial_state, seed)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        state = clone.state_dict()
        for key, value in tensors.items():
            state[key].copy_(value)
    return clone


def stages(model: nn.Module, model_name: str) -> list[tuple[str, nn.Module]]:
    """The network as a sequence of (key prefix, module) steps whose composition is ``model``'s forward pass:
    AlexNet features.0..12, avgpool, flatten, classifier.0..6; DeiT patch_embed, the tokens step (cls_token,
    pos_embed, pos_drop, patch_drop, norm_pre), blocks.0.., norm, CLS pooling, head. Modules are shared.
    The backbone record's ``stages``."""
    return backbone(model_name).stages(model)


@dataclass
class Resilience:
    """Accuracy on the scored images: the network as is, and with each unit restored / re-drawn."""

    baseline: float
    restore: dict[str, float]
    redraw: dict[str, float]
    images: int


def resilience(model: nn.Module, model_name: str, initial_state: Mapping[str, torch.Tensor] | None,
               batches: Iterable[Any], *, seed: int = 0, unit_names: Sequence[str] | None = None,
               modes: Sequence[str] = MODES) -> Resilience:
    """Layer-wise resilience (Matsoukas et al. 2022; Zhang et al. 2019): the fine-tuned network's
    accuracy with one :func:`units` unit at a time (a) restored to its weights in ``initial_state`` and (b)
    re-drawn (:func:`perturbed`, per-unit generator from ``seed``), all other weights as fine-tuned.

    Each batch ((images, labels) tuples) runs through :func:`stages` once, caching the input of every unit's
    step; a perturbed unit then re-runs only its own step (``torch.func.functional_call`` with the new tensors,
    so ``model`` is never modified) and the steps after it. Eval mode, no gradients.
    """
    steps = stages(model, model_name)
    step_keys = [[f"{p}.{k}" if p else k for k in m.state_dict()] for p, m in steps]
    current = _state(model, "model")
    if {k for keys in step_keys for k in keys} != set(model.state_dict()):
        raise ValueError(f"model's state does not match the stages of model_name={model_name!r}; pass a stock model.")
    chosen = list(units(model_name, _model_depth(model, model_name)) if unit_names is None else unit_names)
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"modes={tuple(modes)!r}; choose a non-empty subset of {MODES}.")
    plan: dict[str, tuple[int, dict[str, dict[str, torch.Tensor]]]] = {}
    for unit in chosen:
        variants = {mode: _unit_tensors(model, model_name, unit, mode, initial_state, seed) for mode in modes}
        where = {i for i, keys in enumerate(step_keys) for k in variants[modes[0]] if k in keys}
        if len(where) != 1:
            raise ValueError(f"unit={unit!r} spans steps {sorted(where)}; resilience needs one step per unit.")
        i = where.pop()
        cut = len(steps[i][0]) + 1 if steps[i][0] else 0
        plan[unit] = (i, {mode: {k[cut:]: t for k, t in v.items()} for mode, v in variants.items()})
    starts = {i for i, _ in plan.values()}  # the steps whose inputs are kept, per batch
    device = next(iter(current.values())).device
    correct = {(unit, mode): 0 for unit in plan for mode in modes}
    base = total = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise ValueError("resilience needs (images, labels) batches to score accuracy.")
                h, labels = batch[0].to(device), batch[1].to(device)
                inputs = {}
                for i, (_, module) in enumerate(steps):
                    if i in starts:
                        inputs[i] = h
                    h = module(h)
                base += int((h.argmax(1) == labels).sum())
                total += len(labels)
                for unit, (i, variants) in plan.items():
                    for mode, tensors in variants.items():
                        h = functional_call(steps[i][1], tensors, (inputs[i],))
                        for _, module in steps[i + 1:]:
                            h = module(h)
                        correct[(unit, mode)] += int((h.argmax(1) == labels).sum())
    finally:
        model.train(was_training)
    if not total:
        raise ValueError("batches is empty; pass at least one (images, labels) batch.")
    scores = {mode: {unit: correct[(unit, mode)] / total for unit in plan if mode in modes} for mode in MODES}
    return Resilience(base / total, scores["restore"], scores["redraw"], total)


# ----------------------------------------------------------------------------- initialisation, subsets
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
_TOKENS = ("cls_token", "pos_embed")


def stats_init(model: nn.Module, source_state: Mapping[str, torch.Tensor] | nn.Module, seed: int) -> nn.Module:
    """Statistics-transfer initialisation (Matsoukas et al. 2022's "ST"), in place; returns ``model``.

    Every conv / linear weight and bias is drawn i.i.d. from a normal with the mean and (population) std of the
    same-named tensor of ``source_state`` (a head of another size takes its source's statistics), DeiT's
    ``cls_token`` and ``pos_embed`` likewise; norm layers are reset to their defaults (weight 1, bias 0, fresh
    running statistics). One generator seeded with ``seed``, modules in ``named_modules`` order.
    """
    source = _state(source_state, "source_state")
    generator = _generator(seed, "stats_init")
    done: set[str] = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            own = [(f"{name}.{p}" if name else p, t) for p, t in module.named_parameters(recurse=False)]
            if isinstance(module, _NORMS):
                module.reset_parameters()
                done.update(key for key, _ in own)
                continue
            if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                own = [(key, t) for key, t in own if key in _TOKENS]  # the model's own cls_token / pos_embed
            for key, tensor in own:
                if key not in source:
                    raise ValueError(f"source_state has no {key!r}; pass the state dict of the source network.")
                tensor.copy_(_draw(tensor, source[key], generator))
                done.add(key)
    if stray := [k for k, _ in model.named_parameters() if k not in done]:
        raise ValueError(f"stats_init has no rule for parameters {stray[:8]} (neither conv, linear, norm nor "
                         f"{_TOKENS}); extend stats_init for this architecture.")
    return model


def nested_subsets(labels: Array, fractions: Sequence[float] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0), *,
                   seed: int) -> dict[float, np.ndarray]:
    """{fraction: sorted image indices}: nested stratified subsets for the data-scarcity curves (Matsoukas
    et al. 2022). Each class's images are shuffled once with ``seed`` and every fraction takes the
    first max(1, round-half-up(fraction x n_c)) of them, so each subset contains all smaller ones; 1.0 = all."""
    y = np.asarray(labels)
    if y.ndim != 1 or not len(y) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-d integer array, got {y.dtype} {y.shape}.")
    fr = [float(f) for f in fractions]
    if not fr or any(not 0 < f <= 1 for f in fr) or len(set(fr)) != len(fr):
        raise ValueError(f"fractions={tuple(fractions)!r} must be distinct values in (0, 1], e.g. (0.1, 0.5, 1.0).")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed={seed!r} must be an int.")
    rng = np.random.default_rng(seed)
    chosen: dict[float, list[np.ndarray]] = {f: [] for f in sorted(fr)}
    for c in np.unique(y):
        order = rng.permutation(np.flatnonzero(y == c))
        for f in chosen:
            chosen[f].append(order[:max(1, min(len(order), math.floor(f * len(order) + 0.5)))])
    return {f: np.sort(np.concatenate(parts)) for f, parts in chosen.items()}
