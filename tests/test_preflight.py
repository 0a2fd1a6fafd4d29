"""preflight.check_runs: the inputs of a selected matrix are refused once, up front, one message per problem.

Tiny synthetic datasets (conftest's fixtures, linked as <root>/cifar10 and <root>/ferplus) and tiny state-dict
files: an AlexNet-shaped state dict of stride-0 tensors is a few kB on disk. The network is never touched:
``preflight.why_unreachable`` is replaced, and the torch hub / Hugging Face caches point into tmp_path.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from synthetic import CIFAR_TRAIN_PER_CLASS, FERPLUS_TRAIN_PER_EMOTION, KAGGLE_FOLDERS

from transferstudy import config, models, preflight
from transferstudy.config import ConfigError

# The fixtures' split sizes, as data.load_dataset draws them: val is round(20%) of the training pool.
CIFAR_POOL = sum(CIFAR_TRAIN_PER_CLASS)  # 85
CIFAR_VAL = round(0.2 * CIFAR_POOL)  # 17
CIFAR_TRAIN = CIFAR_POOL - CIFAR_VAL  # 68
CIFAR_TEST = 30
FER_POOL = sum(FERPLUS_TRAIN_PER_EMOTION.values())  # 78 (the NF row is dropped)
FER_VALID = len(FERPLUS_TRAIN_PER_EMOTION)  # 8 in FER2013Valid (and in FER2013Test)
KAGGLE_POOL = sum(n for n, _ in KAGGLE_FOLDERS.values())

ALEXNET_URL = models.backbone("alexnet").weights.url
DEIT_HUB = models.backbone("deit_base").weights.hub_id


def make_root(base: Path, **datasets: Path) -> Path:
    """A data root holding each dataset folder as a link to a fixture's folder."""
    base.mkdir(parents=True, exist_ok=True)
    for name, folder in datasets.items():
        (base / name).symlink_to(folder, target_is_directory=True)
    return base


@pytest.fixture
def root(tmp_path: Path, cifar_dir: Path, fer_microsoft_dir: Path) -> Path:
    return make_root(tmp_path / "data", cifar10=cifar_dir, ferplus=fer_microsoft_dir)


@pytest.fixture
def kaggle_root(tmp_path: Path, cifar_dir: Path, fer_kaggle_dir: Path) -> Path:
    return make_root(tmp_path / "kaggle_data", cifar10=cifar_dir, ferplus=fer_kaggle_dir)


def run(regime: str, model: str = "alexnet", dataset: str = "cifar10", **overrides) -> tuple[str, str, str, dict]:
    """One run as the runner gives it: its settings resolved for the smoke profile, random init by default."""
    overrides = {"pretrained": False, **overrides}
    return regime, model, dataset, config.resolve(regime, model, dataset, "smoke", overrides)


def refusal(runs, data_root: Path | None) -> str:
    with pytest.raises(ConfigError) as caught:
        preflight.check_runs(runs, data_root)
    text = str(caught.value)
    assert "download=True" not in text  # the Python API's option; `transferstudy run` has --data-root
    assert " or None" not in text  # the command line's word is none
    return text


def _probe(monkeypatch: pytest.MonkeyPatch, answer: str | None) -> list[str]:
    """Every host answers ``answer`` (None: reachable; nothing is contacted); returns the URLs probed."""
    probed: list[str] = []

    def probe(url: str, timeout: float = preflight.PROBE_TIMEOUT_S) -> str | None:
        probed.append(url)
        return answer

    monkeypatch.setattr(preflight, "why_unreachable", probe)
    return probed


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every host unreachable; returns the URLs probed."""
    return _probe(monkeypatch, "gaierror: [Errno -2] Name or service not known")


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every host reachable (nothing is contacted); returns the URLs probed."""
    return _probe(monkeypatch, None)


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Torch hub and Hugging Face caches in an empty tmp dir, the hub not marked offline."""
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub"
    return tmp_path


@pytest.fixture(scope="module")
def alexnet_shapes() -> dict[str, torch.Size]:
    """The shapes of AlexNet's state (ImageNet head): the architecture is built once for the module."""
    return {k: v.shape for k, v in models.backbone("alexnet").architecture(1000).state_dict().items()}


def tiny_state(shapes: dict[str, torch.Size], **changed: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """A state dict of these shapes whose tensors share one element each (a few kB once saved)."""
    shapes = {**shapes, **{k.replace("__", "."): torch.Size(v) for k, v in changed.items()}}
    return {k: torch.zeros(1).expand(*shape) for k, shape in shapes.items()}


# --- a good configuration passes -------------------------------------------------------------------

def test_good_matrix_passes(root: Path) -> None:
    runs = [run(r, m, d, n_test=5) for d in config.DATASETS for m in config.MODELS
            for r in ("frozen_svm", "linear_probe", "full", "classical", "feature_reuse")]
    runs.append(("a_new_analysis", "alexnet", "cifar10", {"seed": 1, "n_train": CIFAR_TRAIN}))  # generic
    preflight.check_runs(runs, root)
    preflight.check_runs([], root)


def test_exact_split_sizes_pass(root: Path) -> None:
    preflight.check_runs([run("frozen_svm", n_train=CIFAR_TRAIN, n_val=CIFAR_VAL, n_test=CIFAR_TEST)], root)
    preflight.check_runs([run("frozen_svm", dataset="ferplus", val_source="official", n_train=FER_POOL,
                              n_val=FER_VALID, n_test=FER_VALID)], root)


# --- 1. the dataset folder ------------------------------------------------------------------------

def test_data_root_pointing_at_the_dataset_folder(root: Path) -> None:
    text = refusal([run("full")], root / "cifar10")  # p_data_root_wrong
    assert text == (f"data folder {root / 'cifar10' / 'cifar10'} does not exist: --data-root {root / 'cifar10'} looks "
                    f"like the cifar10 folder itself; pass its parent, --data-root {root}, the folder holding cifar10/ "
                    "and ferplus/")


def test_data_root_without_the_dataset(tmp_path: Path, cifar_dir: Path) -> None:
    data_root = make_root(tmp_path / "data", cifar10=cifar_dir)
    text = refusal([run("full", dataset="ferplus")], data_root)
    assert text.startswith(f"data folder {data_root / 'ferplus'} does not exist: {data_root / 'ferplus'} should hold "
                           "FERPlus as Microsoft's FER2013Train/")
    assert "Kaggle" in text and "--data-root DIR is the folder holding cifar10/ and ferplus/" in text
    assert "../shared/data/extract.sh DIR unpacks the local copies into DIR/cifar10 and DIR/ferplus" in text


def test_missing_data_root(tmp_path: Path) -> None:
    text = refusal([run("full", dataset="ferplus")], tmp_path / "nowhere")
    assert text.startswith(f"data folder {tmp_path / 'nowhere' / 'ferplus'} does not exist: --data-root "
                           f"{tmp_path / 'nowhere'} does not exist either. --data-root DIR is the folder holding "
                           "cifar10/ and ferplus/: ../shared/data/extract.sh DIR")


@pytest.mark.parametrize(("dataset", "says"), [("cifar10", "holds no CIFAR-10 copy"),
                                               ("ferplus", "holds no FERPlus copy")])
def test_folder_without_a_layout(tmp_path: Path, dataset: str, says: str) -> None:
    (tmp_path / "data" / dataset / "notes").mkdir(parents=True)
    text = refusal([run("frozen_svm", dataset=dataset)], tmp_path / "data")
    assert f"{tmp_path / 'data' / dataset} {says}" in text
    assert "--data-root DIR is the folder holding cifar10/ and ferplus/" in text
    assert "../shared/data/extract.sh DIR" in text


def test_unreadable_torchvision_copy(tmp_path: Path) -> None:
    (tmp_path / "data" / "cifar10" / "cifar-10-batches-py").mkdir(parents=True)
    text = refusal([run("frozen_svm")], tmp_path / "data")
    assert f"torchvision could not read CIFAR-10 from {tmp_path / 'data' / 'cifar10' / 'cifar-10-batches-py'}" in text
    assert "unpack a fresh copy with ../shared/data/extract.sh DIR and pass --data-root DIR" in text


def test_a_listing_error_names_its_file(tmp_path: Path, cifar_dir: Path) -> None:
    ferplus = tmp_path / "ferplus"
    for folder in ("FER2013Train", "FER2013Valid", "FER2013Test"):
        (ferplus / folder).mkdir(parents=True)
    data_root = make_root(tmp_path / "data", cifar10=cifar_dir, ferplus=ferplus)
    text = refusal([run("frozen_svm", dataset="ferplus")], data_root)
    assert f"missing {data_root / 'ferplus' / 'FER2013Train' / 'label.csv'}" in text


# --- 2. subsets larger than their split -----------------------------------------------------------

def test_n_train_more_than_the_split(root: Path) -> None:
    text = refusal([run("full", n_train=1000)], root)  # p_ntrain_more_than_data
    assert text == (f"n_train=1000 is more than the {CIFAR_TRAIN} images of the train split of {root / 'cifar10'}; "
                    f"use at most {CIFAR_TRAIN}, or none for the whole split")


def test_each_subset_is_checked(root: Path) -> None:
    text = refusal([run("frozen_svm", n_train=CIFAR_TRAIN + 1, n_val=CIFAR_VAL + 1, n_test=CIFAR_TEST + 1)], root)
    assert text.startswith("3 problems with the inputs, nothing was run:\n")
    assert f"n_train={CIFAR_TRAIN + 1} is more than the {CIFAR_TRAIN} images of the train split" in text
    assert f"n_val={CIFAR_VAL + 1} is more than the {CIFAR_VAL} images of the val split" in text
    assert f"n_test={CIFAR_TEST + 1} is more than the {CIFAR_TEST} images of the test split" in text


def test_ferplus_sizes_follow_val_source_and_label_rule(root: Path, kaggle_root: Path) -> None:
    fer = root / "ferplus"
    text = refusal([run("frozen_svm", dataset="ferplus", n_test=FER_VALID + 1)], root)
    assert text == (f"n_test={FER_VALID + 1} is more than the {FER_VALID} images of the test split of {fer} "
                    f"(label rule majority, val_source split); use at most {FER_VALID}, or none for the whole split")
    split_train = FER_POOL - round(0.2 * FER_POOL)
    text = refusal([run("frozen_svm", dataset="ferplus", n_test=5, n_train=split_train + 1)], root)
    assert f"the {split_train} images of the train split" in text
    # official: the whole of FER2013Train trains, FER2013Valid validates
    preflight.check_runs([run("frozen_svm", dataset="ferplus", n_test=5, n_val=5, n_train=split_train + 1,
                              val_source="official")], root)
    text = refusal([run("frozen_svm", dataset="ferplus", n_test=5, n_val=FER_VALID + 1, val_source="official")],
                   root)
    assert f"the {FER_VALID} images of the val split of {fer} (label rule majority, val_source official)" in text
    kaggle_train = KAGGLE_POOL - round(0.2 * KAGGLE_POOL)
    text = refusal([run("frozen_svm", dataset="ferplus", n_test=5, n_train=kaggle_train + 1)], kaggle_root)
    assert f"the {kaggle_train} images of the train split of {kaggle_root / 'ferplus'} (label rule argmax" in text


# --- 3. val_source official -----------------------------------------------------------------------

def test_val_source_official_needs_microsofts_layout(kaggle_root: Path) -> None:
    text = refusal([run("frozen_svm", dataset="ferplus", n_test=5, val_source="official")], kaggle_root)
    assert text.startswith("val_source=official needs FERPlus in Microsoft's layout")
    assert f"but {kaggle_root / 'ferplus'} holds ferplus in the 'kaggle' layout" in text
    assert "use -p val_source split" in text


def test_val_source_official_on_cifar(root: Path) -> None:
    name, model, dataset, cfg = run("frozen_svm")
    cfg = {**cfg, "val_source": "official"}  # p_val_source_on_cifar (resolve itself refuses it as an override)
    text = refusal([(name, model, dataset, cfg)], root)
    assert "val_source=official needs FERPlus in Microsoft's layout" in text
    assert f"{root / 'cifar10'} holds cifar10 in the 'imagefolder' layout" in text
    assert "use -p val_source split or leave it out" in text


# --- 4. a weights file ------------------------------------------------------------------------------

def test_a_fitting_weights_file_passes(tmp_path: Path, root: Path, alexnet_shapes, no_network: list[str]) -> None:
    imagenet = tmp_path / "alexnet.pth"
    torch.save(tiny_state(alexnet_shapes), imagenet)
    assert imagenet.stat().st_size < 100_000
    preflight.check_runs([run(r, dataset=d, pretrained=True, weights_path=str(imagenet), n_test=5)
                          for r in ("frozen_svm", "full") for d in config.DATASETS], root)
    preflight.check_runs([run("partial", dataset="ferplus", n_test=5, pretrained=True, init="stats",
                              weights_path=str(imagenet))], root)
    assert no_network == []  # a weights file stands in for the download


def test_weights_not_a_state_dict(tmp_path: Path, root: Path) -> None:
    notes = tmp_path / "notes.txt"  # p_weights_not_state_dict
    notes.write_text("these are not weights\n")
    text = refusal([run("full", pretrained=True, weights_path=str(notes))], root)
    assert text.startswith(f"weights_path {str(notes)!r} is not a readable state dict")
    assert "save one with torch.save(model.state_dict(), path)" in text


def test_weights_of_another_model(tmp_path: Path, root: Path, alexnet_shapes) -> None:
    other = tmp_path / "other.pth"
    torch.save({"w": torch.zeros(1)}, other)
    text = refusal([run("full", pretrained=True, weights_path=str(other))], root)
    assert f"weights_path {str(other)!r} does not match alexnet" in text
    assert "unexpected keys ['w']" in text and "Pass a state dict of the alexnet model" in text

    shaped = tmp_path / "shaped.pth"
    torch.save(tiny_state(alexnet_shapes, features__0__weight=(3, 3, 3, 3)), shaped)
    text = refusal([run("full", pretrained=True, weights_path=str(shaped))], root)
    assert f"weights_path {str(shaped)!r} does not fit alexnet: size mismatch for features.0.weight" in text
    assert "torch.save(model.state_dict(), path)" in text


def test_a_fine_tuned_head_fits_its_own_dataset_only(tmp_path: Path, root: Path, alexnet_shapes) -> None:
    ten = tmp_path / "ten_classes.pth"
    torch.save(tiny_state(alexnet_shapes, classifier__6__weight=(10, 4096), classifier__6__bias=(10,)), ten)
    runs = [run("full", dataset=d, pretrained=True, weights_path=str(ten), **({"n_test": 5} if d == "ferplus" else {}))
            for d in config.DATASETS]
    text = refusal(runs, root)
    assert text.startswith(f"weights_path {str(ten)!r} has a 10-class head (classifier.6.weight); expected the "
                           "1000-class ImageNet head or num_classes=8")
    assert text.endswith("[run ferplus/alexnet/full]")


def test_weights_read_by_no_run_are_not_checked(tmp_path: Path, root: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights\n")
    # the classical regime loads its fine-tune's checkpoint (config.NOT_IN_NOTEBOOK), not weights_path
    preflight.check_runs([run("classical", pretrained=True, weights_path=str(notes))], root)
    preflight.check_runs([run("full", init="random")], root)


# --- 5. ImageNet weights from the caches or the network ---------------------------------------------

def test_pretrained_offline_and_not_cached(root: Path, empty_caches: Path, no_network: list[str]) -> None:
    runs = [run(r, pretrained=True) for r in ("frozen_svm", "linear_probe", "partial", "full")]  # p_pretrained_offline
    text = refusal(runs, root)
    target = empty_caches / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert text.startswith("AlexNet ImageNet weights are unavailable (not in the torch hub cache, and the download "
                           "host cannot be reached: gaierror")
    assert f"Download {ALEXNET_URL} and place it as {target}" in text
    assert "`-p weights_path FILE`" in text and "`-p pretrained false`" in text
    assert text.count("ImageNet weights are unavailable") == 1
    assert text.endswith("[runs cifar10/alexnet/frozen_svm, cifar10/alexnet/linear_probe, cifar10/alexnet/partial "
                         "and 1 more]")
    assert no_network == [ALEXNET_URL]  # once per host, however many runs


def test_pretrained_from_the_torch_hub_cache(root: Path, empty_caches: Path, no_network: list[str]) -> None:
    checkpoints = empty_caches / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "alexnet-owt-7be5be79.pth").write_bytes(b"cached")
    preflight.check_runs([run("full", pretrained=True), run("partial", pretrained=True, init="stats")], root)
    assert no_network == []


def test_pretrained_not_cached_but_online(root: Path, empty_caches: Path, network: list[str]) -> None:
    preflight.check_runs([run("full", pretrained=True), run("frozen_svm", "deit_base", pretrained=True)], root)
    assert sorted(network) == sorted([ALEXNET_URL, f"https://huggingface.co/{DEIT_HUB}"])


def test_deit_from_the_hugging_face_cache(root: Path, empty_caches: Path, no_network: list[str]) -> None:
    deit = [run("frozen_svm", "deit_base", pretrained=True)]
    text = refusal(deit, root)
    assert text.startswith("DeiT-Base ImageNet weights are unavailable (ConnectionError: not in the Hugging Face "
                           "cache, and the hub cannot be reached: gaierror")
    assert f"`hf download {DEIT_HUB}`" in text and str(empty_caches / "hf") in text
    assert "`-p pretrained false`" in text and "`-p weights_path FILE`" in text
    assert no_network == [f"https://huggingface.co/{DEIT_HUB}"]

    repo = empty_caches / "hf" / f"models--{DEIT_HUB.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model.safetensors").write_bytes(b"cached")
    preflight.check_runs(deit, root)


