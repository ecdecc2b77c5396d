"""`kiln bench DIR --schedulers`: each scheduler at each step count, seconds per image against a
quality figure. For a model with a judge (exporters/judges.py, e.g. `digits`' classifier) the
figure is the judge's: prompt accuracy and Fréchet distance over every judge prompt at two seeds.
For any other model it is PSNR against a many-step image of the reference scheduler (DDIM).

Seconds are one image's (batch 1, after a warm-up at that step count); the quality set runs in
calls of the profile's max batch, each image with its own seeded generator."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from kiln.text import plural
from runtime.errors import KilnError

log = logging.getLogger(__name__)

SWEEP_SCHEDULERS = ("ddim", "euler-a", "dpm++2m-karras", "unipc", "lcm")
STEP_COUNTS = (5, 10, 20, 30)  # PSNR against a reference
JUDGED_STEP_COUNTS = (1, 2, 4, 8, 20, 50)  # the seed's journey spans 50 steps to 1


def skip_reason(name: str, saved: str, allowed: tuple[str, ...] | None) -> str | None:
    from runtime.schedulers import SCHEDULERS

    class_name = SCHEDULERS[name][0]
    if allowed is not None and class_name not in allowed:
        return f"this model's loop runs only {', '.join(allowed)}"
    if name == "lcm" and saved != "LCMScheduler":
        return "needs an LCM-distilled model (its saved scheduler is LCMScheduler)"
    return None


def scheduler_sweep(folder: Path, step_counts=None, reference_steps: int = 50, options=None) -> dict:
    """Each scheduler at each step count: seconds per image, and the judge's figures or PSNR."""
    import torch

    from exporters.judges import judge_for, judged_images
    from exporters.quality import JUDGE_SEEDS
    from kiln.bench.run import BenchError, BenchOptions
    from runtime import families
    from runtime.numerics import psnr
    from runtime.pipeline import load_pipeline
    from runtime.schedulers import scheduler_from_name

    options = options or BenchOptions(baseline="none")
    folder = Path(folder)
    try:
        pipe = load_pipeline(folder)
    except KilnError as exc:
        raise BenchError(f"cannot benchmark {folder}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    manifest = pipe.manifest
    family = families.get(manifest.family)
    judge = judge_for(manifest.model["source"])
    shapes = manifest.profile["shapes"]
    size = dict(height=options.height or shapes["height"][1], width=options.width or shapes["width"][1])
    guidance = families.request_defaults(manifest)["guidance_scale"]
    prompt = judge.prompts[0][0] if judge else options.prompt
    step_counts = tuple(step_counts or (JUDGED_STEP_COUNTS if judge else STEP_COUNTS))
    base_config = pipe.scheduler.config
    saved = type(pipe.scheduler).__name__

    def use(name: str):
        pipe.scheduler = scheduler_from_name(name, base_config, family.schedulers)

    def one_image(steps: int):
        start = time.perf_counter()
        images = pipe(prompt, generator=torch.Generator("cpu").manual_seed(options.seed), num_inference_steps=steps,
                      guidance_scale=guidance, output_type="np", **size).images
        return images, time.perf_counter() - start

    reference = None
    report = {"artifact": str(folder), "model": manifest.model["source"], "size": [size["height"], size["width"]],
              "guidance_scale": guidance, "prompt": prompt, "judge": judge.name if judge else None}
    if judge is None:
        ref_name = "ddim" if skip_reason("ddim", saved, family.schedulers) is None else saved
        log.info("reference: %s, %s", ref_name, plural(reference_steps, "step"))
        use(ref_name)
        reference, ref_seconds = one_image(reference_steps)
        report["reference"] = {"scheduler": ref_name, "steps": reference_steps, "seconds": ref_seconds}
    else:
        report["seeds"] = list(JUDGE_SEEDS)
    rows, skipped = [], {}
    for name in SWEEP_SCHEDULERS:
        why = skip_reason(name, saved, family.schedulers)
        if why:
            skipped[name] = why
            continue
        use(name)
        for steps in step_counts:
            one_image(steps)  # warm-up at this step count
            images, seconds = one_image(steps)
            row = {"scheduler": name, "steps": steps, "seconds": seconds}
            if judge is None:
                row["psnr_db"] = psnr(reference, images)
                log.info("%s, %s: %.3f s, %.1f dB", name, plural(steps, "step"), seconds, row["psnr_db"] or float("inf"))
            else:
                figures = judged_images(pipe, judge, JUDGE_SEEDS, int(shapes["batch"][2]), num_inference_steps=steps,
                                        guidance_scale=guidance, **size)
                row.update(accuracy=figures["accuracy"], frechet=figures["frechet"], images=figures["images"])
                log.info("%s, %s: %.3f s, %s %.1f%%, Fréchet %.2f", name, plural(steps, "step"), seconds, judge.name,
                         100 * row["accuracy"], row["frechet"])
            rows.append(row)
    return {**report, "rows": rows, "skipped": skipped}
