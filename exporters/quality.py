"""Quality of a lower-precision graph against its fp32 source: per component (max |err|, cosine on
held-out inputs) and for the whole pipeline (PSNR of final images on fixed prompts and seeds)."""
from __future__ import annotations

import gc
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from runtime.errors import ToleranceError, format_table
from runtime.numerics import COSINE_GATES, cosine, psnr

log = logging.getLogger(__name__)

PSNR_PROMPTS = ("a photograph of an astronaut riding a horse", "a lighthouse on a rocky coast in a storm")
PSNR_STEPS = 8
PSNR_SEED = 0


JUDGE_SEEDS = (0, 1)  # a judged set: every judge prompt at each of these seeds


__all__ = ["COSINE_GATES", "check_gate", "compare_graphs", "cosine", "pipeline_judged", "pipeline_psnr", "psnr"]


def compare_graphs(reference: Path, candidate: Path, samples: Sequence[Mapping[str, Any]], outputs: Sequence[str]) -> dict:
    """Run both graphs on ONNX Runtime (CPU) over `samples`, one graph after the other (never both
    graphs' weights in memory); max |err| and cosine per output."""
    import numpy as np
    import onnxruntime as ort

    def run(path: Path) -> dict[str, list]:
        options = ort.SessionOptions()
        # no second, repacked copy of the weights; full graph optimization, whose cast folding is the
        # cheapest way to run an fp16 graph on a CPU (fp32 kernels: measured 8.1 GB against 10.0 GB
        # with basic optimization for SD 1.5's UNet)
        options.add_session_config_entry("session.disable_prepacking", "1")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        results = [session.run(list(outputs), dict(sample)) for sample in samples]
        return {o: [r[k] for r in results] for k, o in enumerate(outputs)}

    want, got = run(reference), run(candidate)
    result = {}
    for o in outputs:
        a, b = np.concatenate([x.ravel() for x in want[o]]), np.concatenate([x.ravel() for x in got[o]])
        result[o] = {"max_abs_err": float(np.max(np.abs(a - b))), "cosine": cosine(a, b), "samples": len(samples)}
    return result


def check_gate(component: str, precision: str, measured: Mapping[str, Mapping[str, float]], hint: str) -> None:
    gate = COSINE_GATES[precision]
    failing = [(o, m["cosine"], gate) for o, m in measured.items() if not m["cosine"] >= gate]
    if failing:
        raise ToleranceError(
            f"{component}: {precision} loses too much against fp32:\n"
            + format_table(["output", "cosine", "required"], failing) + f"\n{hint}"
        )


def pipeline_psnr(fp32_manifest, candidate_manifest, height: int, width: int, task: str = "text2img",
                  prompts: tuple[str, ...] = PSNR_PROMPTS) -> dict:
    """PSNR of final images, candidate engines against fp32 engines, same prompts and seeds."""
    import numpy as np
    import torch

    from runtime import families
    from runtime.pipeline import pipeline_from_manifest

    guidance = families.request_defaults(fp32_manifest)["guidance_scale"]
    images = []
    for manifest in (fp32_manifest, candidate_manifest):
        pipe = pipeline_from_manifest(manifest, task)
        pipe.set_progress_bar_config(disable=True)
        images.append(np.concatenate([
            pipe(p, height=height, width=width, num_inference_steps=PSNR_STEPS, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(PSNR_SEED + i), output_type="np").images
            for i, p in enumerate(prompts)
        ]))
        del pipe  # one pipeline's engines in memory at a time
        gc.collect()
    per_image = [psnr(a, b) for a, b in zip(*images)]
    finite = [v for v in per_image if v is not None]
    result = {"psnr_db": min(finite) if finite else None, "per_image_psnr_db": per_image,
              "prompts": list(prompts), "steps": PSNR_STEPS, "guidance_scale": guidance, "seed": PSNR_SEED,
              "size": [height, width]}
    log.info("pipeline PSNR against fp32 engines: %s dB (worst of %d images)",
             "identical" if result["psnr_db"] is None else f"{result['psnr_db']:.1f}", len(per_image))
    return result


def pipeline_judged(fp32_manifest, candidate_manifest, judge, height: int, width: int, task: str = "text2img") -> dict:
    """The judge's figures (e.g. digit accuracy) of the candidate engines and of fp32 engines, on the
    same prompts and seeds, at the family's default steps and guidance."""
    from exporters.judges import judged_images
    from runtime import families
    from runtime.pipeline import pipeline_from_manifest

    defaults = families.request_defaults(fp32_manifest)
    batch = int(fp32_manifest.profile["shapes"]["batch"][2])
    result = {"judge": judge.name, "steps": defaults["steps"], "guidance_scale": defaults["guidance_scale"],
              "size": [height, width]}
    for label, manifest in (("fp32", fp32_manifest), ("exported", candidate_manifest)):
        pipe = pipeline_from_manifest(manifest, task)
        pipe.set_progress_bar_config(disable=True)
        result[label] = judged_images(pipe, judge, JUDGE_SEEDS, batch, height=height, width=width,
                                      num_inference_steps=defaults["steps"], guidance_scale=defaults["guidance_scale"])
        del pipe
        gc.collect()
    log.info("%s: %.1f%% with these engines, %.1f%% with fp32 engines (%d images)", judge.name,
             100 * result["exported"]["accuracy"], 100 * result["fp32"]["accuracy"], result["fp32"]["images"])
    return result
