"""Check a selected matrix's inputs once, before any run starts: the data, the split sizes, the weights.

``config.check_overrides`` checks each ``-p`` value against the schema; what it cannot know is whether the
inputs on this machine fit the settings. Without this module those problems surface inside each run's
notebook, seconds after its kernel started, and leave a ``.failed`` attempt behind. :func:`check_runs`
looks at them once for every selected run and raises one ``config.ConfigError`` naming each problem once
(the setting or path, its value, and the fix in the command line's words), however many runs share it:

1. the dataset folder ``<data_root>/<dataset>`` exists and holds a layout ``data.load_dataset`` reads;
2. ``n_train`` / ``n_val`` / ``n_test`` are at most the size of their split (after the 80/20 split, the label
   rule and ``val_source``, as ``load_dataset`` draws them);
3. ``val_source official`` only where the data is FERPlus in Microsoft's layout;
4. a ``weights_path`` a run starts from is a readable state dict whose keys and shapes fit the model;
5. a run that starts from ImageNet weights without ``weights_path`` can get them: they are in the torch hub /
   Hugging Face cache, or the host they download from accepts a connection (:func:`why_unreachable`).

What it costs (no image is decoded, nothing is downloaded): the data checks list each dataset folder once per
label rule / val_source / seed (``load_dataset(decode=False)``: a stat per file and FERPlus's label.csv files,
a fraction of a second for the real CIFAR-10 and FERPlus); a weights file is read once per model and number of
classes (``models._read_state_dict``: AlexNet's ImageNet file is 233 MB, about 0.1 s from the page cache and
a few seconds from a cold disk) and fitted to the architecture built on the meta device (no memory, no
initialisation); an ImageNet source that is not cached costs one TCP connection attempt to its host, at most
``PROBE_TIMEOUT_S`` seconds per host (two hosts: torchvision's and the Hugging Face hub). ``data`` and ``models``
are imported on first use: torch about 1 s, and ``models`` (timm, torchvision) about 1 s more, the latter only
when a run starts from ImageNet weights. Measured on 2 CPU cores with the real data: 0.3 s for the 20-run matrix
with random init, 1.5 s with ImageNet weights (imports included), plus the torch import.

Not checked here: images that will not decode (that needs every image decoded: ``transferstudy data --check``).
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import config

PROBE_TIMEOUT_S = 3.0  # how long the reachability probe of a download host may take
_SHOWN_RUNS = 3  # runs named after a problem when several selected runs are checked
_SPLITS = ("train", "val", "test")
_EXTRACT = "../shared/data/extract.sh"
_WEIGHTS_FLAG = "pass weights_path=<that file>"
_WEIGHTS_FLAG_CLI = "pass weights_path=<that file> (CLI: `-p weights_path FILE`)"


def check_runs(runs: Sequence[tuple[str, str, str, dict]], data_root: Path | None) -> None:
    """Refuse, before anything runs, the inputs that would make the runs ``runs`` fail; None when all fit.

    ``runs``: (regime, model, dataset, cfg) with ``cfg`` the run's settings (``config.resolve``). Only the
    settings present in ``cfg`` are looked at, so a regime or analysis this module does not know is checked
    by its common settings. ``data_root`` holds ``cifar10/`` and ``ferplus/`` (``transferstudy run
    --data-root``); None skips the data checks (1-3), for a caller that loads the data itself right after.

    Raises ``config.ConfigError``: one problem is its message; several are "N problems with the inputs,
    nothing was run:" then one per line. A problem shared by several runs is named once, followed by the
    runs it concerns when more than one run was checked.
    """
    runs = list(runs)
    problems: dict[str, list[str]] = {}
    listings: dict[tuple, Any] = {}
    weights: dict[tuple, str | None] = {}
    probes: dict[str, str | None] = {}
    for regime, model, dataset, cfg in runs:
        key = f"{dataset}/{model}/{regime}"
        found: list[str] = []
        if data_root is not None:
            found += _data_problems(dataset, cfg, Path(data_root), listings)
        found += _weights_problems(regime, model, dataset, cfg, weights, probes)
        for message in found:
            concerned = problems.setdefault(message, [])
            if key not in concerned:
                concerned.append(key)
    if not problems:
        return
    lines = [message + (_runs_note(keys) if len(runs) > 1 else "") for message, keys in problems.items()]
    if len(lines) == 1:
        raise config.ConfigError(lines[0])
    raise config.ConfigError(f"{len(lines)} problems with the inputs, nothing was run:\n"
                             + "\n".join(f"  {line}" for line in lines))


def _runs_note(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_RUNS])
    more = f" and {len(keys) - _SHOWN_RUNS} more" if len(keys) > _SHOWN_RUNS else ""
    return f" [run{'s' if len(keys) > 1 else ''} {shown}{more}]"


# --- the data: checks 1-3 ---------------------------------------------------------------------------

_HELD = {
    "cifar10": "CIFAR-10 as train/<class>/*.jpg + test/<class>/*.jpg folders or torchvision's cifar-10-batches-py/",
    "ferplus": "FERPlus as Microsoft's FER2013Train/ FER2013Valid/ FER2013Test/ folders (PNGs + label.csv), or the "
               "Kaggle FER2013Plus train/<class>/ + test/<class>/ folders (optionally one folder down)",
}
_DATA_ROOT_FIX = (f"--data-root DIR is the folder holding cifar10/ and ferplus/: {_EXTRACT} DIR unpacks the local "
                  "copies into DIR/cifar10 and DIR/ferplus, then pass --data-root DIR")


def layout_hint(dataset: str) -> str:
    """What ``<data_root>/<dataset>`` must hold, and how to get it, in the runner's words (``--data-root``)."""
    return f"{_HELD.get(dataset, f'a copy of {dataset}')}; {_DATA_ROOT_FIX}"


