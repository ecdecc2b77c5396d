"""Graph passes: plain functions Graph -> Graph, one job each; a component's order is a plain list."""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from exporters.onnx_io import over_proto_limit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassContext:
    component: str
    workdir: Path | None = None  # where temporary files go (beside the output); None: the system's
    protected: frozenset[str] = frozenset()  # initializers no pass may fold or change (refittable weights)

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
    if not over_proto_limit(model):
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    else:  # over 2 GB: inference must go through a file with external data
        with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
            onnx.shape_inference.infer_shapes_path(str(path), str(path))
            model = onnx.load(path)
    unknown = sum(1 for v in model.graph.value_info if not v.type.tensor_type.HasField("shape"))
    log.debug("%s: infer_shapes %d tensors typed, %d without shape", ctx.component, len(model.graph.value_info), unknown)
    return gs.import_onnx(model)


DEFAULT_PASSES: list[Callable] = [cleanup_graph, fold_constants, infer_shapes, cleanup_graph]


def name_nodes_by_module(model, ctx: PassContext):
    """Name every node after the torch module it came from ("time_embedding.linear_1/node_linear"),
    then drop the exporter's bulky per-node metadata. Runs on the ModelProto, before graphsurgeon
    (which does not keep metadata); precision policies match these module paths."""
    import ast

    renamed = 0
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes")
        if scopes:  # dynamo: ['', 'unet', 'unet.time_embedding', 'unet.time_embedding.linear_1', 'linear']
            parts = ast.literal_eval(scopes)
            path = parts[-2] if len(parts) >= 2 else ""
        else:  # torchscript: '/unet/time_embedding/linear_1/Gemm'
            path = node.name.rsplit("/", 1)[0].strip("/").replace("/", ".")
        path = path.split(".", 1)[1] if "." in path else ""  # drop the wrapper's attribute (unet., vae., ...)
        if path:
            node.name = f"{path}/{node.name.rsplit('/', 1)[-1]}"
            renamed += 1
        del node.metadata_props[:]
    log.debug("%s: name_nodes_by_module named %d of %d nodes", ctx.component, renamed, len(model.graph.node))
    return model


def module_of(node_name: str) -> str:
    """The module path a node was named after by name_nodes_by_module ('' when unknown)."""
    return node_name.rsplit("/", 1)[0] if "/" in node_name else ""


def matches_module(node_name: str, patterns) -> bool:
    """True when the node's module path is, or lies inside, one of the glob patterns."""
    import fnmatch

    path = module_of(node_name)
    return bool(path) and any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p + ".*") for p in patterns)


def run_passes(model, ctx: PassContext, passes: list[Callable] = DEFAULT_PASSES):
    """onnx.ModelProto -> onnx.ModelProto through `passes`. Weights left on disk (external data
    not loaded, exporters/weights.py) are graph inputs while the passes run, and stay on disk."""
    import onnx_graphsurgeon as gs

    from exporters.weights import attach_weights, detach_weights

    weights = detach_weights(model, also=ctx.protected)
    model = name_nodes_by_module(model, ctx)
    graph = gs.import_onnx(model)
    for p in passes:
        graph = p(graph, ctx)
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    attach_weights(out, weights)
    return out

