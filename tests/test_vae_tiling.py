"""VAE slicing and tiling on engines: tiled decoding (and encoding) matches diffusers'
enable_vae_tiling() on the same weights, at the profile's max size and, with a VAE built smaller
than the UNet ([shapes.vae_decoder]), above the VAE's max; slicing matches untiled decoding; tile
plans that would leave the engines' range are refused or replaced before anything runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from exporters.builtin import ensure_builtin
from runtime import load_pipeline
from runtime.errors import ShapeError
from runtime.manifest import ComponentInfo, TensorInfo
from runtime.vae_tiling import choose_tile, tile_shapes

PIXEL_TOLERANCE = 2 / 255


def _pair(folder, model, cls, task="text2img"):
    engine = load_pipeline(folder, task=task)
    reference = cls.from_pretrained(ensure_builtin(model), safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False)
    for pipe in (engine, reference):
        pipe.set_progress_bar_config(disable=True)
    return engine, reference


def test_tiled_decoding_matches_diffusers_at_the_profile_max(tiny_artifact):
    """tiny's VAE tiles at 128 (its config's sample_size): at the profile's 256x256 diffusers tiles."""
    engine, reference = _pair(tiny_artifact, "tiny", StableDiffusionPipeline)
    kwargs = dict(prompt=["a red fox", "a castle"], height=256, width=256, num_inference_steps=3, guidance_scale=5.0,
                  output_type="np")
    untiled = engine(generator=torch.Generator().manual_seed(2), **kwargs).images
    for pipe in (engine, reference):
        pipe.vae.enable_tiling()
    got = engine(generator=torch.Generator().manual_seed(2), **kwargs).images
    want = reference(generator=torch.Generator().manual_seed(2), **kwargs).images
    assert got.shape == want.shape == (2, 256, 256, 3)
    assert np.abs(got - untiled).max() > 4 * PIXEL_TOLERANCE, "tiling changed nothing: diffusers did not tile here"
    assert np.abs(got - want).max() <= PIXEL_TOLERANCE


def test_tiled_encoding_matches_diffusers_img2img(tiny_artifact):
    engine, reference = _pair(tiny_artifact, "tiny", StableDiffusionImg2ImgPipeline, task="img2img")
    pixels = np.random.default_rng(3).integers(0, 256, size=(256, 192, 3), dtype=np.uint8)
    kwargs = dict(prompt="an oil painting of a harbour", image=Image.fromarray(pixels), strength=0.6,
                  num_inference_steps=4, guidance_scale=5.0, output_type="np")
    for pipe in (engine, reference):
        pipe.vae.enable_tiling()  # diffusers 0.42's pipelines have no enable_vae_tiling(); their VAE does
    got = engine(generator=torch.Generator().manual_seed(4), **kwargs).images
    want = reference(generator=torch.Generator().manual_seed(4), **kwargs).images
    assert got.shape == want.shape == (1, 256, 192, 3)
    assert np.abs(got - want).max() <= PIXEL_TOLERANCE


def test_tiling_runs_sizes_above_the_vae_engines(lora_artifacts):
    """tiny-sd15's artifact here builds the UNet up to 256 and the VAE decoder up to 128
    ([shapes.vae_decoder]): 256x256 is refused untiled, naming the way out, and tiled it matches
    diffusers' tiled decoding (the artifact's fused LoRA fused in the reference too)."""
    from tests.test_refit import _reference

    folder = lora_artifacts["tiny-sd15"]["artifact"]
    engine = load_pipeline(folder)
    engine.set_progress_bar_config(disable=True)
    assert engine.manifest.components["vae_decoder"].inputs[0].max[2:] == (16, 16)
    kwargs = dict(prompt=["a lighthouse at dusk"], height=256, width=192, num_inference_steps=3, guidance_scale=5.0,
                  output_type="np")
    with pytest.raises(ShapeError, match=r"larger than the vae_decoder engine was built for \(up to 128x128\); "
                                         r"pipe.enable_vae_tiling\(\)"):
        engine(**kwargs)
    reference = _reference("tiny-sd15", engine)
    engine.enable_vae_tiling()
    reference.vae.enable_tiling()  # diffusers 0.42's pipelines have no enable_vae_tiling(); their VAE does
    got = engine(generator=torch.Generator().manual_seed(5), **kwargs).images
    want = reference(generator=torch.Generator().manual_seed(5), **kwargs).images
    assert got.shape == want.shape == (1, 256, 192, 3)
    assert np.abs(got - want).max() <= PIXEL_TOLERANCE


