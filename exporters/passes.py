"""Graph passes: plain functions Graph -> Graph, one job each; a component's order is a plain list."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

_PROTO_LIMIT = 2**31 - 2**20  # protobuf cannot serialize a model of 2 GB or more


@dataclass(frozen=True)
class PassContext:
    component: str


def cleanup_graph(graph, ctx: PassContext):
    """Remove dead nodes and tensors, then sort topologically."""
    before = len(graph.nodes)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    log.debug("%s: cleanup_graph %d -> %d nodes", ctx.component, before, len(graph.nodes))
    return graph


def fold_constants(graph, ctx: PassContext):
    """Evaluate subgraphs whose inputs are all constants (shape arithmetic, casts of weights)."""
    before = len(graph.nodes)
    graph.fold_constants(error_ok=False).cleanup(remove_unused_graph_inputs=False)
    log.debug("%s: fold_constants %d -> %d nodes", ctx.component, before, len(graph.nodes))
    return graph


def infer_shapes(graph, ctx: PassContext):
    """Run ONNX shape inference so every tensor carries dtype and (symbolic) shape."""
    import onnx
    import onnx_graphsurgeon as gs

    model = gs.export_onnx(graph)
    if _initializer_bytes(model) < _PROTO_LIMIT:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    else:  # over 2 GB: inference must go through a file with external data
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
            onnx.shape_inference.infer_shapes_path(str(path), str(path))
            model = onnx.load(path)
    unknown = sum(1 for v in model.graph.value_info if not v.type.tensor_type.HasField("shape"))
    log.debug("%s: infer_shapes %d tensors typed, %d without shape", ctx.component, len(model.graph.value_info), unknown)
    return gs.import_onnx(model)


DEFAULT_PASSES: list[Callable] = [cleanup_graph, fold_constants, infer_shapes, cleanup_graph]


def run_passes(model, ctx: PassContext, passes: list[Callable] = DEFAULT_PASSES):
    """onnx.ModelProto -> onnx.ModelProto through `passes`."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    for p in passes:
        graph = p(graph, ctx)
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    return out


def _initializer_bytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)
