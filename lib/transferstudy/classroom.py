"""The classroom pack: a profile's frozen features, to train SVMs and linear probes without images or backbone.

``transferstudy classroom-pack OUT.tar.gz --profile P`` (:func:`build`) writes one ``.tar.gz``. For each
dataset x model whose frozen runs (``frozen_svm``, ``linear_probe``) the profile holds, ``<dataset>/<model>/`` has

* ``<kind>-<split>.npy``: float16 ``[N, D]`` embeddings of every kind of the model (``models.EMBEDDINGS``:
  AlexNet's 9216-d ``pooled``, the frozen SVM's, and its 4096-d ``penultimate``, the linear probe's input;
  DeiT-Base's 768-d ``cls``, both regimes'), for ``train``, ``val`` and ``test``;
* ``labels-<split>.npy`` (int64), ``soft-<split>.npy`` (float32 vote shares, label rule ``votes`` only) and
  ``files-<split>.json`` (each image's path under its dataset folder);
* ``head-weight.npy``, ``head-bias.npy``: the fresh head the runs start from (float32), so that a linear
  probe trained from the pack starts where the run's did.

``manifest.json``, the last member, records per entry the classes, the split (hash and indices), the settings
that made the features (``FIXED``), the provenance (weights, pretrained or random initialisation, preprocessing,
library and package versions, the runs), and every member's SHA-256 and size. ``README.txt`` says how to read
a pack with numpy alone. The pack is written atomically.

Making a pack goes through the runs' own code: per entry, :func:`session.start` with the settings of the runs'
``params.json`` (into a temporary folder), checked against the split hash the runs recorded, then
:meth:`session.Session.embeddings` on the runs' feature cache (``<runs>/.cache``). A cache entry that is
missing is computed there and stored, as the run would have done (the command says how many); AlexNet's
penultimate embedding is never stored in the cache (it is computed from the cached pooled one), so it is
always computed that way.

Reading a pack (:func:`open_pack`, called by ``session.start(..., features_pack=PACK)``) checks every member
against the manifest (SHA-256 and size; a member missing, altered or not listed is refused, named), refuses a
pack without this run's dataset x model and a run whose settings differ from those the features were made
with. :class:`PackSession` then gives the pack's features where a session computes them, and a backbone
without weights (on the meta device: counted, never run) carrying the runs' fresh head.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import tarfile
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import __version__, config, data, models, regimes, results, session

FORMAT = "transferstudy-classroom-pack"
VERSION = 1
MANIFEST = "manifest.json"
README = "README.txt"
REGIMES = ("frozen_svm", "linear_probe")  # the regimes that train on the frozen backbone's features
SPLITS = ("train", "val", "test")
# The settings that make a pack's split and features; a run from a pack must have the same values.
FIXED = ("pretrained", "seed", "n_train", "n_val", "n_test", "label_rule", "val_source", "image_size", "eval_mode")


class PackError(ValueError):
    """A classroom pack that cannot be made or used; the message names the file or run and the fix."""


# --- making a pack -----------------------------------------------------------------------------------


def build(profile: str, runs_dir: str | Path, data_root: str | Path, out: str | Path,
          log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Write the classroom pack of ``profile``'s frozen runs under ``runs_dir`` to ``out``; returns its manifest.

    ``data_root`` holds the images the runs used (``cifar10/``, ``ferplus/``). A dataset x model without a
    finished ``frozen_svm`` or ``linear_probe`` run is left out, with a line saying so; none at all is an error.
    """
    out = Path(out)
    if not out.name.endswith(".tar.gz"):
        raise PackError(f"{out}: a classroom pack is a .tar.gz file; name it e.g. classroom-{profile}.tar.gz")
    config.resolve("frozen_svm", config.MODELS[0], config.DATASETS[0], profile)  # an unknown profile: a clear error
    sources = _sources(Path(runs_dir), profile, log)
    created = _dt.datetime.now(_dt.timezone.utc)
    buf, members, entries, computed = io.BytesIO(), {}, {}, []
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        for (dataset, model), (params, split_hash, runs) in sources.items():
            entry, files = _entry(dataset, model, params, split_hash, runs, profile, Path(runs_dir), Path(data_root),
                                  log, computed)
            for name, payload in files.items():
                members[name] = _add(tar, name, payload, created)
            entries[f"{dataset}/{model}"] = entry
        members[README] = _add(tar, README, _readme(profile, entries).encode(), created)
        manifest = {"format": FORMAT, "version": VERSION, "created": created.isoformat(timespec="seconds"),
                    "profile": profile, "transferstudy": __version__, "entries": entries, "members": members}
        _add(tar, MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode(), created)
    results.atomic_write_bytes(out, buf.getvalue())
    random = [key for key, entry in entries.items() if not entry["settings"]["pretrained"]]
    if random:
        log(f"note: the features of {', '.join(random)} come from randomly initialised backbones (pretrained "
            f"false), not ImageNet weights; the manifest and every run made from the pack say so")
    if computed:
        log(f"computed {len(computed)} feature cache entries that were missing, and stored them in "
            f"{Path(runs_dir) / '.cache'}: {', '.join(computed)}")
    return manifest


