"""Bad requests and damaged artifacts get typed errors that name what was expected."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from runtime import load_pipeline
from runtime.errors import ArtifactError, ShapeError
from runtime.manifest import load_manifest


@pytest.fixture(scope="module")
def pipe(tiny_artifact):
    p = load_pipeline(tiny_artifact)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=512, width=64), r"height\s+512\s+64\.\.256, a multiple of 64"),
        (dict(height=32, width=64), r"height\s+32\s+64\.\.256"),
        (dict(height=64, width=100), r"width\s+100\s+64\.\.256, a multiple of 64"),
        (dict(height=72, width=64), "a multiple of 64"),
        (dict(height=64, width=64, num_images_per_prompt=5), r"batch .*\s+5\s+1\.\.4"),
    ],
)
def test_request_outside_profile(pipe, kwargs, message):
    calls = []
    shims = (pipe.text_encoder, pipe.unet)
    originals = [s.engine for s in shims]
    for s in shims:
        s.engine = lambda **kw: calls.append(kw)
    try:
        with pytest.raises(ShapeError) as info:
            pipe("a cat", num_inference_steps=2, **kwargs)
    finally:
        for s, original in zip(shims, originals):
            s.engine = original
    assert re.search(message, str(info.value)), str(info.value)
    assert calls == [], "the request must be refused before any engine runs"


def test_batch_counts_prompts_times_images(pipe):
    with pytest.raises(ShapeError, match="batch"):
        pipe(["a", "b", "c"], num_images_per_prompt=2, height=64, width=64, num_inference_steps=1)


def test_latents_of_wrong_shape(pipe):
    with pytest.raises(ShapeError, match=r"latents must have shape \[1, 4, 8, 8\]"):
        pipe("a cat", height=64, width=64, num_inference_steps=1, latents=torch.zeros(1, 4, 16, 16))


def test_engine_checks_its_own_ranges(pipe):
    with pytest.raises(ShapeError, match=r"outside the range the engine was built for: min \[1, 4, 8, 8\], max \[8, 4, 32, 32\]"):
        pipe.unet.engine(sample=torch.zeros(1, 4, 40, 40), timestep=torch.zeros(1),
                         encoder_hidden_states=torch.zeros(1, 77, 32))


def test_truncated_engine_file(tiny_artifact, tmp_path):
    folder = shutil.copytree(tiny_artifact, tmp_path / "a")
    engine = folder / "unet.onnx"
    engine.write_bytes(engine.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match=r"unet.onnx .*truncated or replaced"):
        load_pipeline(folder)


def test_altered_engine_file(tiny_artifact, tmp_path):
    folder = shutil.copytree(tiny_artifact, tmp_path / "a")
    engine = folder / "vae_decoder.onnx"
    data = bytearray(engine.read_bytes())
    data[-100] ^= 0xFF
    engine.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"vae_decoder.onnx .*altered"):
        load_pipeline(folder)


def test_missing_engine_file(tiny_artifact, tmp_path):
    folder = shutil.copytree(tiny_artifact, tmp_path / "a")
    (folder / "text_encoder.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"text_encoder.onnx\s+present\s+missing"):
        load_pipeline(folder)


def test_newer_manifest_format(tiny_artifact, tmp_path):
    folder = shutil.copytree(tiny_artifact, tmp_path / "a")
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="format version 99, newer than this kiln reads"):
        load_pipeline(folder)


def test_not_an_artifact_folder(tmp_path):
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        load_pipeline(tmp_path)


def test_wrong_backend_and_task(tiny_artifact):
    with pytest.raises(ArtifactError, match="holds onnxruntime engines"):
        load_pipeline(tiny_artifact, backend="tensorrt")
    with pytest.raises(ArtifactError, match="task must be one of"):
        load_pipeline(tiny_artifact, task="inpaint")


def test_manifest_describes_every_file(tiny_artifact):
    manifest = load_manifest(tiny_artifact)
    on_disk = {p.relative_to(tiny_artifact).as_posix() for p in tiny_artifact.rglob("*") if p.is_file()}
    assert set(manifest.data["files"]) == on_disk - {"manifest.json"}
    unet = manifest.components["unet"]
    assert [t.name for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    sample = unet.inputs[0]
    assert (sample.min, sample.opt, sample.max) == ((1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 32, 32))
    assert manifest.data["backend"]["execution_provider"] == "CPUExecutionProvider"
    assert manifest.data["profile"]["shapes"]["height"] == [64, 128, 256]
    assert manifest.data["model"]["source"] == "builtin:tiny"
    assert len(manifest.data["model"]["weights_sha256"]) == 64
    for c in manifest.data["components"].values():
        assert c["precision"] == "fp32" and len(c["onnx_sha256"]) == 64 and c["build_seconds"] >= 0
