"""`kiln bench DIR`: an artifact's pipeline against diffusers' PyTorch pipeline on the same weights,
measured side by side in one process, the two alternating run by run; and `--schedulers`, each
scheduler's time against its distance from a many-step reference.

Stages are timed inside real pipeline calls (the text encoder's calls, every UNet step, the VAE
decode), so end-to-end minus the stages is what the pipeline itself costs (scheduler, latents,
image post-processing). Numbers, not verdicts: nothing here passes or fails. The scheduler sweep
is kiln/bench/sweep.py, the speed journey kiln/bench/journey.py.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kiln.bench.measure import PeakMemory, StageTimer, matmul_peak_gflops, module_flops, synchronize
from runtime import families
from runtime.errors import KilnError, OptionsError, format_table
from runtime.requests import check_request

log = logging.getLogger(__name__)

BASELINES = ("torch", "torch-compile", "none")
STAGES = ("text_encoder", "unet_step", "vae_decode", "end_to_end")


class BenchError(OptionsError):
    """A benchmark cannot be run as asked (bad folder, different weights, bad options)."""


@dataclass(frozen=True)
class BenchOptions:
    baseline: str = "torch"
    batches: tuple[int, ...] = (1,)
    steps: int | None = None  # default: what the artifact recommends, else its family's (runtime.families)
    runs: int = 3
    height: int | None = None  # default: the profile's opt
    width: int | None = None
    guidance_scale: float | None = None  # default: as steps
    seed: int = 0
    prompt: str = "a photograph of an astronaut riding a horse"

    def __post_init__(self):
        problems = []
        if self.baseline not in BASELINES:
            problems.append(("baseline", self.baseline, ", ".join(BASELINES)))
        if not self.batches or any(b < 1 for b in self.batches):
            problems.append(("batch", ",".join(map(str, self.batches)), "positive integers, e.g. 1,2,4"))
        if self.steps is not None and self.steps < 1:
            problems.append(("steps", self.steps, ">= 1"))
        if self.runs < 1:
            problems.append(("runs", self.runs, ">= 1"))
        if problems:
            raise BenchError("invalid benchmark options:\n" + format_table(["option", "given", "allowed"], problems))


# ---- the benchmark --------------------------------------------------------------------------------


@dataclass
class _Contender:
    label: str
    pipe: Any
    timer: StageTimer
    memory: PeakMemory
    runs: list[dict] = field(default_factory=list)


def _open(folder: Path, options: BenchOptions):
    """The engine pipeline, and the model source with its PyTorch pipeline on the same weights
    (None where the model is not available here)."""
    from runtime.manifest import load_manifest
    from runtime.pipeline import load_pipeline

    try:
        manifest = load_manifest(folder)
    except KilnError as exc:
        raise BenchError(f"cannot benchmark {folder}: {exc}") from exc
    engine = load_pipeline(folder)
    engine.set_progress_bar_config(disable=True)
    device = engine.unet.device
    source = _model_source(manifest)
    torch_pipe = None
    if source is not None:
        torch_pipe = source.load_pipeline()
        fuse_recorded_loras(torch_pipe, manifest)
        torch_pipe.set_progress_bar_config(disable=True)
        torch_pipe.to(device)
        torch_pipe.scheduler = type(engine.scheduler).from_config(engine.scheduler.config)
    if options.baseline != "none" and torch_pipe is None:
        raise BenchError(f"the baseline needs the PyTorch model {manifest.model['source']!r}, which is not "
                         "available here; pass --baseline none")
    return manifest, engine, source, torch_pipe, device


def _model_source(manifest):
    from exporters.source import open_source

    model = manifest.model
    try:
        source = open_source(model["source"])
    except KilnError as exc:
        log.warning("PyTorch model %s unavailable (%s); no baseline and no FLOP count", model["source"], exc)
        return None
    if source.weights_sha256 != model["weights_sha256"]:
        raise BenchError(
            f"{model['source']} now has weights {source.weights_sha256[:12]}…, and the artifact was built from "
            f"{model['weights_sha256'][:12]}…: a comparison would not be on the same weights. Rebuild the artifact"
        )
    return source


def fuse_recorded_loras(torch_pipe, manifest) -> None:
    """The baseline gets the LoRAs the engines were built with, at their scales (the same files:
    a LoRA whose file changed since is refused)."""
    recorded = manifest.model.get("loras") or []
    if not recorded:
        return
    from exporters.lora import fuse_loras, resolve_loras

    loras = resolve_loras(tuple((r["source"], r["scale"]) for r in recorded))
    changed = [r["source"] for r, lora in zip(recorded, loras) if lora.sha256 != r["sha256"]]
    if changed:
        raise BenchError(f"LoRA {', '.join(changed)} changed since the artifact was built: a comparison would not be "
                         "on the same weights. Rebuild the artifact")
    fuse_loras(torch_pipe, loras)


def denoiser_flops(source, torch_pipe, manifest, axes: dict[str, int]) -> int:
    """FLOPs of one denoiser call at these axis values, traced through the family's own wrapper."""
    import torch

    from exporters.specs import sample_inputs
    from runtime.shapes import eval_dims

    family = source.family
    spec = family.component_specs(source.dims)[family.denoiser]
    info = manifest.components[family.denoiser]
    shapes = {t.name: list(eval_dims(t.dims, axes)) for t in info.inputs}
    device = next(torch_pipe.unet.parameters()).device
    inputs = sample_inputs(spec, shapes, seed=0)
    return module_flops(spec.wrap(torch_pipe), *(torch.from_numpy(inputs[t.name]).to(device) for t in spec.inputs))