def _sources(runs_dir: Path, profile: str, log: Callable[[str], Any]
             ) -> dict[tuple[str, str], tuple[dict[str, Any], str, list[Path]]]:
    """Per dataset x model with finished frozen runs: (the settings of those runs, their split hash, the runs)."""
    found, skipped = {}, []
    for dataset in config.DATASETS:
        for model in config.MODELS:
            runs = [runs_dir / profile / dataset / model / regime for regime in REGIMES]
            done = [run for run in runs if results.run_finished(run)]
            if not done:
                skipped.append(f"{dataset}/{model}")
                continue
            params, hashes = {}, {}
            for run in done:
                try:
                    params[run] = results.read_json(run / "params.json")
                    hashes[run] = results.read_json(run / "split.json")["split_hash"]
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise PackError(f"{run}: its params.json or split.json is unreadable ({exc}); rerun it: "
                                    f"transferstudy run --profile {profile} --only '{dataset}/{model}/{run.name}' "
                                    f"--force") from None
            first, *others = done
            for other in others:
                differ = [f"{k} ({params[first].get(k)!r} vs {params[other].get(k)!r})"
                          for k in (*FIXED, "weights_path") if params[first].get(k) != params[other].get(k)]
                if hashes[first] != hashes[other]:
                    differ.append(f"the split ({hashes[first]} vs {hashes[other]})")
                if differ:
                    raise PackError(f"{first} and {other} were made with different {', '.join(differ)}, so one set "
                                    f"of features cannot stand for both; rerun them with the same settings: "
                                    f"transferstudy run --profile {profile} --only '{dataset}/{model}/*' --force")
            found[(dataset, model)] = (params[first], hashes[first], done)
            log(f"{dataset}/{model}: the settings and split of {', '.join(run.name for run in done)}")
    if not found:
        raise PackError(f"{runs_dir / profile} holds no finished frozen_svm or linear_probe run; make them first: "
                        f"transferstudy run --profile {profile} --runs-dir {runs_dir} --only "
                        f"'*/*/frozen_svm,*/*/linear_probe'")
    for key in skipped:
        log(f"left out {key}: no finished frozen_svm or linear_probe run under {runs_dir / profile / key}; make "
            f"them with transferstudy run --profile {profile} --only '{key}/frozen_svm,{key}/linear_probe'")
    return found


