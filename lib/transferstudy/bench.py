"""`transferstudy bench`: what the frozen regimes cost, the original study's pipeline against this build's.

Both pipelines run in one process on the same stratified subset of the real data, from the same
backbone weights and head initialisation, with the same batches, optimiser and schedule:

- **naive**, the original study's shape: a torch Dataset decodes each image file with PIL and applies
  Resize -> ToTensor -> Normalize per image in a DataLoader (2 workers); the frozen backbone runs on
  every batch of every epoch of the linear probe (and on val after each epoch), then again in a
  separate extraction pass for the SVM (whose test embeddings also feed the plots).
- **cached**, this build: images decoded once into uint8 tensors, preprocessed in batches on the
  compute device, one backbone pass per image into the feature cache (``features.embeddings``), the
  probe trained on the cached features (``training.fit``), the SVM and the plot embeddings read back
  from the cache.

Also measured: the fp32 matmul peak, the forward pass's GFLOP/s (FLOPs counted by FlopCounterMode) and
its largest layer's alone, the share of a full fine-tuning step spent in preprocessing, and the peak
resident memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms
from tqdm import tqdm  # not tqdm.auto: its bar calls iter() eagerly, starting a second DataLoader iterator

from . import classical, config, data, features, models, regimes, reuse, session, training
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessor
from .results import atomic_write_bytes, peak_rss_mb

SPLITS = ("train", "val", "test")
# Targets the benchmark reports against.
MIN_PROBE_SPEEDUP = 8.0
MAX_PROBE_ACC_DIFF_PP = 0.5
MIN_NAIVE_FORWARDS = 12.0
# the forward-speed target per backbone (its record's min_forward_peak_fraction)
MIN_FORWARD_PEAK_FRACTION = {name: b.min_forward_peak_fraction for name, b in models.BACKBONES.items()}
MAX_PREPROCESS_SHARE = 0.05
# The layer-wise analysis (issue #12): resilience with each unit's input cached, against re-running the whole
# network per unit and mode; the target is DeiT-Base's (AlexNet's early units leave little to skip).
MIN_RESILIENCE_SAVING = {"deit_base": 1.8}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``transferstudy bench``."""
    parser.add_argument("--model", default="alexnet", choices=models.MODELS)
    parser.add_argument("--dataset", default="cifar10", choices=data.DATASETS)
    parser.add_argument("--data-dir", default=None,
                        help="the dataset's folder (default: $TRANSFERSTUDY_DATA_ROOT/<dataset> or data/<dataset>)")
    parser.add_argument("--n", type=int, default=2000,
                        help="train images; val and test get n/4 each (stratified subsets; default 2000)")
    parser.add_argument("--epochs", type=int, default=10, help="linear-probe epochs (default 10, as in the study)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch (default 64)")
    parser.add_argument("--eval-batch-size", type=int, default=128, help="extraction / evaluation batch (default 128)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the naive pipeline (default 2)")
    parser.add_argument("--pretrained", default="auto", choices=("auto", "true", "false"),
                        help="ImageNet weights: auto uses them when available, else random init (and says so)")
    parser.add_argument("--weights-path", default=None, help="a local ImageNet state-dict file")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--analysis-images", type=int, default=32,
                        help="test images for the layer-wise analysis's costs (probe passes, resilience; default 32)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON (atomically)")
    parser.add_argument("--markdown", default=None, metavar="FILE",
                        help="write the results table and the exact command as Markdown (e.g. benchmarks/RESULTS.md)")


def main(args: argparse.Namespace) -> int:
    """Run the benchmark, print its table, write ``--json`` / ``--markdown``; returns the exit status."""
    _check_args(args)
    result = run(args)
    print(format_table(result))
    if args.json:
        atomic_write_bytes(Path(args.json), (json.dumps(result, indent=2) + "\n").encode())
    if args.markdown:
        atomic_write_bytes(Path(args.markdown), markdown(result).encode())
    return 0


def _check_args(args: argparse.Namespace) -> None:
    for name, low, why in (("n", 4, "val and test get n/4 images each"), ("epochs", 1, "the study used 10"),
                           ("batch_size", 1, "the study used 64"), ("eval_batch_size", 1, "e.g. 128"),
                           ("analysis_images", 4, "e.g. 32"),
                           ("workers", 0, "0 loads in the main process")):
        value = getattr(args, name)
        if value < low:
            raise ValueError(f"bench --{name.replace('_', '-')} must be >= {low} ({why}), got {value}")
    if args.weights_path is not None and args.pretrained == "false":
        raise ValueError("bench --weights-path loads ImageNet weights; drop it or drop --pretrained false")


