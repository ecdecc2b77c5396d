"""Quality judges: for a model that has one, a measure of its images that needs no reference image
and no download, e.g. `digits`' classifier (prompt accuracy and a Fréchet distance). Found by the
model source, as families are found by pipeline class; models without one are compared by PSNR
against a reference image instead (exporters/quality.py, `kiln bench --schedulers`)."""
from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# model source → the module defining JUDGE
JUDGE_MODULES = {"builtin:digits": "digits.metric", "builtin:digits-lcm": "digits.metric"}


@dataclass(frozen=True)
class Judge:
    """name: what the figures are called in tables ("digit accuracy").
    prompts: (prompt, label) pairs to generate from; a judged set is every prompt once per seed.
    score: (images, labels) → {"accuracy": share of images judged as their label, "frechet": the
        distance of their features from real data's, "images": how many}; images as diffusers'
        output_type="np" gives them ([N, H, W, 3] in 0..1)."""

    name: str
    prompts: tuple[tuple[str, Any], ...]
    score: Callable[[Any, Sequence[Any]], dict]


def judge_for(source: str) -> Judge | None:
    module = JUDGE_MODULES.get(source)
    return None if module is None else importlib.import_module(module).JUDGE


def judged_images(pipe, judge: Judge, seeds: Sequence[int], batch: int, **call) -> dict:
    """Every judge prompt once per seed through `pipe` (in calls of `batch` images, each image with
    its own seeded generator, so that the result does not depend on `batch`), scored."""
    jobs = [(p, label, seed * 1000 + i) for seed in seeds for i, (p, label) in enumerate(judge.prompts)]
    images = seeded_images(pipe, [(p, s) for p, _, s in jobs], batch, **call)
    result = judge.score(images, [label for _, label, _ in jobs])
    return {**result, "seeds": list(seeds)}


def seeded_images(pipe, jobs: Sequence[tuple[str, int]], batch: int, **call):
    """(prompt, seed) jobs through `pipe` in calls of `batch`, each image with its own generator
    (so the images do not depend on `batch`); numpy [N, H, W, 3] in 0..1."""
    import numpy as np
    import torch

    return np.concatenate([
        pipe([p for p, _ in jobs[i:i + batch]], generator=[torch.Generator("cpu").manual_seed(s) for _, s in jobs[i:i + batch]],
             output_type="np", **call).images
        for i in range(0, len(jobs), batch)])