def _entry(dataset: str, model: str, params: dict[str, Any], split_hash: str, runs: list[Path], profile: str,
           runs_dir: Path, data_root: Path, log: Callable[[str], Any], computed: list[str]
           ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """One dataset x model's manifest entry and members, through the runs' own session code and feature cache."""
    prefix = f"{dataset}/{model}"
    overrides = {k: config.NONE if params.get(k) is None else params[k] for k in (*FIXED, "weights_path",
                                                                                    "eval_batch_size")}

    def note(line: str) -> None:
        if line.startswith("feature cache stored"):
            computed.append(f"{prefix} {line.split(': ', 1)[-1]}")
        log(f"{prefix}: {line}")

    with tempfile.TemporaryDirectory(prefix="classroom-pack-") as tmp:
        run = session.start("frozen_svm", model=model, dataset=dataset, data_dir=data_root / dataset, profile=profile,
                            output_dir=Path(tmp) / "run", cache_dir=runs_dir / ".cache", overrides=overrides, log=note)
        if run.data.split_hash != split_hash:
            raise PackError(f"{prefix}: the images under {data_root / dataset} give split {run.data.split_hash}, "
                            f"the runs {', '.join(map(str, runs))} recorded {split_hash}; point --data-root at the "
                            f"data the runs used (their params.json: data_dir {params.get('data_dir')})")
        net = run.build_model()
        weights = run.weights_id()
        files: dict[str, bytes] = {}
        dims = {}
        for kind in models.EMBEDDINGS[model]:
            X = run.embeddings(net, kind, weights)
            dims[kind] = int(X["train"].shape[1])
            for split in SPLITS:
                files[f"{prefix}/{kind}-{split}.npy"] = _npy(X[split].astype(np.float16))
        for split in SPLITS:
            part = getattr(run.data, split)
            files[f"{prefix}/labels-{split}.npy"] = _npy(part.labels.numpy().astype(np.int64))
            if part.soft is not None:
                files[f"{prefix}/soft-{split}.npy"] = _npy(part.soft.numpy().astype(np.float32))
            files[f"{prefix}/files-{split}.json"] = json.dumps(list(part.files)).encode()
        head = models.head(net, model)
        files[f"{prefix}/head-weight.npy"] = _npy(head.weight.detach().cpu().numpy().astype(np.float32))
        files[f"{prefix}/head-bias.npy"] = _npy(head.bias.detach().cpu().numpy().astype(np.float32))
        entry = {
            "dataset": dataset, "model": model, "profile": profile, "classes": list(run.classes),
            "split_hash": run.data.split_hash, "split_indices": run.data.split_indices, "data": run.data.info,
            "sizes": {split: len(getattr(run.data, split)) for split in SPLITS}, "embeddings": dims,
            "soft": run.data.train.soft is not None, "settings": {k: run.cfg[k] for k in FIXED},
            "parameters": regimes.count_params(net)[1],
            "provenance": {"weights": weights, "pretrained": bool(run.cfg["pretrained"]),
                           "preprocess": repr(run.preprocessor("none")), "transferstudy": __version__,
                           "runs": [str(r) for r in runs],
                           **results.provenance(str(run.device), run.cfg["pretrained"])},
        }
    return entry, files


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes, when: _dt.datetime) -> dict[str, Any]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(payload), 0o644, int(when.timestamp())
    tar.addfile(info, io.BytesIO(payload))
    return {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}


def _readme(profile: str, entries: Mapping[str, Any]) -> str:
    first = next(iter(entries))
    dataset, model = first.split("/")
    kind = models.EMBEDDINGS[model][0]
    return f"""A transferstudy classroom pack: the frozen backbones' embeddings of the {profile} profile's runs.

Entries (dataset/model): {', '.join(entries)}.
<dataset>/<model>/<kind>-<split>.npy  float16 [N, D] embeddings; kinds: alexnet pooled (9216-d, the frozen
                                      SVM's) and penultimate (4096-d, the linear probe's); deit_base cls (768-d)
<dataset>/<model>/labels-<split>.npy  int64 [N] class indices into the manifest entry's "classes"
<dataset>/<model>/soft-<split>.npy    float32 [N, classes] vote shares (label rule votes only)
<dataset>/<model>/files-<split>.json  the images' paths under the dataset folder
<dataset>/<model>/head-*.npy          the fresh linear head the runs start from
manifest.json                         classes, split, settings, provenance (weights, pretrained or random
                                      initialisation), and the SHA-256 of every member

With numpy and scikit-learn alone (after tar xzf):
    X = np.load("{first}/{kind}-train.npy").astype("float32"); y = np.load("{first}/labels-train.npy")

With transferstudy (the pack is checked against its manifest first):
    papermill notebooks/01_frozen_svm.ipynb out.ipynb -p features_pack THIS.tar.gz -p model {model} \\
        -p dataset {dataset} -p profile {profile}
"""


# --- reading a pack ----------------------------------------------------------------------------------


@dataclass
class PackedSplits(data.DatasetSplits):
    """One dataset x model of a pack: the split's labels, soft targets and files (``Split.images`` is None),
    its features and the runs' fresh head."""

    path: Path = Path()
    features: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # kind -> split -> float16 [N, D]
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # the fresh head's state dict
    weights_id: str = ""
    entry: dict[str, Any] = field(default_factory=dict)


def open_pack(path: str | Path, regime: str, cfg: Mapping[str, Any]) -> PackedSplits:
    """The split and features of run ``cfg`` (a ``regime`` run's resolved settings) from the pack at ``path``.

    Refused (PackError naming the file): a regime that trains through the backbone, a file that is not a
    readable pack, a member missing, altered (SHA-256 or size) or not in the manifest, a pack without this
    dataset x model, and settings that differ from those the pack's features were made with.
    """
    path = Path(path).expanduser()
    if regime not in REGIMES:
        raise PackError(f"features_pack={str(path)!r}: a classroom pack holds the frozen backbone's features, which "
                        f"only {' and '.join(REGIMES)} train on; the {regime} regime needs the images: drop "
                        f"features_pack")
    if not path.is_file():
        raise PackError(f"features_pack={str(path)!r}: no such file ({path.resolve()}); make a pack with "
                        f"transferstudy classroom-pack OUT.tar.gz --profile PROFILE")
    key = f"{cfg['dataset']}/{cfg['model']}"
    manifest, payloads, digest = _read_verified(path, key + "/")
    entry = manifest["entries"].get(key)
    if entry is None:
        raise PackError(f"{path}: the pack holds {', '.join(manifest['entries']) or 'no entry'}, not {key}, this "
                        f"run's dataset/model; use a pack made from {key}'s runs, or run one of the pack's")
    try:
        _check_settings(path, key, entry, regime, cfg)
        return _splits(path, key, entry, payloads, digest)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        if isinstance(exc, PackError):
            raise
        raise PackError(f"{path}: its {MANIFEST} entry for {key} does not describe its files ({exc!r}); make the "
                        f"pack again with transferstudy classroom-pack") from None


