"""Low-memory export: weights stay on disk through passes, saving and the fp16 conversion, and
the graphs that come out are the same as those made with every weight in memory."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exporters.export import ExportOptions, export_model
from exporters.resolve import resolve_model


@pytest.fixture(scope="module")
def streamed_fp16_export(tmp_path_factory):
    """tiny's UNet exported in fp16 with every weight forced to external data: streamed, as for a
    large model (the session's tiny_fp16_export converts the same graph in memory)."""
    source, profile = resolve_model("tiny")
    options = ExportOptions(components=("unet",), precision="fp16", check_points=("opt",), external_data_threshold=0)
    return export_model(source, profile, tmp_path_factory.mktemp("streamed") / "tiny", options)


def _run(folder, feed):
    session = ort.InferenceSession(str(folder / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def test_streamed_fp16_graph_equals_the_in_memory_one(streamed_fp16_export, tiny_fp16_export):
    streamed, in_memory = streamed_fp16_export, tiny_fp16_export
    data = streamed / "unet" / "model.onnx.data"
    assert data.is_file() and not (in_memory / "unet" / "model.onnx.data").exists()
    model = onnx.load(str(streamed / "unet" / "model.onnx"), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(t.data_type == onnx.TensorProto.FLOAT16 for t in external if "conv" in t.name.lower())
    whole = onnx.load(str(in_memory / "unet" / "model.onnx"))  # its weights as the in-memory converter made them
    assert abs(data.stat().st_size - sum(len(t.raw_data) for t in whole.graph.initializer)) < 0.1 * data.stat().st_size
    inputs = json.loads((streamed / "export.json").read_text())["components"]["unet"]["inputs"]
    rng = np.random.default_rng(0)
    feed = {t["name"]: rng.standard_normal(t["opt"]).astype(np.float32) for t in inputs}
    feed["timestep"] = np.full(feed["timestep"].shape, 500.0, dtype=np.float32)
    assert np.array_equal(_run(streamed, feed), _run(in_memory, feed))


def test_passes_keep_large_weights_on_disk(tmp_path):
    """run_passes on a graph whose weights are external data: they stay external, unread, and a
    weight the passes make unused is dropped."""
    from onnx import TensorProto, helper, numpy_helper

    from exporters.passes import PassContext, run_passes
    from exporters.weights import load_graph, save_graph

    big = numpy_helper.from_array(np.arange(64 * 1024, dtype=np.float32).reshape(256, 256), "w")
    dead = numpy_helper.from_array(np.ones((256, 256), dtype=np.float32), "unused")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["unused"], ["z"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 256])], [big, dead])
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(helper.make_model(graph), str(src / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    model = load_graph(src / "model.onnx")
    assert all(t.data_location == TensorProto.EXTERNAL and not t.raw_data for t in model.graph.initializer)
    out = run_passes(model, PassContext("test"))
    assert [t.name for t in out.graph.initializer] == ["w"] and [i.name for i in out.graph.input] == ["x"]
    (tmp_path / "out").mkdir()
    save_graph(out, tmp_path / "out" / "model.onnx", src, external_data_threshold=0)
    x = np.ones((2, 256), dtype=np.float32)
    got = ort.InferenceSession(str(tmp_path / "out" / "model.onnx")).run(None, {"x": x})[0]
    assert np.allclose(got, x @ numpy_helper.to_array(big))


def test_weights_in_one_file_each_without_lengths_are_copied(tmp_path):
    """torch's TorchScript exporter writes one file per weight and records no length: save_graph
    takes each file's size, with one source file open at a time."""
    from onnx import TensorProto, helper, numpy_helper

    from exporters.weights import load_graph, save_graph

    weights = [numpy_helper.from_array(np.full((128, 128), k + 1, dtype=np.float32), f"w{k}") for k in range(3)]
    nodes = [helper.make_node("MatMul", ["x" if k == 0 else f"y{k - 1}", f"w{k}"], [f"y{k}"]) for k in range(3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128])],
                              [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 128])], weights)
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(helper.make_model(graph), str(src / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    for t in model.graph.initializer:  # as TorchScript writes them: a location and nothing else
        kept = [(e.key, e.value) for e in t.external_data if e.key == "location"]
        del t.external_data[:]
        for key, value in kept:
            t.external_data.add(key=key, value=value)
    onnx.save_model(model, str(src / "model.onnx"))
    (tmp_path / "out").mkdir()
    save_graph(load_graph(src / "model.onnx"), tmp_path / "out" / "model.onnx", src, external_data_threshold=0)
    x = np.ones((1, 128), dtype=np.float32)
    got = ort.InferenceSession(str(tmp_path / "out" / "model.onnx")).run(None, {"x": x})[0]
    assert np.allclose(got, x @ np.full((128, 128), 1.0) @ np.full((128, 128), 2.0) @ np.full((128, 128), 3.0))
