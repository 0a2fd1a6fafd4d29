"""Batched preprocessing on tensors, on the compute device: resize, augment, normalise.

Images arrive as uint8 ``[B, C, H, W]`` batches at their native size (32 px CIFAR-10,
48 px FERPlus) and leave as normalised float32 ``[B, 3, size, size]``. Random augmentation
draws its parameters per sample from torch's global RNG, so ``torch.manual_seed`` makes
it reproducible. Geometric augmentation is one vectorised affine resampling of the whole
batch (bilinear, edge pixels repeated outside the image); photometric ops that need uint8
(ColorJitter, AutoAugment) run per sample at native size, where they are cheap.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

MODES = ("resize", "resize_crop")
POLICIES = ("none", "light", "cifar_full", "fer", "deit")

# Raised whenever the same arguments start giving different pixels: it is in the repr, which keys the
# feature cache, so embeddings cached by an older version are recomputed. 2: eval resizes in uint8
# before normalising, as PIL does (1 normalised first and resized floats).
VERSION = 2

# RandomResizedCrop area ranges per policy (torchvision's default aspect range 3/4-4/3).
_RRC_SCALE = {"light": (0.8, 1.0), "cifar_full": (0.6, 1.0)}
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


class Preprocessor:
    """Turn a uint8 image batch into a normalised float32 batch for the network.

    Args:
        size: output side in pixels (square).
        mode: eval geometry. ``"resize"`` resizes to ``size x size``; ``"resize_crop"`` resizes
            the short side to ``size * 256 / 224`` and centre-crops ``size`` (Resize 256 ->
            CenterCrop 224 at the default size).
        policy: training augmentation, one of :data:`POLICIES`:
            ``none`` (the eval transform), ``light`` (RandomResizedCrop scale 0.8-1 + flip),
            ``cifar_full`` (RandomResizedCrop 0.6-1 + flip + ColorJitter 0.2/0.2/0.2),
            ``fer`` (rotation +-15 deg, shift 0.1, zoom 0.9-1.1, flip, then the eval geometry),
            ``deit`` (AutoAugment ImageNet policy + eval geometry + flip + RandomErasing p 0.2).
            The RandomResizedCrop policies crop straight to ``size`` (``mode`` then only sets eval).
            Inputs larger than ``size`` are first downscaled (antialiased) to a ``size`` short side.
        mean, std: per-channel normalisation of ``[0, 1]`` pixels.
        channels_last: return channels-last memory format (faster convolutions, see
            :func:`transferstudy.models.channels_last`).
    """

    def __init__(self, size: int = 224, mode: str = "resize", policy: str = "none",
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 channels_last: bool = False) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"Preprocessor(size=...) must be a positive int (e.g. 224), got {size!r}")
        if mode not in MODES:
            raise ValueError(f"eval_mode / Preprocessor(mode=...) {mode!r} is unknown; choose one of {MODES}")
        if policy not in POLICIES:
            raise ValueError(f"augment / Preprocessor(policy=...) {policy!r} is unknown; choose one of {POLICIES}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"Preprocessor(mean=..., std=...) need 3 values each and std > 0, got {mean}, {std}")
        self.size, self.mode, self.policy = size, mode, policy
        self.mean, self.std = tuple(mean), tuple(std)
        self.channels_last = channels_last
        self._jitter = v2.ColorJitter(0.2, 0.2, 0.2)
        self._autoaugment = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
        self._erase = v2.RandomErasing(p=1.0)

    def __repr__(self) -> str:
        return (f"Preprocessor(size={self.size}, mode={self.mode!r}, policy={self.policy!r}, "
                f"channels_last={self.channels_last}, version={VERSION})")

    def __call__(self, batch: torch.Tensor, train: bool) -> torch.Tensor:
        """Preprocess ``batch`` (uint8 ``[B, 1|3, H, W]``, any device); augment only if ``train``."""
        x = _check_batch(batch)
        policy = self.policy if train else "none"
        if policy == "cifar_full":
            x = torch.stack([self._jitter(img) for img in x])
        elif policy == "deit":
            x = torch.stack([self._autoaugment(img) for img in x])
        if policy in _RRC_SCALE or policy == "fer":
            # Geometric augmentation resamples floats: normalise first, at native size (cheaper, and
            # exact since resampling weights sum to 1), downscaling large inputs once with antialiasing.
            x = self._normalise(x)
            if min(x.shape[-2:]) > self.size:
                x = TF.resize(x, [self.size], antialias=True)
            crop = _RRC_SCALE.get(policy)
            theta = _random_resized_crop_theta(x, crop) if crop else _random_affine_theta(x, self._crop_fraction(x))
            x = _resample(x, theta, self.size)
        else:
            # Resize in uint8, then normalise: pixel for pixel what the original study's per-image
            # PIL Resize -> ToTensor -> Normalize gives (torchvision's uint8 kernel matches PIL's).
            x = self._normalise(self._eval_geometry(x))
        if policy == "deit":
            flip = (torch.rand(len(x)) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            for i in torch.nonzero(torch.rand(len(x)) < 0.2).flatten().tolist():
                x[i] = self._erase(x[i])
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x.float() / 255 - mean) / std

    def _eval_geometry(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "resize":
            return TF.resize(x, [self.size, self.size], antialias=True)
        x = TF.resize(x, [round(self.size * 256 / 224)], antialias=True)
        return TF.center_crop(x, [self.size, self.size])

    def _crop_fraction(self, x: torch.Tensor) -> tuple[float, float]:
        """Fraction of the width and height that the eval geometry keeps (1 for plain resize)."""
        if self.mode == "resize":
            return 1.0, 1.0
        h, w = x.shape[-2:]
        scale = round(self.size * 256 / 224) / min(h, w)
        return min(1.0, self.size / (w * scale)), min(1.0, self.size / (h * scale))


def _check_batch(batch: torch.Tensor) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor) or batch.dtype != torch.uint8 or batch.ndim != 4:
        got = f"{type(batch).__name__} {getattr(batch, 'dtype', '')} {tuple(getattr(batch, 'shape', ()))}"
        raise ValueError(f"Preprocessor expects a uint8 image batch [B, C, H, W] (e.g. Split.images[i:j]; "
                         f"unsqueeze(0) a single image), got {got}")
    if batch.shape[1] == 1:
        return batch.expand(-1, 3, -1, -1)
    if batch.shape[1] != 3:
        raise ValueError(f"Preprocessor expects 1 (gray) or 3 (RGB) channels in dim 1, got shape {tuple(batch.shape)}")
    return batch


def _resample(x: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear affine resampling to ``size x size``; ``theta`` maps output to input coords in [-1, 1]."""
    grid = F.affine_grid(theta.to(x.device), [len(x), 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _flip_signs(n: int) -> torch.Tensor:
    return torch.where(torch.rand(n) < 0.5, -1.0, 1.0)


def _random_resized_crop_theta(x: torch.Tensor, scale: tuple[float, float]) -> torch.Tensor:
    """Per-sample RandomResizedCrop + horizontal flip (torchvision's sampling: 10 tries, else centre crop)."""
    n, (h, w), tries = len(x), x.shape[-2:], 10
    area = h * w * torch.empty(n, tries).uniform_(*scale)
    ratio = torch.exp(torch.empty(n, tries).uniform_(*_LOG_RATIO))
    cw, ch = torch.sqrt(area * ratio).round(), torch.sqrt(area / ratio).round()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.int().argmax(1)
    pick = torch.arange(n)
    cw, ch, found = cw[pick, first], ch[pick, first], ok.any(1)
    cw, ch = torch.where(found, cw, float(min(w, h))), torch.where(found, ch, float(min(w, h)))
    top = torch.floor(torch.rand(n) * (h - ch + 1))
    left = torch.floor(torch.rand(n) * (w - cw + 1))
    top = torch.where(found, top, torch.floor((h - ch) / 2))
    left = torch.where(found, left, torch.floor((w - cw) / 2))
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cw / w * _flip_signs(n)
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    return theta


def _random_affine_theta(x: torch.Tensor, crop: tuple[float, float], degrees: float = 15.0,
                         shift: float = 0.1, zoom: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """Per-sample rotation, shift, zoom and flip of the image, then keep the central ``crop`` fraction."""
    n, (h, w) = len(x), x.shape[-2:]
    angle = torch.deg2rad(torch.empty(n).uniform_(-degrees, degrees))
    s = torch.empty(n).uniform_(*zoom)
    tx, ty = torch.empty(n).uniform_(-shift, shift) * 2, torch.empty(n).uniform_(-shift, shift) * 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Output coords u -> input coords: D^-1 R^-1 D u / s - shift, with D = diag(w, h) (pixel aspect).
    fx, fy = crop[0] * _flip_signs(n), crop[1]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos / s * fx
    theta[:, 0, 1] = sin * h / w / s * fy
    theta[:, 1, 0] = -sin * w / h / s * fx
    theta[:, 1, 1] = cos / s * fy
    theta[:, 0, 2] = -(cos * tx + sin * h / w * ty) / s
    theta[:, 1, 2] = -(-sin * w / h * tx + cos * ty) / s
    return theta
