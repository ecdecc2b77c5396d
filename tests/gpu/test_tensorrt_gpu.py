"""TensorRT engines for the tiny model on a real GPU: build fp32 and fp16, compare with PyTorch,
generate with CUDA graphs on and off, refit a stripped plan, stream weights.

Marked `gpu`: skipped, with the reason, where tensorrt does not import or torch sees no CUDA GPU.
Run on a GPU machine with `make test-gpu` (README, "Tests").
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engines.build import BuildOptions, build_from_export
from engines.trt_backend import TrtOptions
from runtime import load_pipeline

pytestmark = pytest.mark.gpu

PIXEL_TOLERANCE = 2 / 255
PROMPTS = dict(prompt=["a red fox in the snow", "a lighthouse at dusk"], negative_prompt=["blurry", "low quality"],
               height=64, width=192, num_inference_steps=8, guidance_scale=7.5, output_type="np")


def _build(export, folder, **trt):
    return build_from_export(export, folder, BuildOptions(backend="tensorrt", tensorrt=TrtOptions(**trt))).folder


@pytest.fixture(scope="module")
def trt_fp32(tiny_export, tmp_path_factory):
    return _build(tiny_export, tmp_path_factory.mktemp("trt") / "tiny-fp32")


@pytest.fixture(scope="module")
def trt_fp16(tiny_fp16_export, tmp_path_factory):
    return _build(tiny_fp16_export, tmp_path_factory.mktemp("trt") / "tiny-fp16")


def _images(folder, seed=7, **load):
    pipe = load_pipeline(folder, **load)
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=torch.Generator().manual_seed(seed), **PROMPTS).images


def _reference():
    from diffusers import StableDiffusionPipeline

    from exporters.builtin import ensure_builtin

    pipe = StableDiffusionPipeline.from_pretrained(ensure_builtin("tiny"), safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=torch.Generator().manual_seed(7), **PROMPTS).images


def test_fp32_engines_match_pytorch(trt_fp32):
    manifest = json.loads((trt_fp32 / "manifest.json").read_text())
    backend = manifest["backend"]
    assert backend["name"] == "tensorrt" and backend["gpu"] == torch.cuda.get_device_name()
    assert tuple(backend["compute_capability"]) == torch.cuda.get_device_capability()
    report = json.loads((trt_fp32 / "report.json").read_text())
    for name, rows in report["engine_parity"].items():
        for row in rows:
            assert row["ok"] and row["max_abs_err"] <= row["tolerance"], (name, row)


def test_fp16_engines_stay_above_the_quality_gate(trt_fp16):
    report = json.loads((trt_fp16 / "report.json").read_text())
    for name, rows in report["engine_parity"].items():
        for row in rows:
            assert row["ok"] and row["cosine"] >= row["min_cosine"], (name, row)


def test_pipeline_matches_diffusers_with_and_without_cuda_graphs(trt_fp32):
    graphs = _images(trt_fp32, cuda_graphs=True)
    eager = _images(trt_fp32, cuda_graphs=False)
    want = _reference()
    assert graphs.shape == want.shape == (2, 64, 192, 3) and want.std() > 0.05
    assert np.abs(eager - want).max() <= PIXEL_TOLERANCE
    assert np.abs(graphs - eager).max() <= 1e-6  # replaying the captured enqueue runs the same kernels


def test_fp16_pipeline_is_close_to_fp32(trt_fp32, trt_fp16):
    fp32, fp16 = _images(trt_fp32), _images(trt_fp16)
    mse = float(np.mean((fp32 - fp16) ** 2))
    assert mse == 0 or 10 * np.log10(1 / mse) >= 40


def test_engines_share_one_scratch_and_outputs_stay_on_the_gpu(trt_fp32):
    pipe = load_pipeline(trt_fp32)
    engines = [pipe.text_encoder.engine, pipe.unet.engine, pipe.vae.decoder]
    assert len({e.scratch.data_ptr() for e in engines}) == 1
    assert engines[0].scratch.numel() >= max(e.engine.device_memory_size_v2 for e in engines)
    out = pipe.text_encoder.engine(input_ids=torch.zeros(1, 77, dtype=torch.int32, device="cuda"))
    assert out["text_embeddings"].is_cuda


def test_timing_cache_is_written_for_this_gpu(trt_fp32, kiln_cache):
    caches = list((kiln_cache / "tensorrt").glob("timing-trt*.cache"))
    assert caches and all(c.stat().st_size > 0 for c in caches)


def test_stripped_refittable_plans_are_refit_at_load(tiny_export, trt_fp32, tmp_path):
    folder = _build(tiny_export, tmp_path / "stripped", refit="identical", strip_plan=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    unet = manifest["components"]["unet"]
    assert (folder / unet["refit_onnx"]).is_file()
    assert (folder / unet["file"]).stat().st_size < (trt_fp32 / "unet.plan").stat().st_size
    assert np.abs(_images(folder) - _images(trt_fp32)).max() <= PIXEL_TOLERANCE


def test_weight_streaming_under_a_budget(tiny_export, trt_fp32, tmp_path):
    folder = _build(tiny_export, tmp_path / "streaming", weight_streaming=True)
    streamed = _images(folder, weight_streaming_budget=0)  # stream as much as TensorRT can
    assert np.abs(streamed - _images(trt_fp32)).max() <= PIXEL_TOLERANCE