def _cli_words(message: str, dataset: str) -> str:
    """A ``data`` message with its Python-API hints (``download=True``) in the runner's words."""
    from . import data

    message = message.replace(data._expected_layout(dataset), layout_hint(dataset))
    message = message.replace(". You can use download=True to download it", "")  # torchvision's own, in parentheses
    return message.replace("pass download=True", f"unpack a fresh copy with {_EXTRACT} DIR and pass --data-root DIR")


def _missing_folder(root: Path, data_root: Path, dataset: str) -> str:
    start = f"data folder {root} does not exist: "
    if data_root.name in config.DATASETS and data_root.is_dir():
        return (f"{start}--data-root {data_root} looks like the {data_root.name} folder itself; pass its parent, "
                f"--data-root {data_root.parent}, the folder holding cifar10/ and ferplus/")
    if not data_root.is_dir():
        return f"{start}--data-root {data_root} does not exist either. {_DATA_ROOT_FIX}"
    return f"{start}{root} should hold {layout_hint(dataset)}"


def _listing(dataset: str, root: Path, label_rule: str | None, val_source: str, seed: int,
             listings: dict[tuple, Any]) -> Any:
    """``data.load_dataset(..., decode=False)``'s splits (lists and labels only), or the DataError it raised."""
    from . import data

    key = (dataset, label_rule, val_source, seed)
    if key not in listings:
        try:
            listings[key] = data.load_dataset(dataset, root, label_rule=label_rule, val_source=val_source,
                                              seed=seed, decode=False)
        except data.DataError as error:
            listings[key] = error
    return listings[key]


def _data_problems(dataset: str, cfg: Mapping[str, Any], data_root: Path, listings: dict[tuple, Any]) -> list[str]:
    from . import data

    root = data_root / dataset
    if not root.is_dir():
        return [_missing_folder(root, data_root, dataset)]
    # as session.start calls load_dataset: the label rule is FERPlus's only
    label_rule = cfg.get("label_rule") if dataset == "ferplus" else None
    val_source = cfg.get("val_source") or "split"
    seed = cfg.get("seed", 42)
    found = _listing(dataset, root, label_rule, val_source, seed, listings)
    if isinstance(found, data.DataError) and val_source != "split":
        plain = _listing(dataset, root, label_rule, "split", seed, listings)
        if isinstance(plain, data.DataError):  # the data itself is the problem, whatever val_source
            return [_cli_words(str(plain), dataset)]
        fix = ("use -p val_source split (validation from a stratified 20% of train), or point --data-root at a "
               "folder whose ferplus/ is Microsoft's layout" if dataset == "ferplus" else
               f"{dataset}'s validation images are always a split of its training set: use -p val_source split "
               "or leave it out")
        return [f"val_source={val_source} needs FERPlus in Microsoft's layout (FER2013Train/ FER2013Valid/ "
                f"FER2013Test/ with label.csv; FER2013Valid is the official validation split), but {root} holds "
                f"{dataset} in the {plain.info['layout']!r} layout; {fix}"]
    if isinstance(found, data.DataError):
        return [_cli_words(str(found), dataset)]
    problems = []
    for split in _SPLITS:
        n, size = cfg.get(f"n_{split}"), len(getattr(found, split))
        if isinstance(n, int) and not isinstance(n, bool) and n > size:
            how = (f" (label rule {found.info['label_rule']}, val_source {val_source})" if dataset == "ferplus"
                   else "")
            problems.append(f"n_{split}={n} is more than the {size} images of the {split} split of {root}{how}; "
                            f"use at most {size}, or none for the whole split")
    return problems


# --- the weights: checks 4-5 ------------------------------------------------------------------------

