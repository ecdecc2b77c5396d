"""load_pipeline(folder): an artifact folder → a drop-in diffusers pipeline whose models are engines."""
from __future__ import annotations

import functools
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from runtime.errors import ArtifactError, ShapeError, format_table
from runtime.manifest import Manifest, load_manifest, verify_files
from runtime.ort_engine import OrtEngine
from runtime.shims import TextEncoderShim, UNetShim, VaeShim

log = logging.getLogger(__name__)

TASKS = {"text2img": ("text_encoder", "unet", "vae_decoder"), "img2img": ("text_encoder", "unet", "vae_decoder", "vae_encoder")}


def load_pipeline(folder: str | Path, task: str = "text2img", backend: str | None = None, verify: bool = True,
                  cuda_graphs: bool = True, weight_streaming_budget=None):
    """Load an artifact folder as a pipeline called exactly like diffusers' StableDiffusionPipeline
    (task="text2img") or StableDiffusionImg2ImgPipeline (task="img2img").

    Checks the manifest format, every file's checksum (verify=True) and the backend before any engine
    is created; each call is checked against the manifest's shape ranges before anything runs.

    TensorRT artifacts only: `cuda_graphs` captures each engine's enqueue per input shape and
    replays it; `weight_streaming_budget` (bytes, "auto", or {component: either}) keeps only that
    much of an engine's weights on the GPU (engines built with --weight-streaming)."""
    if task not in TASKS:
        raise ArtifactError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    manifest = load_manifest(folder)
    built_with = manifest.backend["name"]
    if backend is not None and backend != built_with:
        raise ArtifactError(
            f"{folder} holds {built_with} engines; backend={backend!r} cannot run them. "
            f"Load it with backend={built_with!r} or build another artifact with --backend {backend}"
        )
    missing = [c for c in TASKS[task] if c not in manifest.components]
    if missing:
        raise ArtifactError(f"{folder} has no {', '.join(missing)} engine, which task {task!r} needs; rebuild with them")
    if verify:
        verify_files(manifest)
    return pipeline_from_manifest(manifest, task, cuda_graphs=cuda_graphs, weight_streaming_budget=weight_streaming_budget)


def pipeline_from_manifest(manifest: Manifest, task: str = "text2img", **engine_options):
    """Assemble the pipeline from an already checked manifest (load_pipeline's second half; the
    exporter also uses it to compare precisions on ONNX files before any artifact exists)."""
    engines = open_engines(manifest, TASKS[task], **engine_options)
    device = next(iter(engines.values())).device
    comps = manifest.components
    cls = EngineImg2ImgPipeline if task == "img2img" else EnginePipeline
    pipe = cls(
        vae=VaeShim(engines["vae_decoder"], engines.get("vae_encoder"), comps["vae_decoder"].config, device),
        text_encoder=TextEncoderShim(engines["text_encoder"], comps["text_encoder"].config, device),
        tokenizer=_load_tokenizer(manifest.folder / "tokenizer"),
        unet=UNetShim(engines["unet"], comps["unet"].config, device),
        scheduler=_load_scheduler(manifest.folder / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.manifest = manifest
    return pipe


def open_engines(manifest: Manifest, names, cuda_graphs: bool = True, weight_streaming_budget=None) -> dict:
    """The named components' engines on the manifest's backend."""
    backend = manifest.backend
    if backend["name"] == "onnxruntime":
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


def _load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


def _load_scheduler(folder: Path):
    config = json.loads((folder / "scheduler_config.json").read_text(encoding="utf-8"))
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None:
        raise ArtifactError(f"{folder}: unknown scheduler class {config.get('_class_name')!r} for this diffusers")
    return cls.from_pretrained(folder)


def check_request(manifest: Manifest, *, height: int, width: int, batch: int) -> None:
    """Raise ShapeError naming the allowed ranges if height, width or the image batch do not fit."""
    multiple = manifest.size_multiple
    problems = []
    for key, value in (("height", height), ("width", width)):
        lo, _, hi = manifest.shape_range(key)
        if not lo <= value <= hi or value % multiple:
            problems.append((key, value, f"{lo}..{hi}, a multiple of {multiple}"))
    lo, _, hi = manifest.shape_range("batch")
    if not 1 <= batch <= hi:
        problems.append(("batch (prompts x num_images_per_prompt)", batch, f"1..{hi}"))
    if problems:
        raise ShapeError(
            "the request does not fit the engines in " + str(manifest.folder) + ":\n"
            + format_table(["argument", "requested", "allowed"], problems)
            + "\nChange the request, or rebuild with a profile whose ranges cover it"
        )


def _prompt_batch(prompt, prompt_embeds) -> int:
    if prompt is None:
        return prompt_embeds.shape[0] if prompt_embeds is not None else 1
    return 1 if isinstance(prompt, str) else len(prompt)


def _checked(call):
    """Wrap a diffusers __call__: bind the caller's arguments to its signature, check the request,
    then run it unchanged."""
    signature = inspect.signature(call)

    @functools.wraps(call)
    def __call__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        height, width = self.request_size(a)
        batch = _prompt_batch(a.get("prompt"), a.get("prompt_embeds")) * (a.get("num_images_per_prompt") or 1)
        check_request(self.manifest, height=height, width=width, batch=batch)
        latents = a.get("latents")
        if latents is not None:
            expected = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
            if tuple(latents.shape) != expected:
                raise ShapeError(f"latents must have shape {list(expected)} for this request, got {list(latents.shape)}")
        return call(self, *args, **kwargs)

    return __call__


class EnginePipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline whose text encoder, UNet and VAE are engines."""

    manifest: Manifest

    def request_size(self, a: dict[str, Any]) -> tuple[int, int]:
        default = self.unet.config.sample_size * self.vae_scale_factor
        return a.get("height") or default, a.get("width") or default

    __call__ = torch.no_grad()(_checked(StableDiffusionPipeline.__call__))


class EngineImg2ImgPipeline(StableDiffusionImg2ImgPipeline):
    """StableDiffusionImg2ImgPipeline whose models are engines; the image sets the size."""

    manifest: Manifest

    def request_size(self, a: dict[str, Any]) -> tuple[int, int]:
        image = a.get("image")
        if image is None:
            raise ShapeError("img2img needs an image; pass image=PIL.Image, numpy array or tensor")
        return self.image_processor.get_default_height_width(image)

    __call__ = torch.no_grad()(_checked(StableDiffusionImg2ImgPipeline.__call__))