def _call(contender: _Contender, kwargs: dict, seed: int):
    import torch

    contender.timer.reset()
    generator = torch.Generator("cpu").manual_seed(seed)
    with contender.memory.measure():
        start = time.perf_counter()
        images = contender.pipe(generator=generator, **kwargs).images
        synchronize(contender.timer.device)
        seconds = time.perf_counter() - start
    t = contender.timer.times
    return images, {
        **{name: sum(t[name]) for name in contender.timer.text_encoders},
        "unet_step": statistics.mean(t["unet"]) if t["unet"] else 0.0,
        "unet_total": sum(t["unet"]),
        "unet_calls": len(t["unet"]),
        "vae_decode": sum(t["vae_decode"]),
        "end_to_end": seconds,
    }


def _summary(runs: list[dict], batch: int, flops: int | None, memory: PeakMemory) -> dict:
    texts = [k for k in runs[0] if k.startswith("text_encoder")]  # one stage per text encoder (SDXL: two)
    med = {k: statistics.median(r[k] for r in runs) for k in (*texts, "unet_step", "unet_total", "vae_decode",
                                                               "end_to_end")}
    # per run: the stages are timed inside that run's call, so their sum never exceeds it
    sums = [sum(r[k] for k in texts) + r["unet_total"] + r["vae_decode"] for r in runs]
    return {
        "latency_s": {k: med[k] for k in (*texts, *STAGES[1:])},
        "latency_per_image_s": med["end_to_end"] / batch,
        "throughput_images_per_s": batch / med["end_to_end"],
        "stage_sum_s": statistics.median(sums),
        "overhead_fraction": statistics.median((r["end_to_end"] - t) / r["end_to_end"] for r, t in zip(runs, sums)),
        "unet_calls": runs[0]["unet_calls"],
        "spread_end_to_end_s": [min(r["end_to_end"] for r in runs), max(r["end_to_end"] for r in runs)],
        "gflops_per_s": None if flops is None else flops / med["unet_step"] / 1e9,
        "peak_memory_bytes": memory.peak,
    }


def run_bench(folder: Path, options: BenchOptions = BenchOptions()) -> dict:
    """Measure the artifact's pipeline (and the baseline) at every batch size; return the report."""
    import numpy as np
    import torch

    folder = Path(folder)
    manifest, engine, source, torch_pipe, device = _open(folder, options)
    defaults = families.request_defaults(manifest)
    options = replace(options, steps=defaults["steps"] if options.steps is None else options.steps,
                      guidance_scale=defaults["guidance_scale"] if options.guidance_scale is None else options.guidance_scale)
    baseline = torch_pipe if options.baseline != "none" else None
    shapes = manifest.profile["shapes"]
    height, width = options.height or shapes["height"][1], options.width or shapes["width"][1]
    for batch in options.batches:
        check_request(manifest, height=height, width=width, batch=batch)
    factor = manifest.data["dims"]["vae_scale_factor"]
    cfg = manifest.data["dims"].get("guidance_batch", 2) if options.guidance_scale > 1 else 1  # 1: LCM, Turbo
    flops = {b: None if source is None else denoiser_flops(
        source, torch_pipe, manifest, {"unet_batch": cfg * b, "batch": b, "latent_height": height // factor,
                                       "latent_width": width // factor}) for b in options.batches}
    if options.baseline == "torch-compile":
        log.info("compiling the baseline UNet with torch.compile (the warm-up pays for it)")
        baseline.unet = torch.compile(baseline.unet)
    contenders = [_Contender("kiln", engine, StageTimer(engine, device), PeakMemory(device))]
    if baseline is not None:
        contenders.append(_Contender(options.baseline, baseline, StageTimer(baseline, device), PeakMemory(device)))
    peak = matmul_peak_gflops(device)
    log.info("fp32 matmul peak here: %.0f GFLOP/s", peak)
    report: dict[str, Any] = {
        "artifact": str(folder),
        "model": manifest.model["source"],
        "backend": manifest.backend["name"],
        "device": str(device),
        "precision": {n: c.precision for n, c in manifest.components.items()},
        "baseline": options.baseline,
        "scheduler": type(engine.scheduler).__name__,
        "size": [height, width],
        "steps": options.steps,
        "runs": options.runs,
        "guidance_scale": options.guidance_scale,
        "torch_threads": torch.get_num_threads(),
        "matmul_peak_gflops": peak,
        "batches": [],
    }
    for batch in options.batches:
        kwargs = dict(prompt=[options.prompt] * batch, negative_prompt=[""] * batch, height=height, width=width,
                      num_inference_steps=options.steps, guidance_scale=options.guidance_scale, output_type="np")
        log.info("batch %d: warm-up", batch)
        first = {}
        for c in contenders:
            c.runs = []
            c.memory.peak = 0
            first[c.label] = _call(c, kwargs, options.seed)[0]
        for r in range(options.runs):
            for c in contenders:  # alternating, run by run
                c.runs.append(_call(c, kwargs, options.seed)[1])
            log.info("batch %d: run %d/%d: %s", batch, r + 1, options.runs,
                     ", ".join(f"{c.label} {c.runs[-1]['end_to_end']:.2f} s" for c in contenders))
        entry: dict[str, Any] = {
            "batch": batch,
            "unet_flops_per_step": flops[batch],
            **{c.label: _summary(c.runs, batch, flops[batch], c.memory) for c in contenders},
        }
        if baseline is not None:
            ours, theirs = entry["kiln"]["latency_s"], entry[options.baseline]["latency_s"]
            entry["speedup"] = {k: theirs[k] / ours[k] for k in ours if ours[k] > 0}
            entry["max_pixel_diff"] = float(np.abs(first["kiln"] - first[options.baseline]).max())
        report["batches"].append(entry)
    return report