def _read_verified(path: Path, prefix: str) -> tuple[dict[str, Any], dict[str, bytes], str]:
    """(manifest, the payloads of the members under ``prefix``, the manifest's SHA-256), every member verified."""
    found: dict[str, dict[str, Any]] = {}
    payloads: dict[str, bytes] = {}
    manifest_bytes = None
    try:
        with tarfile.open(path, mode="r|gz") as tar:
            for member in tar:
                if member.name in found or member.name == MANIFEST and manifest_bytes is not None:
                    raise PackError(f"{path}: member {member.name} appears twice; make the pack again with "
                                    f"transferstudy classroom-pack")
                if not member.isfile():
                    raise PackError(f"{path}: member {member.name} is not a plain file; a classroom pack holds "
                                    f"files only: make it again with transferstudy classroom-pack")
                payload = tar.extractfile(member).read()
                if member.name == MANIFEST:
                    manifest_bytes = payload
                    continue
                found[member.name] = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
                if member.name.startswith(prefix):
                    payloads[member.name] = payload
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise PackError(f"{path}: not a readable .tar.gz ({exc}); it is truncated or not a classroom pack: copy it "
                        f"again, or make it again with transferstudy classroom-pack") from None
    if manifest_bytes is None:
        raise PackError(f"{path}: no {MANIFEST}, so it is not a classroom pack (or it was cut short); make it with "
                        f"transferstudy classroom-pack")
    try:
        manifest = json.loads(manifest_bytes)
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ValueError(f"format {manifest.get('format')!r} version {manifest.get('version')!r}, this library "
                             f"reads {FORMAT!r} version {VERSION}")
        listed = manifest["members"]
        if not isinstance(listed, dict) or not isinstance(manifest["entries"], dict):
            raise ValueError("members or entries is not a mapping")
        if not all(isinstance(record, dict) for record in listed.values()):
            raise ValueError("a member's record is not a mapping")
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise PackError(f"{path}: its {MANIFEST} is unreadable ({exc}); make the pack again with this library's "
                        f"transferstudy classroom-pack") from None
    for name in found:
        if name not in listed:
            raise PackError(f"{path}: member {name} is not in the pack's {MANIFEST} (added after the pack was made); "
                            f"use the pack as it was made")
    for name, expected in listed.items():
        got = found.get(name)
        if got is None:
            raise PackError(f"{path}: member {name}, listed in its {MANIFEST}, is missing; copy the pack again or "
                            f"make it again with transferstudy classroom-pack")
        if got != {"sha256": expected.get("sha256"), "bytes": expected.get("bytes")}:
            raise PackError(f"{path}: member {name} fails its checksum ({got['bytes']} bytes, SHA-256 "
                            f"{got['sha256'][:16]}...; the manifest says {expected.get('bytes')} bytes, "
                            f"{str(expected.get('sha256'))[:16]}...): it was altered or corrupted; copy the pack "
                            f"again or make it again with transferstudy classroom-pack")
    return manifest, payloads, hashlib.sha256(manifest_bytes).hexdigest()


def _check_settings(path: Path, key: str, entry: Mapping[str, Any], regime: str, cfg: Mapping[str, Any]) -> None:
    made = entry["settings"]
    problems = [f"{k}={cfg[k]!r} (the pack's: {made[k]!r})" for k in FIXED if cfg[k] != made[k]]
    if cfg.get("weights_path") is not None:
        problems.append(f"weights_path={cfg['weights_path']!r} (the pack's features come from "
                        f"{entry['provenance']['weights']}; leave weights_path None)")
    if regime == "linear_probe" and cfg["augment"] != "none":
        problems.append(f"augment={cfg['augment']!r} (a pack holds the embeddings of the unaugmented images, "
                        f"one per image; pass augment none)")
    if regime == "frozen_svm" and cfg["embedding"] not in entry["embeddings"]:
        problems.append(f"embedding={cfg['embedding']!r} (the pack has {', '.join(entry['embeddings'])})")
    if problems:
        raise PackError(f"{path}: this {regime} run of {key} differs from what the pack's features were made with "
                        f"(profile {entry['profile']}): {'; '.join(problems)}. Run it with profile "
                        f"{entry['profile']} and those settings left at None (papermill -p profile "
                        f"{entry['profile']}), or make a pack from runs with these settings")


