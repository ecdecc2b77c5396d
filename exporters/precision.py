"""Precision passes on checked fp32 graphs: fp16 under a keep-fp32 policy, and int8 Q/DQ from
calibration data. Both write precision into the graph itself, which is what TensorRT 11's
strongly typed builder reads and what ONNX Runtime runs on CPU."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from exporters.onnx_io import GraphIndex, over_proto_limit
from exporters.passes import matches_module
from runtime.errors import ExportError, format_table

log = logging.getLogger(__name__)

FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}
# Inputs that the ONNX spec types independently of the data (e.g. Resize's scales are always float32).
_INDEPENDENT_INPUTS = {"Resize": {1, 2, 3}, "Cast": {0}, "Shape": {0},
                       "QuantizeLinear": {1}, "DequantizeLinear": {0, 1, 2}, "ConstantOfShape": {0}}
INT8_RECIPES = ("tensorrt", "ort-cpu")


@dataclass(frozen=True)
class Fp16Policy:
    """What stays fp32 when a component is converted to fp16 (data from the profile's [fp16])."""

    keep_fp32_ops: tuple[str, ...] = ("InstanceNormalization", "LayerNormalization", "GroupNormalization")
    keep_fp32_modules: tuple[str, ...] = ("time_proj",)  # sin/cos of timesteps up to 1000 lose digits in fp16
    keep_fp32_softmax: str = "upcast"  # "upcast": when the model upcasts attention | "always" | "never"
    keep_fp32_components: tuple[str, ...] = ()  # whole components, e.g. the VAE of SD 2.x


@dataclass(frozen=True)
class Int8Policy:
    """How the UNet is quantized (data from the profile's [int8])."""

    recipe: str = "auto"  # "tensorrt" | "ort-cpu" | "auto" (from the build target)
    calibration_prompts: str | None = None  # a file, relative to profiles/ or absolute
    calibration_steps: int = 8
    exclude_modules: tuple[str, ...] = ("time_proj", "time_embedding", "conv_in", "conv_out")


def convert_fp16(model, policy: Fp16Policy, upcast_attention: bool, keep_io=None):
    """fp32 graph -> fp16 graph with fp32 inputs and outputs; blocked ops and modules stay fp32
    behind explicit Casts. keep_io: the inputs and outputs that stay fp32 (default: all of them)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    ops = set(DEFAULT_OP_BLOCK_LIST) | set(policy.keep_fp32_ops)
    if policy.keep_fp32_softmax == "always" or (policy.keep_fp32_softmax == "upcast" and upcast_attention):
        ops.add("Softmax")
    nodes = [n.name for n in model.graph.node if matches_module(n.name, policy.keep_fp32_modules)]
    out = convert_float_to_float16(model, keep_io_types=True if keep_io is None else list(keep_io),
                                   op_block_list=sorted(ops), node_block_list=nodes,
                                   disable_shape_infer=over_proto_limit(model))
    fp32_left = sum(1 for n in out.graph.node if n.op_type in ops) + len(nodes)
    log.debug("fp16: %d nodes, %d kept fp32 (ops %s, %d by module)", len(out.graph.node), fp32_left, sorted(ops), len(nodes))
    return out


def convert_fp16_file(fp32_path: Path, policy: Fp16Policy, upcast_attention: bool):
    """The fp16 graph of the fp32 graph at `fp32_path`, without reading its external weights: they
    are graph inputs while the converter runs (the graph's real inputs and outputs stay fp32), and
    come back as placeholders that save_graph(model, path, fp32_path.parent, ...) writes as fp16,
    one tensor at a time. A weight only fp32 nodes read stays fp32. Graphs without external
    weights (small models) convert in memory, as convert_fp16."""
    import onnx

    from exporters.weights import as_fp16_weight, attach_weights, detach_weights, load_graph

    model = load_graph(fp32_path)
    io = [t.name for t in (*model.graph.input, *model.graph.output)]
    weights = detach_weights(model)
    out = convert_fp16(model, policy, upcast_attention, keep_io=io)
    types = {i.name: i.type.tensor_type.elem_type for i in out.graph.input if i.name in weights}
    consumers: dict[str, list] = {}
    for node in out.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    back_to_fp32 = [n for n, t in types.items() if t == onnx.TensorProto.FLOAT16 and consumers.get(n)
                    and all(c.op_type == "Cast" and _cast_to(c) == onnx.TensorProto.FLOAT for c in consumers[n])]
    for name in back_to_fp32:  # only blocked nodes read it: no fp16 round trip, the fp32 weight itself
        for cast in consumers[name]:
            for node in out.graph.node:
                node.input[:] = [name if i == cast.output[0] else i for i in node.input]
            out.graph.node.remove(cast)
        types[name] = onnx.TensorProto.FLOAT
    attach_weights(out, {n: as_fp16_weight(w, n) if types.get(n) == onnx.TensorProto.FLOAT16 else w
                         for n, w in weights.items()})
    log.debug("fp16: %d external weights written as fp16, %d kept fp32", sum(t == onnx.TensorProto.FLOAT16 for t in
              types.values()), sum(t == onnx.TensorProto.FLOAT for t in types.values()))
    return out


def _cast_to(node) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def tensor_types(model) -> dict[str, int]:
    """elem_type of every tensor after shape inference (inputs, outputs, initializers, values)."""
    import onnx

    inferred = model if over_proto_limit(model) else onnx.shape_inference.infer_shapes(model)
    types = {t.name: t.data_type for t in inferred.graph.initializer}
    for v in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info):
        if v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for n in inferred.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def mixed_type_problems(model) -> list[tuple[str, str, str]]:
    """Nodes that mix floating types across their data inputs: each must be an explicit Cast
    for a strongly typed TensorRT build. Returns (node, op, input types) rows."""
    types = tensor_types(model)
    rows = []
    for node in model.graph.node:
        skip = _INDEPENDENT_INPUTS.get(node.op_type, set())
        floats = {FLOAT_TYPES[types[i]] for k, i in enumerate(node.input)
                  if i and k not in skip and types.get(i) in FLOAT_TYPES}
        if len(floats) > 1:
            rows.append((node.name, node.op_type, ", ".join(sorted(floats))))
    return rows


def check_strongly_typed(model, component: str) -> None:
    rows = mixed_type_problems(model)
    if rows:
        raise ExportError(
            f"{component}: the fp16 graph mixes floating types in {len(rows)} nodes; a strongly typed build "
            "needs an explicit Cast at every type change:\n" + format_table(["node", "op", "input types"], rows[:20])
        )


class RecordedInputs:
    """onnxruntime CalibrationDataReader over recorded {input name: array} samples."""

    def __init__(self, samples: Iterable[Mapping]):
        self._iter: Iterator[Mapping] = iter(list(samples))

    def get_next(self):
        return next(self._iter, None)

    def rewind(self):  # the calibrators read once; nothing to rewind
        pass


def quantize_int8(fp32_path: Path, out_path: Path, samples: list[Mapping], recipe: str, exclude_modules) -> None:
    """Static Q/DQ int8 of Conv, Gemm and weight MatMuls from recorded inputs (MinMax calibration).
    The graph may be fp32 or fp16; scales take the graph's type.

    tensorrt: symmetric int8 activations and weights, zero points 0, per-channel weights, no bias
    quantization, one Q/DQ pair per consumer. ort-cpu: asymmetric uint8 activations with symmetric
    per-channel int8 weights (U8S8), which ONNX Runtime's CPU kernels run fastest."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if recipe not in INT8_RECIPES:
        raise ExportError(f"int8 recipe must be one of {', '.join(INT8_RECIPES)}, got {recipe!r}")
    model = onnx.load(str(fp32_path), load_external_data=False)
    exclude = [n.name for n in model.graph.node if matches_module(n.name, exclude_modules)]
    trt = recipe == "tensorrt"
    extra = {"MatMulConstBOnly": True, "QuantizeBias": False, "WeightSymmetric": True,
             "ActivationSymmetric": trt, "DedicatedQDQPair": trt}
    with _root_logger_quiet():
        quantize_static(
            str(fp32_path), str(out_path), RecordedInputs(samples), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
            activation_type=QuantType.QInt8 if trt else QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude, calibrate_method=CalibrationMethod.MinMax, extra_options=extra,
            use_external_data_format=(fp32_path.parent / f"{fp32_path.name}.data").exists(),
        )
    log.debug("int8 (%s): %d nodes excluded by module %s", recipe, len(exclude), list(exclude_modules))


def qdq_problems(model) -> list[tuple[str, str, str]]:
    """Where an int8 graph breaks TensorRT's Q/DQ rules: int8 types, zero points 0, constant scales,
    per-channel only on weights and on the output-channel axis, no int32 bias, one pair per consumer."""
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    index = GraphIndex.of(model)
    producers, consumers = index.producers, index.consumers
    rows = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale, zero = (n.input[1], n.input[2] if len(n.input) > 2 else "")
        if scale not in inits:
            rows.append((n.name, "scale", "not a constant initializer"))
        if zero:
            z = inits.get(zero)
            if z is None:
                rows.append((n.name, "zero point", "not a constant initializer"))
            else:
                if z.data_type != 3:  # INT8
                    rows.append((n.name, "zero point type", f"elem_type {z.data_type}, expected int8 (3)"))
                if np.any(numpy_helper.to_array(z) != 0):
                    rows.append((n.name, "zero point", "non-zero"))
        per_channel = scale in inits and numpy_helper.to_array(inits[scale]).size > 1
        source = n.input[0]
        if n.op_type == "DequantizeLinear":
            if source in inits and inits[source].data_type == 6:  # INT32
                rows.append((n.name, "bias", "int32 bias quantization"))
            weight = source in inits or (source in producers and producers[source].input[0] in inits)
            if per_channel:
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                users = consumers.get(n.output[0], [])
                if not weight:
                    rows.append((n.name, "per-channel", "on an activation"))
                elif users and axis != _output_channel_axis(users[0], inits.get(source)):
                    rows.append((n.name, "per-channel axis",
                                 f"{axis}, expected {_output_channel_axis(users[0], inits.get(source))} "
                                 f"(output channels of {users[0].op_type})"))
            users = consumers.get(n.output[0], [])
            if len(users) > 1:
                rows.append((n.name, "Q/DQ pair", f"shared by {len(users)} consumers"))
    return rows


def _output_channel_axis(consumer, weight) -> int:
    """Axis of a weight that indexes the consumer's output channels."""
    if consumer.op_type == "Gemm":
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if consumer.op_type == "MatMul":
        return (len(weight.dims) - 1) if weight is not None else 1
    if consumer.op_type == "ConvTranspose":
        return 1
    return 0  # Conv: [out, in, kh, kw]


@contextlib.contextmanager
def _root_logger_quiet():
    """onnxruntime.quantization logs through the root logger (logging.warning), which installs a
    root handler on first use and then echoes every library's records; give root a NullHandler
    for the duration instead."""
    import onnxruntime as ort

    root = logging.getLogger()
    handler = None if root.handlers else logging.NullHandler()
    if handler:
        root.addHandler(handler)
    ort.set_default_logger_severity(3)  # calibration sessions warn about every fp16 node CPU cannot fold
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)
        if handler:
            root.removeHandler(handler)


QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


def dedicate_qdq_pairs(model):
    """One Q/DQ pair per quantized consumer; consumers that are not quantized (Add, Concat,
    Reshape, ...) read the unquantized tensor, so no pair is shared (TensorRT's Q/DQ placement)."""
    import copy

    import onnx_graphsurgeon as gs

    index = GraphIndex.of(model)
    producers, consumers = index.producers, index.consumers
    added, rewired = [], 0
    for dq in [n for n in model.graph.node if n.op_type == "DequantizeLinear"]:
        users = consumers.get(dq.output[0], [])
        if len(users) <= 1:
            continue
        q = producers.get(dq.input[0])
        q = q if q is not None and q.op_type == "QuantizeLinear" else None
        kept = False
        for k, user in enumerate(users):
            quantized = user.op_type in QUANTIZED_OPS
            if quantized and not kept:
                kept = True
                continue
            if not quantized and q is not None:
                _replace_input(user, dq.output[0], q.input[0])
                rewired += 1
                continue
            new_dq = copy.deepcopy(dq)
            new_dq.name, new_dq.output[0] = f"{dq.name}_{k}", f"{dq.output[0]}_{k}"
            if q is not None:
                new_q = copy.deepcopy(q)
                new_q.name, new_q.output[0] = f"{q.name}_{k}", f"{q.output[0]}_{k}"
                new_dq.input[0] = new_q.output[0]
                added.append(new_q)
            added.append(new_dq)
            _replace_input(user, dq.output[0], new_dq.output[0])
    model.graph.node.extend(added)
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    log.debug("dedicate_qdq_pairs: %d Q/DQ nodes added, %d consumers now read fp32", len(added), rewired)
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    return out


def _replace_input(node, old: str, new: str) -> None:
    for i, name in enumerate(node.input):
        if name == old:
            node.input[i] = new