def _weights_problems(regime: str, model: str, dataset: str, cfg: Mapping[str, Any],
                      weights: dict[tuple, str | None], probes: dict[str, str | None]) -> list[str]:
    if "pretrained" not in cfg or "weights_path" in config.NOT_IN_NOTEBOOK.get(regime, {}):
        return []  # no starting weights in its settings, or it loads another run's model (classical)
    if not cfg["pretrained"] or config.start_weights(cfg) == "random":
        return []  # no weights to read (statistics transfer without them draws from the random initialisation's)
    path = cfg.get("weights_path")
    if path:
        from . import data

        key = ("file", model, str(Path(path).expanduser().resolve()), len(data.CLASSES.get(dataset, ())))
        if key not in weights:
            weights[key] = weights_file_problem(model, Path(path).expanduser(), key[-1])
    else:
        key = ("imagenet", model)
        if key not in weights:
            weights[key] = imagenet_problem(model, probes)
    return [weights[key]] if weights[key] else []


def weights_file_problem(model: str, path: Path, num_classes: int) -> str | None:
    """Why the state dict at ``path`` would not load into ``model`` with a ``num_classes``-way head, or None.

    ``models._from_file`` itself, with the network built on the meta device: the file is read whole
    (``models._read_state_dict``; AlexNet's ImageNet file is 233 MB), the keys and shapes are fitted as a run
    fits them, and no weight is copied or initialised.
    """
    import torch

    from . import models

    try:
        record = models.backbone(model)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")  # "copying from a non-meta parameter ... is a no-op": the point here
            models._from_file(record, num_classes, path)
    except (FileNotFoundError, ValueError) as error:  # models' own messages name the file and the fix
        return str(error)
    except RuntimeError as error:  # load_state_dict: a tensor of another shape
        detail = " ".join(line.strip().rstrip(".") for line in str(error).splitlines()[1:3]) or str(error)
        return (f"weights_path {str(path)!r} does not fit {model}: {detail}; pass a state dict of the {model} "
                f"model, saved with torch.save(model.state_dict(), path)")
    except Exception as error:  # noqa: BLE001 -- whatever else a foreign file raises, named with its type
        return (f"weights_path {str(path)!r} could not be read as {model} weights ({type(error).__name__}: {error}); "
                f"save one with torch.save(model.state_dict(), path)")
    return None


def imagenet_problem(model: str, probes: dict[str, str | None] | None = None) -> str | None:
    """Why ``model``'s ImageNet weights cannot be had, or None: they are cached, or their host answers.

    Downloads nothing. The source is the backbone record's (``models.Backbone.weights``): a timm hub repo
    (``hub_id``) is looked up in the Hugging Face cache (``model.safetensors`` or ``pytorch_model.bin``,
    what timm reads), a torchvision file (``url``) in torch hub's ``checkpoints/``. When absent, the host is
    probed (:func:`why_unreachable`, at most ``PROBE_TIMEOUT_S`` s, once per host and call); with
    ``HF_HUB_OFFLINE`` set the hub is not asked at all. The message is models' own, naming what to put where.
    """
    from . import models

    record = models.backbone(model)
    source = record.weights
    probes = {} if probes is None else probes
    hub = None
    if source.hub_id:
        try:
            from huggingface_hub import constants
            hub = constants
        except ImportError:  # timm then reads the url through torch hub
            hub = None
    if hub is not None:
        if _hf_cached(source.hub_id):
            return None
        if hub.HF_HUB_OFFLINE:
            why = "not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
        else:
            url = f"{hub.ENDPOINT.rstrip('/')}/{source.hub_id}"
            if url not in probes:
                probes[url] = why_unreachable(url)
            if probes[url] is None:
                return None
            why = f"not in the Hugging Face cache, and the hub cannot be reached: {probes[url]}"
        text = models._hub_help(record, ConnectionError(why))
    else:
        import torch

        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlsplit(source.url).path)
        if target.is_file() and target.stat().st_size > 0:
            return None
        if source.url not in probes:
            probes[source.url] = why_unreachable(source.url)
        if probes[source.url] is None:
            return None
        # models._download's message, which it builds only once a download has failed
        text = (f"{record.label} ImageNet weights are unavailable (not in the torch hub cache, and the download "
                f"host cannot be reached: {probes[source.url]}). Download {source.url} and place it as {target} "
                f"(torch.hub.get_dir()/checkpoints/), or {_WEIGHTS_FLAG}. {models._HOW_TO_SKIP}")
    return text.replace(_WEIGHTS_FLAG, _WEIGHTS_FLAG_CLI)


def _hf_cached(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str) and os.path.isfile(found):
            return True
    return False


def why_unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection opens to the host serving ``url`` within ``timeout`` seconds; else why not.

    Sends nothing over the connection. Through the HTTPS (or HTTP) proxy of the environment when one is set
    for that host (``https_proxy``, ``no_proxy``): that is where a download would connect. The name lookup
    counts in the timeout. Tests replace this function; nothing else in this module touches the network.
    """
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    via = ""
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxied.hostname or "", proxied.port or (443 if proxied.scheme == "https" else 80)
        via = " (the proxy)"
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except OSError as error:
            outcome.append(f"{type(error).__name__}: {error}")

    worker = threading.Thread(target=connect, name="preflight-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        return f"{host}:{port}{via} did not answer within {timeout:g} s"
    return None if outcome[0] is None else f"{host}:{port}{via}: {outcome[0]}"
