"""ControlNet engines: one and two seeded ControlNets (tests/controlnets.py) on tiny-sd15 and
tiny-sdxl match diffusers' own ControlNet pipelines with the same weights, at two conditioning
scales, with control_guidance_end < 1 (the late steps run the ControlNet at scale 0) and in guess
mode; what the artifact records, what the builder gives TensorRT, and what is refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
)
from PIL import Image

from runtime import load_pipeline
from runtime.errors import ArtifactError, ExportError

PIXEL_TOLERANCE = 2 / 255
MIN_EFFECT = 4 / 255  # the ControlNets must move the images by more than this, or the comparison proves little
REFERENCE = {"tiny-sd15": StableDiffusionControlNetPipeline, "tiny-sdxl": StableDiffusionXLControlNetPipeline}
SKIP = {"image_encoder", "feature_extractor", "safety_checker"}


def _reference(model: str, artifact, controlnets: list, cls=None):
    """diffusers' ControlNet pipeline on the weights the artifact was built from (its fused LoRA too)."""
    from tests.test_refit import _reference as base_reference

    base = base_reference(model, load_pipeline(artifact))
    extra = {"add_watermarker": False} if model == "tiny-sdxl" else {"safety_checker": None, "feature_extractor": None,
                                                                     "requires_safety_checker": False}
    nets = [ControlNetModel.from_pretrained(c) for c in controlnets]
    pipe = (cls or REFERENCE[model])(**{k: v for k, v in base.components.items() if k not in SKIP},
                            controlnet=nets[0] if len(nets) == 1 else nets, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _control_images(count: int, size: int = 128) -> list[torch.Tensor]:
    return [torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(40 + i)) for i in range(count)]


@pytest.mark.parametrize("count", [1, 2])
def test_controlnets_match_diffusers(lora_artifacts, count):
    """tiny-sd15 (its artifact has a LoRA fused too, which the reference fuses as well)."""
    _check_controlnets("tiny-sd15", lora_artifacts["tiny-sd15"], count)


@pytest.mark.parametrize("count", [1, 2])
def test_sdxl_controlnets_match_diffusers(sdxl_controlnet_artifact, count):
    """tiny-sdxl, in the slow tier (measured once: 0.0006-0.0009/255)."""
    _check_controlnets("tiny-sdxl", sdxl_controlnet_artifact, count)


def _check_controlnets(model: str, built: dict, count: int) -> None:
    engine = load_pipeline(built["artifact"], task="controlnet", controlnets=list(range(count)))
    engine.set_progress_bar_config(disable=True)
    reference = _reference(model, built["artifact"], built["controlnets"][:count])
    assert isinstance(engine, REFERENCE[model])
    images = _control_images(count)
    for scale in (0.5, 1.2):
        kwargs = dict(prompt=["a red fox in the snow", "a lighthouse at dusk"], negative_prompt=["blurry", "dark"],
                      image=images[0] if count == 1 else images, num_inference_steps=5, guidance_scale=5.0,
                      controlnet_conditioning_scale=scale if count == 1 else [scale, 0.7], control_guidance_end=0.6,
                      guess_mode=model == "tiny-sd15" and scale > 1, output_type="np")
        got = engine(generator=torch.Generator().manual_seed(3), **kwargs).images
        want = reference(generator=torch.Generator().manual_seed(3), **kwargs).images
        off = dict(kwargs, controlnet_conditioning_scale=0.0 if count == 1 else [0.0] * count)
        without = reference(generator=torch.Generator().manual_seed(3), **off).images
        assert got.shape == want.shape == (2, 128, 128, 3)
        assert np.abs(want - without).max() > MIN_EFFECT, "the ControlNets hardly move the images"
        assert np.abs(got - want).max() <= PIXEL_TOLERANCE, (scale, np.abs(got - want).max() * 255)


