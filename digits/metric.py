"""Image quality with no download: a digit classifier trained on the same data (an RBF SVC on the
8x8 ink grid) gives, for generated images, the prompt accuracy (share classified as the prompted
digit) and a Fréchet distance between the classifier's features (its ten one-vs-rest decision
values) of generated and held-out real digits, as FID does with Inception features."""
from __future__ import annotations

import functools
from dataclasses import dataclass

from digits import data


@dataclass(frozen=True)
class Quality:
    accuracy: float  # share of images classified as the prompted digit
    frechet: float  # Fréchet distance to held-out real digits in the classifier's feature space
    images: int

    def to_dict(self) -> dict:
        return {"accuracy": round(self.accuracy, 4), "frechet": round(self.frechet, 3), "images": self.images}


@functools.lru_cache(maxsize=1)
def classifier():
    """The SVC, fitted on the training part (deterministic; about a second)."""
    from runtime.lazy import lazy_import

    SVC = lazy_import("sklearn.svm", install="pip install 'kiln[digits]'  (scikit-learn)").SVC
    digits = data.load()
    model = SVC(C=10.0, gamma=0.001, decision_function_shape="ovr")
    model.fit(digits.train_images.reshape(len(digits.train_images), -1), digits.train_labels)
    return model


def features(grid_8x8):
    return classifier().decision_function(grid_8x8.reshape(len(grid_8x8), -1))


def classify(images):
    """Images (see data.downscale for the accepted forms) → predicted digits (numpy)."""
    return classifier().predict(data.downscale(images).reshape(len(images), -1))


@functools.lru_cache(maxsize=1)
def _reference_stats():
    import numpy as np

    digits = data.load()
    feats = features(data.downscale(data.upscale(digits.holdout_images)))
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(feats) -> float:
    import numpy as np
    from scipy import linalg

    mu_r, cov_r = _reference_stats()
    mu, cov = feats.mean(axis=0), np.cov(feats, rowvar=False)
    root, _ = linalg.sqrtm(cov @ cov_r, disp=False)
    root = root.real
    return float(((mu - mu_r) ** 2).sum() + np.trace(cov + cov_r - 2 * root))


def quality(images, digits_prompted) -> Quality:
    """Prompt accuracy and Fréchet distance of generated `images` for the prompted digits."""
    import numpy as np

    grid = data.downscale(images)
    if len(grid) != len(digits_prompted):
        raise ValueError(f"{len(grid)} images but {len(digits_prompted)} prompted digits")
    flat = grid.reshape(len(grid), -1)
    predicted = classifier().predict(flat)
    accuracy = float((predicted == np.asarray(digits_prompted)).mean())
    return Quality(accuracy, frechet_distance(features(grid)), len(grid))


def holdout_accuracy(size: int = data.IMAGE_SIZE) -> float:
    """The classifier's accuracy on held-out real digits upscaled to `size` (what generated images are)."""
    digits = data.load()
    predicted = classify(data.upscale(digits.holdout_images, size))
    return float((predicted == digits.holdout_labels).mean())


def _score(images, labels) -> dict:
    return quality(images, labels).to_dict()


def _judge():
    from exporters.judges import Judge

    return Judge(name="digit accuracy", prompts=tuple(data.all_prompts()), score=_score)


JUDGE = _judge()
