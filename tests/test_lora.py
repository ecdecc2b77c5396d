"""LoRAs fused at export: engines built with `--lora FILE:SCALE` match diffusers with the same LoRA
loaded and fused at that scale, for SD and SDXL; the LoRA's hash and scale are in the build key
and the manifest, and LoRAs that cannot apply are refused before any work."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from exporters.builtin import ensure_builtin
from runtime import load_pipeline

PIPELINES = {"tiny-sd15": (StableDiffusionPipeline, dict(safety_checker=None, feature_extractor=None,
                                                         requires_safety_checker=False)),
             "tiny-sdxl": (StableDiffusionXLPipeline, dict(add_watermarker=False))}


@pytest.mark.parametrize("model", sorted(PIPELINES))
def test_lora_fused_at_export_matches_diffusers(lora_artifacts, model):
    built = lora_artifacts[model]
    engine = load_pipeline(built["artifact"])
    engine.set_progress_bar_config(disable=True)
    cls, options = PIPELINES[model]
    reference = cls.from_pretrained(ensure_builtin(model), **options)
    reference.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=["a red fox", "a lighthouse"], negative_prompt=["blurry", "dark"], height=64, width=128,
                  num_inference_steps=6, guidance_scale=5.0, num_images_per_prompt=2, output_type="np")
    without = reference(generator=torch.Generator().manual_seed(1), **kwargs).images
    reference.load_lora_weights(str(built["lora"].parent))
    reference.fuse_lora(lora_scale=0.8)
    want = reference(generator=torch.Generator().manual_seed(1), **kwargs).images
    got = engine(generator=torch.Generator().manual_seed(1), **kwargs).images
    assert np.abs(want - without).max() > 2 * 2 / 255, "the LoRA barely moves the model; the test would prove nothing"
    assert np.abs(got - want).max() <= 2 / 255
    recorded = engine.manifest.model["loras"]
    assert [(r["scale"], r["file"]) for r in recorded] == [(0.8, "pytorch_lora_weights.safetensors")]
    import hashlib

    assert recorded[0]["sha256"] == hashlib.sha256(built["lora"].read_bytes()).hexdigest()


@pytest.mark.model
def test_lora_hash_and_scale_enter_the_export_key(tmp_path):
    from exporters.export import ExportOptions, export_key
    from exporters.resolve import resolve_model
    from tests.loras import make_lora

    source, profile = resolve_model("tiny-sd15")
    lora = make_lora(source.folder, tmp_path / "a", seed=1)
    keys = {export_key(source, profile, ExportOptions(loras=loras)) for loras in
            ((), ((str(lora), 0.8),), ((str(lora), 0.7),))}
    lora.write_bytes(make_lora(source.folder, tmp_path / "b", seed=2).read_bytes())  # same path, other weights
    keys.add(export_key(source, profile, ExportOptions(loras=((str(lora), 0.8),))))
    assert len(keys) == 4


@pytest.mark.model
def test_lora_for_another_model_is_refused(tmp_path):
    from exporters.export import ExportOptions, export_model
    from exporters.resolve import resolve_model
    from runtime.errors import ExportError
    from tests.loras import make_lora

    xl_lora = make_lora(ensure_builtin("tiny-sdxl"), tmp_path / "xl", seed=1)
    source, profile = resolve_model("tiny-sd15")
    with pytest.raises(ExportError, match="does not fit this model|changes none of this model's modules"):
        export_model(source, profile, tmp_path / "out", ExportOptions(loras=((str(xl_lora), 1.0),)))
    assert not (tmp_path / "out").exists()


def test_lora_sources_are_checked(tmp_path):
    from exporters.lora import lora_file
    from runtime.errors import ModelSourceError

    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="not a .safetensors file; kiln loads no pickles"):
        lora_file(str(tmp_path / "w.bin"))
    with pytest.raises(ModelSourceError, match="holds 0 .safetensors files"):
        lora_file(str(tmp_path))
    with pytest.raises(ModelSourceError, match="neither a .safetensors file, a folder holding one, nor a hub id"):
        lora_file("not a lora")
