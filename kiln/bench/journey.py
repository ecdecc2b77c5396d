"""`kiln bench DIR --journey LCM_DIR`: the inference guide's speed journey, measured on one model
side by side in one process. Its first stop is diffusers' own PyTorch pipeline with DDIM at 50
steps (the baseline); then kiln's engines with the same scheduler, DPM++ 2M Karras at 20 steps, and
the LCM distilled from the same model (LCM_DIR) at 4 steps and 1. Each stop: seconds per image
(batch 1, warmed up, the stops alternating run by run, median), its speed-up over the baseline,
and, for a model with a judge, the judge's figures (e.g. digit accuracy) on the same prompts and
seeds. (The guide's last stop, SDXL Turbo at 1 step, needs an SDXL model.)"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.text import plural
from runtime.errors import KilnError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stop:
    label: str
    runtime: str  # "kiln" or "diffusers (PyTorch)"
    scheduler: str
    steps: int
    pipe: Any
    guidance_scale: float


def journey_stops(folder: Path, lcm_folder: Path | None) -> list[Stop]:
    """The stops: the baseline and kiln's engines of `folder`, and kiln's LCM engines of `lcm_folder`."""
    from kiln.bench.run import BenchError, _model_source
    from runtime import families
    from runtime.manifest import load_manifest
    from runtime.pipeline import load_pipeline
    from runtime.schedulers import scheduler_from_name

    def engines(path: Path):
        try:
            pipe = load_pipeline(path)
        except KilnError as exc:
            raise BenchError(f"cannot benchmark {path}: {exc}") from exc
        pipe.set_progress_bar_config(disable=True)
        return pipe

    manifest = load_manifest(folder)
    if families.get(manifest.family).schedulers is not None:
        raise BenchError(f"{folder} is a {manifest.family} model; the journey starts from the model it was distilled "
                         "from (e.g. digits), and takes the LCM as --journey LCM_DIR")
    source = _model_source(manifest)
    if source is None:
        raise BenchError(f"the journey's baseline needs the PyTorch model {manifest.model['source']!r}, which is not "
                         "available here")
    guidance = families.request_defaults(manifest)["guidance_scale"]
    base = engines(folder)
    torch_pipe = source.load_pipeline()
    torch_pipe.set_progress_bar_config(disable=True)
    config = base.scheduler.config

    def scheduled(pipe, name):
        import copy

        pipe = copy.copy(pipe)  # a shallow copy: the same engines with their own scheduler
        pipe.scheduler = scheduler_from_name(name, config)
        return pipe

    stops = [Stop("DDIM 50", "diffusers (PyTorch)", "ddim", 50, scheduled(torch_pipe, "ddim"), guidance),
             Stop("DDIM 50", "kiln", "ddim", 50, scheduled(base, "ddim"), guidance),
             Stop("DPM++ 2M Karras 20", "kiln", "dpm++2m-karras", 20, scheduled(base, "dpm++2m-karras"), guidance)]
    if lcm_folder is not None:
        lcm_manifest = load_manifest(lcm_folder)
        if families.get(lcm_manifest.family).schedulers != ("LCMScheduler",):
            raise BenchError(f"--journey takes a latent consistency model's artifact; {lcm_folder} is a "
                             f"{lcm_manifest.family} model")
        lcm = engines(lcm_folder)
        lcm_guidance = families.request_defaults(lcm_manifest)["guidance_scale"]
        stops += [Stop("LCM 4", "kiln", "lcm", 4, lcm, lcm_guidance), Stop("LCM 1", "kiln", "lcm", 1, lcm, lcm_guidance)]
    return stops


def run_journey(folder: Path, lcm_folder: Path | None = None, runs: int = 5, seed: int = 0) -> dict:
    import torch

    from exporters.judges import judge_for, judged_images
    from exporters.quality import JUDGE_SEEDS
    from runtime.manifest import load_manifest

    folder = Path(folder)
    manifest = load_manifest(folder)
    stops = journey_stops(folder, lcm_folder)
    judge = judge_for(manifest.model["source"])
    shapes = manifest.profile["shapes"]
    size = dict(height=shapes["height"][1], width=shapes["width"][1])
    prompt = judge.prompts[0][0] if judge else "a photograph of an astronaut riding a horse"

    def one(stop: Stop) -> float:
        start = time.perf_counter()
        stop.pipe(prompt, num_inference_steps=stop.steps, guidance_scale=stop.guidance_scale,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **size)
        return time.perf_counter() - start

    for stop in stops:  # warm-up
        one(stop)
    seconds: dict[int, list[float]] = {i: [] for i in range(len(stops))}
    for r in range(runs):
        for i, stop in enumerate(stops):  # alternating, run by run
            seconds[i].append(one(stop))
        log.info("journey run %d/%d: %s", r + 1, runs, ", ".join(f"{s.label} ({s.runtime}) {seconds[i][-1]:.3f} s"
                                                               for i, s in enumerate(stops)))
    rows = []
    for i, stop in enumerate(stops):
        row = {"stop": stop.label, "runtime": stop.runtime, "scheduler": stop.scheduler, "steps": stop.steps,
               "guidance_scale": stop.guidance_scale, "seconds_per_image": statistics.median(seconds[i]),
               "spread_s": [min(seconds[i]), max(seconds[i])]}
        if judge is not None:
            figures = judged_images(stop.pipe, judge, JUDGE_SEEDS, int(shapes["batch"][2]),
                                    num_inference_steps=stop.steps, guidance_scale=stop.guidance_scale, **size)
            row.update(accuracy=figures["accuracy"], frechet=figures["frechet"], images=figures["images"])
            log.info("%s (%s): %s %.1f%%", stop.label, stop.runtime, judge.name, 100 * row["accuracy"])
        rows.append(row)
    baseline = rows[0]["seconds_per_image"]
    for row in rows:
        row["speedup"] = baseline / row["seconds_per_image"]
    return {"artifact": str(folder), "lcm_artifact": None if lcm_folder is None else str(lcm_folder),
            "model": manifest.model["source"], "size": [size["height"], size["width"]], "runs": runs,
            "torch_threads": torch.get_num_threads(), "judge": judge.name if judge else None,
            "seeds": list(JUDGE_SEEDS) if judge else None, "rows": rows}


def format_journey(report: dict) -> str:
    from runtime.errors import format_table

    judged = bool(report["judge"])
    rows = []
    for r in report["rows"]:
        row = [r["stop"], r["runtime"], f"{r['seconds_per_image'] * 1000:.1f}", f"x{r['speedup']:.1f}"]
        if judged:
            row += [f"{100 * r['accuracy']:.1f}", f"{r['frechet']:.2f}"]
        rows.append(row)
    head = ["stop", "runtime", "ms / image", "speed-up"] + (["accuracy %", "Fréchet"] if judged else [])
    text = (f"speed journey on {report['model']}, {report['size'][0]}x{report['size'][1]}, batch 1, median of "
            f"{plural(report['runs'], 'run')} alternating; speed-up over the first stop\n" + format_table(head, rows))
    if judged:
        text += f"\n{report['judge']} over {report['rows'][0]['images']} images per stop (seeds {report['seeds']})"
    return text


def plot_journey(report: dict, path: Path) -> None:
    from kiln.bench.report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['stop']}\n{r['runtime']}" for r in report["rows"]]
    ax.bar(range(len(labels)), [r["seconds_per_image"] * 1000 for r in report["rows"]])
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms per image (log scale)")
    if report["judge"]:
        for i, r in enumerate(report["rows"]):
            ax.annotate(f"{100 * r['accuracy']:.0f}%", (i, r["seconds_per_image"] * 1000), ha="center", fontsize=8,
                        xytext=(0, 3), textcoords="offset points")
    ax.set_title(f"{report['model']}: speed journey (labels: {report['judge'] or 'steps'})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
