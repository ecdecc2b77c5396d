"""The family registry: a model folder's pipeline class picks the family, the manifest records it,
and a new family needs only its two modules and a registry entry (tests/families/)."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from exporters import families as export_families
from exporters.builtin import ensure_builtin
from exporters.dims import ModelDims, unet_conditions
from exporters.families.sd import component_specs
from exporters.resolve import resolve_model
from runtime import families as runtime_families
from runtime.errors import ArtifactError, ModelSourceError
from tests.records import TINY_DIMS, write_artifact


@pytest.fixture
def fake_model(tmp_path):
    """builtin:tiny saved as a KilnFakePipeline."""
    folder = shutil.copytree(ensure_builtin("tiny"), tmp_path / "fake-model")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "KilnFakePipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def fake_family(monkeypatch):
    from tests.families import fake_export, fake_runtime

    monkeypatch.setitem(export_families._REGISTERED, "fake", fake_export.FAMILY)
    monkeypatch.setitem(runtime_families._REGISTERED, "fake", fake_runtime.FAMILY)
    return fake_runtime


def test_the_pipeline_class_picks_the_family(fake_model):
    source, _ = resolve_model("tiny")
    assert source.family.name == "sd" and source.family.denoiser == "unet"
    with pytest.raises(ModelSourceError, match=r"KilnFakePipeline, which kiln does not support yet. Supported pipeline "
                                               r"classes: StableDiffusionPipeline, StableDiffusionImg2ImgPipeline"):
        resolve_model(str(fake_model))


def test_unknown_runtime_family_is_refused_naming_the_known_ones(tmp_path):
    manifest = write_artifact(tmp_path / "a", {"name": "onnxruntime", "execution_provider": "CPUExecutionProvider"},
                              ".onnx", family="sdxl-future")
    with pytest.raises(ArtifactError, match=r"model family 'sdxl-future' is not one this runtime can load \(lcm, sd, sdxl\)"):
        runtime_families.get(manifest.family)


def test_manifests_without_a_family_are_sd(tmp_path):
    manifest = write_artifact(tmp_path / "a", {"name": "onnxruntime", "execution_provider": "CPUExecutionProvider"},
                              ".onnx")
    data = json.loads((manifest.folder / "manifest.json").read_text())
    assert data["model"]["family"] == "sd"
    del data["model"]["family"]
    (manifest.folder / "manifest.json").write_text(json.dumps(data))
    from runtime.manifest import load_manifest

    assert load_manifest(manifest.folder).family == "sd"


def test_unet_features_come_from_its_config():
    assert unet_conditions({"time_cond_proj_dim": None}) == ()
    assert unet_conditions({"time_cond_proj_dim": 256}) == (("timestep_cond", 256),)
    sdxl = {"addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}
    assert unet_conditions(sdxl) == (("text_embeds", 1280), ("time_ids", 6))
    refiner = {**sdxl, "projection_class_embeddings_input_dim": 2560}
    assert unet_conditions(refiner, text_embeds_dim=1280) == (("text_embeds", 1280), ("time_ids", 5))
    with pytest.raises(ModelSourceError, match="addition_embed_type is 'image'"):
        unet_conditions({"addition_embed_type": "image"})
    lcm = ModelDims(**{**TINY_DIMS.__dict__, "unet_conditions": (("timestep_cond", 8),)})
    unet = component_specs(lcm)["unet"]
    assert [t.name for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    assert unet.inputs[3].dims == ("unet_batch", 8)


@pytest.mark.model
def test_a_unet_with_extra_conditions_exports_and_matches_torch(tmp_path):
    """A UNet with LCM's guidance embedding and SDXL's added conditions, traced through the shared
    UNet spec and compared with PyTorch at min/opt/max."""
    import types

    from diffusers import UNet2DConditionModel

    from exporters.check import check_against_torch
    from exporters.export import ExportOptions, onnx_from_torch
    from exporters.specs import tensor_ranges
    from tests.records import tiny_profile

    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, time_cond_proj_dim=8,
                  addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=40)
    unet = UNet2DConditionModel(**config).eval()
    dims = ModelDims(**{**TINY_DIMS.__dict__, "unet_conditions": unet_conditions(unet.config)})
    assert dims.unet_conditions == (("timestep_cond", 8), ("text_embeds", 16), ("time_ids", 6))
    spec = component_specs(dims)["unet"]
    module = spec.wrap(types.SimpleNamespace(unet=unet))
    ranges = tensor_ranges(spec, tiny_profile(), dims)
    path = tmp_path / "unet.onnx"
    import onnx

    onnx.save(onnx_from_torch(spec, module, ranges, ExportOptions()), path)
    rows, _ = check_against_torch(spec, module, path, ranges)
    assert {r.point for r in rows} == {"min", "opt", "max"} and all(r.ok for r in rows)


@pytest.mark.model
def test_a_new_family_needs_only_its_two_modules(fake_model, fake_family, tmp_path):
    from diffusers import StableDiffusionPipeline

    from engines.build import BuildOptions, build_from_model
    from exporters.export import ExportOptions
    from runtime import load_pipeline
    from runtime.batcher import ImageRequest, normalize_request
    from runtime.manifest import load_manifest

    source, profile = resolve_model(str(fake_model))
    assert source.family.name == "fake" and source.family.tasks == {"text2img": ("text_encoder", "unet", "vae_decoder")}
    out = build_from_model(str(fake_model), tmp_path / "art", BuildOptions(backend="onnxruntime", device="cpu"),
                           export_options=ExportOptions(components=("text_encoder", "unet", "vae_decoder"))).folder
    manifest = load_manifest(out)
    assert manifest.family == "fake" and manifest.model["pipeline_class"] == "KilnFakePipeline"
    pipe = load_pipeline(out)
    assert type(pipe) is fake_family.FakeEnginePipeline and isinstance(pipe, StableDiffusionPipeline)
    assert normalize_request(pipe, ImageRequest("a cat")).steps == 3  # the family's own defaults
    pipe.set_progress_bar_config(disable=True)
    reference = StableDiffusionPipeline.from_pretrained(fake_model, safety_checker=None, feature_extractor=None,
                                                        requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red fox", height=64, width=128, num_inference_steps=4, guidance_scale=5.0, output_type="np")
    got = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    want = reference(generator=torch.Generator().manual_seed(1), **kwargs).images
    assert got.shape == (1, 64, 128, 3) and want.std() > 0.05
    assert np.abs(got - want).max() <= 2 / 255
    with pytest.raises(ArtifactError, match="task must be one of text2img for fake artifacts"):
        load_pipeline(out, task="img2img")


def test_a_family_declares_the_components_its_specs_build():
    dims = replace(TINY_DIMS, text_encoders=((514, 16, 0), (514, 16, 24)))  # what families with two encoders read
    for family in export_families.all_families():
        assert tuple(family.component_specs(dims)) == family.components, family.name
        assert family.denoiser in family.components
        runtime = runtime_families.get(family.name)
        assert runtime.denoiser == family.denoiser
        # every component a task needs is the family's, or the ControlNets the artifact was built with
        assert all(set(needed) - {runtime_families.CONTROLNETS} <= set(family.components)
                   for needed in runtime.tasks.values())
