"""Batched preprocessing: geometry, normalisation, per-sample augmentation, input checks."""

import pytest
import torch

from transferstudy.preprocess import IMAGENET_MEAN, IMAGENET_STD, MODES, POLICIES, Preprocessor

AUGMENTING = [p for p in POLICIES if p != "none"]


def _images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("value", [0, 128, 255])
def test_constant_gray_maps_to_normalised_value(mode, value):
    x = torch.full((2, 3, 32, 32), value, dtype=torch.uint8)
    out = Preprocessor(size=224, mode=mode)(x, train=False)
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32 and out.is_contiguous()
    for c in range(3):
        expected = (value / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(out[:, c], torch.full_like(out[:, c], expected), atol=1e-5, rtol=0)


def test_resize_crop_cuts_the_border_that_resize_keeps():
    # A 1-px white frame around a black 32x32 image: Resize(256)->CenterCrop(224) drops
    # 16 px per side at 256 = 2 source px, so the frame disappears; plain resize keeps it.
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    x[..., 0, :] = x[..., -1, :] = x[..., :, 0] = x[..., :, -1] = 255
    black = torch.tensor([(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    cropped = Preprocessor(mode="resize_crop")(x, train=False)
    resized = Preprocessor(mode="resize")(x, train=False)
    torch.testing.assert_close(cropped, black.expand_as(cropped), atol=1e-5, rtol=0)
    white = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(resized[0, :, 0, 0], white, atol=1e-5, rtol=0)
    torch.testing.assert_close(resized[0, :, 112, 112], black.flatten(), atol=1e-5, rtol=0)


def test_resize_crop_scales_with_size():
    out = Preprocessor(size=64, mode="resize_crop")(_images(2), train=False)
    assert out.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("mode", MODES)
def test_every_policy_gives_finite_output_of_the_right_shape(policy, mode):
    out = Preprocessor(size=96, mode=mode, policy=policy)(_images(4), train=True)
    assert out.shape == (4, 3, 96, 96) and out.dtype == torch.float32
    assert out.is_contiguous() and torch.isfinite(out).all()


@pytest.mark.parametrize("policy", AUGMENTING)
def test_augmentation_is_per_sample_and_seed_reproducible(policy):
    pp = Preprocessor(size=64, policy=policy)
    same = _images(1).expand(8, -1, -1, -1).contiguous()
    torch.manual_seed(7)
    first = pp(same, train=True)
    distinct = {tuple(first[i].flatten()[::97].tolist()) for i in range(8)}
    assert len(distinct) >= 4, f"{policy}: one random draw was shared across the batch"
    torch.manual_seed(7)
    torch.testing.assert_close(pp(same, train=True), first, atol=0, rtol=0)
    assert not torch.equal(pp(same, train=True), first)  # a new draw without reseeding


@pytest.mark.parametrize("policy", POLICIES)
def test_eval_is_deterministic_and_ignores_the_policy(policy):
    x = _images(3)
    plain = Preprocessor(size=64)(x, train=False)
    pp = Preprocessor(size=64, policy=policy)
    torch.testing.assert_close(pp(x, train=False), plain, atol=0, rtol=0)
    torch.testing.assert_close(pp(x, train=False), plain, atol=0, rtol=0)


def test_train_without_policy_equals_eval():
    x = _images(3)
    pp = Preprocessor(size=64, mode="resize_crop")
    torch.testing.assert_close(pp(x, train=True), pp(x, train=False), atol=0, rtol=0)


@pytest.mark.parametrize("policy", ["none", "light"])
def test_gray_is_repeated_to_three_channels(policy):
    gray = _images(2)[:, :1]
    pp = Preprocessor(size=48, policy=policy)
    torch.manual_seed(0)
    from_gray = pp(gray, train=True)
    torch.manual_seed(0)
    from_rgb = pp(gray.repeat(1, 3, 1, 1), train=True)
    assert from_gray.shape == (2, 3, 48, 48)
    torch.testing.assert_close(from_gray, from_rgb, atol=0, rtol=0)


def test_large_inputs_are_downscaled_with_antialiasing():
    # A 1-px checkerboard averages to mid-gray when antialiased; aliasing would keep extremes.
    board = ((torch.arange(256)[:, None] + torch.arange(256)[None, :]) % 2 * 255).to(torch.uint8)
    x = board.expand(1, 3, 256, 256).contiguous()
    pp = Preprocessor(size=32, policy="light", mean=(0.5, 0.5, 0.5), std=(1.0, 1.0, 1.0))
    for train in (False, True):
        assert pp(x, train=train).abs().max() < 0.05


def test_channels_last_flag():
    out = Preprocessor(size=32, channels_last=True)(_images(2), train=False)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_unknown_policy_names_augment_and_choices():
    with pytest.raises(ValueError, match="augment") as err:
        Preprocessor(policy="randaugment")
    assert all(p in str(err.value) for p in POLICIES)


@pytest.mark.parametrize("bad", [torch.rand(2, 3, 8, 8), torch.zeros(3, 8, 8, dtype=torch.uint8),
                                 torch.zeros(2, 4, 8, 8, dtype=torch.uint8)])
def test_bad_batches_are_rejected_with_the_fix(bad):
    with pytest.raises(ValueError, match="Preprocessor expects"):
        Preprocessor(size=16)(bad, train=False)


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="eval_mode"):
        Preprocessor(mode="center")


@pytest.mark.parametrize("mode", MODES)
def test_fer_affine_at_zero_strength_reproduces_the_eval_geometry(mode):
    # The vectorised affine path (rotation/shift/zoom/flip, then the mode's resize or crop)
    # must land on the same pixels as the eval transform when every random draw is neutral.
    from transferstudy.preprocess import _random_affine_theta, _resample

    pp = Preprocessor(size=224, mode=mode, mean=(0, 0, 0), std=(1, 1, 1))
    x = _images(6)
    theta = _random_affine_theta(x, pp._crop_fraction(x), degrees=0.0, shift=0.0, zoom=(1.0, 1.0))
    out = _resample(x.float() / 255, theta, 224)
    flipped = theta[:, 0, 0] < 0
    out[flipped] = out[flipped].flip(-1)
    # Eval resizes in uint8 with fixed-point weights (as PIL does): the two differ by at most one level.
    torch.testing.assert_close(out, pp(x, train=False), atol=1 / 255 + 1e-5, rtol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [32, 48])
def test_eval_matches_the_original_studys_per_image_pil_transform(mode, size):
    # The naive pipeline (and the original study): PIL Resize -> ToTensor -> Normalize per image,
    # with Resize(256) -> CenterCrop(224) for resize_crop. The batched eval path gives the same pixels.
    from PIL import Image
    from torchvision import transforms

    geometry = [transforms.Resize((224, 224))] if mode == "resize" else [transforms.Resize(256),
                                                                         transforms.CenterCrop(224)]
    per_image = transforms.Compose([*geometry, transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    x = _images(4, size=size)
    expected = torch.stack([per_image(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in x])
    out = Preprocessor(size=224, mode=mode)(x, train=False)
    # torchvision's uint8 resampling kernel reproduces PIL's up to an occasional one-level rounding.
    level = max(1 / 255 / s for s in IMAGENET_STD)
    torch.testing.assert_close(out, expected, atol=level + 1e-5, rtol=0)
    assert (out - expected).abs().gt(1e-5).float().mean() < 0.05
