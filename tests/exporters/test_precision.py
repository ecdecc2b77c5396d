"""fp16 and int8 graphs: valid for a strongly typed TensorRT build, and measured against fp32."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from engines.build import BuildOptions, build_from_export
from exporters.builtin import ensure_builtin
from exporters.export import ExportOptions, export_model, read_export
from exporters.precision import mixed_type_problems, qdq_problems
from exporters.profile import load_profile
from exporters.quality import cosine, psnr
from exporters.resolve import resolve_model
from exporters.specs import sample_inputs, tensor_ranges
from runtime import load_pipeline
from runtime.errors import BuildError, ExportError

FP16_MIN_PSNR_DB = 60.0  # measured 69.5 dB on tiny (worst of 2 images, 8 steps, 128x128)
INT8_MIN_COSINE = 0.99  # measured 0.9978 (TensorRT recipe) and 0.9982 (U8S8) on tiny's UNet; the build gate is 0.98
FLOAT, FLOAT16, INT8, INT32 = 1, 10, 3, 6


def _types(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {t.name: t.data_type for t in inferred.graph.initializer}
    for v in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info):
        types[v.name] = v.type.tensor_type.elem_type
    return types


def test_fp16_images_match_fp32_engines(tiny_fp16_artifact, tiny_artifact):
    report = json.loads((tiny_fp16_artifact / "report.json").read_text())
    assert report["quality"]["pipeline"]["psnr_db"] >= FP16_MIN_PSNR_DB
    images = []
    for folder in (tiny_artifact, tiny_fp16_artifact):
        pipe = load_pipeline(folder)
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe("a harbour at dawn", height=128, width=192, num_inference_steps=10,
                           generator=torch.Generator().manual_seed(3), output_type="np").images)
    assert images[0].std() > 0.05
    assert psnr(*images) >= FP16_MIN_PSNR_DB


def test_fp16_graph_is_strongly_typed(tiny_fp16_export):
    model = onnx.load(tiny_fp16_export / "unet" / "model.onnx")
    assert mixed_type_problems(model) == []
    types = _types(model)
    assert [types[i.name] for i in model.graph.input] == [FLOAT, FLOAT, FLOAT]
    assert [types[o.name] for o in model.graph.output] == [FLOAT]
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(types[n.input[1]] == FLOAT16 for n in convs), "convolutions run in fp16"
    kept = [n for n in model.graph.node if n.op_type in ("InstanceNormalization", "LayerNormalization", "Softmax")]
    assert kept and all(types[n.input[0]] == FLOAT for n in kept), "normalizations and the upcast softmax stay fp32"
    for node in model.graph.node:  # every type change is an explicit Cast
        floats = {types.get(i) for i in node.input if types.get(i) in (FLOAT, FLOAT16)}
        outs = {types.get(o) for o in node.output if types.get(o) in (FLOAT, FLOAT16)}
        if node.op_type not in ("Cast", "Resize", "Shape") and floats and outs:
            assert floats == outs, (node.name, node.op_type)


def test_keep_fp32_policy_is_profile_data():
    sd21 = load_profile("sd21").with_precision("fp16")
    assert dict(sd21.precision) == {"text_encoder": "fp16", "unet": "fp16", "vae_decoder": "fp32", "vae_encoder": "fp32"}
    assert dict(load_profile("sd15").with_precision("fp16").precision)["vae_decoder"] == "fp16"
    assert dict(load_profile("tiny").with_precision("int8").precision) == {
        "text_encoder": "fp32", "unet": "int8", "vae_decoder": "fp32", "vae_encoder": "fp32"}


def test_int8_graph_meets_tensorrt_qdq_rules(tiny_int8_export):
    model = onnx.load(tiny_int8_export / "unet" / "model.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(qs) > 20 and len(dqs) > len(qs)
    weight_dqs = 0
    for n in qs + dqs:
        scale, zero = inits[n.input[1]], inits[n.input[2]]  # constant scales and zero points
        assert zero.data_type == INT8 and not numpy_helper.to_array(zero).any(), n.name
        assert numpy_helper.to_array(scale).min() > 0
    for dq in dqs:
        source = inits.get(dq.input[0])
        assert source is None or source.data_type != INT32, f"{dq.name}: int32 bias quantization"
        users = consumers[dq.output[0]]
        assert len(users) == 1, f"{dq.name} is shared by {[u.name for u in users]}"
        if numpy_helper.to_array(inits[dq.input[1]]).size > 1:  # per-channel: weights only, output channels
            assert source is not None and source.data_type == INT8, dq.name
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            user = users[0]
            if user.op_type == "Conv":
                assert axis == 0
            elif user.op_type == "MatMul":
                assert axis == len(source.dims) - 1
            elif user.op_type == "Gemm":
                assert axis == (0 if any(a.name == "transB" and a.i for a in user.attribute) else 1)
            weight_dqs += 1
    assert weight_dqs > 10
    assert qdq_problems(model) == []
    # for GPU targets int8 mixes with fp16: scales are fp16, so Q/DQ sit on fp16 tensors without Casts
    scales = {inits[n.input[1]].data_type for n in qs + dqs}
    assert scales == {FLOAT16}
    assert mixed_type_problems(model) == []


@pytest.mark.slow
def test_qdq_checker_catches_the_cpu_recipe(tiny_int8_export, tmp_path):
    from exporters.precision import quantize_int8

    samples = [dict(np.load(tiny_int8_export / "reference" / "unet.npz"))]
    samples = [{k: v for k, v in samples[0].items() if k != "model_output"}]
    fp32 = tmp_path / "fp32.onnx"
    source, profile = resolve_model("tiny")
    export_model(source, profile, tmp_path / "e", ExportOptions(components=("unet",), check_points=("min",)))
    shutil.copy(tmp_path / "e" / "unet" / "model.onnx", fp32)
    quantize_int8(fp32, tmp_path / "u8s8.onnx", samples, "ort-cpu", ())
    rules = {rule for _, rule, _ in qdq_problems(onnx.load(tmp_path / "u8s8.onnx"))}
    assert {"zero point", "zero point type", "Q/DQ pair"} <= rules


def test_int8_unet_quality(tiny_int8_export, tiny_export):
    export = read_export(tiny_int8_export)
    unet = export["components"]["unet"]
    assert unet["precision"] == "int8" and unet["int8"]["recipe"] == "tensorrt" and unet["int8"]["base"] == "fp16"
    assert unet["quality"]["model_output"]["cosine"] >= INT8_MIN_COSINE
    assert export["components"]["text_encoder"]["precision"] == "fp32"
    # independently of the export's own held-out set: fresh inputs through both graphs
    source, profile = resolve_model("tiny")
    spec = source.family.component_specs(source.dims)["unet"]
    ranges = tensor_ranges(spec, profile, source.dims)
    inputs = sample_inputs(spec, {t.name: ranges[t.name]["opt"] for t in spec.inputs}, 4242)
    inputs["timestep"][:] = 400.0
    fp32 = ort.InferenceSession(str(tiny_export / "unet" / "model.onnx")).run(None, inputs)[0]
    int8 = ort.InferenceSession(str(tiny_int8_export / "unet" / "model.onnx")).run(None, inputs)[0]
    assert cosine(fp32, int8) >= INT8_MIN_COSINE


def test_int8_artifact_records_precision_and_recipe(tiny_int8_export, tmp_path):
    folder = build_from_export(tiny_int8_export, tmp_path / "art", BuildOptions(backend="onnxruntime", device="cpu")).folder
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["components"]["unet"]["precision"] == "int8"
    assert manifest["components"]["unet"]["int8"]["recipe"] == "tensorrt"
    report = json.loads((folder / "report.json").read_text())
    assert report["quality"]["components"]["unet"]["model_output"]["cosine"] >= INT8_MIN_COSINE
    (engine,) = report["engine_parity"]["unet"]
    assert engine["ok"] and engine["cosine"] >= engine["min_cosine"] == 0.98
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=3, output_type="np").images
    assert np.isfinite(image).all() and image.std() > 0.05


def test_precision_the_backend_cannot_build(tiny_int8_export, tmp_path):
    with pytest.raises(BuildError, match=r"unet is int8, which the onnxruntime backend on CUDAExecutionProvider cannot build"):
        build_from_export(tiny_int8_export, tmp_path / "art", BuildOptions(backend="onnxruntime", device="cuda"))
    assert not (tmp_path / "art").exists()


def test_int8_needs_prompts_for_a_real_model(tmp_path):
    folder = shutil.copytree(ensure_builtin("tiny"), tmp_path / "my-model")
    source, profile = resolve_model(str(folder))
    with pytest.raises(ExportError, match="int8 needs calibration prompts for .*--calibration-prompts FILE"):
        export_model(source, profile, tmp_path / "out", ExportOptions(precision="int8"))
    few = tmp_path / "few.txt"
    few.write_text("a cat\na dog\n# a comment\n\na bird\n")
    with pytest.raises(ExportError, match="has 3 calibration prompts; a real model needs at least 32"):
        export_model(source, profile, tmp_path / "out", ExportOptions(precision="int8", calibration_prompts=str(few)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["few.txt", "my-model"]


@pytest.mark.model
def test_interrupted_calibration_leaves_nothing(tmp_path, monkeypatch):
    import dataclasses

    from exporters.families import sd

    real = sd.FAMILY.record_calibration
    calls = []

    def interrupted(pipe, *args, **kwargs):
        forward = pipe.unet.forward

        def counting(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return forward(*a, **k)

        pipe.unet.forward = counting
        try:
            return real(pipe, *args, **kwargs)
        finally:
            pipe.unet.forward = forward

    monkeypatch.setattr(sd, "FAMILY", dataclasses.replace(sd.FAMILY, record_calibration=interrupted))
    source, profile = resolve_model("tiny")
    with pytest.raises(KeyboardInterrupt):
        export_model(source, profile, tmp_path / "out", ExportOptions(precision="int8"))
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []
