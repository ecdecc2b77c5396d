"""`kiln bench DIR --lora FILE`: what a LoRA swap costs on a refittable artifact, beside a full
rebuild (the export and build seconds the manifest recorded for every component) and one
pipeline call at the artifact's recommended steps and opt size."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from kiln.bench.run import BenchError


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def rebuild_seconds(manifest) -> float | None:
    """Σ export + build seconds of every component, as recorded when the artifact was built."""
    comps = manifest.data["components"].values()
    if not all("export_seconds" in c and "build_seconds" in c for c in comps):
        return None
    return sum(c["export_seconds"] + c["build_seconds"] for c in comps)


def lora_swap_bench(folder: Path, lora: str, runs: int = 5, steps: int | None = None) -> dict:
    import torch

    from runtime import families, load_pipeline
    from runtime.errors import NotSupportedError

    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    try:
        load = _timed(lambda: pipe.load_lora_weights(lora, adapter_name="bench"))
    except NotSupportedError as exc:
        raise BenchError(f"{folder}: {exc}") from exc
    refit = pipe.lora_refit
    swap, cached, base = [], [], []
    for i in range(runs):
        refit.cache.clear()  # merge from the base and swap, as for a set seen for the first time
        swap.append(_timed(lambda i=i: pipe.set_adapters("bench", 0.5 if i % 2 == 0 else 1.0)))
        base.append(_timed(lambda: pipe.set_adapters([])))
    pipe.set_adapters("bench", 1.0)
    for _ in range(runs):  # both sets merged already: only the engines change
        base.append(_timed(lambda: pipe.set_adapters([])))
        cached.append(_timed(lambda: pipe.set_adapters("bench", 1.0)))
    defaults = families.request_defaults(pipe.manifest)
    steps = steps or defaults["steps"]
    height, width = pipe.manifest.shape_range("height")[1], pipe.manifest.shape_range("width")[1]

    def call():
        pipe(prompt="a photograph of an astronaut riding a horse", num_inference_steps=steps, height=height,
             width=width, guidance_scale=defaults["guidance_scale"], output_type="np",
             generator=torch.Generator().manual_seed(0))

    call()  # warm-up
    calls = [_timed(call) for _ in range(max(1, min(runs, 3)))]
    weights = {c.name: len(c.params) for c in refit.components.values()}
    touched = {m: len(p) for m, p in pipe._lora_state()["loras"]["bench"].touched().items()}
    rebuild = rebuild_seconds(pipe.manifest)
    report = {
        "artifact": str(folder), "lora": str(lora), "backend": pipe.manifest.backend["name"],
        "refittable_weights": weights, "lora_weights": touched,
        "load_seconds": load, "swap_seconds": _stats(swap), "swap_cached_seconds": _stats(cached),
        "to_base_seconds": _stats(base),
        "pipeline_call": {"seconds": _stats(calls), "steps": steps, "height": height, "width": width},
        "rebuild_seconds": rebuild,
    }
    if rebuild:
        report["swap_over_rebuild"] = report["swap_seconds"]["median"] / rebuild
    return report


def format_lora_swap(report: dict) -> str:
    from runtime.errors import format_table

    call = report["pipeline_call"]
    rows = [
        ("load_lora_weights (read, merge, swap)", f"{report['load_seconds']:.3f}"),
        ("swap: merge from base + engines", f"{report['swap_seconds']['median']:.3f}"),
        ("swap: merged set cached", f"{report['swap_cached_seconds']['median']:.3f}"),
        ("back to the base weights", f"{report['to_base_seconds']['median']:.3f}"),
        (f"pipeline call ({call['steps']} steps, {call['height']}x{call['width']})", f"{call['seconds']['median']:.3f}"),
        ("rebuild (export + build, as recorded)", "-" if report["rebuild_seconds"] is None
         else f"{report['rebuild_seconds']:.1f}"),
    ]
    text = f"{report['artifact']} ({report['backend']}), LoRA {report['lora']}\n"
    text += "LoRA weights: " + ", ".join(f"{m} {n}" for m, n in report["lora_weights"].items()) + "\n"
    text += format_table(["what", "seconds (median)"], rows)
    if "swap_over_rebuild" in report:
        text += f"\nswap / rebuild: {100 * report['swap_over_rebuild']:.2f}%"
    return text