def test_controlnet_img2img_matches_diffusers(lora_artifacts):
    built = lora_artifacts["tiny-sd15"]
    engine = load_pipeline(built["artifact"], task="controlnet_img2img", controlnets=["controlnet_1"])
    engine.set_progress_bar_config(disable=True)
    reference = _reference("tiny-sd15", built["artifact"], built["controlnets"][1:], StableDiffusionControlNetImg2ImgPipeline)
    assert isinstance(engine, StableDiffusionControlNetImg2ImgPipeline)
    pixels = np.random.default_rng(8).integers(0, 256, size=(128, 128, 3), dtype=np.uint8)
    kwargs = dict(prompt="an oil painting of a harbour", image=Image.fromarray(pixels), control_image=_control_images(1)[0],
                  strength=0.7, num_inference_steps=5, guidance_scale=5.0, controlnet_conditioning_scale=0.9,
                  output_type="np")
    got = engine(generator=torch.Generator().manual_seed(9), **kwargs).images
    want = reference(generator=torch.Generator().manual_seed(9), **kwargs).images
    assert got.shape == want.shape == (1, 128, 128, 3)
    assert np.abs(got - want).max() <= PIXEL_TOLERANCE


def test_the_artifact_records_the_controlnets_and_the_unet_takes_their_residuals(lora_artifacts, fake_tensorrt, tmp_path):
    """Per ControlNet an engine with named dynamic axes (residuals at the UNet's levels: latent/2,
    /4 ...), a UNet with the residuals as inputs, the sources in model.controlnets; TensorRT's
    builder gets every input of both as an optimization-profile input."""
    from engines.trt_backend import TrtOptions, engine_from_onnx, profile_shapes
    from tests.engines.test_tensorrt import BACKEND

    folder = lora_artifacts["tiny-sd15"]["artifact"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [c["component"] for c in manifest["model"]["controlnets"]] == ["controlnet_0", "controlnet_1"]
    cn = manifest["components"]["controlnet_0"]
    inputs = {t["name"]: t for t in cn["inputs"]}
    assert list(inputs)[:5] == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale"]
    assert inputs["controlnet_cond"]["dims"] == ["unet_batch", 3, "8*latent_height", "8*latent_width"]
    outputs = [t["name"] for t in cn["outputs"]]
    assert outputs[-1] == "mid_residual" and outputs[0] == "down_residual_0"
    unet_inputs = [t["name"] for t in manifest["components"]["unet"]["inputs"]]
    assert unet_inputs[3:] == outputs
    dims = {t["name"]: t["dims"] for t in cn["outputs"]}
    assert dims["mid_residual"][2:] == ["latent_height/8", "latent_width/8"]  # SD: three downsamplers
    shapes = {name: (lo, opt, hi) for name, lo, opt, hi in profile_shapes(cn["inputs"])}
    assert shapes["controlnet_cond"] == ((1, 3, 64, 64), (2, 3, 128, 128), (8, 3, 256, 256))
    assert shapes["conditioning_scale"] == ((len(outputs),),) * 3
    engine_from_onnx(folder / "controlnet_0.onnx", tmp_path / "controlnet_0.plan", cn["inputs"], TrtOptions(), BACKEND,
                     cache_dir=tmp_path)
    assert [c[1] for c in fake_tensorrt.calls if c[0] == "set_shape"] == list(inputs)


def test_a_controlnet_pipeline_needs_controlnets(tiny_artifact, lora_artifacts):
    with pytest.raises(ArtifactError, match="built without ControlNets"):
        load_pipeline(tiny_artifact, task="controlnet")
    with pytest.raises(ArtifactError, match="this artifact has controlnet_0, controlnet_1"):
        load_pipeline(lora_artifacts["tiny-sd15"]["artifact"], task="controlnet", controlnets=["controlnet_7"])
    with pytest.raises(ArtifactError, match="controlnets= applies to the ControlNet tasks"):
        load_pipeline(lora_artifacts["tiny-sd15"]["artifact"], controlnets=[0])


@pytest.mark.model
def test_a_controlnet_for_another_model_is_refused_before_any_work(tmp_path):
    """A ControlNet made for tiny-sdxl does not fit tiny (SD 2.1-shaped: another text width, no added conditions)."""
    from exporters.builtin import ensure_builtin
    from exporters.export import ExportOptions, export_model
    from exporters.resolve import resolve_model
    from tests.controlnets import make_controlnet

    controlnet = make_controlnet(ensure_builtin("tiny-sdxl"), tmp_path / "cn", seed=0)
    source, profile = resolve_model("tiny")
    with pytest.raises(ExportError, match=r"does not fit this model's UNet[\s\S]*cross_attention_dim[\s\S]*addition_embed"):
        export_model(source, profile, tmp_path / "out", ExportOptions(controlnets=(str(controlnet),)))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="neither a local folder nor a hub id"):
        export_model(source, profile, tmp_path / "out", ExportOptions(controlnets=("not a/model/path",)))


