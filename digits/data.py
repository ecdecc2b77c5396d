"""The data: scikit-learn's handwritten digits (1,797 images of 8x8, ink 0..16, no download),
upscaled to 64x64 RGB in [-1, 1] with light ink on a dark background as in the data, and the two
prompt forms the models are trained and judged on."""
from __future__ import annotations

import functools
from dataclasses import dataclass

IMAGE_SIZE = 64
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
HOLDOUT_SHARE = 0.25
SPLIT_SEED = 0


def prompt(digit: int, form: int) -> str:
    """Form 0: "a handwritten digit 3"; form 1: "the number three"."""
    return f"a handwritten digit {digit}" if form == 0 else f"the number {WORDS[digit]}"


def all_prompts() -> list[tuple[str, int]]:
    """(prompt, digit) for both forms of every digit."""
    return [(prompt(d, f), d) for f in (0, 1) for d in range(10)]


@dataclass(frozen=True)
class Digits:
    """8x8 images (float, 0..16) and labels, split into train and held-out parts."""

    train_images: object  # numpy [N, 8, 8]
    train_labels: object
    holdout_images: object
    holdout_labels: object


@functools.lru_cache(maxsize=1)
def load() -> Digits:
    import numpy as np

    from runtime.lazy import lazy_import

    data = lazy_import("sklearn.datasets", install="pip install 'kiln[digits]'  (scikit-learn)").load_digits()
    images, labels = data.images.astype(np.float32), data.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    cut = int(len(images) * (1 - HOLDOUT_SHARE))
    train, held = order[:cut], order[cut:]
    return Digits(images[train], labels[train], images[held], labels[held])


def upscale(images_8x8, size: int = IMAGE_SIZE):
    """[N, 8, 8] ink 0..16 → torch [N, 3, size, size] in [-1, 1] (bilinear, gray in RGB)."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(images_8x8, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return (x * 2 - 1).repeat(1, 3, 1, 1)


def downscale(images):
    """Images → the classifier's 8x8 ink grid (0..16): torch [N, 3, H, W] in [-1, 1], numpy
    [N, H, W, 3] in 0..1 (diffusers' output_type="np"), or a list of PIL images."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2) * 2 - 1
    gray = ((images.float().clamp(-1, 1) + 1) / 2).mean(dim=1, keepdim=True)
    return (F.adaptive_avg_pool2d(gray, 8)[:, 0] * 16.0).numpy()
