"""MODEL → a checked ONNX folder: trace each component, run the graph passes, check against PyTorch.

The export folder (`kiln export MODEL --out DIR`) is portable: engines for any backend and GPU are
built from it without torch. Layout:
    export.json                  what was exported, from what, and how well it matched PyTorch
    <component>/model.onnx(.data)
    reference/<component>.npz    opt-shape inputs and PyTorch outputs, for build-time parity
    tokenizer/  scheduler/       as saved by diffusers
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from exporters.calibrate import calibration_prompts
from exporters.check import POINTS, check_against_torch, parity_table
from exporters.controlnet import attach, controlnet_bytes, resolve_controlnets, with_controlnets
from exporters.dims import ModelDims
from exporters.lora import fuse_loras, resolve_loras
from exporters.lowering import FP32_DIR, lower_precision, pipeline_quality
from exporters.onnx_io import EXTERNAL_DATA_THRESHOLD
from exporters.passes import PassContext, run_passes
from exporters.profile import Profile, bind_family
from exporters.refit import WEIGHTS_FILE, base_values, record_refit, refit_modules, refit_params
from exporters.source import ModelSource
from exporters.specs import tensor_ranges
from exporters.trace import onnx_from_torch
from exporters.weights import save_graph
from runtime.controlnet_names import controlnet_names
from runtime.errors import ExportError
from runtime.files import atomic_folder, folder_checksums, refuse_foreign
from runtime.version import __version__

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1
TRACE_DIR = ".trace"  # torch.onnx's output, read from while a component's graph is written
EXPORT_FILE = "export.json"


@dataclass(frozen=True)
class ExportOptions:
    exporter: str = "dynamo"  # "dynamo" (torch.onnx default) | "torchscript"
    opset: int | None = None  # None: the exporter's default (20 for dynamo, 17 for torchscript)
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD  # weight bytes above which .data is written
    seed: int = 0
    components: tuple[str, ...] | None = None  # None: every component of the model's family
    # Profile points at which each graph is compared with PyTorch. At "max", large models need memory:
    # an unfused attention holds batch x heads x tokens^2 scores (SD 2.1 at 1024^2, batch 8
    # under guidance: about 43 GB), so a small machine may check ("min", "opt") and say so.
    check_points: tuple[str, ...] = POINTS
    precision: str | None = None  # --precision: overrides the profile for every component (see Profile.with_precision)
    calibration_prompts: str | None = None  # --calibration-prompts FILE
    int8_target: str = "tensorrt"  # recipe when the profile says recipe = "auto": the build target's
    loras: tuple[tuple[str, float], ...] = ()  # --lora FILE_OR_HUB_ID[:SCALE]: fused after the profile's own
    refit: bool = False  # --refit refit: record the LoRA-loadable components' weights (exporters/refit.py)
    controlnets: tuple[str, ...] = ()  # --controlnet FOLDER_OR_HUB_ID: after the profile's own, one engine each

    def __post_init__(self):
        bad = [p for p in self.check_points if p not in POINTS] or ([] if self.check_points else ["(none)"])
        if bad:
            raise ExportError(f"check points must be a non-empty subset of {', '.join(POINTS)}; got {', '.join(bad)}")
        if self.exporter not in ("dynamo", "torchscript"):
            raise ExportError(f"exporter must be 'dynamo' or 'torchscript', got {self.exporter!r}")
        if self.refit and self.exporter != "dynamo":
            raise ExportError("refittable exports (--refit refit) need the dynamo exporter: the TorchScript exporter "
                              "folds weight transposes under new names before kiln can record them; drop --exporter torchscript")

    def components_of(self, source: ModelSource, profile: Profile | None = None) -> tuple[str, ...]:
        """The components to export: those asked for, which must be the family's (and the resolved
        profile's ControlNets), or all of them."""
        valid = model_components(source.family, profile)
        if self.components is None:
            return valid
        unknown = [c for c in self.components if c not in valid]
        if unknown:
            raise ExportError(f"unknown components {unknown}; valid for {source.family.name} models: {', '.join(valid)}")
        return self.components


def model_components(family, profile: Profile | None) -> tuple[str, ...]:
    """The family's components, then one per ControlNet of the profile (controlnet_0, ...); a family
    without a ControlNet pipeline refuses ControlNets."""
    count = len(profile.controlnets) if profile is not None else 0
    if count and "controlnet" not in family.tasks:
        raise ExportError(f"{family.name} models have no ControlNet pipeline in kiln (ControlNets fit the sd and sdxl "
                          "families); drop --controlnet / [model] controlnets")
    return (*family.components, *controlnet_names(count))