def command(args: argparse.Namespace) -> str:
    """The ``transferstudy bench`` command line that reproduces ``args``."""
    parts = ["transferstudy", "bench", "--model", args.model, "--dataset", args.dataset, "--n", str(args.n),
             "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
             "--eval-batch-size", str(args.eval_batch_size), "--workers", str(args.workers),
             "--analysis-images", str(args.analysis_images),
             "--pretrained", args.pretrained, "--device", args.device, "--seed", str(args.seed)]
    for flag, value in (("--data-dir", args.data_dir), ("--weights-path", args.weights_path),
                        ("--json", args.json), ("--markdown", args.markdown)):
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


# --- the run ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both pipelines and the machine measurements; the JSON-ready result."""
    progress = sys.stderr.isatty()
    device = models.select_device(args.device)
    data_dir = Path(args.data_dir) if args.data_dir else session.default_data_dir(args.dataset)
    n_eval = max(1, args.n // 4)
    subset = dict(n_train=args.n, n_val=n_eval, n_test=n_eval, seed=args.seed)
    if any("#" in f for f in data.load_dataset(args.dataset, data_dir, decode=False, **subset).train.files):
        raise ValueError(f"bench needs image files (the naive pipeline decodes each one), but {data_dir} holds "
                         "torchvision's pickled CIFAR-10; pass --data-dir a train/<class>/ + test/<class>/ image "
                         "folder (../shared/data/extract.sh unpacks one)")
    net, pretrained = _build(args, len(data.CLASSES[args.dataset]))
    net.to(device)
    regimes.apply_regime(net, args.model, "linear_probe")
    head = models.head(net, args.model)
    head_init = copy.deepcopy(head.state_dict())
    counter = _ForwardCounter(_backbone(net, args.model))
    probe_cfg = config.resolve("linear_probe", args.model, args.dataset)
    svm_cfg = config.resolve("frozen_svm", args.model, args.dataset)
    kinds = {"probe": models.EMBEDDINGS[args.model][-1], "svm": svm_cfg["embedding"]}
    setup = _Setup(args, device, net, head, head_init, counter, probe_cfg, svm_cfg, kinds, progress)

    print(f"bench: {args.model} on {args.dataset} ({data_dir}), {args.n} train / {n_eval} val / {n_eval} test, "
          f"{'ImageNet weights' if pretrained else 'random init (pretrained: false)'}, device {device}")
    with tempfile.TemporaryDirectory(prefix="transferstudy-bench-") as cache_dir:
        cached, ds = _cached(setup, data_dir, subset, Path(cache_dir))
    naive = _naive(setup, data_dir, subset)
    counter.remove()

    forward = _forward_speed(setup, ds)
    share = _preprocess_share(setup, ds)
    analysis = _analysis_costs(setup, ds)
    usage_self, usage_children = peak_rss_mb("self"), peak_rss_mb("children")
    result: dict[str, Any] = {
        "model": args.model, "dataset": args.dataset, "n": args.n, "n_val": n_eval, "n_test": n_eval,
        "pretrained": pretrained, "device": str(device), "torch": torch.__version__, "epochs": args.epochs,
        "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size, "workers": args.workers,
        "naive": naive, "cached": cached,
        "probe_speedup": naive["probe_wall_s"] / cached["probe_wall_s"],
        "probe_acc_diff_pp": 100 * (cached["probe_test_acc"] - naive["probe_test_acc"]),
        **forward,
        **share,
        **analysis,
        "peak_rss_mb": usage_self + usage_children,
        "peak_rss_self_mb": usage_self,
        "peak_rss_children_mb": usage_children,
        "command": command(args),
    }
    result["targets"] = targets(result)
    return result


@dataclass
class _Setup:
    """What both pipelines share: settings, the network, its head's initial weights, the forward counter."""

    args: argparse.Namespace
    device: torch.device
    net: nn.Module
    head: nn.Module
    head_init: dict[str, torch.Tensor]
    counter: _ForwardCounter
    probe_cfg: dict[str, Any]
    svm_cfg: dict[str, Any]
    kinds: dict[str, str]
    progress: bool

    def fresh_head(self) -> tuple[torch.optim.Optimizer, Any]:
        """Reset the head to its initial weights; the probe's optimiser and schedule for it."""
        self.head.load_state_dict(self.head_init)
        cfg, steps = self.probe_cfg, math.ceil(self.args.n / self.args.batch_size)
        opt = training.make_optimizer({"head": list(self.head.parameters())}, name=cfg["optimizer"], lr=cfg["lr"],
                                      weight_decay=cfg["weight_decay"])
        sched = training.make_scheduler(opt, name=cfg["scheduler"], epochs=self.args.epochs, steps_per_epoch=steps,
                                        warmup_frac=cfg["warmup_frac"])
        return opt, sched

    def embed(self, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: models.embed(self.net, self.args.model, x, kind)


def _build(args: argparse.Namespace, num_classes: int) -> tuple[nn.Module, bool]:
    """The model with a fresh head, and whether it has ImageNet weights (auto: random init if unavailable)."""
    torch.manual_seed(args.seed)
    if args.pretrained == "false":
        return models.build_model(args.model, num_classes, pretrained=False), False
    try:
        return models.build_model(args.model, num_classes, weights_path=args.weights_path), True
    except models.WeightsUnavailable as error:
        if args.pretrained == "true":
            raise
        print(f"bench: ImageNet weights are unavailable ({str(error).split('.')[0]}); benchmarking a randomly "
              "initialised network instead (pretrained: false). Timings hold; accuracies mean little.")
        torch.manual_seed(args.seed)
        return models.build_model(args.model, num_classes, pretrained=False), False


def _backbone(net: nn.Module, model: str) -> nn.Module:
    """The module every backbone forward pass enters exactly once: the first of the record's stages (AlexNet
    ``features.0``, DeiT ``patch_embed``)."""
    return models.backbone(model).stages(net)[0][1]


class _ForwardCounter:
    """Counts images entering the backbone, per split (set ``split``; None counts nothing)."""

    def __init__(self, module: nn.Module) -> None:
        self.split: str | None = None
        self.images = dict.fromkeys(SPLITS, 0)
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self.split is not None:
            self.images[self.split] += len(inputs[0])

    def take(self, sizes: dict[str, int]) -> dict[str, float]:
        """Backbone passes per image of each split, and overall (key "all"), since the last take; resets."""
        per = {s: self.images[s] / sizes[s] for s in SPLITS}
        per["all"] = sum(self.images.values()) / sum(sizes.values())
        self.images = dict.fromkeys(SPLITS, 0)
        self.split = None
        return per

    def remove(self) -> None:
        self._handle.remove()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _svm_accuracy(setup: _Setup, X: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> tuple[float, float]:
    """Fit the frozen-feature SVM on train; (test accuracy, fit seconds)."""
    cfg = setup.svm_cfg
    tick = time.perf_counter()
    svm = classical.svm_pipeline(C=cfg["C"], class_weight=cfg["class_weight"], max_iter=cfg["max_iter"],
                                 pca=cfg["pca"], kernel=cfg["kernel"])
    svm.fit(X["train"], labels["train"])
    return float((svm.predict(X["test"]) == labels["test"]).mean()), time.perf_counter() - tick


# --- cached: this build ----------------------------------------------------------------------


def _cached(setup: _Setup, data_dir: Path, subset: dict[str, Any],
            cache_dir: Path) -> tuple[dict[str, Any], data.DatasetSplits]:
    args, device, counter = setup.args, setup.device, setup.counter
    print("cached: decoding the subset once, then one backbone pass per image into a fresh feature cache")
    tick = time.perf_counter()
    ds = data.load_dataset(args.dataset, data_dir, **subset)
    load_s = time.perf_counter() - tick
    splits = {s: getattr(ds, s) for s in SPLITS}
    pre = Preprocessor(size=224, mode="resize", channels_last=models.channels_last(args.model))
    common = dict(weights_id=f"bench:{args.model}", cache_dir=cache_dir, preprocess=pre,
                  batch_size=args.eval_batch_size, device=device, context={"dataset": args.dataset},
                  log=lambda line: None, progress=setup.progress)
    # The backbone pass: the embedding the cache stores (AlexNet's penultimate derives from its pooled one).
    stored = models.backbone(args.model).stored_kind(setup.kinds["probe"])
    tick = time.perf_counter()
    for name, split in splits.items():
        counter.split = name
        features.embeddings(setup.net, args.model, stored, {name: split}, **common)
    _sync(device)
    extract_s = time.perf_counter() - tick
    counter.split = "train"  # any backbone pass from here on would count against the cache

    tick = time.perf_counter()
    X = features.embeddings(setup.net, args.model, setup.kinds["probe"], splits, **common)
    feats = {s: features.FeatureSplit(X[s], splits[s].labels) for s in SPLITS}
    opt, sched = setup.fresh_head()
    cfg = setup.probe_cfg
    training.fit(setup.head, feats["train"], feats["val"], preprocess=features.identity, optimizer=opt,
                 scheduler=sched, epochs=args.epochs, batch_size=args.batch_size, device=device,
                 label_smoothing=cfg["label_smoothing"], patience=None, monitor=cfg["monitor"], seed=args.seed,
                 log=lambda line: print("cached probe:", line), progress=setup.progress)
    _, pred = training.predict(setup.head, feats["test"], preprocess=features.identity,
                               batch_size=args.eval_batch_size, device=device)
    _sync(device)
    probe_s = time.perf_counter() - tick

    labels = {s: splits[s].labels.numpy() for s in SPLITS}
    X_svm = features.embeddings(setup.net, args.model, setup.kinds["svm"], splits, **common)
    svm_acc, svm_s = _svm_accuracy(setup, X_svm, labels)
    features.embeddings(setup.net, args.model, setup.kinds["svm"], {"test": ds.test}, **common)  # the plots
    n_images = sum(len(s) for s in splits.values())
    return {
        "extract_img_s": n_images / extract_s,
        "probe_wall_s": load_s + extract_s + probe_s,
        "probe_test_acc": float((pred == labels["test"]).mean()),
        "forwards_per_image": (per := counter.take({s: len(v) for s, v in splits.items()}))["all"],
        "forwards_per_split": {s: per[s] for s in SPLITS},
        "load_s": load_s, "extract_s": extract_s, "probe_train_s": probe_s,
        "svm_test_acc": svm_acc, "svm_fit_s": svm_s,
    }, ds


# --- naive: the original study's shape -------------------------------------------------------


class PilImages(Dataset):
    """Image files decoded with PIL and transformed one by one: Resize -> ToTensor -> Normalize."""

    def __init__(self, root: Path, files: list[str], labels: torch.Tensor, size: int = 224) -> None:
        self.paths = [root / f for f in files]
        self.labels = labels.tolist()
        self.transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), self.labels[i]


class SeededOrder(Sampler[int]):
    """Each epoch a ``torch.randperm`` from one generator seeded once: the batches ``training.fit`` draws."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.generator = n, torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.generator).tolist())

    def __len__(self) -> int:
        return self.n


def _naive(setup: _Setup, data_dir: Path, subset: dict[str, Any]) -> dict[str, Any]:
    args, device, counter = setup.args, setup.device, setup.counter
    print(f"naive: PIL decode + per-image transforms in a DataLoader ({args.workers} workers), "
          "the backbone on every batch of every epoch")
    tick = time.perf_counter()
    listing = data.load_dataset(args.dataset, data_dir, decode=False, **subset)
    load_s = time.perf_counter() - tick
    splits = {s: getattr(listing, s) for s in SPLITS}
    images = {s: PilImages(data_dir, v.files, v.labels) for s, v in splits.items()}
    loader = dict(num_workers=args.workers, pin_memory=device.type == "cuda")

    def eval_loader(name: str) -> DataLoader:
        return DataLoader(images[name], batch_size=args.eval_batch_size, shuffle=False, **loader)

    tick = time.perf_counter()
    training.seed_everything(args.seed)
    order = SeededOrder(len(images["train"]), args.seed)
    train = DataLoader(images["train"], batch_size=args.batch_size, sampler=order, **loader)
    opt, sched = setup.fresh_head()
    _naive_probe(setup, train, lambda: eval_loader("val"), opt, sched)
    counter.split = "test"
    logits, labels = _naive_logits(setup, eval_loader("test"))
    _sync(device)
    probe_s = time.perf_counter() - tick
    probe_acc = float((logits.argmax(1) == labels).float().mean())

    X, y, n_images = {}, {}, 0
    tick = time.perf_counter()
    for name in SPLITS:
        counter.split = name
        X[name], y[name] = _naive_extract(setup, eval_loader(name), setup.kinds["svm"])
        n_images += len(y[name])
    _sync(device)
    extract_s = time.perf_counter() - tick
    svm_acc, svm_s = _svm_accuracy(setup, X, y)  # the plots reuse X["test"]
    per = counter.take({s: len(v) for s, v in splits.items()})
    return {
        "extract_img_s": n_images / extract_s,
        "probe_wall_s": load_s + probe_s,
        "probe_test_acc": probe_acc,
        "forwards_per_image": per["all"],
        "forwards_per_split": {s: per[s] for s in SPLITS},
        "load_s": load_s, "extract_s": extract_s, "probe_train_s": probe_s,
        "svm_test_acc": svm_acc, "svm_fit_s": svm_s,
    }


def _naive_probe(setup: _Setup, train: DataLoader, val: Callable[[], DataLoader], opt: torch.optim.Optimizer,
                 scheduler: Any) -> None:
    """The linear probe through the frozen backbone, step for step as ``training.fit`` trains on features."""
    args, device, head, cfg = setup.args, setup.device, setup.head, setup.probe_cfg
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    maximize = cfg["monitor"] == "val_acc"
    best, best_state = -math.inf if maximize else math.inf, None
    for epoch in range(1, args.epochs + 1):
        setup.counter.split = "train"
        head.train()
        for images, labels in tqdm(train, desc=f"naive epoch {epoch}", disable=not setup.progress, leave=False):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.no_grad(), models.autocast(device):
                x = models.embed(setup.net, args.model, images, setup.kinds["probe"])
            with models.autocast(device):
                logits = head(x)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if scheduler is not None and not isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step()
        setup.counter.split = "val"
        logits, labels = _naive_logits(setup, val())
        val_loss = F.cross_entropy(logits, labels).item()
        val_acc = (logits.argmax(1) == labels).float().mean().item()
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(1.0 - val_acc)
        metric = val_acc if maximize else val_loss
        print(f"naive probe: epoch {epoch}/{args.epochs}  val loss {val_loss:.4f} acc {val_acc:.4f}")
        if (metric > best) if maximize else (metric < best):
            best, best_state = metric, copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)


@torch.no_grad()
def _naive_extract(setup: _Setup, loader: DataLoader, kind: str) -> tuple[np.ndarray, np.ndarray]:
    outputs, labels = [], []
    for images, y in tqdm(loader, disable=not setup.progress, leave=False):
        with models.autocast(setup.device):
            out = models.embed(setup.net, setup.args.model, images.to(setup.device, non_blocking=True), kind)
        outputs.append(out.float().cpu())
        labels.append(y)
    return torch.cat(outputs).numpy(), torch.cat(labels).numpy()


@torch.no_grad()
def _naive_logits(setup: _Setup, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Head logits (float32, CPU) through the frozen backbone, and the labels."""
    setup.head.eval()
    X, y = _naive_extract(setup, loader, setup.kinds["probe"])
    with models.autocast(setup.device):
        logits = setup.head(torch.from_numpy(X).to(setup.device))
    return logits.float().cpu(), torch.from_numpy(y)


# --- the machine -----------------------------------------------------------------------------


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None,
                       reps: int = 20) -> float:
    """GFLOP/s of the fastest of ``reps`` large square ``torch.matmul`` calls (2 n^3 FLOPs each).

    The fastest, not the mean: on a shared machine many calls are slowed by neighbours, and few
    tries underestimate the peak (3 tries read 145-270 GFLOP/s on the dev machine, 20 read 240-310).
    """
    size = size or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    torch.matmul(a, b)
    return 2 * size**3 / _fastest(lambda: torch.matmul(a, b), device, reps) / 1e9


def _fastest(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Seconds of the fastest of ``reps`` calls of ``fn``."""
    best = math.inf
    for _ in range(reps):
        _sync(device)
        tick = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - tick)
    return best


# The layer with the most FLOPs of each model's extraction forward (a test checks it by counting):
# run alone on the input it gets in the forward, it bounds what the whole forward can reach.
LARGEST_LAYER = {name: b.largest_layer for name, b in models.BACKBONES.items()}


def _flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` as FlopCounterMode counts them (attention through the math kernel, so it is counted)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


def _forward_speed(setup: _Setup, ds: data.DatasetSplits, rounds: int = 3) -> dict[str, Any]:
    """The fp32 matmul peak, the extraction forward's and its largest layer's GFLOP/s, measured in turns.

    Each of ``rounds`` rounds measures the peak, one forward of a preprocessed eval batch and the largest
    layer alone (its record's ``largest_layer``) on the input it got there; each figure is its best round, so a
    neighbour's burst on a shared machine lowers none of them.
    """
    args, device = setup.args, setup.device
    embed = setup.embed(models.backbone(args.model).stored_kind(setup.kinds["probe"]))  # the cache's pass
    pre = Preprocessor(size=224, mode="resize", channels_last=models.channels_last(args.model))
    batch = pre(ds.train.images[:args.eval_batch_size].to(device), False)
    flops = _flops(lambda: embed(batch[:1]))
    layer = setup.net.get_submodule(models.backbone(args.model).largest_layer)
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    with torch.no_grad(), models.autocast(device):
        embed(batch)  # warm-up, and the layer's input
        handle.remove()
        layer_input = seen[0]
        layer_flops = _flops(lambda: layer(layer_input))
        peak, forward_s, layer_s = 0.0, math.inf, math.inf
        for _ in range(rounds):
            peak = max(peak, matmul_peak_gflops(device, torch.float32))
            forward_s = min(forward_s, _fastest(lambda: embed(batch), device, 1))
            layer_s = min(layer_s, _fastest(lambda: layer(layer_input), device, 3))
    img_s = len(batch) / forward_s
    forward_gflops, layer_gflops = flops * img_s / 1e9, layer_flops / layer_s / 1e9
    out = {"matmul_peak_gflops": peak, "forward_flops_per_image": flops, "forward_img_s": img_s,
           "forward_gflops": forward_gflops, "forward_peak_fraction": forward_gflops / peak,
           "forward_dtype": "float16 (autocast)" if device.type == "cuda" else "float32",
           "largest_layer": models.backbone(args.model).largest_layer, "largest_layer_gflops": layer_gflops,
           "largest_layer_peak_fraction": layer_gflops / peak}
    if device.type == "cuda":  # the forward runs in fp16 there: its own peak, for reference
        out["matmul_peak_gflops_fp16"] = matmul_peak_gflops(device, torch.float16)
    return out


def _preprocess_share(setup: _Setup, ds: data.DatasetSplits, seconds: float = 10.0,
                      max_reps: int = 10) -> dict[str, Any]:
    """Time of the full fine-tune's preprocessing vs its forward + backward + step, on one training batch.

    After a warm-up step, steps repeat until ``seconds`` have passed (at least one, at most ``max_reps``);
    each part keeps its fastest repetition, as the forward measurement does.
    """
    args, device, net = setup.args, setup.device, setup.net
    cfg = config.resolve("full", args.model, args.dataset)
    pre = Preprocessor(size=224, mode=cfg["eval_mode"], policy=cfg["augment"],
                       channels_last=models.channels_last(args.model))
    regimes.apply_regime(net, args.model, "full")
    opt = regimes.optimizer(net, args.model, "full", cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    batch = ds.train.images[:args.batch_size].to(device)
    labels = ds.train.labels[:args.batch_size].to(device)
    net.train()

    def step() -> tuple[float, float]:
        _sync(device)
        tick = time.perf_counter()
        x = pre(batch, True)
        _sync(device)
        mid = time.perf_counter()
        with models.autocast(device):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg["label_smoothing"])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        _sync(device)
        return mid - tick, time.perf_counter() - mid

    step()  # warm-up
    pre_s, step_s, reps, start = math.inf, math.inf, 0, time.perf_counter()
    while reps < max_reps and (reps == 0 or time.perf_counter() - start < seconds):
        pre_t, step_t = step()
        pre_s, step_s, reps = min(pre_s, pre_t), min(step_s, step_t), reps + 1
    return {"preprocess_share": pre_s / (pre_s + step_s), "preprocess_ms": 1000 * pre_s,
            "train_step_ms": 1000 * step_s, "train_step_reps": reps, "train_step_augment": cfg["augment"]}


def _analysis_costs(setup: _Setup, ds: data.DatasetSplits) -> dict[str, Any]:
    """The layer-wise analysis's two costs on ``--analysis-images`` test images: backbone passes per image for the
    features of every probe point (``features.probes``, no cache), and the resilience stage (``reuse.resilience``:
    each unit's input cached, so a changed unit re-runs only what follows it) against re-running the whole network
    for every unit and mode (``reuse.perturbed``), with the same accuracies checked."""
    args, device, net = setup.args, setup.device, setup.net
    test = ds.test.take(range(min(args.analysis_images, len(ds.test))))
    pre = Preprocessor(size=224, mode="resize", channels_last=models.channels_last(args.model))
    counter = _ForwardCounter(_backbone(net, args.model))
    counter.split = "test"
    features.probes(net, args.model, {"test": test}, weights_id=None, cache_dir=None, preprocess=pre,
                    batch_size=args.eval_batch_size, device=device, log=lambda line: None)
    passes = counter.images["test"] / len(test)
    counter.remove()
    generator = torch.Generator().manual_seed(args.seed)  # a start the network differs from, so restoring matters
    start = {k: v + 0.05 * v.std().nan_to_num() * torch.randn(v.shape, generator=generator).to(v)
             if v.is_floating_point() and v.numel() > 1 else v.clone() for k, v in net.state_dict().items()}
    batches = list(training.eval_batches(test, preprocess=pre, batch_size=args.eval_batch_size, device=device))
    began = time.perf_counter()
    cached = reuse.resilience(net, args.model, start, batches, seed=args.seed)
    _sync(device)
    cached_s = time.perf_counter() - began
    began, same = time.perf_counter(), True
    with torch.no_grad():
        for mode, scores in (("restore", cached.restore), ("redraw", cached.redraw)):
            for unit, accuracy in scores.items():
                whole = reuse.perturbed(net, args.model, unit, mode, initial_state=start, seed=args.seed).eval()
                right = sum(int((whole(x).argmax(1) == y).sum()) for x, y in batches)
                same &= right == round(accuracy * cached.images)
    _sync(device)
    naive_s = time.perf_counter() - began
    return {"analysis_images": len(test), "analysis_passes_per_image": passes,
            "resilience_units": len(cached.restore), "resilience_cached_s": cached_s, "resilience_naive_s": naive_s,
            "resilience_saving": naive_s / cached_s, "resilience_same_accuracy": same}


# --- reporting -------------------------------------------------------------------------------


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target: what it asks, what was measured, and whether it is met."""
    naive, cached = result["naive"], result["cached"]
    min_fraction = models.backbone(result["model"]).min_forward_peak_fraction
    return [
        {"target": f"probe >= {MIN_PROBE_SPEEDUP:g}x faster than naive",
         "measured": f"{result['probe_speedup']:.1f}x", "met": result["probe_speedup"] >= MIN_PROBE_SPEEDUP},
        {"target": f"probe test accuracy within {MAX_PROBE_ACC_DIFF_PP:g} pp of naive",
         "measured": f"{result['probe_acc_diff_pp']:+.2f} pp",
         "met": abs(result["probe_acc_diff_pp"]) <= MAX_PROBE_ACC_DIFF_PP},
        {"target": "cached: exactly 1 backbone pass per image over the frozen regimes",
         "measured": f"{cached['forwards_per_image']:.2f}", "met": cached["forwards_per_image"] == 1.0},
        {"target": f"naive: >= {MIN_NAIVE_FORWARDS:g} backbone passes per image",
         "measured": f"{naive['forwards_per_image']:.2f} (train {naive['forwards_per_split']['train']:.0f})",
         "met": naive["forwards_per_image"] >= MIN_NAIVE_FORWARDS},
        {"target": f"forward >= {min_fraction:.0%} of the fp32 matmul peak",
         "measured": f"{result['forward_peak_fraction']:.0%} ({result['forward_dtype']})",
         "met": result["forward_peak_fraction"] >= min_fraction},
        {"target": f"preprocessing <= {MAX_PREPROCESS_SHARE:.0%} of a full fine-tuning step",
         "measured": f"{result['preprocess_share']:.1%}", "met": result["preprocess_share"] <= MAX_PREPROCESS_SHARE},
        {"target": "layer-wise analysis: 1 backbone pass per image for every probe point",
         "measured": f"{result['analysis_passes_per_image']:.2f}", "met": result["analysis_passes_per_image"] == 1.0},
        {"target": "resilience with cached unit inputs scores as re-running the whole network per unit",
         "measured": "same accuracies" if result["resilience_same_accuracy"] else "accuracies differ",
         "met": bool(result["resilience_same_accuracy"])},
        *([{"target": f"resilience >= {saving:g}x faster than re-running the whole network per unit",
            "measured": f"{result['resilience_saving']:.2f}x", "met": result["resilience_saving"] >= saving}]
          if (saving := MIN_RESILIENCE_SAVING.get(result["model"])) else []),
    ]


def _rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    naive, cached = result["naive"], result["cached"]
    return [
        ("feature extraction, images/s", f"{naive['extract_img_s']:.1f}", f"{cached['extract_img_s']:.1f}"),
        (f"linear probe ({result['epochs']} epochs) wall, s", f"{naive['probe_wall_s']:.1f}",
         f"{cached['probe_wall_s']:.1f}"),
        ("linear probe test accuracy", f"{naive['probe_test_acc']:.4f}", f"{cached['probe_test_acc']:.4f}"),
        ("backbone passes per image", f"{naive['forwards_per_image']:.2f}", f"{cached['forwards_per_image']:.2f}"),
        ("frozen SVM test accuracy", f"{naive['svm_test_acc']:.4f}", f"{cached['svm_test_acc']:.4f}"),
    ]


def _machine_lines(result: dict[str, Any]) -> list[str]:
    return [
        f"probe speedup {result['probe_speedup']:.1f}x, accuracy difference {result['probe_acc_diff_pp']:+.2f} pp",
        f"fp32 matmul peak {result['matmul_peak_gflops']:.0f} GFLOP/s; forward {result['forward_gflops']:.0f} "
        f"GFLOP/s ({result['forward_dtype']}, {result['forward_flops_per_image'] / 1e9:.2f} GFLOP/image, "
        f"{result['forward_img_s']:.1f} images/s) = {result['forward_peak_fraction']:.0%} of peak; its largest "
        f"layer alone ({result['largest_layer']}) {result['largest_layer_gflops']:.0f} GFLOP/s = "
        f"{result['largest_layer_peak_fraction']:.0%}",
        f"preprocessing {result['preprocess_share']:.1%} of a full fine-tuning step "
        f"({result['preprocess_ms']:.1f} ms vs {result['train_step_ms']:.1f} ms, best of {result['train_step_reps']}, "
        f"augment {result['train_step_augment']})",
        f"layer-wise analysis on {result['analysis_images']} test images: {result['analysis_passes_per_image']:.2f} "
        f"backbone passes per image for every probe point; resilience ({result['resilience_units']} units x restore "
        f"and redraw) {result['resilience_cached_s']:.1f} s with cached unit inputs vs {result['resilience_naive_s']:.1f} "
        f"s re-running the whole network ({result['resilience_saving']:.2f}x)",
        f"peak resident memory {result['peak_rss_mb']:.0f} MB ({result['peak_rss_self_mb']:.0f} MB this process "
        f"+ {result['peak_rss_children_mb']:.0f} MB largest DataLoader worker)",
    ]


def format_table(result: dict[str, Any]) -> str:
    """The results as plain text: the naive/cached table, the machine figures and the targets."""
    rows = [("", "naive", "cached"), *_rows(result)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{a.ljust(widths[0])}  {b.rjust(widths[1])}  {c.rjust(widths[2])}" for a, b, c in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["", *_machine_lines(result), ""]
    lines += [f"[{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['measured']}" for t in result["targets"]]
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """benchmarks/RESULTS.md: the tables and the exact command that produced them."""
    weights = "ImageNet weights" if result["pretrained"] else "**random initialisation** (`pretrained: false`)"
    lines = [f"# Benchmark: {result['model']} on {result['dataset']}", "",
             f"{result['n']} train / {result['n_val']} val / {result['n_test']} test images, {weights}, "
             f"device `{result['device']}`, torch {result['torch']}.", "",
             "| | naive | cached |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in _rows(result)]
    lines += ["", *[f"- {line}" for line in _machine_lines(result)], "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in result["targets"]]
    lines += ["", "Produced by:", "", "```", result["command"], "```", ""]
    return "\n".join(lines)
