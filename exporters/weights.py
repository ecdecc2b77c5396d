"""Graph weights kept out of memory while an export runs.

torch.onnx writes a traced graph with its weights as external data; kiln reads only the graph
(`load_graph`), runs its passes on a weightless copy in which every large weight is a graph input
of the same name, type and shape (`detached_weights`: folding and shape inference then see only
the small constants they need), and writes the result with its weights copied from the traced
file one tensor at a time (`save_graph`). No step holds the weights in memory, so an export's
peak is the PyTorch module plus what ONNX Runtime needs to check it, not several copies of both."""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

SMALL_TENSOR = 64 * 1024  # external tensors below this are read into the graph (shape constants, biases)
INLINE_LIMIT = 1024  # when weights go to a .data file, tensors below this stay inline (as onnx.save does)


def _external(tensor) -> bool:
    import onnx

    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _info(tensor) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def load_graph(path: Path):
    """The graph at `path`, its large external weights left on disk (read small ones in)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        info = _info(tensor) if _external(tensor) else {}
        if info and "length" not in info:  # torchscript's exporter: one file per weight, its whole size
            size = (Path(path).parent / info["location"]).stat().st_size - int(info.get("offset", 0))
            tensor.external_data.add(key="length", value=str(size))
        if _external(tensor) and int(_info(tensor)["length"]) < SMALL_TENSOR:
            load_external_data_for_tensor(tensor, str(Path(path).parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return model


def external_names(model) -> set[str]:
    """The initializers of `model` whose data is external."""
    return {t.name for t in model.graph.initializer if _external(t)}


def detach_weights(model, also=frozenset()) -> dict:
    """Turn the external weights of `model`, and the initializers named in `also` (weights a pass
    must not fold), into graph inputs of their name, type and shape (in place, for passes that need
    no weight values); returns them by name for `attach_weights`."""
    import onnx

    weights = {t.name: t for t in model.graph.initializer if _external(t) or t.name in also}
    if weights:
        kept = [t for t in model.graph.initializer if t.name not in weights]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                 for t in weights.values())
    return weights


def attach_weights(model, weights: dict) -> None:
    """Undo `detach_weights` on the graph the passes returned: the weight inputs go, and the
    weights still read by a node or given as graph outputs come back as initializers."""
    if not weights:
        return
    inputs = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    used = {i for n in _all_nodes(model.graph) for i in n.input} | {o.name for o in model.graph.output}
    model.graph.initializer.extend(t for name, t in weights.items() if name in used)
    log.debug("%d external weights re-attached, %d no longer used", sum(1 for n in weights if n in used),
              sum(1 for n in weights if n not in used))


def _all_nodes(graph):
    """Every node, also those of If/Loop subgraphs (which may read outer weights)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_nodes(sub)


def weight_bytes(model) -> int:
    """Bytes of every initializer, whether its data is in the graph or external (as saved)."""
    def size(t) -> int:
        info = _info(t)
        return int(info.get("length", 0)) // (2 if info.get(FROM_FP32) else 1)

    return sum(size(t) if _external(t) else len(t.raw_data) for t in model.graph.initializer)


def save_graph(model, path: Path, source_dir: Path | None, external_data_threshold: int,
               keep_external=frozenset()) -> None:
    """Save `model` at `path`. Its external weights are read from `source_dir` (where their
    locations are relative to); they go to `<name>.data`, copied one tensor at a time, when all
    weights exceed the threshold, else into the graph itself (small models: one file). The
    initializers named in `keep_external` always go to `<name>.data` (refittable weights)."""
    import onnx

    path = Path(path)
    external = [t for t in model.graph.initializer if _external(t)]
    if weight_bytes(model) <= external_data_threshold and not keep_external:
        import io

        for tensor in external:
            info = _info(tensor)
            with open(Path(source_dir) / info["location"], "rb") as src:
                src.seek(int(info.get("offset", 0)))
                buffer = io.BytesIO()
                (_copy_as_fp16 if info.get(FROM_FP32) else _copy)(src, buffer, int(info["length"]))
            tensor.raw_data = buffer.getvalue()
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
        onnx.save_model(model, str(path))
        return
    data_name = f"{path.name}.data"
    offset = 0
    with open(path.parent / data_name, "wb") as data:
        src, opened = None, None
        try:
            for tensor in model.graph.initializer:
                if _external(tensor):
                    info = _info(tensor)
                    if info["location"] != opened:  # one source file open at a time (one per weight, for some)
                        if src is not None:
                            src.close()
                        src, opened = open(Path(source_dir) / info["location"], "rb"), info["location"]  # noqa: SIM115
                    src.seek(int(info.get("offset", 0)))
                    length = int(info["length"])
                    if info.get(FROM_FP32):  # an fp32 weight stored as fp16 (as_fp16_weight)
                        length = _copy_as_fp16(src, data, length)
                    else:
                        _copy(src, data, length)
                elif len(tensor.raw_data) >= INLINE_LIMIT or (tensor.name in keep_external and tensor.raw_data):
                    length = len(tensor.raw_data)
                    data.write(tensor.raw_data)
                    tensor.ClearField("raw_data")
                    tensor.data_location = onnx.TensorProto.EXTERNAL
                else:
                    continue
                del tensor.external_data[:]
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                offset += length
                pad = -offset % 4096  # page-aligned tensors: ONNX Runtime and TensorRT can map them
                data.write(b"\0" * pad)
                offset += pad
        finally:
            if src is not None:
                src.close()
    onnx.save_model(model, str(path))


FROM_FP32 = "kiln_from_float32"  # external-data key of a weight save_graph converts from fp32 to fp16


def as_fp16_weight(weight, name: str):
    """A TensorProto named `name` that save_graph writes as the fp16 copy of fp32 external `weight`."""
    import onnx

    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT16, dims=list(weight.dims),
                              data_location=onnx.TensorProto.EXTERNAL)
    for entry in weight.external_data:
        tensor.external_data.add(key=entry.key, value=entry.value)
    tensor.external_data.add(key=FROM_FP32, value="1")
    return tensor


def _copy_as_fp16(src, dst, length: int, chunk: int = 16 * 2**20) -> int:
    """Copy `length` bytes of float32 as float16 (clamped to fp16's range as ONNX Runtime's
    converter does); returns the bytes written."""
    import numpy as np
    from onnxruntime.transformers.float16 import convert_np_to_float16

    written, left = 0, length
    while left:
        block = src.read(min(chunk, left))
        if not block or len(block) % 4:
            raise OSError(f"fp32 external weights end {left} bytes early")
        out = convert_np_to_float16(np.frombuffer(block, dtype=np.float32)).tobytes()
        dst.write(out)
        written += len(out)
        left -= len(block)
    return written


def _copy(src, dst, length: int, chunk: int = 64 * 2**20) -> None:
    left = length
    while left:
        block = src.read(min(chunk, left))
        if not block:
            raise OSError(f"external weights end {left} bytes early")
        dst.write(block)
        left -= len(block)