def _splits(path: Path, key: str, entry: Mapping[str, Any], payloads: Mapping[str, bytes],
            digest: str) -> PackedSplits:
    def member(name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        array = np.load(io.BytesIO(payloads[f"{key}/{name}"]), allow_pickle=False)
        if array.dtype != np.dtype(dtype) or array.shape != shape:
            raise PackError(f"{path}: member {key}/{name} holds {array.dtype} {array.shape}, its manifest entry "
                            f"says {dtype} {shape}; make the pack again with transferstudy classroom-pack")
        return array

    classes = tuple(entry["classes"])
    splits, features = {}, {kind: {} for kind in entry["embeddings"]}
    for split in SPLITS:
        n = entry["sizes"][split]
        labels = member(f"labels-{split}.npy", "int64", (n,))
        if n and not 0 <= labels.min() <= labels.max() < len(classes):
            raise PackError(f"{path}: member {key}/labels-{split}.npy has labels outside 0..{len(classes) - 1}")
        soft = member(f"soft-{split}.npy", "float32", (n, len(classes))) if entry["soft"] else None
        files = json.loads(payloads[f"{key}/files-{split}.json"])
        if not isinstance(files, list) or len(files) != n:
            raise PackError(f"{path}: member {key}/files-{split}.json does not list the split's {n} images")
        splits[split] = data.Split(None, torch.from_numpy(labels), None if soft is None else torch.from_numpy(soft),
                                   files)
        for kind, dim in entry["embeddings"].items():
            features[kind][split] = member(f"{kind}-{split}.npy", "float16", (n, dim))
    dim = entry["embeddings"][models.EMBEDDINGS[entry["model"]][-1]]
    head = {"weight": torch.from_numpy(member("head-weight.npy", "float32", (len(classes), dim))),
            "bias": torch.from_numpy(member("head-bias.npy", "float32", (len(classes),)))}
    info = {**entry["data"], "features_pack": str(path), "features_pack_manifest_sha256": digest}
    return PackedSplits(entry["dataset"], classes, splits["train"], splits["val"], splits["test"], entry["split_hash"],
                        entry["split_indices"], info, path=path, features=features, head=head,
                        weights_id=entry["provenance"]["weights"], entry=dict(entry))


class PackSession(session.Session):
    """A frozen_svm or linear_probe run from a classroom pack: no images, no backbone weights.

    Its split, labels and classes are the pack's (``data`` is a :class:`PackedSplits`); :meth:`embeddings`
    gives the pack's features where a session computes them, and :meth:`build_model` the backbone's layers
    without weights (meta device) with the runs' fresh head, so the notebooks read the same either way.
    """

    data: PackedSplits

    def provenance_line(self) -> str:
        return (super().provenance_line() + f" · features from the classroom pack `{self.data.path.name}` "
                f"(no images, no backbone pass)")

    def build_model(self) -> nn.Module:
        """The backbone's layers on the meta device (counted, never run) and, on the run's device, the fresh
        head the pack's runs started from."""
        with torch.device("meta"):
            net = models.build_model(self.cfg["model"], len(self.classes), pretrained=False)
        head = models.head(net, self.cfg["model"]).to_empty(device=self.device)
        head.load_state_dict(self.data.head)
        return net

    def weights_id(self) -> str:
        return self.data.weights_id

    def embeddings(self, net: nn.Module, kind: str, weights_id: str | None,
                   splits: tuple[str, ...] = SPLITS) -> dict[str, np.ndarray]:
        """The pack's embeddings ``kind`` (float32) of each split: the features of the backbone's starting weights."""
        if weights_id != self.data.weights_id:
            raise PackError(f"{self.data.path}: the pack holds the features of the backbone's starting weights "
                            f"({self.data.weights_id}) only, not of {weights_id}; pass run.weights_id()")
        if kind not in self.data.features:
            raise PackError(f"{self.data.path}: the pack has no {kind!r} embeddings for {self.cfg['model']}; it has "
                            f"{', '.join(self.data.features)}")
        return {split: self.data.features[kind][split].astype(np.float32) for split in splits}
