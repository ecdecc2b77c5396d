"""Saving ONNX graphs, with external data where protobuf's 2 GB limit demands it, and the one
index of a graph's producers and consumers that graph walkers share."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROTO_LIMIT = 2**31 - 2**20  # protobuf cannot serialize 2 GB; less some room for the graph itself
EXTERNAL_DATA_THRESHOLD = PROTO_LIMIT  # weight bytes above which a graph's weights go to a .data file


def initializer_bytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def over_proto_limit(model) -> bool:
    """True when the model cannot be serialized in one protobuf (shape inference, saving)."""
    return initializer_bytes(model) > PROTO_LIMIT


def save_onnx(model, path: Path, external_data_threshold: int) -> None:
    """Save `model`; weights go to `<name>.data` beside it when they exceed the threshold."""
    import onnx

    if initializer_bytes(model) > external_data_threshold:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


@dataclass(frozen=True)
class GraphIndex:
    """Who makes and who reads each tensor of an onnx.ModelProto's graph (a snapshot)."""

    producers: dict
    consumers: dict

    @classmethod
    def of(cls, model) -> GraphIndex:
        producers = {o: n for n in model.graph.node for o in n.output}
        consumers: dict[str, list] = {}
        for n in model.graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        return cls(producers, consumers)
