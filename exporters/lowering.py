"""Lowering a checked fp32 component to fp16 or int8 inside an export, with its quality measured
against the fp32 graph (per component) and against the fp32 pipeline (PSNR)."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from exporters.onnx_io import save_onnx
from exporters.profile import Profile
from exporters.specs import ComponentSpec, sample_inputs
from exporters.weights import save_graph
from runtime.errors import ExportError, format_table

log = logging.getLogger(__name__)

FP32_DIR = ".fp32"  # fp32 sources of lowered components, kept only while the export runs


def lower_precision(spec: ComponentSpec, tmp: Path, profile: Profile, precision: str, calibration, ranges, *,
                    upcast_attention: bool, int8_target: str, external_data_threshold: int,
                    keep_external=frozenset()) -> dict[str, Any]:
    """Replace tmp/<component>/model.onnx (fp32, checked) with its fp16 or int8 graph, measure it
    against the fp32 graph on held-out inputs and refuse it below the quality gate. The fp32 graph
    moves to tmp/.fp32/<component>/ for the pipeline comparison."""
    import onnx

    from exporters import precision as prec
    from exporters.quality import check_gate, compare_graphs

    name = spec.name
    fp32_dir = tmp / FP32_DIR / name
    fp32_dir.parent.mkdir(exist_ok=True)
    (tmp / name).rename(fp32_dir)
    (tmp / name).mkdir()
    fp32_path, out_path = fp32_dir / "model.onnx", tmp / name / "model.onnx"
    entry: dict[str, Any] = {}
    if precision == "fp16":
        log.info("%s: converting to fp16 (kept fp32: ops %s, modules %s, softmax %s)", name,
                 list(profile.fp16.keep_fp32_ops), list(profile.fp16.keep_fp32_modules), profile.fp16.keep_fp32_softmax)
        model = prec.convert_fp16_file(fp32_path, profile.fp16, upcast_attention)
        prec.check_strongly_typed(model, name)
        save_graph(model, out_path, fp32_dir, external_data_threshold, keep_external=keep_external)
        del model
        held_out = [sample_inputs(spec, {t.name: ranges[t.name]["opt"] for t in spec.inputs}, 1000 + k) for k in range(4)]
        entry["fp16"] = asdict(profile.fp16)
    else:
        recipe = profile.int8.recipe if profile.int8.recipe != "auto" else int8_target
        calibrate_on, held_out = split_calibration(calibration)
        # GPU targets mix int8 with fp16: quantizing the fp16 graph gives fp16 scales, so Q/DQ sit
        # directly on fp16 tensors. On CPU fp16 only costs time, so ort-cpu quantizes the fp32 graph.
        base = "fp16" if recipe == "tensorrt" else "fp32"
        source_path = fp32_path
        if base == "fp16":
            source_path = fp32_dir / "model.fp16.onnx"
            model = prec.convert_fp16_file(fp32_path, profile.fp16, upcast_attention)
            save_graph(model, source_path, fp32_dir, external_data_threshold)
            del model
        log.info("%s: quantizing to int8 (%s recipe, over %s) from %d recorded inputs; excluded modules %s", name,
                 recipe, base, len(calibrate_on), list(profile.int8.exclude_modules))
        prec.quantize_int8(source_path, out_path, calibrate_on, recipe, profile.int8.exclude_modules)
        if recipe == "tensorrt":
            model = prec.dedicate_qdq_pairs(onnx.load(str(out_path)))
            problems = prec.qdq_problems(model)
            if problems:
                raise ExportError(f"{name}: the int8 graph breaks TensorRT's Q/DQ rules:\n"
                                  + format_table(["node", "rule", "found"], problems[:20]))
            prec.check_strongly_typed(model, name)
            save_onnx(model, out_path, external_data_threshold)
        entry["int8"] = asdict(profile.int8) | {"recipe": recipe, "base": base, "calibration_inputs": len(calibrate_on)}
    measured = compare_graphs(fp32_path, out_path, held_out, [t.name for t in spec.outputs])
    for output, m in measured.items():
        log.info("%s: %s vs fp32 on %d held-out inputs: %s cosine %.5f, max |err| %.3g", name, precision,
                 m["samples"], output, m["cosine"], m["max_abs_err"])
    check_gate(name, precision, measured,
               "Keep more of it in fp32 ([fp16] keep_fp32_modules / [int8] exclude_modules in the profile)")
    entry["quality"] = measured
    return entry


def split_calibration(per_prompt):
    """Calibrate on all prompts but the last eighth (at least one prompt), which is held out."""
    held = max(1, len(per_prompt) // 8) if len(per_prompt) > 1 else 0
    calibrate = [s for p in per_prompt[: len(per_prompt) - held] for s in p]
    held_out = [s for p in per_prompt[len(per_prompt) - held:] for s in p] or calibrate[-4:]
    return calibrate, held_out


def pipeline_quality(tmp: Path, export: dict[str, Any], profile: Profile, task: str) -> dict[str, Any]:
    """PSNR of the exported graphs' images against the same pipeline with fp32 graphs, both run
    as ONNX Runtime CPU engines straight from the export folder; and, for a model with a judge
    (exporters/judges.py), the judge's figures of both (e.g. digit accuracy of int8 against fp32)."""
    from exporters.judges import judge_for
    from exporters.quality import pipeline_judged, pipeline_psnr
    from runtime.manifest import ORT_CPU_BACKEND, component_entry, manifest_from_dict, manifest_record

    def manifest(fp32: bool):
        files = {n: f"{FP32_DIR}/{c['onnx']}" if fp32 and c["precision"] != "fp32" else c["onnx"]
                 for n, c in export["components"].items()}
        components = {n: component_entry(c, file=files[n]) for n, c in export["components"].items()}
        return manifest_from_dict(tmp, manifest_record(export, backend=ORT_CPU_BACKEND, components=components))

    fp32, exported = manifest(fp32=True), manifest(fp32=False)
    judge = judge_for(export["model"]["source"])
    prompts = {"prompts": (judge.prompts[0][0], judge.prompts[-1][0])} if judge else {}  # prompts the model knows
    quality = {"pipeline": pipeline_psnr(fp32, exported, profile.height.opt, profile.width.opt, task, **prompts)}
    if judge is not None:
        quality["judged"] = pipeline_judged(fp32, exported, judge, profile.height.opt, profile.width.opt, task)
    return quality