def export_key(source: ModelSource, profile: Profile, options: ExportOptions) -> str:
    """Content hash of everything an export depends on: weights, profile, options, tool versions."""
    import onnx
    import torch

    profile = _resolved(source, profile, options)
    identity = {
        "weights": source.weights_sha256,
        "loras": [lora.sha256 for lora in resolve_loras(profile.loras)],
        **({"controlnets": [c.sha256 for c in resolve_controlnets(profile.controlnets)]} if profile.controlnets else {}),
        "profile": profile.to_dict() | {"name": None},
        "calibration": _calibration_prompts(source, profile, options),
        "options": _identity_options(source, profile, options),
        "versions": {"kiln": __version__, "torch": torch.__version__, "onnx": onnx.__version__},
        "format": EXPORT_FORMAT,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _resolved(source: ModelSource, profile: Profile, options: ExportOptions) -> Profile:
    """The profile bound to the model's family (a no-op when resolve_model did it), at --precision."""
    family = source.family
    profile = profile.with_controlnets(options.controlnets)
    bound = bind_family(profile, model_components(family, profile), family.denoiser).keeping_fp32(source.keep_fp32)
    return bound.with_precision(options.precision).with_loras(options.loras)


def export_dims(source: ModelSource, profile: Profile) -> ModelDims:
    """The model's dims as this profile builds them: a UNet built for guidance off sees one input per image."""
    return source.dims if profile.generation.guidance else replace(source.dims, guidance_batch=1)


def _identity_options(source: ModelSource, profile: Profile, options: ExportOptions) -> dict[str, Any]:
    """The options that change what an export writes: precision is in the resolved profile and the
    prompts' text in "calibration"; the int8 target matters only where something is int8."""
    identity = asdict(options) | {"components": list(options.components_of(source, profile))}
    for key in ("precision", "calibration_prompts", "loras", "controlnets"):
        identity.pop(key)
    if not identity["refit"]:
        identity.pop("refit")  # keys of exports made before refit existed stay valid
    if not any(profile.precision_of(c) == "int8" for c in identity["components"]):
        identity.pop("int8_target")
    return identity


def export_model(source: ModelSource, profile: Profile, out_dir: Path, options: ExportOptions = ExportOptions(),
                 key: str | None = None) -> Path:
    """Export every component of `source` into `out_dir`, written atomically."""
    import onnx
    import torch

    out_dir = Path(out_dir)
    keep = refuse_foreign(out_dir, EXPORT_FILE, "export folder")
    family = source.family
    key = key or export_key(source, profile, options)
    profile = _resolved(source, profile, options)
    names = options.components_of(source, profile)
    controlnets = resolve_controlnets(profile.controlnets)
    prompts = _calibration_prompts(source, profile, options)  # errors before any work
    loras = resolve_loras(profile.loras)
    scheduler_class(profile.generation)  # a bad name is refused before the model loads
    dims = export_dims(source, profile)
    log.info("loading %s (%s, %s family)", source.source, source.folder, family.name)
    pipe = source.load_pipeline()
    fuse_loras(pipe, loras)
    set_scheduler(pipe, profile.generation)
    attach(pipe, controlnets)
    specs = family.component_specs(dims)
    specs = with_controlnets(specs, dims, specs[family.denoiser].config_of(pipe), controlnets, family.denoiser)
    refittable = _refittable(pipe, specs, names, profile) if options.refit else ()
    # the model's attention upcast decides the fp16 softmax policy of every component
    upcast_attention = bool(specs[family.denoiser].config_of(pipe).get("upcast_attention", False))
    components: dict[str, Any] = {}
    needed = _export_bytes(source, profile, names) + 2 * controlnet_bytes(controlnets)
    with atomic_folder(out_dir, needed_bytes=needed, keep=keep) as tmp:
        for asset in family.assets:
            getattr(pipe, asset).save_pretrained(tmp / asset)
        calibration = None
        if prompts:
            log.info("calibrating int8 on %d prompts x %d steps (PyTorch, %dx%d)", len(prompts),
                     profile.int8.calibration_steps, profile.height.opt, profile.width.opt)
            calibration = family.record_calibration(pipe, specs[family.denoiser], prompts, profile,
                                                    profile.int8.calibration_steps, options.seed)
        for i, name in enumerate(names, 1):
            spec = specs[name]
            started = time.perf_counter()
            log.info("[%d/%d] %s: exporting with torch.onnx (%s)", i, len(names), name, options.exporter)
            ranges = tensor_ranges(spec, profile, dims)
            module, config = spec.wrap(pipe), spec.config_of(pipe)
            onnx_path = tmp / name / "model.onnx"
            onnx_path.parent.mkdir()
            traced = tmp / TRACE_DIR / name
            refit = {"names": refit_params(getattr(pipe, spec.module), module)} if name in refittable else None
            protected = frozenset(refit["names"]) if refit else frozenset()
            model = onnx_from_torch(spec, module, ranges, options, workdir=tmp, out_dir=traced, refit=refit)
            model = run_passes(model, PassContext(name, workdir=tmp, protected=protected))
            save_graph(model, onnx_path, traced, options.external_data_threshold, keep_external=protected)
            del model
            shutil.rmtree(traced)
            if refit:
                state = dict(getattr(pipe, spec.module).named_parameters())
                refit = record_refit(name, spec.module, refit["names"], refit["layouts"],
                                     lambda p, state=state: state[p].detach().numpy(), onnx_path)
            log.info("[%d/%d] %s: checking against PyTorch at %s", i, len(names), name, "/".join(options.check_points))
            last_use = all(specs[later].module != spec.module for later in names[i:])
            rows, reference = check_against_torch(spec, module, onnx_path, ranges, options.seed, options.check_points,
                                                  release=functools.partial(_release, pipe, spec.module, module)
                                                  if last_use else None)
            del module
            _save_reference(tmp / "reference" / f"{name}.npz", reference)
            seconds = time.perf_counter() - started
            log.info("[%d/%d] %s: done in %.1f s, max |err| %.3g", i, len(names), name, seconds,
                     max(r.max_abs_err for r in rows))
            log.debug("%s parity:\n%s", name, parity_table(rows))
            precision = profile.precision_of(name)
            lowered = {}
            if precision != "fp32":
                lowered = lower_precision(spec, tmp, profile, precision, calibration, ranges,
                                          upcast_attention=upcast_attention, int8_target=options.int8_target,
                                          external_data_threshold=options.external_data_threshold,
                                          keep_external=protected)
                if refit:  # the base weights again, as the lowered graph holds them (fp16)
                    graph_names = {graph: param for param, (graph, _) in refit["params"].items()}
                    layouts = {graph: layout for graph, layout in refit["params"].values()}
                    graph_names.update({f"unused:{p}": p for p in refit["unused"]})
                    refit = record_refit(name, spec.module, graph_names, layouts,
                                         base_values(tmp / FP32_DIR / name / WEIGHTS_FILE), onnx_path)
            components[name] = {
                "onnx": f"{name}/model.onnx",
                "files": folder_checksums(tmp / name),
                "inputs": [_tensor_entry(t, ranges) for t in spec.inputs],
                "outputs": [_tensor_entry(t, ranges) for t in spec.outputs],
                "config": config,
                "precision": precision,
                **lowered,
                "tolerance": {"atol": spec.atol, "rtol": spec.rtol},
                "parity": [r.to_dict() for r in rows],
                "export_seconds": round(seconds, 2),
                "reference": f"reference/{name}.npz",
                **({"refit": refit} if refit else {}),
            }
        manifest = {
            "kind": "kiln-export",
            "format_version": EXPORT_FORMAT,
            "kiln_version": __version__,
            "export_key": key,
            "model": {"source": source.source, "pipeline_class": source.pipeline_class, "family": family.name,
                      "weights_sha256": source.weights_sha256,
                      **({"pipeline_config": config} if (config := family.pipeline_config(source.folder)) else {}),
                      **({"loras": [lora.to_dict() for lora in loras]} if loras else {}),
                      **({"controlnets": [c.to_dict(n) for n, c in zip(controlnet_names(len(controlnets)), controlnets)]}
                         if controlnets else {})},
            "profile": profile.to_dict(),
            "dims": dims.to_dict(),
            "exporter": {"name": options.exporter, "opset": options.opset, "torch": torch.__version__,
                         "onnx": onnx.__version__},
            "assets": list(family.assets),
            "components": components,
        }
        task, needed = next(iter(family.tasks.items()))  # the family's main task (text-to-image)
        if any(c["precision"] != "fp32" for c in components.values()) and set(needed) <= set(components):
            manifest["quality"] = pipeline_quality(tmp, manifest, profile, task)
        shutil.rmtree(tmp / FP32_DIR, ignore_errors=True)
        shutil.rmtree(tmp / TRACE_DIR, ignore_errors=True)
        manifest["files"] = {f"{sub}/{rel}": sha for sub in (*family.assets, "reference")
                             for rel, sha in folder_checksums(tmp / sub).items()}
        (tmp / EXPORT_FILE).write_text(json.dumps(manifest, indent=2, default=_json_default), encoding="utf-8")
    log.debug("wrote %s", out_dir)
    return out_dir


def _refittable(pipe, specs, names, profile) -> tuple[str, ...]:
    """The components a refittable export records: those traced from a module diffusers loads
    LoRAs into. An int8 one is refused before any work (its weights are quantized with calibrated
    scales: a LoRA would need a recalibration, not a refit)."""
    modules = refit_modules(pipe)
    chosen = tuple(n for n in names if specs[n].module in modules)
    int8 = [n for n in chosen if profile.precision_of(n) == "int8"]
    if int8:
        raise ExportError(f"--refit refit cannot make int8 {', '.join(int8)} refittable (quantized weights with calibrated "
                          "scales need a recalibration, not a refit); build them fp16 or fp32 (--precision fp16)")
    if not chosen:
        raise ExportError(f"--refit refit: none of {', '.join(names)} is a module "
                          f"{type(pipe).__name__} loads LoRAs into ({', '.join(modules) or 'none'})")
    return chosen


def scheduler_class(generation):
    """The diffusers class the profile's [generation] scheduler names (None: keep the model's)."""
    if generation.scheduler is None:
        return None
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, generation.scheduler, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ExportError(f"[generation] scheduler = {generation.scheduler!r} is not a diffusers scheduler class; "
                          "use a name such as LCMScheduler, EulerAncestralDiscreteScheduler or DDIMScheduler")
    return cls


def set_scheduler(pipe, generation) -> None:
    """The profile's scheduler, made from the model's own scheduler config with the profile's
    overrides (what the artifact saves and the runtime loads); None keeps the model's."""
    cls = scheduler_class(generation)
    if cls is None:
        return
    scheduler, unused = cls.from_config(pipe.scheduler.config, return_unused_kwargs=True, **dict(generation.scheduler_config))
    unknown = sorted(set(unused) & set(dict(generation.scheduler_config)))
    if unknown:
        raise ExportError(f"[generation] scheduler_config sets {', '.join(unknown)}, which {generation.scheduler} does not "
                          f"take; its options: {', '.join(sorted(k for k in scheduler.config if not k.startswith('_')))}")
    pipe.scheduler = scheduler
    log.info("scheduler: %s%s", generation.scheduler,
             f" ({', '.join(f'{k}={v}' for k, v in generation.scheduler_config)})" if generation.scheduler_config else "")


def _export_bytes(source: ModelSource, profile: Profile, names) -> int:
    """Room an export needs: its graphs hold the weights once (twice while a lowered copy is made),
    and a component's trace is on disk twice (raw and optimized) while its graph is written."""
    lowered = any(profile.precision_of(n) != "fp32" for n in names)
    largest = max((sum(p.stat().st_size for p in (source.folder / c).rglob("*.safetensors"))
                   for c in source.family.folder_components), default=0)
    return int(source.weights_bytes * (2.5 if lowered else 1.5)) + 2 * largest + 2**20


def _calibration_prompts(source: ModelSource, profile: Profile, options: ExportOptions) -> list[str]:
    if not any(profile.precision_of(c) == "int8" for c in options.components_of(source, profile)):
        return []
    return calibration_prompts(profile, source.source.startswith("builtin:"), options.calibration_prompts)


def _release(pipe, attr: str, wrapper) -> None:
    """Drop the pipeline's `attr` module, and the tracing wrapper's hold on it, once no later
    component is traced from it: its weights are freed before ONNX Runtime loads the graph's."""
    import gc

    for child, _ in list(wrapper.named_children()):
        setattr(wrapper, child, None)
    setattr(pipe, attr, None)
    gc.collect()


def read_export(folder: Path) -> dict[str, Any]:
    """Read and minimally validate an export folder's export.json."""
    path = Path(folder) / EXPORT_FILE
    if not path.is_file():
        raise ExportError(f"{folder} is not an export folder: it has no {EXPORT_FILE}. Create one with `kiln export`")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("kind") != "kiln-export" or data.get("format_version", 0) > EXPORT_FORMAT:
        raise ExportError(
            f"{path} has kind {data.get('kind')!r} format {data.get('format_version')!r}; this kiln reads "
            f"kiln-export format <= {EXPORT_FORMAT}. Re-export with this version or upgrade kiln"
        )
    return data


def _save_reference(path: Path, arrays: dict[str, Any]) -> None:
    import numpy as np

    path.parent.mkdir(exist_ok=True)
    np.savez(path, **arrays)


def _tensor_entry(t, ranges) -> dict[str, Any]:
    return {"name": t.name, "dtype": t.dtype, "dims": list(t.dims), **ranges[t.name]}


def _json_default(value):
    """Configs may hold sets, tuples or paths; JSON gets lists and strings."""
    return list(value) if isinstance(value, (set, tuple)) else str(value)

