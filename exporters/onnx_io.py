"""Saving ONNX graphs, with external data where protobuf's 2 GB limit demands it."""
from __future__ import annotations

from pathlib import Path

EXTERNAL_DATA_THRESHOLD = 2**31 - 2**20  # protobuf's 2 GB limit, less some room for the graph


def save_onnx(model, path: Path, external_data_threshold: int) -> None:
    """Save `model`; weights go to `<name>.data` beside it when they exceed the threshold."""
    import onnx

    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if weight_bytes > external_data_threshold:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