def test_families_without_a_controlnet_pipeline_refuse_controlnets():
    from exporters.export import model_components
    from exporters.families import get
    from exporters.profile import profile_from_dict

    profile = profile_from_dict("p", {"model": {"source": "x", "controlnets": ["some/controlnet"]},
                                      "shapes": {"batch": [1, 1, 1], "height": [64, 64, 64], "width": [64, 64, 64]}})
    assert model_components(get("sd"), profile)[-1] == "controlnet_0"
    with pytest.raises(ExportError, match="lcm models have no ControlNet pipeline"):
        model_components(get("lcm"), profile)


def test_generate_with_control_images_and_vae_tiling(lora_artifacts, tmp_path):
    """`kiln generate --control-image` runs the ControlNet pipeline; above the VAE engine's 128x128,
    --vae-tiling is what makes 256x256 run (exit 2 and the way out without it); inspect lists both."""
    from click.testing import CliRunner

    from kiln.cli import cli

    folder = str(lora_artifacts["tiny-sd15"]["artifact"])
    control = tmp_path / "edges.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(control)
    runner = CliRunner()
    r = runner.invoke(cli, ["generate", folder, "a red fox", "--steps", "2", "--control-image", str(control),
                            "--control-scale", "0.8", "-o", str(tmp_path / "cn.png"), "--json"])
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "cn.png").size == (128, 128)
    r = runner.invoke(cli, ["generate", folder, "a red fox", "--steps", "2", "--control-image", str(control),
                            "--control-image", str(control), "--control-image", str(control)])
    assert r.exit_code == 2 and "3 control images, but this artifact has 2 ControlNet(s)" in r.output
    r = runner.invoke(cli, ["generate", folder, "a red fox", "--steps", "2", "--height", "256", "--width", "256"])
    assert r.exit_code == 2 and "pipe.enable_vae_tiling()" in r.output
    r = runner.invoke(cli, ["generate", folder, "a red fox", "--steps", "2", "--height", "256", "--width", "256",
                            "--vae-tiling", "-o", str(tmp_path / "big.png")])
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "big.png").size == (256, 256)
    r = runner.invoke(cli, ["inspect", folder])
    assert "ControlNet" in r.output and "controlnet_1" in r.output and "vae_decoder size" in r.output


def test_residual_axes_divide_the_latent_axes():
    """The UNet's levels are `latent_height/K`: evaluated, bound back to the latent axis, checked
    against the other inputs, and named for torch.onnx."""
    from exporters.controlnet import residual_layout
    from exporters.specs import ComponentSpec, TensorSpec, dynamic_axes
    from runtime.errors import ShapeError
    from runtime.shapes import bind_axes, eval_dims, parse_ratio

    assert eval_dims(("unet_batch", 64, "latent_height/4"), {"unet_batch": 2, "latent_height": 32}) == (2, 64, 8)
    assert bind_axes({"sample": ("latent_height",), "r": ("latent_height/2",)}, {"sample": (16,), "r": (8,)}) == {
        "latent_height": 16}
    with pytest.raises(ShapeError, match="axis 'latent_height' is 18 here but 16"):
        bind_axes({"sample": ("latent_height",), "r": ("latent_height/2",)}, {"sample": (16,), "r": (9,)})
    for bad in ("2*latent_height/2", "latent_height/0", "latent_height/"):
        with pytest.raises(ValueError):
            parse_ratio(bad)
    spec = ComponentSpec("x", (TensorSpec("r", "float32", (1, "latent_height/8", "8*latent_width")),), (), None, None, 0, 0)
    assert dynamic_axes(spec) == {"r": {1: "latent_height_d8", 2: "latent_width_x8"}}
    # SD 1.5's UNet: conv_in, two resnets and a downsampler per level but the last, then the mid block
    sd15 = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2}
    assert residual_layout(sd15) == ((320, 1), (320, 1), (320, 1), (320, 2), (640, 2), (640, 2), (640, 4), (1280, 4),
                                     (1280, 4), (1280, 8), (1280, 8), (1280, 8), (1280, 8))
