"""One run: settings, data, device, model, training, evaluation and recording.

The notebooks tell each regime's story; this module holds the steps they share, so that the
five notebooks run every regime through the same code. A notebook opens its run with
``run = session.start("<regime>", globals())``: its ``parameters`` cell is all it lists.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import config, data, evaluation, features, models, regimes, results, training
from .preprocess import Preprocessor

DATA_ROOT_ENV = "TRANSFERSTUDY_DATA_ROOT"


def default_data_dir(dataset: str) -> Path:
    """``$TRANSFERSTUDY_DATA_ROOT/<dataset>``, else ``data/<dataset>`` under the working directory."""
    return Path(os.environ.get(DATA_ROOT_ENV, "data")) / dataset


@dataclass
class Session:
    regime: str
    cfg: dict[str, Any]
    data: data.DatasetSplits
    device: torch.device
    recorder: results.RunRecorder
    cache_dir: Path | None
    log: Any = print
    notes: list[str] = field(default_factory=list)
    resume: training.TrainState | None = None  # where fit keeps its state; finish deletes it
    owner: str = ""  # the regime or analysis whose notebook this is (as_regime keeps it); default: regime

    def __post_init__(self) -> None:
        self.owner = self.owner or self.regime

    @property
    def classes(self) -> tuple[str, ...]:
        return self.data.classes

    @property
    def output_dir(self) -> Path:
        return self.recorder.run_dir

    # --- provenance --------------------------------------------------------------------

    def provenance_line(self) -> str:
        source = "ImageNet" if self.cfg["pretrained"] else "randomly initialised (`pretrained: false`)"
        weights = {"imagenet": "ImageNet-pretrained weights",
                   "stats": f"**statistics transfer** (`init: stats`: each tensor drawn from its {source} tensor's "
                            "mean and std)",
                   "random": "**random initialisation** (`pretrained: false` or `init: random`)"}[config.start_weights(self.cfg)]
        return (f"profile `{self.cfg['profile']}` · {weights} · device `{self.device}` · "
                f"{len(self.data.train):,} train / {len(self.data.val):,} val / {len(self.data.test):,} test "
                f"images · split `{self.data.split_hash}` · {_dt.date.today().isoformat()}")

    def banner(self):
        """A notice at the top of the results: where the numbers come from."""
        from IPython.display import Markdown

        text = f"**This run:** {self.provenance_line()}."
        if not self.cfg["pretrained"]:
            text = ("```{warning}\nThese results come from **randomly initialised** backbones "
                    "(`pretrained: false`), not ImageNet weights: they show that the pipeline runs, "
                    "not what transfer learning achieves.\n```\n\n" + text)
        if self.cfg["profile"] == "smoke":
            text += " The smoke profile trains on a handful of images: its numbers mean nothing."
        return Markdown(text)

    # --- building blocks ---------------------------------------------------------------

    def preprocessor(self, train_policy: str | None = None) -> Preprocessor:
        policy = train_policy if train_policy is not None else self.cfg.get("augment", "none")
        return Preprocessor(size=self.cfg["image_size"], mode=self.cfg["eval_mode"], policy=policy,
                            channels_last=models.channels_last(self.cfg["model"]))

    def build_model(self) -> nn.Module:
        """The backbone with a fresh head; seeded, so random initialisation is the same in every regime."""
        torch.manual_seed(self.cfg["seed"])
        init = config.start_weights(self.cfg)
        net = models.build_model(self.cfg["model"], len(self.classes), pretrained=self.cfg["pretrained"],
                                 weights_path=self.cfg["weights_path"], init=init, seed=self.cfg["seed"])
        self.recorder.meta["init"] = init
        return net.to(self.device)

    def weights_id(self) -> str:
        """What identifies the backbone's starting weights (part of the feature cache key)."""
        init = config.start_weights(self.cfg)
        random = f"random:{self.cfg['model']}:seed{self.cfg['seed']}:torch{torch.__version__}"
        if init == "random":
            return random
        if not self.cfg["pretrained"]:  # statistics transfer from the random initialisation
            source = random
        elif self.cfg["weights_path"]:
            source = "file:" + features.file_digest(self.cfg["weights_path"])
        else:
            source = f"pretrained:{self.cfg['model']}"
        return source if init == "imagenet" else f"stats-of-{source}:seed{self.cfg['seed']}:torch{torch.__version__}"

    def embeddings(self, net: nn.Module, kind: str, weights_id: str | None,
                   splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, np.ndarray]:
        """Embeddings of each split through ``net`` (eval mode).

        With a ``weights_id`` (what identifies ``net``'s weights) they come from the feature cache
        when present and are stored there otherwise; with None they are computed and not cached.
        """
        return features.embeddings(net, self.cfg["model"], kind, {name: getattr(self.data, name) for name in splits},
                                   weights_id=weights_id, cache_dir=self.cache_dir, **self._cache_args())

    def prefix_features(self, net: nn.Module) -> tuple[dict[str, features.FeatureSplit], nn.Module]:
        """Cached activations of the regime's frozen prefix for train and val, and the module to train on them.

        For training without augmentation: ``run.fit(net, acts["train"], acts["val"],
        preprocess=features.identity, module=module)`` trains ``net``'s own layers (the module shares them).
        """
        if self.cfg.get("augment", "none") != "none":
            raise ValueError(f"prefix_features needs augment 'none' (got {self.cfg['augment']!r}): augmented "
                             "images change every epoch, so train through the whole network with run.fit(net)")
        splits = {"train": self.data.train, "val": self.data.val}
        rank, world = training._world()
        if rank > 0:
            dist.barrier()  # under torchrun rank 0 fills the feature cache first; the others then read it
        acts = features.prefix_splits(net, self.cfg["model"], self.regime, splits, weights_id=self.weights_id(),
                                      cache_dir=self.cache_dir, **self._cache_args())
        if rank == 0 and world > 1:
            dist.barrier()
        return acts

    def probes(self, net: nn.Module, weights_id: str | None,
               splits: tuple[str, ...] = ("train", "test")) -> dict[str, dict[str, np.ndarray]]:
        """Features at every probe point of ``net`` (``reuse.probe_points``) per split, one forward pass per image;
        cached under ``weights_id`` as :meth:`embeddings` are."""
        return features.probes(net, self.cfg["model"], {name: getattr(self.data, name) for name in splits},
                               weights_id=weights_id, cache_dir=self.cache_dir, **self._cache_args())

    def batches(self, split: str, limit: int | None = None) -> Any:
        """(preprocessed images, labels) of the first ``limit`` images of ``split``, eval_batch_size at a time."""
        return training.eval_batches(getattr(self.data, split), preprocess=self.preprocessor("none"),
                                     batch_size=self.cfg["eval_batch_size"], device=self.device, limit=limit)

    def finetuned(self, source: str | Path) -> tuple[nn.Module, str]:
        """The fine-tuned network of the finished run in folder ``source`` (its bundle's best-on-validation
        checkpoint) and what identifies its weights (a feature-cache key).

        Refused, naming the folder, when that run has not finished, or is of another model or dataset, or
        started from other weights than this run's :meth:`build_model` (so "its starting weights" would be wrong).
        """
        from . import bundle

        source = Path(source)
        ours = {"model": self.cfg["model"], "dataset": self.cfg["dataset"], "init": config.start_weights(self.cfg),
                "seed": self.cfg["seed"]}
        self._other_run(source, ours, "its starting weights are not this run's backbone: point to a run of the same "
                                      "settings, or rerun it with them")
        net = bundle.load_finetuned(source / "bundle", self.cfg["model"], len(self.classes)).to(self.device)
        return net, "checkpoint:" + features.file_digest(source / "bundle" / "checkpoint.pt")

    def trained_as(self, source: str | Path, theirs: dict[str, Any]) -> dict[str, Any]:
        """The settings of the finished run in folder ``source`` (its ``params.json``), checked to be this session's
        own except for ``theirs``, which it must hold as given, and its split this session's: so that this session
        trains as that run did, and the two are scored on the same images (the statistics-transfer analysis against
        the full fine-tune's weight transfer: ``theirs`` ``{"init": "imagenet"}``). Refused, naming each setting that
        differs, before anything trains."""
        ours = {k: v for k, v in self.cfg.items() if k not in theirs}
        found = self._other_run(Path(source), {**ours, **theirs, "split_hash": self.data.split_hash},
                                f"this {self.owner} run must train as it did but for "
                                f"{', '.join(f'{k} {v!r}' for k, v in theirs.items())}, on the same images, for the "
                                f"two to be compared; rerun them with the same settings (-p ... on both)",
                                settings_only=True)
        return {k: found[k] for k in ours if k in found}

    def _other_run(self, source: Path, ours: dict[str, Any], why: str, settings_only: bool = False) -> dict[str, Any]:
        """The settings and record of the finished run in folder ``source``, refused (naming the folder, ``why``
        and each difference) unless they hold the values ``ours``. ``settings_only``: its settings as given
        (``params.json``) and its split, not what its record says of them (``meta.json``'s ``init`` is the weights it
        started from: ``random`` under ``pretrained: false``)."""
        try:
            meta = results.read_json(source / "meta.json")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{source} holds no finished run ({exc}); run it first, e.g. `transferstudy run "
                             f"--only {self.cfg['dataset']}/{self.cfg['model']}/{source.name}`") from None
        if meta.get("status") != "ok":
            raise ValueError(f"{source}'s last run did not finish ({meta.get('error', meta.get('status'))}); "
                             f"rerun it first")
        params = results.read_json(source / "params.json")
        theirs = {**params, "split_hash": meta.get("split_hash")} if settings_only else {**params, **meta}
        if bad := {k: (theirs.get(k), v) for k, v in ours.items() if _canonical(theirs.get(k)) != _canonical(v)}:
            raise ValueError(f"{source} is a run with " + ", ".join(f"{k} {a!r}" for k, (a, _) in bad.items()) +
                             f" but {'it needs' if settings_only else 'this run has'} " +
                             ", ".join(f"{k} {b!r}" for k, (_, b) in bad.items()) +
                             f"; {why}")
        return theirs

    def _cache_args(self) -> dict[str, Any]:
        """Preprocessing, batching, device and cache-key context shared by the feature-cache calls."""
        return dict(preprocess=self.preprocessor("none"), batch_size=self.cfg["eval_batch_size"],
                    device=self.device, context={"dataset": self.cfg["dataset"], "labels": self.cfg["label_rule"]},
                    log=self.log)

    def optimizer(self, net: nn.Module) -> torch.optim.Optimizer:
        """The regime's optimiser, with discriminative learning rates per parameter group."""
        return regimes.optimizer(net, self.cfg["model"], self.regime, self.cfg)

    def as_regime(self, regime: str, settings: dict[str, Any] | None = None) -> Session:
        """This run's data, device and folder with ``regime``'s settings: the profile's for that regime, with this
        run's changes to the settings the two share (``-p batch_size 16`` on this run reaches each regime it trains;
        the statistics-transfer analysis shares all of the full fine-tune's), then ``settings``
        (``{"init": "stats"}``). How the analyses train each regime as that regime's own run does."""
        model, dataset, profile = self.cfg["model"], self.cfg["dataset"], self.cfg["profile"]
        profile_values = config.resolve(self.regime, model, dataset, profile)
        theirs = set(config.resolve(regime, model, dataset, profile)) - set(config.IDENTITY)
        changed = {k: config.NONE if v is None else v for k, v in self.cfg.items()
                   if k in theirs and v != profile_values[k]}
        cfg = config.resolve(regime, model, dataset, profile, {**changed, **(settings or {})})
        return dataclasses.replace(self, regime=regime, cfg=cfg, resume=None)

    def fit(self, net: nn.Module, train: Any = None, val: Any = None, preprocess: Any = None,
            module: nn.Module | None = None, subset: str | None = None) -> training.History:
        """Train ``net``'s trainable parameters with the regime's settings; keeps the best-on-val weights.

        ``module`` is what the batches go through (default ``net``): the head alone when training
        on cached features. The per-epoch curves are saved with the run, except for a fit on a named training
        ``subset`` (the data-scarcity analysis: many fits per run), whose resumable state is its own and is
        deleted as soon as it returns.
        """
        cfg = self.cfg
        train = train if train is not None else self.data.train
        val = val if val is not None else self.data.val
        preprocess = preprocess if preprocess is not None else self.preprocessor()
        opt = self.optimizer(net)
        steps = -(-len(train) // cfg["batch_size"])
        sched = training.make_scheduler(opt, name=cfg["scheduler"], epochs=cfg["epochs"], steps_per_epoch=steps,
                                        warmup_frac=cfg["warmup_frac"])
        from .trials import trial_reporter  # reports each epoch when this run is a `transferstudy search` trial

        reporter = trial_reporter()
        state = self.train_state(subset)
        if subset is None:
            self.resume = state
        history = training.fit(module if module is not None else net, train, val, preprocess=preprocess, optimizer=opt, scheduler=sched,
                               epochs=cfg["epochs"], batch_size=cfg["batch_size"], device=self.device,
                               label_smoothing=cfg["label_smoothing"], patience=cfg["patience"],
                               monitor=cfg["monitor"], seed=cfg["seed"],
                               soft_targets=cfg["label_rule"] == "votes", micro_batch_size=cfg["micro_batch_size"],
                               log=self.log, on_epoch=reporter, resume=state)
        if subset is not None:
            state.clear()
            return history
        self.recorder.save_curves(history.to_frame().reset_index())
        self.recorder.meta.update(best_epoch=history.best_epoch, epochs_run=len(history.epochs),
                                  stopped_early=history.stopped_early, resumed_from_epoch=history.resumed_from)
        if reporter is not None and reporter.pruned_epoch is not None:
            self.recorder.meta.update(pruned_epoch=reporter.pruned_epoch)
        return history

    def subset_result(self, subset: str, train_and_score: Callable[[], np.ndarray]) -> np.ndarray:
        """``train_and_score()`` (one fit on a named training ``subset`` and what it predicts), or the same result kept
        from before: a run of many fits (the data-scarcity analysis), killed midway and started again, trains
        only the fits it had not finished. The result is kept beside the fits' training states, with a checksum,
        for the same regime, settings, split, starting weights and subset only; :meth:`finish` deletes it."""
        state = self.train_state(subset)
        kept = state.load_result(self.log)
        if kept is not None:
            return np.asarray(kept)
        value = np.asarray(train_and_score())
        state.save_result(value.tolist())
        return value

    def train_state(self, subset: str | None = None) -> training.TrainState:
        """Where :meth:`fit` keeps its state at the end of every epoch, so that the same run killed midway
        (``kill -9``, a Colab disconnect) goes on from its last finished epoch when it is started again.

        It lives in the feature cache's ``resume/`` folder, named by the run's folder and by everything that
        makes its training what it is (regime, settings, split, starting weights, the training ``subset``);
        :meth:`finish` deletes it, and the states of this run folder's earlier attempts with other settings.
        """
        identity = {"regime": self.regime, "cfg": self.cfg, "split": self.data.split_hash, "weights": self.weights_id(),
                    "subset": subset}
        key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
        return training.TrainState(self._resume_folder(), f"{self._resume_family()}{self.regime}-{key[:12]}", key)

    def _resume_folder(self) -> Path:
        return (self.cache_dir or Path.home() / ".cache" / "transferstudy") / "resume"

    def _resume_family(self) -> str:
        """The name prefix of every training state of this run, whatever its settings: its profile, dataset, model
        and notebook (``owner``). A feature cache serves one results store, where that names one run folder, which
        one process runs at a time (its lock); so when the run finishes, its other states were abandoned. The
        same on every torchrun rank, whose scratch folders differ."""
        return f"{self.cfg['profile']}-{self.cfg['dataset']}-{self.cfg['model']}-{self.owner}-"

    def evaluate(self, predict_val: tuple[np.ndarray, np.ndarray], predict_test: tuple[np.ndarray, np.ndarray],
                 classifier: str = "head") -> dict[str, Any]:
        """Metrics on val and test from ``(probabilities or None, predictions)`` pairs; saves them.

        ``classifier`` names what predicted: the network's own ``head``, or a classifier on its features.
        """
        metrics = {name: evaluation.classification_metrics(getattr(self.data, name).labels.numpy(), pred, self.classes)
                   for name, (_, pred) in (("val", predict_val), ("test", predict_test))}
        probs, pred = predict_test
        self.record_scores({classifier: metrics}, classifier, pred, probs)
        self.log(f"val accuracy {metrics['val']['accuracy']:.4f} · test accuracy {metrics['test']['accuracy']:.4f}"
                 f" · test macro F1 {metrics['test']['macro_f1']:.4f}")
        return metrics

    def record_scores(self, scores: dict[str, dict[str, Any]], best: str, test_pred: np.ndarray,
                      test_probs: np.ndarray | None = None) -> None:
        """Save every classifier's val/test metrics and the ``best`` one's test predictions.

        One schema for every regime (``{"classifiers": {name: {"val", "test"}}, "best": name}``), so the
        results store reads a frozen SVM, a fine-tuned head and the classical regime's seven classifiers alike.
        """
        if best not in scores:
            raise ValueError(f"best={best!r} is not one of the scored classifiers: {', '.join(scores)}")
        self.recorder.save_metrics({"classifiers": scores, "best": best})
        self.recorder.save_predictions(self.data.test.labels.numpy(), test_pred, test_probs, self.data.test.files)

    def predict(self, net: nn.Module, split: str) -> tuple[np.ndarray, np.ndarray]:
        return training.predict(net, getattr(self.data, split), preprocess=self.preprocessor("none"),
                                batch_size=self.cfg["eval_batch_size"], device=self.device)

    def save_plot_embeddings(self, name: str, X: np.ndarray) -> None:
        """Keep the first ``n_embed_plot`` test embeddings for the book's PCA / t-SNE / UMAP figures."""
        n = min(self.cfg["n_embed_plot"], len(X))
        self.recorder.save_embeddings(name, X[:n], self.data.test.labels.numpy()[:n])

    def finish(self, trainable: int, total: int, **meta: Any) -> dict[str, Any]:
        """Write meta.json: the run is complete. Call it last."""
        prov = results.provenance(str(self.device), self.cfg["pretrained"])
        rank, world = training._world()
        if world > 1:
            meta.update(world_size=world, backend=dist.get_backend())
        done = self.recorder.finish(trainable=int(trainable), total=int(total), classes=list(self.classes),
                                    **prov, **meta)
        if rank == 0:  # the run finished: its resumable states (and its abandoned attempts') are no longer needed
            training.TrainState.clear_family(self._resume_folder(), self._resume_family())
        return done


def _canonical(value: Any) -> str:
    """A setting as its JSON text, so a tuple and the list a JSON record reads back compare equal."""
    return json.dumps(value, sort_keys=True, default=str)


def join_process_group() -> None:
    """Under torchrun (``WORLD_SIZE`` > 1 in the environment, which a notebook's kernel inherits), join its
    process group: NCCL on the rank's own GPU, gloo on CPU. Alone, or already joined, do nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def start(regime: str, namespace: dict[str, Any] | None = None, *, model: str | None = None,
          dataset: str | None = None, data_dir: str | Path | None = None, profile: str | None = None,
          output_dir: str | Path | None = None, cache_dir: str | Path | None = None,
          source_dir: str | Path | None = None, features_pack: str | Path | None = None,
          partial_dir: str | Path | None = None, full_dir: str | Path | None = None,
          overrides: dict[str, Any] | None = None, log: Any = print) -> Session:
    """Resolve the settings, load the data (with its fixed split), and open the run's folder.

    A notebook passes its namespace, ``session.start("linear_probe", globals())``: the run's names
    (model, dataset, profile, data_dir, output_dir, cache_dir; source_dir for classical; features_pack, a
    classroom pack that stands in for the images, for frozen_svm and linear_probe) and every
    setting of the regime are taken from it (:func:`config.from_namespace`), so a parameter is written
    once, in the ``parameters`` cell. Other callers give the same as keywords, the settings as
    ``overrides``. A setting left at None keeps the profile's value; ``profile`` None means ``full``.
    """
    if namespace is not None:
        given = [name for name, value in (("model", model), ("dataset", dataset), ("data_dir", data_dir),
                                          ("profile", profile), ("output_dir", output_dir), ("cache_dir", cache_dir),
                                          ("source_dir", source_dir), ("features_pack", features_pack),
                                          ("partial_dir", partial_dir), ("full_dir", full_dir),
                                          ("overrides", overrides)) if value is not None]
        if given:
            raise TypeError(f"start({regime!r}, namespace, {given[0]}=...): give the run either as a namespace "
                            f"(a notebook's globals()) or as keywords, not both")
        return start(regime, **config.from_namespace(regime, namespace), log=log)
    for name, value in (("model", model), ("dataset", dataset)):
        if value is None:
            raise TypeError(f"start({regime!r}) needs {name}=... (or a notebook's namespace)")
    sources = {}  # the other runs' folders this notebook reads
    for name, value in (("source_dir", source_dir), ("partial_dir", partial_dir), ("full_dir", full_dir)):
        if name in config.run_names(regime):
            sources[name] = str(value) if value else None
        elif value is not None:
            raise TypeError(f"start({regime!r}, {name}={str(value)!r}): the {regime} notebook reads no other "
                            f"run's {name}; drop it")
    profile, overrides = profile or "full", dict(overrides or {})
    cfg = config.resolve(regime, model, dataset, profile, overrides)
    if features_pack is None:  # a weights problem would otherwise show only once the data is decoded
        from . import preflight

        preflight.check_runs([(regime, model, dataset, cfg)], None)
    for name, reason in config.NOT_IN_NOTEBOOK.get(regime, {}).items():
        if overrides.get(name) is not None:
            log(f"note: {name}={overrides[name]!r} has no effect on the {regime} regime: {reason}")
    data_dir = Path(data_dir) if data_dir else default_data_dir(dataset)
    output_dir = Path(output_dir) if output_dir else Path("runs") / "manual" / profile / dataset / model / regime
    cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "transferstudy"
    join_process_group()
    training.seed_everything(cfg["seed"])
    device = models.select_device()
    session_class = Session
    if features_pack is not None:  # the split, labels and features of a classroom pack, no images (classroom.py)
        from .classroom import PackSession, open_pack

        ds, session_class = open_pack(features_pack, regime, cfg), PackSession
    else:
        ds = data.load_dataset(dataset, data_dir, label_rule=cfg["label_rule"] if dataset == "ferplus" else None,
                               val_source=cfg["val_source"], n_train=cfg["n_train"], n_val=cfg["n_val"],
                               n_test=cfg["n_test"], seed=cfg["seed"])
    paths = {"data_dir": str(data_dir)}
    paths.update(sources)
    if features_pack is not None:
        paths["features_pack"] = str(features_pack)
    recorder = results.RunRecorder(output_dir, {**cfg, **paths})
    recorder.meta["input"] = "gray" if dataset == "ferplus" else "rgb"  # what the network sees; bundles keep it
    recorder.save_split(ds.split_hash, ds.split_indices, ds.info)
    session = session_class(regime, cfg, ds, device, recorder, cache_dir, log)
    log(f"{regime} · {model} · {dataset}: {session.provenance_line().replace('*', '').replace('`', '')}")
    return session
