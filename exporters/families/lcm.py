"""Latent consistency models on the export side: a LatentConsistencyModelPipeline folder (a full
LCM UNet, distilled with a guidance embedding, as `digits-lcm`; not an LCM-LoRA). Its components
are Stable Diffusion's, and the UNet's `timestep_cond` input is detected from its config
(exporters/dims.py), so the export is SD's; the pipeline class, the runtime family and the UNet's
batch (one input per image: its guidance is an embedding, with no unconditional half) differ."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from exporters.dims import ModelDims
from exporters.families import Family, sd


def read_dims(folder: Path) -> ModelDims:
    """SD's dims; the UNet sees one input per image (no unconditional pass)."""
    return replace(sd.read_dims(folder), guidance_batch=1)


def load_pipeline(folder: Path):
    from diffusers import LatentConsistencyModelPipeline

    return sd.load_with(LatentConsistencyModelPipeline, folder)


FAMILY = Family(
    name="lcm",
    pipeline_classes=("LatentConsistencyModelPipeline",),
    folder_components=sd.FAMILY.folder_components,
    components=sd.FAMILY.components,
    denoiser="unet",
    read_dims=read_dims,
    component_specs=sd.component_specs,
    load_pipeline=load_pipeline,
    record_calibration=sd.FAMILY.record_calibration,
)
