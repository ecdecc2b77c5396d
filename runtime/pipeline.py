"""load_pipeline(folder): an artifact folder → a drop-in diffusers pipeline whose models are engines.

The manifest's model family picks the module that assembles the pipeline (runtime/families/);
this module checks the artifact, opens the engines on its backend and loads the tokenizer and
scheduler, for every family alike."""
from __future__ import annotations

import logging
from pathlib import Path

from runtime import families
from runtime.errors import ArtifactError
from runtime.integrity import check_artifact
from runtime.manifest import Manifest, load_manifest
from runtime.requests import check_request  # noqa: F401  (kept importable from here)

log = logging.getLogger(__name__)


def load_pipeline(folder: str | Path, task: str = "text2img", backend: str | None = None, verify: bool = True,
                  cuda_graphs: bool = True, weight_streaming_budget=None, controlnets=None):
    """Load an artifact folder as a pipeline called exactly like the diffusers pipeline of its
    family and task (for SD: StableDiffusionPipeline for task="text2img",
    StableDiffusionImg2ImgPipeline for task="img2img").

    Checks the manifest's schema, that every file it reads lies inside the folder and is listed,
    every file's checksum (verify=True) and the backend before any engine is created; each call is
    checked against the manifest's shape ranges before anything runs.

    TensorRT artifacts only: `cuda_graphs` captures each engine's enqueue per input shape and
    replays it; `weight_streaming_budget` (bytes, "auto", or {component: either}) keeps only that
    much of an engine's weights on the GPU (engines built with --weight-streaming).

    task="controlnet" (and "controlnet_img2img") return the family's diffusers ControlNet pipeline
    (StableDiffusion{,XL}ControlNetPipeline) over the artifact's ControlNet engines: all of them, or
    `controlnets` (names such as "controlnet_1", or indices), in that order."""
    manifest = load_manifest(folder)
    family = families.get(manifest.family)
    needed = family.components(task, manifest, controlnets)
    built_with = manifest.backend["name"]
    if backend is not None and backend != built_with:
        raise ArtifactError(
            f"{folder} holds {built_with} engines; backend={backend!r} cannot run them. "
            f"Load it with backend={built_with!r} or build another artifact with --backend {backend}"
        )
    missing = [c for c in needed if c not in manifest.components]
    if missing:
        raise ArtifactError(f"{folder} has no {', '.join(missing)} engine, which task {task!r} needs; rebuild with them")
    check_artifact(manifest, needed, assets=family.assets, verify=verify)
    return pipeline_from_manifest(manifest, task, cuda_graphs=cuda_graphs, weight_streaming_budget=weight_streaming_budget,
                                  controlnets=controlnets)


def pipeline_from_manifest(manifest: Manifest, task: str = "text2img", controlnets=None, **engine_options):
    """Assemble the pipeline from an already checked manifest (load_pipeline's second half; the
    exporter also uses it to compare precisions on ONNX files before any artifact exists)."""
    family = families.get(manifest.family)
    engines = open_engines(manifest, family.components(task, manifest, controlnets), **engine_options)
    try:
        pipe = family.assemble(task, manifest, engines)
        pipe._kiln_engines = engines  # what a LoRA swap refits (runtime/lora_api.py)
        return pipe
    except (KeyError, AttributeError, TypeError, ValueError) as exc:  # configs the manifest carries are unusable
        raise ArtifactError(f"{manifest.folder}: the {family.name} pipeline could not be assembled from the manifest's "
                            f"component configs ({type(exc).__name__}: {exc}); rebuild the artifact") from exc


def open_engines(manifest: Manifest, names, cuda_graphs: bool = True, weight_streaming_budget=None) -> dict:
    """The named components' engines on the manifest's backend."""
    backend = manifest.backend
    if backend["name"] == "onnxruntime":
        from runtime.ort_engine import OrtEngine

        if weight_streaming_budget is not None:
            raise ArtifactError("weight_streaming_budget applies to TensorRT engines; this artifact holds onnxruntime engines")
        return {n: OrtEngine(manifest.folder / manifest.components[n].file, manifest.components[n],
                             provider=backend["execution_provider"]) for n in names}
    if backend["name"] == "tensorrt":
        from runtime.trt_engine import load_engines

        return load_engines(manifest.folder, backend, {n: manifest.components[n] for n in names}, cuda_graphs=cuda_graphs,
                            weight_streaming_budget=weight_streaming_budget)
    raise ArtifactError(
        f"{manifest.folder}: backend {backend['name']!r} is not one this runtime can load (onnxruntime, tensorrt); "
        "upgrade kiln or rebuild the artifact"
    )


def __getattr__(name: str):
    """The SD pipeline classes moved to runtime.families.sd; importable from here as before."""
    if name in ("EnginePipeline", "EngineImg2ImgPipeline"):
        from runtime.families import sd

        return getattr(sd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
