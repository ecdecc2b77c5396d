"""The export folder: named dynamic axes, external data, parity records, and the tolerance error."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exporters.check import check_against_torch
from exporters.export import ExportOptions, export_model, read_export
from exporters.resolve import resolve_model
from exporters.specs import tensor_ranges
from runtime.errors import ExportError, ToleranceError


def test_export_folder_layout(tiny_export):
    export = read_export(tiny_export)
    assert set(export["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    for entry in export["components"].values():
        assert (tiny_export / entry["onnx"]).is_file()
        assert (tiny_export / entry["reference"]).is_file()
        assert {r["point"] for r in entry["parity"]} == {"min", "opt", "max"}
        assert all(r["ok"] and r["max_abs_err"] < 1e-3 for r in entry["parity"])
    assert (tiny_export / "tokenizer" / "tokenizer_config.json").is_file()
    assert (tiny_export / "scheduler" / "scheduler_config.json").is_file()


def test_onnx_inputs_have_named_dynamic_axes(tiny_export):
    model = onnx.load(tiny_export / "unet" / "model.onnx", load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["sample"][1] == 4 and dims["encoder_hidden_states"][1:] == [77, 32]
    assert all(isinstance(d, str) and d for d in (dims["sample"][0], dims["sample"][2], dims["sample"][3]))
    assert dims["sample"][0] == dims["timestep"][0] == dims["encoder_hidden_states"][0]
    text = onnx.load(tiny_export / "text_encoder" / "model.onnx", load_external_data=False)
    assert text.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT32


def test_graph_passes_left_no_dead_nodes(tiny_export):
    model = onnx.load(tiny_export / "vae_decoder" / "model.onnx")
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    assert all(any(o in used for o in n.output) for n in model.graph.node)
    assert not [n for n in model.graph.node if n.op_type in ("Constant", "Shape") and n.output[0] not in used]


@pytest.mark.model
def test_large_graphs_use_external_data(tmp_path):
    source, profile = resolve_model("tiny")
    options = ExportOptions(components=("text_encoder",), external_data_threshold=0)
    out = export_model(source, profile, tmp_path / "exp", options)
    onnx_path = out / "text_encoder" / "model.onnx"
    data = out / "text_encoder" / "model.onnx.data"
    assert data.is_file() and data.stat().st_size > onnx_path.stat().st_size
    assert set(read_export(out)["components"]["text_encoder"]["files"]) == {"model.onnx", "model.onnx.data"}
    ids = np.zeros((1, 77), dtype=np.int32)
    assert ort.InferenceSession(str(onnx_path)).run(None, {"input_ids": ids})[0].shape == (1, 77, 32)
    # the engine built from it carries external data of its own name, listed in the manifest
    from engines.build import BuildOptions, build_from_export

    art = build_from_export(out, tmp_path / "art", BuildOptions(backend="onnxruntime", device="cpu")).folder
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["components"]["text_encoder"]["files"] == ["text_encoder.onnx", "text_encoder.onnx.data"]
    assert "text_encoder.onnx.data" in manifest["files"] and not (art / "model.onnx.data").exists()


def test_mismatch_raises_tolerance_error_with_a_table(tiny_export):
    source, profile = resolve_model("tiny")
    strict = dataclasses.replace(source.family.component_specs(source.dims)["unet"], atol=0.0, rtol=0.0)
    module = strict.wrap(source.load_pipeline())
    ranges = tensor_ranges(strict, profile, source.dims)
    with pytest.raises(ToleranceError) as info:
        check_against_torch(strict, module, tiny_export / "unet" / "model.onnx", ranges)
    text = str(info.value)
    assert "unet: the ONNX graph disagrees with PyTorch" in text
    for point, shape in (("min", "1x4x8x8"), ("opt", "2x4x16x16"), ("max", "8x4x32x32")):
        assert f"{point}    model_output  {shape}" in text


def test_bad_export_options(tmp_path):
    source, profile = resolve_model("tiny")
    with pytest.raises(ExportError, match=r"unknown components \['safety_checker'\]; valid for sd models: "
                                          r"text_encoder, unet, vae_decoder, vae_encoder"):
        export_model(source, profile, tmp_path / "out", ExportOptions(components=("safety_checker",)))
    assert not (tmp_path / "out").exists()


def test_read_export_rejects_other_folders(tiny_artifact):
    with pytest.raises(ExportError, match="has no export.json"):
        read_export(tiny_artifact)


def test_export_records_its_inputs(tiny_export):
    export = json.loads((tiny_export / "export.json").read_text())
    assert export["model"]["source"] == "builtin:tiny" and len(export["export_key"]) == 64
    assert export["exporter"]["name"] == "dynamo"
    assert export["components"]["unet"]["config"]["upcast_attention"] is True
    assert export["components"]["unet"]["config"]["cross_attention_dim"] == 32


@pytest.mark.model
def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    import exporters.export as export_mod

    source, profile = resolve_model("tiny")
    calls = []

    def interrupt_second(model, ctx):
        calls.append(ctx.component)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return model

    monkeypatch.setattr(export_mod, "run_passes", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        export_model(source, profile, tmp_path / "exp", ExportOptions(components=("text_encoder", "vae_decoder")))
    assert calls == ["text_encoder", "vae_decoder"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.model
def test_check_points_are_recorded_and_buildable(tmp_path):
    from engines.build import BuildOptions, build_from_export

    source, profile = resolve_model("tiny")
    out = export_model(source, profile, tmp_path / "exp",
                       ExportOptions(components=("text_encoder",), check_points=("min",)))
    entry = read_export(out)["components"]["text_encoder"]
    assert [r["point"] for r in entry["parity"]] == ["min"]
    assert (out / entry["reference"]).is_file()
    # engine parity still runs, on the opt-shape reference
    build_from_export(out, tmp_path / "art", BuildOptions(backend="onnxruntime", device="cpu"))
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    assert report["engine_parity"]["text_encoder"][0]["ok"]


def test_export_key_follows_what_changes_the_output(tmp_path):
    from exporters.export import export_key

    source, profile = resolve_model("tiny")
    base = export_key(source, profile, ExportOptions())
    assert export_key(source, profile, ExportOptions(int8_target="ort-cpu")) == base  # nothing is int8
    assert export_key(source, profile, ExportOptions(precision="fp16")) != base
    int8 = export_key(source, profile, ExportOptions(precision="int8"))
    assert int8 != export_key(source, profile, ExportOptions(precision="int8", int8_target="ort-cpu"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    first = export_key(source, profile, ExportOptions(precision="int8", calibration_prompts=str(prompts)))
    prompts.write_text("a cat\na bird\n")
    assert export_key(source, profile, ExportOptions(precision="int8", calibration_prompts=str(prompts))) != first


def test_hand_built_records_are_what_the_export_writes(tiny_export):
    """tests/records.py builds tiny's records without exporting; they must not drift from the real ones."""
    from tests.records import TINY_DIMS, export_components

    export = read_export(tiny_export)
    assert export["dims"] == TINY_DIMS.to_dict()
    assert export["model"]["family"] == "sd" and export["assets"] == ["tokenizer", "scheduler"]
    for name, record in export_components().items():
        entry = export["components"][name]
        assert (entry["inputs"], entry["outputs"], entry["precision"]) == (record["inputs"], record["outputs"], "fp32")
