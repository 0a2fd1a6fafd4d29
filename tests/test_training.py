"""Optimisers, schedules, the fit loop (learning, checkpoints, early stopping, soft targets) and inference."""

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from transferstudy.preprocess import Preprocessor
from transferstudy.training import (OPTIMIZERS, extract, fit, make_optimizer, make_scheduler, predict,
                                    seed_everything)

PREPROCESS = Preprocessor(size=8)


@dataclass
class Split:
    images: torch.Tensor
    labels: torch.Tensor
    soft: torch.Tensor | None = None


def _split(n: int, seed: int, invert: bool = False) -> Split:
    """Two colour classes: class 0 has a bright red channel, class 1 a bright blue one."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = torch.randint(0, 100, (n, 3, 8, 8), generator=g)
    images[labels == 0, 0] += 150
    images[labels == 1, 2] += 150
    soft = torch.nn.functional.one_hot(labels, 2).float() * 0.6 + 0.2
    return Split(images.to(torch.uint8), 1 - labels if invert else labels, soft)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def _fit(model, train, val, *, lr=0.05, epochs=4, **kw):
    opt = make_optimizer({"all": list(model.parameters())}, name="adam", lr=lr)
    kw.setdefault("log", lambda line: None)
    return fit(model, train, val, preprocess=PREPROCESS, optimizer=opt, epochs=epochs, batch_size=16,
               device="cpu", **kw)


def test_tiny_model_learns_a_separable_problem():
    model, train, val = _model(), _split(128, 1), _split(64, 2)
    _, before = predict(model, val, preprocess=PREPROCESS, batch_size=32, device="cpu")
    lines = []
    history = _fit(model, train, val, epochs=5, monitor="val_acc", log=lines.append)
    probs, preds = predict(model, val, preprocess=PREPROCESS, batch_size=32, device="cpu")
    accuracy = (preds == val.labels.numpy()).mean()
    assert accuracy >= 0.95 and accuracy > (before == val.labels.numpy()).mean() + 0.2
    assert probs.dtype == np.float32 and probs.shape == (64, 2)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(preds, probs.argmax(1))
    frame = history.to_frame()
    assert list(frame.index) == [1, 2, 3, 4, 5]
    assert set(frame.columns) == {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"}
    assert frame["train_loss"].iloc[-1] < frame["train_loss"].iloc[0]
    assert history.best_metric == frame["val_acc"].max() == frame["val_acc"].loc[history.best_epoch]
    assert len(lines) == 5 and lines[0].startswith("epoch 1/5") and not history.stopped_early


def test_same_seed_same_run():
    first = _fit(_model(), _split(64, 1), _split(32, 2), epochs=2, seed=3)
    second = _fit(_model(), _split(64, 1), _split(32, 2), epochs=2, seed=3)
    drop = ["seconds"]
    assert first.to_frame().drop(columns=drop).equals(second.to_frame().drop(columns=drop))


@pytest.mark.parametrize("micro", [1, 5, 16])
def test_micro_batches_take_the_same_steps_as_whole_batches(micro):
    # Batches of 16 as micro-batches of 5 (5 + 5 + 5 + 1) or 1: gradients accumulated to the same
    # optimiser step, so the same weights and curves (no dropout here: its masks would be drawn differently).
    runs = []
    for micro_batch_size in (None, micro):
        model = _model()
        model.head[0].p = 0.0
        history = _fit(model, _split(40, 1), _split(16, 2), epochs=3, seed=3, label_smoothing=0.1,
                       micro_batch_size=micro_batch_size)
        runs.append((model.state_dict(), history.to_frame().drop(columns=["seconds"])))
    (whole, whole_curve), (split, split_curve) = runs
    assert not torch.equal(whole["head.1.weight"], _model().state_dict()["head.1.weight"])  # it trained
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(split_curve.to_numpy(), whole_curve.to_numpy(), rtol=1e-4, atol=1e-6)


def test_micro_batch_size_must_be_positive():
    good = _split(16, 1)
    with pytest.raises(ValueError, match="micro_batch_size must be None"):
        _fit(_model(), good, good, micro_batch_size=0)


@pytest.mark.parametrize("monitor", ["val_loss", "val_acc"])
def test_best_epoch_is_restored_and_checkpointed(tmp_path, monitor):
    # Val labels are inverted, so the better the model fits train, the worse val gets:
    # the best epoch is an early one and the final weights must be swapped back.
    model, val, path = _model(), _split(64, 2, invert=True), tmp_path / "ckpt" / "best.pt"
    history = _fit(model, _split(128, 1), val, epochs=4, monitor=monitor, checkpoint_path=path)
    values = [row[monitor] for row in history.epochs]
    best = (min if monitor == "val_loss" else max)(values)
    assert history.best_epoch == values.index(best) + 1 < len(values)
    assert history.best_metric == best
    saved = torch.load(path)
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert list(path.parent.iterdir()) == [path]  # the temporary file was renamed away
    probs, preds = predict(model, val, preprocess=PREPROCESS, batch_size=32, device="cpu")
    row = history.epochs[history.best_epoch - 1]
    val_loss = torch.nn.functional.nll_loss(torch.from_numpy(probs).log(), val.labels).item()
    assert val_loss == pytest.approx(row["val_loss"], abs=1e-5)
    assert (preds == val.labels.numpy()).mean() == pytest.approx(row["val_acc"])


def test_early_stopping_after_patience_epochs():
    lines = []
    history = _fit(_model(), _split(128, 1), _split(64, 2, invert=True), epochs=20, patience=2,
                   log=lines.append)
    assert history.stopped_early
    assert len(history.epochs) == history.best_epoch + 2 < 20
    assert "early stop" in lines[-1]


def test_soft_targets_train_against_vote_distributions():
    model, train, val = _model(), _split(128, 1), _split(64, 2)
    train.labels = torch.zeros_like(train.labels)  # only the soft targets carry the classes
    history = _fit(model, train, val, epochs=5, monitor="val_acc", soft_targets=True)
    assert history.epochs[-1]["val_acc"] >= 0.95
    # The loss is cross-entropy against the distributions, so it cannot drop below their entropy.
    entropy = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert all(row["train_loss"] >= entropy - 1e-6 for row in history.epochs)


def test_soft_targets_without_soft_labels_is_rejected():
    train = _split(16, 1)
    train.soft = None
    with pytest.raises(ValueError, match="train.soft"):
        _fit(_model(), train, _split(8, 2), soft_targets=True)


def test_frozen_parameters_stay_unchanged():
    model = _model()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    opt = make_optimizer({"head": list(model.head.parameters())}, name="adamw", lr=0.05, weight_decay=0.1)
    fit(model, _split(64, 1), _split(32, 2), preprocess=PREPROCESS, optimizer=opt, epochs=2, batch_size=16,
        device="cpu", log=lambda line: None)
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in frozen.items())
    assert not all(torch.equal(model.head.state_dict()[k], v) for k, v in head.items())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_discriminative_lrs_land_in_their_groups(name):
    model = _model()
    opt = make_optimizer({"backbone": list(model.backbone.parameters()), "head": list(model.head.parameters())},
                         name=name, lr={"backbone": 3e-5, "head": 1e-3}, weight_decay=1e-4)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["backbone"]["lr"] == 3e-5 and groups["head"]["lr"] == 1e-3
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in model.head.parameters()}
    if name == "sgd":
        assert groups["head"]["momentum"] == 0.9


def test_one_lr_applies_to_every_group():
    model = _model()
    opt = make_optimizer({"backbone": list(model.backbone.parameters()), "head": list(model.head.parameters())},
                         name="sgd", lr=0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]


def test_optimizer_input_errors():
    model = _model()
    groups = {"backbone": list(model.backbone.parameters()), "head": list(model.head.parameters())}
    with pytest.raises(ValueError, match="lr dict keys"):
        make_optimizer(groups, lr={"head": 1e-3})
    with pytest.raises(ValueError, match="optimizer 'rmsprop'"):
        make_optimizer(groups, name="rmsprop", lr=1e-3)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="'backbone' has no trainable"):
        make_optimizer(groups, lr=1e-3)


def _lrs(scheduler, opt, steps):
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        scheduler.step()
    return np.array(out)


def test_cosine_schedule_with_linear_warmup_per_batch():
    model = _model()
    opt = make_optimizer({"backbone": list(model.backbone.parameters()), "head": list(model.head.parameters())},
                         name="sgd", lr={"backbone": 0.1, "head": 1.0})
    epochs, steps_per_epoch, warmup = 2, 10, 4  # warmup_frac 0.2 of 20 steps
    lrs = _lrs(make_scheduler(opt, name="cosine", epochs=epochs, steps_per_epoch=steps_per_epoch,
                              warmup_frac=0.2), opt, 20)
    expected = [(s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / 16))
                for s in range(20)]
    np.testing.assert_allclose(lrs[:, 1], expected, rtol=1e-12)
    np.testing.assert_allclose(lrs[:, 0], 0.1 * np.array(expected), rtol=1e-12)
    # Linear rise to the peak at the last warmup step, where cosine decay starts; never 0.
    assert lrs[3, 1] == lrs[4, 1] == 1.0 and np.all(np.diff(lrs[:4, 1]) > 0) and np.all(np.diff(lrs[4:, 1]) < 0)
    assert lrs[:, 1].min() > 0


def test_cosine_without_warmup_starts_at_the_base_lr():
    opt = make_optimizer({"a": [nn.Parameter(torch.zeros(1))]}, name="sgd", lr=1.0)
    lrs = _lrs(make_scheduler(opt, name="cosine", epochs=1, steps_per_epoch=4), opt, 4)[:, 0]
    np.testing.assert_allclose(lrs, [0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)], rtol=1e-12)


def test_plateau_is_stepped_per_epoch_on_validation_accuracy():
    # A learning rate too small to change anything keeps val accuracy flat, so after one
    # best epoch and patience (2) + 1 stale epochs the plateau schedule cuts the lr tenfold.
    model = _model()
    opt = make_optimizer({"all": list(model.parameters())}, name="sgd", lr=1e-12)
    scheduler = make_scheduler(opt, name="plateau", epochs=6, steps_per_epoch=4)
    history = fit(model, _split(64, 1), _split(32, 2), preprocess=PREPROCESS, optimizer=opt,
                  scheduler=scheduler, epochs=6, batch_size=16, device="cpu", log=lambda line: None)
    assert [row["lr"] for row in history.epochs] == pytest.approx([1e-12] * 4 + [1e-13] * 2, rel=1e-9)
    assert make_scheduler(opt, name="none", epochs=1, steps_per_epoch=1) is None


def test_scheduler_input_errors():
    opt = make_optimizer({"a": [nn.Parameter(torch.zeros(1))]}, lr=1.0)
    with pytest.raises(ValueError, match="scheduler 'step'"):
        make_scheduler(opt, name="step", epochs=1, steps_per_epoch=1)
    with pytest.raises(ValueError, match="warmup_frac"):
        make_scheduler(opt, epochs=1, steps_per_epoch=1, warmup_frac=1.5)


def test_extract_runs_in_eval_mode_in_split_order():
    model, split = _model(), _split(40, 3)
    model.train()
    feats = extract(model.backbone, split, preprocess=PREPROCESS, batch_size=16, device="cpu")
    assert feats.shape == (40, 4) and feats.dtype == np.float32
    with torch.no_grad():
        direct = model.backbone(PREPROCESS(split.images, False)).numpy()
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-6)
    # The dropout head is switched to eval through its bound method, so outputs repeat exactly.
    model.train()
    logits = [extract(model.forward, split, preprocess=PREPROCESS, batch_size=16, device="cpu") for _ in range(2)]
    assert not model.training
    np.testing.assert_array_equal(logits[0], logits[1])


def test_fit_rejects_bad_splits_and_monitor():
    good = _split(16, 1)
    with pytest.raises(ValueError, match="train.images must be a uint8"):
        _fit(_model(), Split(good.images.float(), good.labels), good)
    with pytest.raises(ValueError, match="val.labels"):
        _fit(_model(), good, Split(good.images, good.labels[:3]))
    with pytest.raises(ValueError, match="monitor 'val_f1'"):
        _fit(_model(), good, good, monitor="val_f1")


def test_seed_everything_repeats_draws():
    seed_everything(5)
    first = (torch.rand(3), np.random.rand(3))
    seed_everything(5)
    assert torch.equal(first[0], torch.rand(3)) and np.array_equal(first[1], np.random.rand(3))
    with pytest.raises(ValueError, match="seed"):
        seed_everything("42")


def _alexnet() -> tuple[nn.Module, nn.Module]:
    from torchvision.models import alexnet

    model = alexnet(weights=None, num_classes=3)
    return model, model.classifier[6]


def _deit() -> tuple[nn.Module, nn.Module]:
    import timm

    model = timm.create_model("deit_base_patch16_224", pretrained=False, num_classes=3)
    return model, model.head


@pytest.mark.parametrize("build", [_alexnet, _deit], ids=["alexnet", "deit_base"])
def test_linear_probe_epoch_on_the_study_architectures(build):
    # One epoch at 224 px on one CIFAR-sized image (DeiT-Base runs ~3.5 img/s on 2 CPU cores):
    # only the head moves, dropout follows model.train().
    torch.manual_seed(0)
    model, head = build()
    model.requires_grad_(False)
    head.requires_grad_(True)
    backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(_prefix(model, head))}
    before = [p.clone() for p in head.parameters()]
    split = Split(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8), torch.tensor([2]))
    opt = make_optimizer({"head": list(head.parameters())}, name="adamw", lr=1e-2)
    history = fit(model, split, split, preprocess=Preprocessor(policy="light"), optimizer=opt, epochs=1,
                  batch_size=1, device="cpu", log=lambda line: None)
    row = history.epochs[0]
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"]) and row["val_acc"] in (0.0, 1.0)
    assert all(not torch.equal(b, p) for b, p in zip(before, head.parameters()))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in backbone.items())


def _prefix(model: nn.Module, head: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is head) + "."