def test_hub_offline_is_not_probed(root: Path, empty_caches: Path, no_network: list[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    text = refusal([run("linear_probe", "deit_base", pretrained=True)], root)
    assert "not in the Hugging Face cache, and HF_HUB_OFFLINE is set" in text
    assert no_network == []


# --- several problems together ------------------------------------------------------------------------

def test_every_problem_is_named_once(tmp_path: Path, cifar_dir: Path, empty_caches: Path,
                                     no_network: list[str]) -> None:
    data_root = make_root(tmp_path / "only_cifar", cifar10=cifar_dir)  # no ferplus/
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights\n")
    runs = ([run(r, n_train=1000) for r in ("frozen_svm", "linear_probe", "partial")]
            + [run(r, dataset="ferplus") for r in ("frozen_svm", "full")]
            + [run("full", n_train=1000, pretrained=True, weights_path=str(notes)),
               run("frozen_svm", "deit_base", n_train=1000, pretrained=True)])
    text = refusal(runs, data_root)
    lines = text.splitlines()
    assert lines[0] == "4 problems with the inputs, nothing was run:"
    assert len(lines) == 5 and all(line.startswith("  ") for line in lines[1:])
    assert text.count("n_train=1000 is more than") == 1
    assert (f"n_train=1000 is more than the {CIFAR_TRAIN} images of the train split of {data_root / 'cifar10'}; use "
            f"at most {CIFAR_TRAIN}, or none for the whole split [runs cifar10/alexnet/frozen_svm, "
            "cifar10/alexnet/linear_probe, cifar10/alexnet/partial and 2 more]") in text
    assert text.count(f"data folder {data_root / 'ferplus'} does not exist") == 1
    assert "[runs ferplus/alexnet/frozen_svm, ferplus/alexnet/full]" in text
    assert text.count("is not a readable state dict") == 1
    assert text.count("DeiT-Base ImageNet weights are unavailable") == 1
    assert "AlexNet ImageNet weights" not in text  # every AlexNet run starting from ImageNet has a file


def test_no_data_root_checks_the_weights_only(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights\n")
    preflight.check_runs([run("full", n_train=1000)], None)
    text = refusal([run("full", n_train=1000, pretrained=True, weights_path=str(notes))], None)
    assert text.startswith(f"weights_path {str(notes)!r} is not a readable state dict")


# --- the probe ----------------------------------------------------------------------------------------

@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that accepts connections (nothing leaves this machine)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        try:
            while True:
                conn, _ = server.accept()
                conn.close()
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    yield port
    server.close()


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def test_why_unreachable(listener: int, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy",
                 "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert preflight.why_unreachable(f"https://127.0.0.1:{listener}/models/x.pth") is None
    port = closed_port()
    started = time.monotonic()
    why = preflight.why_unreachable(f"https://127.0.0.1:{port}/x.pth", timeout=1.0)
    assert why is not None and why.startswith(f"127.0.0.1:{port}: ConnectionRefusedError")
    assert time.monotonic() - started < 2.0
    # a download through a proxy connects to the proxy
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{listener}")
    assert preflight.why_unreachable(f"https://127.0.0.1:{port}/x.pth") is None
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
    why = preflight.why_unreachable(f"https://127.0.0.1:{listener}/x.pth", timeout=1.0)
    assert why is not None and why.startswith(f"127.0.0.1:{port} (the proxy): ConnectionRefusedError")


# --- the real data, where this workplace has it --------------------------------------------------------

def test_real_matrix(real_data_root: Path) -> None:
    from transferstudy import runner

    for profile in ("quick", "full"):
        runs = [(s.regime, s.model, s.dataset, config.resolve(s.regime, s.model, s.dataset, profile,
                                                              {"pretrained": False})) for s in runner.matrix()]
        preflight.check_runs(runs, real_data_root)
    text = refusal([run("full", dataset="ferplus", n_train=25000)], real_data_root)
    assert text.startswith("n_train=25000 is more than the 20036 images of the train split of "
                           f"{real_data_root / 'ferplus'} (label rule majority, val_source split)")
