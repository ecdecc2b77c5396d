"""Latent consistency models on the export side: a LatentConsistencyModelPipeline folder (a full
LCM UNet, distilled with a guidance embedding, as `digits-lcm`; not an LCM-LoRA). Its components
are Stable Diffusion's, and the UNet's `timestep_cond` input is detected from its config
(exporters/dims.py), so the export is SD's; only the pipeline class and the runtime family differ."""
from __future__ import annotations

from pathlib import Path

from exporters.families import Family, sd


def load_pipeline(folder: Path):
    from diffusers import LatentConsistencyModelPipeline

    return sd.load_with(LatentConsistencyModelPipeline, folder)


FAMILY = Family(
    name="lcm",
    pipeline_classes=("LatentConsistencyModelPipeline",),
    folder_components=sd.FAMILY.folder_components,
    components=sd.FAMILY.components,
    denoiser="unet",
    read_dims=sd.read_dims,
    component_specs=sd.component_specs,
    load_pipeline=load_pipeline,
    record_calibration=sd.FAMILY.record_calibration,
)