def test_slicing_matches_untiled_decoding(tiny_artifact):
    pipe = load_pipeline(tiny_artifact)
    z = torch.randn(3, 4, 16, 24, generator=torch.Generator().manual_seed(6))
    whole = pipe.vae.decode(z).sample
    pipe.enable_vae_slicing()
    batches, run = [], pipe.vae.decoder.__call__
    pipe.vae.decoder = lambda **inputs: batches.append(inputs["latent"].shape[0]) or run(**inputs)
    sliced = pipe.vae.decode(z).sample
    assert batches == [1, 1, 1]  # one image per engine call
    assert sliced.shape == whole.shape == (3, 3, 128, 192)
    assert (sliced - whole).abs().max() <= 1e-5


def _decoder(lo: int, hi: int) -> ComponentInfo:
    dims = ("batch", 4, "latent_height", "latent_width")
    latent = TensorInfo("latent", "float32", dims, (1, 4, lo, lo), (1, 4, hi, hi), (4, 4, hi, hi))
    images = TensorInfo("images", "float32", ("batch", 3, "8*latent_height", "8*latent_width"), (1,), (1,), (1,))
    return ComponentInfo("vae_decoder", "vae_decoder.onnx", "fp32", (latent,), (images,), {})


def test_tile_plans_follow_diffusers_and_stay_inside_the_engine():
    def out_of(t):  # decoding: tiles of 16 latents are diffusers' 128 pixels; others 8 pixels a latent
        return 128 if t == 16 else 8 * t

    # diffusers' plan: tiles every int(16 * 0.75) = 12, the last cut short at the border
    assert tile_shapes(32, 40, 16, 0.25) == {(16, 16), (16, 4), (8, 16), (8, 4)}
    assert choose_tile(_decoder(4, 32), 1, 32, 40, 16, 0.25, out_of) == 16  # every tile fits: diffusers' own
    # 16 leaves 4-wide tiles below the minimum 8 and 64 is too large whole: the closest tile that fits
    # and stitches (its stride x 8 is the 144 pixels of each tile kept)
    assert choose_tile(_decoder(8, 32), 1, 64, 64, 16, 0.25, out_of) == 24
    assert choose_tile(_decoder(8, 32), 1, 32, 28, 16, 0.25, out_of) is None  # fits whole: runs untiled
    with pytest.raises(ShapeError, match=r"no tile size cuts 64x64 into tiles inside the engine's latent range 30x30"):
        choose_tile(_decoder(30, 32), 1, 64, 64, 16, 0.25, out_of)
    with pytest.raises(ShapeError, match="outside the range the engine was built for"):
        choose_tile(_decoder(4, 32), 8, 32, 40, 16, 0.25, out_of)  # the batch too


def test_fallback_tiles_decode_to_the_full_size(tiny_artifact):
    """tiny's decoder takes latents 8..32: 64x64 latents (512x512) untiled is too large, and
    diffusers' tiles of 16 leave 4-wide ones; the fallback tile still gives exactly 512x512."""
    pipe = load_pipeline(tiny_artifact)
    pipe.enable_vae_tiling()
    z = torch.randn(1, 4, 64, 56, generator=torch.Generator().manual_seed(7))
    pipe.vae.check_request(512, 448, 1)
    assert pipe.vae.decode(z).sample.shape == (1, 3, 512, 448)


def test_bench_measures_decode_memory_with_and_without_tiling(tiny_artifact):
    from kiln.bench.vae_memory import format_vae_memory, vae_memory_bench

    report = vae_memory_bench(tiny_artifact, batch=2)
    cases = {c["case"]: c for c in report["cases"]}
    assert report["vae_max"] == [256, 256]
    tiled = cases["tiled at 2x the VAE's max side"]
    assert (tiled["height"], tiled["width"], tiled["tile"]) == (512, 512, 192)  # 128 leaves tiles below the minimum 64
    assert all(c["peak_bytes"] > 0 and c["seconds"] > 0 for c in report["cases"])
    assert "peak MiB above loaded" in format_vae_memory(report)


def test_services_tile_where_the_vae_is_built_smaller(lora_artifacts, tiny_artifact):
    """kiln serve and Ray Serve accept every size of [shapes]: tiling goes on where the VAE decoder is smaller."""
    from runtime.vae_tiling import tile_above_the_vae

    smaller, same = load_pipeline(lora_artifacts["tiny-sd15"]["artifact"]), load_pipeline(tiny_artifact)
    assert tile_above_the_vae(smaller) and smaller.vae.use_tiling
    assert not tile_above_the_vae(same) and not same.vae.use_tiling
    smaller.vae.check_request(256, 256, 2)  # the UNet's max, decodable now
